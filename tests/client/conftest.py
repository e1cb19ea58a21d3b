"""Fixtures for the client tests: a fake Phoenix server on loopback and fast client settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tidings.client import RealtimeClient

from ..support.server import ServerProcess
from .fake_server import FakeServer

FAST: dict[str, Any] = {
    "heartbeat_interval": 5.0,
    "reconnect_base_delay": 0.05,
    "reconnect_max_delay": 0.2,
    "connect_timeout": 2.0,
    "push_timeout": 2.0,
    "close_timeout": 0.5,
    "order_gap_timeout": 0.3,
    "fallback_poll_interval": 0.2,
    "http_timeout": 2.0,
}


async def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 10 ms; fail the test when it is still false after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    async with FakeServer() as fake:
        yield fake


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., RealtimeClient]]:
    clients: list[RealtimeClient] = []

    def factory(url: str, **overrides: Any) -> RealtimeClient:
        client = RealtimeClient(url, "anon-key", **{**FAST, **overrides})
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def tidings() -> AsyncIterator[ServerProcess]:
    """A real Tidings server (subprocess) for tests against the server."""
    server = ServerProcess()
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)
