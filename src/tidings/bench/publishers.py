"""What sends bench messages: a WebSocket publisher and pluggable update sources.

An :class:`UpdateSource` delivers one update to a channel by some route: the REST broadcast API
(``rest``) or a SQL ``UPDATE`` of the channel's row that Tidings streams as Postgres Changes
(``postgres``). Every source carries a send time ``t`` (``time.time_ns()``) and a per-channel
counter ``n`` in what it sends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

from .client import JOINED, ClientConn
from .wire import Dialect, bench_payload

__all__ = [
    "ORDERS_TABLE",
    "SOURCES",
    "PostgresUpdateSource",
    "PublishRecord",
    "RestBroadcastSource",
    "SourceOptions",
    "UpdateSource",
    "WsPublisher",
    "drop_slot",
]

ORDERS_TABLE = "orders"


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

    def on_seq(self, conn: ClientConn, t: int, n: int, seq: int, replayed: bool) -> None:
        pass

    def on_presence(self, conn: ClientConn, event: str, payload: Any) -> None:
        pass

    def on_system(self, conn: ClientConn, payload: Any) -> None:
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


def _order_id(channel: str) -> int:
    """Row id of an ``order-<id>`` channel."""
    return int(channel.rsplit("-", 1)[1])


class PostgresUpdateSource(UpdateSource):
    """``UPDATE orders SET t = <time_ns>, n = <n>, p = <pad> WHERE id = <order>`` per update.

    Each statement commits on its own (autocommit) on one of ``concurrency`` psycopg2 connections,
    each owned by one thread. :meth:`start` creates the table if it is missing (``id bigint`` key,
    ``t``/``n`` bigint, ``p`` text; ``REPLICA IDENTITY DEFAULT``), inserts rows ``0 .. rows-1`` and
    makes sure the publication streams it. ``t`` is taken right before the statement is sent.
    """

    name = "postgres"

    def __init__(
        self, dsn: str, rows: int, publication: str = "supabase_realtime", concurrency: int = 4
    ) -> None:
        self.dsn = dsn
        self.rows = rows
        self.publication = publication
        self.concurrency = concurrency
        self._local = threading.local()
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="bench-pg")

    def _connect(self) -> Any:
        import psycopg2

        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        return conn

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._lock:
                self._conns.append(conn)
        return conn

    def _setup(self) -> None:
        import psycopg2

        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {ORDERS_TABLE} "
                    "(id bigint PRIMARY KEY, t bigint NOT NULL DEFAULT 0, n bigint NOT NULL DEFAULT 0, "
                    "p text)"
                )
                for col in ("t bigint NOT NULL DEFAULT 0", "n bigint NOT NULL DEFAULT 0", "p text"):
                    cur.execute(f"ALTER TABLE {ORDERS_TABLE} ADD COLUMN IF NOT EXISTS {col}")
                cur.execute(f"ALTER TABLE {ORDERS_TABLE} REPLICA IDENTITY DEFAULT")
                # Subscribers read as their JWT role (anon in open mode): where the API roles
                # exist, give them what a Supabase project's default privileges give.
                cur.execute(
                    "SELECT string_agg(quote_ident(rolname), ', ') FROM pg_roles "
                    "WHERE rolname IN ('anon', 'authenticated')"
                )
                roles = cur.fetchone()[0]
                if roles:
                    cur.execute(f"GRANT SELECT ON {ORDERS_TABLE} TO {roles}")
                cur.execute(
                    f"INSERT INTO {ORDERS_TABLE} (id) SELECT g FROM generate_series(0, %s) g "
                    "ON CONFLICT (id) DO NOTHING",
                    (self.rows - 1,),
                )
                cur.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", (self.publication,))
                row = cur.fetchone()
                try:
                    if row is None:
                        cur.execute(f'CREATE PUBLICATION "{self.publication}" FOR ALL TABLES')
                    elif not row[0]:
                        cur.execute(
                            "SELECT 1 FROM pg_publication_tables WHERE pubname = %s "
                            "AND schemaname = 'public' AND tablename = %s",
                            (self.publication, ORDERS_TABLE),
                        )
                        if cur.fetchone() is None:
                            cur.execute(f'ALTER PUBLICATION "{self.publication}" ADD TABLE {ORDERS_TABLE}')
                except psycopg2.errors.DuplicateObject:
                    pass  # the server created it meanwhile
        finally:
            conn.close()

    async def start(self) -> None:
        await asyncio.to_thread(self._setup)

    def _update(self, rec: PublishRecord, order: int, size: int) -> None:
        conn = self._conn()
        pad = "x" * max(0, size - 40)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"UPDATE {ORDERS_TABLE} SET t = %s, n = %s, p = %s WHERE id = %s",
                    (time.time_ns(), rec.n, pad, order),
                )
                rec.accepted = cur.rowcount == 1
        except Exception:
            self._local.conn = None
            try:
                conn.close()
            except Exception:
                pass
        rec.end = time.time_ns()

    async def send(self, channel: str, n: int, size: int) -> PublishRecord:
        # ``start`` is when the update was due: queueing for a free connection counts in the request time.
        rec = PublishRecord(channel, n, time.time_ns())
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self._update, rec, _order_id(channel), size
        )
        return rec

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, True)
        with self._lock:
            for conn in self._conns:
                try:
                    conn.close()
                except Exception:
                    pass
            self._conns.clear()


def drop_slot(dsn: str, slot: str) -> None:
    """Drop the replication slot a bench server used (no error if it is gone)."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s AND NOT active",
                (slot,),
            )
    finally:
        conn.close()


BENCH_POLICY = "tidings bench connect: read connect-*"
"""The row level security policy ``connect --private --database-url`` creates for its joins."""
BENCH_CHANNEL_POLICY = (
    '[{"topic": "connect-*", "roles": ["anon", "authenticated"], "read": true, "write": true}]'
)
"""The ``CHANNEL_POLICY`` of a ``connect --private`` server without a database."""


def bench_policy(dsn: str, create: bool) -> None:
    """Create (or drop) :data:`BENCH_POLICY` on ``realtime.messages``: anon and authenticated may
    read the bench's ``connect-*`` topics, so every private join runs Supabase's read check."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP POLICY IF EXISTS "{BENCH_POLICY}" ON realtime.messages')
            if create:
                cur.execute(
                    f'CREATE POLICY "{BENCH_POLICY}" ON realtime.messages FOR SELECT TO anon, authenticated '
                    "USING ((SELECT realtime.topic()) LIKE 'connect-%%')"
                )
    finally:
        conn.close()


@dataclasses.dataclass
class SourceOptions:
    """What an update source may need: the server's address, and for ``postgres`` the database."""

    host: str
    port: int
    database_url: str | None = None
    rows: int = 0
    publication: str = "supabase_realtime"


def _postgres_source(o: SourceOptions) -> UpdateSource:
    if not o.database_url:
        raise ValueError("--source postgres needs --database-url")
    return PostgresUpdateSource(o.database_url, o.rows, o.publication)


# Registry of update routes for ``order-status`` (``--source``).
SOURCES: dict[str, Callable[[SourceOptions], UpdateSource]] = {
    "rest": lambda o: RestBroadcastSource(o.host, o.port),
    "postgres": _postgres_source,
}
