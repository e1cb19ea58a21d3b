"""Postgres Changes through the official clients: realtime-js (vsn 2.0.0 and 1.0.0) and realtime-py.

A throwaway PostgreSQL (wal_level=logical) feeds a Tidings server started with DATABASE_URL. The
clients must accept the join reply's binding echo (else they report "mismatch between server and
client bindings"), route each change to the right listener by id, and parse the payload (JS
converts values by column type).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.postgres import PostgresServer, postgres_fixture
from tests.support.server import ServerProcess

from .conftest import JsFactory, PyFactory

pytestmark = [pytest.mark.clients, pytest.mark.postgres]

postgres = postgres_fixture()
_slots = itertools.count(1)

ITEMS = """
CREATE TABLE items (id bigint PRIMARY KEY, status text NOT NULL, n int, flag bool, tags text[], data jsonb);
INSERT INTO items VALUES (1, 'new', 10, false, ARRAY['a','b'], '{"k": 1}'), (2, 'new', 20, true, NULL, NULL);
"""

UPDATE_1 = {"event": "UPDATE", "schema": "public", "table": "items", "filter": "id=eq.1"}
INSERTS = {"event": "INSERT", "schema": "public", "table": "items"}
DELETES = {"event": "DELETE", "schema": "public", "table": "items"}


class Db:
    def __init__(self, server: PostgresServer, dsn: str) -> None:
        self.server, self.dsn, self.name = server, dsn, dsn.rsplit("/", 1)[1]

    def execute(self, sql: str) -> None:
        self.server.execute(sql, dbname=self.name)


@pytest.fixture
def db(postgres: PostgresServer) -> Iterator[Db]:
    database = Db(postgres, postgres.create_database(prefix="clients"))
    database.execute(ITEMS)
    yield database
    postgres.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE database = %s AND NOT active",
        (database.name,),
    )


@pytest.fixture
def db_server(db: Db) -> Iterator[ServerProcess]:
    slot = f"tidings_clients_{os.getpid()}_{next(_slots)}"
    proc = ServerProcess(env={"DATABASE_URL": db.dsn, "DB_SLOT": slot, "DB_RESUME_GRACE": "0"}).start()
    try:
        yield proc
    finally:
        proc.stop()


def subscribed_system(ch: str) -> dict[str, Any]:
    return {
        "extension": "postgres_changes",
        "status": "ok",
        "message": "Subscribed to PostgreSQL",
        "channel": ch,
    }


@pytest.mark.parametrize("vsn", ["2.0.0", "1.0.0"])
async def test_realtime_js(
    db: Db, db_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(db_server.ws_url, vsn=vsn, name="A")
    await a.subscribed(channel_name, postgres=[UPDATE_1, INSERTS, DELETES])
    system = await a.wait_for("system", ch=channel_name, timeout=30)
    assert system["payload"] == subscribed_system(channel_name)
    # The join reply echoed every binding verbatim, plus an integer id.
    reply = next(
        m for m in a.text_frames("in") if (m[3] if isinstance(m, list) else m["event"]) == "phx_reply"
    )
    echoed = (reply[4] if isinstance(reply, list) else reply["payload"])["response"]["postgres_changes"]
    assert [{k: v for k, v in e.items() if k != "id"} for e in echoed] == [UPDATE_1, INSERTS, DELETES]
    assert all(isinstance(e["id"], int) for e in echoed)

    db.execute("UPDATE items SET status = 'skipped' WHERE id = 2")  # filtered out
    db.execute("UPDATE items SET status = 'shipped', n = 11 WHERE id = 1")
    db.execute("INSERT INTO items VALUES (3, 'new', 30, true, ARRAY['x'], '{\"deep\": {\"v\": [1, 2]}}')")
    db.execute("DELETE FROM items WHERE id = 2")

    update = await a.wait_for("postgres", ch=channel_name, binding=0, timeout=30)
    p = update["payload"]
    assert p["eventType"] == "UPDATE" and p["schema"] == "public" and p["table"] == "items"
    assert p["new"] == {
        "id": 1,
        "status": "shipped",
        "n": 11,
        "flag": False,
        "tags": ["a", "b"],
        "data": {"k": 1},
    }
    assert p["old"] == {"id": 1}
    assert p["errors"] is None and p["commit_timestamp"].endswith("Z")

    insert = await a.wait_for("postgres", ch=channel_name, binding=1, timeout=30)
    assert insert["payload"]["eventType"] == "INSERT"
    assert insert["payload"]["new"] == {
        "id": 3,
        "status": "new",
        "n": 30,
        "flag": True,
        "tags": ["x"],
        "data": {"deep": {"v": [1, 2]}},
    }
    assert insert["payload"]["old"] == {}
    delete = await a.wait_for("postgres", ch=channel_name, binding=2, timeout=30)
    assert delete["payload"]["eventType"] == "DELETE" and delete["payload"]["old"] == {"id": 2}
    # The UPDATE of id 2 (committed before all of these) matched no binding of this channel.
    assert len(a.find("postgres", ch=channel_name)) == 3


async def test_realtime_js_wait_option(
    db: Db, db_server: ServerProcess, js_client: JsFactory, channel_name: str
) -> None:
    """postgres_changes_options.wait: SUBSCRIBED only once the subscription is live (spec 3.9)."""
    a = await js_client(db_server.ws_url, name="A")
    config = {"postgres_changes_options": {"wait": True, "timeout": 20000}}
    await a.subscribed(channel_name, config=config, postgres=[UPDATE_1], timeout=40)
    db.execute("UPDATE items SET status = 'right-away' WHERE id = 1")
    got = await a.wait_for("postgres", ch=channel_name, timeout=30)
    assert got["payload"]["new"]["status"] == "right-away"


async def test_realtime_py(db: Db, db_server: ServerProcess, py_client: PyFactory, channel_name: str) -> None:
    a = py_client(db_server.ws_url, name="A")
    await a.subscribed(channel_name, postgres=(UPDATE_1, INSERTS))
    system = await a.wait_for("system", ch=channel_name, timeout=30)
    assert system["payload"] == subscribed_system(channel_name)

    db.execute("UPDATE items SET status = 'skipped' WHERE id = 2")
    db.execute("UPDATE items SET status = 'shipped' WHERE id = 1")
    db.execute("INSERT INTO items VALUES (3, 'new', 30, true, ARRAY['x'], NULL)")
    update = await a.wait_for("postgres", ch=channel_name, binding=0, timeout=30)
    data = update["payload"]["data"]
    assert (
        data["type"] == "UPDATE" and data["record"]["status"] == "shipped" and data["old_record"] == {"id": 1}
    )
    assert data["errors"] is None
    assert {"name": "status", "type": "text"} in data["columns"]
    insert = await a.wait_for("postgres", ch=channel_name, binding=1, timeout=30)
    assert (
        insert["payload"]["data"]["record"]["id"] == 3 and insert["payload"]["data"]["record"]["data"] is None
    )
    assert len(a.find("postgres", ch=channel_name)) == 2


@pytest.mark.parametrize("lib", ["supabase-js", "realtime-js"])
async def test_supabase_js_resumes_through_its_channel_config(
    db: Db, db_server: ServerProcess, js_client: JsFactory, channel_name: str, lib: str
) -> None:
    """Recovery (issue 16) with the official JS client, unchanged: supabase-js passes
    ``config.postgres_changes_options`` through to the join as it is, and hands a callback the
    message's ref as its second argument, which is each change's position for a channel that
    resumes (realtime-js keeps no unknown field of ``data``). The ``system`` push after the replay
    says ``recovered``."""
    a = await js_client(db_server.ws_url, lib=lib, name="A")
    config = {"postgres_changes_options": {"resume": True}}
    await a.subscribed(channel_name, config=config, postgres=[UPDATE_1])
    await a.wait_for("system", ch=channel_name, timeout=30)
    db.execute("UPDATE items SET n = 1 WHERE id = 1")
    first = await a.wait_for("postgres", ch=channel_name, timeout=30)
    assert first["payload"]["new"]["n"] == 1
    position = first["ref"]
    assert isinstance(position, str) and len(position) == 25 and position[16] == "/"
    # realtime-js does not hand data.position to the callback, but it is on the wire.
    raw = [
        m for m in a.text_frames("in") if (m[3] if isinstance(m, list) else m["event"]) == "postgres_changes"
    ]
    assert raw[0][4]["data"]["position"] == position
    await a.call("unsubscribe", ch=channel_name)
    for n in (2, 3, 4):  # committed while the page is away
        db.execute(f"UPDATE items SET n = {n} WHERE id = 1")
        db.execute(f"UPDATE items SET n = {n} WHERE id = 2")
    again = channel_name + "-again"
    config = {"postgres_changes_options": {"resume": {"since": position}}}
    await a.subscribed(again, config=config, postgres=[UPDATE_1])
    system = await a.wait_for("system", ch=again, timeout=30)
    assert system["payload"]["message"] == "Subscribed to PostgreSQL"
    assert system["payload"]["recovered"] is True, system
    async with asyncio.timeout(30):
        while len(a.find("postgres", ch=again)) < 3:
            await asyncio.sleep(0.05)
    got = a.find("postgres", ch=again)
    assert [g["payload"]["new"]["n"] for g in got] == [2, 3, 4]
    refs = [g["ref"] for g in got]
    assert refs == sorted(refs) and refs[0] > position
