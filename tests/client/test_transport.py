"""The SDK over its in-memory transport: the test plays the node on a MemoryPeer.

What used to need the fake server and a TCP proxy (a dropped link, a node that refuses, a
half-open connection, a reply that never comes) is a call on the peer here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tidings.client import (
    Broadcast,
    ClientClosed,
    ConnectionState,
    MemoryPeer,
    MemoryTransport,
    NotConnected,
    OutboundMessage,
    RealtimeClient,
    SendStatus,
    WebSocketTransport,
)
from tidings.protocol.codec import Message

from .conftest import wait_until

MakeClient = Callable[..., RealtimeClient]
URL = "ws://node.test/realtime/v1"
WAIT = 5.0


async def expect(peer: MemoryPeer, event: str) -> Message:
    """The client's next message, which must be ``event``; heartbeats on the way are answered."""
    while True:
        message = await peer.recv_message(timeout=WAIT)
        if message.event == "heartbeat" and event != "heartbeat":
            await peer.reply(message)
            continue
        assert message.event == event, message
        return message


async def accept_join(transport: MemoryTransport, topic: str = "realtime:room") -> tuple[MemoryPeer, Message]:
    """Take the client's next connection and answer its join of ``topic``."""
    peer = await transport.accept(timeout=WAIT)
    join = await expect(peer, "phx_join")
    assert join.topic == topic and join.join_ref == join.ref
    await peer.reply(join, "ok", {"postgres_changes": []})
    return peer, join


async def answer_heartbeats(peer: MemoryPeer) -> None:
    """Answer the heartbeats on ``peer`` until it closes (anything else is ignored)."""
    try:
        while True:
            message = await peer.recv_message()
            if message.event == "heartbeat":
                await peer.reply(message)
    except NotConnected:
        return


def test_the_default_transport_is_websockets() -> None:
    client = RealtimeClient(URL, "k")
    assert isinstance(client.connection.transport, WebSocketTransport)


@pytest.mark.parametrize("vsn", ["1.0.0", "2.0.0"])
async def test_join_send_and_receive_over_memory(make_client: MakeClient, vsn: str) -> None:
    transport = MemoryTransport()
    got: list[Broadcast] = []
    client = make_client(URL, transport=transport, vsn=vsn)
    room = client.channel("room").on_broadcast("*", got.append)
    subscribing = asyncio.ensure_future(room.subscribe())
    peer, join = await accept_join(transport)
    await subscribing
    assert f"vsn={vsn}" in peer.url and "apikey=anon-key" in peer.url
    assert join.payload["access_token"] == "anon-key"

    receipt = await room.send_broadcast("chat", {"text": "hi"})
    assert receipt.status is SendStatus.SENT
    pushed = await expect(peer, "broadcast")
    assert pushed.join_ref == join.ref and pushed.payload["payload"] == {"text": "hi"}
    assert pushed.payload["id"] == receipt.id

    body = {"type": "broadcast", "event": "chat", "payload": {"n": 1}, "meta": {"id": "m1", "seq": 7}}
    await peer.send_message(join.ref, None, "realtime:room", "broadcast", body)
    await wait_until(lambda: len(got) == 1)
    assert got[0].payload == {"n": 1} and got[0].seq == 7 and got[0].source == "websocket"


async def test_send_queue_flushes_in_order_after_reconnect(make_client: MakeClient) -> None:
    transport = MemoryTransport()
    dropped: list[OutboundMessage] = []
    client = make_client(
        URL, transport=transport, send_queue_size=3, fallback_enabled=False, max_reconnect_attempts=100
    )
    client.on("message_dropped", dropped.append)
    room = client.channel("room")
    subscribing = asyncio.ensure_future(room.subscribe())
    first, _ = await accept_join(transport)
    await subscribing

    transport.refusing = True
    first.close("node restarting")
    await wait_until(lambda: client.state is ConnectionState.RECONNECTING)
    receipts = [await room.send_broadcast("e", {"n": n}) for n in range(5)]
    assert {r.status for r in receipts} == {SendStatus.QUEUED}
    assert client.queue_size == 3 and [m.payload["n"] for m in dropped] == [0, 1]
    assert client.metrics.dropped_messages == 2

    transport.refusing = False
    second, rejoin = await accept_join(transport)  # the join goes first, the queue after it
    sent = [await expect(second, "broadcast") for _ in range(3)]
    assert [m.payload["payload"]["n"] for m in sent] == [2, 3, 4]
    assert [m.payload["id"] for m in sent] == [r.id for r in receipts[2:]]
    assert {m.join_ref for m in sent} == {rejoin.ref}
    await wait_until(lambda: client.queue_size == 0)


async def test_missing_acks_are_retried_once_then_given_up(make_client: MakeClient) -> None:
    transport = MemoryTransport()
    client = make_client(URL, transport=transport, push_timeout=0.5)
    room = client.channel("acked", broadcast_ack=True)
    subscribing = asyncio.ensure_future(room.subscribe())
    peer, join = await accept_join(transport, "realtime:acked")
    await subscribing
    assert join.payload["config"]["broadcast"]["ack"] is True

    receipt = await room.send_broadcast("e", {"n": 1})  # the node never acknowledges it
    assert receipt.status is SendStatus.QUEUED  # its one retry
    first = await expect(peer, "broadcast")
    retry = await expect(peer, "broadcast")
    assert first.payload["id"] == retry.payload["id"] == receipt.id  # receivers can deduplicate
    assert first.ref != retry.ref
    await wait_until(lambda: client.metrics.failed_messages == 1)
    assert client.queue_size == 0


async def test_a_refused_ack_is_retried_and_the_retry_can_succeed(make_client: MakeClient) -> None:
    transport = MemoryTransport()
    client = make_client(URL, transport=transport)
    room = client.channel("acked", broadcast_ack=True)
    subscribing = asyncio.ensure_future(room.subscribe())
    peer, _ = await accept_join(transport, "realtime:acked")
    await subscribing

    sending = asyncio.ensure_future(room.send_broadcast("e", {"n": 1}))
    first = await expect(peer, "broadcast")
    await peer.reply(first, "error", {"reason": "busy"})
    assert (await sending).status is SendStatus.QUEUED
    retry = await expect(peer, "broadcast")
    assert retry.payload["id"] == first.payload["id"]
    samples = client.metrics_snapshot().latency_samples  # only the ack adds one now
    await peer.reply(retry)
    await wait_until(lambda: client.metrics_snapshot().latency_samples == samples + 1)
    assert client.metrics.failed_messages == 0 and client.queue_size == 0


async def test_pending_replies_fail_with_not_connected_when_the_link_drops(make_client: MakeClient) -> None:
    transport = MemoryTransport()
    client = make_client(URL, transport=transport, fallback_enabled=False)
    room = client.channel("room")
    subscribing = asyncio.ensure_future(room.subscribe())
    peer, _ = await accept_join(transport)
    await subscribing

    tracking = asyncio.ensure_future(room.track({"status": "online"}))
    heartbeat = asyncio.ensure_future(client.heartbeat(timeout=WAIT))
    assert (await expect(peer, "presence")).payload["event"] == "track"
    await expect(peer, "heartbeat")  # neither is answered
    peer.close()
    for pending in (tracking, heartbeat):
        with pytest.raises(NotConnected):
            await asyncio.wait_for(pending, WAIT)


async def test_an_ack_lost_with_the_link_is_resent_after_the_rejoin(make_client: MakeClient) -> None:
    transport = MemoryTransport()
    client = make_client(URL, transport=transport, fallback_enabled=False, max_reconnect_attempts=100)
    room = client.channel("acked", broadcast_ack=True)
    subscribing = asyncio.ensure_future(room.subscribe())
    first, _ = await accept_join(transport, "realtime:acked")
    await subscribing

    sending = asyncio.ensure_future(room.send_broadcast("e", {"n": 1}))
    lost = await expect(first, "broadcast")
    first.close()  # before the ack
    assert (await asyncio.wait_for(sending, WAIT)).status is SendStatus.QUEUED
    second, rejoin = await accept_join(transport, "realtime:acked")
    resent = await expect(second, "broadcast")
    assert resent.payload["id"] == lost.payload["id"] and resent.join_ref == rejoin.ref
    samples = client.metrics_snapshot().latency_samples  # only the ack adds one now
    await second.reply(resent)
    await wait_until(lambda: client.metrics_snapshot().latency_samples == samples + 1)
    assert client.metrics.failed_messages == 0 and client.queue_size == 0


async def test_a_half_open_link_is_aborted_by_the_heartbeat_and_replaced(make_client: MakeClient) -> None:
    transport = MemoryTransport()
    client = make_client(URL, transport=transport, heartbeat_interval=0.2, fallback_enabled=False)
    room = client.channel("room")
    subscribing = asyncio.ensure_future(room.subscribe())
    silent = await transport.accept(timeout=WAIT)
    await expect(silent, "heartbeat")  # never answered: the link looks open but nothing comes back
    second, _ = await accept_join(transport)
    assert silent.aborted  # no close handshake on a link given up on
    answering = asyncio.ensure_future(answer_heartbeats(second))
    await asyncio.wait_for(subscribing, WAIT)
    assert room.joined and client.metrics.reconnect_count >= 1
    answering.cancel()


async def test_a_node_that_refuses_every_dial_makes_connect_fail(make_client: MakeClient) -> None:
    transport = MemoryTransport()
    transport.refusing = True
    client = make_client(URL, transport=transport, max_reconnect_attempts=2)
    with pytest.raises(ClientClosed):
        await client.connect(timeout=WAIT)
    assert client.state is ConnectionState.FAILED
    assert transport.peers == [] and client.metrics.reconnect_attempts == 2


async def test_close_ends_the_link_with_a_handshake(make_client: MakeClient) -> None:
    transport = MemoryTransport()
    client = make_client(URL, transport=transport)
    connecting = asyncio.ensure_future(client.connect(timeout=WAIT))
    peer = await transport.accept(timeout=WAIT)
    await connecting
    await client.close()
    assert peer.closed and peer.close_reason == "client closed" and not peer.aborted
    assert client.state is ConnectionState.DISCONNECTED


async def test_a_handler_can_play_the_node(make_client: MakeClient) -> None:
    async def node(peer: MemoryPeer) -> None:
        # Answer everything with ok, the way a permissive node would.
        try:
            while True:
                message = await peer.recv_message()
                if message.ref is not None:
                    await peer.reply(
                        message, "ok", {"postgres_changes": []} if message.event == "phx_join" else {}
                    )
        except NotConnected:
            return

    transport = MemoryTransport(node)
    client = make_client(URL, transport=transport)
    await client.connect(timeout=WAIT)
    room = await client.channel("room").subscribe(timeout=WAIT)
    await room.track({"here": True})
    assert await client.heartbeat() >= 0
