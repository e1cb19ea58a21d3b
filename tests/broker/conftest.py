"""A throwaway redis-server for the broker tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis import RedisClusterServers, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(masters=3).start()
    yield cluster
    cluster.cleanup()
