"""The ceiling: a bare uvloop ``asyncio.Protocol`` WebSocket server writing pre-encoded frames.

Just enough Phoenix (vsn 1.0.0 objects and 2.0.0 arrays) for ``tidings bench``: the upgrade, the
``phx_join`` reply, heartbeats and broadcast fan-out (one encode per wire format, the same bytes
written to every subscriber). No limits, no auth, no presence: the floor of what a Python server
can cost per connection and per delivery on this machine.

    python benchmarks/ceiling_server.py --port 4100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import resource
from typing import Any

import orjson
import uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
channels: dict[str, tuple[dict[Conn, None], dict[Conn, None]]] = {}  # topic -> (v1, v2)


def frame(data: bytes, opcode: int = 1) -> bytes:
    """One unmasked server frame."""
    n = len(data)
    if n < 126:
        return bytes((0x80 | opcode, n)) + data
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + data
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + data


def unmask(key: bytes, data: bytes) -> bytes:
    n = len(data)
    k = int.from_bytes((key * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ k).to_bytes(n, "little")


class Conn(asyncio.Protocol):
    __slots__ = ("buf", "is_open", "topics", "transport", "v2")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.is_open = False
        self.v2 = False
        self.topics: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        for topic in self.topics:
            v1, v2 = channels.get(topic, ({}, {}))
            v1.pop(self, None)
            v2.pop(self, None)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.is_open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.handshake(buf[:end])
            buf = buf[end + 4 :]
        pos, n = 0, len(buf)
        while n - pos >= 6:
            b0, b1 = buf[pos], buf[pos + 1]
            ln, hdr = b1 & 0x7F, 2
            if ln == 126:
                ln, hdr = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif ln == 127:
                ln, hdr = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + hdr + 4 + ln
            if end > n:
                break
            key = buf[pos + hdr : pos + hdr + 4]
            payload = unmask(key, buf[pos + hdr + 4 : end])
            pos = end
            op = b0 & 0x0F
            if op == 1 or op == 2:
                self.message(payload)
            elif op == 8:
                assert self.transport is not None
                self.transport.write(frame(payload[:2], 8))
                self.transport.close()
                return
            elif op == 9 and self.transport is not None:
                self.transport.write(frame(payload, 10))
        self.buf = buf[pos:]

    def handshake(self, head: bytes) -> None:
        assert self.transport is not None
        key = b""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        self.v2 = b"vsn=2" in head.split(b"\r\n", 1)[0]
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.is_open = True

    def reply(self, join_ref: Any, ref: Any, topic: str, response: dict[str, Any]) -> None:
        assert self.transport is not None
        body: Any = {"status": "ok", "response": response}
        msg = (
            [join_ref, ref, topic, "phx_reply", body]
            if self.v2
            else {"topic": topic, "event": "phx_reply", "payload": body, "ref": ref}
        )
        self.transport.write(frame(orjson.dumps(msg)))

    def message(self, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
            if self.v2:
                join_ref, ref, topic, event, payload = msg
            else:
                join_ref, ref = msg.get("join_ref"), msg.get("ref")
                topic, event, payload = msg["topic"], msg["event"], msg["payload"]
        except (ValueError, KeyError, TypeError):
            return
        if event == "heartbeat":
            self.reply(None, ref, topic, {})
        elif event == "phx_join":
            subs = channels.setdefault(topic, ({}, {}))
            subs[1 if self.v2 else 0][self] = None
            self.topics.append(topic)
            self.reply(join_ref, ref, topic, {"postgres_changes": []})
        elif event == "broadcast":
            subs = channels.get(topic)
            if subs is None:
                return
            body = {"type": "broadcast", "event": payload.get("event"), "payload": payload.get("payload")}
            v1, v2 = subs
            if v2:
                f = frame(orjson.dumps([None, None, topic, "broadcast", body]))
                for c in v2:
                    if c is not self and c.transport is not None:
                        c.transport.write(f)
            if v1:
                f = frame(orjson.dumps({"topic": topic, "event": "broadcast", "payload": body, "ref": None}))
                for c in v1:
                    if c is not self and c.transport is not None:
                        c.transport.write(f)


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4100)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        uvloop.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass
