"""What a client puts on the wire and how it reads the server's frames.

:mod:`tidings.protocol.codec` builds whole *server* WebSocket frames; a client hands plain payloads
to its WebSocket library instead: JSON text (vsn 1.0.0 objects, vsn 2.0.0 arrays) and, in vsn 2.0.0,
binary kind-3 "user broadcast push" frames (spec 1.4). Server frames are decoded by
:func:`tidings.protocol.codec.decode_text` (any Phoenix message) and, for binary kind-4 "user
broadcast" frames, by :func:`decode_user_broadcast`.
"""

from __future__ import annotations

from typing import Any

import orjson

from tidings.protocol.codec import (
    KIND_USER_BROADCAST,
    KIND_USER_BROADCAST_PUSH,
    MalformedMessage,
    Message,
    Serializer,
    decode_text,
    decode_user_meta,
    decode_user_payload,
)

__all__ = [
    "decode_frame",
    "decode_user_broadcast",
    "encode_broadcast_push",
    "encode_message",
    "serializer_for",
]


def serializer_for(vsn: str) -> Serializer:
    """The serializer of a ``vsn`` string (``"1.0.0"`` or ``"2.0.0"``).

    Raises:
        ValueError: for any other major version.
    """
    major = vsn.split(".", 1)[0]
    if major == "1":
        return Serializer.V1
    if major == "2":
        return Serializer.V2
    raise ValueError(f"unsupported vsn {vsn!r}")


def encode_message(
    serializer: Serializer,
    join_ref: str | None,
    ref: str | None,
    topic: str,
    event: str,
    payload: dict[str, Any],
) -> str:
    """One client message as JSON text.

    Args:
        serializer: ``V1`` writes an object, ``V2`` a ``[join_ref, ref, topic, event, payload]`` array.
        join_ref: the channel's join ref (``None`` for heartbeats).
        ref: this push's ref; the server echoes it in its reply.
        topic: ``realtime:<name>`` or ``phoenix``.
        event: ``phx_join``, ``broadcast``, ``heartbeat``...
        payload: a JSON object.

    Returns:
        The text to send in one WebSocket text message.
    """
    if serializer is Serializer.V2:
        return orjson.dumps([join_ref, ref, topic, event, payload]).decode()
    return orjson.dumps(
        {"topic": topic, "event": event, "payload": payload, "ref": ref, "join_ref": join_ref}
    ).decode()


def _short(value: str, what: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"{what} is longer than 255 bytes, too long for a binary broadcast frame")
    return raw


def encode_broadcast_push(
    join_ref: str | None,
    ref: str | None,
    topic: str,
    event: str,
    payload: Any,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """A vsn 2.0.0 kind-3 "user broadcast push" binary message (spec 1.4).

    Args:
        join_ref: the channel's join ref.
        ref: this push's ref (the server acks it when ``broadcast.ack`` is on).
        topic: ``realtime:<name>``.
        event: the user event name.
        payload: any JSON value (encoding 1), or ``bytes`` sent raw (encoding 0).
        metadata: a JSON object such as ``{"id": ...}``; omitted when empty.

    Returns:
        The bytes of one WebSocket binary message.

    Raises:
        ValueError: when a header string is longer than 255 bytes.
    """
    jr = _short(join_ref or "", "join_ref")
    rf = _short(ref or "", "ref")
    tp = _short(topic, "topic")
    ev = _short(event, "event")
    meta = orjson.dumps(metadata) if metadata else b""
    if len(meta) > 255:
        raise ValueError("metadata is longer than 255 bytes, too long for a binary broadcast frame")
    if isinstance(payload, bytes | bytearray | memoryview):
        encoding, body = 0, bytes(payload)
    else:
        encoding, body = 1, orjson.dumps({} if payload is None else payload)
    header = bytes((KIND_USER_BROADCAST_PUSH, len(jr), len(rf), len(tp), len(ev), len(meta), encoding))
    return header + jr + rf + tp + ev + meta + body


def decode_user_broadcast(data: bytes) -> Message:
    """Decode a kind-4 "user broadcast" binary frame into the ``broadcast`` message it stands for.

    The payload is ``{"type": "broadcast", "event": ..., "payload": ..., "meta"?: {...}}``, as
    realtime-js surfaces it; a raw-binary user payload (encoding 0) stays ``bytes``.

    Raises:
        MalformedMessage: when the frame is not a well-formed kind-4 frame.
    """
    if len(data) < 5:
        raise MalformedMessage("binary frame too short")
    if data[0] != KIND_USER_BROADCAST:
        raise MalformedMessage(f"unexpected binary message kind {data[0]}")
    topic_len, event_len, meta_len, encoding = data[1:5]
    pos = 5
    end = pos + topic_len + event_len + meta_len
    if end > len(data):
        raise MalformedMessage("binary frame shorter than its header says")
    try:
        topic = data[pos : pos + topic_len].decode()
        pos += topic_len
        event = data[pos : pos + event_len].decode()
        pos += event_len
    except UnicodeDecodeError:
        raise MalformedMessage("binary frame header strings must be UTF-8") from None
    payload: dict[str, Any] = {
        "type": "broadcast",
        "event": event,
        "payload": decode_user_payload(encoding, data[end:]),
    }
    meta = decode_user_meta(data[pos:end])
    if meta is not None:
        payload["meta"] = meta
    return Message(None, None, topic, "broadcast", payload)


def decode_frame(data: str | bytes, serializer: Serializer) -> Message:
    """Decode one server WebSocket message (text in either serializer, or binary kind 4).

    Raises:
        MalformedMessage: on anything that is not a valid server message.
    """
    if isinstance(data, str):
        return decode_text(data, serializer)
    return decode_user_broadcast(bytes(data))
