"""Resuming Postgres Changes: a replay is bounded, and a big one does not close a healthy client.

A rejoin with ``postgres_changes_options.resume`` gets every change it missed right after the
join reply, which can be far more than ``MAX_UNSENT_BYTES``. The replay is written inside the join's
catch-up allowance (docs/security.md "Slow consumers"), so a client that reads steadily keeps its
connection; and each replay is cut at ``DB_REPLAY_MAX_CHANGES`` / ``DB_REPLAY_MAX_BYTES`` (then
``recovered: false``).

In miniature: MAX_UNSENT_BYTES 64 KB, 100 rows of 40 KB (4 MB) to replay, a 4 KB receive buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.cdc.conftest import Database, db, postgres, unique_slot
from tests.server.test_bad_input import (
    WAIT,
    heartbeat_ok,
    metric,
    open_ws,
    recv_json,
    small_buffer_socket,
    ws_url,
)
from tests.support.phx import PhxClient
from tests.support.server import ServerProcess

__all__ = ["db", "postgres"]  # the PostgreSQL fixtures, used by the tests below

pytestmark = pytest.mark.postgres

ROWS = 100
BODY = "b" * 40_000
BINDING = {"event": "INSERT", "schema": "public", "table": "docs"}


@pytest.fixture
def docs_server(db: Database) -> Iterator[Callable[..., ServerProcess]]:
    db.execute("CREATE TABLE docs (id int4 PRIMARY KEY, body text)")
    started: list[ServerProcess] = []
    slot = unique_slot()

    def start(**env: str) -> ServerProcess:
        env = {
            "DATABASE_URL": db.dsn,
            "DB_SLOT": slot,
            "DB_RESUME_GRACE": "0",
            "MAX_UNSENT_BYTES": "65536",
            "SLOW_CONSUMER_TIMEOUT": "3s",
            **env,
        }
        proc = ServerProcess(env=env).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def join_frame(resume: Any) -> str:
    config = {"postgres_changes": [BINDING], "postgres_changes_options": {"resume": resume}}
    return orjson.dumps(["1", "1", "realtime:docs", "phx_join", {"config": config}]).decode()


async def missed_rows(db: Database, server: ServerProcess) -> dict[str, Any]:
    """A baseline, then ROWS big inserts committed (and logged) while the client is away."""
    client = await PhxClient.open(server.http_url)
    config = {"postgres_changes": [BINDING], "postgres_changes_options": {"resume": True}}
    ref = await client.push("realtime:docs", "phx_join", {"config": config}, "b")
    reply = await client.wait(lambda m: m[3] == "phx_reply" and m[1] == ref, timeout=WAIT * 3)
    baseline: dict[str, Any] = reply[4]["response"]["postgres_changes_resume"]
    await client.close()
    watcher = await PhxClient.open(server.http_url)
    await watcher.push("realtime:w", "phx_join", {"config": {"postgres_changes": [BINDING]}}, "w")
    await watcher.wait(lambda m: m[3] == "system", timeout=WAIT * 3)
    for n in range(ROWS):
        db.execute("INSERT INTO docs VALUES (%s, %s)", (n, BODY))
    async with asyncio.timeout(WAIT * 3):
        while sum(m[3] == "postgres_changes" for m in watcher.inbox) < ROWS:
            await asyncio.sleep(0.05)
    await watcher.close()
    return baseline


async def test_a_steady_reader_gets_a_big_replay_and_stays(
    db: Database, docs_server: Callable[..., ServerProcess]
) -> None:
    server = docs_server()
    baseline = await missed_rows(db, server)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
        async with open_ws(ws_url(server), sock=small_buffer_socket(server.port), max_queue=1) as slow:
            await slow.send(join_frame({"since": baseline["position"], "epoch": baseline["epoch"]}))
            reply = await recv_json(slow, WAIT * 3)
            assert reply[4]["status"] == "ok", reply
            assert reply[4]["response"]["postgres_changes_resume"]["recovered"] is True
            got: list[int] = []
            while len(got) < ROWS:  # 4 MB, 60 times MAX_UNSENT_BYTES, read a row each 20 ms
                msg = await recv_json(slow)
                assert msg[3] == "postgres_changes", msg
                got.append(msg[4]["data"]["record"]["id"])
                await asyncio.sleep(0.02)
            assert got == list(range(ROWS))
            system = await recv_json(slow)
            assert system[3] == "system" and system[4]["recovered"] is True
            assert await metric(http, "tidings_catchup_allowances_total") >= 1
            db.execute("INSERT INTO docs VALUES (1000, 'live')")
            live = await recv_json(slow, WAIT * 3)
            assert live[4]["data"]["record"]["id"] == 1000
            await heartbeat_ok(slow)
        assert await metric(http, "tidings_slow_consumer_closes_total") == 0
        assert await metric(http, "tidings_postgres_changes_replayed_total") == ROWS


async def test_a_replay_is_cut_at_its_byte_limit(
    db: Database, docs_server: Callable[..., ServerProcess]
) -> None:
    server = docs_server(DB_REPLAY_MAX_BYTES="500000")
    baseline = await missed_rows(db, server)
    client = await PhxClient.open(server.http_url)
    await client.ws.send(join_frame({"since": baseline["position"]}))
    reply = await client.wait(lambda m: m[3] == "phx_reply", timeout=WAIT * 3)
    resume = reply[4]["response"]["postgres_changes_resume"]
    assert resume["recovered"] is False and "limits" in resume["reason"]
    await client.wait(lambda m: m[3] == "system", timeout=WAIT)
    replayed = [m for m in client.inbox if m[3] == "postgres_changes"]
    assert 0 < len(replayed) == resume["replayed"] < ROWS
    assert sum(len(orjson.dumps(m[4]["data"])) for m in replayed) <= 500_000
    async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
        assert await metric(http, "tidings_postgres_changes_resumes_incomplete_total") == 1
