"""Phoenix channel messages in the two serializers the official clients speak.

* vsn 1.0.0 (realtime-py): text frames holding ``{"topic","event","payload","ref"}`` objects.
  Server frames always carry ``"ref"`` (``null`` for pushes) and never ``join_ref``.
* vsn 2.0.0 (realtime-js): text frames holding ``[join_ref, ref, topic, event, payload]`` arrays,
  plus binary "user broadcast" frames: kind 3 from the client, kind 4 to the client.

Every encoder returns a complete WebSocket frame (``bytes``) ready for ``transport.write``. A
fan-out message is an :class:`Outbound`, encoded at most once per serializer however many
subscribers receive it.
"""

from __future__ import annotations

import enum
from typing import Any

import orjson

from .frames import OP_BINARY, OP_TEXT, encode_frame

__all__ = [
    "KIND_USER_BROADCAST",
    "KIND_USER_BROADCAST_PUSH",
    "MalformedMessage",
    "Message",
    "Outbound",
    "Serializer",
    "decode_binary",
    "decode_text",
    "decode_user_meta",
    "decode_user_payload",
    "encode_change",
    "encode_close",
    "encode_push",
    "encode_reply",
    "parse_vsn",
]

KIND_USER_BROADCAST_PUSH = 3
KIND_USER_BROADCAST = 4


class Serializer(enum.IntEnum):
    """Wire format of one connection, chosen by the ``vsn`` query parameter."""

    V1 = 1
    V2 = 2


def parse_vsn(vsn: str | None) -> Serializer | None:
    """Map a ``vsn`` query value to a serializer; ``None`` means "refuse the upgrade"."""
    if vsn is None or vsn == "":
        return Serializer.V1
    major = vsn.strip().removeprefix("~>").strip().split(".", 1)[0]
    if major == "1":
        return Serializer.V1
    if major == "2":
        return Serializer.V2
    return None


class MalformedMessage(ValueError):
    """A frame that is not a valid Phoenix message; it is logged and dropped."""


class Message:
    """One inbound Phoenix message."""

    __slots__ = ("event", "join_ref", "payload", "ref", "topic")

    def __init__(
        self, join_ref: str | None, ref: str | None, topic: str, event: str, payload: dict[str, Any]
    ) -> None:
        self.join_ref = join_ref
        self.ref = ref
        self.topic = topic
        self.event = event
        self.payload = payload

    def __repr__(self) -> str:
        return (
            f"Message(join_ref={self.join_ref!r}, ref={self.ref!r}, topic={self.topic!r}, "
            f"event={self.event!r}, payload={self.payload!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.join_ref, self.ref, self.topic, self.event, self.payload) == (
            other.join_ref,
            other.ref,
            other.topic,
            other.event,
            other.payload,
        )

    __hash__ = None  # type: ignore[assignment]


def _ref(value: object, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise MalformedMessage(f"{name} must be a string or null")


def decode_text(data: bytes | str, serializer: Serializer) -> Message:
    """Decode a text frame; raises :class:`MalformedMessage` on anything a client must not send."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"invalid JSON: {exc}") from None
    if serializer is Serializer.V2:
        if not isinstance(obj, list) or len(obj) != 5:
            raise MalformedMessage("vsn 2.0.0 messages must be 5-element arrays")
        join_ref, ref, topic, event, payload = obj
    else:
        if not isinstance(obj, dict):
            raise MalformedMessage("vsn 1.0.0 messages must be JSON objects")
        try:
            topic, event, payload = obj["topic"], obj["event"], obj["payload"]
        except KeyError as exc:
            raise MalformedMessage(f"missing field {exc.args[0]}") from None
        ref, join_ref = obj.get("ref"), obj.get("join_ref")
    if not isinstance(topic, str) or not isinstance(event, str):
        raise MalformedMessage("topic and event must be strings")
    if not isinstance(payload, dict):
        raise MalformedMessage("payload must be an object")
    return Message(_ref(join_ref, "join_ref"), _ref(ref, "ref"), topic, event, payload)


def decode_binary(data: bytes) -> Message:
    """Decode a binary frame; only kind 3 (user broadcast push) is valid from a client.

    The result looks like the text ``broadcast`` push it stands for. A raw-binary user payload
    (encoding 0) stays ``bytes`` in ``payload["payload"]``.
    """
    if len(data) < 7:
        raise MalformedMessage("binary frame too short")
    kind = data[0]
    if kind != KIND_USER_BROADCAST_PUSH:
        raise MalformedMessage(f"unknown binary message kind {kind}")
    jr_len, ref_len, topic_len, event_len, meta_len, encoding = data[1:7]
    pos = 7
    end = pos + jr_len + ref_len + topic_len + event_len + meta_len
    if end > len(data):
        raise MalformedMessage("binary frame shorter than its header says")
    try:
        join_ref = data[pos : pos + jr_len].decode()
        pos += jr_len
        ref = data[pos : pos + ref_len].decode()
        pos += ref_len
        topic = data[pos : pos + topic_len].decode()
        pos += topic_len
        event = data[pos : pos + event_len].decode()
        pos += event_len
        meta_raw = data[pos : pos + meta_len]
    except UnicodeDecodeError:
        raise MalformedMessage("binary frame header strings must be UTF-8") from None
    payload: dict[str, Any] = {
        "type": "broadcast",
        "event": event,
        "payload": decode_user_payload(encoding, data[end:]),
    }
    meta = decode_user_meta(meta_raw)
    if meta is not None:
        if "persist" in meta:
            payload["persist"] = meta["persist"]
        if isinstance(meta.get("id"), str):
            payload["id"] = meta["id"]  # a client message id: echoed in meta, de-duplicated
    return Message(join_ref or None, ref or None, topic, "broadcast", payload)


def decode_user_payload(encoding: int, body: bytes) -> Any:
    """The user payload of a binary broadcast frame: JSON (encoding 1) or raw bytes (encoding 0)."""
    if encoding == 1:
        try:
            return orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            raise MalformedMessage("binary broadcast JSON payload is not valid JSON") from None
    if encoding == 0:
        return bytes(body)
    raise MalformedMessage(f"unknown payload encoding {encoding}")


def decode_user_meta(raw: bytes) -> dict[str, Any] | None:
    """The metadata of a binary broadcast frame: a JSON object, or ``None`` when empty or not one."""
    if not raw:
        return None
    try:
        meta = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedMessage("binary broadcast metadata is not valid JSON") from None
    return meta if isinstance(meta, dict) else None


def _text(obj: object) -> bytes:
    return encode_frame(OP_TEXT, orjson.dumps(obj))


def encode_reply(
    serializer: Serializer,
    join_ref: str | None,
    ref: str | None,
    topic: str,
    status: str,
    response: dict[str, Any],
) -> bytes:
    """A ``phx_reply`` to the push ``ref``."""
    payload = {"status": status, "response": response}
    if serializer is Serializer.V2:
        return _text([join_ref, ref, topic, "phx_reply", payload])
    return _text({"topic": topic, "event": "phx_reply", "payload": payload, "ref": ref})


def encode_push(
    serializer: Serializer, join_ref: str | None, topic: str, event: str, payload: dict[str, Any]
) -> bytes:
    """A server push on one channel (``presence_state``, ``system``, replayed broadcasts)."""
    if serializer is Serializer.V2:
        return _text([join_ref, None, topic, event, payload])
    return _text({"topic": topic, "event": event, "payload": payload, "ref": None})


def encode_close(serializer: Serializer, join_ref: str | None, topic: str, event: str = "phx_close") -> bytes:
    """``phx_close`` (or ``phx_error``) for a channel; its ref is the join ref."""
    payload: dict[str, Any] = {} if event == "phx_close" else {"reason": "channel_crash"}
    if serializer is Serializer.V2:
        return _text([join_ref, join_ref, topic, event, payload])
    return _text({"topic": topic, "event": event, "payload": payload, "ref": join_ref})


def encode_change(
    serializer: Serializer, topic: str, ids: list[int], data_json: bytes, ref: str | None = None
) -> bytes:
    """A ``postgres_changes`` push; ``data_json`` is the change's ``data`` already as JSON.

    The change is serialised once; each channel's frame only adds its topic and binding ids.
    ``ref`` (the change's position, for channels that resume) goes in the message's ref, which
    realtime-js passes to the callback as its second argument.
    """
    ref_json = b"null" if ref is None else orjson.dumps(ref)
    head = orjson.dumps(topic) + b',"postgres_changes",{"ids":' + orjson.dumps(ids) + b',"data":'
    if serializer is Serializer.V2:
        return encode_frame(OP_TEXT, b"[null," + ref_json + b"," + head + data_json + b"}]")
    return encode_frame(
        OP_TEXT,
        b'{"topic":'
        + orjson.dumps(topic)
        + b',"event":"postgres_changes","payload":{"ids":'
        + orjson.dumps(ids)
        + b',"data":'
        + data_json
        + b'},"ref":'
        + ref_json
        + b"}",
    )


def _short(s: str) -> bytes:
    b = s.encode()
    if len(b) > 255:
        raise ValueError("binary broadcast strings are limited to 255 bytes")
    return b


class Outbound:
    """A fan-out message (``broadcast``, ``presence_diff``, ``postgres_changes``).

    Frames are built lazily, at most once per serializer, then shared by every recipient.
    A broadcast whose user payload is ``bytes`` goes to v2 clients as a kind-4 binary frame and
    is not representable for v1 clients (:meth:`frame_v1` returns ``None``).
    """

    __slots__ = ("_v1", "_v2", "event", "payload", "topic")

    def __init__(self, topic: str, event: str, payload: dict[str, Any]) -> None:
        self.topic = topic
        self.event = event
        self.payload = payload
        self._v1: bytes | None = None
        self._v2: bytes | None = None

    @property
    def is_binary(self) -> bool:
        """True for a broadcast whose user payload is raw bytes."""
        return isinstance(self.payload.get("payload"), bytes | bytearray)

    def frame_v1(self) -> bytes | None:
        """The vsn 1.0.0 frame, or ``None`` when the payload is raw binary."""
        if self._v1 is None:
            if self.is_binary:
                return None
            self._v1 = _text({"topic": self.topic, "event": self.event, "payload": self.payload, "ref": None})
        return self._v1

    def frame_v2(self) -> bytes:
        """The vsn 2.0.0 frame: a JSON array, or a kind-4 binary frame for raw-binary payloads."""
        if self._v2 is None:
            if self.is_binary:
                p = self.payload
                topic_b, event_b = _short(self.topic), _short(str(p.get("event", "")))
                meta = p.get("meta")
                meta_b = orjson.dumps(meta) if meta else b""
                header = bytes((KIND_USER_BROADCAST, len(topic_b), len(event_b), len(meta_b), 0))
                body = header + topic_b + event_b + meta_b + bytes(p["payload"])
                self._v2 = encode_frame(OP_BINARY, body)
            else:
                self._v2 = _text([None, None, self.topic, self.event, self.payload])
        return self._v2

    def frame_for(self, serializer: Serializer) -> bytes | None:
        """The frame for ``serializer`` (``None``: nothing to send to that client)."""
        return self.frame_v2() if serializer is Serializer.V2 else self.frame_v1()
