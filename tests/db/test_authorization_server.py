"""Realtime Authorization and replay through a real server: Tidings started with DATABASE_URL on a
PostgreSQL prepared like Supabase's image, Supabase's documented policies on ``realtime.messages``,
raw WebSocket clients (vsn 2.0.0 and 1.0.0) and the REST API. The official clients' view of the
same is ``tests/conformance/test_authorization.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.support.postgres import PostgresServer
from tests.support.server import ServerProcess
from tests.support.supabase_db import SupabaseDatabase, create_supabase_database
from tidings.auth.tokens import mint_token
from tidings.protocol import errors

from .test_authorization import (
    LISTEN_PRESENCE,
    RECEIVE_BROADCAST,
    ROOMS_SCHEMA,
    SEND_BROADCAST,
    TRACK_PRESENCE,
)
from .test_broadcast_from_database import drop_slots

pytestmark = pytest.mark.postgres

SECRET = "authorization-server-secret-long-enough"
WAIT = 20.0
_slots = itertools.count(1)

# Read-only topics: any signed-in user may read (join) ``readonly-*``; no policy lets anyone write.
READ_ONLY = """
create policy "authenticated can read readonly topics"
on "realtime"."messages"
for select
to authenticated
using ( (select realtime.topic()) like 'readonly-%' );
"""


@dataclass
class Site:
    """A database with Supabase's example rooms, and a Tidings server on it."""

    db: SupabaseDatabase
    server: ServerProcess
    alice: str  # a member of room-1
    bob: str  # a member of nothing

    def token(self, user: str | None, role: str = "authenticated", ttl: float = 3600, **claims: Any) -> str:
        return mint_token(SECRET, role=role, sub=user, ttl=ttl, **claims)

    @property
    def service(self) -> str:
        return mint_token(SECRET, role="service_role", ttl=3600)


def server_env(db: SupabaseDatabase, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": db.dsn,
        "DB_SLOT": f"tidings_authz_srv_{os.getpid()}_{next(_slots)}",
        "DB_RESUME_GRACE": "0",
        "JWT_SECRET": SECRET,
        **extra,
    }


def prepare_rooms(db: SupabaseDatabase) -> tuple[str, str]:
    """The guide's schema and policies (after Tidings migrated realtime.messages); alice and bob."""
    db.execute(ROOMS_SCHEMA)
    for policy in (RECEIVE_BROADCAST, SEND_BROADCAST, LISTEN_PRESENCE, TRACK_PRESENCE, READ_ONLY):
        db.execute(policy)
    db.execute("INSERT INTO public.rooms (topic) VALUES ('room-1'), ('room-2'), ('room-3')")
    alice, bob = db.add_user("alice@example.com"), db.add_user("bob@example.com")
    for room in ("room-1", "room-2", "room-3"):
        db.execute("INSERT INTO public.rooms_users (user_id, topic) VALUES (%s, %s)", (alice, room))
    return alice, bob


@pytest.fixture(scope="module")
def site(postgres: PostgresServer) -> Iterator[Site]:
    db = create_supabase_database(postgres)
    server = ServerProcess(env=server_env(db)).start()  # migrates realtime.messages
    try:
        alice, bob = prepare_rooms(db)
        yield Site(db, server, alice, bob)
    finally:
        server.stop()
        drop_slots(postgres, db.name)
    logs = server.logs()
    assert "Traceback" not in logs, logs


class Client:
    """A raw WebSocket client: joins that may be refused, pushes, and every frame received."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.refs = itertools.count(1)
        self.texts: list[list[Any]] = []
        self.binaries: list[bytes] = []
        self.v1 = False
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, server: ServerProcess, token: str, vsn: str = "2.0.0") -> Client:
        url = server.http_url.replace("http", "ws", 1) + f"/realtime/v1/websocket?vsn={vsn}&apikey={token}"
        client = cls(await connect(url, open_timeout=10, max_size=None))
        client.v1 = vsn == "1.0.0"
        return client

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    self.binaries.append(raw)
                    continue
                msg = json.loads(raw)
                if isinstance(msg, dict):  # vsn 1.0.0: as an array
                    msg = [msg.get("join_ref"), msg["ref"], msg["topic"], msg["event"], msg["payload"]]
                self.texts.append(msg)
        except Exception:
            pass

    async def send(self, join_ref: str | None, topic: str, event: str, payload: dict[str, Any]) -> str:
        ref = str(next(self.refs))
        if self.v1:
            msg: Any = {"join_ref": join_ref, "ref": ref, "topic": topic, "event": event, "payload": payload}
        else:
            msg = [join_ref, ref, topic, event, payload]
        await self.ws.send(json.dumps(msg))
        return ref

    async def join(
        self, topic: str, config: dict[str, Any], token: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """``phx_join``; returns its join_ref and the reply payload (ok or error)."""
        ref = str(next(self.refs))
        payload: dict[str, Any] = {"config": config}
        if token is not None:
            payload["access_token"] = token
        msg: Any = [ref, ref, topic, "phx_join", payload]
        if self.v1:
            msg = {"join_ref": ref, "ref": ref, "topic": topic, "event": "phx_join", "payload": payload}
        await self.ws.send(json.dumps(msg))
        reply = await self.wait(lambda m: m[3] == "phx_reply" and m[1] == ref)
        return ref, reply[4]

    async def wait(self, match: Any, timeout: float = WAIT) -> list[Any]:
        async with asyncio.timeout(timeout):
            while True:
                for msg in self.texts:
                    if match(msg):
                        return msg
                await asyncio.sleep(0.01)

    def after(self, msg: list[Any]) -> list[list[Any]]:
        """Messages received after ``msg``."""
        return self.texts[self.texts.index(msg) + 1 :]

    def broadcasts(self, topic: str) -> list[dict[str, Any]]:
        return [m[4] for m in self.texts if m[3] == "broadcast" and m[2] == topic]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        await c.close()


async def opened(made: list[Client], site: Site, token: str, vsn: str = "2.0.0") -> Client:
    c = await Client.open(site.server, token, vsn)
    made.append(c)
    return c


async def rest(site: Site, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=site.server.http_url, timeout=WAIT) as http:
        return await http.request(method, path, headers={"apikey": token}, **kwargs)


async def metric(site: Site, name: str) -> float:
    return await server_metric(site.server, name)


async def server_metric(server: ServerProcess, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server.http_url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


PRIVATE = {"private": True}


# -- the read check at join ------------------------------------------------------------------------


async def test_joins_are_allowed_and_denied_by_the_policies(site: Site, clients: list[Client]) -> None:
    alice = await opened(clients, site, site.token(site.alice))
    _, reply = await alice.join("realtime:room-1", PRIVATE)
    assert reply["status"] == "ok", reply
    _, reply = await alice.join("realtime:room-9", PRIVATE)  # a room she is not a member of
    assert reply == {"status": "error", "response": {"reason": errors.unauthorized_read_reason("room-9")}}
    bob = await opened(clients, site, site.token(site.bob))
    _, reply = await bob.join("realtime:room-1", PRIVATE)
    assert reply == {"status": "error", "response": {"reason": errors.unauthorized_read_reason("room-1")}}
    anon = await opened(clients, site, site.token(None, role="anon"))
    _, reply = await anon.join("realtime:room-1", PRIVATE)
    assert reply["status"] == "error"
    # The public channel of the same name is open to everyone.
    _, reply = await bob.join("realtime:room-1", {})
    assert reply["status"] == "ok"
    # service_role is always allowed (no policy names it).
    service = await opened(clients, site, site.service)
    _, reply = await service.join("realtime:room-1", PRIVATE)
    assert reply["status"] == "ok"
    _, reply = await service.join("realtime:anything-at-all", PRIVATE)
    assert reply["status"] == "ok"
    # A join's own access_token decides, not the socket's apikey.
    _, reply = await bob.join("realtime:room-2", PRIVATE, token=site.token(site.alice))
    assert reply["status"] == "ok"


# -- the write check at the first broadcast or track -----------------------------------------------


async def test_members_write_and_their_first_messages_wait_for_the_check_in_order(
    site: Site, clients: list[Client]
) -> None:
    listener = await opened(clients, site, site.service)
    await listener.join("realtime:room-2", PRIVATE)
    alice = await opened(clients, site, site.token(site.alice))
    join_ref, reply = await alice.join("realtime:room-2", {"private": True, "broadcast": {"ack": True}})
    assert reply["status"] == "ok"
    refs = []
    for i in range(5):  # sent at once: the first starts the write check, the others wait behind it
        payload = {"type": "broadcast", "event": "n", "payload": {"i": i}}
        refs.append(await alice.send(join_ref, "realtime:room-2", "broadcast", payload))
    for ref in refs:
        ack = await alice.wait(lambda m, ref=ref: m[3] == "phx_reply" and m[1] == ref)
        assert ack[4] == {"status": "ok", "response": {}}
    await listener.wait(lambda m: m[3] == "broadcast" and m[4]["payload"] == {"i": 4})
    assert [b["payload"]["i"] for b in listener.broadcasts("realtime:room-2")] == [0, 1, 2, 3, 4]


async def test_writes_without_permission_are_dropped_and_tracks_refused(
    site: Site, clients: list[Client]
) -> None:
    listener = await opened(clients, site, site.service)
    await listener.join("realtime:readonly-1", PRIVATE)
    bob = await opened(clients, site, site.token(site.bob))
    config = {"private": True, "broadcast": {"ack": True, "self": True}, "presence": {"enabled": True}}
    join_ref, reply = await bob.join("realtime:readonly-1", config)
    assert reply["status"] == "ok"  # READ_ONLY lets him read
    sent = await bob.send(
        join_ref, "realtime:readonly-1", "broadcast", {"type": "broadcast", "event": "x", "payload": {}}
    )
    track = await bob.send(
        join_ref,
        "realtime:readonly-1",
        "presence",
        {"type": "presence", "event": "track", "payload": {"a": 1}},
    )
    refused = await bob.wait(lambda m: m[3] == "phx_reply" and m[1] == track)
    assert refused[4] == {"status": "error", "response": {}}
    r = await rest(
        site,
        site.service,
        "POST",
        "/api/broadcast",
        json={"messages": [{"topic": "readonly-1", "event": "marker", "payload": {}, "private": True}]},
    )
    assert r.status_code == 202
    await listener.wait(lambda m: m[3] == "broadcast" and m[4]["event"] == "marker")
    assert [b["event"] for b in listener.broadcasts("realtime:readonly-1")] == ["marker"]
    await bob.wait(lambda m: m[3] == "broadcast" and m[4]["event"] == "marker")
    assert not any(m[1] == sent for m in bob.texts), "a dropped broadcast gets no ack"
    assert [b["event"] for b in bob.broadcasts("realtime:readonly-1")] == ["marker"]
    assert not any(m[3] == "presence_diff" for m in listener.texts)


# -- refresh -----------------------------------------------------------------------------------------


async def test_a_refresh_that_loses_read_closes_the_channel(site: Site, clients: list[Client]) -> None:
    user = site.db.add_user()
    site.db.execute("INSERT INTO public.rooms_users (user_id, topic) VALUES (%s, 'room-3')", (user,))
    member = await opened(clients, site, site.token(user))
    join_ref, reply = await member.join("realtime:room-3", PRIVATE)
    assert reply["status"] == "ok"
    # Still a member: a new token keeps the channel (nothing is said).
    await member.send(
        join_ref, "realtime:room-3", "access_token", {"access_token": site.token(user, ttl=7000)}
    )
    site.db.execute("DELETE FROM public.rooms_users WHERE user_id = %s", (user,))
    await member.send(
        join_ref, "realtime:room-3", "access_token", {"access_token": site.token(user, ttl=8000)}
    )
    system = await member.wait(lambda m: m[3] == "system")
    assert system[4] == {
        "extension": "system",
        "status": "error",
        "message": errors.read_permission_revoked_message("room-3"),
        "channel": "room-3",
    }
    assert member.after(system)[0][3] == "phx_close"
    # Delivery stopped at once: a broadcast sent now does not reach it.
    r = await rest(
        site,
        site.service,
        "POST",
        "/api/broadcast",
        json={"messages": [{"topic": "room-3", "event": "after", "payload": {}, "private": True}]},
    )
    assert r.status_code == 202
    probe = await opened(clients, site, site.service)
    await probe.join("realtime:room-3", PRIVATE)
    r = await rest(
        site,
        site.service,
        "POST",
        "/api/broadcast",
        json={"messages": [{"topic": "room-3", "event": "marker", "payload": {}, "private": True}]},
    )
    await probe.wait(lambda m: m[3] == "broadcast" and m[4]["event"] == "marker")
    assert member.broadcasts("realtime:room-3") == []


# -- REST and history ----------------------------------------------------------------------------------


async def test_rest_private_broadcasts_and_history_follow_the_policies(
    site: Site, clients: list[Client]
) -> None:
    listener = await opened(clients, site, site.service)
    await listener.join("realtime:room-1", PRIVATE)
    batch = {
        "messages": [
            {"topic": "room-1", "event": "from-bob", "payload": {}, "private": True},
            {"topic": "room-1", "event": "public-from-bob", "payload": {}},
        ]
    }
    r = await rest(site, site.token(site.bob), "POST", "/api/broadcast", json=batch)
    assert r.status_code == 202  # the unauthorized topic is skipped silently, as Supabase does
    r = await rest(
        site, site.token(site.bob), "POST", "/api/broadcast/room-1/events/single?private=true", json={}
    )
    assert (r.status_code, r.json()) == (403, {"message": errors.HTTP_UNAUTHORIZED})
    batch = {"messages": [{"topic": "room-1", "event": "from-alice", "payload": {"k": 1}, "private": True}]}
    r = await rest(site, site.token(site.alice), "POST", "/realtime/v1/api/broadcast", json=batch)
    assert r.status_code == 202
    await listener.wait(lambda m: m[3] == "broadcast" and m[4]["event"] == "from-alice")
    assert [b["event"] for b in listener.broadcasts("realtime:room-1")] == ["from-alice"]
    # History: read permission, as a join.
    path = "/api/channels/room-1/messages"
    r = await rest(site, site.token(site.bob), "GET", path, params={"private": "true", "since_seq": 0})
    assert (r.status_code, r.json()) == (403, {"message": errors.unauthorized_read_reason("room-1")})
    r = await rest(site, site.token(site.alice), "GET", path, params={"private": "true", "since_seq": 0})
    assert r.status_code == 200 and [m["event"] for m in r.json()["messages"]] == ["from-alice"]
    assert await metric(site, "tidings_authorization_queries_total") > 0


# -- replication_ready -----------------------------------------------------------------------------------


async def test_replication_ready_is_pushed_once_the_stream_is_live(site: Site, clients: list[Client]) -> None:
    alice = await opened(clients, site, site.token(site.alice))
    for topic, config in (("realtime:feed", {}), ("realtime:room-1", PRIVATE)):
        _, reply = await alice.join(topic, {**config, "broadcast": {"replication_ready": True}})
        assert reply["status"] == "ok"
        reply_msg = next(m for m in alice.texts if m[3] == "phx_reply" and m[2] == topic)
        system = await alice.wait(lambda m, topic=topic: m[3] == "system" and m[2] == topic)
        assert system[4] == {
            "extension": "system",
            "status": "ok",
            "message": errors.REPLICATION_READY_MESSAGE,
            "channel": topic.removeprefix("realtime:"),
        }
        assert alice.texts.index(system) > alice.texts.index(reply_msg)


# -- replay from realtime.messages ---------------------------------------------------------------------------


def send_rows(db: SupabaseDatabase, topic: str, count: int, event: str = "old") -> list[str]:
    for i in range(count):
        db.execute("SELECT realtime.send(jsonb_build_object('i', %s), %s, %s, true)", (i, event, topic))
    rows = db.execute(
        "SELECT id::text FROM realtime.messages WHERE topic = %s AND event = %s ORDER BY inserted_at",
        (topic, event),
    )
    return [str(r[0]) for r in rows]


async def test_replay_since_limit_newest_rows_oldest_first(site: Site, clients: list[Client]) -> None:
    since = int(time.time() * 1000) - 60_000
    ids = send_rows(site.db, "room-1", 5, event="replay-json")
    alice = await opened(clients, site, site.token(site.alice))
    config = {"private": True, "broadcast": {"replay": {"since": since, "limit": 3}}}
    _, reply = await alice.join("realtime:room-1", config)
    assert reply["status"] == "ok"
    reply_msg = next(m for m in alice.texts if m[3] == "phx_reply")
    await alice.wait(lambda m: m[3] == "broadcast" and m[4]["meta"].get("id") == ids[-1])
    replayed = [m for m in alice.after(reply_msg) if m[3] == "broadcast"][:3]
    assert [m[4]["meta"] for m in replayed] == [{"replayed": True, "id": i} for i in ids[-3:]]
    assert [m[4]["payload"]["i"] for m in replayed] == [2, 3, 4]
    assert all(m[4]["type"] == "broadcast" and m[4]["event"] == "replay-json" for m in replayed)
    # A since outside what a timestamp holds: Supabase's reason.
    _, reply = await alice.join(
        "realtime:room-2", {"private": True, "broadcast": {"replay": {"since": 10**18}}}
    )
    assert reply == {"status": "error", "response": {"reason": errors.REPLAY_PARAMS_INVALID}}
    # Replay needs broadcast read: bob may not join at all.
    bob = await opened(clients, site, site.token(site.bob))
    _, reply = await bob.join("realtime:room-1", config)
    assert reply == {"status": "error", "response": {"reason": errors.unauthorized_read_reason("room-1")}}


async def test_binary_rows_replay_as_binary_on_vsn_2_and_are_skipped_on_vsn_1(
    site: Site, clients: list[Client]
) -> None:
    since = int(time.time() * 1000) - 60_000
    site.db.execute("SELECT realtime.send_binary('\\x00ff10'::bytea, 'blob', 'room-2', true)")
    json_ids = send_rows(site.db, "room-2", 1, event="after-blob")
    ((blob_id,),) = site.db.execute("SELECT id::text FROM realtime.messages WHERE event = 'blob'")
    config = {"private": True, "broadcast": {"replay": {"since": since}}}
    v2 = await opened(clients, site, site.token(site.alice))
    _, reply = await v2.join("realtime:room-2", config)
    assert reply["status"] == "ok"
    await v2.wait(lambda m: m[3] == "broadcast" and m[4]["meta"].get("id") == json_ids[0])
    [frame] = v2.binaries
    kind, topic_len, event_len, meta_len, encoding = frame[:5]
    body = frame[5:]
    assert (kind, encoding) == (4, 0)
    assert body[:topic_len] == b"realtime:room-2" and body[topic_len : topic_len + event_len] == b"blob"
    meta = json.loads(body[topic_len + event_len : topic_len + event_len + meta_len])
    assert meta == {"replayed": True, "id": blob_id}
    assert body[topic_len + event_len + meta_len :] == b"\x00\xff\x10"
    v1 = await opened(clients, site, site.token(site.alice), vsn="1.0.0")
    _, reply = await v1.join("realtime:room-2", config)
    assert reply["status"] == "ok"
    await v1.wait(lambda m: m[3] == "broadcast" and m[4]["meta"].get("id") == json_ids[0])
    assert v1.binaries == [] and blob_id not in {b["meta"]["id"] for b in v1.broadcasts("realtime:room-2")}


async def test_replayed_rows_are_not_delivered_again_live(postgres: PostgresServer) -> None:
    """Rows sent while Tidings was down: replayed at join, then streamed when the slot resumes
    (DB_RESUME_GRACE): the live copies of the replayed ids are suppressed, later rows arrive."""
    db = create_supabase_database(postgres)
    env = server_env(db, DB_RESUME_GRACE="6s")
    server = ServerProcess(env=env).start()
    try:
        alice, _ = prepare_rooms(db)
        server.stop()
        since = int(time.time() * 1000) - 60_000
        ids = send_rows(db, "room-1", 3, event="while-down")
        server.start()  # the slot exists: it streams once the grace is over
        client = await Client.open(server, mint_token(SECRET, role="authenticated", sub=alice, ttl=600))
        try:
            config = {"private": True, "broadcast": {"replay": {"since": since, "limit": 10}}}
            _, reply = await client.join("realtime:room-1", config)
            assert reply["status"] == "ok"
            await client.wait(lambda m: m[3] == "broadcast" and m[4]["meta"].get("id") == ids[-1])
            # Replayed before the stream resumed: its live copies come after the join.
            assert await server_metric(server, "tidings_db_broadcasts_total") == 0
            later = send_rows(db, "room-1", 1, event="after-grace")
            await client.wait(
                lambda m: m[3] == "broadcast" and m[4]["meta"].get("id") == later[0], timeout=40
            )
            got = [b["meta"]["id"] for b in client.broadcasts("realtime:room-1")]
            assert got == [*ids, later[0]]  # each once
            assert await server_metric(server, "tidings_db_broadcasts_total") == 4
        finally:
            await client.close()
    finally:
        server.stop()
        drop_slots(postgres, db.name)


async def test_a_cluster_of_two_nodes_authorizes_replays_and_relays(postgres: PostgresServer) -> None:
    """With Redis the joins read through the broker (a task): the checks, the replay and the
    buffering of what fans out meanwhile take that path too."""
    from tests.support.redis import RedisServer

    redis = RedisServer(persist=False).start()
    db = create_supabase_database(postgres)
    env = server_env(db, REDIS_URL=redis.url)
    first = ServerProcess(env=env).start()
    second = ServerProcess(env=env).start()
    made: list[Client] = []
    try:
        alice, bob = prepare_rooms(db)
        since = int(time.time() * 1000) - 60_000
        ids = send_rows(db, "room-1", 2, event="cluster-replay")

        def tok(user: str | None, role: str = "authenticated") -> str:
            return mint_token(SECRET, role=role, sub=user, ttl=600)

        listener = await Client.open(second, tok(None, "service_role"))
        made.append(listener)
        _, reply = await listener.join(
            "realtime:room-1", {"private": True, "broadcast": {"replication_ready": True}}
        )
        assert reply["status"] == "ok"
        await listener.wait(lambda m: m[3] == "system" and m[4]["status"] == "ok")
        member = await Client.open(first, tok(alice))
        made.append(member)
        config = {"private": True, "broadcast": {"ack": True, "replay": {"since": since}}}
        join_ref, reply = await member.join("realtime:room-1", config)
        assert reply["status"] == "ok"
        await member.wait(lambda m: m[3] == "broadcast" and m[4]["meta"].get("id") == ids[-1])
        assert [b["meta"] for b in member.broadcasts("realtime:room-1")] == [
            {"replayed": True, "id": i} for i in ids
        ]
        ref = await member.send(
            join_ref, "realtime:room-1", "broadcast", {"type": "broadcast", "event": "hi", "payload": {}}
        )
        ack = await member.wait(lambda m: m[3] == "phx_reply" and m[1] == ref)
        assert ack[4]["status"] == "ok"
        await listener.wait(lambda m: m[3] == "broadcast" and m[4]["event"] == "hi")
        outsider = await Client.open(second, tok(bob))
        made.append(outsider)
        _, reply = await outsider.join("realtime:room-1", {"private": True})
        assert reply == {"status": "error", "response": {"reason": errors.unauthorized_read_reason("room-1")}}
    finally:
        for c in made:
            await c.close()
        first.stop()
        second.stop()
        drop_slots(postgres, db.name)
        redis.cleanup()
    for server in (first, second):
        assert "Traceback" not in server.logs(), server.logs()
