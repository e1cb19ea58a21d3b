"""The WebSocket frame parser under TCP segmentation: every split of a byte stream parses the same.

An honest client's frames reach ``data_received`` cut wherever TCP and the kernel cut them: inside
a header, an extended length, a mask key or a payload. ``WebSocketConnection`` frees the parser's
leftovers between frames (``_restart_parser``); doing that anywhere but at a frame boundary lost
the bytes already consumed (1002 "incorrect masking", or a silently vanished message).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from typing import Any

import orjson
from hypothesis import given, settings, strategies as st
from websockets.datastructures import Headers
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request

from tests.support.server import ServerProcess
from tidings.broker import make_broker
from tidings.config import Config
from tidings.node import Node
from tidings.server.websocket import WebSocketConnection

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
HEAD = (
    "GET /realtime/v1/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
).encode()


def masked(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


def stream() -> tuple[bytes, list[tuple[str, bytes]]]:
    """Client frames of every kind, and the events they must produce, in order."""
    small = b'["1","1","realtime:a","broadcast",{}]'
    medium = b"m" * 200  # 16-bit extended length
    large = bytes(range(256)) * 256  # 64 KiB: 64-bit extended length
    frames = [
        masked(Opcode.TEXT, small),
        masked(Opcode.BINARY, medium),
        masked(Opcode.PING, b"p1"),
        masked(Opcode.BINARY, large),
        masked(Opcode.TEXT, b"frag-1 ", fin=False),
        masked(Opcode.PING, b"p2"),  # control frames may come between fragments
        masked(Opcode.CONT, b"m" * 130, fin=False),
        masked(Opcode.PONG, b"ignored"),
        masked(Opcode.CONT, b" end", fin=True),
        masked(Opcode.TEXT, b""),
        masked(Opcode.TEXT, small),
    ]
    events = [
        ("TEXT", small),
        ("BINARY", medium),
        ("PING", b"p1"),
        ("BINARY", large),
        ("PING", b"p2"),
        ("TEXT", b"frag-1 " + b"m" * 130 + b" end"),
        ("TEXT", b""),
        ("TEXT", small),
    ]
    return b"".join(frames), events


STREAM, EVENTS = stream()


class FakeTransport:
    """Collects what the connection writes; remembers a close."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class Recording(WebSocketConnection):
    """A connection that records complete messages instead of dispatching them as Phoenix."""

    def __init__(self, node: Node) -> None:
        super().__init__(node=node)
        self.events: list[tuple[str, bytes]] = []

    def receive_message(self, opcode: Opcode, data: bytes) -> None:
        self.events.append((opcode.name, data))


def server_frames(written: bytes) -> list[Frame]:
    """Parse what the server wrote after its 101 response (unmasked frames)."""
    from websockets.streams import StreamReader

    rest = written[written.index(b"\r\n\r\n") + 4 :]
    reader = StreamReader()
    reader.feed_data(rest)
    reader.feed_eof()
    frames = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
        except StopIteration as done:
            frames.append(done.value)
        else:  # pragma: no cover - a partial frame is a failure
            raise AssertionError("partial server frame")
    return frames


_NODE: Node | None = None


def node() -> Node:
    global _NODE
    if _NODE is None:
        config = Config(channel_error_backoff=0.0, connect_error_backoff=0.0)
        _NODE = Node(config, make_broker(config))
    return _NODE


def feed(chunks: list[bytes], via_upgrade: bool) -> tuple[list[tuple[str, bytes]], Recording]:
    """Run ``chunks`` (after the upgrade) through a fresh connection; the events it saw."""
    conn = Recording(node())
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    if via_upgrade:  # uvicorn parsed the head and hands over the transport
        headers = Headers()
        for line in HEAD.decode().split("\r\n")[1:]:
            if line:
                name, value = line.split(": ", 1)
                headers[name] = value
        request = Request("/realtime/v1/websocket?vsn=2.0.0", headers)
        first = chunks[0] if chunks else b""
        conn.upgrade(request, rest=first)
        chunks = chunks[1:]
    else:
        conn.data_received(HEAD)
    for chunk in chunks:
        conn.data_received(chunk)
    assert not transport.closed, server_frames(bytes(transport.written))
    frames = server_frames(bytes(transport.written))
    pongs = [("PING", bytes(f.data)) for f in frames if f.opcode is Opcode.PONG]
    conn.finish()
    return conn.events + pongs, conn


# Messages in order, then the pongs answered, in order.
EXPECTED = [e for e in EVENTS if e[0] != "PING"] + [e for e in EVENTS if e[0] == "PING"]


def test_unsplit_stream_gives_every_event() -> None:
    for via_upgrade in (False, True):
        events, _ = feed([STREAM], via_upgrade)
        assert events == EXPECTED


def test_every_two_way_split_parses_the_same() -> None:
    # Every offset of the stream, for both ways a connection starts.
    for via_upgrade in (False, True):
        for cut in range(1, len(STREAM)):
            events, _ = feed([STREAM[:cut], STREAM[cut:]], via_upgrade)
            assert events == EXPECTED, (via_upgrade, cut)


def test_byte_at_a_time_parses_the_same() -> None:
    head_end = len(STREAM) - 400  # the 64 KiB payload byte by byte adds nothing but time
    chunks = [STREAM[i : i + 1] for i in range(4000)] + [STREAM[4000:head_end]]
    chunks += [STREAM[i : i + 1] for i in range(head_end, len(STREAM))]
    events, _ = feed(chunks, via_upgrade=True)
    assert events == EXPECTED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=40), st.booleans())
def test_random_chunkings_parse_the_same(sizes: list[int], via_upgrade: bool) -> None:
    chunks, pos = [], 0
    for size in sizes:
        if pos >= len(STREAM):
            break
        chunks.append(STREAM[pos : pos + size])
        pos += size
    if pos < len(STREAM):
        chunks.append(STREAM[pos:])
    events, _ = feed(chunks, via_upgrade)
    assert events == EXPECTED


def test_an_idle_connection_keeps_no_frame_alive() -> None:
    # The leftovers are still freed: after a complete message the parser holds no frame.
    _, conn = feed([STREAM], via_upgrade=True)
    assert "frame" not in conn.ws.parser.gi_frame.f_locals  # type: ignore[union-attr]


def test_a_close_frame_still_closes() -> None:
    conn = Recording(node())
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(HEAD)
    data = masked(Opcode.CLOSE, Close(1000, "bye").serialize())
    for i in range(len(data)):
        conn.data_received(data[i : i + 1])
    closes = [f for f in server_frames(bytes(transport.written)) if f.opcode is Opcode.CLOSE]
    assert closes and Close.parse(closes[0].data).code == 1000
    conn.finish()


# -- end to end: honest clients over real TCP with random segment sizes -------------------------


async def _burst_in_segments(port: int, seed: int, count: int) -> list[Any]:
    """Join, send ``count`` acked broadcasts cut into random segments; the replies received."""
    rng = random.Random(seed)
    topic = f"realtime:seg-{seed}"  # a channel of its own: only its own replies come back
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(HEAD.replace(b"Host: localhost", f"Host: 127.0.0.1:{port}".encode()))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    join = orjson.dumps(["1", "1", topic, "phx_join", {"config": {"broadcast": {"ack": True}}}])
    out = masked(Opcode.TEXT, join)
    for i in range(count):
        msg = orjson.dumps(
            ["1", str(i + 2), topic, "broadcast", {"type": "broadcast", "event": "e", "payload": {}}]
        )
        out += masked(Opcode.TEXT, msg)
        if i % 7 == 3:
            out += masked(Opcode.PING, os.urandom(4))
    pos = 0
    while pos < len(out):
        size = rng.choice([1, 2, 3, 5, 8, 13, 40, 100])
        writer.write(out[pos : pos + size])
        await writer.drain()
        pos += size
        await asyncio.sleep(0.0005)
    replies: list[Any] = []
    buffer = b""
    deadline = loop.time() + 15
    while len(replies) < count + 1 and loop.time() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), max(0.1, deadline - loop.time()))
        except TimeoutError:
            break
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= 2:
            length = buffer[1] & 0x7F
            offset = 2
            if length == 126:
                length, offset = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                length, offset = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < offset + length:
                break
            opcode, payload = buffer[0] & 0x0F, buffer[offset : offset + length]
            buffer = buffer[offset + length :]
            assert opcode != 0x8, f"closed by the server: {payload!r}"
            if opcode == 0x1:
                message = orjson.loads(payload)
                if message[3] == "phx_reply":
                    replies.append(message)
    writer.close()
    return replies


def test_honest_clients_with_random_tcp_segments_are_never_cut(server: ServerProcess) -> None:
    async def main() -> list[list[Any]]:
        return await asyncio.gather(*(_burst_in_segments(server.port, seed, 50) for seed in range(8)))

    for replies in asyncio.run(main()):
        oks = [r for r in replies if r[4]["status"] == "ok"]
        assert len(oks) == 51  # the join and every acked broadcast
