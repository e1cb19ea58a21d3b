"""The broker contract against Redis, plus what only a shared Redis can show."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from tests.support.redis import RedisServer
from tidings.broker.base import DUPLICATE, Broker
from tidings.broker.redis import SEQ_TTL, RedisBroker

from .contract import CHECKS, Inbox, publish

pytestmark = pytest.mark.redis


def _factory(url: str, brokers: list[RedisBroker]) -> Callable[..., Coroutine[Any, Any, RedisBroker]]:
    prefix = f"t{uuid.uuid4().hex[:8]}"  # every test its own key space

    async def make(history_size: int = 100) -> RedisBroker:
        broker = RedisBroker(url, history_size, 300.0, prefix=prefix, node_timeout=2.0, health_interval=0.5)
        broker.bind(lambda env: None)
        await broker.start()
        brokers.append(broker)
        return broker

    return make


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_redis_broker(
    check: Callable[..., Coroutine[Any, Any, None]], redis_server: RedisServer
) -> None:
    brokers: list[RedisBroker] = []
    try:
        await check(_factory(redis_server.url, brokers))
    finally:
        for b in brokers:
            await b.stop()


async def test_messages_cross_nodes_in_order(redis_server: RedisServer) -> None:
    brokers: list[RedisBroker] = []
    make = _factory(redis_server.url, brokers)
    try:
        a, b = await make(), await make()
        inbox_b = Inbox(b)
        await b.subscribe("p:x")
        seqs = [await publish(a, "p:x", "e", {"n": i}, f"m{i}") for i in range(20)]
        got = await inbox_b.wait(20)
        assert [e.seq for e in got] == seqs
        assert all(e.origin == a.node_id for e in got)
    finally:
        for br in brokers:
            await br.stop()


async def test_dead_node_presence_disappears(redis_server: RedisServer) -> None:
    brokers: list[RedisBroker] = []
    make = _factory(redis_server.url, brokers)
    try:
        a, b = await make(), await make()
        inbox_b = Inbox(b)
        await b.subscribe("p:room")
        a.track("p:room", 1, "alice", {"phx_ref": "ra"})
        b.track("p:room", 1, "bob", {"phx_ref": "rb"})
        await asyncio.sleep(0.3)
        assert set(await b.presence_state("p:room")) == {"alice", "bob"}
        # Node a dies without a goodbye: its heartbeat stops, its tasks vanish.
        for task in a._tasks:
            task.cancel()
        brokers.remove(a)
        async with asyncio.timeout(10):
            while "alice" in await b.presence_state("p:room"):
                await asyncio.sleep(0.1)
            while not any(e.kind == "p" and "alice" in e.payload["leaves"] for e in inbox_b.envelopes):
                await asyncio.sleep(0.1)
        assert set(await b.presence_state("p:room")) == {"bob"}
    finally:
        for br in brokers:
            await br.stop()


async def test_redis_restart_resubscribes_and_fills_from_history() -> None:
    server = RedisServer(persist=True).start()
    brokers: list[RedisBroker] = []
    make = _factory(server.url, brokers)
    try:
        publisher, listener = await make(), await make()
        inbox = Inbox(listener)
        await listener.subscribe("p:r")
        await publish(publisher, "p:r", "e", {"n": 0}, "before")
        await inbox.wait(1)
        server.restart()
        async with asyncio.timeout(15):
            while not listener.connected.is_set() or listener.reconnects == 0:
                await asyncio.sleep(0.05)
        await publish(publisher, "p:r", "e", {"n": 1}, "after")
        got = await inbox.wait(2, timeout=10)
        assert [e.payload["n"] for e in got] == [0, 1]
        assert inbox.gaps == []
    finally:
        for br in brokers:
            await br.stop()
        server.cleanup()


async def test_messages_lost_with_redis_data_are_reported_as_a_gap() -> None:
    server = RedisServer(persist=False).start()
    brokers: list[RedisBroker] = []
    make = _factory(server.url, brokers)
    try:
        publisher, listener = await make(), await make()
        inbox = Inbox(listener)
        await listener.subscribe("p:g")
        await publish(publisher, "p:g", "e", {"n": 0}, "g0")
        await inbox.wait(1)
        server.restart()  # no persistence: history and sequence numbers are gone
        async with asyncio.timeout(15):
            while not listener.connected.is_set() or listener.reconnects == 0:
                await asyncio.sleep(0.05)
        await publish(publisher, "p:g", "e", {"n": 1}, "g1")
        async with asyncio.timeout(10):
            while not inbox.gaps:
                await asyncio.sleep(0.05)
        assert inbox.gaps == ["p:g"]
    finally:
        for br in brokers:
            await br.stop()
        server.cleanup()


async def test_unsubscribed_channels_are_not_delivered(redis_server: RedisServer) -> None:
    brokers: list[RedisBroker] = []
    broker = await _factory(redis_server.url, brokers)()
    inbox = Inbox(broker)
    await broker.subscribe("p:keep")
    await broker.subscribe("p:drop")
    broker.unsubscribe("p:drop")
    await asyncio.sleep(0.1)
    await publish(broker, "p:drop", "e", {}, "d1")
    await publish(broker, "p:keep", "e", {}, "k1")
    got = await inbox.wait(1)
    await asyncio.sleep(0.2)
    assert [e.key for e in got] == ["p:keep"]
    for br in brokers:
        await br.stop()


def test_broker_protocol() -> None:
    assert issubclass(RedisBroker, Broker)


async def test_gap_fill_keeps_origin_and_excluded_channel(redis_server: RedisServer) -> None:
    brokers: list[RedisBroker] = []
    make = _factory(redis_server.url, brokers)
    try:
        publisher, listener = await make(), await make()
        inbox = Inbox(listener)
        await listener.subscribe("p:f")
        seq = await publish(publisher, "p:f", "e", {"n": 1}, "f1", exclude=7)
        await inbox.wait(1)
        listener._last_seq["p:f"] = seq - 1  # as if the live message had been missed
        await listener._fill_gaps(["p:f"])
        refilled = await inbox.wait(2)
        assert (refilled[1].seq, refilled[1].origin, refilled[1].exclude) == (seq, publisher.node_id, 7)
    finally:
        for br in brokers:
            await br.stop()


async def test_reconnect_fill_reads_many_channels_and_skips_live_ones(redis_server: RedisServer) -> None:
    brokers: list[RedisBroker] = []
    make = _factory(redis_server.url, brokers)
    try:
        publisher, listener = await make(), await make()
        keys = [f"p:many-{i}" for i in range(700)]  # more than one pipelined read
        for key in keys:
            await listener.subscribe(key)
        seqs = {}
        for key in keys:
            seqs[key] = await publish(publisher, key, "e", {"k": key}, f"{key}-1")
        await asyncio.sleep(0.3)  # the live deliveries are in
        inbox = Inbox(listener)
        # As if the subscription had dropped before these messages: all but one were missed.
        for key in keys:
            listener._last_seq[key] = seqs[key] - 1
        listener._last_seq[keys[0]] = seqs[keys[0]]  # this one arrived live meanwhile
        await listener._fill_gaps(keys)
        assert sorted(e.key for e in inbox.envelopes) == sorted(keys[1:])
        assert inbox.gaps == []
    finally:
        for br in brokers:
            await br.stop()


async def test_replay_racing_publishes_is_never_falsely_incomplete(redis_server: RedisServer) -> None:
    brokers: list[RedisBroker] = []
    make = _factory(redis_server.url, brokers)
    try:
        # History and limit far above what can be published between two reads: any incomplete
        # answer would be false.
        publisher, reader = await make(history_size=50_000), await make(history_size=50_000)
        key = "p:race"
        await publish(publisher, key, "e", {"n": 0}, "race-0")
        stop = asyncio.Event()

        async def keep_publishing() -> None:
            n = 0
            while not stop.is_set() and n < 20_000:
                n += 1
                publisher.publish(key, "realtime:race", "e", {"n": n}, f"race-{n}")
                await asyncio.sleep(0)

        task = asyncio.ensure_future(keep_publishing())
        incomplete = 0
        for _ in range(300):
            since = await reader.last_seq(key)
            assert since is not None
            result = await reader.replay(key, since, None, 50_000)
            incomplete += not result.complete
        stop.set()
        await task
        assert incomplete == 0
    finally:
        for br in brokers:
            await br.stop()


async def test_identical_replays_in_flight_share_one_read(redis_server: RedisServer) -> None:
    brokers: list[RedisBroker] = []
    make = _factory(redis_server.url, brokers)
    try:
        broker = await make()
        first = await publish(broker, "p:share", "e", {"n": 1}, "s1")
        await publish(broker, "p:share", "e", {"n": 2}, "s2")
        results = await asyncio.gather(*[broker.replay("p:share", first - 1, None, 10) for _ in range(50)])
        assert all(r is results[0] for r in results)  # one read, fifty rejoining clients
        assert results[0].complete and [r.payload["n"] for r in results[0].records] == [1, 2]
        assert broker._replays == {}
        later = await broker.replay("p:share", first, None, 10)  # not cached once done
        assert later is not results[0] and [r.payload["n"] for r in later.records] == [2]
    finally:
        for br in brokers:
            await br.stop()


async def test_a_replay_already_sent_is_not_shared(redis_server: RedisServer) -> None:
    # A joiner's live buffer starts before its replay's read; sharing a read sent earlier could
    # miss a message published between that read and the joiner's buffer.
    brokers: list[RedisBroker] = []
    make = _factory(redis_server.url, brokers)
    try:
        broker = await make()
        first = await publish(broker, "p:late", "e", {"n": 1}, "l1")
        early = asyncio.ensure_future(broker.replay("p:late", first - 1, None, 10))
        async with asyncio.timeout(5):
            while not broker._replays:
                await asyncio.sleep(0)
            while broker._replays:  # the writer took the read
                await asyncio.sleep(0)
        late = await broker.replay("p:late", first - 1, None, 10)
        assert late is not await early
    finally:
        for br in brokers:
            await br.stop()


async def test_a_live_message_skipping_ahead_fills_the_hole_from_history(redis_server: RedisServer) -> None:
    brokers: list[RedisBroker] = []
    make = _factory(redis_server.url, brokers)
    try:
        publisher, listener = await make(), await make()
        await listener.subscribe("p:hole")
        first = await publish(publisher, "p:hole", "e", {"n": 1}, "h1")
        await asyncio.sleep(0.2)
        inbox = Inbox(listener)
        listener._last_seq["p:hole"] = first - 1  # as if message 1 had never arrived
        second = await publish(publisher, "p:hole", "e", {"n": 2}, "h2")
        got = await inbox.wait(2)
        assert sorted(e.seq for e in got) == [first, second]
        assert inbox.gaps == []
    finally:
        for br in brokers:
            await br.stop()


async def test_counter_and_epoch_expire_together_a_lost_epoch_is_replaced(redis_server: RedisServer) -> None:
    brokers: list[RedisBroker] = []
    make = _factory(redis_server.url, brokers)
    try:
        broker = await make()
        seq = await publish(broker, "p:ttl", "e", {}, "t1")
        seq_key = broker._name("seq", "p:ttl")
        # Both keys live SEQ_TTL after the last publish (the epoch key was never refreshed before).
        ttls = await broker.call(lambda r: asyncio.gather(r.ttl(seq_key), r.ttl(seq_key + ":start")))
        assert all(SEQ_TTL - 60 < t <= SEQ_TTL for t in ttls), ttls
        _, epoch = await broker.position("p:ttl")
        await broker.call(lambda r: r.delete(seq_key + ":start"))  # evicted by maxmemory, say
        assert not (await broker.replay("p:ttl", seq - 1, None, 10)).complete  # nothing proves it
        again, new_epoch = await broker.position("p:ttl")
        assert again == seq and new_epoch != epoch
        assert not (await broker.replay("p:ttl", seq - 1, None, 10, epoch)).complete
        assert (await broker.replay("p:ttl", seq, None, 10, new_epoch)).complete
    finally:
        for br in brokers:
            await br.stop()


async def test_a_scoped_id_crosses_nodes(redis_server: RedisServer) -> None:
    brokers: list[RedisBroker] = []
    make = _factory(redis_server.url, brokers)
    try:
        a, b = await make(), await make()
        inbox = Inbox(b)
        await b.subscribe("p:ids")
        await publish(a, "p:ids", "e", {"n": 1}, "same", sender="anon@10.0.0.1")
        await publish(a, "p:ids", "e", {"n": 2}, "same", sender="sub:bob")
        # Node b computes the same tag (one salt for the cluster): bob's re-send through it is a duplicate.
        assert await publish(b, "p:ids", "e", {"n": 2}, "same", sender="sub:bob") == DUPLICATE
        got = await inbox.wait(2)
        assert [e.id for e in got] == ["same", "same~" + a.sender_tag("sub:bob")]
        assert a.sender_tag("sub:bob") == b.sender_tag("sub:bob")
    finally:
        for br in brokers:
            await br.stop()
