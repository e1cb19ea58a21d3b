"""realtime-py (``realtime`` from PyPI, AsyncRealtimeClient, vsn 1.0.0) against a real Tidings server.

realtime-py validates every frame with pydantic and silently drops the ones it rejects; the
``realtime_py_log`` fixture (used by ``py_client``) fails any test in which that happened.
Raw frames are read from its debug log, and "not delivered" is checked behind a barrier (a
heartbeat with a unique ref on the same socket).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.support.server import ServerProcess
from tidings.auth.tokens import mint_token

from .conftest import JsFactory, PyClient, PyFactory, broadcasts, rest_post

pytestmark = pytest.mark.clients

SECRET = "conformance-secret-at-least-32-bytes-long"


def bevents(client: PyClient, ch: str, since: int = 0) -> list[str]:
    return [p["event"] for p in broadcasts(client, ch, since=since)]


async def acked_push(
    channel: Any, event: str, payload: dict[str, Any], timeout: float = 10.0
) -> tuple[str, Any]:
    """``channel.push('broadcast', ...)`` and wait for the ack reply: ('ok'|'error'|'timeout', response)."""
    from realtime.types import RealtimeAcknowledgementStatus as Ack

    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[str, Any]] = loop.create_future()

    def settle(status: str) -> Any:
        def cb(response: Any = None) -> None:
            if status == "ok":
                response = {}  # realtime-py hands an ok reply over as a ReplyPostgresChanges model
            if not done.done():
                done.set_result((status, response))

        return cb

    push = await channel.push("broadcast", {"type": "broadcast", "event": event, "payload": payload})
    push.receive(Ack.Ok, settle("ok")).receive(Ack.Error, settle("error")).receive(
        Ack.Timeout, settle("timeout")
    )
    return await asyncio.wait_for(done, timeout)


# -- subscribe and broadcast -----------------------------------------------------------------------


async def test_subscribe_and_broadcast_without_self(
    shared_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    a, b = py_client(shared_server.ws_url, name="A"), py_client(shared_server.ws_url, name="B")
    ch_a = await a.subscribed(channel_name)
    await b.subscribed(channel_name)

    payload = {"msg": "héllo", "n": 1, "nested": {"list": [1, 2, 3]}}
    await ch_a.send_broadcast("hello", payload)
    got = await b.wait_for("broadcast", ch=channel_name)
    assert got["payload"]["event"] == "hello"
    assert got["payload"]["payload"] == payload

    await a.barrier()
    assert broadcasts(a, channel_name) == []

    # The client connected with vsn 1.0.0 and every server frame had the v1 shape it needs.
    inbound = [f for f in a.log.frames("in") if f.get("topic") == f"realtime:{channel_name}"]
    assert inbound and all(set(f) == {"topic", "event", "payload", "ref"} for f in inbound)


async def test_broadcast_with_self_and_ack(
    shared_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    a, b = py_client(shared_server.ws_url, name="A"), py_client(shared_server.ws_url, name="B")
    ch_a = await a.subscribed(channel_name, config={"broadcast": {"self": True, "ack": True}})
    await b.subscribed(channel_name)

    for i in range(3):
        assert await acked_push(ch_a, "tick", {"i": i}) == ("ok", {})
    mine = await a.wait_count("broadcast", 3, ch=channel_name)
    theirs = await b.wait_count("broadcast", 3, ch=channel_name)
    assert [e["payload"]["payload"]["i"] for e in mine] == [0, 1, 2]
    assert [e["payload"]["payload"]["i"] for e in theirs] == [0, 1, 2]

    # send_broadcast (no ack surfaced) is delivered too, and filtering by event works.
    c = py_client(shared_server.ws_url, name="C")
    await c.subscribed(channel_name, broadcast=("wanted",))
    await ch_a.send_broadcast("unwanted", {"x": 0})
    await ch_a.send_broadcast("WANTED", {"x": 1})
    got = await c.wait_for("broadcast", ch=channel_name)
    assert got["payload"]["payload"] == {"x": 1}
    await c.barrier()
    assert bevents(c, channel_name) == ["WANTED"]


# -- presence ------------------------------------------------------------------------------------------


async def test_presence_sync_between_two_clients(
    shared_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    a, b = py_client(shared_server.ws_url, name="A"), py_client(shared_server.ws_url, name="B")
    ch_a = await a.subscribed(
        channel_name, config={"presence": {"key": "alice", "enabled": True}}, presence=True
    )
    ch_b = await b.subscribed(
        channel_name, config={"presence": {"key": "bob", "enabled": True}}, presence=True
    )
    await ch_a.track({"name": "Alice", "online": True})
    await ch_b.track({"name": "Bob"})

    for client in (a, b):
        sync = await client.wait_for(
            "presence", ch=channel_name, event="sync", pred=lambda e: set(e["state"]) == {"alice", "bob"}
        )
        assert sync["state"]["alice"][0]["name"] == "Alice"
        assert sync["state"]["bob"][0]["name"] == "Bob"
        assert all(m["presence_ref"] for metas in sync["state"].values() for m in metas)
    assert set(ch_a.presence_state()) == {"alice", "bob"}
    assert a.find("presence", ch=channel_name, event="join", key="bob")

    # A leave is seen: B unsubscribes.
    mark = a.mark()
    await ch_b.unsubscribe()
    leave = await a.wait_for("presence", since=mark, ch=channel_name, event="leave", key="bob")
    assert leave["presences"][0]["name"] == "Bob"
    await a.wait_for(
        "presence", since=mark, ch=channel_name, event="sync", pred=lambda e: set(e["state"]) == {"alice"}
    )

    # Untrack shows as a leave on the other side too.
    c = py_client(shared_server.ws_url, name="C")
    await c.subscribed(channel_name, presence=True)
    await c.wait_for("presence", ch=channel_name, event="sync", pred=lambda e: set(e["state"]) == {"alice"})
    mark = c.mark()
    await ch_a.untrack()
    await c.wait_for("presence", since=mark, ch=channel_name, event="leave", key="alice")
    await c.barrier()
    assert c.channels[channel_name].presence_state() == {}


# -- heartbeat and unsubscribe ---------------------------------------------------------------------


async def test_heartbeat_replies(
    shared_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    a = py_client(shared_server.ws_url, name="A")
    await a.subscribed(channel_name)
    # realtime-py sends a heartbeat with ref null right after connecting and never checks the reply;
    # the server answers it anyway (and the reply passes the client's validation).
    sent = [f for f in a.log.frames("out") if f["topic"] == "phoenix" and f["event"] == "heartbeat"]
    assert sent and sent[0]["ref"] is None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    expected = {
        "topic": "phoenix",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": None,
    }
    while expected not in a.log.frames("in"):
        assert loop.time() < deadline, a.log.frames("in")
        await asyncio.sleep(0.05)
    # A heartbeat with a ref gets that ref back.
    await a.barrier()


async def test_unsubscribe(shared_server: ServerProcess, py_client: PyFactory, channel_name: str) -> None:
    a, b = py_client(shared_server.ws_url, name="A"), py_client(shared_server.ws_url, name="B")
    ch_a = await a.subscribed(channel_name)
    await b.subscribed(channel_name)
    mark = a.mark()
    await ch_a.unsubscribe()
    await a.wait_for("status", since=mark, ch=channel_name, status="CLOSED")
    assert ch_a.is_closed

    topic = f"realtime:{channel_name}"
    leaves = [f for f in a.log.frames("out") if f["topic"] == topic and f["event"] == "phx_leave"]
    assert len(leaves) == 1
    replies = [f for f in a.log.frames("in") if f["topic"] == topic and f["ref"] == leaves[0]["ref"]]
    assert replies == [
        {
            "topic": topic,
            "event": "phx_reply",
            "payload": {"status": "ok", "response": {}},
            "ref": leaves[0]["ref"],
        }
    ]

    r = await rest_post(
        shared_server.http_url,
        "/api/broadcast",
        {"messages": [{"topic": channel_name, "event": "after", "payload": {}}]},
    )
    assert r.status_code == 202
    await b.wait_for("broadcast", ch=channel_name)
    await a.barrier()
    assert broadcasts(a, channel_name) == []


# -- REST -------------------------------------------------------------------------------------------------


async def test_rest_broadcast_reaches_websocket_subscribers(
    shared_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    a = py_client(shared_server.ws_url, name="A")
    ch_a = await a.subscribed(channel_name)
    for prefix in ("/api", "/realtime/v1/api"):
        r = await rest_post(
            shared_server.http_url,
            f"{prefix}/broadcast",
            {"messages": [{"topic": channel_name, "event": "batch", "payload": {"prefix": prefix}}]},
        )
        assert r.status_code == 202, r.text
        r = await rest_post(
            shared_server.http_url, f"{prefix}/broadcast/{channel_name}/events/single", {"prefix": prefix}
        )
        assert r.status_code == 202, r.text
    got = await a.wait_count("broadcast", 4, ch=channel_name)
    assert sorted((e["payload"]["event"], e["payload"]["payload"]["prefix"]) for e in got) == sorted(
        [("batch", "/api"), ("single", "/api"), ("batch", "/realtime/v1/api"), ("single", "/realtime/v1/api")]
    )
    # The client's own http_send (POST <url>/api/broadcast/<sub>/events/<event>, must answer 202).
    await ch_a.http_send("via-http", {"k": 1})
    got = await a.wait_for("broadcast", ch=channel_name, pred=lambda e: e["payload"]["event"] == "via-http")
    assert got["payload"]["payload"] == {"k": 1}
    # A raw-binary broadcast cannot be represented in vsn 1.0.0: dropped for this subscriber.
    mark = a.mark()
    await ch_a.http_send("binary", b"\x00\xff")
    await ch_a.http_send("after-binary", {"k": 2})
    await a.wait_for(
        "broadcast", since=mark, ch=channel_name, pred=lambda e: e["payload"]["event"] == "after-binary"
    )
    assert bevents(a, channel_name, since=mark) == ["after-binary"]


# -- rejoin after a server restart ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "killed"])
async def test_rejoin_after_server_restart(
    server_factory: Any, py_client: PyFactory, channel_name: str, sig: int
) -> None:
    server = server_factory()
    a, b = py_client(server.ws_url, name="A"), py_client(server.ws_url, name="B")
    ch_a = await a.subscribed(channel_name, config={"presence": {"key": "a", "enabled": True}}, presence=True)
    await b.subscribed(channel_name)
    marks = a.mark(), b.mark()

    # Graceful: drained with close code 1012. Killed: the TCP connections just drop.
    await asyncio.to_thread(server.restart, sig)

    # Each client sees its channel error, reconnects by itself and rejoins.
    for client, mark in zip((a, b), marks, strict=True):
        await client.wait_for("status", since=mark, ch=channel_name, status="CHANNEL_ERROR", timeout=15)
        await client.wait_for("status", since=mark, ch=channel_name, status="SUBSCRIBED", timeout=30)
    await ch_a.send_broadcast("again", {"from": "A"})
    await b.wait_for(
        "broadcast", since=marks[1], ch=channel_name, pred=lambda e: e["payload"]["event"] == "again"
    )
    r = await rest_post(
        server.http_url,
        "/api/broadcast",
        {"messages": [{"topic": channel_name, "event": "rest", "payload": {}}]},
    )
    assert r.status_code == 202
    for client, mark in zip((a, b), marks, strict=True):
        await client.wait_for(
            "broadcast", since=mark, ch=channel_name, pred=lambda e: e["payload"]["event"] == "rest"
        )
    await ch_a.track({"back": True})
    await a.wait_for(
        "presence", since=marks[0], ch=channel_name, event="sync", pred=lambda e: "a" in e["state"]
    )


# -- auth ------------------------------------------------------------------------------------------------


@pytest.fixture
def auth_server(server_factory: Any) -> ServerProcess:
    return server_factory(env={"JWT_SECRET": SECRET})


async def test_auth_valid_token(auth_server: ServerProcess, py_client: PyFactory, channel_name: str) -> None:
    token = mint_token(SECRET, role="authenticated", sub="user-1")
    a, b = py_client(auth_server.ws_url, token, name="A"), py_client(auth_server.ws_url, token, name="B")
    ch_a = await a.subscribed(channel_name)
    await b.subscribed(channel_name)
    await ch_a.send_broadcast("authed", {"ok": True})
    await b.wait_for("broadcast", ch=channel_name)
    await ch_a.http_send("rest", {"via": "http_send"})
    await b.wait_for("broadcast", ch=channel_name, pred=lambda e: e["payload"]["event"] == "rest")


async def test_auth_refused_tokens(
    auth_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    a = py_client(auth_server.ws_url, mint_token(SECRET, role="anon"), name="A")
    await a.client.connect()

    await a.client.set_auth(mint_token(SECRET, role="authenticated", ttl=-30))
    result = await a.subscribe(f"{channel_name}-expired")
    assert result["status"] == "CHANNEL_ERROR"
    reason = json.loads(result["error"])["reason"]
    assert re.fullmatch(r"InvalidJWTToken: Token has expired \d+ seconds ago", reason), result

    await a.client.set_auth("not-a-jwt")
    result = await a.subscribe(f"{channel_name}-garbage")
    assert result == {
        "status": "CHANNEL_ERROR",
        "error": json.dumps({"reason": "MalformedJWT: The token provided is not a valid JWT"}),
    }

    # A bad apikey: the upgrade is refused with 401 and connect() raises.
    bad = py_client(
        auth_server.ws_url, mint_token("another-secret-that-is-also-32-bytes!!"), name="bad", max_retries=1
    )
    with pytest.raises(InvalidStatus) as info:
        await bad.client.connect()
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body) == {"error": "Failed to validate JWT signature"}


async def test_auth_token_expiring_while_joined(
    auth_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    a = py_client(auth_server.ws_url, mint_token(SECRET, role="authenticated", ttl=3), name="A")
    await a.subscribed(channel_name)
    # system error -> CHANNEL_ERROR with the payload as JSON, then phx_close -> CLOSED (no rejoin).
    err = await a.wait_for("status", ch=channel_name, status="CHANNEL_ERROR", timeout=15)
    payload = json.loads(err["error"])
    assert payload["extension"] == "system" and payload["status"] == "error"
    assert payload["channel"] == channel_name
    assert re.fullmatch(r"Token has expired \d+ seconds ago", payload["message"]), payload
    await a.wait_for("status", ch=channel_name, status="CLOSED", timeout=10)
    assert a.channels[channel_name].is_closed


# -- limits ------------------------------------------------------------------------------------------------


async def test_limit_channels_per_client(
    server_factory: Any, py_client: PyFactory, channel_name: str
) -> None:
    server = server_factory(env={"MAX_CHANNELS_PER_CLIENT": "2"})
    a = py_client(server.ws_url, name="A")
    await a.subscribed(f"{channel_name}-1")
    await a.subscribed(f"{channel_name}-2")
    result = await a.subscribe(f"{channel_name}-3")
    assert result == {
        "status": "CHANNEL_ERROR",
        "error": json.dumps({"reason": "ChannelRateLimitReached: Too many channels"}),
    }


async def test_limit_joins_per_second(server_factory: Any, py_client: PyFactory, channel_name: str) -> None:
    server = server_factory(env={"MAX_JOINS_PER_SECOND": "1", "CHANNEL_ERROR_BACKOFF_MS": "300"})
    a = py_client(server.ws_url, name="A")
    results = []
    for i in range(12):
        result = await a.subscribe(f"{channel_name}-{i}")
        results.append(result)
        if result["status"] != "SUBSCRIBED":
            break
    assert results[-1] == {
        "status": "CHANNEL_ERROR",
        "error": json.dumps({"reason": "ClientJoinRateLimitReached: Too many joins per second"}),
    }
    assert len(results) >= 2 and all(r["status"] == "SUBSCRIBED" for r in results[:-1])
    # The server then closes the socket with 1001 (realtime-py reconnects on its own).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    closed = "WebSocket connection closed by server with code: 1001"
    while not any(closed in r.getMessage() for r in a.log.records):
        assert loop.time() < deadline, "the socket was not closed with 1001"
        await asyncio.sleep(0.05)


async def test_limit_messages_per_second(
    server_factory: Any, py_client: PyFactory, channel_name: str
) -> None:
    server = server_factory(env={"MAX_MESSAGES_PER_SECOND": "5"})
    a = py_client(server.ws_url, name="A")
    ch_a = await a.subscribed(channel_name)
    for i in range(30):
        await ch_a.send_broadcast("flood", {"i": i})
    err = await a.wait_for("status", ch=channel_name, status="CHANNEL_ERROR")
    assert json.loads(err["error"]) == {
        "extension": "system",
        "status": "error",
        "message": "Too many messages per second",
        "channel": channel_name,
    }
    await a.wait_for("status", ch=channel_name, status="CLOSED")
    assert ch_a.is_closed


async def test_limit_max_connections(server_factory: Any, py_client: PyFactory, channel_name: str) -> None:
    server = server_factory(env={"MAX_CONNECTIONS": "1"})
    a = py_client(server.ws_url, name="A")
    await a.subscribed(channel_name)
    b = py_client(server.ws_url, name="B", max_retries=1)
    with pytest.raises(InvalidStatus) as info:
        await b.client.connect()
    assert info.value.response.status_code == 503
    await a.barrier()


async def test_limit_payload_size_with_ack(
    server_factory: Any, py_client: PyFactory, channel_name: str
) -> None:
    server = server_factory(env={"MAX_PAYLOAD_SIZE_KB": "1"})
    a, b = py_client(server.ws_url, name="A"), py_client(server.ws_url, name="B")
    ch_a = await a.subscribed(channel_name, config={"broadcast": {"ack": True, "self": False}})
    await b.subscribed(channel_name)
    assert await acked_push(ch_a, "big", {"blob": "x" * 4096}) == (
        "error",
        {"reason": "payload_size_exceeded"},
    )
    assert await acked_push(ch_a, "small", {"n": 1}) == ("ok", {})
    await b.wait_for("broadcast", ch=channel_name)
    assert bevents(b, channel_name) == ["small"]


# -- interop with realtime-js ------------------------------------------------------------------------------


async def test_interop_with_realtime_js(
    shared_server: ServerProcess, py_client: PyFactory, js_client: JsFactory, channel_name: str
) -> None:
    """realtime-js on vsn 2.0.0 (binary kind-3 pushes) and realtime-py on vsn 1.0.0 in one channel."""
    js = await js_client(shared_server.ws_url, vsn="2.0.0", name="js")
    py = py_client(shared_server.ws_url, name="py")
    ch_py = await py.subscribed(
        channel_name, config={"presence": {"key": "py", "enabled": True}}, presence=True
    )
    await js.subscribed(channel_name, config={"presence": {"key": "js"}}, presence=True)

    assert (
        await js.call("send", ch=channel_name, event="from-js", payload={"text": "héllo", "n": [1, 2]})
        == "ok"
    )
    got = await py.wait_for("broadcast", ch=channel_name)
    assert got["payload"]["event"] == "from-js" and got["payload"]["payload"] == {
        "text": "héllo",
        "n": [1, 2],
    }
    assert any(f["binary"] and f.get("kind") == 3 for f in js.frames("out"))

    await ch_py.send_broadcast("from-py", {"ok": True})
    got = await js.wait_for("broadcast", ch=channel_name)
    assert got["payload"]["event"] == "from-py" and got["payload"]["payload"] == {"ok": True}

    await ch_py.track({"lang": "python"})
    assert await js.call("track", ch=channel_name, payload={"lang": "js"}) == "ok"
    sync = await js.wait_for(
        "presence", ch=channel_name, event="sync", pred=lambda e: set(e["state"]) == {"py", "js"}
    )
    assert sync["state"]["py"][0]["lang"] == "python"
    await py.wait_for(
        "presence", ch=channel_name, event="sync", pred=lambda e: set(e["state"]) == {"py", "js"}
    )
    mark = py.mark()
    assert await js.call("unsubscribe", ch=channel_name) == "ok"
    await py.wait_for("presence", since=mark, ch=channel_name, event="leave", key="js")


# -- token refresh, private channels, replay, presence callbacks added late ---------------------------


async def test_token_refresh_keeps_channel_open(
    auth_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    a = py_client(auth_server.ws_url, mint_token(SECRET, role="authenticated", ttl=3), name="A")
    await a.subscribed(channel_name)
    fresh = mint_token(SECRET, role="authenticated", ttl=3600)
    await a.client.set_auth(fresh)
    pushed = [f for f in a.log.frames("out") if f["event"] == "access_token"]
    assert [f["topic"] for f in pushed] == [f"realtime:{channel_name}"]
    await asyncio.sleep(4)  # past the first token's expiry
    body = {"messages": [{"topic": channel_name, "event": "still-here", "payload": {}}]}
    r = await rest_post(auth_server.http_url, "/api/broadcast", body, token=fresh)
    assert r.status_code == 202
    await a.wait_for("broadcast", ch=channel_name)
    await a.barrier()
    assert [e["status"] for e in a.find("status", ch=channel_name)] == ["SUBSCRIBED"]
    assert a.channels[channel_name].is_joined


#: Without a database private channels need a policy (CHANNEL_POLICY): every signed-in user may
#: read and write them here; anon may not.
SIGNED_IN_POLICY = '[{"topic": "*", "read": true, "write": true}]'


@pytest.fixture
def policy_server(server_factory: Any) -> ServerProcess:
    return server_factory(env={"JWT_SECRET": SECRET, "CHANNEL_POLICY": SIGNED_IN_POLICY})


async def test_private_channels(
    policy_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    auth_server = policy_server
    user = mint_token(SECRET, role="authenticated", sub="user-1")
    anon = mint_token(SECRET, role="anon")
    a, b = py_client(auth_server.ws_url, user, name="A"), py_client(auth_server.ws_url, anon, name="B")
    ch_a = await a.subscribed(channel_name, config={"private": True})
    result = await b.subscribe(channel_name, config={"private": True})
    reason = f"Unauthorized: You do not have permissions to read from this Channel topic: {channel_name}"
    assert result == {"status": "CHANNEL_ERROR", "error": json.dumps({"reason": reason})}
    c = py_client(auth_server.ws_url, anon, name="C")
    await c.subscribed(channel_name)
    # http_send on a private channel posts with ?private=true.
    await ch_a.http_send("secret", {"p": 1})
    await a.wait_for("broadcast", ch=channel_name)
    await c.barrier()
    assert broadcasts(c, channel_name) == []


async def test_replay_on_private_channel(
    policy_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    since = int(time.time() * 1000) - 60_000
    messages = [
        {"topic": channel_name, "event": "old", "payload": {"i": i}, "private": True} for i in range(3)
    ]
    service = mint_token(SECRET, role="service_role")
    r = await rest_post(policy_server.http_url, "/api/broadcast", {"messages": messages}, token=service)
    assert r.status_code == 202
    user = mint_token(SECRET, role="authenticated", sub="user-1")
    a = py_client(policy_server.ws_url, user, name="A")
    await a.subscribed(
        channel_name,
        config={"private": True, "broadcast": {"ack": False, "self": False, "replay": {"since": since}}},
    )
    got = await a.wait_count("broadcast", 3, ch=channel_name)
    assert [e["payload"]["payload"]["i"] for e in got] == [0, 1, 2]
    assert all(e["payload"]["meta"]["replayed"] is True for e in got)


async def test_presence_callbacks_added_after_join(
    shared_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    """realtime-py re-joins (phx_leave + phx_join) when presence callbacks are added to a joined channel."""
    a, b = py_client(shared_server.ws_url, name="A"), py_client(shared_server.ws_url, name="B")
    ch_b = await b.subscribed(
        channel_name, config={"presence": {"key": "bob", "enabled": True}}, presence=True
    )
    await ch_b.track({"name": "Bob"})
    sent_before = len(a.log.frames("out"))
    ch_a = await a.subscribed(channel_name)  # no presence yet
    mark = a.mark()
    ch_a.on_presence_sync(
        lambda: a.record(
            {"t": "presence", "ch": channel_name, "event": "sync", "state": dict(ch_a.presence_state())}
        )
    )
    await a.wait_for("status", since=mark, ch=channel_name, status="SUBSCRIBED")
    await a.wait_for(
        "presence", since=mark, ch=channel_name, event="sync", pred=lambda e: "bob" in e["state"]
    )
    out = [f["event"] for f in a.log.frames("out")[sent_before:] if f["topic"] == f"realtime:{channel_name}"]
    assert out == ["phx_join", "phx_leave", "phx_join"]
    # The re-joined channel still gets broadcasts (once).
    await ch_b.send_broadcast("after-rejoin", {})
    await a.wait_for("broadcast", ch=channel_name)
    await a.barrier()
    assert bevents(a, channel_name) == ["after-rejoin"]


async def test_remove_channel_closes_socket(
    shared_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    a = py_client(shared_server.ws_url, name="A")
    ch_a = await a.subscribed(channel_name)
    await a.client.remove_channel(ch_a)
    # The last channel gone, realtime-py sends phx_leave and closes the socket at once (it does not
    # wait for the reply, so no CLOSED status is reported).
    assert not a.client.is_connected
    assert [f["event"] for f in a.log.frames("out") if f["topic"] == f"realtime:{channel_name}"] == [
        "phx_join",
        "phx_leave",
    ]


async def test_http_send_with_slashes_in_names(
    shared_server: ServerProcess, py_client: PyFactory, channel_name: str
) -> None:
    """http_send quotes the sub-topic and event with safe='' ('/' -> %2F)."""
    name = f"org/1/{channel_name}:é"
    a = py_client(shared_server.ws_url, name="A")
    ch_a = await a.subscribed(name)
    await ch_a.http_send("msg/new", {"k": 1})
    got = await a.wait_for("broadcast", ch=name)
    assert got["payload"]["event"] == "msg/new" and got["payload"]["payload"] == {"k": 1}
