"""uvicorn's HTTP protocol with limits and deadlines for what a client sends.

uvicorn reads request heads and bodies of any size and waits forever for a request head once a
byte of it arrived. Here, for every request of a connection (the WebSocket upgrade too):

* the head must be complete within ``REQUEST_HEAD_TIMEOUT`` once the server waits for it (from
  the connect, and again after each response), else the connection is closed;
* a head over ``MAX_REQUEST_HEAD`` bytes gets 431, a URL over ``MAX_REQUEST_URL`` 414, both
  counted while the head is still arriving;
* a body over ``MAX_REQUEST_BODY`` gets 413, on its ``Content-Length`` before a byte of it is
  read, or as soon as a chunked body passes the limit;
* the body must be complete within ``REQUEST_BODY_TIMEOUT`` of its head, else 408 and close;
* a client address with ``MAX_CONNECTIONS_PER_IP`` open connections gets 429 for the next one.

A refusal answers ``{"error": ...}``, closes the sending side and reads (and drops) what the client
still sends for :data:`LINGER` seconds, so the client reads the answer instead of a reset. Each is
counted in ``tidings_http_refused_total{reason}`` and logged in one throttled line, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools  # type: ignore[import-untyped]
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from websockets.datastructures import Headers
from websockets.http11 import Request

from ..config import Config
from .edge import CONNECTIONS_PER_ADDRESS, OPEN_FILES, Throttle, trusted_proxies

__all__ = ["LINGER", "REQUEST_HEAD_TIMEOUT", "TOO_MANY_FROM_ADDRESS", "DeadlineHttpProtocol"]

REQUEST_HEAD_TIMEOUT = 10.0  # the default of the setting
LINGER = 2.0  # seconds a refused connection is read (and dropped) before it is closed
TOO_MANY_FROM_ADDRESS = "Too many connections from this address"

log = logging.getLogger("tidings.http")
_throttle = Throttle()


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a refused request."""


class DeadlineHttpProtocol(HttpToolsProtocol):
    """Limits and deadlines for request heads and bodies, and connections per client address."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False
        self._awaiting_head = True  # the parser waits for (the rest of) a request head
        self._heads = 0  # request heads completed on this connection
        self._head_bytes = 0  # bytes received of the head still incomplete
        self._body_bytes = 0
        self._address: str | None = None  # counted in CONNECTIONS_PER_ADDRESS
        node = self.app_state.get("node")
        self._limits: Config | None = node.config if node is not None else None
        if node is None:
            return
        limits = node.config
        OPEN_FILES.check(len(self.connections), node.metrics, log)
        peer = self.client[0] if self.client else None
        cap = limits.max_connections_per_ip
        if cap and peer is not None and peer not in trusted_proxies(limits.trusted_proxies):
            if CONNECTIONS_PER_ADDRESS.count(peer) >= cap:
                self._refuse(429, TOO_MANY_FROM_ADDRESS, "per_ip")
                return
            CONNECTIONS_PER_ADDRESS.add(peer)
            self._address = peer
        self._arm(limits.request_head_timeout, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self._address is not None:
            CONNECTIONS_PER_ADDRESS.release(self._address)
            self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # As uvicorn's, except that an upgrade keeps the bytes that came after the request head,
        # and that the bytes of a request head are counted while it arrives.
        if self._refused:
            return  # lingering after a refusal: read and drop
        self._unset_keepalive_if_required()
        awaiting, heads = self._awaiting_head, self._heads
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.refused:
                return  # a callback refused the request and stopped the parser
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                offset = upgrade.args[0] if upgrade.args and isinstance(upgrade.args[0], int) else len(data)
                self.upgrade_to_websocket(data[offset:])
            else:
                self._unsupported_upgrade_warning()
            return
        limits = self._limits
        if self._awaiting_head and limits is not None and not self.refused:
            # All of ``data`` was head when no head completed while it was parsed; otherwise only
            # an unknown tail of it is, which on_headers_complete counts exactly.
            self._head_bytes = self._head_bytes + len(data) if awaiting and heads == self._heads else 0
            url: bytes = getattr(self, "url", None) or b""
            if len(url) > limits.max_request_url:
                self._refuse(414, "URI Too Long", "url_too_long")
            elif self._head_bytes > limits.max_request_head:
                self._refuse(431, "Request Header Fields Too Large", "head_too_large")

    def on_headers_complete(self) -> None:
        self._cancel_deadline()
        self._awaiting_head = False
        self._heads += 1
        self._head_bytes = 0
        limits = self._limits
        if limits is None:
            super().on_headers_complete()
            return
        url: bytes = self.url
        if len(url) > limits.max_request_url:
            self._refuse(414, "URI Too Long", "url_too_long")
            raise _Refused
        size = len(url)
        length = 0
        chunked = False
        for name, value in self.headers:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                # httptools has checked the value; more than 18 digits is more than any limit.
                length = int(value) if len(value) <= 18 and value.strip().isdigit() else 1 << 62
            elif name == b"transfer-encoding":
                chunked = True
        if size > limits.max_request_head:
            self._refuse(431, "Request Header Fields Too Large", "head_too_large")
            raise _Refused
        if length > limits.max_request_body:
            self._refuse(413, "Request body too large", "body_too_large")
            raise _Refused
        self._body_bytes = 0
        super().on_headers_complete()
        if (length or chunked) and not self.parser.should_upgrade():
            self._arm(limits.request_body_timeout, self._body_timeout)

    def on_body(self, body: bytes) -> None:
        limits = self._limits
        if limits is not None:
            self._body_bytes += len(body)
            if self._body_bytes > limits.max_request_body:
                self._refuse(413, "Request body too large", "body_too_large", own_cycle=True)
                raise _Refused
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._cancel_deadline()
        self._awaiting_head = True
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.pipeline:
            self._arm_head_deadline()  # answered before the body ended: the next head is due

    def on_response_complete(self) -> None:
        idle = not self.pipeline
        super().on_response_complete()
        if idle and self._awaiting_head:
            self._arm_head_deadline()  # the server waits for the next request head

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
        address, self._address = self._address, None  # the WebSocket connection releases it
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
        protocol.upgrade(request, method=self.scope["method"], rest=rest, address=address)
        for name in ("parser", "flow", "scope", "headers", "cycle", "pipeline", "url"):
            setattr(self, name, None)

    def shutdown(self) -> None:
        """uvicorn is stopping: let a waiting history long-poll answer now instead of at its timeout."""
        node = self.app_state.get("node")
        if node is not None:
            node.wake_polls()
        super().shutdown()

    # -- deadlines ---------------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Any) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, callback)

    def _arm_head_deadline(self) -> None:
        limits = self._limits
        if limits is not None and self._deadline is None and not self._refused:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                self._arm(limits.request_head_timeout, self._head_timeout)

    def _cancel_deadline(self) -> None:
        handle: Any = getattr(self, "_deadline", None)
        if handle is not None:
            handle.cancel()
            self._deadline = None

    def _head_timeout(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._count("head_timeout")
        if self._head_bytes:
            # A head began and did not end (an idle socket is closed without a line).
            _throttle.log(
                log,
                logging.INFO,
                "head_timeout",
                "closing HTTP connection from %s: request head not complete within %g s",
                self._peer(),
                self._limits.request_head_timeout if self._limits is not None else REQUEST_HEAD_TIMEOUT,
            )
        self._unset_keepalive_if_required()
        transport.close()

    def _body_timeout(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None or transport.is_closing() or self._refused:
            return
        timeout = self._limits.request_body_timeout if self._limits is not None else 0.0
        self._refuse(408, f"Request body not complete within {timeout:g} s", "body_timeout", own_cycle=True)

    # -- refusals ----------------------------------------------------------------------------

    @property
    def refused(self) -> bool:
        """A request of this connection was refused: nothing more is parsed."""
        return self._refused

    def _peer(self) -> str:
        return self.client[0] if self.client else "?"

    def _count(self, reason: str) -> None:
        node = self.app_state.get("node")
        if node is not None:
            metrics = node.metrics
            name = f"http_refused_{reason}"
            setattr(metrics, name, getattr(metrics, name) + 1)

    def _refuse(self, status: int, message: str, reason: str, own_cycle: bool = False) -> None:
        """Answer ``status`` with ``{"error": message}`` (unless a response is under way), stop
        reading requests, and close once the client stops sending or after :data:`LINGER` s.

        ``own_cycle``: the refused request is ``self.cycle`` (its body was being read); otherwise
        its head was refused and ``self.cycle``, if any, belongs to an earlier request.
        """
        self._refused = True
        self._cancel_deadline()
        self._unset_keepalive_if_required()
        self._count(reason)
        _throttle.log(
            log, logging.INFO, reason, "refusing HTTP request from %s: %d %s", self._peer(), status, message
        )
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # Answer only when nothing else is being written on this connection.
        cycle: RequestResponseCycle | None = self.cycle
        cycles = [c for c, _ in self.pipeline]
        if cycle is not None:
            cycles.append(cycle)
        if cycle is None:
            answer = True
        elif own_cycle:
            answer = not self.pipeline and not cycle.response_started
        else:
            answer = not self.pipeline and cycle.response_complete
        for c in cycles:
            if not c.response_complete:
                c.disconnected = True  # the app sees the client gone (and writes nothing more)
                c.message_event.set()
        if answer:
            body = orjson.dumps({"error": message})
            transport.write(
                b"".join(
                    (
                        STATUS_LINE[status],
                        b"content-type: application/json\r\n",
                        b"content-length: %d\r\n" % len(body),
                        b"connection: close\r\n\r\n",
                        body,
                    )
                )
            )
        if self.flow is not None:
            self.flow.resume_reading()  # keep reading (and dropping) so the client sees the answer
        if transport.can_write_eof():
            transport.write_eof()
        else:  # pragma: no cover - TCP transports can
            transport.close()
        self.loop.call_later(LINGER, self._linger_over, transport)

    @staticmethod
    def _linger_over(transport: asyncio.Transport) -> None:
        if not transport.is_closing():
            transport.abort()
