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
