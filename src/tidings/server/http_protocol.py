"""uvicorn's HTTP protocol with a deadline for the request head.

uvicorn waits forever for the first request of a new TCP connection, and a connection that never
completes its request (or its WebSocket upgrade) is counted nowhere. Here a connection whose
request head has not arrived within ``REQUEST_HEAD_TIMEOUT`` seconds is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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

    def handle_websocket_upgrade(self) -> None:
        """Hand the transport to the WebSocket protocol, then drop what refers back to ``self``.

        The httptools parser holds callbacks into this protocol: left alone, the pair (and its
        scope, headers and flow control) is freed only by the cyclic garbage collector, whose full
        passes then grow with every upgraded connection. Broken here, refcounting frees it now.
        """
        super().handle_websocket_upgrade()
        self._cancel_deadline()
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
