"""uvicorn's HTTP protocol with a deadline for the request head.

uvicorn waits forever for the first request of a new TCP connection, and a connection that never
completes its request (or its WebSocket upgrade) is counted nowhere. Here a connection whose
request head has not arrived within ``REQUEST_HEAD_TIMEOUT`` seconds is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools  # type: ignore[import-untyped]
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.datastructures import Headers
from websockets.http11 import Request

__all__ = ["REQUEST_HEAD_TIMEOUT", "DeadlineHttpProtocol"]

REQUEST_HEAD_TIMEOUT = 10.0


class DeadlineHttpProtocol(HttpToolsProtocol):
    """Closes connections that do not send a complete request head in time."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._head_deadline: asyncio.TimerHandle | None = self.loop.call_later(
            REQUEST_HEAD_TIMEOUT, self._head_timeout
        )

    def on_headers_complete(self) -> None:
        self._cancel_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # As uvicorn's, except that an upgrade keeps the bytes that came after the request head.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                offset = upgrade.args[0] if upgrade.args and isinstance(upgrade.args[0], int) else len(data)
                self.upgrade_to_websocket(data[offset:])
            else:
                self._unsupported_upgrade_warning()

    def handle_websocket_upgrade(self) -> None:
        """uvicorn's own entry point (not reached through :meth:`data_received`)."""
        self.upgrade_to_websocket(b"")

    def upgrade_to_websocket(self, rest: bytes) -> None:
        """Hand the transport to the WebSocket protocol with the request httptools already parsed.

        uvicorn would serialise the request again for the WebSocket protocol to parse again (about
        a fifth of the server CPU of a connection). Then everything that refers back to ``self`` is
        dropped: the httptools parser holds callbacks into this protocol, and left alone the pair
        (with its scope, headers and flow control) is freed only by the cyclic garbage collector,
        whose full passes then grow with every upgraded connection.
        """
        self.connections.discard(self)
        self._cancel_deadline()
        headers = Headers(
            (name.decode("ascii", "surrogateescape"), value.decode("ascii", "surrogateescape"))
            for name, value in self.scope["headers"]
        )
        request = Request(self.url.decode("ascii", "surrogateescape"), headers)
        protocol: Any = self.ws_protocol_class(  # type: ignore[call-arg, misc]
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        transport = self.transport
        protocol.connection_made(transport)
        transport.set_protocol(protocol)
        protocol.upgrade(request, method=self.scope["method"], rest=rest)
        for name in ("parser", "flow", "scope", "headers", "cycle", "pipeline", "url"):
            setattr(self, name, None)

    def shutdown(self) -> None:
        """uvicorn is stopping: let a waiting history long-poll answer now instead of at its timeout."""
        node = self.app_state.get("node")
        if node is not None:
            node.wake_polls()
        super().shutdown()

    def _cancel_deadline(self) -> None:
        handle: Any = getattr(self, "_head_deadline", None)
        if handle is not None:
            handle.cancel()
            self._head_deadline = None

    def _head_timeout(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
