"""Row level security through the real server (on by default): clients with different access
tokens see only their rows; DB_RLS=false opts out."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import pytest

from tests.support.phx import PhxClient
from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer
from tests.support.server import ServerProcess
from tidings.auth.tokens import mint_token

from .conftest import Database, ensure_role, unique_slot
from .test_cluster_changes import wait_for_leader
from .test_rls import SCHEMA

pytestmark = pytest.mark.postgres

SECRET = "rls-test-secret-rls-test-secret-32"


def changes(client: PhxClient) -> list[dict[str, Any]]:
    return [m[4]["data"] for m in client.inbox if m[3] == "postgres_changes"]


def rows(client: PhxClient) -> list[tuple[str, str, int]]:
    out = []
    for d in changes(client):
        row = d.get("record", d.get("old_record"))
        out.append((d["table"], d["type"], row["id"]))
    return out


async def join_as(server: ServerProcess, sub: str) -> PhxClient:
    apikey = mint_token(SECRET, role="anon")
    client = await PhxClient.open(server.http_url, "&apikey=" + apikey)
    topic = f"realtime:notes-{sub}"
    config = {
        "postgres_changes": [
            {"event": "*", "schema": "public", "table": "notes"},
            {"event": "INSERT", "schema": "public", "table": "plain"},
        ]
    }
    token = mint_token(SECRET, role="authenticated", sub=sub)
    ref = await client.push(topic, "phx_join", {"config": config, "access_token": token}, "1")
    reply = await client.wait(lambda m: m[3] == "phx_reply" and m[1] == ref)
    assert reply[4]["status"] == "ok", reply
    system = await client.wait(lambda m: m[3] == "system" and m[2] == topic)
    assert system[4]["status"] == "ok", system
    return client


def rls_env(db: Database) -> dict[str, str]:
    """A server on *db* with the notes schema; DB_RLS is left at its default (on)."""
    ensure_role(db, "authenticated")
    db.execute(SCHEMA)
    return {"DATABASE_URL": db.dsn, "DB_SLOT": unique_slot(), "DB_RESUME_GRACE": "0", "JWT_SECRET": SECRET}


async def check_alice_and_bob(db: Database, alice: PhxClient, bob: PhxClient) -> None:
    db.execute("INSERT INTO notes VALUES (1, 'alice', 'for alice'), (2, 'bob', 'for bob')")
    db.execute("INSERT INTO plain VALUES (10, 'anyone')")  # no row level security: both
    async with asyncio.timeout(15):
        while not (("plain", "INSERT", 10) in rows(alice) and ("plain", "INSERT", 10) in rows(bob)):
            await asyncio.sleep(0.05)
    db.execute("DELETE FROM notes WHERE id = 1")  # not RLS-checked: both, key only
    async with asyncio.timeout(15):
        while not (("notes", "DELETE", 1) in rows(alice) and ("notes", "DELETE", 1) in rows(bob)):
            await asyncio.sleep(0.05)
    # Changes arrive in order, so nothing else can still be on its way.
    assert rows(alice) == [("notes", "INSERT", 1), ("plain", "INSERT", 10), ("notes", "DELETE", 1)]
    assert rows(bob) == [("notes", "INSERT", 2), ("plain", "INSERT", 10), ("notes", "DELETE", 1)]
    assert changes(alice)[0]["record"] == {"id": 1, "owner": "alice", "body": "for alice"}
    assert changes(bob)[-1]["old_record"] == {"id": 1}


def metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


async def test_each_client_gets_only_rows_its_token_may_read(db: Database) -> None:
    server = ServerProcess(env=rls_env(db)).start()
    try:
        alice, bob = await join_as(server, "alice"), await join_as(server, "bob")
        await check_alice_and_bob(db, alice, bob)
        # alice's row withheld from bob and bob's from alice: counted
        assert metric(server, "tidings_postgres_changes_rls_hidden_total") == 2
        assert metric(server, "tidings_postgres_changes_rls_rechecks_total") >= 0
    finally:
        server.stop()


async def test_db_rls_false_sends_every_row_to_everyone(db: Database) -> None:
    """The explicit opt-out: no checks, and a DELETE carries the whole old row (unsafe for RLS tables)."""
    server = ServerProcess(env={**rls_env(db), "DB_RLS": "false"}).start()
    try:
        alice, bob = await join_as(server, "alice"), await join_as(server, "bob")
        db.execute("INSERT INTO notes VALUES (1, 'alice', 'for alice'), (2, 'bob', 'for bob')")
        db.execute("DELETE FROM notes WHERE id = 1")
        everything = [("notes", "INSERT", 1), ("notes", "INSERT", 2), ("notes", "DELETE", 1)]
        async with asyncio.timeout(15):
            while not (rows(alice) == everything and rows(bob) == everything):
                await asyncio.sleep(0.05)
        assert changes(bob)[-1]["old_record"] == {"id": 1, "owner": "alice", "body": "for alice"}
    finally:
        server.stop()


@pytest.mark.redis
async def test_in_a_cluster_each_node_checks_what_it_delivers(db: Database) -> None:
    env = rls_env(db)
    redis = RedisServer().start()
    nodes = []
    try:
        for _ in range(2):
            nodes.append(ServerProcess(env={**env, "REDIS_URL": redis.url, "NODE_TIMEOUT": "3s"}).start())
        leader = await wait_for_leader(nodes)
        follower = nodes[1] if leader is nodes[0] else nodes[0]
        alice, bob = await join_as(follower, "alice"), await join_as(leader, "bob")
        await check_alice_and_bob(db, alice, bob)
    finally:
        for proc in nodes:
            proc.stop()
        redis.cleanup()


async def test_filtered_single_row_inserts_behind_a_slow_standby(sync_postgres: PostgresServer) -> None:
    """The compatibility suite's shape: a client joins with a filter, one row is inserted, the
    client waits for its event. Behind a synchronous standby every commit streams before other
    sessions see it; each event still arrives."""
    dsn = sync_postgres.create_database()
    db = Database(sync_postgres, dsn.rsplit("/", 1)[1], dsn)
    server = ServerProcess(env={**rls_env(db), "DATABASE_URL": dsn}).start()
    try:
        apikey = mint_token(SECRET, role="anon")
        token = mint_token(SECRET, role="authenticated", sub="alice")
        for n in range(1, 21):
            client = await PhxClient.open(server.http_url, "&apikey=" + apikey)
            topic = f"realtime:note-{n}"
            binding = {"event": "INSERT", "schema": "public", "table": "notes", "filter": f"id=eq.{n}"}
            payload = {"config": {"postgres_changes": [binding]}, "access_token": token}
            await client.push(topic, "phx_join", payload, "1")
            await client.wait(lambda m, t=topic: m[3] == "system" and m[2] == t)
            db.execute("INSERT INTO notes VALUES (%s, 'alice', 'hi')", (n,))
            push = await client.wait(lambda m: m[3] == "postgres_changes", timeout=20)
            assert push[4]["data"]["record"]["id"] == n
            await client.close()
        assert metric(server, "tidings_postgres_changes_rls_rechecks_total") > 0  # the window was hit
        assert metric(server, "tidings_postgres_changes_rls_hidden_total") == 0
    finally:
        server.stop()
