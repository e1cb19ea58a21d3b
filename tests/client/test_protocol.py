"""The client against the in-test fake Phoenix server: joins, broadcasts, presence, heartbeats."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tidings.client import (
    Broadcast,
    ChannelState,
    ConnectionState,
    JoinRejected,
    PostgresChange,
    PresenceEvent,
    RealtimeClient,
    SendStatus,
    SystemMessage,
)

from .conftest import wait_until
from .fake_server import FakeServer, kind4

MakeClient = Callable[..., RealtimeClient]


@pytest.mark.parametrize("vsn", ["1.0.0", "2.0.0"])
async def test_join_reply_and_broadcast_between_two_clients(
    server: FakeServer, make_client: MakeClient, vsn: str
) -> None:
    got: list[Broadcast] = []
    sender = make_client(server.url, vsn=vsn)
    receiver = make_client(server.url, vsn=vsn)
    await sender.connect()
    await receiver.connect()
    assert sender.state is ConnectionState.CONNECTED
    room_rx = receiver.channel("room").on_broadcast("chat", got.append)
    await room_rx.subscribe()
    room_tx = await sender.channel("room").subscribe()
    assert room_tx.state is ChannelState.JOINED
    topic, join = server.joins[0]
    assert topic == "realtime:room"
    assert join["config"]["broadcast"]["self"] is True  # asked for to keep the sequence whole
    assert join["access_token"] == "anon-key"

    receipt = await room_tx.send_broadcast("chat", {"text": "hi"})
    assert receipt.status is SendStatus.SENT
    await wait_until(lambda: len(got) == 1)
    assert got[0].payload == {"text": "hi"} and got[0].event == "chat"
    assert got[0].id == receipt.id and got[0].seq == 1

    [(_, _, pushed, binary)] = server.events("broadcast")
    assert binary is (vsn == "2.0.0")  # v2 sends kind-3 frames
    assert pushed["payload"] == {"text": "hi"}

    # The sender's own echo was filtered (it did not ask for self).
    sender_got: list[Broadcast] = []
    room_tx.on_broadcast("*", sender_got.append)
    await server.publish("room", "other", {"n": 1})
    await wait_until(lambda: len(sender_got) == 1)
    assert sender_got[0].seq == 2


async def test_binary_kind4_frames_json_and_raw(server: FakeServer, make_client: MakeClient) -> None:
    got: list[Broadcast] = []
    client = make_client(server.url)
    await client.connect()
    await client.channel("bin").on_broadcast("*", got.append).subscribe()
    server.binary_broadcasts = True
    await server.publish("bin", "json", {"a": [1, 2]})
    await server.publish("bin", "raw", b"\x00\xffdata")
    await wait_until(lambda: len(got) == 2)
    assert got[0].payload == {"a": [1, 2]} and got[0].seq == 1
    assert got[1].payload == b"\x00\xffdata" and got[1].event == "raw"
    # Raw bytes out: a kind-3 frame with encoding 0.
    receipt = await client.channel("bin").send_broadcast("up", b"\x01\x02")
    assert receipt.status is SendStatus.SENT
    await wait_until(lambda: len(server.events("broadcast")) == 1)
    assert server.events("broadcast")[0][2]["payload"] == b"\x01\x02"


async def test_raw_bytes_need_vsn2(server: FakeServer, make_client: MakeClient) -> None:
    client = make_client(server.url, vsn="1.0.0")
    with pytest.raises(ValueError):
        await client.channel("x").send_broadcast("e", b"1")


async def test_event_filtering_is_case_insensitive(server: FakeServer, make_client: MakeClient) -> None:
    chat: list[Broadcast] = []
    everything: list[Broadcast] = []
    client = make_client(server.url)
    await client.connect()
    await (
        client.channel("r").on_broadcast("Chat", chat.append).on_broadcast("*", everything.append).subscribe()
    )
    await server.publish("r", "chat", {})
    await server.publish("r", "other", {})
    await wait_until(lambda: len(everything) == 2)
    assert [b.event for b in chat] == ["chat"]


async def test_presence_state_and_diffs_merge(server: FakeServer, make_client: MakeClient) -> None:
    events: list[PresenceEvent] = []
    alice = make_client(server.url)
    bob = make_client(server.url, vsn="1.0.0")
    await alice.connect()
    await bob.connect()
    a_room = alice.channel("lobby", presence_key="alice")
    await a_room.subscribe()
    await a_room.track({"status": "online"})
    b_room = bob.channel("lobby", presence_key="bob")
    for name in ("sync", "join", "leave"):
        b_room.on_presence(name, events.append)
    await b_room.subscribe()
    await wait_until(lambda: "alice" in b_room.presence_state())
    assert b_room.presence_state()["alice"][0]["status"] == "online"
    assert any(e.event == "sync" for e in events)

    await b_room.track({"status": "here"})
    await wait_until(lambda: "bob" in b_room.presence_state() and "bob" in a_room.presence_state())
    await a_room.track({"status": "away"})  # an update: leave + join on the wire
    await wait_until(lambda: b_room.presence_state()["alice"][0]["status"] == "away")
    assert len(b_room.presence_state()["alice"]) == 1
    await a_room.untrack()
    await wait_until(lambda: "alice" not in b_room.presence_state())
    leaves = [e for e in events if e.event == "leave" and e.key == "alice"]
    assert leaves and leaves[-1].current == []


async def test_postgres_changes_routed_by_join_ids(server: FakeServer, make_client: MakeClient) -> None:
    inserts: list[PostgresChange] = []
    updates: list[PostgresChange] = []
    system: list[SystemMessage] = []
    client = make_client(server.url)
    await client.connect()
    ch = (
        client.channel("db")
        .on_postgres_changes("INSERT", "public", "todos", None, inserts.append)
        .on_postgres_changes("UPDATE", "public", "todos", "id=eq.5", updates.append)
        .on_system(system.append)
    )
    await ch.subscribe()
    _, join = server.joins[0]
    assert join["config"]["postgres_changes"] == [
        {"event": "INSERT", "schema": "public", "table": "todos"},
        {"event": "UPDATE", "schema": "public", "table": "todos", "filter": "id=eq.5"},
    ]
    ids = [e["id"] for e in ch.last_join_response["postgres_changes"]]  # type: ignore[index]
    data = {
        "schema": "public",
        "table": "todos",
        "commit_timestamp": "2026-01-01T00:00:00.000Z",
        "type": "UPDATE",
        "columns": [],
        "record": {"id": 5},
        "old_record": {"id": 5},
        "errors": None,
    }
    await server.push_all("realtime:db", "postgres_changes", {"ids": [ids[1]], "data": data})
    await server.push_all(
        "realtime:db", "postgres_changes", {"ids": [ids[0]], "data": dict(data, type="INSERT")}
    )
    await server.push_all(
        "realtime:db",
        "system",
        {
            "extension": "postgres_changes",
            "status": "ok",
            "message": "Subscribed to PostgreSQL",
            "channel": "db",
        },
    )
    await wait_until(lambda: len(inserts) == 1 and len(updates) == 1 and len(system) == 1)
    assert updates[0].record == {"id": 5} and updates[0].type == "UPDATE"
    assert system[0].message == "Subscribed to PostgreSQL"
    with pytest.raises(ValueError):
        ch.on_postgres_changes("INSERT", "public", "x", None, inserts.append)  # after subscribe


async def test_join_rejected_raises_with_reason(server: FakeServer, make_client: MakeClient) -> None:
    server.join_error = "ChannelRateLimitReached: Too many channels"
    client = make_client(server.url)
    with pytest.raises(JoinRejected) as info:
        await client.channel("nope").subscribe()
    assert info.value.reason.startswith("ChannelRateLimitReached")
    assert client.channels == []


async def test_heartbeat_round_trip_is_measured(server: FakeServer, make_client: MakeClient) -> None:
    warnings: list[float] = []
    client = make_client(server.url)
    client.on("latency_warning", warnings.append)
    await client.connect()
    await wait_until(lambda: client.metrics_snapshot().latency_samples >= 1)  # first heartbeat at connect
    rtt = await client.heartbeat()
    assert rtt >= 0
    server.heartbeat_delay = 0.6  # above the 500 ms warning threshold
    slow = await client.heartbeat()
    client._record_heartbeat(slow)
    assert slow >= 600 and warnings == [slow]
    assert client.connection_quality.value in ("good", "poor")


async def test_ack_retry_once_then_error(server: FakeServer, make_client: MakeClient) -> None:
    client = make_client(server.url)
    await client.connect()
    ch = client.channel("acked", broadcast_ack=True)
    await ch.subscribe()
    assert (await ch.send_broadcast("e", {"n": 1})).status is SendStatus.OK
    assert client.metrics_snapshot().latency_samples >= 1
    server.ack_status = "error"
    receipt = await ch.send_broadcast("e", {"n": 2})
    assert receipt.status is SendStatus.QUEUED  # its one retry
    await wait_until(lambda: client.metrics.failed_messages == 1)
    sent_ids = [
        p["id"] for (_, ev, p, _) in server.received if ev == "broadcast" and p["payload"] == {"n": 2}
    ]
    assert sent_ids == [receipt.id, receipt.id]  # same id both times: receivers can deduplicate
    assert client.queue_size == 0


async def test_duplicates_are_dropped_by_id(server: FakeServer, make_client: MakeClient) -> None:
    got: list[Broadcast] = []
    client = make_client(server.url, recovery=False)
    await client.connect()
    await client.channel("d").on_broadcast("*", got.append).subscribe()
    body = {"type": "broadcast", "event": "e", "payload": {}, "meta": {"id": "same"}}
    for _ in range(3):
        await server.push_all("realtime:d", "broadcast", body)
    await server.push_all("realtime:d", "broadcast", dict(body, meta={"id": "other"}))
    await wait_until(lambda: len(got) == 2)
    assert client.metrics.duplicate_messages == 2


async def test_malformed_frames_are_ignored(server: FakeServer, make_client: MakeClient) -> None:
    got: list[Broadcast] = []
    client = make_client(server.url)
    await client.connect()
    await client.channel("m").on_broadcast("*", got.append).subscribe()
    await server.send_raw("not json")
    await server.send_raw(b"\x09garbage")
    await server.send_raw(orjson.dumps({"no": "array"}).decode())
    await server.send_raw(kind4("realtime:m", "ok", {"fine": True}, {"id": "k"}))
    await wait_until(lambda: len(got) == 1)
    assert client.state is ConnectionState.CONNECTED


async def test_set_auth_pushes_access_token_and_unsubscribe_leaves(
    server: FakeServer, make_client: MakeClient
) -> None:
    client = make_client(server.url)
    await client.connect()
    ch = await client.channel("auth").subscribe()
    await client.set_auth("user-jwt")
    await wait_until(lambda: server.events("access_token") != [])
    assert server.events("access_token")[0][2] == {"access_token": "user-jwt"}
    await ch.unsubscribe()
    assert server.events("phx_leave") and ch.state is ChannelState.CLOSED
    assert client.channels == []
    ch2 = await client.channel("auth").subscribe()
    assert server.joins[-1][1]["access_token"] == "user-jwt"
    assert ch2 is not ch


async def test_context_managers(server: FakeServer) -> None:
    got: list[Any] = []
    async with RealtimeClient(server.url, "k", heartbeat_interval=5) as client:
        async with client.channel("cm").on_broadcast("*", got.append) as ch:
            assert ch.joined
            await server.publish("cm", "e", {})
            await wait_until(lambda: len(got) == 1)
        assert ch.state is ChannelState.CLOSED
    assert client.state is ConnectionState.DISCONNECTED


async def test_async_callbacks_are_awaited_in_order(server: FakeServer, make_client: MakeClient) -> None:
    order: list[int] = []

    async def slow_then_record(b: Broadcast) -> None:
        order.append(b.payload["n"])

    client = make_client(server.url)
    await client.connect()
    await client.channel("o").on_broadcast("*", slow_then_record).subscribe()
    for n in range(20):
        await server.publish("o", "e", {"n": n})
    await wait_until(lambda: len(order) == 20)
    assert order == list(range(20))
