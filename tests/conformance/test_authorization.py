"""Realtime Authorization, replication_ready and replay through the official clients: supabase-js,
realtime-js (vsn 2.0.0 and 1.0.0) and realtime-py against a Tidings server with DATABASE_URL on a
PostgreSQL prepared like Supabase's image, with Supabase's documented policies on
``realtime.messages`` (the rooms example: alice is a member of room-1..3, bob of none; any signed-in
user may read, and nobody write, ``readonly-*``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.db.test_authorization_server import SECRET, prepare_rooms, server_env
from tests.db.test_broadcast_from_database import drop_slots
from tests.support.postgres import PostgresServer, postgres_fixture
from tests.support.server import ServerProcess
from tests.support.supabase_db import SupabaseDatabase, create_supabase_database
from tidings.auth.tokens import mint_token
from tidings.protocol import errors

from .conftest import JsFactory, PyFactory, broadcasts, rest_post

pytestmark = [pytest.mark.clients, pytest.mark.postgres]

postgres = postgres_fixture()


@dataclass
class Site:
    db: SupabaseDatabase
    server: ServerProcess
    alice: str
    bob: str

    def token(self, user: str | None, role: str = "authenticated", ttl: float = 3600) -> str:
        return mint_token(SECRET, role=role, sub=user, ttl=ttl)

    @property
    def service(self) -> str:
        return mint_token(SECRET, role="service_role", ttl=3600)


@pytest.fixture(scope="module")
def site(postgres: PostgresServer) -> Iterator[Site]:
    db = create_supabase_database(postgres)
    server = ServerProcess(env=server_env(db)).start()
    try:
        alice, bob = prepare_rooms(db)
        yield Site(db, server, alice, bob)
    finally:
        server.stop()
        drop_slots(postgres, db.name)
    assert "Traceback" not in server.logs(), server.logs()


def send_rows(db: SupabaseDatabase, topic: str, count: int, event: str) -> list[str]:
    for i in range(count):
        db.execute("SELECT realtime.send(jsonb_build_object('i', %s), %s, %s, true)", (i, event, topic))
    rows = db.execute(
        "SELECT id::text FROM realtime.messages WHERE topic = %s AND event = %s ORDER BY inserted_at",
        (topic, event),
    )
    return [str(r[0]) for r in rows]


PRIVATE = {"private": True}


# -- supabase-js -------------------------------------------------------------------------------------


async def test_supabase_js_joins_follow_the_policies(site: Site, js_client: JsFactory) -> None:
    alice = await js_client(
        site.server.ws_url, lib="supabase-js", apikey=site.token(site.alice), name="alice"
    )
    bob = await js_client(site.server.ws_url, lib="supabase-js", apikey=site.token(site.bob), name="bob")
    service = await js_client(site.server.ws_url, lib="supabase-js", apikey=site.service, name="service")
    await alice.subscribed("room-1", config=PRIVATE)
    assert await bob.subscribe("room-1", config=PRIVATE) == {
        "status": "CHANNEL_ERROR",
        "error": errors.unauthorized_read_reason("room-1"),
    }
    await service.subscribed("room-1", config=PRIVATE)
    await service.subscribed("no-policy-names-this", config=PRIVATE)  # service_role: always
    # Members write; the others' copies arrive.
    assert await alice.call("send", ch="room-1", event="hi", payload={"from": "alice"}) == "ok"
    got = await service.wait_for("broadcast", ch="room-1")
    assert got["payload"]["payload"] == {"from": "alice"}


async def test_supabase_js_writes_without_permission_are_dropped(site: Site, js_client: JsFactory) -> None:
    bob = await js_client(site.server.ws_url, lib="supabase-js", apikey=site.token(site.bob), name="bob")
    listener = await js_client(site.server.ws_url, lib="supabase-js", apikey=site.service, name="listener")
    await listener.subscribed("readonly-js", config=PRIVATE)
    await bob.subscribed("readonly-js", config={"private": True, "broadcast": {"ack": True}})
    # With ack the server's silence shows: no reply, the client times out.
    assert await bob.call("send", ch="readonly-js", event="sneaky", payload={}, timeout=1500) == "timed out"
    # The REST fallback of a channel that is not joined: 202 (skipped silently), as Supabase.
    await bob.call("channel", ch="room-2", config=PRIVATE)
    assert await bob.call("send", ch="room-2", event="via-rest", payload={}) == "ok"
    marker = {"messages": [{"topic": "readonly-js", "event": "marker", "payload": {}, "private": True}]}
    r = await rest_post(site.server.http_url, "/api/broadcast", marker, token=site.service)
    assert r.status_code == 202
    await listener.wait_for("broadcast", ch="readonly-js", pred=lambda e: e["payload"]["event"] == "marker")
    assert [p["event"] for p in broadcasts(listener, "readonly-js")] == ["marker"]


async def test_supabase_js_refresh_that_loses_read_closes_the_channel(
    site: Site, js_client: JsFactory
) -> None:
    user = site.db.add_user()
    site.db.execute("INSERT INTO public.rooms_users (user_id, topic) VALUES (%s, 'room-3')", (user,))
    member = await js_client(site.server.ws_url, lib="supabase-js", apikey=site.token(user), name="member")
    await member.subscribed("room-3", config=PRIVATE)
    site.db.execute("DELETE FROM public.rooms_users WHERE user_id = %s", (user,))
    await member.call("setAuth", token=site.token(user, ttl=7200))
    system = await member.wait_for("system", ch="room-3")
    assert system["payload"]["status"] == "error"
    assert system["payload"]["message"] == errors.read_permission_revoked_message("room-3")
    assert system["payload"]["channel"] == "room-3"
    await member.wait_for("status", ch="room-3", status="CLOSED")


# -- realtime-js: replication_ready and replay (JSON and binary rows) -------------------------------


@pytest.mark.parametrize("vsn", ["2.0.0", "1.0.0"])
async def test_realtime_js_replication_ready_and_replay(site: Site, js_client: JsFactory, vsn: str) -> None:
    topic = f"room-{1 if vsn == '2.0.0' else 2}"
    since = int(time.time() * 1000) - 60_000
    site.db.execute(f"SELECT realtime.send_binary('\\x00ff10'::bytea, 'blob-{vsn}', '{topic}', true)")
    ids = send_rows(site.db, topic, 4, event=f"json-{vsn}")
    alice = await js_client(site.server.ws_url, vsn=vsn, apikey=site.token(site.alice), name=f"alice[{vsn}]")
    await alice.call("setAuth", token=site.token(site.alice))
    config = {
        "private": True,
        "broadcast": {"replication_ready": True, "replay": {"since": since, "limit": 5}},
    }
    await alice.subscribed(topic, config=config)
    system = await alice.wait_for("system", ch=topic)
    assert system["payload"] == {
        "extension": "system",
        "status": "ok",
        "message": "Replication connection established",
        "channel": topic,
    }
    if vsn == "2.0.0":
        # The five rows oldest first: the binary one, then the JSON ones.
        got = await alice.wait_count("broadcast", 5, ch=topic)
        assert got[0]["payload"]["event"] == f"blob-{vsn}"
        assert got[0]["payload"]["payload"] == {"$bytes": "00ff10"}
        assert got[0]["payload"]["meta"]["replayed"] is True
        json_events = got[1:]
    else:
        # vsn 1.0.0 cannot carry the binary row: skipped, the JSON rows come.
        json_events = await alice.wait_count("broadcast", 4, ch=topic)
    assert [e["payload"]["meta"]["id"] for e in json_events] == ids
    for e in json_events:
        assert e["payload"]["meta"] == {"replayed": True, "id": e["payload"]["meta"]["id"]}
        assert e["payload"]["event"] == f"json-{vsn}"
    assert [e["payload"]["payload"]["i"] for e in json_events] == [0, 1, 2, 3]


# -- realtime-py -------------------------------------------------------------------------------------


async def test_realtime_py_authorization_and_replay(site: Site, py_client: PyFactory) -> None:
    since = int(time.time() * 1000) - 60_000
    ids = send_rows(site.db, "room-1", 2, event="py-replay")
    alice = py_client(site.server.ws_url, site.token(site.alice), name="alice")
    bob = py_client(site.server.ws_url, site.token(site.bob), name="bob")
    config = {
        "private": True,
        "broadcast": {"ack": False, "self": False, "replay": {"since": since, "limit": 25}},
    }
    await alice.subscribed("room-1", config=config)
    got = await alice.wait_count(
        "broadcast", 2, ch="room-1", pred=lambda e: e["payload"].get("event") == "py-replay"
    )
    assert [e["payload"]["meta"] for e in got] == [{"replayed": True, "id": i} for i in ids]
    result = await bob.subscribe("room-1", config={"private": True})
    reason = errors.unauthorized_read_reason("room-1")
    assert result == {"status": "CHANNEL_ERROR", "error": json.dumps({"reason": reason})}
    # replication_ready through realtime-py's system callback.
    await alice.subscribed(
        "py-feed", config={"broadcast": {"ack": False, "self": False, "replication_ready": True}}
    )
    system: dict[str, Any] = await alice.wait_for("system", ch="py-feed")
    assert system["payload"]["message"] == "Replication connection established"
    assert system["payload"]["status"] == "ok"
