"""History, recovery and de-duplication against hostile clients (issue 11, sections 2, 4 and 5).

* History rings were never dropped: 4000 topics with 100 KB names gave +434 MB, still there after
  HISTORY_TTL. Now a ring nobody subscribes to is dropped once it keeps nothing, and the memory
  broker's history is bounded by HISTORY_MAX_BYTES as well as HISTORY_SIZE and HISTORY_MAX_CHANNELS.
* After a restart, a rejoin with an older ``since_seq`` said ``recovered: true`` with messages
  missing; after an eviction (an anon key posting to more junk topics than the channel cap) too.
  Now every channel numbering has an epoch, and a replay is recovered only when history proves it
  holds everything after ``since_seq``. Junk topics evict their own sender's history first.
* Message-id squatting: an anon client pre-published the id of a later service_role broadcast,
  which was then dropped as a duplicate (202 all the same). Now de-duplication is per sender.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection

from tests.server.test_bad_input import WAIT, join, open_ws, recv_json, ws_url
from tests.support.proxy import TcpProxy
from tests.support.server import ServerProcess
from tidings.auth.tokens import mint_token
from tidings.client import Broadcast, RealtimeClient, RecoveryGap
from tidings.history import MemoryHistory

ServerFactory = Callable[..., ServerProcess]

SECRET = "security-history-test-secret-that-is-long-enough-for-hs256"
T0 = 1_800_000_000.0
ANON = mint_token(SECRET, "anon", ttl=3600)
SERVICE = mint_token(SECRET, "service_role", ttl=3600)
ALICE = mint_token(SECRET, "authenticated", sub="alice", ttl=3600)


# -- unit: bounds, expiry, epochs and fairness of the memory history ---------------------------------


def test_junk_rings_with_long_names_are_dropped_once_expired() -> None:
    h = MemoryHistory(100, ttl=10)
    for i in range(200):
        h.append(f"p:{'x' * 10_000}{i}", f"id{i}", "e", {"junk": i}, now=T0, sender="anon@10.0.0.9")
    assert len(h) == 200 and h.bytes > 200 * 10_000
    h.pin("p:kept")
    kept = h.position("p:kept", "sub:alice", now=T0)
    h.sweep(now=T0 + 5)
    assert len(h) == 201  # nothing expired yet
    h.sweep(now=T0 + 11)
    # Only the subscribed channel is left, with its numbering; the junk is gone, bytes and all.
    assert len(h) == 1 and h.expired == 200 and h.position("p:kept", now=T0 + 11) == kept
    assert h.bytes < 1000


def test_history_is_bounded_by_bytes() -> None:
    h = MemoryHistory(100, 300, max_bytes=1_000_000)
    h.append("p:small", "s1", "e", {"n": 1}, now=T0, sender="sub:alice")
    payload = {"blob": "b" * 10_000}
    for i in range(400):  # 4 MB from one sender over 20 channels
        h.append(f"p:c{i % 20}", f"id{i}", "e", payload, now=T0 + i / 1000, sender="sub:mallory")
        assert h.bytes <= 1_000_000
    # The heavy sender paid: alice's channel still holds its message.
    assert h.evicted > 0 and [r.id for r in h.since_seq("p:small", 0, 10, now=T0 + 1).records] == ["s1"]


def test_one_huge_channel_trims_itself() -> None:
    h = MemoryHistory(100, 300, max_bytes=1_000_000)
    base, epoch = h.position("p:other", "sub:alice", now=T0)
    h.append("p:other", "o1", "e", {"n": 1}, now=T0, sender="sub:alice")
    for i in range(100):
        h.append("p:huge", f"id{i}", "e", {"blob": "b" * 50_000}, now=T0 + i / 1000, sender="sub:mallory")
    assert h.bytes <= 1_000_000 and h.last_seq("p:huge") is not None
    assert h.since_seq("p:other", base, 10, now=T0 + 1, epoch=epoch).complete


def test_junk_topics_evict_their_own_senders_rings_first() -> None:
    h = MemoryHistory(100, 300, max_channels=100)
    base, epoch = h.position("p:orders", "sub:alice", now=T0)
    for i in range(3):
        h.append("p:orders", f"o{i}", "e", {"n": i}, now=T0, sender="service_role@10.0.0.2")
    for i in range(1000):
        h.append(f"p:junk{i}", f"j{i}", "e", {}, now=T0 + 1 + i / 1000, sender="anon@10.0.0.9")
    assert len(h) <= 100 and h.evicted >= 900
    result = h.since_seq("p:orders", base, 10, now=T0 + 3, epoch=epoch)
    assert result.complete and [r.id for r in result.records] == ["o0", "o1", "o2"]


def test_many_light_senders_evict_the_oldest_idle_ring_never_a_subscribed_one() -> None:
    h = MemoryHistory(100, 300, max_channels=50)
    h.pin("p:watched")
    watched = h.position("p:watched", "sub:alice", now=T0)
    h.append("p:idle", "i1", "e", {}, now=T0, sender="sub:bob")
    for i in range(200):  # every sender under its share: the least recently active idle ring goes
        h.append(f"p:t{i}", f"t{i}", "e", {}, now=T0 + 1 + i / 1000, sender=f"anon@10.0.{i}.1")
    assert len(h) == 50
    assert h.last_seq("p:idle") is None and h.position("p:watched", now=T0 + 2) == watched


def test_an_evicted_ring_is_never_recovered() -> None:
    h = MemoryHistory(100, 300, max_channels=20)
    _, epoch = h.position("p:lobby", "anon@10.0.0.9", now=T0)
    seqs = [h.append("p:lobby", f"l{i}", "e", {}, now=T0, sender="anon@10.0.0.9") for i in range(3)]
    for i in range(50):  # the same sender's junk: its own oldest ring, the lobby, goes
        h.append(f"p:junk{i}", f"j{i}", "e", {}, now=T0 + 1 + i / 1000, sender="anon@10.0.0.9")
    assert h.last_seq("p:lobby") is None
    assert not h.since_seq("p:lobby", seqs[0], 10, now=T0 + 2, epoch=epoch).complete
    h.append("p:lobby", "again", "e", {}, now=T0 + 2, sender="anon@10.0.0.9")
    for given in (epoch, None):
        result = h.since_seq("p:lobby", seqs[0], 10, now=T0 + 2, epoch=given)
        assert not result.complete and [r.id for r in result.records] == ["again"]


def test_dedup_is_per_sender() -> None:
    h = MemoryHistory(100, 300)
    h.append("p:orders", "order-42", "e", {"junk": True}, now=T0, sender="anon@10.0.0.9")
    assert h.admit("p:orders", "order-42", "anon@10.0.0.9") is None  # its own re-send
    scoped = h.admit("p:orders", "order-42", "service_role@10.0.0.2")
    assert scoped is not None and scoped.startswith("order-42~")
    h.append("p:orders", scoped, "e", {"real": True}, now=T0, sender="service_role@10.0.0.2")
    assert h.admit("p:orders", "order-42", "service_role@10.0.0.2") is None  # a re-send, scoped
    # The tag is keyed: guessing it and squatting the scoped id too does not drop the message.
    h.append("p:orders", f"order-7~{h.sender_tag('sub:bob')}", "e", {}, now=T0, sender="anon@10.0.0.9")
    h.append("p:orders", "order-7", "e", {}, now=T0, sender="anon@10.0.0.9")
    assert h.admit("p:orders", "order-7", "sub:bob") is not None


# -- real servers ------------------------------------------------------------------------------------


def rest(server: ServerProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.http_url, timeout=WAIT)


async def post(client: httpx.AsyncClient, key: str | None, *messages: dict[str, Any]) -> None:
    headers = {} if key is None else {"apikey": key, "authorization": f"Bearer {key}"}
    response = await client.post("/api/broadcast", json={"messages": list(messages)}, headers=headers)
    assert response.status_code == 202, response.text


def message(topic: str, n: Any, msg_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"topic": topic, "event": "e", "payload": {"n": n}}
    if msg_id is not None:
        body["id"] = msg_id
    return body


@contextlib.asynccontextmanager
async def subscriber(
    server: ServerProcess, topic: str, key: str | None = None, **broadcast: Any
) -> AsyncIterator[tuple[ClientConnection, dict[str, Any]]]:
    """A v2 connection joined to ``realtime:<topic>``, and its join reply's response."""
    params = {} if key is None else {"apikey": key}
    async with open_ws(ws_url(server, **params)) as ws:
        reply = await join(ws, f"realtime:{topic}", config={"broadcast": broadcast})
        assert reply["status"] == "ok", reply
        yield ws, reply["response"]


async def broadcasts(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The payloads of the next ``count`` broadcasts (other frames are skipped)."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        frame = await recv_json(ws)
        if frame[3] == "broadcast":
            got.append(frame[4])
    return got


async def rejoin(
    server: ServerProcess, topic: str, since_seq: int, epoch: str | None = None, key: str | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Join with a replay since ``since_seq``: the reply's response and the replayed broadcasts."""
    replay: dict[str, Any] = {"since_seq": since_seq, "limit": 25}
    if epoch is not None:
        replay["epoch"] = epoch
    async with subscriber(server, topic, key, replay=replay) as (ws, response):
        # A heartbeat after the join: its reply marks the end of what the join sent.
        await ws.send(orjson.dumps([None, "hb", "phoenix", "heartbeat", {}]).decode())
        replayed = []
        while (frame := await recv_json(ws))[1] != "hb":
            if frame[3] == "broadcast":
                replayed.append(frame[4])
        return response, replayed


def metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in /metrics")


async def test_a_restart_is_never_recovered(server_factory: ServerFactory) -> None:
    srv = server_factory()
    async with rest(srv) as client:
        async with subscriber(srv, "room") as (ws, first):
            await post(client, None, *(message("room", i) for i in range(1, 6)))
            seen = await broadcasts(ws, 5)
        since, epoch = seen[-1]["meta"]["seq"], first["epoch"]
        await post(client, None, *(message("room", i) for i in range(6, 9)))  # missed: 6..8
        srv.restart()
        await post(client, None, message("room", 9))
        for given in (None, epoch):
            response, replayed = await rejoin(srv, "room", since, given)
            assert response["recovered"] is False, given
            assert [m["payload"]["n"] for m in replayed] == [9]  # what the new history has
            assert response["epoch"] != epoch
        page = (await client.get("/api/channels/room/messages", params={"since_seq": since})).json()
        assert page["complete"] is False and [m["payload"]["n"] for m in page["messages"]] == [9]
        # The honest case after that: nothing lost, so recovered.
        response, _ = await rejoin(srv, "room", since)
        again, replayed = await rejoin(srv, "room", response["seq"], response["epoch"])
        assert again["recovered"] is True and replayed == []


async def until(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_the_sdk_is_told_what_a_restart_lost(server_factory: ServerFactory) -> None:
    srv = server_factory()
    got: list[Broadcast] = []
    gaps: list[RecoveryGap] = []
    async with rest(srv) as api, TcpProxy(srv.port) as proxy:
        client = RealtimeClient(
            f"ws://127.0.0.1:{proxy.port}/realtime/v1",
            "anon-key",
            heartbeat_interval=1.0,
            reconnect_base_delay=0.2,
            reconnect_max_delay=1.0,
            max_reconnect_attempts=60,
            connect_timeout=2.0,
            close_timeout=0.5,
            order_gap_timeout=0.5,
            fallback_enabled=False,
        )
        client.on_recovery_incomplete(gaps.append)
        try:
            await client.connect()
            await client.channel("room").on_broadcast("*", got.append).subscribe()
            await post(api, None, *(message("room", i) for i in range(1, 6)))
            await until(lambda: len(got) == 5)
            proxy.accepting = False
            proxy.cut()
            await post(api, None, *(message("room", i) for i in range(6, 9)))  # missed
            await asyncio.to_thread(srv.restart)
            await post(api, None, message("room", 9))
            proxy.accepting = True
            await until(lambda: len(got) == 6)
            assert [b.payload["n"] for b in got] == [1, 2, 3, 4, 5, 9]
            # Messages 6..8 are gone with the old process: the application is told, not misled.
            fifth = got[4].seq
            assert fifth is not None
            assert [(g.first_seq, g.reason) for g in gaps] == [(fifth + 1, "replay_incomplete")]
        finally:
            await client.close()


async def test_junk_topics_do_not_evict_another_senders_history(server_factory: ServerFactory) -> None:
    srv = server_factory({"JWT_SECRET": SECRET, "HISTORY_MAX_CHANNELS": "50"})
    async with rest(srv) as client:
        async with subscriber(srv, "orders", ALICE) as (ws, baseline):
            await post(client, SERVICE, *(message("orders", i) for i in range(3)))
            first = (await broadcasts(ws, 3))[0]["meta"]["seq"]
        async with subscriber(srv, "lobby", ANON) as (ws, lobby):
            await post(client, ANON, message("lobby", "hello"))
            lobby_seq = (await broadcasts(ws, 1))[0]["meta"]["seq"]
        # The anon key posts to more junk topics than the cap, all in a moment.
        for batch in range(3):
            await post(client, ANON, *(message(f"junk-{batch}-{i}", i) for i in range(50)))
        text = (await client.get("/metrics")).text
        assert metric(text, "tidings_history_channels") <= 50
        assert metric(text, "tidings_history_dropped_total", '{reason="evicted"}') >= 100
        # Alice's channel (another sender's) kept everything: recovered, with its messages.
        response, replayed = await rejoin(srv, "orders", first, baseline["epoch"], ALICE)
        assert response["recovered"] is True and [m["payload"]["n"] for m in replayed] == [1, 2]
        # The anon key's own channel paid for its junk, and its rejoin is told so.
        response, replayed = await rejoin(srv, "lobby", lobby_seq, lobby["epoch"], ANON)
        assert response["recovered"] is False and replayed == []


async def test_history_bytes_are_bounded_and_counted(server_factory: ServerFactory) -> None:
    srv = server_factory({"HISTORY_MAX_BYTES": "300000"})
    async with rest(srv) as client:
        blob = "b" * 20_000
        for batch in range(4):  # 1.6 MB of history asked for
            await post(client, None, *(message(f"big-{batch}-{i}", blob) for i in range(20)))
        text = (await client.get("/metrics")).text
        assert 0 < metric(text, "tidings_history_bytes") <= 300_000
        assert metric(text, "tidings_history_dropped_total", '{reason="evicted"}') > 0


async def test_expired_rings_are_dropped_but_a_subscribed_channel_keeps_its_numbering(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory({"HISTORY_TTL": "1s"})
    async with rest(srv) as client:
        async with subscriber(srv, "kept") as (_, baseline):
            await post(client, None, *(message(f"{'x' * 200}-{i}", i) for i in range(30)))
            text = (await client.get("/metrics")).text
            assert metric(text, "tidings_history_channels") == 31
            async with asyncio.timeout(30):  # the sweeper drops expired rings every 10 s
                while metric((await client.get("/metrics")).text, "tidings_history_channels") > 1:
                    await asyncio.sleep(0.5)
            text = (await client.get("/metrics")).text
            assert metric(text, "tidings_history_dropped_total", '{reason="expired"}') >= 30
            assert metric(text, "tidings_history_bytes") < 10_000
            response, _ = await rejoin(srv, "kept", baseline["seq"], baseline["epoch"])
            assert response["recovered"] is True


async def test_an_id_used_first_by_another_sender_still_delivers(server_factory: ServerFactory) -> None:
    srv = server_factory({"JWT_SECRET": SECRET})
    async with rest(srv) as client, subscriber(srv, "orders", ALICE) as (ws, _):
        await post(client, ANON, {**message("orders", "junk", "order-42")})  # the squatter, first
        await post(client, SERVICE, {**message("orders", "real", "order-42")})
        junk, real = await broadcasts(ws, 2)
        assert junk["payload"] == {"n": "junk"} and junk["meta"]["id"] == "order-42"
        assert real["payload"] == {"n": "real"} and real["meta"]["id"].startswith("order-42~")
        # A squatter on the WebSocket, the same.
        async with subscriber(srv, "orders", ANON) as (squatter, _):
            await squatter.send(
                orjson.dumps(
                    [
                        "1",
                        "b1",
                        "realtime:orders",
                        "broadcast",
                        {"type": "broadcast", "event": "e", "payload": {"n": "junk"}, "id": "order-43"},
                    ]
                ).decode()
            )
            assert (await broadcasts(ws, 1))[0]["meta"]["id"] == "order-43"
        await post(client, SERVICE, {**message("orders", "real", "order-43")})
        assert (await broadcasts(ws, 1))[0]["payload"] == {"n": "real"}
        # A sender's own re-send is still delivered once: the next broadcast is the one after it.
        await post(client, SERVICE, {**message("orders", "real", "order-42")})
        await post(client, SERVICE, message("orders", "after"))
        assert (await broadcasts(ws, 1))[0]["payload"] == {"n": "after"}
        text = (await client.get("/metrics")).text
        assert metric(text, "tidings_broadcast_ids_scoped_total") == 2
