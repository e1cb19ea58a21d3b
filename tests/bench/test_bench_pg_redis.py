"""``tidings bench`` with PostgreSQL and Redis at tiny N: the postgres update source, the Redis
targets (one node, two nodes) and the Redis throughput script. Accounting only, no timing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.support.postgres import PostgresServer, PostgresUnavailable
from tests.support.redis import RedisServer
from tidings.bench.wire import PhoenixDialect, pg_binding, read_record_t_n, read_t_n

from .test_bench_runs import bench, sane_latency

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:  # pragma: no cover - the dev setup installs PostgreSQL
        pytest.fail(f"PostgreSQL is needed: {exc}")
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = RedisServer(persist=False).start()
    try:
        yield server.url
    finally:
        server.stop()


def test_connect_private_with_a_database_runs_the_rls_check_and_cleans_up(
    pg: PostgresServer, tmp_path: Path
) -> None:
    from tests.support.supabase_db import create_supabase_database
    from tidings.bench.publishers import BENCH_POLICY

    db = create_supabase_database(pg, prefix="benchauthz")
    reports = bench(
        tmp_path,
        "connect",
        "-n",
        "20",
        "--rate",
        "100",
        "--private",
        "--distinct-claims",
        "--database-url",
        db.dsn,
    )
    r = reports["tidings"]
    assert r["status"] == "ok", r
    m = r["metrics"]
    assert m["joined"] == 20 and m["failed"] == 0, m["errors"]
    assert m["authorization"] == "database (row level security)"
    assert db.execute("SELECT 1 FROM pg_policies WHERE policyname = %s", (BENCH_POLICY,)) == []
    assert db.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (db.name,)) == []


def test_record_t_n_is_read_from_the_new_row_in_any_column_order() -> None:
    push = orjson.dumps(
        [
            None,
            None,
            "realtime:order-7",
            "postgres_changes",
            {
                "ids": [3],
                "data": {
                    "schema": "public",
                    "table": "orders",
                    "commit_timestamp": "2026-01-01T00:00:00.000Z",
                    "type": "UPDATE",
                    "columns": [{"name": "t", "type": "int8"}, {"name": "n", "type": "int8"}],
                    "record": {"id": 7, "p": "xx", "n": 12, "t": 1234567890123456789},
                    "old_record": {"id": 7},
                    "errors": None,
                },
            },
        ]
    )
    assert read_record_t_n(push) == (1234567890123456789, 12)
    assert read_record_t_n(b'{"record":{"id":1,"t":5}}') is None  # no n
    assert read_record_t_n(b'[null,null,"realtime:x","system",{"status":"ok"}]') is None
    # The broadcast reader is unchanged.
    assert read_t_n(b'{"t":5,"n":6,"p":"x"}') == (5, 6)


def test_join_carries_the_postgres_changes_binding() -> None:
    text = PhoenixDialect().join(1, "realtime:order-7", None, [pg_binding("orders", 7)])
    config = orjson.loads(text)[4]["config"]
    assert config["postgres_changes"] == [
        {"event": "UPDATE", "schema": "public", "table": "orders", "filter": "id=eq.7"}
    ]
    assert orjson.loads(PhoenixDialect().join(1, "realtime:x", None))[4]["config"]["postgres_changes"] == []


def test_order_status_through_postgres(tmp_path: Path, pg: PostgresServer) -> None:
    dsn = pg.create_database()
    args = ["order-status", "-n", "20", "--rate", "40", "--duration", "1", "--source", "postgres"]
    reports = bench(tmp_path, *args, "--database-url", dsn)
    r = reports["tidings"]
    assert r["status"] == "ok", r
    m = r["metrics"]
    assert m["clients"] == 20 and m["pg_subscribed"] == 20 and m["pg_subscribe_errors"] == 0
    assert m["updates_sent"] == 40 and m["updates_accepted"] == 40
    assert m["delivered"] == 40 and m["lost"] == 0 and m["all_delivered"]
    sane_latency(m["end_to_end_latency_ms"], 40)
    assert r["params"]["source"] == "postgres"
    # The table the bench made, and no replication slot left behind.
    dbname = dsn.rsplit("/", 1)[1]
    assert pg.execute("SELECT count(*) FROM orders", dbname=dbname) == [(20,)]
    assert pg.execute("SELECT relreplident FROM pg_class WHERE relname = 'orders'", dbname=dbname) == [("d",)]
    slots = pg.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'tidings_bench_%'")
    assert slots == []


def test_postgres_source_needs_a_database_url(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tidings", "bench", "order-status", "-n", "5", "--source", "postgres"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--database-url" in proc.stderr


def test_fanout_through_redis_one_and_two_nodes(tmp_path: Path, redis_url: str) -> None:
    against = "tidings,tidings-redis,tidings-cluster"
    args = ["fanout", "-n", "20", "--rate", "10", "--duration", "1", "--against", against]
    reports = bench(tmp_path, *args, "--redis-url", redis_url)
    for name in ("tidings", "tidings-redis", "tidings-cluster"):
        r = reports[name]
        assert r["status"] == "ok", (name, r)
        m = r["metrics"]
        assert m["subscribers"] == 20 and m["expected_deliveries"] == 200
        assert m["delivered"] == 200 and m["lost"] == 0, (name, m)
        sane_latency(m["delivery_latency_ms"], 200)


def test_order_status_across_two_nodes(tmp_path: Path, redis_url: str) -> None:
    args = ["order-status", "-n", "20", "--rate", "40", "--duration", "1", "--against", "tidings-cluster"]
    m = bench(tmp_path, *args, "--redis-url", redis_url)["tidings-cluster"]["metrics"]
    assert m["updates_accepted"] == 40 and m["delivered"] == 40 and m["lost"] == 0


def test_redis_targets_need_a_redis_url(tmp_path: Path) -> None:
    reports = bench(tmp_path, "connect", "-n", "5", "--rate", "100", "--against", "tidings-cluster")
    assert reports["tidings-cluster"]["status"] == "unavailable: needs --redis-url"


def test_redis_throughput_script(redis_url: str) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "redis_throughput.py"),
        "--redis-url",
        redis_url,
        "--rate",
        "200",
        "--duration",
        "1",
        "--channels",
        "20",
        "--publishers",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["sent"] == 200 and out["acked"] == 200
    assert out["deliveries"] == 200 and out["lost"] == 0
    sane_latency(out["delivery_latency_ms"], 200)
