"""@supabase/realtime-js (the official JS client, run by node) against a real Tidings server.

Every test runs on both serializers: vsn 2.0.0 (the client's default: JSON arrays, broadcasts sent
as binary kind-3 frames, raw-binary broadcasts received as kind-4 frames) and vsn 1.0.0 (JSON
objects). Delivery is checked on the receiving client, never only through a callback resolving;
"not delivered" is checked behind a barrier (a heartbeat round trip on the same socket, which the
server answers after it has written everything the earlier frames caused).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from typing import Any

import pytest

from tests.support.server import ServerProcess
from tidings.auth.tokens import mint_token

from .conftest import JsClient, JsFactory, broadcasts, rest_post

pytestmark = [pytest.mark.clients, pytest.mark.parametrize("vsn", ["2.0.0", "1.0.0"])]

SECRET = "conformance-secret-at-least-32-bytes-long"


async def barrier(client: JsClient) -> None:
    """Everything the server sent this client before now has been received (same socket, in order)."""
    assert await client.call("heartbeat") == "ok", client.transcript()


def topic_of(ch: str) -> str:
    return f"realtime:{ch}"


def outgoing_broadcasts(client: JsClient, since: int = 0) -> list[dict[str, Any]]:
    """The client's own broadcast pushes as they went on the wire."""
    out = []
    for f in client.frames("out", since):
        if f["binary"]:
            if f.get("kind") == 3:
                out.append(f)
            continue
        m = json.loads(f["text"])
        if (m[3] if isinstance(m, list) else m["event"]) == "broadcast":
            out.append(f)
    return out


# -- subscribe and broadcast -----------------------------------------------------------------------


async def test_subscribe_and_broadcast_without_self(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(shared_server.ws_url, vsn=vsn, name="A")
    b = await js_client(shared_server.ws_url, vsn=vsn, name="B")
    await a.subscribed(channel_name)
    await b.subscribed(channel_name)

    payload = {"msg": "héllo", "n": 1, "nested": {"list": [1, 2, 3]}}
    assert await a.call("send", ch=channel_name, event="hello", payload=payload) == "ok"
    got = await b.wait_for("broadcast", ch=channel_name)
    assert got["payload"]["type"] == "broadcast"
    assert got["payload"]["event"] == "hello"
    assert got["payload"]["payload"] == payload

    # Without `self` the sender does not get its own broadcast back.
    await barrier(a)
    assert broadcasts(a, channel_name) == []

    # What went on the wire: vsn 2.0.0 sends a binary kind-3 frame, vsn 1.0.0 a JSON object.
    sent = outgoing_broadcasts(a)
    assert len(sent) == 1
    if vsn == "2.0.0":
        assert sent[0]["binary"] and sent[0]["kind"] == 3
        assert sent[0]["topic"] == topic_of(channel_name) and sent[0]["event"] == "hello"
    else:
        assert not sent[0]["binary"] and sent[0]["text"].startswith("{")


async def test_broadcast_with_self_and_ack(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(shared_server.ws_url, vsn=vsn, name="A")
    b = await js_client(shared_server.ws_url, vsn=vsn, name="B")
    await a.subscribed(channel_name, config={"broadcast": {"self": True, "ack": True}})
    await b.subscribed(channel_name)

    for i in range(3):
        # With ack, send() resolves 'ok' only on the server's reply to this push.
        assert await a.call("send", ch=channel_name, event="tick", payload={"i": i}) == "ok"
    mine = await a.wait_count("broadcast", 3, ch=channel_name)
    theirs = await b.wait_count("broadcast", 3, ch=channel_name)
    assert [e["payload"]["payload"]["i"] for e in mine] == [0, 1, 2]
    assert [e["payload"]["payload"]["i"] for e in theirs] == [0, 1, 2]

    # The acks really are server replies to the pushes' refs.
    sent_refs = {f["ref"] for f in a.frames("out") if f["binary"] and f.get("kind") == 3}
    if vsn == "1.0.0":
        sent_refs = {
            m["ref"] for m in a.text_frames("out") if isinstance(m, dict) and m["event"] == "broadcast"
        }
    replies = [
        m
        for m in a.text_frames("in")
        if (m[3] if isinstance(m, list) else m["event"]) == "phx_reply"
        and (m[1] if isinstance(m, list) else m["ref"]) in sent_refs
    ]
    assert len(replies) == 3
    assert all((m[4] if isinstance(m, list) else m["payload"])["status"] == "ok" for m in replies)


async def test_event_filter_and_binary_broadcast(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(shared_server.ws_url, vsn=vsn, name="A")
    b = await js_client(shared_server.ws_url, vsn=vsn, name="B")
    await a.subscribed(channel_name)
    await b.subscribed(channel_name, broadcast=["wanted"])

    assert await a.call("send", ch=channel_name, event="unwanted", payload={"x": 0}) == "ok"
    assert await a.call("send", ch=channel_name, event="WANTED", payload={"x": 1}) == "ok"
    got = await b.wait_for("broadcast", ch=channel_name)
    assert got["payload"]["payload"] == {"x": 1}  # the client filters by event, case-insensitively

    # A raw-binary payload (REST octet-stream): vsn 2.0.0 receives a kind-4 frame and an
    # ArrayBuffer; vsn 1.0.0 cannot represent it and the server drops it for that subscriber.
    before = b.mark()
    result = await a.call("httpSend", ch=channel_name, event="wanted", bytes="00ff10")
    assert result == {"success": True}
    await a.call("httpSend", ch=channel_name, event="wanted", payload={"after": "binary"})
    last = await b.wait_for(
        "broadcast", since=before, ch=channel_name, pred=lambda e: "after" in e["payload"]["payload"]
    )
    received = broadcasts(b, channel_name, since=before)
    if vsn == "2.0.0":
        assert received[0]["payload"] == {"$bytes": "00ff10"}
        kind4 = [f for f in b.frames("in", before) if f["binary"]]
        assert kind4 and kind4[0]["kind"] == 4 and kind4[0]["encoding"] == 0
    else:
        assert received == [last["payload"]]


# -- presence ----------------------------------------------------------------------------------------


def presence_keys(event: dict[str, Any]) -> set[str]:
    return set(event["state"])


async def test_presence_sync_between_two_clients(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(shared_server.ws_url, vsn=vsn, name="A")
    b = await js_client(shared_server.ws_url, vsn=vsn, name="B")
    await a.subscribed(channel_name, config={"presence": {"key": "alice"}}, presence=True)
    await b.subscribed(channel_name, config={"presence": {"key": "bob"}}, presence=True)

    assert await a.call("track", ch=channel_name, payload={"name": "Alice", "online": True}) == "ok"
    assert await b.call("track", ch=channel_name, payload={"name": "Bob"}) == "ok"

    both = {"alice", "bob"}
    for client in (a, b):
        sync = await client.wait_for(
            "presence", ch=channel_name, event="sync", pred=lambda e: presence_keys(e) == both
        )
        assert sync["state"]["alice"][0]["name"] == "Alice"
        assert sync["state"]["alice"][0]["online"] is True
        assert sync["state"]["bob"][0]["name"] == "Bob"
        assert all(m["presence_ref"] for metas in sync["state"].values() for m in metas)
    assert presence_keys({"state": await a.call("presenceState", ch=channel_name)}) == both

    # An update shows as leave + join of the same key (spec 5.1), then the new state.
    mark = a.mark()
    assert await b.call("track", ch=channel_name, payload={"name": "Bobby"}) == "ok"
    updated = await a.wait_for(
        "presence",
        since=mark,
        ch=channel_name,
        event="sync",
        pred=lambda e: e["state"].get("bob", [{}])[0].get("name") == "Bobby",
    )
    assert len(updated["state"]["bob"]) == 1

    # A leave is seen: B unsubscribes, A gets a leave for "bob" and a state without it.
    mark = a.mark()
    assert await b.call("unsubscribe", ch=channel_name) == "ok"
    leave = await a.wait_for("presence", since=mark, ch=channel_name, event="leave", key="bob")
    assert leave["presences"][0]["name"] == "Bobby"
    await a.wait_for(
        "presence", since=mark, ch=channel_name, event="sync", pred=lambda e: presence_keys(e) == {"alice"}
    )

    # Untrack is seen by the other side as a leave too.
    c = await js_client(shared_server.ws_url, vsn=vsn, name="C")
    await c.subscribed(channel_name, presence=True)
    await c.wait_for("presence", ch=channel_name, event="sync", pred=lambda e: presence_keys(e) == {"alice"})
    mark = c.mark()
    assert await a.call("untrack", ch=channel_name) == "ok"
    await c.wait_for("presence", since=mark, ch=channel_name, event="leave", key="alice")
    await c.wait_for("presence", since=mark, ch=channel_name, event="sync", pred=lambda e: e["state"] == {})


# -- heartbeat and unsubscribe ---------------------------------------------------------------------


async def test_heartbeat_replies(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(shared_server.ws_url, vsn=vsn, heartbeat_ms=1000, name="A")
    await a.subscribed(channel_name)
    oks = await a.wait_count("heartbeat", 2, status="ok", timeout=15)
    assert all(isinstance(e["latency"], int | float) for e in oks)
    assert not a.find("heartbeat", status="timeout") and not a.find("heartbeat", status="error")

    # On the wire: topic "phoenix", the reply echoes the request's ref.
    def fields(m: Any) -> tuple[Any, Any, Any]:
        return (m[2], m[3], m[1]) if isinstance(m, list) else (m["topic"], m["event"], m["ref"])

    sent_refs = [fields(m)[2] for m in a.text_frames("out") if fields(m)[:2] == ("phoenix", "heartbeat")]
    replied = [fields(m)[2] for m in a.text_frames("in") if fields(m)[:2] == ("phoenix", "phx_reply")]
    assert len(replied) >= 2
    assert set(replied) <= set(sent_refs)
    # The socket stayed up the whole time.
    assert a.find("socket", event="open") and not a.find("socket", event="close")


async def test_unsubscribe(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(shared_server.ws_url, vsn=vsn, name="A")
    b = await js_client(shared_server.ws_url, vsn=vsn, name="B")
    await a.subscribed(channel_name)
    await b.subscribed(channel_name)
    mark = a.mark()
    assert await a.call("unsubscribe", ch=channel_name) == "ok"
    await a.wait_for("status", since=mark, ch=channel_name, status="CLOSED")
    assert (await a.call("state", ch=channel_name))["channel"] == "closed"

    # phx_leave went out; the server answered ok to its ref and closed the channel.
    def unpack(m: Any) -> tuple[Any, Any, Any, Any]:
        return (
            (m[1], m[2], m[3], m[4])
            if isinstance(m, list)
            else (m["ref"], m["topic"], m["event"], m["payload"])
        )

    leave_refs = [unpack(m)[0] for m in a.text_frames("out", mark) if unpack(m)[2] == "phx_leave"]
    assert len(leave_refs) == 1

    # phoenix.js resolves unsubscribe() 'ok' locally as soon as phx_leave is sent (the channel is
    # already "leaving", so it cannot push): the server's reply and phx_close arrive afterwards.
    def inbound(f: dict[str, Any]) -> tuple[Any, Any, Any, Any] | None:
        return None if f["binary"] else unpack(json.loads(f["text"]))

    reply = await a.wait_for(
        "frame", since=mark, dir="in", pred=lambda f: (inbound(f) or (None,))[0] == leave_refs[0]
    )
    ref, topic, event, payload = inbound(reply) or (None, None, None, None)
    assert (topic, event, payload) == (topic_of(channel_name), "phx_reply", {"status": "ok", "response": {}})
    await a.wait_for(
        "frame",
        since=mark,
        dir="in",
        pred=lambda f: (inbound(f) or (None,) * 4)[1:3] == (topic_of(channel_name), "phx_close"),
    )

    # The server really dropped the subscription: a REST broadcast reaches B but not A.
    r = await rest_post(
        shared_server.http_url,
        "/api/broadcast",
        {"messages": [{"topic": channel_name, "event": "after", "payload": {}}]},
    )
    assert r.status_code == 202
    await b.wait_for("broadcast", ch=channel_name)
    await barrier(a)
    assert broadcasts(a, channel_name) == []
    assert not [f for f in a.frames("in", mark) if f["binary"]]


# -- REST broadcast ----------------------------------------------------------------------------------


async def test_rest_broadcast_reaches_websocket_subscribers(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(shared_server.ws_url, vsn=vsn, name="A")
    await a.subscribed(channel_name)
    base = shared_server.http_url
    for prefix in ("/api", "/realtime/v1/api"):
        r = await rest_post(
            base,
            f"{prefix}/broadcast",
            {"messages": [{"topic": channel_name, "event": "batch", "payload": {"prefix": prefix}}]},
        )
        assert r.status_code == 202, r.text
        r = await rest_post(base, f"{prefix}/broadcast/{channel_name}/events/single", {"prefix": prefix})
        assert r.status_code == 202, r.text
    got = await a.wait_count("broadcast", 4, ch=channel_name)
    seen = sorted((e["payload"]["event"], e["payload"]["payload"]["prefix"]) for e in got)
    assert seen == sorted(
        [("batch", "/api"), ("single", "/api"), ("batch", "/realtime/v1/api"), ("single", "/realtime/v1/api")]
    )

    # The client's own REST paths: httpSend, and send() on a channel that is not joined (fallback).
    sender = await js_client(shared_server.ws_url, vsn=vsn, name="sender")
    await sender.call("channel", ch=channel_name)
    assert await sender.call("httpSend", ch=channel_name, event="via-http", payload={"k": 1}) == {
        "success": True
    }
    assert await sender.call("send", ch=channel_name, event="via-fallback", payload={"k": 2}) == "ok"
    await a.wait_for("broadcast", ch=channel_name, pred=lambda e: e["payload"]["event"] == "via-http")
    fallback = await a.wait_for(
        "broadcast", ch=channel_name, pred=lambda e: e["payload"]["event"] == "via-fallback"
    )
    assert fallback["payload"]["payload"] == {"k": 2}
    assert not sender.find("socket", event="open")  # both went over HTTP, no socket was opened


# -- rejoin after a server restart ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "killed"])
async def test_rejoin_after_server_restart(
    server_factory: Any, js_client: JsFactory, channel_name: str, vsn: str, sig: int
) -> None:
    server = server_factory()
    a = await js_client(server.ws_url, vsn=vsn, name="A")
    b = await js_client(server.ws_url, vsn=vsn, name="B")
    await a.subscribed(channel_name, config={"presence": {"key": "a"}}, presence=True)
    await b.subscribed(channel_name)
    marks = a.mark(), b.mark()

    # Graceful: drained with close code 1012. Killed: the TCP connections just drop.
    await asyncio.to_thread(server.restart, sig)

    # Each client notices the close, reconnects by itself and rejoins its channel.
    for client, mark in zip((a, b), marks, strict=True):
        await client.wait_for("socket", since=mark, event="close", timeout=15)
        await client.wait_for("socket", since=mark, event="open", timeout=20)
        await client.wait_for("status", since=mark, ch=channel_name, status="SUBSCRIBED", timeout=20)

    # Broadcasts flow again, both from a client and from REST, and presence works again.
    assert await a.call("send", ch=channel_name, event="again", payload={"from": "A"}) == "ok"
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
    assert await a.call("track", ch=channel_name, payload={"back": True}) == "ok"
    await a.wait_for(
        "presence", since=marks[0], ch=channel_name, event="sync", pred=lambda e: "a" in e["state"]
    )


# -- auth ----------------------------------------------------------------------------------------------


@pytest.fixture
def auth_server(server_factory: Any) -> ServerProcess:
    return server_factory(env={"JWT_SECRET": SECRET})


async def test_auth_valid_token(
    auth_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    token = mint_token(SECRET, role="authenticated", sub="user-1")
    a = await js_client(auth_server.ws_url, vsn=vsn, apikey=token, name="A")
    b = await js_client(auth_server.ws_url, vsn=vsn, apikey=token, name="B")
    await a.subscribed(channel_name)
    await b.subscribed(channel_name)
    assert await a.call("send", ch=channel_name, event="authed", payload={"ok": True}) == "ok"
    await b.wait_for("broadcast", ch=channel_name)
    # httpSend authenticates with the apikey header: accepted.
    assert await a.call("httpSend", ch=channel_name, event="rest", payload={}) == {"success": True}
    await b.wait_for("broadcast", ch=channel_name, pred=lambda e: e["payload"]["event"] == "rest")


async def test_auth_refused_tokens(
    auth_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    good = mint_token(SECRET, role="anon")
    a = await js_client(auth_server.ws_url, vsn=vsn, apikey=good, name="A")

    # An expired channel token: the join is refused with the reason in CHANNEL_ERROR.
    expired = mint_token(SECRET, role="authenticated", ttl=-30)
    await a.call("setAuth", token=expired)
    result = await a.subscribe(f"{channel_name}-expired")
    assert result["status"] == "CHANNEL_ERROR"
    assert re.fullmatch(r"InvalidJWTToken: Token has expired \d+ seconds ago", result["error"]), result

    # A token signed with another secret.
    await a.call("setAuth", token=mint_token("another-secret-that-is-also-32-bytes!!", role="anon"))
    result = await a.subscribe(f"{channel_name}-badsig")
    assert result == {
        "status": "CHANNEL_ERROR",
        "error": "JwtSignatureError: Failed to validate JWT signature",
    }

    # Not a JWT at all.
    await a.call("setAuth", token="not-a-jwt")
    result = await a.subscribe(f"{channel_name}-garbage")
    assert result == {
        "status": "CHANNEL_ERROR",
        "error": "MalformedJWT: The token provided is not a valid JWT",
    }

    # A bad apikey: the upgrade itself is refused (401); the client only sees a transport failure.
    bad = await js_client(auth_server.ws_url, vsn=vsn, apikey=mint_token(SECRET, ttl=-5), name="bad")
    result = await bad.subscribe(channel_name)
    assert result == {"status": "CHANNEL_ERROR", "error": "channel error: transport failure"}
    err = await bad.wait_for("socket", event="error")
    assert "401" in err["message"]
    assert not bad.find("socket", event="open")


async def test_auth_token_expiring_while_joined(
    auth_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(auth_server.ws_url, vsn=vsn, apikey=mint_token(SECRET, role="anon"), name="A")
    short = mint_token(SECRET, role="authenticated", ttl=3)
    await a.call("setAuth", token=short)
    await a.subscribed(channel_name)
    # The server closes the channel at expiry: a system error, then phx_close (no auto-rejoin).
    system = await a.wait_for("system", ch=channel_name, timeout=15)
    assert system["payload"]["status"] == "error"
    assert system["payload"]["extension"] == "system"
    assert re.fullmatch(r"Token has expired \d+ seconds ago", system["payload"]["message"]), system
    await a.wait_for("status", ch=channel_name, status="CLOSED", timeout=10)
    state = await a.call("state", ch=channel_name)
    assert state["channel"] == "closed" and state["connected"]


# -- limits ----------------------------------------------------------------------------------------------


async def test_limit_channels_per_client(
    server_factory: Any, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    server = server_factory(env={"MAX_CHANNELS_PER_CLIENT": "2"})
    a = await js_client(server.ws_url, vsn=vsn, name="A")
    await a.subscribed(f"{channel_name}-1")
    await a.subscribed(f"{channel_name}-2")
    result = await a.subscribe(f"{channel_name}-3")
    assert result == {"status": "CHANNEL_ERROR", "error": "ChannelRateLimitReached: Too many channels"}
    # The first two still work.
    r = await rest_post(
        server.http_url,
        "/api/broadcast",
        {"messages": [{"topic": f"{channel_name}-2", "event": "e", "payload": {}}]},
    )
    assert r.status_code == 202
    await a.wait_for("broadcast", ch=f"{channel_name}-2")


async def test_limit_joins_per_second(
    server_factory: Any, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    # MAX_JOINS_PER_SECOND=1 allows a burst of 10 joins (averaged over 10 s), then refuses.
    server = server_factory(env={"MAX_JOINS_PER_SECOND": "1"})
    a = await js_client(server.ws_url, vsn=vsn, name="A")
    statuses = []
    for i in range(12):
        result = await a.subscribe(f"{channel_name}-{i}")
        statuses.append(result)
        if result["status"] != "SUBSCRIBED":
            break
    assert statuses[-1] == {
        "status": "CHANNEL_ERROR",
        "error": "ClientJoinRateLimitReached: Too many joins per second",
    }
    assert all(s["status"] == "SUBSCRIBED" for s in statuses[:-1]) and len(statuses) >= 2
    # ... and the server then closes the socket (1001).
    close = await a.wait_for("socket", event="close", timeout=10)
    assert close["code"] == 1001


async def test_limit_messages_per_second(
    server_factory: Any, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    server = server_factory(env={"MAX_MESSAGES_PER_SECOND": "5"})
    a = await js_client(server.ws_url, vsn=vsn, name="A")
    await a.subscribed(channel_name)
    await a.call("sendMany", ch=channel_name, event="flood", count=30)
    system = await a.wait_for("system", ch=channel_name)
    assert system["payload"] == {
        "extension": "system",
        "status": "error",
        "message": "Too many messages per second",
        "channel": channel_name,
    }
    await a.wait_for("status", ch=channel_name, status="CLOSED")
    assert (await a.call("state", ch=channel_name))["channel"] == "closed"


async def test_limit_max_connections(
    server_factory: Any, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    server = server_factory(env={"MAX_CONNECTIONS": "1"})
    a = await js_client(server.ws_url, vsn=vsn, name="A")
    await a.subscribed(channel_name)
    b = await js_client(server.ws_url, vsn=vsn, name="B")
    result = await b.subscribe(channel_name)
    assert result == {"status": "CHANNEL_ERROR", "error": "channel error: transport failure"}
    err = await b.wait_for("socket", event="error")
    assert "503" in err["message"]
    assert not b.find("socket", event="open")
    # The connected client is unaffected.
    assert await a.call("heartbeat") == "ok"


async def test_limit_payload_size_with_ack(
    server_factory: Any, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    server = server_factory(env={"MAX_PAYLOAD_SIZE_KB": "1"})
    a = await js_client(server.ws_url, vsn=vsn, name="A")
    b = await js_client(server.ws_url, vsn=vsn, name="B")
    await a.subscribed(channel_name, config={"broadcast": {"ack": True}})
    await b.subscribed(channel_name)
    assert await a.call("send", ch=channel_name, event="big", payload={"blob": "x" * 4096}) == "error"
    assert await a.call("send", ch=channel_name, event="small", payload={"n": 1}) == "ok"
    await b.wait_for("broadcast", ch=channel_name, pred=lambda e: e["payload"]["event"] == "small")
    assert [e["payload"]["event"] for e in b.find("broadcast", ch=channel_name)] == ["small"]
    # The refused push got an error reply with a reason object.
    errors = [
        (m[4] if isinstance(m, list) else m["payload"])
        for m in a.text_frames("in")
        if (m[3] if isinstance(m, list) else m["event"]) == "phx_reply"
        and (m[4] if isinstance(m, list) else m["payload"])["status"] == "error"
    ]
    assert errors == [{"status": "error", "response": {"reason": "payload_size_exceeded"}}]


# -- token refresh, private channels, replay, resubscribe ------------------------------------------


async def test_token_refresh_keeps_channel_open(
    auth_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(auth_server.ws_url, vsn=vsn, apikey=mint_token(SECRET, role="anon"), name="A")
    short = mint_token(SECRET, role="authenticated", ttl=3)
    await a.call("setAuth", token=short)
    await a.subscribed(channel_name)
    # setAuth on a joined channel pushes an `access_token` event (never answered by the server).
    fresh = mint_token(SECRET, role="authenticated", ttl=3600)
    mark = a.mark()
    await a.call("setAuth", token=fresh)

    def access_token_push(f: dict[str, Any]) -> bool:
        if f["binary"]:
            return False
        m = json.loads(f["text"])
        return (m[3] if isinstance(m, list) else m["event"]) == "access_token"

    pushed = json.loads((await a.wait_for("frame", access_token_push, since=mark, dir="out"))["text"])
    assert (pushed[4] if isinstance(pushed, list) else pushed["payload"]) == {"access_token": fresh}
    # Past the first token's expiry the channel is still open and still receives broadcasts.
    await asyncio.sleep(4)
    r = await rest_post(
        auth_server.http_url,
        "/api/broadcast",
        {"messages": [{"topic": channel_name, "event": "still-here", "payload": {}}]},
        token=fresh,
    )
    assert r.status_code == 202
    await a.wait_for("broadcast", ch=channel_name)
    await barrier(a)
    assert a.find("system", ch=channel_name) == []
    assert (await a.call("state", ch=channel_name))["channel"] == "joined"


#: Without a database private channels need a policy (CHANNEL_POLICY): every signed-in user may
#: read and write them here; anon may not.
SIGNED_IN_POLICY = '[{"topic": "*", "read": true, "write": true}]'


@pytest.fixture
def policy_server(server_factory: Any) -> ServerProcess:
    return server_factory(env={"JWT_SECRET": SECRET, "CHANNEL_POLICY": SIGNED_IN_POLICY})


async def test_private_channels(
    policy_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    auth_server = policy_server
    user = mint_token(SECRET, role="authenticated", sub="user-1")
    anon = mint_token(SECRET, role="anon")
    a = await js_client(auth_server.ws_url, vsn=vsn, apikey=user, name="A-private")
    b = await js_client(auth_server.ws_url, vsn=vsn, apikey=anon, name="B-anon")
    await a.call("setAuth", token=user)
    await a.subscribed(channel_name, config={"private": True})
    # An anon token may not read a private channel.
    result = await b.subscribe(channel_name, config={"private": True})
    assert result == {
        "status": "CHANNEL_ERROR",
        "error": f"Unauthorized: You do not have permissions to read from this Channel topic: {channel_name}",
    }
    # The public channel of the same name is a different fan-out group.
    c = await js_client(auth_server.ws_url, vsn=vsn, apikey=anon, name="C-public")
    await c.subscribed(channel_name)
    assert await a.call("httpSend", ch=channel_name, event="secret", payload={"p": 1}) == {"success": True}
    got = await a.wait_for("broadcast", ch=channel_name)
    assert got["payload"]["event"] == "secret"
    await barrier(c)
    assert broadcasts(c, channel_name) == []
    # An anon REST post to the private topic is refused (403) by the single endpoint.
    r = await rest_post(
        auth_server.http_url, f"/api/broadcast/{channel_name}/events/x?private=true", {}, token=anon
    )
    assert r.status_code == 403


async def test_replay_on_private_channel(
    policy_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    since = int(time.time() * 1000) - 60_000
    messages = [
        {"topic": channel_name, "event": "old", "payload": {"i": i}, "private": True} for i in range(3)
    ]
    service = mint_token(SECRET, role="service_role")
    r = await rest_post(policy_server.http_url, "/api/broadcast", {"messages": messages}, token=service)
    assert r.status_code == 202
    user = mint_token(SECRET, role="authenticated", sub="user-1")
    a = await js_client(policy_server.ws_url, vsn=vsn, apikey=user, name="A")
    await a.subscribed(
        channel_name, config={"private": True, "broadcast": {"replay": {"since": since, "limit": 10}}}
    )
    got = await a.wait_count("broadcast", 3, ch=channel_name)
    assert [e["payload"]["payload"]["i"] for e in got] == [0, 1, 2]
    assert all(e["payload"]["meta"]["replayed"] is True and e["payload"]["meta"]["id"] for e in got)


async def test_resubscribe_after_unsubscribe(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(shared_server.ws_url, vsn=vsn, name="A")
    b = await js_client(shared_server.ws_url, vsn=vsn, name="B")
    await b.subscribed(channel_name)
    await a.subscribed(channel_name, config={"presence": {"key": "a"}}, presence=True)
    assert await a.call("removeChannel", ch=channel_name) == "ok"
    # A new channel instance for the same topic joins with a new join_ref and works.
    await a.subscribed(channel_name, config={"presence": {"key": "a"}}, presence=True)
    joins = [m for m in a.text_frames("out") if (m[3] if isinstance(m, list) else m["event"]) == "phx_join"]
    refs = [(m[0] if isinstance(m, list) else m["join_ref"]) for m in joins]
    assert len(refs) == 2 and refs[0] != refs[1]
    assert await b.call("send", ch=channel_name, event="again", payload={}) == "ok"
    await a.wait_for("broadcast", ch=channel_name)
    assert await a.call("track", ch=channel_name, payload={"v": 2}) == "ok"
    await a.wait_for(
        "presence", ch=channel_name, event="sync", pred=lambda e: e["state"].get("a", [{}])[0].get("v") == 2
    )


async def test_presence_leave_when_client_dies(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    a = await js_client(shared_server.ws_url, vsn=vsn, name="A")
    b = await js_client(shared_server.ws_url, vsn=vsn, name="B")
    await a.subscribed(channel_name, config={"presence": {"key": "a"}}, presence=True)
    await b.subscribed(channel_name, config={"presence": {"key": "b"}}, presence=True)
    assert await b.call("track", ch=channel_name, payload={"here": True}) == "ok"
    await a.wait_for("presence", ch=channel_name, event="sync", pred=lambda e: "b" in e["state"])
    mark = a.mark()
    b.proc.kill()  # no leave, no close frame: the server notices the TCP connection drop
    await a.wait_for("presence", since=mark, ch=channel_name, event="leave", key="b")
    await a.wait_for(
        "presence", since=mark, ch=channel_name, event="sync", pred=lambda e: "b" not in e["state"]
    )


async def test_http_send_with_slashes_in_names(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    """httpSend URL-encodes the sub-topic and event as path segments (encodeURIComponent: '/' -> %2F)."""
    name = f"org/1/{channel_name}:é"
    a = await js_client(shared_server.ws_url, vsn=vsn, name="A")
    await a.subscribed(name)
    assert await a.call("httpSend", ch=name, event="msg/new", payload={"k": 1}) == {"success": True}
    got = await a.wait_for("broadcast", ch=name)
    assert got["payload"]["event"] == "msg/new" and got["payload"]["payload"] == {"k": 1}


async def test_binary_broadcast_over_websocket(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, vsn: str
) -> None:
    """send() with an ArrayBuffer: vsn 2.0.0 pushes kind 3 with encoding 0, receivers on vsn 2.0.0
    get a kind-4 frame, receivers on vsn 1.0.0 cannot represent it and get nothing."""
    a = await js_client(shared_server.ws_url, vsn=vsn, name="A")
    v2 = await js_client(shared_server.ws_url, vsn="2.0.0", name="v2")
    v1 = await js_client(shared_server.ws_url, vsn="1.0.0", name="v1")
    await a.subscribed(channel_name, config={"broadcast": {"ack": True}})
    await v2.subscribed(channel_name)
    await v1.subscribed(channel_name)
    result = await a.call("send", ch=channel_name, event="raw", bytes="deadbeef00")
    assert await a.call("send", ch=channel_name, event="json", payload={"after": True}) == "ok"
    await v1.wait_for("broadcast", ch=channel_name)
    await v2.wait_count("broadcast", 2, ch=channel_name)
    if vsn == "2.0.0":
        assert result == "ok"
        sent = [f for f in a.frames("out") if f["binary"]]
        assert sent[0]["kind"] == 3 and sent[0]["encoding"] == 0
        assert [p["payload"] for p in broadcasts(v2, channel_name)] == [
            {"$bytes": "deadbeef00"},
            {"after": True},
        ]
        kind4 = [f for f in v2.frames("in") if f["binary"]]
        assert len(kind4) == 1 and kind4[0]["kind"] == 4 and kind4[0]["event"] == "raw"
    else:
        # On vsn 1.0.0 the client JSON-encodes the ArrayBuffer, which becomes {}: bytes are lost
        # client-side, and everyone receives an empty object.
        assert result == "ok"
        assert [p["payload"] for p in broadcasts(v2, channel_name)] == [{}, {"after": True}]
    await barrier(v1)
    assert [p["event"] for p in broadcasts(v1, channel_name)] == (
        ["json"] if vsn == "2.0.0" else ["raw", "json"]
    )
