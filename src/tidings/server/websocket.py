"""The lean WebSocket connection: one ``asyncio.Protocol`` with ``__slots__`` per client.

Every accepted connection starts as one (:class:`~.http_protocol.DeadlineHttpProtocol`, the
listening protocol), which answers a plain upgrade itself (:meth:`WebSocketConnection.upgrade_head`,
a pre-built ``101``); other upgrades reach it from uvicorn's httptools protocol as a websockets
``Request`` (``uvicorn.Config(ws=WebSocketConnection)``, :meth:`WebSocketConnection.upgrade`).
Framing, and the handshake of the latter, are done by the ``websockets`` library's sans-I/O
:class:`~websockets.server.ServerProtocol`; Phoenix messages go
to :class:`~tidings.session.Session`. No task per connection: everything happens in
``data_received`` and the node's shared sweeper.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import logging
from collections.abc import Generator
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs, unquote_plus, urlsplit

import orjson
from websockets.datastructures import Headers, MultipleValuesError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN, Protocol
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.utils import GUID as WEBSOCKET_GUID

from ..auth.tokens import AuthError, Principal
from ..metrics import GOODBYE_CODES
from ..node import SWEEP_INTERVAL, Node
from ..protocol import errors
from ..protocol.codec import Serializer, parse_vsn
from ..protocol.frames import close_frame
from ..session import Session, discard
from .edge import ANONYMOUS_KEY_PREFIX, CONNECTIONS_PER_ADDRESS, origin_policy, trusted_proxies

__all__ = [
    "AWAITING_HEAD",
    "SWITCHING_PROTOCOLS",
    "WEBSOCKET_PATHS",
    "UpgradeHead",
    "WebSocketConnection",
    "open_server_protocol",
    "query_values",
    "switching_protocols",
]

log = logging.getLogger("tidings.websocket")

WEBSOCKET_PATHS = frozenset({"/realtime/v1/websocket", "/socket/websocket", "/websocket"})
CLOSE_GRACE = 5.0  # seconds a closing connection may take to flush before it is aborted
UNBOUNDED_MARK = 2**31 - 1  # the highest write-buffer mark uvloop takes (a C int)
ORIGIN_NOT_ALLOWED = "Origin not allowed"
TOO_MANY_FROM_ADDRESS = "Too many connections from this address"
TOO_MANY_ANONYMOUS = "Too many anonymous connections from this address"
_WEBSOCKET_GUID = WEBSOCKET_GUID.encode()
_TWICE = "\0twice"  # stands for a header given twice where one is read (websockets raises then)
#: ``ws`` of a connection whose request head has not been read yet (never used for I/O).
AWAITING_HEAD = ServerProtocol()
#: The whole ``101`` but its Sec-WebSocket-Accept value (no Date: optional on 1xx, RFC 9110 6.6.1).
SWITCHING_PROTOCOLS = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: %s\r\n\r\n"
)


_AT_EOF = StreamReader.at_eof.__code__


def _at_frame_boundary(parser: Generator[None]) -> bool:
    """True when ``parser`` waits for the first byte of a frame (inside ``reader.at_eof()``).

    websockets' parse loop asks ``at_eof()`` only between frames, and ``at_eof()`` suspends
    only on an empty buffer; anywhere else the parser sits in ``Frame.parse`` / ``read_exact``.
    """
    gen: Any = parser
    while (gen := getattr(gen, "gi_yieldfrom", None)) is not None:
        if gen.gi_code is _AT_EOF:
            return True
    return False


class UpgradeHead(NamedTuple):
    """What the WebSocket handshake needs of an upgrade request head."""

    target: str  #: the request target, ``/path?query``
    key: str  #: Sec-WebSocket-Key (valid)
    origin: str | None
    api_key: str | None  #: the x-api-key header
    forwarded_for: list[str]  #: every X-Forwarded-For value, in order


class _Fragments:
    """An unfinished fragmented message: exists only between its first and its last frame."""

    __slots__ = ("opcode", "parts", "size", "started")

    def __init__(self, opcode: Opcode, first: bytes, tick: int) -> None:
        self.opcode = opcode
        self.parts = [first]
        self.size = 0  # bytes counted in node.fragment_bytes
        self.started = tick  # the node's sweeper tick at the first frame


class WebSocketConnection(Session, asyncio.Protocol):
    """One client connection, from the upgrade request to ``connection_lost``."""

    __slots__ = ("_address", "_frag", "_server_state", "transport", "ws")

    def __init__(
        self,
        config: Any = None,
        server_state: Any = None,
        app_state: dict[str, Any] | None = None,
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        node: Node | None = None,
        awaiting_head: bool = False,
    ) -> None:
        """``awaiting_head``: this object is the listening protocol itself
        (:class:`~.http_protocol.DeadlineHttpProtocol`), which reads the request head and calls
        :meth:`upgrade_head`; until then ``ws`` is :data:`AWAITING_HEAD`."""
        node = node if node is not None else (app_state or {})["node"]
        Session.__init__(self, node)
        self._server_state = server_state
        self.transport: asyncio.Transport | None = None
        self.ws = AWAITING_HEAD if awaiting_head else ServerProtocol(max_size=node.config.max_frame_size)
        self._frag: _Fragments | None = None
        self._address: str | None = None  # counted in CONNECTIONS_PER_ADDRESS until connection_lost

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self._server_state is not None:
            self._server_state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # refused or closing: nothing more is parsed (no pong before a refusal's HTTP answer)
        ws = self.ws
        if ws is AWAITING_HEAD:
            self.head_received(data)
            return
        ws.receive_data(data)
        self.last_seen = self.node.tick
        events = ws.events_received()
        if events:
            for event in events:
                if isinstance(event, Frame):
                    self.receive_frame(event)
                elif isinstance(event, Request):
                    self.handshake(event)
            if ws.state is OPEN:
                self._restart_parser()
        self.flush_protocol()

    def head_received(self, data: bytes) -> None:
        """Bytes of a request head (only the listening protocol's subclass waits for one)."""
        raise NotImplementedError

    def eof_received(self) -> bool | None:
        if self.ws is AWAITING_HEAD:
            return None  # the client is done before its head ended: close (as uvicorn does)
        self.ws.receive_eof()
        self.flush_protocol()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._server_state is not None:
            self._server_state.connections.discard(self)
        if self._address is not None:
            CONNECTIONS_PER_ADDRESS.release(self._address)
            self._address = None
        self.finish()

    def pause_writing(self) -> None:
        """Unsent bytes passed ``MAX_UNSENT_BYTES`` (beyond what is left of a join's catch-up):
        close the slow consumer (1013)."""
        if not self.closed:
            self.node.metrics.slow_consumer_closes += 1
            log.info("closing slow consumer")
            self.node.loop.call_soon(self.close, 1013, "slow consumer")

    # -- a join's catch-up: counted apart from MAX_UNSENT_BYTES ------------------------------
    #
    # A join may write far more than MAX_UNSENT_BYTES at once (a replay of REPLAY_MAX messages
    # of MAX_PAYLOAD_SIZE_KB, a large presence_state). The high-water mark is lifted while it
    # is written, then set to what it left unsent plus MAX_UNSENT_BYTES, and lowered by the
    # sweeper as the client reads: live messages may still queue MAX_UNSENT_BYTES on top of
    # the catch-up, no more. A client that reads none of it for SLOW_CONSUMER_TIMEOUT is closed.

    def begin_catchup(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            limit = self.node.config.max_unsent_bytes
            transport.set_write_buffer_limits(high=UNBOUNDED_MARK, low=limit // 4)

    def end_catchup(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        node = self.node
        limit = node.config.max_unsent_bytes
        unsent = transport.get_write_buffer_size()
        if unsent <= limit:
            transport.set_write_buffer_limits(high=limit, low=limit // 4)
            node.catchups.pop(self, None)
            return
        node.metrics.catchup_allowances += 1
        transport.set_write_buffer_limits(high=min(unsent + limit, UNBOUNDED_MARK), low=limit // 4)
        # Another join does not restart the clock of one still unread: only reading does.
        earlier = node.catchups.get(self)
        node.catchups[self] = (unsent, node.tick if earlier is None else earlier[1])
        node.watched.add(self)

    def _watch_catchup(self, tick: int) -> bool:
        """One sweeper tick of a catch-up; True while it goes on."""
        node = self.node
        transport = self.transport
        least, since = node.catchups[self]
        if self.closed or transport is None:
            del node.catchups[self]
            return False
        limit = node.config.max_unsent_bytes
        unsent = transport.get_write_buffer_size()
        if unsent <= limit:
            transport.set_write_buffer_limits(high=limit, low=limit // 4)
            del node.catchups[self]
            return False
        if unsent < least:  # the client reads: the allowance shrinks to what is left
            transport.set_write_buffer_limits(high=min(unsent + limit, UNBOUNDED_MARK), low=limit // 4)
            node.catchups[self] = (unsent, tick)
            return True
        if (tick - since) * SWEEP_INTERVAL >= node.config.slow_consumer_timeout:
            del node.catchups[self]
            node.metrics.slow_consumer_closes += 1
            log.info("closing slow consumer: %d bytes of a join's catch-up unread", unsent)
            self.close(1013, "slow consumer")
            return False
        return True

    def watch(self, tick: int) -> bool:
        """The sweeper's tick: a fragmented message's deadline, a join's catch-up."""
        watching = False
        frag = self._frag
        if frag is not None:
            if self.closed:
                self._drop_fragments()
            elif (tick - frag.started) * SWEEP_INTERVAL > self.node.config.fragment_timeout:
                self.node.metrics.fragment_timeouts += 1
                log.info("closing connection: a fragmented message did not end in time")
                self._drop_fragments()
                self.close(1008, "fragmented message timeout")
            else:
                watching = True
        if self in self.node.catchups:
            watching = self._watch_catchup(tick) or watching
        return watching

    def resume_writing(self) -> None:
        pass

    def said_goodbye(self) -> bool:
        """The client sent a close of its own with 1000, 1001 or no code, and not realtime-js's
        ``heartbeat timeout`` (after which it reconnects): not counted as a reconnect later."""
        close = self.ws.close_rcvd
        if close is None:
            return False  # dropped, timed out, or closed by this server (before any reply)
        return int(close.code) in GOODBYE_CODES and close.reason != "heartbeat timeout"

    # -- uvicorn graceful shutdown -----------------------------------------------------------

    def shutdown(self) -> None:
        """Called by uvicorn on SIGTERM for each connection: start (or join) the batched drain."""
        if self.ws.state is OPEN and not self.closed:
            self.node.drain()
        elif self.transport is not None and not self.closed:
            self.transport.close()

    # -- handshake ---------------------------------------------------------------------------

    def upgrade(
        self, request: Request, method: str = "GET", rest: bytes = b"", address: str | None = None
    ) -> None:
        """Start from a request the HTTP layer already parsed; ``rest`` came after its head.

        ``address``: the client address the HTTP layer counted this connection for (released
        when the connection is lost).
        """
        self._address = address
        if method != "GET":
            self.refuse(405, "Method Not Allowed", delay=False)
            return
        ws = self.ws
        # The parser is still waiting for a request head it will never see.
        ws.parser = Protocol.parse(ws)
        next(ws.parser)
        self.handshake(request)
        self.flush_protocol()
        if rest and not self.closed and ws.state is OPEN:
            self.data_received(rest)

    def upgrade_head(self, head: UpgradeHead, rest: bytes = b"") -> None:
        """The lean upgrade: a request head that :func:`~.http_protocol.parse_upgrade_head`
        found valid (Sec-WebSocket-Key, version 13, Upgrade and Connection tokens).

        The same checks as :meth:`handshake`, in the same order, with the same answers; the
        ``101`` is a template with only Sec-WebSocket-Accept filled in. No extension or
        subprotocol is negotiated (as before: the server offers none).
        """
        self.ws = open_server_protocol(self.node.config.max_frame_size)
        path, _, query = head.target.partition("?")
        vsn, apikey = query_values(query)
        admitted = self._admit(path, vsn, head.api_key or apikey, head.origin, head.forwarded_for)
        if admitted is None:
            self.flush_protocol()
            return
        transport = self.transport
        assert transport is not None
        self.serializer, self.principal, self.user = admitted
        node = self.node
        node.register(self, self.user)
        transport.set_write_buffer_limits(high=node.config.max_unsent_bytes)
        transport.write(switching_protocols(head.key))
        self.write = transport.write
        if rest and not self.closed:
            self.data_received(rest)

    def handshake(self, request: Request) -> None:
        """Route, authenticate and limit an upgrade request, then accept or refuse it."""
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        headers = request.headers
        origin = _TWICE if len(headers.get_all("origin")) > 1 else headers.get("origin")
        token = _TWICE if len(headers.get_all("x-api-key")) > 1 else headers.get("x-api-key")
        admitted = self._admit(
            url.path,
            query.get("vsn", [None])[0],
            token or query.get("apikey", [None])[0],
            origin,
            headers.get_all("x-forwarded-for"),
        )
        if admitted is None:
            return
        response = self.ws.accept(request)
        if response.status_code != 101:
            self.ws.send_response(response)
            return
        self.ws.send_response(response)
        self.serializer, self.principal, self.user = admitted
        node = self.node
        node.register(self, self.user)
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=node.config.max_unsent_bytes)
        self.flush_protocol()
        self.write = self.transport.write

    def _admit(
        self, path: str, vsn: str | None, token: str | None, origin: str | None, forwarded_for: list[str]
    ) -> tuple[Serializer, Principal, str | None] | None:
        """Route, authenticate and limit an upgrade; ``None`` when it was refused (answered)."""
        node = self.node
        if path.rstrip("/") not in WEBSOCKET_PATHS:
            self.refuse(404, "Not Found", delay=False)
            return None
        serializer = parse_vsn(vsn)
        if serializer is None:
            self.refuse(400, "Unsupported protocol version", delay=False)
            return None
        if node.draining:
            self.refuse(503, "Server is restarting", delay=False)
            return None
        config = node.config
        if len(node.sessions) >= config.max_connections:
            log.warning("refusing connection: MAX_CONNECTIONS (%d) reached", config.max_connections)
            self.refuse(503, "Too many connections", delay=False)
            return None
        if origin is _TWICE:
            raise MultipleValuesError("origin")  # as before: the connection is dropped unanswered
        if origin is not None and not origin_policy(config.allowed_origins).allows(origin):
            node.metrics.http_refused_origin += 1
            self.refuse(403, ORIGIN_NOT_ALLOWED)
            return None
        client, forwarded = self._client_address(forwarded_for)
        per_ip = config.max_connections_per_ip
        if forwarded and client is not None and per_ip and self._address is None:
            # Behind a trusted proxy: count the client the proxy names, not the proxy.
            CONNECTIONS_PER_ADDRESS.add(client)
            self._address = client
            if CONNECTIONS_PER_ADDRESS.count(client) > per_ip:
                node.metrics.http_refused_per_ip += 1
                self.refuse(429, TOO_MANY_FROM_ADDRESS)
                return None
        if token is _TWICE:
            raise MultipleValuesError("x-api-key")  # as before: the connection is dropped unanswered
        if node.verifier.enabled and not token:
            self.refuse(401, errors.HTTP_API_KEY_MISSING)
            return None
        try:
            principal = node.verifier.verify(token)
        except AuthError as exc:
            self.refuse(401, exc.http_message)
            return None
        user = principal.sub
        per_user = config.max_connections_per_user
        if user is not None and per_user and node.users[user] >= per_user:
            self.refuse(429, errors.HTTP_TOO_MANY_CONNECTED)
            return None
        anonymous_per_ip = config.max_anonymous_connections_per_ip
        if user is None and client is not None and anonymous_per_ip:
            # No `sub` (the anon key): such connections count per client address instead.
            user = ANONYMOUS_KEY_PREFIX + client
            if node.users[user] >= anonymous_per_ip:
                node.metrics.http_refused_anonymous_per_ip += 1
                self.refuse(429, TOO_MANY_ANONYMOUS)
                return None
        return serializer, principal, user

    def _client_address(self, forwarded_for: list[str]) -> tuple[str | None, bool]:
        """The client's address, and whether a trusted proxy's ``X-Forwarded-For`` named it."""
        if self._address is not None:
            return self._address, False  # the peer, counted by the HTTP layer
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        host = str(peer[0]) if isinstance(peer, tuple) and peer else None
        proxies = trusted_proxies(self.node.config.trusted_proxies)
        if host is None or host not in proxies:
            return host, False
        if not forwarded_for:
            return None, False  # a trusted proxy that names no client: nothing to count by
        return proxies.forwarded_client(",".join(forwarded_for)), True

    def _restart_parser(self) -> None:
        # The parser generator keeps its last locals alive between messages: the upgrade
        # request after the handshake (~1.6 KB) and then the last frame (up to MAX_FRAME_SIZE),
        # for as long as a connection idles. At a frame boundary a fresh frame parser holds
        # nothing (fragmentation state lives on the protocol, not in the generator). An empty
        # buffer alone is no boundary: mid-frame, the header, length or mask key already read
        # live only in the suspended generator.
        ws = self.ws
        if _at_frame_boundary(ws.parser):
            ws.parser = Protocol.parse(ws)
            next(ws.parser)

    def refuse(self, status: int, message: str, delay: bool = True) -> None:
        """Answer the upgrade with an HTTP error and a JSON ``{"error": ...}`` body."""
        self.node.metrics.connections_refused += 1
        log.info("refusing WebSocket upgrade: %d %s", status, message)
        self.finish()
        body = orjson.dumps({"error": message})
        headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        response = Response(status, _phrase(status), headers, body)

        def send() -> None:
            if self.transport is None or self.transport.is_closing():
                return
            self.ws.send_response(response)
            self.flush_protocol()

        wait = self.node.config.connect_error_backoff if delay else 0
        if wait > 0:
            self.node.loop.call_later(wait, send)
        else:
            send()

    # -- frames ------------------------------------------------------------------------------

    def receive_frame(self, frame: Frame) -> None:
        """Assemble messages from data frames (control frames are handled by ``ws``).

        ``ws`` bounds one message, all its fragments together, by ``MAX_FRAME_SIZE`` (1009).
        Unfinished fragmented messages also count against ``MAX_FRAGMENT_BUFFER_BYTES`` for the
        whole process, and must end within ``FRAGMENT_TIMEOUT`` (checked by the sweeper).
        """
        opcode = frame.opcode
        data = cast(bytes, frame.data)
        if self.closed:
            return
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self.receive_message(opcode, data)
            else:
                self._frag = _Fragments(opcode, data, self.node.tick)
                if self._hold_fragment(len(data)):
                    self.node.watched.add(self)
        elif opcode is Opcode.CONT and self._frag is not None:
            frag = self._frag
            frag.parts.append(data)
            if frame.fin:
                self._drop_fragments()
                self.receive_message(frag.opcode, b"".join(frag.parts))
            else:
                self._hold_fragment(len(data))
        elif opcode is Opcode.PONG:
            self.node.metrics.pong(data)  # times the monitor's RTT pings (server.monitor.Monitor.ping)

    def _hold_fragment(self, size: int) -> bool:
        """Count ``size`` more buffered fragment bytes; over the process cap, close (1009)."""
        node = self.node
        frag = self._frag
        assert frag is not None
        if node.fragment_bytes + size > node.config.max_fragment_buffer_bytes:
            node.metrics.fragment_buffer_full += 1
            log.info("closing connection: MAX_FRAGMENT_BUFFER_BYTES reached by fragmented messages")
            self._drop_fragments()
            self.close(1009, "fragment buffer full")
            return False
        node.fragment_bytes += size
        frag.size += size
        return True

    def _drop_fragments(self) -> None:
        """Forget the unfinished fragmented message and its bytes in the process count."""
        frag = self._frag
        if frag is not None:
            self.node.fragment_bytes -= frag.size
            self._frag = None

    def receive_message(self, opcode: Opcode, data: bytes) -> None:
        """One complete WebSocket message."""
        if self.closed or self.principal is None:
            # Also frames that arrive before the upgrade was accepted (e.g. while a refusal waits
            # for CONNECT_ERROR_BACKOFF_MS): the websockets parser hands them over regardless.
            return
        if opcode is Opcode.TEXT:
            try:
                data.decode()
            except UnicodeDecodeError:
                self.close(1007, "invalid UTF-8")
                return
            self.receive_text(data)
        else:
            self.receive_binary(data)

    def flush_protocol(self) -> None:
        """Write what ``ws`` produced (handshake, pongs, close replies); EOF closes the socket."""
        transport = self.transport
        ws = self.ws
        if transport is None or not ws.writes:
            return  # nothing to write (after most messages): no list swapped for another
        for chunk in ws.data_to_send():
            if chunk:
                transport.write(chunk)
            else:
                transport.close()
                self.finish()

    # -- closing -----------------------------------------------------------------------------

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame and close the TCP connection; channels are torn down at once."""
        if self.closed:
            return
        transport = self.transport
        self.finish()
        if transport is None or transport.is_closing():
            return
        if self.ws.state is OPEN:
            transport.write(close_frame(code, reason))
        transport.close()
        self.node.loop.call_later(CLOSE_GRACE, transport.abort)

    def finish(self) -> None:
        """Forget the connection: leave every channel (presence leaves) and unregister."""
        if self.closed:
            return
        self.closed = True
        self.write = discard
        self.leave_all()
        if self.principal is not None:
            self.node.unregister(self, self.user)


def switching_protocols(key: str) -> bytes:
    """The ``101`` answering a (valid) Sec-WebSocket-Key (websockets' ``accept_key``, without
    its str round trips)."""
    digest = hashlib.sha1(key.encode() + _WEBSOCKET_GUID).digest()
    return SWITCHING_PROTOCOLS % binascii.b2a_base64(digest, newline=False)


def query_values(query: str) -> tuple[str | None, str | None]:
    """The first ``vsn`` and ``apikey`` values of a query string, as ``parse_qs`` reads them
    (``&``-separated, ``+`` and ``%XX`` decoded, fields without ``=`` or with an empty value
    skipped), without building its dict of lists."""
    vsn: str | None = None
    apikey: str | None = None
    for field in query.split("&"):
        name, eq, value = field.partition("=")
        if not eq or not value:
            continue
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        if name == "vsn":
            if vsn is None:
                vsn = unquote_plus(value) if "%" in value or "+" in value else value
        elif name == "apikey" and apikey is None:
            apikey = unquote_plus(value) if "%" in value or "+" in value else value
    return vsn, apikey


#: Members of a websockets protocol that hold one connection's state: made anew for each.
_OWN_MEMBERS = frozenset({"reader", "events", "writes", "parser"})
#: Members copied from the template: the server side's settings, and the state of a connection
#: that has just opened (immutable values, replaced rather than changed in place).
_SHARED_MEMBERS = frozenset(
    {
        "id",
        "logger",
        "debug",
        "side",
        "_state",
        "state",
        "max_size",
        "cur_size",
        "expect_continuation_frame",
        "origin",
        "extensions",
        "subprotocol",
        "close_rcvd",
        "close_sent",
        "close_rcvd_then_sent",
        "handshake_exc",
        "eof_sent",
        "parser_exc",
        "origins",
        "available_extensions",
        "available_subprotocols",
        "select_subprotocol",
    }
)
#: max_size -> the members of an OPEN protocol in the constructor's order (``None``: a websockets
#: version with members not known here, which gets the constructor).
_templates: dict[int, tuple[tuple[str, Any], ...] | None] = {}


def open_server_protocol(max_size: int) -> ServerProtocol:
    """A websockets :class:`ServerProtocol` in the OPEN state, for a handshake answered here.

    It is what ``ServerProtocol(state=OPEN, max_size=max_size)`` makes, copied from one made
    once per ``max_size``: the constructor's uuid4 (a system call, for log lines only), logger
    lookup and set-up are not redone for every connection. The members that hold a connection's
    state (reader, events, writes, parser) are made anew. They are set one by one in the
    constructor's order, so the object keeps its compact attribute storage (no instance dict of
    its own: ~0.6 KB less per connection than copying a dict). If the websockets version has a
    member not known here, the constructor is used instead.
    """
    template = _templates.get(max_size, ())
    if template == () and max_size not in _templates:
        made = ServerProtocol(max_size=max_size, state=OPEN)
        members = dict(vars(made))
        known = set(members) <= (_OWN_MEMBERS | _SHARED_MEMBERS) and _OWN_MEMBERS <= set(members)
        if known:
            members["extensions"] = ()  # never changed in place: one empty sequence for all
        template = _templates[max_size] = tuple(members.items()) if known else None
    if template is None:
        return ServerProtocol(max_size=max_size, state=OPEN)
    ws: ServerProtocol = object.__new__(ServerProtocol)
    setattr_ = object.__setattr__
    for name, value in template:
        if name == "reader":
            value = StreamReader()
        elif name == "events" or name == "writes":
            value = []
        setattr_(ws, name, value)  # "parser" too: replaced below, once the reader is there
    # The frame parser itself (ServerProtocol.parse would only add a generator that delegates
    # to it once OPEN): what _restart_parser starts too.
    ws.parser = Protocol.parse(ws)
    next(ws.parser)
    return ws


def _phrase(status: int) -> str:
    return {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden",
        404: "Not Found",
        405: "Method Not Allowed",
        429: "Too Many Requests",
    }.get(status, "Service Unavailable")
