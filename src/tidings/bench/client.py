"""One load-generator connection: an ``asyncio.Protocol`` with ``__slots__`` and no task.

It performs the upgrade, joins one topic, optionally tracks presence, answers pings, and reports
to a :class:`Sink` (the worker). Bench broadcasts are recognised without a JSON parse
(:func:`~tidings.bench.wire.read_t_n`); everything else is rare and parsed with orjson.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol as TypingProtocol, cast

from .wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Dialect,
    PhoenixDialect,
    client_frame,
    handshake_request,
    read_record_t_n,
    read_seq,
    read_t_n,
)

__all__ = ["CLOSED", "CONNECTING", "JOINED", "ClientConn", "Sink"]

CONNECTING, HANDSHAKE, OPEN, JOINING, JOINED, CLOSED = range(6)


class Sink(TypingProtocol):
    """What a connection reports to."""

    def on_joined(self, conn: ClientConn) -> None:
        """The join was acknowledged."""

    def on_bench(self, conn: ClientConn, t: int, n: int) -> None:
        """A bench payload sent at ``t`` (ns) with counter ``n`` arrived."""

    def on_seq(self, conn: ClientConn, t: int, n: int, seq: int, replayed: bool) -> None:
        """Instead of ``on_bench`` when the connection tracks ``meta.seq`` (``-1``: none)."""

    def on_presence(self, conn: ClientConn, event: str, payload: Any) -> None:
        """``presence_state`` or ``presence_diff`` arrived."""

    def on_system(self, conn: ClientConn, payload: Any) -> None:
        """A ``system`` message arrived (e.g. the Postgres Changes subscription status)."""

    def on_failed(self, conn: ClientConn, kind: str) -> None:
        """Connecting or joining failed (``kind`` names why)."""

    def on_closed(self, conn: ClientConn) -> None:
        """An established connection went away."""


class ClientConn(asyncio.Protocol):
    """A WebSocket client speaking ``dialect``; ``idx`` is its global client number."""

    __slots__ = (
        "accept",
        "access_token",
        "buf",
        "changes",
        "close_code",
        "dialect",
        "host",
        "idx",
        "join_ref",
        "join_response",
        "port",
        "presence_key",
        "private",
        "ref",
        "replay",
        "sink",
        "state",
        "t_joined",
        "t_start",
        "topic",
        "track_seq",
        "transport",
    )

    def __init__(
        self,
        sink: Sink,
        dialect: Dialect,
        idx: int,
        topic: str,
        host: str,
        port: int,
        presence_key: str | None = None,
        changes: list[dict[str, str]] | None = None,
        replay: dict[str, int] | None = None,
        track_seq: bool = False,
        private: bool = False,
        access_token: str | None = None,
    ) -> None:
        self.sink = sink
        # A private channel, joined with this token of its own (the socket's apikey when None).
        self.private = private
        self.access_token = access_token
        # Sent in the join's config.broadcast.replay (e.g. {"since_seq": 41, "limit": 25}).
        self.replay = replay
        # Read meta.seq of every bench broadcast and report through Sink.on_seq.
        self.track_seq = track_seq
        self.join_response: Any = None
        self.changes = changes
        self.dialect = dialect
        self.idx = idx
        self.topic = topic
        self.host = host
        self.port = port
        self.presence_key = presence_key
        self.transport: asyncio.Transport | None = None
        self.state = CONNECTING
        self.buf = b""
        self.accept = b""
        self.ref = 0
        self.join_ref = 0
        self.t_start = time.time_ns()
        self.t_joined = 0
        self.close_code = 0

    # -- sending ------------------------------------------------------------------------------

    def send_text(self, text: bytes) -> None:
        """Send one text message (masked)."""
        if self.transport is not None and self.state != CLOSED:
            self.transport.write(client_frame(OP_TEXT, text))

    def next_ref(self) -> int:
        """A fresh Phoenix ``ref``."""
        self.ref += 1
        return self.ref

    def publish(self, payload: bytes) -> None:
        """Broadcast ``payload`` (JSON text) on the joined topic."""
        self.send_text(self.dialect.publish(self.next_ref(), self.join_ref, self.topic, payload))

    def heartbeat(self) -> None:
        """Keep-alive (Phoenix heartbeat; Socket.IO answers the server's pings instead)."""
        if isinstance(self.dialect, PhoenixDialect) and self.state == JOINED:
            self.send_text(self.dialect.heartbeat(self.next_ref()))

    def abort(self) -> None:
        """Drop the TCP connection without a goodbye."""
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close politely (close frame, then TCP close)."""
        if self.transport is not None and self.state != CLOSED:
            self.transport.write(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        request, self.accept = handshake_request(self.host, self.port, self.dialect.path())
        self.state = HANDSHAKE
        self.transport.write(request)

    def connection_lost(self, exc: Exception | None) -> None:
        state, self.state = self.state, CLOSED
        self.transport = None
        if state == JOINED:
            self.sink.on_closed(self)
        elif state != CLOSED:
            self.sink.on_failed(self, "closed-before-join")

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.state == HANDSHAKE:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end]
            if not head.startswith(b"HTTP/1.1 101") or self.accept not in head:
                status = head[9:12].decode(errors="replace")
                self.fail(f"http-{status}")
                return
            buf = buf[end + 4 :]
            self.on_open()
        # Unmasked server frames; a fragmented message is not expected from these servers.
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b1 = buf[pos + 1]
            ln = b1 & 0x7F
            hdr = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hdr = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hdr = 10
            end = pos + hdr + ln
            if end > n:
                break
            op = buf[pos] & 0x0F
            payload = buf[pos + hdr : end]
            pos = end
            if op == OP_TEXT or op == OP_BINARY:
                self.on_text(payload)
            elif op == OP_PING:
                if self.transport is not None:
                    self.transport.write(client_frame(OP_PONG, payload))
            elif op == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if self.transport is not None:
                    self.transport.write(client_frame(OP_CLOSE, payload[:2]))
                    self.transport.close()
                break
            if self.state == CLOSED:
                return
        self.buf = buf[pos:] if pos < n else b""

    # -- protocol logic -----------------------------------------------------------------------

    def fail(self, kind: str) -> None:
        """Give up on this connection and report ``kind``."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self.sink.on_failed(self, kind)

    def on_open(self) -> None:
        """The upgrade succeeded: Phoenix joins at once, Socket.IO waits for the open packet."""
        self.state = OPEN
        if isinstance(self.dialect, PhoenixDialect):
            self.send_join()
        # Socket.IO: wait for the Engine.IO open packet first.

    def send_join(self) -> None:
        """Send the join request of this connection's topic."""
        self.state = JOINING
        self.join_ref = self.next_ref()
        self.send_text(
            self.dialect.join(
                self.join_ref,
                self.topic,
                self.presence_key,
                self.changes,
                self.replay,
                self.private,
                self.access_token,
            )
        )

    def joined(self) -> None:
        """The join was acknowledged."""
        self.state = JOINED
        self.t_joined = time.time_ns()
        self.sink.on_joined(self)

    def on_text(self, data: bytes) -> None:
        """One server message: bench payloads first (cheap), the rest by dialect."""
        if self.state == JOINED:
            tn = read_record_t_n(data) if self.changes else read_t_n(data)
            if tn is not None:
                if self.track_seq:
                    self.sink.on_seq(self, tn[0], tn[1], read_seq(data), b'"replayed":true' in data)
                else:
                    self.sink.on_bench(self, tn[0], tn[1])
                return
        if isinstance(self.dialect, PhoenixDialect):
            self.on_phoenix(data)
        else:
            self.on_socketio(data)

    def on_phoenix(self, data: bytes) -> None:
        """Join replies, presence and channel closes."""
        assert isinstance(self.dialect, PhoenixDialect)
        try:
            ref, _topic, event, payload = self.dialect.decode(data)
        except (ValueError, KeyError, IndexError, TypeError):
            return
        if event == "phx_reply":
            if self.state == JOINING and ref == str(self.join_ref):
                if isinstance(payload, dict) and payload.get("status") == "ok":
                    self.join_response = payload.get("response")
                    self.joined()
                    if self.presence_key is not None:
                        body = b'{"i":%d}' % self.idx
                        self.send_text(self.dialect.track(self.next_ref(), self.join_ref, self.topic, body))
                else:
                    resp = payload.get("response") if isinstance(payload, dict) else None
                    reason = resp.get("reason") if isinstance(resp, dict) else None
                    self.fail(f"join-error: {str(reason)[:60]}" if reason else "join-error")
        elif event == "presence_state" or event == "presence_diff":
            self.sink.on_presence(self, event, payload)
        elif event == "system":
            self.sink.on_system(self, payload)
        elif event == "phx_close" or event == "phx_error":
            if self.state == JOINED:
                self.abort()

    def on_socketio(self, data: bytes) -> None:
        """Engine.IO open/ping, namespace connect and the join ack."""
        if data == b"2":
            self.send_text(b"3")
        elif data[:1] == b"0" and self.state == OPEN:
            self.send_text(b"40")
        elif data[:2] == b"40" and self.state == OPEN:
            self.send_join()
        elif data[:2] == b"43" and self.state == JOINING:
            self.joined()
        elif data[:2] == b"44":
            self.fail("namespace-error")
