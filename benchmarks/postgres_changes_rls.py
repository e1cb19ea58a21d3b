"""What DB_RLS costs Postgres Changes: commit -> delivery with checks on and off (docs/postgres-changes.md).

Runs ``PostgresChanges`` in this process against a throwaway PostgreSQL (``tests/support/postgres.py``:
``wal_level=logical``, ``fsync=off``, synchronous commit) and times from right before the writing
statement (so including its commit) until the last subscriber's ``deliver`` call. Nothing goes over
WebSocket: this is the change feed's own cost. Run from the repo root::

    .venv/bin/python benchmarks/postgres_changes_rls.py [--subscribers 100] [--repeat 20]

Tables: ``plain`` (no row level security) and ``notes`` (row level security, the policy of
docs/postgres-changes.md: ``owner = claims->>'sub'``). Every subscriber has its own claims (its own
``sub``), as users do, and binds to both tables without a filter.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2
from tests.support.postgres import PostgresServer

from tidings.cdc.service import PostgresChanges

SCHEMA = """
DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE TABLE notes (id int8 PRIMARY KEY, owner text NOT NULL, body text);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON notes FOR SELECT TO authenticated
    USING (owner = (current_setting('request.jwt.claims', true)::json->>'sub'));
GRANT SELECT ON notes TO authenticated;
CREATE TABLE plain (id int8 PRIMARY KEY, owner text NOT NULL, body text);
GRANT SELECT ON plain TO authenticated;
"""


class Clock:
    """Counts deliveries per row id and wakes the waiter once the expected number arrived."""

    def __init__(self) -> None:
        self.expected = 0
        self.got = 0
        self.done = threading.Event()
        self.last = 0.0
        self.first: dict[Any, float] = {}

    def arm(self, expected: int) -> None:
        self.expected, self.got, self.last = expected, 0, 0.0
        self.first.clear()
        self.done.clear()

    def __call__(self, matches: dict[Hashable, list[int]], data: dict[str, Any], change_id: str) -> None:
        now = time.perf_counter()
        record = data.get("record")
        if isinstance(record, dict):
            self.first.setdefault(record.get("id"), now)
        self.got += len(matches)
        self.last = now
        if self.got >= self.expected:
            self.done.set()


def run_sql(conn: Any, sql: str, params: Any = None) -> float:
    """Execute (autocommit) and return the time right before it was sent."""
    start = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute(sql, params)
    return start


def steady_writer(
    w: int, dsn: str, table: str, rate: int, rows: int, first_id: int, owners: int, sent: dict[int, float]
) -> None:
    """Writer *w* of 4: *rows* autocommit INSERTs at rate/4 per second; records each send time."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    interval = 4 / rate
    due = time.perf_counter()
    try:
        with conn.cursor() as cur:
            for i in range(rows):
                due += interval
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                row = first_id + w * rows + i
                t = time.perf_counter()
                cur.execute(f"INSERT INTO {table} VALUES (%s, %s, 'x')", (row, f"user{row % owners}"))
                sent[row] = t  # one dict, distinct keys: safe under the GIL
    finally:
        conn.close()


async def measure(
    server: PostgresServer,
    *,
    rls: bool,
    subscribers: int,
    repeat: int,
    big_rows: int,
    stream_rows: int,
    stream_rates: list[int],
) -> dict[str, Any]:
    dbname = f"rls_{'on' if rls else 'off'}"
    server.execute(f"CREATE DATABASE {dbname}")
    server.execute(SCHEMA, dbname=dbname)
    clock = Clock()
    pc = PostgresChanges(server.dsn(dbname), slot=f"bench_{dbname}", deliver=clock, rls=rls)
    await pc.start()
    bindings = [(1, {"event": "*", "schema": "public", "table": "notes"}),
                (2, {"event": "*", "schema": "public", "table": "plain"})]  # fmt: skip
    for n in range(subscribers):
        await pc.subscribe(n, bindings, {"role": "authenticated", "sub": f"user{n}", "exp": 2_000_000_000})
    conn = server.connect(dbname)
    out: dict[str, Any] = {}
    next_id = 1

    async def timed(sql: str, params: Any, expected: int) -> float:
        clock.arm(expected)
        start = await asyncio.to_thread(run_sql, conn, sql, params)
        while not clock.done.is_set():
            await asyncio.sleep(0.0005)
        return (clock.last - start) * 1000

    for table in ("plain", "notes"):
        # One row, owned by subscriber 0: with checks it reaches 1 subscriber (notes), else all.
        reach = 1 if (rls and table == "notes") else subscribers
        times = []
        for _ in range(repeat):
            times.append(await timed(f"INSERT INTO {table} VALUES (%s, 'user0', 'x')", (next_id,), reach))
            next_id += 1
        out[f"one INSERT into {table} (ms, median / max)"] = (statistics.median(times), max(times))
        # One transaction of big_rows rows, spread over all owners.
        reach_big = big_rows if (rls and table == "notes") else big_rows * subscribers
        ms = await timed(
            f"INSERT INTO {table} SELECT g, 'user' || (g %% %s), 'x' FROM generate_series(%s, %s) g",
            (subscribers, next_id, next_id + big_rows - 1),
            reach_big,
        )
        next_id += big_rows
        out[f"{big_rows:,}-row INSERT into {table} (ms to the last delivery)"] = ms
    # Streams of single-row autocommit INSERTs, from 4 writers at a steady rate (open loop):
    # per-change latency from its statement to its first delivery, p50 / p99.
    for table, rate in [(t, r) for r in stream_rates for t in ("plain", "notes")]:
        sent: dict[int, float] = {}
        per_writer = stream_rows // 4
        first_id = next_id
        next_id += per_writer * 4
        args = (server.dsn(dbname), table, rate, per_writer, first_id, subscribers, sent)
        clock.arm(per_writer * 4 * (1 if (rls and table == "notes") else subscribers))
        began = time.perf_counter()
        await asyncio.gather(*(asyncio.to_thread(steady_writer, w, *args) for w in range(4)))
        committed = time.perf_counter() - began
        while not clock.done.is_set():
            await asyncio.sleep(0.001)
        lat = sorted((clock.first[row] - t) * 1000 for row, t in sent.items())
        achieved = per_writer * 4 / committed
        name = f"{per_writer * 4:,} single-row INSERTs into {table} at {rate}/s (achieved {achieved:,.0f}/s)"
        out[name] = (lat[len(lat) // 2], lat[int(len(lat) * 0.99)])
    out["checks (transactions)"] = pc.rls_queries
    out["re-checks (commit not yet visible)"] = pc.rls_rechecks
    conn.close()
    await pc.stop()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--big-rows", type=int, default=10_000)
    parser.add_argument("--stream-rows", type=int, default=2_000)
    parser.add_argument("--stream-rates", default="200,1000", help="INSERTs per second, comma-separated")
    args = parser.parse_args()
    server = PostgresServer({"max_connections": "100"}).start()
    try:
        for rls in (False, True):
            results = await measure(
                server,
                rls=rls,
                subscribers=args.subscribers,
                repeat=args.repeat,
                big_rows=args.big_rows,
                stream_rows=args.stream_rows,
                stream_rates=[int(r) for r in args.stream_rates.split(",")],
            )
            print(f"DB_RLS={'true' if rls else 'false'}, {args.subscribers} subscribers with distinct claims")
            for name, value in results.items():
                if isinstance(value, tuple):
                    print(f"  {name}: {value[0]:.1f} / {value[1]:.1f}")
                elif isinstance(value, float):
                    print(f"  {name}: {value:.0f}")
                else:
                    print(f"  {name}: {value}")
    finally:
        server.destroy()


if __name__ == "__main__":
    asyncio.run(main())
