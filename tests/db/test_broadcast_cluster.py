"""Broadcast from Database in a Redis cluster: only the node holding the change-feed lease streams
realtime.messages; when it dies, the next lease holder delivers what it left unconfirmed and what
was sent meanwhile."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer
from tests.support.supabase_db import SupabaseDatabase, create_supabase_database
from tidings.broker.redis import RedisBroker
from tidings.cdc.cluster import ChangeFeedLeader
from tidings.cdc.service import PostgresChanges
from tidings.db.broadcast import BroadcastFromDatabase
from tidings.db.migrations import prepare

from .test_broadcast_from_database import Recorder, drop_slots, send, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

_names = itertools.count(1)


@pytest.fixture
def cluster_db(postgres: PostgresServer) -> Iterator[SupabaseDatabase]:
    db = create_supabase_database(postgres)
    conn = db.connect()
    try:
        prepare(conn)
    finally:
        conn.close()
    yield db
    drop_slots(postgres, db.name)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer(persist=False).start()
    yield server
    server.cleanup()


class Node:
    """What a cluster node runs for this feature: broker, Postgres Changes, lease, messages stream."""

    def __init__(self, db: SupabaseDatabase, redis_url: str, prefix: str, slots: tuple[str, str]) -> None:
        self.broker = RedisBroker(redis_url, prefix=prefix, node_timeout=2.0, health_interval=0.5)
        self.broker.bind(lambda env: None)
        self.cdc = PostgresChanges(db.dsn, slot=slots[0], deliver=lambda *args: None)
        self.leader = ChangeFeedLeader(self.cdc, self.broker, lease_ttl=1.5)
        self.got = Recorder()
        self.stream = BroadcastFromDatabase(db.dsn, self.got, slot=slots[1])
        self.lease_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.broker.start()
        self.lease_task = asyncio.get_running_loop().create_task(self.leader.run())
        self.stream.run_in_background(0.0, self.leader)

    async def crash(self) -> None:
        """Gone without a clean stop: nothing drained, the unconfirmed stays in the slot."""
        task, self.stream._task = self.stream._task, None
        if task is not None:
            task.cancel()
        await self.stream.stop_streaming()
        if self.lease_task is not None:
            self.lease_task.cancel()
            await asyncio.gather(self.lease_task, return_exceptions=True)

    async def stop(self) -> None:
        await self.stream.stop()
        if self.lease_task is not None and not self.lease_task.done():
            self.lease_task.cancel()
            await asyncio.gather(self.lease_task, return_exceptions=True)
        await self.cdc.stop()
        await self.broker.stop()


@pytest.fixture
async def nodes(cluster_db: SupabaseDatabase, redis: RedisServer) -> AsyncIterator[list[Node]]:
    n = next(_names)
    slots = (f"tidings_cl_changes_{n}", f"tidings_cl_messages_{n}")
    made = [Node(cluster_db, redis.url, f"bfd{n}", slots) for _ in range(2)]
    for node in made:
        await node.start()
    yield made
    for node in made:
        await node.stop()


async def test_only_the_lease_holder_streams_and_a_failover_loses_nothing(
    cluster_db: SupabaseDatabase, nodes: list[Node]
) -> None:
    db = cluster_db
    await wait_until(lambda: any(n.stream.streaming and n.stream.ready for n in nodes))
    leader = next(n for n in nodes if n.stream.streaming)
    follower = next(n for n in nodes if n is not leader)
    assert leader.leader.leader and not follower.leader.leader
    # The follower does not stream, yet a replication_ready join there is answered: the slot is live.
    await wait_until(lambda: follower.stream.ready)
    assert not follower.stream.streaming

    for i in range(1, 4):
        send(db, {"n": i}, "before", "room")
    await wait_until(lambda: len(leader.got.items) == 3)
    assert not follower.stream.streaming and follower.got.items == []

    # Handed to the broker, never reported stored: the next leader must send it again.
    leader.got.hold = True
    send(db, {"n": 4}, "unconfirmed", "room")
    await wait_until(lambda: len(leader.got.items) == 4)
    await leader.crash()
    for i in (5, 6):
        send(db, {"n": i}, "while-failing-over", "room")

    await wait_until(lambda: len(follower.got.items) >= 3)
    assert follower.stream.streaming and follower.leader.leader
    assert [(i.event, i.payload["n"]) for i in follower.got.items] == [
        ("unconfirmed", 4),
        ("while-failing-over", 5),
        ("while-failing-over", 6),
    ]
    assert follower.got.items[0].msg_id == leader.got.items[3].msg_id  # the same row, the same id
    assert [i.payload["n"] for i in leader.got.items] == [1, 2, 3, 4]
