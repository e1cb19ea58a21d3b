"""The client against the real Tidings server (``tests/support/server.py``): restarts lose nothing."""

from __future__ import annotations

import asyncio
import signal
import urllib.request

import orjson
import pytest

from tidings.client import Broadcast, ConnectionState, RealtimeClient, RecoveryGap

from ..support.server import ServerProcess
from .conftest import wait_until


def rest_broadcast(http_url: str, sub_topic: str, payload: dict[str, int]) -> int:
    body = orjson.dumps({"messages": [{"topic": sub_topic, "event": "update", "payload": payload}]})
    request = urllib.request.Request(
        f"{http_url}/api/broadcast",
        data=body,
        method="POST",
        headers={"apikey": "anon-key", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(response.status)


@pytest.mark.parametrize(("vsn", "sig"), [("1.0.0", signal.SIGTERM), ("2.0.0", signal.SIGKILL)])
async def test_server_restart_client_reconnects_rejoins_and_loses_nothing(
    tidings: ServerProcess, vsn: str, sig: int
) -> None:
    got: list[Broadcast] = []
    gaps: list[RecoveryGap] = []
    states: list[ConnectionState] = []
    client = RealtimeClient(
        tidings.ws_url,
        "anon-key",
        vsn=vsn,
        heartbeat_interval=1.0,
        reconnect_base_delay=0.2,
        reconnect_max_delay=1.0,
        max_reconnect_attempts=40,
        connect_timeout=2.0,
        close_timeout=0.5,
        order_gap_timeout=0.5,
        fallback_poll_interval=0.5,
    )
    client.on_state_change(lambda old, new: states.append(new)).on_recovery_incomplete(gaps.append)
    try:
        await client.connect()
        channel = await client.channel("orders").on_broadcast("*", got.append).subscribe()
        for n in range(5):
            assert await asyncio.to_thread(rest_broadcast, tidings.http_url, "orders", {"n": n}) == 202
        await wait_until(lambda: len(got) == 5, timeout=10)

        await asyncio.to_thread(tidings.restart, sig)
        await wait_until(lambda: client.metrics.reconnect_count >= 1 and channel.joined, timeout=30)
        assert ConnectionState.RECONNECTING in states

        for n in range(5, 10):
            assert await asyncio.to_thread(rest_broadcast, tidings.http_url, "orders", {"n": n}) == 202
        await wait_until(lambda: len(got) == 10, timeout=15)
        assert [b.payload["n"] for b in got] == list(range(10))
        sequence = [b.seq for b in got]
        assert all(isinstance(s, int) for s in sequence)
        assert sequence == sorted(set(sequence))  # strictly increasing: ordered, no duplicates
        # An in-memory server forgets its history on restart; the client may say so, never more.
        assert all(g.reason in ("replay_incomplete", "history_incomplete") for g in gaps)
    finally:
        await client.close()


async def test_own_echo_is_filtered_and_others_see_the_client_id(tidings: ServerProcess) -> None:
    mine: list[Broadcast] = []
    theirs: list[Broadcast] = []
    sender = RealtimeClient(tidings.ws_url, "anon-key", vsn="1.0.0", heartbeat_interval=5)
    receiver = RealtimeClient(tidings.ws_url, "anon-key", vsn="1.0.0", heartbeat_interval=5)
    try:
        await sender.connect()
        await receiver.connect()
        await receiver.channel("echo").on_broadcast("*", theirs.append).subscribe()
        room = await sender.channel("echo").on_broadcast("*", mine.append).subscribe()
        receipt = await room.send_broadcast("e", {"x": 1})
        await wait_until(lambda: len(theirs) == 1, timeout=5)
        assert theirs[0].id == receipt.id
        assert await asyncio.to_thread(rest_broadcast, tidings.http_url, "echo", {"n": 1}) == 202
        await wait_until(lambda: len(mine) == 1 and len(theirs) == 2, timeout=5)
        assert mine[0].payload == {"n": 1}  # its own message was not delivered back
    finally:
        await sender.close()
        await receiver.close()
