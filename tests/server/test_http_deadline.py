"""A TCP connection that never sends its request head is closed, not kept forever."""

from __future__ import annotations

import asyncio

from tests.support.server import ServerProcess
from tidings.server import http_protocol


async def test_silent_connection_is_closed(server: ServerProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), http_protocol.REQUEST_HEAD_TIMEOUT + 10)
    assert data == b""  # closed by the server
    writer.close()


async def test_a_complete_request_is_not_cut(server: ServerProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_frames_sent_with_the_upgrade_request_are_not_lost(server: ServerProcess) -> None:
    import base64
    import json
    import os

    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    msg = json.dumps([None, "1", "phoenix", "heartbeat", {}]).encode()
    mask = os.urandom(4)
    frame = bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg))
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        "GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: x\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    writer.write(head.encode() + frame)  # one packet: the request and a heartbeat behind it
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert response.startswith(b"HTTP/1.1 101")
    reply = await asyncio.wait_for(reader.readexactly(2), 5)
    body = await asyncio.wait_for(reader.readexactly(reply[1]), 5)
    assert json.loads(body) == [None, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}]
    writer.close()


async def test_upgrade_with_another_method_is_refused(server: ServerProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /socket/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert response.startswith(b"HTTP/1.1 405")
    writer.close()
