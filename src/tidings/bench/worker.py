"""A load-generator process: thousands of :class:`ClientConn` on one uvloop event loop.

The coordinator (:mod:`tidings.bench.pool`) sends commands over a ``multiprocessing`` pipe; the
worker answers each and, every 250 ms, reports its counters for the live display. A worker binds
its sockets to its own loopback source addresses (past the ~28,000 ephemeral ports of one
address), raises its open-files limit and may be pinned to cores away from the server.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from ..limits import raise_open_files_limit
from .client import JOINED, ClientConn
from .wire import make_dialect, pg_binding

__all__ = ["RECOVERY_NOT_ASKED", "RECOVERY_NO_FLAG", "WorkerSpec", "run_loop", "worker_main"]

T = TypeVar("T")
# Join-log flags besides 0/1 (the reply's ``recovered``): no replay asked, or no flag in the reply.
RECOVERY_NOT_ASKED = -2
RECOVERY_NO_FLAG = -1
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
PROGRESS_EVERY = 0.25


def bench_token(idx: int) -> str:
    """The join token of client ``idx``: role ``authenticated``, sub ``bench-<idx>``. Unsigned in
    effect (a fixed key): bench servers run open, where claims are taken unverified."""
    import jwt

    return jwt.encode(
        {"role": "authenticated", "sub": f"bench-{idx}"},
        "tidings-bench-key-of-32-bytes-or-more",
        algorithm="HS256",
    )


class WorkerSpec:
    """What a worker needs to know at start."""

    def __init__(
        self,
        index: int,
        host: str,
        port: int,
        dialect: str,
        vsn: str,
        source_addrs: list[str],
        cpus: set[int] | None,
        heartbeat: float,
        connect_timeout: float,
    ) -> None:
        self.index = index
        self.host = host
        self.port = port
        self.dialect = dialect
        self.vsn = vsn
        self.source_addrs = source_addrs
        self.cpus = cpus
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout


class Session:
    """One joined stretch of a client: when it joined, when it ended, what it received."""

    __slots__ = ("closed", "joined", "ns")

    def __init__(self, joined: int) -> None:
        self.joined = joined
        self.closed = 0
        self.ns: array[int] = array("q")


class Worker:
    """Command loop and :class:`~tidings.bench.client.Sink` of one process."""

    def __init__(self, spec: WorkerSpec, pipe: Connection) -> None:
        self.spec = spec
        self.pipe = pipe
        self.loop = asyncio.get_running_loop()
        self.dialect = make_dialect(spec.dialect, spec.vsn)
        self.conns: dict[int, ClientConn] = {}
        self.topics: dict[int, str] = {}
        self.presence = False
        self.changes_table: str | None = None
        self.private = False  # join private channels (connect --private)
        self.distinct_claims = False  # each client joins with a token of its own (claims differ)
        self.pg_subscribed: set[int] = set()
        self.pg_errors = 0
        self.attempts = 0
        self.failed = 0
        self.joined_total = 0
        self.received = 0
        self.closed = 0
        self.errors: Counter[str] = Counter()
        self.join_lat: array[int] = array("q")
        self.join_start: array[int] = array("q")
        self.recording = False
        self.rec_sent: array[int] = array("q")
        self.rec_lat: array[int] = array("q")
        self.per_client: Counter[int] = Counter()
        self.track_n = False
        self.sessions: dict[int, list[Session]] = {}
        self.reconnect = False
        self.backoff_base = 1.0
        self.backoff_cap = 30.0
        self.tries: dict[int, int] = {}
        self.attempt_starts: dict[int, list[int]] = {}
        self.presence_expect = 0
        self.presence_keys: dict[int, set[str]] = {}
        self.presence_full: dict[int, int] = {}
        # meta.seq tracking and replay on rejoin (node-death): per client index.
        self.track_seq = False
        self.replay_limit = 0
        self.last_seq: dict[int, int] = {}
        self.first_rx: dict[int, dict[int, int]] = {}
        # (joined at, recovered flag, since_seq asked, seq in the reply) per join.
        self.join_log: dict[int, list[tuple[int, int, int, int]]] = {}
        self.retry_delays: dict[int, list[tuple[int, float]]] = {}
        self.dups = 0
        self.replayed = 0
        self._pending = 0
        self._done: asyncio.Future[None] | None = None
        self._queued: list[int] = []  # burst mode: clients not started yet, last one first
        self._src_i = 0
        self._hb_i = 0
        self._stop = asyncio.Event()

    # -- command loop -------------------------------------------------------------------------

    async def serve(self) -> None:
        self.loop.add_reader(self.pipe.fileno(), self._on_pipe)
        # uvloop (libuv) makes polled fds non-blocking; a big pickled reply must not fail half-sent.
        os.set_blocking(self.pipe.fileno(), True)
        ticker = self.loop.create_task(self._tick())
        await self._stop.wait()
        ticker.cancel()
        self.loop.remove_reader(self.pipe.fileno())
        for conn in list(self.conns.values()):
            conn.abort()
        await asyncio.sleep(0.05)

    def _on_pipe(self) -> None:
        try:
            while self.pipe.poll():
                msg = self.pipe.recv()
                self.loop.create_task(self._handle(msg))
        except (EOFError, OSError):
            self._stop.set()

    async def _handle(self, msg: dict[str, Any]) -> None:
        handler: Callable[..., Any] = getattr(self, "cmd_" + msg["cmd"])
        try:
            result = await handler(**msg.get("args", {}))
            reply = {"id": msg["id"], "result": result}
        except Exception as exc:  # reported to the coordinator, which fails the run
            reply = {"id": msg["id"], "error": f"{type(exc).__name__}: {exc}"}
        self.pipe.send(reply)

    async def _tick(self) -> None:
        """Progress reports, connect timeouts and staggered heartbeats."""
        last_sweep = 0.0
        hb_every = self.spec.heartbeat
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            self.pipe.send({"progress": self.counters()})
            now = time.monotonic()
            if now - last_sweep < 1.0:
                continue
            last_sweep = now
            limit = time.time_ns() - int(self.spec.connect_timeout * 1e9)
            for conn in [c for c in self.conns.values() if c.state < JOINED and c.t_start < limit]:
                conn.fail("timeout")
            if hb_every > 0 and self.conns:
                # One slice per second: every connection heartbeats once per ``hb_every`` s.
                slices = max(1, int(hb_every))
                conns = list(self.conns.values())
                for conn in conns[self._hb_i % slices :: slices]:
                    conn.heartbeat()
                self._hb_i += 1

    def counters(self) -> dict[str, int]:
        """Totals for the live display."""
        return {
            "attempts": self.attempts,
            "joined": sum(1 for c in self.conns.values() if c.state == JOINED),
            "joined_total": self.joined_total,
            "failed": self.failed,
            "received": self.received,
            "closed": self.closed,
            "presence_full": len(self.presence_full),
            "pg_subscribed": len(self.pg_subscribed),
            "pg_errors": self.pg_errors,
        }

    # -- commands -----------------------------------------------------------------------------

    async def cmd_open(
        self,
        clients: list[tuple[int, str]],
        rate: float,
        t0: float,
        timeout: float,
        presence: bool = False,
        changes_table: str | None = None,
        track_seq: bool = False,
        in_flight: int = 0,
        private: bool = False,
        distinct_claims: bool = False,
    ) -> dict[str, Any]:
        """Open ``clients`` (index, topic) at ``rate``/s from wall time ``t0``; wait for all.

        With ``in_flight`` > 0 (burst mode) ``rate`` is ignored: ``in_flight`` attempts are
        started at ``t0``, and each one that ends (joined or failed) starts the next client.

        With ``changes_table``, client ``idx`` also binds to Postgres Changes of row ``id = idx``.
        With ``track_seq``, clients follow ``meta.seq`` (see :meth:`on_seq`). ``private`` joins
        private channels; ``distinct_claims`` gives each join a token of its own (see
        :func:`bench_token`), so no two share a cached permission check.
        """
        self.presence = presence
        self.private = private
        self.distinct_claims = distinct_claims
        self.changes_table = changes_table
        self.track_seq = track_seq
        self._pending = len(clients)
        self._done = self.loop.create_future()
        if not clients:
            return self.cmd_open_result()
        base = self.loop.time() + (t0 - time.time())
        if in_flight > 0:
            for idx, topic in clients:
                self.topics[idx] = topic
            self._queued = [idx for idx, _ in reversed(clients)]
            for _ in range(min(in_flight, len(clients))):
                self.loop.call_at(base, self._start_queued)
        else:
            for k, (idx, topic) in enumerate(clients):
                self.topics[idx] = topic
                self.loop.call_at(base + k / rate, self.start_client, idx)
        try:
            await asyncio.wait_for(asyncio.shield(self._done), timeout)
        except TimeoutError:
            pass
        return self.cmd_open_result()

    def cmd_open_result(self) -> dict[str, Any]:
        lat, self.join_lat = self.join_lat, array("q")
        start, self.join_start = self.join_start, array("q")
        return {
            "join_lat_ns": lat,
            "join_start_ns": start,
            "errors": dict(self.errors),
            "counters": self.counters(),
        }

    async def cmd_record(self, on: bool, track_n: bool = False) -> dict[str, int]:
        """Start (and reset) or stop recording bench deliveries."""
        if on:
            self.rec_sent, self.rec_lat = array("q"), array("q")
            self.per_client = Counter()
            self.received = 0
            self.first_rx = {}
            self.dups = self.replayed = 0
            self.track_n = track_n
            if track_n:
                self.sessions = {
                    idx: [Session(c.t_joined)] for idx, c in self.conns.items() if c.state == JOINED
                }
        self.recording = on
        return self.counters()

    async def cmd_collect(self) -> dict[str, Any]:
        """Everything recorded, for the report."""
        sessions = {idx: [(s.joined, s.closed, s.ns) for s in ss] for idx, ss in self.sessions.items() if ss}
        joined_clients = [idx for idx, c in self.conns.items() if c.state == JOINED]
        return {
            "rec_sent": self.rec_sent,
            "rec_lat": self.rec_lat,
            "per_client": dict(self.per_client),
            "joined_clients": joined_clients,
            "sessions": sessions,
            "attempt_starts": self.attempt_starts,
            "tries": self.tries,
            "presence_full": self.presence_full,
            "first_rx": {idx: (list(got), list(got.values())) for idx, got in self.first_rx.items()},
            "join_log": self.join_log,
            "retry_delays": self.retry_delays,
            "dups": self.dups,
            "replayed": self.replayed,
            "errors": dict(self.errors),
            "counters": self.counters(),
        }

    async def cmd_reconnect(
        self, enabled: bool, base: float = 1.0, cap: float = 30.0, replay_limit: int = 0
    ) -> None:
        """Reconnect closed clients with jittered exponential backoff (as the SDKs do).

        With ``replay_limit`` > 0 a rejoin asks for ``replay: {since_seq: <last meta.seq>, limit}``.
        """
        self.reconnect, self.backoff_base, self.backoff_cap = enabled, base, cap
        self.replay_limit = replay_limit

    async def cmd_presence_expect(self, n: int) -> None:
        """Record when each member first sees ``n`` presence keys."""
        self.presence_expect = n
        self.presence_full = {}

    async def cmd_close_all(self) -> None:
        """Close every connection politely."""
        self.reconnect = False
        for conn in list(self.conns.values()):
            conn.close()
        await asyncio.sleep(0.2)

    async def cmd_exit(self) -> None:
        """Stop the worker."""
        self.loop.call_later(0.05, self._stop.set)

    # -- connecting ---------------------------------------------------------------------------

    def start_client(self, idx: int) -> None:
        """Begin one connection attempt of client ``idx``."""
        spec = self.spec
        key = f"u{idx}" if self.presence else None
        changes = [pg_binding(self.changes_table, idx)] if self.changes_table else None
        replay = None
        if self.replay_limit > 0 and idx in self.last_seq:
            # A rejoin: everything after the last sequence number this client saw on its channel.
            replay = {"since_seq": self.last_seq[idx], "limit": self.replay_limit}
        conn = ClientConn(
            self,
            self.dialect,
            idx,
            self.topics[idx],
            spec.host,
            spec.port,
            key,
            changes,
            replay,
            self.track_seq,
            self.private,
            bench_token(idx) if self.distinct_claims else None,
        )
        self.conns[idx] = conn
        self.attempts += 1
        if self.reconnect or idx in self.tries:
            self.attempt_starts.setdefault(idx, []).append(conn.t_start)
        self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: ClientConn) -> None:
        addrs = self.spec.source_addrs
        src = addrs[self._src_i % len(addrs)]
        self._src_i += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # Pick the port at connect() time from the 4-tuple, not at bind() from the address.
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src, 0))
            await asyncio.wait_for(
                self.loop.sock_connect(sock, (self.spec.host, self.spec.port)), self.spec.connect_timeout
            )
            await self.loop.create_connection(lambda: conn, sock=sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            name = type(exc).__name__ if isinstance(exc, TimeoutError) else _errname(exc)
            conn.fail(f"connect-{name}")

    def _start_queued(self) -> None:
        if self._queued:
            self.start_client(self._queued.pop())

    def _finish_one(self) -> None:
        self._pending -= 1
        if self._queued:
            self._start_queued()  # burst mode: one ended, the next one starts
        if self._pending <= 0 and self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _schedule_retry(self, idx: int) -> None:
        tries = self.tries.get(idx, 0) + 1
        self.tries[idx] = tries
        delay = min(self.backoff_base * 2 ** (tries - 1), self.backoff_cap) * random.uniform(0.75, 1.25)
        self.retry_delays.setdefault(idx, []).append((time.time_ns(), delay))
        self.loop.call_later(delay, self.start_client, idx)

    # -- Sink ---------------------------------------------------------------------------------

    def on_joined(self, conn: ClientConn) -> None:
        self.joined_total += 1
        self.join_lat.append(conn.t_joined - conn.t_start)
        self.join_start.append(conn.t_start)
        if self.track_n or self.reconnect:
            self.sessions.setdefault(conn.idx, []).append(Session(conn.t_joined))
        if self.track_seq:
            resp = conn.join_response if isinstance(conn.join_response, dict) else {}
            if conn.idx not in self.last_seq:
                # First join: the reply's seq (the channel's newest) is where this client starts.
                seq = resp.get("seq")
                self.last_seq[conn.idx] = seq if isinstance(seq, int) else 0
            flag = RECOVERY_NOT_ASKED
            if conn.replay is not None:
                got = resp.get("recovered")
                flag = RECOVERY_NO_FLAG if not isinstance(got, bool) else int(got)
            since = conn.replay["since_seq"] if conn.replay is not None else -1
            reply_seq = resp.get("seq")
            self.join_log.setdefault(conn.idx, []).append(
                (conn.t_joined, flag, since, reply_seq if isinstance(reply_seq, int) else -1)
            )
        self._finish_one()

    def on_bench(self, conn: ClientConn, t: int, n: int) -> None:
        self.received += 1
        if self.recording:
            now = time.time_ns()
            self.rec_sent.append(t)
            self.rec_lat.append(now - t)
            self.per_client[conn.idx] += 1
            if self.track_n:
                ss = self.sessions.get(conn.idx)
                if ss:
                    ss[-1].ns.append(n)

    def on_seq(self, conn: ClientConn, t: int, n: int, seq: int, replayed: bool) -> None:
        """A bench broadcast with ``meta.seq``: follow the channel's seq, count each ``n`` once."""
        idx = conn.idx
        if seq > self.last_seq.get(idx, -1):
            self.last_seq[idx] = seq
        if replayed:
            self.replayed += 1
        got = self.first_rx.get(idx)
        if got is None:
            got = self.first_rx[idx] = {}
        if n in got:
            self.dups += 1  # already had it (replayed and live, or replayed twice)
            return
        got[n] = time.time_ns()
        self.on_bench(conn, t, n)

    def on_presence(self, conn: ClientConn, event: str, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        keys = self.presence_keys.setdefault(conn.idx, set())
        if event == "presence_state":
            keys.update(payload)
        else:
            keys.update(payload.get("joins") or ())
            keys.difference_update(payload.get("leaves") or ())
        if self.presence_expect and len(keys) >= self.presence_expect and conn.idx not in self.presence_full:
            self.presence_full[conn.idx] = time.time_ns()

    def on_system(self, conn: ClientConn, payload: Any) -> None:
        if isinstance(payload, dict) and payload.get("extension") == "postgres_changes":
            if payload.get("status") == "ok":
                self.pg_subscribed.add(conn.idx)
            else:
                self.pg_errors += 1

    def on_failed(self, conn: ClientConn, kind: str) -> None:
        if self.conns.get(conn.idx) is not conn:
            return
        self.failed += 1
        self.errors[kind] += 1
        if self.reconnect:
            self._schedule_retry(conn.idx)
        else:
            self._finish_one()

    def on_closed(self, conn: ClientConn) -> None:
        if self.conns.get(conn.idx) is not conn:
            return
        self.closed += 1
        ss = self.sessions.get(conn.idx)
        if ss and not ss[-1].closed:
            ss[-1].closed = time.time_ns()
        if self.reconnect:
            self.tries[conn.idx] = 0
            self._schedule_retry(conn.idx)


def _errname(exc: OSError) -> str:
    import errno

    return errno.errorcode.get(exc.errno or 0, "OSError")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed (it is a dependency on Linux)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main)
    return uvloop.run(main)


def worker_main(spec: WorkerSpec, pipe: Connection) -> None:
    """Entry point of a worker process."""
    raise_open_files_limit()
    if spec.cpus:
        try:
            os.sched_setaffinity(0, spec.cpus)
        except OSError:
            pass

    async def main() -> None:
        await Worker(spec, pipe).serve()

    run_loop(main())
