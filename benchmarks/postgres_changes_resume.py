"""Recovery of Postgres Changes at rejoin: missed updates and time to caught-up (issue 16).

The order page in miniature: ``--clients`` WebSocket clients, each following its own order
(``orders``, ``id=eq.<k>``) with ``postgres_changes_options.resume``. All connections are dropped;
``--updates`` updates commit at ``--rate`` per second, spread over the orders; then every client
rejoins at once with the position of the last change it got. Measured per client: the updates of
its order it got (replayed or live) against those committed, and the time from its reconnect
(after a backoff drawn from ``--spread`` seconds) to its ``system`` message (the replay delivered:
caught up), which includes the WebSocket handshake.

Runs a real server (``python -m tidings serve``) against a throwaway PostgreSQL
(``tests/support/postgres.py``), with the memory broker or ``--redis`` (a throwaway redis-server).
From the repo root::

    .venv/bin/python benchmarks/postgres_changes_resume.py \
        [--clients 1000] [--updates 5000] [--rate 1000] [--redis]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2
from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer
from tests.support.server import ServerProcess
from websockets.asyncio.client import connect


class Page:
    """One order page: its position, the updates it applied (by total), and its rejoin timing."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.position = ""
        self.epoch: str | None = None
        self.got: list[int] = []
        self.sent_at = 0.0
        self.caught_up_at = 0.0
        self.recovered: bool | None = None
        self.ws: Any = None
        self.ready = asyncio.Event()

    def join(self, resume: Any) -> str:
        binding = {"event": "UPDATE", "schema": "public", "table": "orders", "filter": f"id=eq.{self.order}"}
        config = {"postgres_changes": [binding], "postgres_changes_options": {"resume": resume}}
        return json.dumps(["1", "1", f"realtime:order:{self.order}", "phx_join", {"config": config}])

    async def run(self, url: str, resume: Any, delay: float = 0.0) -> None:
        self.ready.clear()
        await asyncio.sleep(delay)  # its reconnect backoff
        self.sent_at = time.perf_counter()
        async with connect(url, open_timeout=60, max_size=None, ping_interval=None) as ws:
            self.ws = ws
            await ws.send(self.join(resume))
            async for raw in ws:
                msg = json.loads(raw)
                event, payload = msg[3], msg[4]
                if event == "postgres_changes":
                    data = payload["data"]
                    if data["position"] > self.position:
                        self.position = data["position"]
                        self.got.append(int(data["record"]["total"]))
                elif event == "system" and payload.get("extension") == "postgres_changes":
                    self.caught_up_at = time.perf_counter()
                    self.recovered = payload.get("recovered")
                    self.epoch = payload.get("epoch") or self.epoch
                    if payload.get("position", "") > self.position:
                        self.position = payload["position"]
                    self.ready.set()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime, stime in clock ticks (100/s)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> None:
    pg = PostgresServer({"max_connections": "100"}).start()
    redis = RedisServer().start() if args.redis else None
    server: ServerProcess | None = None
    try:
        dsn = pg.create_database()
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE orders (id int8 PRIMARY KEY, total int8 NOT NULL DEFAULT 0)")
            cur.execute("INSERT INTO orders (id) SELECT g FROM generate_series(1, %s) g", (args.clients,))
        env = {
            "DATABASE_URL": dsn,
            "DB_SLOT": "tidings_bench_resume",
            "DB_RESUME_GRACE": "0",
            "MAX_CONNECTIONS_PER_IP": str(args.clients * 3),
            "MAX_ANONYMOUS_CONNECTIONS_PER_IP": str(args.clients * 3),
            "MAX_JOINS_PER_SECOND": str(args.clients * 2),
            "MAX_CONNECTIONS": str(args.clients * 2),
            "LOG_LEVEL": "warning",
        }
        if redis is not None:
            env["REDIS_URL"] = redis.url
        server = ServerProcess(env=env).start()
        url = f"ws://127.0.0.1:{server.port}/realtime/v1/websocket?vsn=2.0.0"
        pages = [Page(k) for k in range(1, args.clients + 1)]
        joined = time.perf_counter()
        tasks = [asyncio.ensure_future(p.run(url, True)) for p in pages]
        await asyncio.wait_for(asyncio.gather(*(p.ready.wait() for p in pages)), 300)
        joined = time.perf_counter() - joined
        for p in pages:  # the cut
            await p.ws.close()
        await asyncio.gather(*tasks, return_exceptions=True)

        def write() -> None:
            conn = psycopg2.connect(dsn)
            conn.autocommit = True
            start = time.perf_counter()
            with conn.cursor() as cur:
                for i in range(args.updates):
                    cur.execute("UPDATE orders SET total = %s WHERE id = %s", (i + 1, i % args.clients + 1))
                    behind = start + (i + 1) / args.rate - time.perf_counter()
                    if behind > 0:
                        time.sleep(behind)
            conn.close()

        t0 = time.perf_counter()
        writer = threading.Thread(target=write)
        writer.start()
        await asyncio.to_thread(writer.join)
        wrote = time.perf_counter() - t0
        committed: dict[int, list[int]] = {}
        for i in range(args.updates):
            committed.setdefault(i % args.clients + 1, []).append(i + 1)
        await asyncio.sleep(args.settle)  # the stream delivers (and logs) the last updates
        cpu_before = cpu_seconds(server.proc.pid), time.process_time()
        rejoin_started = time.perf_counter()
        spread = random.Random(7)
        tasks = [
            asyncio.ensure_future(
                p.run(url, {"since": p.position, "epoch": p.epoch}, spread.uniform(0, args.spread))
            )
            for p in pages
        ]
        await asyncio.wait_for(asyncio.gather(*(p.ready.wait() for p in pages)), 300)
        rejoin_wall = time.perf_counter() - rejoin_started
        server_cpu = cpu_seconds(server.proc.pid) - cpu_before[0]
        bench_cpu = time.process_time() - cpu_before[1]
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline and any(p.got != committed.get(p.order, []) for p in pages):
            await asyncio.sleep(0.1)
        for p in pages:
            await p.ws.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        missed = sum(len(set(committed.get(p.order, [])) - set(p.got)) for p in pages)
        repeated = sum(len(p.got) - len(set(p.got)) for p in pages)
        caught_up = [(p.caught_up_at - p.sent_at) * 1000 for p in pages]
        broker = "redis" if redis is not None else "memory"
        print(
            f"broker {broker}: {args.clients} clients rejoining over {args.spread:.0f} s, "
            f"{args.updates} updates in {wrote:.1f} s while away; "
            f"missed {missed}, repeated {repeated}, recovered: true for "
            f"{sum(p.recovered is True for p in pages)}/{len(pages)}; rejoin -> caught up: "
            f"p50 {statistics.median(caught_up):.0f} ms, p99 {pct(caught_up, 0.99):.0f} ms, "
            f"max {max(caught_up):.0f} ms (the first joins, all at once: {joined:.1f} s); the rejoins took "
            f"{rejoin_wall:.1f} s, server CPU {server_cpu:.1f} s, load generator CPU {bench_cpu:.1f} s"
        )
    finally:
        if server is not None:
            server.stop()
        if redis is not None:
            redis.cleanup()
        pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds between the last update and the rejoins"
    )
    parser.add_argument(
        "--spread", type=float, default=0.0, help="rejoins spread over this many seconds (backoff)"
    )
    parser.add_argument("--redis", action="store_true")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
