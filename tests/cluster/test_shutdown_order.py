"""Shutdown order of a cluster node (issue 12): the node's background tasks are awaited first, so
the change-feed leader gives its lease back through the broker before Postgres Changes and the
broker stop. Before, the tasks were only cancelled, and the resign raced the broker's shutdown:
the next node waited out the lease (6 s) before it streamed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from tests.support.postgres import PostgresServer, postgres_fixture
from tests.support.redis import RedisServer
from tidings.cdc.cluster import LEASE
from tidings.config import Config
from tidings.server.app import start_node, stop_node

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

postgres = postgres_fixture(scope="module")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


async def test_the_change_feed_leader_resigns_before_the_broker_stops(
    postgres: PostgresServer, redis_server: RedisServer
) -> None:
    slot = f"order_{uuid.uuid4().hex[:8]}"
    config = Config(
        database_url=postgres.create_database("order"),
        db_slot=slot,
        db_resume_grace=0.0,
        redis_url=redis_server.url,
    )
    lease_key = f"tidings:{LEASE}"  # the Redis broker's default key prefix
    redis = aioredis.from_url(redis_server.url)
    try:
        node = await start_node(config)
        try:
            async with asyncio.timeout(20):
                while (await redis.get(lease_key)) != node.node_id.encode():
                    await asyncio.sleep(0.05)
        finally:
            await stop_node(node, drop_new_slot=True)
        assert await redis.get(lease_key) is None  # handed back, not left to expire
        # Stopping stopped everything: the node's tasks are done, the broker is closed.
        assert not node._background
        second = await start_node(config)  # the next node takes the lease at its first step
        try:
            async with asyncio.timeout(5):
                while (await redis.get(lease_key)) != second.node_id.encode():
                    await asyncio.sleep(0.05)
        finally:
            await stop_node(second, drop_new_slot=True)
    finally:
        await redis.aclose()
