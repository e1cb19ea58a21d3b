"""What sends bench messages: a WebSocket publisher and pluggable update sources.

An :class:`UpdateSource` delivers one update to a channel by some route (today the REST broadcast
API; a PostgreSQL ``UPDATE`` source plugs in here once Postgres Changes land). Every source puts a
bench payload (``"t"`` send time first, ``"n"`` counter second) into what it sends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from .client import JOINED, ClientConn
from .wire import Dialect, bench_payload

__all__ = ["SOURCES", "PublishRecord", "RestBroadcastSource", "UpdateSource", "WsPublisher"]


class WsPublisher:
    """One joined connection that broadcasts bench payloads on a topic (a :class:`Sink` too)."""

    def __init__(self, dialect: Dialect, host: str, port: int, topic: str) -> None:
        self.conn = ClientConn(self, dialect, -1, topic, host, port)
        self.host, self.port = host, port
        self._joined: asyncio.Future[None] | None = None
        self.sent = 0

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect and join; raises ``RuntimeError`` if that fails."""
        loop = asyncio.get_running_loop()
        self._joined = loop.create_future()
        await loop.create_connection(lambda: self.conn, self.host, self.port)
        await asyncio.wait_for(self._joined, timeout)

    def publish(self, size: int) -> None:
        """Broadcast one bench payload of about ``size`` bytes."""
        self.sent += 1
        self.conn.publish(bench_payload(self.sent, size))

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    # Sink
    def on_joined(self, conn: ClientConn) -> None:
        if self._joined is not None and not self._joined.done():
            self._joined.set_result(None)

    def on_bench(self, conn: ClientConn, t: int, n: int) -> None:
        pass

    def on_presence(self, conn: ClientConn, event: str, payload: Any) -> None:
        pass

    def on_failed(self, conn: ClientConn, kind: str) -> None:
        if self._joined is not None and not self._joined.done():
            self._joined.set_exception(RuntimeError(f"publisher failed: {kind}"))

    def on_closed(self, conn: ClientConn) -> None:
        pass

    @property
    def joined(self) -> bool:
        """Whether the publisher is joined."""
        return self.conn.state == JOINED


class PublishRecord:
    """One update as the sender saw it: channel, counter, request start/end, accepted or not."""

    __slots__ = ("accepted", "channel", "end", "n", "start")

    def __init__(self, channel: str, n: int, start: int) -> None:
        self.channel = channel
        self.n = n
        self.start = start
        self.end = 0
        self.accepted = False


class UpdateSource:
    """Sends one update to a sub-topic; subclasses choose the route."""

    name = "base"

    async def start(self) -> None:
        """Prepare (connect pools and the like)."""

    async def send(self, channel: str, n: int, size: int) -> PublishRecord:
        """Send update ``n`` to ``channel``; returns the record (``accepted`` set on success)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release resources."""


class _HttpConn:
    """A minimal HTTP/1.1 keep-alive connection (enough for ``POST`` and a small response)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, timeout: float) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), timeout
            )
        assert self.reader is not None and self.writer is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"apikey: bench\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(raw[9:12])
        length = 0
        for line in raw.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return status

    def reset(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class RestBroadcastSource(UpdateSource):
    """``POST /api/broadcast`` (one message per request) over a few keep-alive connections."""

    name = "rest"

    def __init__(self, host: str, port: int, concurrency: int = 8, timeout: float = 2.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._free: asyncio.Queue[_HttpConn] = asyncio.Queue()
        for _ in range(concurrency):
            self._free.put_nowait(_HttpConn(host, port))

    async def send(self, channel: str, n: int, size: int) -> PublishRecord:
        conn = await self._free.get()
        rec = PublishRecord(channel, n, time.time_ns())
        try:
            payload = bench_payload(n, size)
            body = b'{"messages":[{"topic":%s,"event":"bench","payload":%s}]}' % (
                orjson.dumps(channel),
                payload,
            )
            status = await conn.post("/api/broadcast", body, self.timeout)
            rec.accepted = status == 202
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            conn.reset()
        finally:
            rec.end = time.time_ns()
            self._free.put_nowait(conn)
        return rec

    async def close(self) -> None:
        while not self._free.empty():
            self._free.get_nowait().reset()


# Registry of update routes for ``order-status`` (``--source``); a Postgres source is added later.
SOURCES: dict[str, Callable[[str, int], UpdateSource]] = {
    "rest": lambda host, port: RestBroadcastSource(host, port),
}
