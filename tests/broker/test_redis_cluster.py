"""The Redis broker on a real 3-primary Redis Cluster: the contract, sharded pub/sub, faults."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from tests.support.redis import RedisClusterServers, RedisServer
from tidings.broker.redis import RedisBroker

from .contract import CHECKS, Inbox, publish
from .test_redis import _factory

pytestmark = pytest.mark.redis

KEYS = [f"p:room-{i}" for i in range(12)]


def _cli(node: RedisServer, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(node.port), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_cluster_broker(
    check: Callable[..., Coroutine[Any, Any, None]], redis_cluster: RedisClusterServers
) -> None:
    brokers: list[RedisBroker] = []
    try:
        await check(_factory(redis_cluster.url, brokers))
        assert all(b.cluster for b in brokers)
    finally:
        for b in brokers:
            await b.stop()


async def test_channels_are_sharded_over_every_primary(redis_cluster: RedisClusterServers) -> None:
    brokers: list[RedisBroker] = []
    make = _factory(redis_cluster.url, brokers)
    try:
        a, b = await make(), await make()
        inbox = Inbox(b)
        for key in KEYS:
            await b.subscribe(key)
        # Each primary holds the shard subscriptions of its own slots, and no plain channel is used.
        per_node = [_cli(n, "pubsub", "shardchannels").split() for n in redis_cluster.nodes]
        assert all(any(":ch:" in c for c in chans) for chans in per_node)
        assert sorted(c for chans in per_node for c in chans if ":ch:" in c) == sorted(
            b._channel(k) for k in KEYS
        )
        assert all(_cli(n, "pubsub", "channels").split() == [] for n in redis_cluster.nodes)
        seqs = {key: [await publish(a, key, "e", {"n": i}, f"{key}-{i}") for i in range(3)] for key in KEYS}
        got = await inbox.wait(3 * len(KEYS))
        for key in KEYS:
            assert [e.seq for e in got if e.key == key] == seqs[key]
        # A channel key with braces still keeps all its names on one slot.
        odd = "p:{x}y}"
        await b.subscribe(odd)
        odd_seq = await publish(a, odd, "e", {"n": 1}, "odd-1")
        await inbox.wait(3 * len(KEYS) + 1)
        replay = await b.replay(odd, odd_seq - 1, None, 10)
        assert replay.complete and [r.id for r in replay.records] == ["odd-1"]
        # The last subscriber leaving unsubscribes on the primary that holds the channel.
        b.unsubscribe(KEYS[0])
        await asyncio.sleep(0.2)
        assert b._channel(KEYS[0]) not in {
            c for n in redis_cluster.nodes for c in _cli(n, "pubsub", "shardchannels").split()
        }
        assert b.reconnects == 0  # our own SUNSUBSCRIBE is not mistaken for a moved slot
    finally:
        for br in brokers:
            await br.stop()


def _owner(cluster: RedisClusterServers, slot: int) -> tuple[RedisServer, str]:
    for node in cluster.nodes:
        node_id = _cli(node, "cluster", "myid").strip()
        for line in _cli(node, "cluster", "nodes").splitlines():
            fields = line.split()
            if fields[0] != node_id:
                continue
            for rng in fields[8:]:
                lo, _, hi = rng.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return node, node_id
    raise AssertionError(f"no owner for slot {slot}")


async def test_moved_slot_is_resubscribed_on_its_new_primary() -> None:
    cluster = RedisClusterServers(masters=3).start()
    brokers: list[RedisBroker] = []
    make = _factory(cluster.url, brokers)
    try:
        publisher, listener = await make(), await make()
        inbox = Inbox(listener)
        key = "p:moving"
        await listener.subscribe(key)
        await publish(publisher, key, "e", {"n": 0}, "mv0")
        await inbox.wait(1)
        channel = listener._channel(key)
        slot = int(_cli(cluster.nodes[0], "cluster", "keyslot", channel))
        source, source_id = _owner(cluster, slot)
        target = next(n for n in cluster.nodes if n is not source)
        target_id = _cli(target, "cluster", "myid").strip()
        # The standard migration: importing/migrating, move the keys, then hand the slot over.
        _cli(target, "cluster", "setslot", str(slot), "importing", source_id)
        _cli(source, "cluster", "setslot", str(slot), "migrating", target_id)
        keys = _cli(source, "cluster", "getkeysinslot", str(slot), "100").split()
        assert keys
        _cli(source, "migrate", "127.0.0.1", str(target.port), "", "0", "5000", "keys", *keys)
        for node in (target, source):
            _cli(node, "cluster", "setslot", str(slot), "node", target_id)
        # The listener is told (sunsubscribe), rebuilds from the new slot map and goes on in order.
        async with asyncio.timeout(15):
            while listener.reconnects == 0 or not listener.connected.is_set():
                await asyncio.sleep(0.05)
            while channel not in _cli(target, "pubsub", "shardchannels").split():
                await asyncio.sleep(0.05)
        for i in range(1, 4):
            await publish(publisher, key, "e", {"n": i}, f"mv{i}")
        got = await inbox.wait(4, timeout=10)
        assert [e.payload["n"] for e in got] == [0, 1, 2, 3]
        assert [e.seq - got[0].seq for e in got] == [0, 1, 2, 3]  # the numbers moved with the slot
        assert inbox.gaps == []
    finally:
        for br in brokers:
            await br.stop()
        cluster.cleanup()


async def test_restarted_primary_is_resubscribed_and_its_losses_reported() -> None:
    cluster = RedisClusterServers(masters=3).start()
    brokers: list[RedisBroker] = []
    make = _factory(cluster.url, brokers)
    try:
        publisher, listener = await make(), await make()
        inbox = Inbox(listener)
        for key in KEYS:
            await listener.subscribe(key)
            await publish(publisher, key, "e", {"n": 0}, f"{key}-0")
        await inbox.wait(len(KEYS))
        # One primary restarts without persistence: its channels' history and numbers are gone.
        victim = cluster.nodes[1]
        slots = {k: int(_cli(victim, "cluster", "keyslot", listener._channel(k))) for k in KEYS}
        lost = {k for k in KEYS if _owner(cluster, slots[k])[0] is victim}
        assert lost and len(lost) < len(KEYS)
        victim.restart()
        async with asyncio.timeout(20):
            while cluster._state(victim) != "ok":
                await asyncio.sleep(0.1)
            while listener.reconnects == 0 or not listener.connected.is_set():
                await asyncio.sleep(0.05)
        for key in KEYS:
            await publish(publisher, key, "e", {"n": 1}, f"{key}-1")
        await inbox.wait(2 * len(KEYS), timeout=10)
        async with asyncio.timeout(10):
            while set(inbox.gaps) != lost:
                await asyncio.sleep(0.05)
        # Channels on the primaries that stayed up lost nothing and reported nothing.
        for key in set(KEYS) - lost:
            assert [e.payload["n"] for e in inbox.envelopes if e.key == key] == [0, 1]
    finally:
        for br in brokers:
            await br.stop()
        cluster.cleanup()


async def test_cluster_with_a_database_number_fails_at_start_in_one_line(
    redis_cluster: RedisClusterServers,
) -> None:
    broker = RedisBroker(redis_cluster.url + "/3")
    with pytest.raises(RuntimeError, match="Redis at .*/3: SELECT is not allowed in cluster mode"):
        await broker.start()
    await broker.redis.aclose()
