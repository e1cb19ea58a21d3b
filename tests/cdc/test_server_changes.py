"""Postgres Changes through the real server: join, filters, system messages, restarts."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.phx import PhxClient
from tests.support.server import ServerProcess

from .conftest import Database, unique_slot

pytestmark = pytest.mark.postgres

ORDERS = """
CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL, total numeric, tags text[],
                     updated_at timestamptz DEFAULT now());
INSERT INTO orders (id, status, total, tags)
    SELECT g, 'new', g * 10.5, ARRAY['a','b'] FROM generate_series(1, 50) g;
"""


@pytest.fixture
def orders_db(db: Database) -> Database:
    db.execute(ORDERS)
    return db


@pytest.fixture
def tidings_with_db(orders_db: Database) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []
    slot = unique_slot()

    def start(**env: str) -> ServerProcess:
        env = {"DATABASE_URL": orders_db.dsn, "DB_SLOT": slot, "DB_RESUME_GRACE": "0", **env}
        proc = ServerProcess(env=env).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def changes(client: PhxClient) -> list[dict[str, Any]]:
    return [m[4] for m in client.inbox if m[3] == "postgres_changes"]


async def subscribe(client: PhxClient, topic: str, binding: dict[str, Any]) -> dict[str, Any]:
    reply = await client.join(topic, {"postgres_changes": [binding]})
    system = await client.wait(lambda m: m[3] == "system" and m[2] == topic)
    assert system[4] == {
        "extension": "postgres_changes",
        "status": "ok",
        "message": "Subscribed to PostgreSQL",
        "channel": topic.removeprefix("realtime:"),
    }
    return reply


async def test_order_status_flow(orders_db: Database, tidings_with_db: Callable[..., ServerProcess]) -> None:
    server = tidings_with_db()
    watcher, other = await PhxClient.open(server.http_url), await PhxClient.open(server.http_url)
    binding = {"event": "UPDATE", "schema": "public", "table": "orders", "filter": "id=eq.42"}
    reply = await subscribe(watcher, "realtime:order:42", binding)
    (echo,) = reply["response"]["postgres_changes"]
    assert {k: v for k, v in echo.items() if k != "id"} == binding and isinstance(echo["id"], int)
    await subscribe(other, "realtime:order:7", {**binding, "filter": "id=eq.7"})

    orders_db.execute("UPDATE orders SET status = 'shipped' WHERE id = 42")
    push = await watcher.wait(lambda m: m[3] == "postgres_changes")
    assert push[0] is None and push[1] is None and push[2] == "realtime:order:42"
    payload = push[4]
    assert payload["ids"] == [echo["id"]]
    data = payload["data"]
    assert data["type"] == "UPDATE" and data["schema"] == "public" and data["table"] == "orders"
    assert data["record"]["status"] == "shipped" and data["record"]["id"] == 42
    assert data["record"]["tags"] == ["a", "b"] and data["record"]["total"] == 441
    assert data["old_record"] == {"id": 42}  # REPLICA IDENTITY DEFAULT: the key only
    assert data["errors"] is None and data["commit_timestamp"].endswith("Z")
    assert {"name": "status", "type": "text"} in data["columns"]
    await asyncio.sleep(0.3)
    assert changes(other) == []  # id=eq.7 did not match


async def test_events_and_filters_reach_only_matching_channels(
    orders_db: Database, tidings_with_db: Callable[..., ServerProcess]
) -> None:
    server = tidings_with_db()
    everything = await PhxClient.open(server.http_url)
    await subscribe(everything, "realtime:all", {"event": "*", "schema": "public", "table": "orders"})
    shipped = await PhxClient.open(server.http_url)
    await subscribe(
        shipped,
        "realtime:s",
        {"event": "*", "schema": "public", "table": "orders", "filter": "status=in.(shipped,lost)"},
    )
    deletes = await PhxClient.open(server.http_url)
    await subscribe(deletes, "realtime:d", {"event": "DELETE", "schema": "public", "table": "orders"})

    orders_db.execute("INSERT INTO orders (id, status) VALUES (100, 'new')")
    orders_db.execute("UPDATE orders SET status = 'shipped' WHERE id = 100")
    orders_db.execute("DELETE FROM orders WHERE id = 100")
    async with asyncio.timeout(10):
        while len(changes(everything)) < 3 or not changes(deletes):
            await asyncio.sleep(0.05)
    assert [c["data"]["type"] for c in changes(everything)] == ["INSERT", "UPDATE", "DELETE"]
    assert "old_record" not in changes(everything)[0]["data"]
    assert "record" not in changes(everything)[2]["data"]
    # A DELETE's old record holds only the key (REPLICA IDENTITY DEFAULT): a condition on another
    # column cannot be checked and is skipped, so the filtered channel hears of the delete too.
    assert [c["data"]["type"] for c in changes(shipped)] == ["UPDATE", "DELETE"]
    assert [c["data"]["type"] for c in changes(deletes)] == ["DELETE"]


async def test_bad_bindings_get_a_system_error(tidings_with_db: Callable[..., ServerProcess]) -> None:
    server = tidings_with_db()
    client = await PhxClient.open(server.http_url)
    await client.join(
        "realtime:bad", {"postgres_changes": [{"event": "*", "schema": "public", "table": "nope"}]}
    )
    system = await client.wait(lambda m: m[3] == "system")
    assert system[4]["status"] == "error" and system[4]["extension"] == "postgres_changes"
    assert "Unable to subscribe to changes with given parameters" in system[4]["message"]
    await client.join(
        "realtime:bad2",
        {"postgres_changes": [{"event": "*", "schema": "public", "table": "orders", "filter": "ghost=eq.1"}]},
    )
    system = await client.wait(lambda m: m[3] == "system" and m[2] == "realtime:bad2")
    assert system[4]["status"] == "error" and "ghost" in system[4]["message"]
    # The server keeps serving.
    await client.push("phoenix", "heartbeat", {})
    await client.wait(lambda m: m[2] == "phoenix" and m[3] == "phx_reply")


async def test_wait_option_holds_the_reply_until_live(
    orders_db: Database, tidings_with_db: Callable[..., ServerProcess]
) -> None:
    server = tidings_with_db()
    client = await PhxClient.open(server.http_url)
    binding = {"event": "INSERT", "schema": "public", "table": "orders"}
    await client.join(
        "realtime:w", {"postgres_changes": [binding], "postgres_changes_options": {"wait": True}}
    )
    # Live as soon as the reply arrives: no write is missed.
    orders_db.execute("INSERT INTO orders (id, status) VALUES (300, 'new')")
    push = await client.wait(lambda m: m[3] == "postgres_changes")
    assert push[4]["data"]["record"]["id"] == 300
    bad = await PhxClient.open(server.http_url)
    ref = await bad.push(
        "realtime:w2",
        "phx_join",
        {
            "config": {
                "postgres_changes": [{"event": "*", "table": "nope"}],
                "postgres_changes_options": {"wait": True},
            }
        },
        "9",
    )
    reply = await bad.wait(lambda m: m[3] == "phx_reply" and m[1] == ref)
    assert reply[4]["status"] == "error" and "Unable to subscribe" in reply[4]["response"]["reason"]


async def test_no_database_means_the_documented_join_error(server: ServerProcess) -> None:
    client = await PhxClient.open(server.http_url)
    ref = await client.push(
        "realtime:x",
        "phx_join",
        {"config": {"postgres_changes": [{"event": "*", "schema": "public", "table": "t"}]}},
        "1",
    )
    reply = await client.wait(lambda m: m[3] == "phx_reply" and m[1] == ref)
    assert reply[4]["status"] == "error" and "database" in reply[4]["response"]["reason"]


async def test_restart_mid_stream_loses_nothing(
    orders_db: Database, tidings_with_db: Callable[..., ServerProcess]
) -> None:
    # Clients get DB_RESUME_GRACE to rejoin before the slot replays what happened while down.
    server = tidings_with_db(DB_RESUME_GRACE="3s")
    binding = {"event": "UPDATE", "schema": "public", "table": "orders", "filter": "id=eq.1"}
    client = await PhxClient.open(server.http_url)
    await subscribe(client, "realtime:o1", binding)
    seen: list[int] = []
    for i in range(5):
        orders_db.execute("UPDATE orders SET total = %s WHERE id = 1", (i,))
    async with asyncio.timeout(10):
        while len(changes(client)) < 5:
            await asyncio.sleep(0.02)
    seen += [c["data"]["record"]["total"] for c in changes(client)]
    server.stop(signal.SIGKILL)
    # Committed while Tidings is down: kept by the slot, delivered when it comes back.
    for i in range(5, 10):
        orders_db.execute("UPDATE orders SET total = %s WHERE id = 1", (i,))
    server.start()
    client = await PhxClient.open(server.http_url)
    await subscribe(client, "realtime:o1", binding)
    async with asyncio.timeout(15):
        while len({c["data"]["record"]["total"] for c in changes(client)} | set(seen)) < 10:
            await asyncio.sleep(0.05)
    assert sorted(set(seen) | {c["data"]["record"]["total"] for c in changes(client)}) == list(range(10))


def slot_active(db: Database, slot: str) -> bool:
    rows = db.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    return bool(rows and rows[0][0])


async def test_subscribed_to_postgresql_means_changes_flow(orders_db: Database) -> None:
    """ "Subscribed to PostgreSQL" comes once the stream is live, with or without DB_RESUME_GRACE.

    A slot the server has just created has nothing to replay: it streams at once, whatever the
    grace. A slot with WAL past its confirmed position is held for the grace (clients rejoin
    first), and the subscriptions made meanwhile are announced only when it streams.
    """
    slot = unique_slot()
    env = {"DATABASE_URL": orders_db.dsn, "DB_SLOT": slot, "DB_RESUME_GRACE": "60s"}
    binding = {"event": "UPDATE", "schema": "public", "table": "orders", "filter": "id=eq.1"}
    server = ServerProcess(env=env).start()
    try:
        client = await PhxClient.open(server.http_url)
        await subscribe(client, "realtime:o1", binding)
        assert slot_active(orders_db, slot)  # new slot: not held for the 60 s
        assert "streaming in 0.0 s" in server.logs()
        orders_db.execute("UPDATE orders SET total = 1 WHERE id = 1")
        push = await client.wait(lambda m: m[3] == "postgres_changes", timeout=20)
        assert push[4]["data"]["record"]["total"] == 1
        server.stop(signal.SIGKILL)
        orders_db.execute("UPDATE orders SET total = 2 WHERE id = 1")  # while down: to replay
        server.env["DB_RESUME_GRACE"] = "3s"
        server.start()
        client = await PhxClient.open(server.http_url)
        reply = await client.join("realtime:o1", {"postgres_changes": [binding]})
        assert reply["status"] == "ok"  # answered at once, during the grace
        # With postgres_changes_options.wait the join itself is answered once changes flow.
        waiter = await PhxClient.open(server.http_url)
        config = {"postgres_changes": [binding], "postgres_changes_options": {"wait": True}}
        await waiter.join("realtime:o1w", config, timeout=20)
        assert slot_active(orders_db, slot)
        # The announcement of the first join waited for the stream too.
        await subscribe_announced(client, "realtime:o1")
        assert slot_active(orders_db, slot)
        assert "streaming in 3.0 s" in server.logs()
        async with asyncio.timeout(20):
            while 2 not in [c["data"]["record"]["total"] for c in changes(client)]:
                await asyncio.sleep(0.05)  # replayed: the client had subscribed before it streamed
    finally:
        server.stop()


async def subscribe_announced(client: PhxClient, topic: str) -> None:
    system = await client.wait(lambda m: m[3] == "system" and m[2] == topic, timeout=20)
    assert system[4]["status"] == "ok" and system[4]["message"] == "Subscribed to PostgreSQL"
