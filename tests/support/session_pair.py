"""In-memory clients of a :class:`~tidings.node.Node`, h11 ``ConnectionPair`` style: no sockets.

A :class:`SessionPair` owns one node; :meth:`SessionPair.connect` gives a :class:`ClientEnd`, the
client half of a connection whose server half is a real :class:`tidings.session.Session`. The
client encodes pushes as realtime-js (vsn 2.0.0) or realtime-py (vsn 1.0.0) would and feeds them to
the session; what the session writes is parsed back with the ``websockets`` frame parser and
decoded into :class:`Received` values.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import orjson
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from tidings.auth.tokens import ANONYMOUS, Principal
from tidings.broker import make_broker
from tidings.config import Config
from tidings.node import Node
from tidings.protocol.codec import KIND_USER_BROADCAST, KIND_USER_BROADCAST_PUSH, Serializer
from tidings.server.monitor import Monitor
from tidings.session import Session

__all__ = [
    "BinaryBroadcast",
    "ClientEnd",
    "MemorySession",
    "Received",
    "SessionPair",
    "binary_push",
    "parse_frames",
]


def parse_frames(data: bytes) -> list[Frame]:
    """Parse server-to-client (unmasked) WebSocket frames; every byte must be consumed."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames: list[Frame] = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            while True:
                next(parser)
        except StopIteration as done:
            frames.append(done.value)
    return frames


@dataclasses.dataclass(frozen=True)
class Received:
    """One text message from the server, with the raw JSON it came as."""

    join_ref: str | None
    ref: str | None
    topic: str
    event: str
    payload: Any
    raw: Any

    @property
    def status(self) -> str | None:
        """``payload.status`` of a ``phx_reply``."""
        return self.payload.get("status") if self.event == "phx_reply" else None

    @property
    def response(self) -> Any:
        """``payload.response`` of a ``phx_reply``."""
        return self.payload.get("response") if self.event == "phx_reply" else None


@dataclasses.dataclass(frozen=True)
class BinaryBroadcast:
    """A kind-4 "user broadcast" binary frame from the server."""

    topic: str
    event: str
    meta: Any
    encoding: int
    payload: bytes


def decode_server_frame(frame: Frame, serializer: Serializer) -> Received | BinaryBroadcast:
    """Decode one frame the way realtime-js / realtime-py would."""
    data = bytes(frame.data)
    if frame.opcode is Opcode.BINARY:
        kind, topic_len, event_len, meta_len, encoding = data[:5]
        assert kind == KIND_USER_BROADCAST, f"server sent binary kind {kind}"
        pos = 5
        topic = data[pos : pos + topic_len].decode()
        pos += topic_len
        event = data[pos : pos + event_len].decode()
        pos += event_len
        meta = orjson.loads(data[pos : pos + meta_len]) if meta_len else None
        pos += meta_len
        return BinaryBroadcast(topic, event, meta, encoding, data[pos:])
    assert frame.opcode is Opcode.TEXT, f"unexpected opcode {frame.opcode}"
    obj = orjson.loads(data)
    if serializer is Serializer.V2:
        assert isinstance(obj, list) and len(obj) == 5, obj
        return Received(obj[0], obj[1], obj[2], obj[3], obj[4], obj)
    assert isinstance(obj, dict), obj
    return Received(None, obj["ref"], obj["topic"], obj["event"], obj["payload"], obj)


def binary_push(
    join_ref: str, ref: str, topic: str, event: str, payload: bytes, encoding: int = 1, metadata: bytes = b""
) -> bytes:
    """A client kind-3 "user broadcast push" frame body (what realtime-js sends for ``send()``)."""
    parts = [join_ref.encode(), ref.encode(), topic.encode(), event.encode(), metadata]
    header = bytes((KIND_USER_BROADCAST_PUSH, *(len(p) for p in parts), encoding))
    return header + b"".join(parts) + payload


class MemorySession(Session):
    """A :class:`Session` whose writes land in a list and whose ``close`` is recorded."""

    def __init__(self, node: Node, serializer: Serializer, principal: Principal) -> None:
        super().__init__(node)
        self.serializer = serializer
        self.principal = principal
        self.user = principal.sub
        self.sent: list[bytes] = []
        self.write = self.sent.append
        self.close_code: int | None = None
        self.close_reason: str | None = None
        node.register(self, self.user)

    def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.close_code, self.close_reason = code, reason
        self.closed = True
        self.write = lambda frame: None
        self.leave_all()
        self.node.unregister(self, self.user)


class ClientEnd:
    """The client half of one in-memory connection."""

    def __init__(self, node: Node, serializer: Serializer, principal: Principal) -> None:
        self.serializer = serializer
        self.session = MemorySession(node, serializer, principal)
        self.join_refs: dict[str, str] = {}
        self._refs = itertools.count(1)
        self._read = 0

    # -- sending -------------------------------------------------------------------------

    def next_ref(self) -> str:
        """The next client ref, as both clients number them."""
        return str(next(self._refs))

    def send_raw(self, data: bytes | str) -> None:
        """Feed a text message to the session as is."""
        self.session.receive_text(data.encode() if isinstance(data, str) else data)

    def push(
        self,
        topic: str,
        event: str,
        payload: dict[str, Any],
        *,
        join_ref: str | None = None,
        ref: str | None = None,
    ) -> str:
        """Send one text message; ``join_ref`` defaults to the topic's current one. Returns its ref."""
        ref = self.next_ref() if ref is None else ref
        join_ref = self.join_refs.get(topic) if join_ref is None else join_ref
        if self.serializer is Serializer.V2:
            text = orjson.dumps([join_ref, ref, topic, event, payload])
        else:
            # realtime-py's key order.
            text = orjson.dumps(
                {"event": event, "payload": payload, "topic": topic, "ref": ref, "join_ref": join_ref}
            )
        self.send_raw(text)
        return ref

    def join(
        self, topic: str, config: dict[str, Any] | None = None, access_token: str | None = None, **extra: Any
    ) -> str:
        """``phx_join`` with ``join_ref == ref`` (both clients do that). Returns the ref."""
        ref = self.next_ref()
        payload: dict[str, Any] = {"config": config if config is not None else {}, **extra}
        if access_token is not None:
            payload["access_token"] = access_token
        self.join_refs[topic] = ref
        self.push(topic, "phx_join", payload, join_ref=ref, ref=ref)
        return ref

    def leave(self, topic: str) -> str:
        """``phx_leave``."""
        return self.push(topic, "phx_leave", {})

    def heartbeat(self, ref: str | None = None) -> str | None:
        """A heartbeat; realtime-py sends ``ref: null`` (pass ``ref=""`` for that)."""
        ref = self.next_ref() if ref is None else ref or None
        if self.serializer is Serializer.V2:
            self.send_raw(orjson.dumps([None, ref, "phoenix", "heartbeat", {}]))
        else:
            self.send_raw(
                orjson.dumps(
                    {"event": "heartbeat", "payload": {}, "topic": "phoenix", "ref": ref, "join_ref": None}
                )
            )
        return ref

    def broadcast(self, topic: str, event: str, payload: Any, **extra: Any) -> str:
        """A text ``broadcast`` push."""
        return self.push(
            topic, "broadcast", {"type": "broadcast", "event": event, "payload": payload, **extra}
        )

    def send_binary(
        self, topic: str, event: str, payload: bytes, encoding: int = 1, metadata: bytes = b""
    ) -> str:
        """A kind-3 binary broadcast push (vsn 2.0.0 only)."""
        ref = self.next_ref()
        body = binary_push(self.join_refs.get(topic, ""), ref, topic, event, payload, encoding, metadata)
        self.session.receive_binary(body)
        return ref

    def track(self, topic: str, state: dict[str, Any]) -> str:
        """Presence track, realtime-js style (with ``type``)."""
        return self.push(topic, "presence", {"type": "presence", "event": "track", "payload": state})

    def untrack(self, topic: str) -> str:
        """Presence untrack, realtime-py style (no ``type``)."""
        return self.push(topic, "presence", {"event": "untrack", "payload": {}})

    # -- receiving -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """The server closed this connection."""
        return self.session.close_code is not None

    def frames(self) -> list[Frame]:
        """Every frame the server wrote so far."""
        return parse_frames(b"".join(self.session.sent))

    def received(self) -> list[Received | BinaryBroadcast]:
        """Messages written since the last call."""
        new = self.session.sent[self._read :]
        self._read = len(self.session.sent)
        return [decode_server_frame(f, self.serializer) for f in parse_frames(b"".join(new))]

    def texts(self) -> list[Received]:
        """Like :meth:`received`, asserting every message is a text one."""
        got = self.received()
        assert all(isinstance(m, Received) for m in got), got
        return [m for m in got if isinstance(m, Received)]

    def one(self) -> Received:
        """Exactly one new text message."""
        got = self.texts()
        assert len(got) == 1, got
        return got[0]


class SessionPair:
    """One node (with the broker its config asks for, and its monitor, as the server wires them)
    and the in-memory clients connected to it.

    Args:
        config: node settings; backoffs default to 0 so join errors are answered at once.
    """

    def __init__(self, config: Config | None = None, **settings: Any) -> None:
        base = config or Config(channel_error_backoff=0.0, connect_error_backoff=0.0)
        config = base.replace(**settings) if settings else base
        self.node = Node(config, make_broker(config))
        self.monitor = Monitor(self.node)

    def connect(
        self,
        serializer: Serializer = Serializer.V2,
        token: str | None = None,
        principal: Principal | None = None,
    ) -> ClientEnd:
        """A new connection; ``token`` is verified as the apikey would be at upgrade time."""
        if principal is None:
            principal = self.node.verifier.verify(token) if token is not None else ANONYMOUS
        return ClientEnd(self.node, serializer, principal)
