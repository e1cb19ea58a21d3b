"""Client-side WebSocket framing and the two wire dialects the load generator speaks.

Only what a load generator needs: the upgrade request, masked client frames, a parser for
unmasked server frames, Phoenix (vsn 1.0.0 objects / 2.0.0 arrays) and a minimal Engine.IO v4 /
Socket.IO v5 text protocol. Bench payloads carry ``"t"`` (send time, ``time.time_ns()``) first and
``"n"`` (a per-channel counter) second, so receivers can read both without parsing JSON.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from typing import Any

import orjson

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Dialect",
    "PhoenixDialect",
    "SocketIODialect",
    "accept_key",
    "bench_payload",
    "client_frame",
    "handshake_request",
    "make_dialect",
    "pg_binding",
    "read_record_t_n",
    "read_seq",
    "read_t_n",
]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` a server must answer for ``key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def handshake_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """The HTTP upgrade request and the accept value expected back."""
    key = base64.b64encode(os.urandom(16))
    req = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    return req, accept_key(key)


def client_frame(opcode: int, data: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 requires masking client -> server)."""
    n = len(data)
    key = os.urandom(4)
    if n:
        # XOR as one big integer: far faster in CPython than a per-byte loop.
        k = int.from_bytes((key * (n // 4 + 1))[:n], "little")
        data = (int.from_bytes(data, "little") ^ k).to_bytes(n, "little")
    first = 0x80 | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + key + data


def bench_payload(n: int, size: int) -> bytes:
    """JSON ``{"t":<time_ns>,"n":<n>,"p":"xx.."}`` padded to about ``size`` bytes."""
    head = b'{"t":%d,"n":%d,"p":"' % (time.time_ns(), n)
    pad = max(0, size - len(head) - 2)
    return head + b"x" * pad + b'"}'


def read_t_n(data: bytes) -> tuple[int, int] | None:
    """``(t, n)`` of a bench payload inside any frame text, or ``None`` if there is none."""
    i = data.find(b'"t":')
    if i < 0:
        return None
    j = data.find(b",", i)
    k = data.find(b'"n":', j)
    m = data.find(b",", k)
    try:
        # int() accepts the surrounding spaces some servers' JSON encoders add.
        return int(data[i + 4 : j]), int(data[k + 4 : m])
    except ValueError:
        return None


def _int_at(data: bytes, key: bytes, start: int) -> int | None:
    """The integer value of ``key`` (e.g. ``b'"t":'``) at or after ``start``, else ``None``."""
    i = data.find(key, start)
    if i < 0:
        return None
    i += len(key)
    end = i
    n = len(data)
    while end < n and data[end] not in b",}]":
        end += 1
    try:
        return int(data[i:end].strip(b' "'))
    except ValueError:
        return None


def read_record_t_n(data: bytes) -> tuple[int, int] | None:
    """``(t, n)`` of a ``postgres_changes`` push: the ``t`` and ``n`` columns of ``data.record``.

    No JSON parse: the values are read after ``"record":`` (the new row; ``old_record`` holds only
    the key with ``REPLICA IDENTITY DEFAULT``), whatever the column order.
    """
    i = data.find(b'"record":')
    if i < 0:
        return None
    end = data.find(b"}", i)
    if end < 0:
        return None
    t = _int_at(data[: end + 1], b'"t":', i)
    n = _int_at(data[: end + 1], b'"n":', i)
    if t is None or n is None:
        return None
    return t, n


def read_seq(data: bytes) -> int:
    """``meta.seq`` of a broadcast push (``-1`` when it has none).

    Tidings puts ``"meta":{"id":…,"seq":N}`` (``"replayed":true`` too, for replays) after the
    user payload, so the last ``"seq":`` of the frame is the meta's, whatever the payload holds.
    """
    i = data.rfind(b'"seq":')
    if i < 0:
        return -1
    seq = _int_at(data, b'"seq":', i)
    return -1 if seq is None else seq


def pg_binding(table: str, order: int) -> dict[str, str]:
    """The ``postgres_changes`` binding of a client watching row ``id = order`` of ``table``."""
    return {"event": "UPDATE", "schema": "public", "table": table, "filter": f"id=eq.{order}"}


class Dialect:
    """How one kind of server is spoken to (Phoenix channels or Socket.IO)."""

    name = "base"

    def path(self) -> str:
        """Request target of the WebSocket upgrade."""
        raise NotImplementedError

    def join(
        self,
        ref: int,
        topic: str,
        presence_key: str | None,
        changes: list[dict[str, str]] | None = None,
        replay: dict[str, int] | None = None,
        private: bool = False,
        access_token: str | None = None,
    ) -> bytes:
        """Text of a join request (``ref`` is echoed in the reply); ``private`` and
        ``access_token`` (the join's own token) are Phoenix's."""
        raise NotImplementedError

    def publish(self, ref: int, join_ref: int, topic: str, payload: bytes) -> bytes:
        """Text of a client broadcast on ``topic`` (``payload`` is JSON text)."""
        raise NotImplementedError

    def track(self, ref: int, join_ref: int, topic: str, payload: bytes) -> bytes:
        """Text of a presence track (Phoenix only)."""
        raise NotImplementedError

    def heartbeat(self, ref: int) -> bytes:
        """Text of a keep-alive."""
        raise NotImplementedError


class PhoenixDialect(Dialect):
    """Supabase Realtime: Phoenix channels, vsn 1.0.0 (objects) or 2.0.0 (arrays)."""

    name = "phoenix"

    def __init__(self, vsn: str = "2.0.0", apikey: str = "bench") -> None:
        self.vsn = vsn
        self.v2 = vsn.startswith("2")
        self.apikey = apikey

    def path(self) -> str:
        """Path and query as realtime-js builds them."""
        return f"/realtime/v1/websocket?apikey={self.apikey}&vsn={self.vsn}"

    def _msg(self, join_ref: int | None, ref: int | None, topic: str, event: str, payload: bytes) -> bytes:
        jr = b"null" if join_ref is None else b'"%d"' % join_ref
        r = b"null" if ref is None else b'"%d"' % ref
        t = orjson.dumps(topic)
        if self.v2:
            return b'[%s,%s,%s,"%s",%s]' % (jr, r, t, event.encode(), payload)
        return b'{"topic":%s,"event":"%s","payload":%s,"ref":%s,"join_ref":%s}' % (
            t,
            event.encode(),
            payload,
            r,
            jr,
        )

    def join(
        self,
        ref: int,
        topic: str,
        presence_key: str | None,
        changes: list[dict[str, str]] | None = None,
        replay: dict[str, int] | None = None,
        private: bool = False,
        access_token: str | None = None,
    ) -> bytes:
        """``phx_join`` with broadcast self off (publishers do not hear themselves).

        ``replay`` (e.g. ``{"since_seq": 41, "limit": 25}``) asks for what was missed since then.
        """
        broadcast: dict[str, Any] = {"self": False, "ack": False}
        if replay is not None:
            broadcast["replay"] = replay
        config: dict[str, Any] = {
            "broadcast": broadcast,
            "presence": {"key": presence_key or "", "enabled": presence_key is not None},
            "postgres_changes": changes or [],
            "private": private,
        }
        payload: dict[str, Any] = {"config": config}
        if access_token is not None:
            payload["access_token"] = access_token
        return self._msg(ref, ref, topic, "phx_join", orjson.dumps(payload))

    def publish(self, ref: int, join_ref: int, topic: str, payload: bytes) -> bytes:
        """A text ``broadcast`` push (JSON form in both vsns)."""
        body = b'{"type":"broadcast","event":"bench","payload":%s}' % payload
        return self._msg(join_ref, ref, topic, "broadcast", body)

    def track(self, ref: int, join_ref: int, topic: str, payload: bytes) -> bytes:
        """A presence ``track``."""
        body = b'{"type":"presence","event":"track","payload":%s}' % payload
        return self._msg(join_ref, ref, topic, "presence", body)

    def heartbeat(self, ref: int) -> bytes:
        """``phoenix``/``heartbeat``."""
        return self._msg(None, ref, "phoenix", "heartbeat", b"{}")

    def decode(self, data: bytes) -> tuple[str | None, str, str, Any]:
        """``(ref, topic, event, payload)`` of a server message."""
        msg = orjson.loads(data)
        if isinstance(msg, list):
            return msg[1], msg[2], msg[3], msg[4]
        return msg.get("ref"), msg["topic"], msg["event"], msg["payload"]


class SocketIODialect(Dialect):
    """Engine.IO v4 + Socket.IO v5 text packets, default namespace, over WebSocket only.

    ``"40"`` connects the namespace, ``"42[...]"`` is an event, ``"42<id>[...]"`` one that wants an
    ack, answered by ``"43<id>[...]"``; the server pings with ``"2"`` and wants ``"3"`` back.
    """

    name = "socketio"

    def path(self) -> str:
        """Engine.IO over WebSocket without the polling upgrade dance."""
        return "/socket.io/?EIO=4&transport=websocket"

    def join(
        self,
        ref: int,
        topic: str,
        presence_key: str | None,
        changes: list[dict[str, str]] | None = None,
        replay: dict[str, int] | None = None,
        private: bool = False,
        access_token: str | None = None,
    ) -> bytes:
        """``join`` event with an ack id of ``ref`` (no replay in Socket.IO)."""
        return b"42%d%s" % (ref, orjson.dumps(["join", topic]))

    def publish(self, ref: int, join_ref: int, topic: str, payload: bytes) -> bytes:
        """``publish`` event: the server emits ``broadcast`` to the room, skipping the sender."""
        return b'42["publish",{"room":%s,"payload":%s}]' % (orjson.dumps(topic), payload)

    def heartbeat(self, ref: int) -> bytes:
        """Engine.IO pong (the server drives pings)."""
        return b"3"


def make_dialect(name: str, vsn: str = "2.0.0") -> Dialect:
    """A dialect by name: ``phoenix`` or ``socketio``."""
    if name == "socketio":
        return SocketIODialect()
    return PhoenixDialect(vsn)
