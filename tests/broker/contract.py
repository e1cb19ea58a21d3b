"""One broker contract, run against every implementation (memory and Redis).

Each test takes ``make``: an async factory returning started brokers that share one cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tidings.broker.base import DUPLICATE, Broker, Envelope
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
]
