"""The listening protocol (a plain WebSocket upgrade read from its head and answered in place),
and uvicorn's HTTP protocol with limits and deadlines for everything else.

:class:`DeadlineHttpProtocol` is what uvicorn creates for each accepted connection
(``uvicorn.Config(http=...)``): a :class:`~.websocket.WebSocketConnection` waiting for its request
head. A plain, valid upgrade (:func:`parse_upgrade_head`) is answered with a pre-built ``101``;
anything else goes, with the bytes received so far, to :class:`AsgiHttpProtocol`, which is uvicorn's
httptools protocol with the limits below, and from there to the ASGI app or to the websockets
handshake. The limits hold on both paths.

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
import re
from typing import Any, cast

import httptools  # type: ignore[import-untyped]
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from websockets.datastructures import Headers
from websockets.http11 import Request

from ..config import Config
from .edge import CONNECTIONS_PER_ADDRESS, OPEN_FILES, Throttle, trusted_proxies
from .websocket import AWAITING_HEAD, UpgradeHead, WebSocketConnection

__all__ = [
    "LEAN_HEAD_BYTES",
    "LINGER",
    "REQUEST_HEAD_TIMEOUT",
    "TOO_MANY_FROM_ADDRESS",
    "AsgiHttpProtocol",
    "DeadlineHttpProtocol",
    "HeadDeadlines",
    "UpgradeHead",
    "head_deadlines",
    "parse_upgrade_head",
]

REQUEST_HEAD_TIMEOUT = 10.0  # the default of the setting
LINGER = 2.0  # seconds a refused connection is read (and dropped) before it is closed
TOO_MANY_FROM_ADDRESS = "Too many connections from this address"

log = logging.getLogger("tidings.http")
_throttle = Throttle()


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a refused request."""


class AsgiHttpProtocol(HttpToolsProtocol):
    """Limits and deadlines for request heads and bodies, and connections per client address.

    Every request that :class:`DeadlineHttpProtocol` does not upgrade itself comes here (with
    the bytes received so far, through :meth:`adopt`): requests for the ASGI app, and upgrade
    requests that are not plain enough for the lean path, which this class hands to the
    WebSocket protocol as a websockets ``Request`` (:meth:`upgrade_to_websocket`).
    """

    _deadline: asyncio.TimerHandle | None
    _refused: bool
    _awaiting_head: bool  # the parser waits for (the rest of) a request head
    _heads: int  # request heads completed on this connection
    _head_bytes: int  # bytes received of the head still incomplete
    _body_bytes: int
    _address: str | None  # counted in CONNECTIONS_PER_ADDRESS
    _limits: Config | None

    def adopt(self, transport: asyncio.Transport, address: str | None, head_due: float | None) -> None:
        """Take over a connection from :class:`DeadlineHttpProtocol`, which already counted it
        for ``address`` and whose request head is due at loop time ``head_due``."""
        HttpToolsProtocol.connection_made(self, transport)
        self._init_limits()
        self._address = address
        if head_due is not None:
            self._deadline = self.loop.call_at(head_due, self._head_timeout)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        node = self._init_limits()
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

    def _init_limits(self) -> Any:
        self._deadline = None
        self._refused = False
        self._awaiting_head = True
        self._heads = 0
        self._head_bytes = 0
        self._body_bytes = 0
        self._address = None
        node = self.app_state.get("node")
        self._limits = node.config if node is not None else None
        return node

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
        polls = self.app_state.get("polls")
        if polls is not None:
            polls.close()
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


# -- the listening protocol: WebSocket upgrades recognised from the request head ------------------

LEAN_HEAD_BYTES = 8192  # a request head not complete within this many bytes goes to the ASGI side
MAX_LEAN_HEADERS = 100  # more header lines than this: the ASGI side handles the request

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: The request lines the lean path takes: ``GET``, an origin-form target that urlsplit reads as a
#: path (no ``//`` authority, no ``#``), HTTP/1.1. Anything else goes to httptools as before.
_TARGET_CHAR = rb"A-Za-z0-9._~!$&'()*+,;=:@%?-"  # '-' last: a literal in both classes
_REQUEST_LINE = re.compile(rb"GET (/(?:[" + _TARGET_CHAR + rb"][/" + _TARGET_CHAR + rb"]*)?) HTTP/1\.1")
#: Header lines, all checked in one match: a token, a colon, optional leading whitespace and a
#: value of visible ASCII and spaces that ends with a visible character (trailing whitespace goes
#: to httptools, which does not always recognise an upgrade then), CRLF.
_HEADER_LINES = re.compile(rb"(?:" + _TOKEN + rb":[ \t]*(?:[!-~](?:[ -~]*[!-~])?)?\r\n)*")
_CONNECTION_TOKEN = re.compile(_TOKEN)
#: A Sec-WebSocket-Key that base64-decodes to 16 bytes (what websockets checks).
_WEBSOCKET_KEY = re.compile(rb"[A-Za-z0-9+/]{22}==")
#: Headers the lean path reads; any of them twice (but X-Forwarded-For) goes to httptools.
_READ = frozenset(
    {b"upgrade", b"connection", b"sec-websocket-key", b"sec-websocket-version", b"origin", b"x-api-key"}
)
#: Headers that the lean path leaves to httptools and websockets: a body, a subprotocol offer.
_DECLINE = frozenset({b"content-length", b"transfer-encoding", b"sec-websocket-protocol"})


def parse_upgrade_head(head: bytes) -> UpgradeHead | None:
    """Read a WebSocket upgrade request from its head (without the blank line that ends it).

    Returns ``None`` for anything that is not a plain, valid upgrade (any other request, an
    unusual but possibly valid one, a malformed one): such requests go to httptools, uvicorn and
    websockets exactly as before, which answer them as they always did. A request this accepts is
    one those would accept too, read the same way: ``GET``, HTTP/1.1, ``Upgrade: websocket``, a
    ``Connection`` list with ``upgrade``, a Sec-WebSocket-Key of 16 bytes, version 13, no body,
    no subprotocol offer, none of the headers read here twice.
    """
    first = head.find(b"\r\n")
    request = _REQUEST_LINE.fullmatch(head, 0, first)
    if request is None or _HEADER_LINES.fullmatch(head, first + 2) is None:
        return None
    lines = head[first + 2 : -2].split(b"\r\n")
    if len(lines) > MAX_LEAN_HEADERS:
        return None
    found: dict[bytes, bytes] = {}
    forwarded_for: list[str] = []
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in _READ:
            if name in found:
                return None
            found[name] = value.lstrip(b" \t")
        elif name == b"x-forwarded-for":
            forwarded_for.append(value.lstrip(b" \t").decode("ascii"))
        elif name in _DECLINE:
            return None
    key = found.get(b"sec-websocket-key")
    if (
        found.get(b"sec-websocket-version") != b"13"
        or key is None
        or _WEBSOCKET_KEY.fullmatch(key) is None
        or found.get(b"upgrade", b"").lower() != b"websocket"
    ):
        return None
    upgrade_token = False
    for item in found.get(b"connection", b"").split(b","):
        item = item.strip(b" \t")
        if _CONNECTION_TOKEN.fullmatch(item) is None:
            return None  # an empty or malformed list element: websockets decides
        if item.lower() == b"upgrade":
            upgrade_token = True
    if not upgrade_token:
        return None
    origin = found.get(b"origin")
    api_key = found.get(b"x-api-key")
    return UpgradeHead(
        request[1].decode("ascii"),
        key.decode("ascii"),
        None if origin is None else origin.decode("ascii"),
        None if api_key is None else api_key.decode("ascii"),
        forwarded_for,
    )


class DeadlineHttpProtocol(WebSocketConnection):
    """The listening protocol: each accepted connection starts as the WebSocket connection it
    usually becomes, waiting for its request head (``ws`` is :data:`~.websocket.AWAITING_HEAD`).

    A plain WebSocket upgrade (:func:`parse_upgrade_head`) is answered in place
    (:meth:`~.websocket.WebSocketConnection.upgrade_head`, a pre-built ``101``): no second
    protocol object, no ``transport.set_protocol`` (which stops and restarts reading: two epoll
    changes), no httptools parser, uvicorn protocol, scope, or websockets ``Request``/``Headers``/
    ``Response``. Every other request, with the bytes received so far, goes to
    :class:`AsgiHttpProtocol` (uvicorn's protocol with the limits and deadlines), and so to the
    ASGI app or the websockets handshake as before.

    The limits of the head hold here too: its deadline (``REQUEST_HEAD_TIMEOUT``, carried over on
    a hand-over), ``MAX_CONNECTIONS_PER_IP`` (the refusal itself is answered by
    :class:`AsgiHttpProtocol`), and a head over ``MAX_REQUEST_HEAD`` / ``MAX_REQUEST_URL`` (handed
    over, which refuses it).
    """

    __slots__ = ()

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if app_state.get("node") is None:
            # No Tidings node in this server: everything is the ASGI side's (see connection_made).
            self._server_state = server_state
            self._address = None
            self.transport = None
            self.closed = True
        else:
            WebSocketConnection.__init__(
                self, server_state=server_state, app_state=app_state, awaiting_head=True
            )
        if server_state not in _UVICORN_CONFIGS:
            _UVICORN_CONFIGS[server_state] = (config, app_state)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.closed:
            self._hand_over(b"", fresh=True)
            return
        node = self.node
        limits: Config = node.config
        cap = limits.max_connections_per_ip
        if cap:
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if isinstance(peer, tuple) and peer else None
            if host is not None and host not in trusted_proxies(limits.trusted_proxies):
                if CONNECTIONS_PER_ADDRESS.count(host) >= cap:
                    self._hand_over(b"", fresh=True)  # which answers 429, as it always did
                    return
                CONNECTIONS_PER_ADDRESS.add(host)
                self._address = host
        connections = self._server_state.connections
        connections.add(self)
        OPEN_FILES.check(len(connections), node.metrics, log)
        head_deadlines(node.loop, limits.request_head_timeout).add(self)

    def head_received(self, data: bytes) -> None:
        """Bytes of the first request head (and maybe what follows it)."""
        limits: Config = self.node.config
        deadlines = head_deadlines(self.node.loop, limits.request_head_timeout)
        earlier = deadlines.partial.pop(self, None)
        buffer = earlier + data if earlier else data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            # Past the head or URL limit the ASGI side counts and refuses it as it arrives.
            size = min(LEAN_HEAD_BYTES, limits.max_request_head, limits.max_request_url)
            if len(buffer) <= size and b"GET /".startswith(buffer[:5]):
                deadlines.partial[self] = buffer  # an upgrade, perhaps: wait for the rest of the head
            else:
                self._hand_over(buffer)
            return
        if end + 4 > min(LEAN_HEAD_BYTES, limits.max_request_head) or not buffer.startswith(b"GET /"):
            self._hand_over(buffer)
            return
        head = parse_upgrade_head(buffer[: end + 2])
        if head is None or len(head.target) > limits.max_request_url:
            self._hand_over(buffer)
            return
        deadlines.discard(self)
        self.upgrade_head(head, buffer[end + 4 :])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ws is AWAITING_HEAD and not self.closed:
            head_deadlines(self.node.loop, self.node.config.request_head_timeout).discard(self)
        super().connection_lost(exc)

    def _hand_over(self, received: bytes, fresh: bool = False) -> None:
        """Give the connection to :class:`AsgiHttpProtocol` with the bytes ``received`` so far.

        ``fresh``: it starts as if it had accepted the connection itself (and refuses an address
        over its cap); otherwise it takes over the address counted here and the head deadline.
        """
        transport = self.transport
        assert transport is not None
        server_state = self._server_state
        due: float | None = None
        if not self.closed:
            deadlines = head_deadlines(self.node.loop, self.node.config.request_head_timeout)
            due = deadlines.due(self)
            deadlines.discard(self)
        server_state.connections.discard(self)
        address, self._address = self._address, None
        self.closed = True  # this object is done with the connection
        self.transport = None
        config, app_state = _UVICORN_CONFIGS[server_state]
        protocol = AsgiHttpProtocol(config=config, server_state=server_state, app_state=app_state)
        transport.set_protocol(protocol)
        if fresh:
            protocol.connection_made(transport)
        else:
            protocol.adopt(transport, address, due)
        if received and not transport.is_closing():
            protocol.data_received(received)

    def head_timeout(self) -> None:
        """No complete request head within ``REQUEST_HEAD_TIMEOUT`` (called by
        :class:`HeadDeadlines`): counted, a line only when a head began, closed."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.closed:
            return
        node = self.node
        node.metrics.http_refused_head_timeout += 1
        begun = head_deadlines(node.loop, node.config.request_head_timeout).partial.pop(self, None)
        if begun:
            _throttle.log(
                log,
                logging.INFO,
                "head_timeout",
                "closing HTTP connection from %s: request head not complete within %g s",
                _peer(transport),
                node.config.request_head_timeout,
            )
        transport.close()


class HeadDeadlines:
    """The connections of one event loop waiting for their first request head, with one timer.

    All of them wait the same ``timeout``, so the oldest is first in the (insertion-ordered) dict
    and a check stops at the first one not due. The timer fires at the first entry's deadline
    (usually long gone by then: most heads arrive within milliseconds), not once per connection:
    a timer of its own cost each connection about 1.7 us to arm and cancel. ``partial`` holds the
    heads that arrive in several segments, until they are complete.
    """

    __slots__ = ("_timer", "_waiting", "loop", "partial", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self._waiting: dict[DeadlineHttpProtocol, float] = {}
        self.partial: dict[DeadlineHttpProtocol, bytes] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, protocol: DeadlineHttpProtocol) -> None:
        """``protocol``'s head is due ``timeout`` seconds from now."""
        due = self.loop.time() + self.timeout
        self._waiting[protocol] = due
        if self._timer is None:
            self._timer = self.loop.call_at(due, self._check)

    def discard(self, protocol: DeadlineHttpProtocol) -> None:
        """``protocol`` no longer waits (its head came, it was handed over, or it closed)."""
        self._waiting.pop(protocol, None)
        if self.partial:
            self.partial.pop(protocol, None)

    def due(self, protocol: DeadlineHttpProtocol) -> float | None:
        """Loop time at which ``protocol``'s head is due."""
        return self._waiting.get(protocol)

    def __len__(self) -> int:
        return len(self._waiting)

    def _check(self) -> None:
        self._timer = None
        waiting = self._waiting
        now = self.loop.time()
        while waiting:
            protocol, due = next(iter(waiting.items()))
            if due > now:
                self._timer = self.loop.call_at(max(due, now + 0.05), self._check)
                return
            del waiting[protocol]
            protocol.head_timeout()
            self.partial.pop(protocol, None)


#: (event loop, request_head_timeout) -> the deadlines of the connections waiting that long.
_HEAD_DEADLINES: dict[tuple[asyncio.AbstractEventLoop, float], HeadDeadlines] = {}
#: uvicorn ServerState -> (its Config, its lifespan state), for a hand-over to AsgiHttpProtocol.
_UVICORN_CONFIGS: dict[Any, tuple[Any, dict[str, Any]]] = {}


def head_deadlines(loop: asyncio.AbstractEventLoop, timeout: float) -> HeadDeadlines:
    """The :class:`HeadDeadlines` of ``loop`` for heads due ``timeout`` seconds after a connect."""
    deadlines = _HEAD_DEADLINES.get((loop, timeout))
    if deadlines is None:
        deadlines = _HEAD_DEADLINES[(loop, timeout)] = HeadDeadlines(loop, timeout)
    return deadlines


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"
