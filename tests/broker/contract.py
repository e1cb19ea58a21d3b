"""One broker contract, run against every implementation (memory, Redis, Redis Cluster).

Each test takes ``make``: an async factory returning started brokers that share one cluster.
The interface as the node uses it is covered: publish, replay, position, presence, the join's
reads (``join``, and ``join_now`` for in-process brokers), ``sweep``, ``pending``, and the
``ChangeBus`` of the brokers that span nodes (change fan-out, ordered fence, the lease).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tidings.broker.base import DUPLICATE, Broker, Envelope, ReplayQuery
from tidings.broker.memory import MemoryBroker
from tidings.history import MemoryHistory

MakeBroker = Callable[..., Awaitable[Broker]]


class Inbox:
    """Collects what a broker delivers."""

    def __init__(self, broker: Broker) -> None:
        self.envelopes: list[Envelope] = []
        self.gaps: list[str] = []
        broker.bind(self.envelopes.append, self.gaps.append)

    async def wait(self, count: int, timeout: float = 5.0) -> list[Envelope]:
        async with asyncio.timeout(timeout):
            while len(self.envelopes) < count:
                await asyncio.sleep(0.01)
        return self.envelopes


async def publish(
    broker: Broker,
    key: str,
    event: str,
    payload: Any,
    msg_id: str,
    exclude: int | None = None,
    sender: str = "",
) -> int:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    broker.publish(key, "realtime:" + key[2:], event, payload, msg_id, exclude, fut.set_result, sender)
    return await asyncio.wait_for(fut, 5)


async def lose_numbering(broker: Broker, key: str) -> None:
    """What a restart does to the memory broker's history, and a data loss to Redis's."""
    if isinstance(broker, MemoryBroker):
        old = broker.history
        broker.history = MemoryHistory(old.size, old.ttl, old.max_channels, old.max_bytes)
        return
    seq_key = broker._name("seq", key)  # type: ignore[attr-defined]
    names = [seq_key, seq_key + ":start", broker._name("hist", key)]  # type: ignore[attr-defined]
    await broker.call(lambda r: r.delete(*names))  # type: ignore[attr-defined]


async def check_publish_numbers_and_delivers(make: MakeBroker) -> None:
    broker = await make()
    inbox = Inbox(broker)
    await broker.subscribe("p:room")
    s1 = await publish(broker, "p:room", "a", {"n": 1}, "m1", exclude=7)
    s2 = await publish(broker, "p:room", "b", {"n": 2}, "m2")
    assert s2 == s1 + 1
    got = await inbox.wait(2)
    assert [(e.kind, e.event, e.payload, e.id, e.seq) for e in got] == [
        ("b", "a", {"n": 1}, "m1", s1),
        ("b", "b", {"n": 2}, "m2", s2),
    ]
    assert got[0].origin == broker.node_id and got[0].exclude == 7
    assert got[0].topic == "realtime:room"


async def check_duplicate_ids_are_published_once(make: MakeBroker) -> None:
    broker = await make()
    inbox = Inbox(broker)
    await broker.subscribe("p:dup")
    first = await publish(broker, "p:dup", "e", {}, "same-id")
    again = await publish(broker, "p:dup", "e", {}, "same-id")
    assert first > 0 and again == DUPLICATE
    await publish(broker, "p:dup", "e", {}, "other-id")
    got = await inbox.wait(2)
    await asyncio.sleep(0.1)
    assert [e.id for e in got] == ["same-id", "other-id"]


async def check_binary_payloads_round_trip(make: MakeBroker) -> None:
    broker = await make()
    inbox = Inbox(broker)
    await broker.subscribe("p:bin")
    await publish(broker, "p:bin", "raw", b"\x00\x01\xff", "b1")
    got = await inbox.wait(1)
    assert got[0].payload == b"\x00\x01\xff"
    replay = await broker.replay("p:bin", 0, None, 10)
    assert replay.records[0].payload == b"\x00\x01\xff"


async def check_replay_since_seq(make: MakeBroker) -> None:
    broker = await make()
    seqs = [await publish(broker, "p:hist", "e", {"n": i}, f"h{i}") for i in range(5)]
    full = await broker.replay("p:hist", seqs[0] - 1, None, 10)
    assert [r.seq for r in full.records] == seqs and full.complete
    # From before the channel's numbering began (0, or a number of a lost history): every record,
    # but nothing proves there was no message before them.
    older = await broker.replay("p:hist", 0, None, 10)
    assert [r.seq for r in older.records] == seqs and not older.complete
    tail = await broker.replay("p:hist", seqs[2], None, 10)
    assert [r.payload["n"] for r in tail.records] == [3, 4] and tail.complete
    none = await broker.replay("p:hist", seqs[-1], None, 10)
    assert none.records == [] and none.complete
    limited = await broker.replay("p:hist", seqs[0], None, 2)
    assert [r.payload["n"] for r in limited.records] == [1, 2] and not limited.complete


async def check_replay_reports_trimmed_history_as_incomplete(make: MakeBroker) -> None:
    broker = await make(history_size=3)
    seqs = [await publish(broker, "p:trim", "e", {"n": i}, f"t{i}") for i in range(6)]
    result = await broker.replay("p:trim", seqs[0], None, 10)
    assert [r.payload["n"] for r in result.records] == [3, 4, 5]
    assert not result.complete  # seqs[1] and seqs[2] are gone: never a silent gap


async def check_join_baseline_before_any_message_recovers(make: MakeBroker) -> None:
    broker = await make()
    seq, epoch = await broker.position("p:fresh", "sub:joiner")
    assert await broker.position("p:fresh") == (seq, epoch)  # the same numbering, not a new one
    quiet = await broker.replay("p:fresh", seq, None, 10, epoch)
    assert quiet.records == [] and quiet.complete and quiet.epoch == epoch
    s1 = await publish(broker, "p:fresh", "e", {"n": 1}, "f1")
    assert s1 == seq + 1
    result = await broker.replay("p:fresh", seq, None, 10, epoch)
    assert [r.seq for r in result.records] == [s1] and result.complete and result.epoch == epoch
    # The same numbers from another epoch prove nothing.
    assert not (await broker.replay("p:fresh", seq, None, 10, "0-elsewhere")).complete


async def check_lost_numbering_is_never_recovered(make: MakeBroker) -> None:
    broker = await make()
    _, epoch = await broker.position("p:lost")
    seqs = [await publish(broker, "p:lost", "e", {"n": i}, f"l{i}") for i in range(3)]
    await lose_numbering(broker, "p:lost")  # a restart, an eviction, a Redis data loss
    after = await publish(broker, "p:lost", "e", {"n": 9}, "l9")
    for given in (epoch, None):  # with the epoch passed back, and without it (seq alone)
        result = await broker.replay("p:lost", seqs[0], None, 10, given)
        assert not result.complete, given
        assert [r.payload["n"] for r in result.records] == [9]
        assert result.epoch is not None and result.epoch != epoch
    new_seq, new_epoch = await broker.position("p:lost")
    assert new_seq == after and new_epoch != epoch
    assert (await broker.replay("p:lost", after - 1, None, 10, new_epoch)).complete


async def check_any_since_seq_is_answered(make: MakeBroker) -> None:
    broker = await make()
    seq = await publish(broker, "p:odd", "e", {}, "o1")
    for since in (-5, 2**70):  # a client's number may be anything
        result = await broker.replay("p:odd", since, None, 10)
        assert not result.complete
    assert (await broker.replay("p:odd", seq - 1, None, 10)).complete


async def check_dedup_is_per_sender(make: MakeBroker) -> None:
    broker = await make()
    inbox = Inbox(broker)
    await broker.subscribe("p:squat")
    anon, service = "anon@10.0.0.9", "service_role@10.0.0.2"
    squatter = await publish(broker, "p:squat", "e", {"junk": True}, "order-1", sender=anon)
    real = await publish(broker, "p:squat", "e", {"real": True}, "order-1", sender=service)
    assert squatter > 0 and real == squatter + 1  # the real message is not a duplicate
    # Each sender's own re-send is one.
    assert await publish(broker, "p:squat", "e", {"real": True}, "order-1", sender=service) == DUPLICATE
    assert await publish(broker, "p:squat", "e", {"junk": True}, "order-1", sender=anon) == DUPLICATE
    got = await inbox.wait(2)
    await asyncio.sleep(0.1)
    assert [e.payload for e in got] == [{"junk": True}, {"real": True}]
    assert got[0].id == "order-1" and got[1].id is not None and got[1].id.startswith("order-1~")
    replay = await broker.replay("p:squat", squatter - 1, None, 10)
    assert [r.id for r in replay.records] == [got[0].id, got[1].id]
    assert broker.history_stats()["scoped_ids"] == 1


async def check_replay_since_time_gives_newest(make: MakeBroker) -> None:
    broker = await make()
    for i in range(4):
        await publish(broker, "p:time", "e", {"n": i}, f"x{i}")
    result = await broker.replay("p:time", None, 0.0, 2)
    assert [r.payload["n"] for r in result.records] == [2, 3]


async def check_presence_state_and_diffs(make: MakeBroker) -> None:
    a = await make()
    inbox = Inbox(a)
    await a.subscribe("p:lobby")
    a.track("p:lobby", 1, "alice", {"phx_ref": "r1", "status": "on"})
    a.track("p:lobby", 2, "alice", {"phx_ref": "r2", "status": "away"})
    a.track("p:lobby", 3, "bob", {"phx_ref": "r3"})
    a.publish_presence(
        "p:lobby", "realtime:lobby", {"joins": {"bob": {"metas": [{"phx_ref": "r3"}]}}, "leaves": {}}
    )
    got = await inbox.wait(1)
    assert got[0].kind == Envelope.PRESENCE and got[0].payload["joins"]["bob"]["metas"][0]["phx_ref"] == "r3"
    state = await _eventually(lambda: a.presence_state("p:lobby"), lambda s: len(s) == 2)
    assert sorted(m["phx_ref"] for m in state["alice"]["metas"]) == ["r1", "r2"]
    a.untrack("p:lobby", 1)
    state = await _eventually(lambda: a.presence_state("p:lobby"), lambda s: len(s["alice"]["metas"]) == 1)
    assert state["alice"]["metas"][0]["phx_ref"] == "r2"


async def check_join_reads_after_the_subscription(make: MakeBroker) -> None:
    b = await make()
    inbox = Inbox(b)
    seqs = [await publish(b, "p:joinme", "e", {"n": i}, f"j{i}") for i in range(3)]
    b.track("p:joinme", 1, "alice", {"phx_ref": "r1"})
    await _eventually(lambda: b.presence_state("p:joinme"), lambda s: "alice" in s)
    query = ReplayQuery(seqs[0], None, 10)
    read = b.join_now("p:joinme", query, True, "sub:joiner")
    # An in-process broker answers at once; one that needs I/O does nothing until awaited.
    assert (read is not None) == b.synchronous
    if read is None:
        read = await b.join("p:joinme", query, True, "sub:joiner")
    assert read.replay is not None and [r.seq for r in read.replay.records] == seqs[1:]
    assert read.replay.complete
    assert read.presence is not None and [m["phx_ref"] for m in read.presence["alice"]["metas"]] == ["r1"]
    assert read.position[0] == seqs[-1] and read.position[1] == read.replay.epoch
    # The join subscribed b: what is published next reaches it live.
    live = await publish(b, "p:joinme", "e", {"n": 9}, "j9")
    await _eventually_true(lambda: any(e.seq == live for e in inbox.envelopes))
    assert [e.key for e in inbox.envelopes if e.seq == live] == ["p:joinme"]
    bare = await b.join("p:quiet", None, False)
    assert bare.replay is None and bare.presence is None
    assert bare == await b.join("p:quiet", None, False)  # the baseline is kept, not started again


async def check_sweep_keeps_subscribed_channels_and_pending_drains(make: MakeBroker) -> None:
    broker = await make()
    await broker.subscribe("p:kept")
    seq = await publish(broker, "p:kept", "e", {}, "k1")
    position = await broker.position("p:kept")
    broker.sweep(time.time() + 3600)  # long after every ttl: a subscribed channel keeps its numbering
    assert await broker.position("p:kept") == position and position[0] == seq
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    broker.publish("p:kept", "realtime:kept", "e", {}, "k2", None, fut.set_result)
    assert broker.pending() >= 0
    await asyncio.wait_for(fut, 5)
    await _eventually_true(lambda: broker.pending() == 0)
    assert broker.pending() == 0


async def check_change_bus_fans_out_in_order_and_leases_once(make: MakeBroker) -> None:
    a, b = await make(), await make()  # two nodes of one cluster (the memory broker has none)
    bus_a, bus_b = a.change_bus, b.change_bus
    if bus_a is None or bus_b is None:
        # One process: Postgres Changes deliver locally, there is nothing to lease.
        assert a.synchronous and bus_b is None
        return
    inbox = Inbox(b)
    await bus_b.subscribe("cdc")
    answered: list[Any] = []
    for n in range(3):
        bus_a.publish_change("cdc", {"n": n}, answered.append)
    fenced: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    bus_a.after_queued(fenced.set_result)
    await asyncio.wait_for(fenced, 5)
    assert len(answered) == 3 and not any(isinstance(r, Exception) for r in answered)  # answered first
    got = await inbox.wait(3)
    assert [(e.kind, e.payload) for e in got] == [(Envelope.CHANGE, {"n": n}) for n in range(3)]
    assert {e.origin for e in got} == {a.node_id}
    # The lease: one holder at a time; renewing keeps it; resigning frees it at once.
    assert await bus_a.lease("test:lease", 5.0)
    assert not await bus_b.lease("test:lease", 5.0)
    assert await bus_a.lease("test:lease", 5.0)
    await bus_b.resign("test:lease")  # not the holder: nothing happens
    assert not await bus_b.lease("test:lease", 5.0)
    await bus_a.resign("test:lease")
    assert await bus_b.lease("test:lease", 5.0)
    assert not await bus_a.lease("test:lease", 5.0)
    # A lease not renewed expires.
    assert await bus_a.lease("test:short", 0.2)
    await _eventually_true(lambda: bus_b.lease("test:short", 0.2))


async def _eventually_true(ok: Callable[[], bool | Awaitable[bool]]) -> None:
    async with asyncio.timeout(5):
        while True:
            value = ok()
            if value if isinstance(value, bool) else await value:
                return
            await asyncio.sleep(0.02)


async def _eventually(
    get: Callable[[], Awaitable[dict[str, Any]]], ok: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    async with asyncio.timeout(5):
        while True:
            value = await get()
            if ok(value):
                return value
            await asyncio.sleep(0.02)


CHECKS = [
    check_publish_numbers_and_delivers,
    check_duplicate_ids_are_published_once,
    check_binary_payloads_round_trip,
    check_replay_since_seq,
    check_replay_reports_trimmed_history_as_incomplete,
    check_join_baseline_before_any_message_recovers,
    check_lost_numbering_is_never_recovered,
    check_dedup_is_per_sender,
    check_any_since_seq_is_answered,
    check_replay_since_time_gives_newest,
    check_presence_state_and_diffs,
    check_join_reads_after_the_subscription,
    check_sweep_keeps_subscribed_channels_and_pending_drains,
    check_change_bus_fans_out_in_order_and_leases_once,
]
