"""Postgres Changes across a Redis cluster: one replication leader feeds every node; failover."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.phx import PhxClient
from tests.support.redis import RedisClusterServers, RedisServer
from tests.support.server import ServerProcess

from .conftest import Database, unique_slot
from .test_server_changes import ORDERS, subscribe

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture(params=["redis", "redis-cluster"])
def cluster(db: Database, request: pytest.FixtureRequest) -> Iterator[Callable[[], ServerProcess]]:
    db.execute(ORDERS)
    redis = RedisServer() if request.param == "redis" else RedisClusterServers(masters=3)
    redis.start()
    slot = unique_slot()
    nodes: list[ServerProcess] = []

    def start() -> ServerProcess:
        env = {"DATABASE_URL": db.dsn, "DB_SLOT": slot, "DB_RESUME_GRACE": "0", "REDIS_URL": redis.url}
        proc = ServerProcess(env={**env, "NODE_TIMEOUT": "3s"}).start()
        nodes.append(proc)
        return proc

    yield start
    for proc in nodes:
        proc.stop()
    redis.cleanup()


def totals(client: PhxClient) -> list[Any]:
    return [m[4]["data"]["record"]["total"] for m in client.inbox if m[3] == "postgres_changes"]


async def wait_for_leader(nodes: list[ServerProcess]) -> ServerProcess:
    async with asyncio.timeout(20):
        while True:
            for proc in nodes:
                if "holds the replication lease" in proc.logs():
                    return proc
            await asyncio.sleep(0.1)


async def test_one_leader_feeds_every_node_and_fails_over(
    db: Database, cluster: Callable[[], ServerProcess]
) -> None:
    a, b = cluster(), cluster()
    leader = await wait_for_leader([a, b])
    follower = b if leader is a else a
    binding = {"event": "UPDATE", "schema": "public", "table": "orders", "filter": "id=eq.1"}
    on_leader, on_follower = await PhxClient.open(leader.http_url), await PhxClient.open(follower.http_url)
    await subscribe(on_leader, "realtime:o", binding)
    await subscribe(on_follower, "realtime:o", binding)

    for i in range(5):
        db.execute("UPDATE orders SET total = %s WHERE id = 1", (i,))
    async with asyncio.timeout(10):
        while len(totals(on_leader)) < 5 or len(totals(on_follower)) < 5:
            await asyncio.sleep(0.05)
    assert totals(on_leader) == totals(on_follower) == [0, 1, 2, 3, 4]
    assert "holds the replication lease" not in follower.logs()  # exactly one node streams

    leader.kill()
    # Committed while nobody streams: the slot keeps them for the next leader.
    for i in range(5, 10):
        db.execute("UPDATE orders SET total = %s WHERE id = 1", (i,))
    async with asyncio.timeout(30):
        while len(totals(on_follower)) < 10:
            await asyncio.sleep(0.1)
    assert "holds the replication lease" in follower.logs()
    await asyncio.sleep(0.5)
    assert totals(on_follower) == list(range(10))  # each once, in order
