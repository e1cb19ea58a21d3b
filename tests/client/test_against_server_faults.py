"""Issue 5 fault tests against the real Tidings server behind a TCP proxy the test controls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.support.proxy import TcpProxy
from tidings.client import Broadcast, ConnectionState, Quality, RealtimeClient

from ..support.server import ServerProcess
from .conftest import wait_until
from .test_against_server import rest_broadcast


@pytest.fixture
async def proxied(tidings: ServerProcess) -> AsyncIterator[TcpProxy]:
    async with TcpProxy(tidings.port) as proxy:
        yield proxy


async def publish(server: ServerProcess, topic: str, n: int) -> None:
    assert await asyncio.to_thread(rest_broadcast, server.http_url, topic, {"n": n}) == 202


def numbers(got: list[Broadcast]) -> list[int]:
    return [b.payload["n"] for b in got]


async def subscribed(client: RealtimeClient, topic: str, got: list[Broadcast]) -> None:
    await client.connect()
    channel = client.channel(topic).on_broadcast("*", got.append)
    await channel.subscribe()


MakeClient = Callable[..., RealtimeClient]


async def test_cut_connection_recovers_every_message(
    tidings: ServerProcess, proxied: TcpProxy, make_client: MakeClient
) -> None:
    got: list[Broadcast] = []
    client = make_client(f"ws://127.0.0.1:{proxied.port}/realtime/v1", fallback_enabled=False)
    await subscribed(client, "cut", got)
    await publish(tidings, "cut", 0)
    await wait_until(lambda: numbers(got) == [0])
    proxied.accepting = False
    proxied.cut()
    for n in range(1, 4):  # sent while the client is away
        await publish(tidings, "cut", n)
    proxied.accepting = True
    await wait_until(lambda: client.metrics.reconnect_count >= 1 and client.channel("cut").joined, timeout=15)
    await publish(tidings, "cut", 4)
    await wait_until(lambda: len(got) == 5, timeout=10)
    assert numbers(got) == [0, 1, 2, 3, 4]
    assert [b.replayed for b in got[1:4]] == [True, True, True]


async def test_half_open_connection_is_detected_and_recovered(
    tidings: ServerProcess, proxied: TcpProxy, make_client: MakeClient
) -> None:
    got: list[Broadcast] = []
    client = make_client(
        f"ws://127.0.0.1:{proxied.port}/realtime/v1", heartbeat_interval=0.3, fallback_enabled=False
    )
    await subscribed(client, "half", got)
    await publish(tidings, "half", 0)
    await wait_until(lambda: len(got) == 1)
    proxied.blackhole()  # no FIN, no RST: only the missing heartbeat reply tells
    await publish(tidings, "half", 1)
    await wait_until(lambda: client.metrics.reconnect_count >= 1, timeout=10)
    await wait_until(lambda: len(got) == 2, timeout=10)
    assert numbers(got) == [0, 1] and got[1].replayed


async def test_added_latency_falls_back_to_polling_without_gaps(
    tidings: ServerProcess, proxied: TcpProxy, make_client: MakeClient
) -> None:
    qualities: list[Quality] = []
    fallback: list[bool] = []
    got: list[Broadcast] = []
    client = make_client(
        f"ws://127.0.0.1:{proxied.port}/realtime/v1",
        heartbeat_interval=0.1,
        heartbeat_timeout=3.0,
        slow_count=2,
        slow_window=2,
    )
    client.on_quality_change(qualities.append).on_fallback_change(fallback.append)
    await subscribed(client, "slow", got)
    await wait_until(lambda: client.connection_quality in (Quality.EXCELLENT, Quality.GOOD))
    proxied.delay = 0.3  # each way: heartbeat round trips of 600 ms and more
    await wait_until(lambda: Quality.POOR in qualities, timeout=10)
    for n in range(3):
        await publish(tidings, "slow", n)
    proxied.delay = 0.0
    await wait_until(lambda: len(got) == 3, timeout=15)
    await wait_until(lambda: client.connection_quality in (Quality.EXCELLENT, Quality.GOOD), timeout=15)
    assert numbers(got) == [0, 1, 2]  # one ordered stream, no gap, no duplicate
    assert True in fallback


async def test_server_down_longer_than_all_attempts_fails(
    tidings: ServerProcess, make_client: MakeClient
) -> None:
    events: list[Any] = []
    client = make_client(
        tidings.ws_url, max_reconnect_attempts=3, reconnect_base_delay=0.05, fallback_enabled=False
    )
    client.on_max_reconnect_attempts_reached(lambda *a: events.append(a))
    got: list[Broadcast] = []
    await subscribed(client, "down", got)
    await asyncio.to_thread(tidings.stop)
    await wait_until(lambda: client.state is ConnectionState.FAILED, timeout=20)
    assert events
