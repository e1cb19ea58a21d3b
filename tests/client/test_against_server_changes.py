"""The SDK's recovery of Postgres Changes (issue 16) against the real server, PostgreSQL and a proxy.

The order page of the guide: ``on_postgres_changes("UPDATE", table="orders", filter="id=eq.42")``.
Whatever happens to the connection (cut, too slow), the callback sees every update of the order
exactly once, in commit order; what cannot be proven complete is reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from tests.cdc.conftest import Database, db, postgres, unique_slot
from tests.cdc.test_server_changes import ORDERS
from tests.support.proxy import TcpProxy
from tests.support.server import ServerProcess
from tidings.client import PostgresChange, Quality, RealtimeClient, RecoveryGap

from .conftest import wait_until

__all__ = ["db", "postgres"]  # the PostgreSQL fixtures, used by the tests below

pytestmark = pytest.mark.postgres

MakeClient = Callable[..., RealtimeClient]


@pytest.fixture
async def orders_server(db: Database) -> AsyncIterator[ServerProcess]:
    db.execute(ORDERS)
    env = {"DATABASE_URL": db.dsn, "DB_SLOT": unique_slot(), "DB_RESUME_GRACE": "0"}
    server = ServerProcess(env=env)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture
async def proxied(orders_server: ServerProcess) -> AsyncIterator[TcpProxy]:
    async with TcpProxy(orders_server.port) as proxy:
        yield proxy


def totals(got: list[PostgresChange]) -> list[int]:
    return [int(c.record["total"]) for c in got if c.record is not None]


async def follow_order(client: RealtimeClient, got: list[PostgresChange], order: int = 42) -> None:
    await client.connect()
    channel = client.channel(f"order:{order}").on_postgres_changes(
        "UPDATE", table="orders", filter=f"id=eq.{order}", callback=got.append
    )
    await channel.subscribe(timeout=20)
    await wait_until(lambda: channel.last_position is not None, timeout=10, what="a baseline position")


async def update(db: Database, order: int, total: int) -> None:
    await asyncio.to_thread(db.execute, "UPDATE orders SET total = %s WHERE id = %s", (total, order))


async def test_a_cut_connection_misses_no_update(
    db: Database, orders_server: ServerProcess, proxied: TcpProxy, make_client: MakeClient
) -> None:
    got: list[PostgresChange] = []
    gaps: list[RecoveryGap] = []
    client = make_client(f"ws://127.0.0.1:{proxied.port}/realtime/v1", fallback_enabled=False)
    client.on_recovery_incomplete(gaps.append)
    await follow_order(client, got)
    await update(db, 42, 0)
    await wait_until(lambda: totals(got) == [0], timeout=10)
    for cut in range(2):
        proxied.accepting = False
        proxied.cut()
        for i in range(1, 4):  # committed while the page is away
            await update(db, 42, cut * 10 + i)
            await update(db, 7, i)
        proxied.accepting = True
        await wait_until(lambda: client.channel("order:42").joined, timeout=15, what="rejoined")
    await update(db, 42, 99)
    await wait_until(lambda: totals(got)[-1:] == [99], timeout=15)
    assert totals(got) == [0, 1, 2, 3, 11, 12, 13, 99]  # every update once, in commit order
    positions = [c.position for c in got]
    assert all(p is not None for p in positions) and positions == sorted(positions)
    assert client.metrics.reconnect_count >= 2 and gaps == []


async def test_a_poor_connection_polls_the_change_log_without_gaps_or_duplicates(
    db: Database, orders_server: ServerProcess, proxied: TcpProxy, make_client: MakeClient
) -> None:
    """The WebSocket goes through a slow link; the page's HTTP requests do not (its API origin).
    Updates arrive by polling first and by WebSocket later: the callback sees each once."""
    fallback: list[bool] = []
    got: list[PostgresChange] = []
    client = make_client(
        f"ws://127.0.0.1:{proxied.port}/realtime/v1",
        http_base=f"{orders_server.http_url}/realtime/v1",
        heartbeat_interval=0.1,
        heartbeat_timeout=5.0,
        slow_count=2,
        slow_window=2,
        reconnect_on_poor_quality=False,
    )
    client.on_fallback_change(fallback.append)
    await follow_order(client, got)
    proxied.delay = 1.0  # each way: round trips of 2 s
    await wait_until(lambda: client.connection_quality is Quality.POOR, timeout=15, what="poor")
    await wait_until(lambda: client.fallback_active, timeout=5, what="polling")
    for i in range(1, 4):
        await update(db, 42, i)
    await wait_until(lambda: totals(got) == [1, 2, 3], timeout=15)
    assert {c.source for c in got} == {"poll"}  # the slow WebSocket copies come later...
    proxied.delay = 0.0
    await wait_until(lambda: client.metrics.duplicate_messages >= 3, timeout=15, what="late copies")
    await update(db, 42, 4)
    await wait_until(lambda: totals(got)[-1:] == [4], timeout=15)
    assert totals(got) == [1, 2, 3, 4]  # ...and are dropped: one ordered stream
    assert True in fallback


async def test_a_restart_with_the_memory_broker_reports_a_gap(
    db: Database, orders_server: ServerProcess, make_client: MakeClient
) -> None:
    got: list[PostgresChange] = []
    gaps: list[RecoveryGap] = []
    client = make_client(orders_server.ws_url, fallback_enabled=False, max_reconnect_attempts=100)
    client.on_recovery_incomplete(gaps.append)
    await follow_order(client, got)
    await update(db, 42, 1)
    await wait_until(lambda: totals(got) == [1], timeout=10)
    await asyncio.to_thread(orders_server.restart)  # its change log is gone with it
    await wait_until(lambda: bool(gaps), timeout=30, what="a gap report")
    assert gaps[0].reason == "changes_incomplete" and gaps[0].position == got[0].position
    await update(db, 42, 2)
    await wait_until(lambda: totals(got)[-1:] == [2], timeout=15)
    assert totals(got) == [1, 2]
