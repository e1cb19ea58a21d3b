"""Faults: missing heartbeats, server restarts, a proxy that cuts, delays or blackholes, fallback
polling, gap filling, the send queue across reconnects, giving up, and the fleet's reconnect spread."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.support.proxy import TcpProxy
from tidings.client import (
    Alert,
    Broadcast,
    ClientClosed,
    ConnectionState,
    MetricsReporter,
    OutboundMessage,
    Quality,
    RealtimeClient,
    RecoveryGap,
    SendStatus,
)

from .conftest import wait_until
from .fake_server import FakeServer

MakeClient = Callable[..., RealtimeClient]


def seqs(got: list[Broadcast]) -> list[int | None]:
    return [b.seq for b in got]


async def subscribed(client: RealtimeClient, name: str, got: list[Broadcast]) -> None:
    await client.connect()
    await client.channel(name).on_broadcast("*", got.append).subscribe()


async def test_missing_heartbeat_reply_reconnects_and_rejoins(
    server: FakeServer, make_client: MakeClient
) -> None:
    states: list[ConnectionState] = []
    server.reply_heartbeats = False
    client = make_client(server.url, heartbeat_interval=0.2)

    def on_state(old: ConnectionState, new: ConnectionState) -> None:
        states.append(new)
        if new is ConnectionState.RECONNECTING:
            server.reply_heartbeats = True

    client.on_state_change(on_state)
    got: list[Broadcast] = []
    await subscribed(client, "hb", got)
    await wait_until(
        lambda: client.metrics.reconnect_count == 1 and client.state is ConnectionState.CONNECTED
    )
    await wait_until(lambda: client.channel("hb").joined)
    assert states[:4] == [
        ConnectionState.CONNECTING,
        ConnectionState.CONNECTED,
        ConnectionState.RECONNECTING,
        ConnectionState.CONNECTED,
    ]
    assert len(server.joins) == 2
    await server.publish("hb", "e", {})
    await wait_until(lambda: len(got) == 1)


async def test_server_close_reconnects_rejoins_and_replays_since_seq(
    server: FakeServer, make_client: MakeClient
) -> None:
    got: list[Broadcast] = []
    client = make_client(server.url, fallback_enabled=False)
    await subscribed(client, "room", got)
    for n in range(3):
        await server.publish("room", "e", {"n": n})
    await wait_until(lambda: len(got) == 3)

    server.accept_websocket = False
    await server.close_all(1012)
    await wait_until(lambda: client.state is ConnectionState.RECONNECTING)
    await server.publish("room", "e", {"n": 3})  # missed while away
    await server.publish("room", "e", {"n": 4})
    server.accept_websocket = True

    await wait_until(lambda: len(got) == 5)
    assert seqs(got) == [1, 2, 3, 4, 5]
    assert [b.replayed for b in got] == [False, False, False, True, True]
    rejoin = server.joins[-1][1]
    assert rejoin["config"]["broadcast"]["replay"] == {"since_seq": 3, "limit": 100}
    await server.publish("room", "e", {"n": 5})
    await wait_until(lambda: len(got) == 6)
    assert seqs(got) == [1, 2, 3, 4, 5, 6] and client.metrics.duplicate_messages == 0


async def test_incomplete_replay_is_reported_never_silent(
    server: FakeServer, make_client: MakeClient
) -> None:
    gaps: list[RecoveryGap] = []
    channel_gaps: list[RecoveryGap] = []
    got: list[Broadcast] = []
    client = make_client(server.url, fallback_enabled=False)
    client.on_recovery_incomplete(gaps.append)
    await subscribed(client, "lossy", got)
    client.channel("lossy").on_recovery_incomplete(channel_gaps.append)
    await server.publish("lossy", "e", {})
    await wait_until(lambda: len(got) == 1)
    server.accept_websocket = False
    await server.close_all()
    await wait_until(lambda: client.state is ConnectionState.RECONNECTING)
    for _ in range(4):
        await server.publish("lossy", "e", {})
    server.history_floor = 3  # seq 2 and 3 expired: the server cannot replay them
    server.accept_websocket = True
    await wait_until(lambda: len(got) == 3)
    assert seqs(got) == [1, 4, 5]
    assert gaps == channel_gaps == [RecoveryGap("realtime:lossy", 2, None, "replay_incomplete")]


async def test_gives_up_after_max_attempts(server: FakeServer, make_client: MakeClient) -> None:
    reached: list[bool] = []
    client = make_client(server.url, max_reconnect_attempts=3)
    client.on_max_reconnect_attempts_reached(lambda: reached.append(True))
    await client.connect()
    await server.stop()  # down for longer than every attempt
    await wait_until(lambda: client.state is ConnectionState.FAILED)
    assert reached == [True]
    assert client.metrics.reconnect_attempts == 3
    with pytest.raises(ClientClosed):
        await client.channel("x").subscribe()


async def test_connect_to_a_dead_server_raises_after_attempts(make_client: MakeClient) -> None:
    async with FakeServer() as probe:
        url = probe.url
    client = make_client(url, max_reconnect_attempts=2)
    with pytest.raises(ClientClosed):
        await client.connect()
    assert client.state is ConnectionState.FAILED


async def test_proxy_cut_reconnects(server: FakeServer, make_client: MakeClient) -> None:
    async with TcpProxy(server.port) as proxy:
        got: list[Broadcast] = []
        client = make_client(f"ws://127.0.0.1:{proxy.port}/realtime/v1", fallback_enabled=False)
        await subscribed(client, "cut", got)
        proxy.cut()
        await wait_until(lambda: client.metrics.reconnect_count == 1)
        await wait_until(lambda: client.channel("cut").joined)
        await server.publish("cut", "e", {})
        await wait_until(lambda: len(got) == 1)


async def test_proxy_blackhole_half_open_is_detected_by_the_heartbeat(
    server: FakeServer, make_client: MakeClient
) -> None:
    async with TcpProxy(server.port) as proxy:
        got: list[Broadcast] = []
        client = make_client(
            f"ws://127.0.0.1:{proxy.port}/realtime/v1", heartbeat_interval=0.3, fallback_enabled=False
        )
        await subscribed(client, "bh", got)
        await server.publish("bh", "e", {})
        await wait_until(lambda: len(got) == 1)
        proxy.blackhole()  # no FIN, no RST: only the missing heartbeat reply tells
        await server.publish("bh", "e", {})  # swallowed by the blackhole
        await wait_until(lambda: client.metrics.reconnect_count == 1)
        await wait_until(lambda: len(got) == 2)  # recovered by the replay on rejoin
        assert seqs(got) == [1, 2] and got[1].replayed


async def test_proxy_delay_degrades_quality_polls_and_reconnects(
    server: FakeServer, make_client: MakeClient
) -> None:
    qualities: list[Quality] = []
    fallback: list[bool] = []
    async with TcpProxy(server.port) as proxy:
        client = make_client(
            f"ws://127.0.0.1:{proxy.port}/realtime/v1",
            heartbeat_interval=0.05,
            heartbeat_timeout=2.0,
            slow_count=2,
            slow_window=2,
        )
        client.on_quality_change(qualities.append).on_fallback_change(fallback.append)
        client.on_state_change(
            lambda old, new: setattr(proxy, "delay", 0.0) if new is ConnectionState.RECONNECTING else None
        )
        got: list[Broadcast] = []
        await subscribed(client, "slow", got)
        await wait_until(lambda: client.connection_quality in (Quality.EXCELLENT, Quality.GOOD))
        proxy.delay = 0.3  # each way: round trips of 600 ms and more
        await wait_until(lambda: client.metrics.reconnect_count == 1)
        await wait_until(lambda: client.connection_quality in (Quality.EXCELLENT, Quality.GOOD))
        assert Quality.POOR in qualities
        assert fallback[:2] == [True, False] and not client.fallback_active


async def test_fallback_polls_history_and_switches_back_without_gaps_or_duplicates(
    server: FakeServer, make_client: MakeClient
) -> None:
    fallback: list[bool] = []
    got: list[Broadcast] = []
    client = make_client(server.url, max_reconnect_attempts=100)
    client.on_fallback_change(fallback.append)
    await subscribed(client, "poll", got)
    await server.publish("poll", "e", {"n": 1})
    await wait_until(lambda: len(got) == 1)

    server.accept_websocket = False
    await server.close_all()
    await wait_until(lambda: client.fallback_active)
    await server.publish("poll", "e", {"n": 2})
    await server.publish("poll", "e", {"n": 3})
    await wait_until(lambda: len(got) == 3)
    assert [b.source for b in got] == ["websocket", "history", "history"]
    sub, query, headers = server.history_requests[-1]
    assert sub == "poll" and query["since_seq"] in ("1", "3") and headers["apikey"] == "anon-key"
    assert headers["Authorization"] == "Bearer anon-key"

    server.accept_websocket = True
    await wait_until(lambda: client.channel("poll").joined and not client.fallback_active)
    assert server.joins[-1][1]["config"]["broadcast"]["replay"]["since_seq"] == 3
    await server.publish("poll", "e", {"n": 4})
    await wait_until(lambda: len(got) == 4)
    assert seqs(got) == [1, 2, 3, 4] and got[3].source == "websocket"
    assert fallback == [True, False]


async def test_gap_is_filled_from_history(server: FakeServer, make_client: MakeClient) -> None:
    got: list[Broadcast] = []
    gaps: list[RecoveryGap] = []
    client = make_client(server.url)
    client.on_recovery_incomplete(gaps.append)
    await subscribed(client, "g", got)
    server.skip_fanout_seqs = {2}  # seq 2 is lost on the way, but history has it
    for n in range(3):
        await server.publish("g", "e", {"n": n})
    await wait_until(lambda: len(got) == 3)
    assert seqs(got) == [1, 2, 3] and got[1].source == "history"
    assert server.history_requests[0][1]["since_seq"] == "1" and gaps == []


async def test_gap_missing_from_history_is_reported_and_skipped(
    server: FakeServer, make_client: MakeClient
) -> None:
    got: list[Broadcast] = []
    gaps: list[RecoveryGap] = []
    client = make_client(server.url)
    client.on_recovery_incomplete(gaps.append)
    await subscribed(client, "g2", got)
    server.skip_fanout_seqs = {2}
    server.serve_history = False
    for n in range(4):
        await server.publish("g2", "e", {"n": n})
    await wait_until(lambda: len(got) == 3)
    assert seqs(got) == [1, 3, 4]
    assert gaps == [RecoveryGap("realtime:g2", 2, 2, "history_unavailable")]


async def test_send_queue_flushes_in_order_after_reconnect(
    server: FakeServer, make_client: MakeClient
) -> None:
    dropped: list[OutboundMessage] = []
    client = make_client(server.url, send_queue_size=3, fallback_enabled=False, max_reconnect_attempts=100)
    client.on("message_dropped", dropped.append)
    await client.connect()
    room = await client.channel("q").subscribe()
    server.accept_websocket = False
    await server.close_all()
    await wait_until(lambda: client.state is ConnectionState.RECONNECTING)
    receipts = [await room.send_broadcast("e", {"n": n}) for n in range(5)]
    assert {r.status for r in receipts} == {SendStatus.QUEUED}
    assert client.queue_size == 3 and [m.payload["n"] for m in dropped] == [0, 1]
    assert client.metrics.dropped_messages == 2
    server.accept_websocket = True
    await wait_until(lambda: len(server.events("broadcast")) == 3)
    sent = server.events("broadcast")
    assert [p["payload"]["n"] for (_, _, p, _) in sent] == [2, 3, 4]
    assert [p["id"] for (_, _, p, _) in sent] == [r.id for r in receipts[2:]]
    assert client.queue_size == 0


async def test_queue_backlog_alert(make_client: MakeClient) -> None:
    alerts: list[Alert] = []
    client = make_client("ws://127.0.0.1:9/realtime/v1")
    client.on_alert(alerts.append)
    room = client.channel("offline")
    for n in range(60):
        await room.send_broadcast("e", {"n": n})
    assert [a.name for a in alerts] == ["queue_backlog"] and alerts[0].value == 51
    assert client.metrics_snapshot().queue_size == 60


def test_thousand_clients_spread_their_reconnects_over_the_jitter_window() -> None:
    master = random.Random(2024)
    clients = [
        RealtimeClient("ws://127.0.0.1:9/realtime/v1", "k", rng=random.Random(master.getrandbits(64)))
        for _ in range(1000)
    ]
    for attempt, (low, high) in ((1, (0.75, 1.25)), (6, (22.5, 37.5))):
        delays = [c.backoff.delay(attempt) for c in clients]
        assert all(low <= d <= high for d in delays)
        width = (high - low) / 10
        buckets = [0] * 10
        for d in delays:
            buckets[min(9, int((d - low) / width))] += 1
        # Spread evenly: no bucket holds more than 1.5x its fair share of the herd.
        assert all(50 <= n <= 150 for n in buckets), buckets
        assert len({round(d, 6) for d in delays}) > 990


async def test_metrics_reporter_posts_json() -> None:
    bodies: list[dict[str, Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        bodies.append(orjson.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    http_server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = http_server.sockets[0].getsockname()[1]
    client = RealtimeClient("ws://127.0.0.1:9/realtime/v1", "k")
    reporter = MetricsReporter(f"http://127.0.0.1:{port}/metrics", client.metrics_snapshot, timeout=2)
    assert await reporter.report_once() is True
    assert bodies[0]["state"] == "disconnected" and "p95_latency_ms" in bodies[0]
    http_server.close()
    await http_server.wait_closed()
    assert await reporter.report_once() is False
    assert (reporter.reports_sent, reporter.reports_failed) == (1, 1)
