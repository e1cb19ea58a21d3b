"""The Phoenix session and the node, driven in memory (no sockets) through :class:`SessionPair`."""

from __future__ import annotations

import asyncio
import gc
import re
import time
import weakref
from collections.abc import Callable
from typing import Any

import jwt
import orjson
import pytest
from hypothesis import given, settings, strategies as st

from tests.support.session_pair import BinaryBroadcast, ClientEnd, Received, SessionPair
from tidings.auth.policy import parse_channel_policy
from tidings.auth.tokens import mint_token
from tidings.protocol.codec import Serializer

V1, V2 = Serializer.V1, Serializer.V2
ROOM = "realtime:room"
SECRET = "session-test-secret-that-is-long-enough-for-hs256"
SYSTEM_KEYS = {"extension", "status", "message", "channel"}


def pair(**settings: Any) -> SessionPair:
    return SessionPair(**settings)


def joined(p: SessionPair, serializer: Serializer = V2, topic: str = ROOM, **config: Any) -> ClientEnd:
    c = p.connect(serializer)
    c.join(topic, config)
    got = c.texts()
    assert got[0].event == "phx_reply" and got[0].status == "ok", got
    return c


def system_error(c: ClientEnd, message: str, topic: str = ROOM) -> None:
    """The channel was shut down: ``system`` error then ``phx_close`` (spec 8.3)."""
    got = c.texts()
    assert [m.event for m in got] == ["system", "phx_close"], got
    system, close = got
    assert system.payload == {
        "extension": "system",
        "status": "error",
        "message": message,
        "channel": topic.removeprefix("realtime:"),
    }
    assert system.ref is None
    join_ref = c.join_refs[topic]
    assert close.payload == {}
    if c.serializer is V2:
        assert (system.join_ref, close.join_ref, close.ref) == (join_ref, join_ref, join_ref)
    else:
        assert close.ref == join_ref
    assert topic not in c.session.channels


def join_error(c: ClientEnd, reason: str) -> None:
    reply = c.one()
    assert reply.event == "phx_reply"
    assert reply.payload == {"status": "error", "response": {"reason": reason}}


# -- heartbeat ---------------------------------------------------------------------------------


def test_heartbeat_v2() -> None:
    c = pair().connect(V2)
    c.heartbeat("10")
    m = c.one()
    assert m.raw == [None, "10", "phoenix", "phx_reply", {"status": "ok", "response": {}}]


def test_heartbeat_v1_null_ref() -> None:
    c = pair().connect(V1)
    c.heartbeat("")
    m = c.one()
    assert m.raw == {
        "topic": "phoenix",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": None,
    }


def test_other_phoenix_events_are_ignored() -> None:
    c = pair().connect(V2)
    c.push("phoenix", "something", {})
    assert c.received() == []


# -- join / leave ------------------------------------------------------------------------------


@pytest.mark.parametrize("serializer", [V1, V2])
def test_join_reply(serializer: Serializer) -> None:
    c = pair().connect(serializer)
    ref = c.join(ROOM, {"broadcast": {"self": False}})
    reply = c.one()
    assert reply.ref == ref and reply.topic == ROOM
    # Besides Supabase's keys, the channel's baseline for recovery: its seq and epoch.
    response = reply.payload["response"]
    assert reply.payload["status"] == "ok" and response.pop("postgres_changes") == []
    assert set(response) == {"seq", "epoch"} and isinstance(response["seq"], int)
    if serializer is V2:
        assert reply.join_ref == ref
    else:
        assert set(reply.raw) == {"topic", "event", "payload", "ref"}
    assert ROOM in c.session.channels


def test_join_with_presence_sends_presence_state_after_the_reply() -> None:
    c = pair().connect(V2)
    ref = c.join(ROOM, {"presence": {"enabled": True, "key": "u1"}})
    reply, state = c.texts()
    assert reply.event == "phx_reply"
    assert state.raw == [ref, None, ROOM, "presence_state", {}]


def test_join_without_presence_sends_no_presence_state() -> None:
    c = pair().connect(V2)
    c.join(ROOM, {"presence": {"enabled": False}})
    assert [m.event for m in c.texts()] == ["phx_reply"]


@pytest.mark.parametrize("serializer", [V1, V2])
def test_leave(serializer: Serializer) -> None:
    c = joined(pair(), serializer)
    join_ref = c.join_refs[ROOM]
    before = len(c.session.sent)
    ref = c.leave(ROOM)
    assert len(c.session.sent) == before + 1  # reply and phx_close in one write (see Session.dispatch)
    reply, close = c.texts()
    assert (reply.event, reply.ref, reply.payload) == ("phx_reply", ref, {"status": "ok", "response": {}})
    assert (close.event, close.ref, close.payload) == ("phx_close", join_ref, {})
    if serializer is V2:
        assert close.join_ref == join_ref
    assert ROOM not in c.session.channels
    c.broadcast(ROOM, "e", {})
    assert c.one().payload == {"status": "error", "response": {"reason": "unmatched topic"}}


def test_leave_of_an_unjoined_topic_is_ok() -> None:
    c = pair().connect(V2)
    ref = c.push("realtime:never", "phx_leave", {}, join_ref="3")
    assert c.one().raw == ["3", ref, "realtime:never", "phx_reply", {"status": "ok", "response": {}}]


@pytest.mark.parametrize("event", ["broadcast", "presence", "access_token", "whatever"])
def test_unmatched_topic(event: str) -> None:
    c = pair().connect(V1)
    ref = c.push("realtime:other", event, {"type": "broadcast", "event": "x", "payload": {}})
    m = c.one()
    assert m.raw == {
        "topic": "realtime:other",
        "event": "phx_reply",
        "payload": {"status": "error", "response": {"reason": "unmatched topic"}},
        "ref": ref,
    }


def test_join_of_a_non_realtime_topic_is_unmatched() -> None:
    c = pair().connect(V2)
    c.join("room")
    join_error(c, "unmatched topic")


def test_topic_name_required() -> None:
    c = pair().connect(V2)
    c.join("realtime:")
    join_error(c, "TopicNameRequired: You must provide a topic name")


def test_invalid_replay_params() -> None:
    c = pair().connect(V2)
    c.join(ROOM, {"broadcast": {"replay": {"since": "yesterday"}}})
    join_error(c, "UnableToReplayMessages: Replay params are not valid")


def test_duplicate_join_replaces_the_channel_without_phx_close() -> None:
    p = pair()
    c = joined(p, V2, broadcast={"self": True})
    first = c.session.channels[ROOM]
    ref = c.join(ROOM, {"broadcast": {"self": True}})
    assert [m.event for m in c.texts()] == ["phx_reply"]
    second = c.session.channels[ROOM]
    assert second is not first and first.closed
    assert second.join_ref == ref
    other = joined(p, V2)
    other.broadcast(ROOM, "once", {})
    got = c.texts()
    assert len(got) == 1, "the replaced channel no longer receives"


def test_unknown_events_on_a_joined_channel_are_ignored() -> None:
    c = joined(pair(), V2)
    c.push(ROOM, "postgres_changes", {"data": {}})
    c.push(ROOM, "phx_reply", {})
    assert c.received() == []
    assert ROOM in c.session.channels


# -- malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"{}",
        b"[1,2,3]",
        b'[null,"1","realtime:room","broadcast","payload"]',
        b'{"topic":"t"}',
        b"\xff",
    ],
)
def test_malformed_messages_are_dropped_and_the_session_goes_on(raw: bytes) -> None:
    p = pair()
    c = joined(p, V2)
    c.send_raw(raw)
    assert c.received() == []
    assert not c.closed
    assert p.node.metrics.malformed == 1
    c.heartbeat("9")
    assert c.one().ref == "9"


def test_broadcast_without_an_event_is_dropped() -> None:
    p = pair()
    c = joined(p, V2, broadcast={"self": True, "ack": True})
    c.push(ROOM, "broadcast", {"type": "broadcast", "payload": {}})
    assert c.received() == []
    assert p.node.metrics.malformed == 1


def test_binary_on_vsn1_is_dropped() -> None:
    p = pair()
    c = joined(p, V1)
    c.send_binary(ROOM, "e", b"{}")
    assert c.received() == []
    assert p.node.metrics.malformed == 1


def test_unknown_binary_kind_is_dropped() -> None:
    p = pair()
    c = joined(p, V2)
    c.session.receive_binary(bytes([1, 0, 0, 0, 0, 0, 1]) + b"{}")
    assert c.received() == []
    assert not c.closed


# -- broadcast ---------------------------------------------------------------------------------


def broadcast_payload(m: Received) -> dict[str, Any]:
    assert m.event == "broadcast" and m.ref is None
    payload: dict[str, Any] = m.payload
    return payload


def test_broadcast_fans_out_to_others_but_not_self_by_default() -> None:
    p = pair()
    a, b, c1 = joined(p, V2), joined(p, V2), joined(p, V1)
    a.broadcast(ROOM, "hello", {"x": 1})
    assert a.received() == []
    mb = b.one()
    assert mb.raw[:4] == [None, None, ROOM, "broadcast"]
    pb = broadcast_payload(mb)
    assert {k: pb[k] for k in ("type", "event", "payload")} == {
        "type": "broadcast",
        "event": "hello",
        "payload": {"x": 1},
    }
    assert isinstance(pb["meta"]["id"], str) and isinstance(pb["meta"]["seq"], int)
    mc = c1.one()
    assert set(mc.raw) == {"topic", "event", "payload", "ref"} and mc.ref is None
    assert broadcast_payload(mc) == pb


def test_broadcast_self_and_ack() -> None:
    p = pair()
    a = joined(p, V2, broadcast={"self": True, "ack": True})
    ref = a.broadcast(ROOM, "hi", {"n": 1})
    got = a.texts()
    events = [m.event for m in got]
    assert sorted(events) == ["broadcast", "phx_reply"]
    reply = got[events.index("phx_reply")]
    assert reply.raw == [a.join_refs[ROOM], ref, ROOM, "phx_reply", {"status": "ok", "response": {}}]
    assert broadcast_payload(got[events.index("broadcast")])["payload"] == {"n": 1}


def test_no_ack_means_no_reply() -> None:
    p = pair()
    a = joined(p, V2, broadcast={"self": False, "ack": False})
    a.broadcast(ROOM, "hi", {})
    assert a.received() == []


def test_ack_as_string_true() -> None:
    a = joined(pair(), V1, broadcast={"ack": "true"})
    ref = a.broadcast(ROOM, "hi", {})
    assert a.one().payload == {"status": "ok", "response": {}} and a.received() == []
    assert ref


def test_public_and_private_channels_are_separate() -> None:
    p = pair(channel_policy=parse_channel_policy('[{"topic": "room", "roles": ["anon"]}]'))
    public = joined(p, V2)
    private = joined(p, V2, private=True)
    sender = joined(p, V2)
    sender.broadcast(ROOM, "pub", {})
    assert public.one().payload["event"] == "pub"
    assert private.received() == []


def test_binary_push_with_json_reaches_v2_as_text_and_v1() -> None:
    p = pair()
    a = joined(p, V2, broadcast={"ack": True})
    b, c1 = joined(p, V2), joined(p, V1)
    ref = a.send_binary(ROOM, "hello", '{"msg":"héllo"}'.encode())
    assert a.one().raw == [a.join_refs[ROOM], ref, ROOM, "phx_reply", {"status": "ok", "response": {}}]
    assert broadcast_payload(b.one())["payload"] == {"msg": "héllo"}
    assert broadcast_payload(c1.one())["payload"] == {"msg": "héllo"}


def test_raw_binary_goes_to_v2_as_kind4_and_not_to_v1() -> None:
    p = pair()
    a = joined(p, V2)
    b, c1 = joined(p, V2), joined(p, V1)
    a.send_binary(ROOM, "blob", b"\x00\x01\xff", encoding=0)
    [got] = b.received()
    assert isinstance(got, BinaryBroadcast)
    assert (got.topic, got.event, got.encoding, got.payload) == (ROOM, "blob", 0, b"\x00\x01\xff")
    assert isinstance(got.meta["id"], str)
    assert c1.received() == []


def test_resent_message_id_is_delivered_once() -> None:
    p = pair()
    a = joined(p, V2, broadcast={"ack": True})
    b = joined(p, V2)
    a.broadcast(ROOM, "e", {"n": 1}, id="msg-1")
    a.broadcast(ROOM, "e", {"n": 1}, id="msg-1")
    assert [m.status for m in a.texts()] == ["ok", "ok"]
    assert len(b.texts()) == 1


# -- presence ----------------------------------------------------------------------------------


def diff_of(m: Received) -> dict[str, Any]:
    assert m.event == "presence_diff"
    if isinstance(m.raw, list):
        assert m.raw[:2] == [None, None]
    else:
        assert m.ref is None
    payload: dict[str, Any] = m.payload
    assert set(payload) == {"joins", "leaves"}
    return payload


def test_track_replies_ok_and_diffs_everyone_including_the_tracker() -> None:
    p = pair()
    a = joined(p, V2, presence={"key": "alice", "enabled": True})
    b = joined(p, V1)
    a.received(), b.received()
    ref = a.track(ROOM, {"online": True})
    reply, diff = a.texts()
    assert reply.ref == ref and reply.payload == {"status": "ok", "response": {}}
    d = diff_of(diff)
    [meta] = d["joins"]["alice"]["metas"]
    assert meta["online"] is True and isinstance(meta["phx_ref"], str)
    assert d["leaves"] == {}
    assert diff_of(b.one()) == d


def test_presence_update_is_leave_plus_join_with_phx_ref_prev() -> None:
    p = pair()
    a = joined(p, V2, presence={"key": "alice"})
    b = joined(p, V2)
    a.track(ROOM, {"s": 1})
    a.received(), b.received()
    a.track(ROOM, {"s": 2})
    d = diff_of(b.one())
    [new] = d["joins"]["alice"]["metas"]
    [old] = d["leaves"]["alice"]["metas"]
    assert (old["s"], new["s"]) == (1, 2)
    assert new["phx_ref_prev"] == old["phx_ref"]


def test_identical_track_is_ok_without_a_diff() -> None:
    p = pair()
    a = joined(p, V2, presence={"key": "alice"})
    b = joined(p, V2)
    a.track(ROOM, {"s": 1})
    a.received(), b.received()
    a.track(ROOM, {"s": 1})
    assert [m.status for m in a.texts()] == ["ok"]
    assert b.received() == []


def test_untrack_realtime_py_style_gives_a_leave() -> None:
    p = pair()
    a = joined(p, V1, presence={"key": "py"})
    b = joined(p, V2)
    a.track(ROOM, {"x": 1})
    a.received(), b.received()
    a.untrack(ROOM)
    assert [m.status for m in a.texts() if m.event == "phx_reply"] == ["ok"]
    d = diff_of(b.one())
    assert d["joins"] == {} and list(d["leaves"]) == ["py"]


def test_presence_state_on_join_lists_current_members() -> None:
    p = pair()
    a = joined(p, V2, presence={"key": "alice"})
    a.track(ROOM, {"name": "A"})
    c = p.connect(V1)
    c.join(ROOM, {"presence": {"key": "carol", "enabled": True}})
    reply, state = c.texts()
    assert state.event == "presence_state" and state.ref is None
    [meta] = state.payload["alice"]["metas"]
    assert meta["name"] == "A" and "phx_ref" in meta


def test_several_channels_with_one_key() -> None:
    p = pair()
    t1 = joined(p, V2, presence={"key": "u"})
    t2 = joined(p, V2, presence={"key": "u"})
    t1.track(ROOM, {"tab": 1})
    t2.track(ROOM, {"tab": 2})
    c = p.connect(V2)
    c.join(ROOM, {"presence": {"enabled": True}})
    state = c.texts()[1].payload
    assert sorted(m["tab"] for m in state["u"]["metas"]) == [1, 2]


def test_generated_presence_keys_are_unique() -> None:
    p = pair()
    a, b = joined(p, V2), joined(p, V2)
    a.track(ROOM, {})
    b.track(ROOM, {})
    d1 = diff_of(a.texts()[1])
    d2 = diff_of(b.texts()[-1])
    assert list(d1["joins"]) != list(d2["joins"])
    assert all(k for k in (*d1["joins"], *d2["joins"]))


@pytest.mark.parametrize("how", ["leave", "close", "duplicate join"])
def test_channel_end_announces_a_presence_leave(how: str) -> None:
    p = pair()
    a = joined(p, V2, presence={"key": "alice"})
    b = joined(p, V2)
    a.track(ROOM, {"x": 1})
    b.received()
    if how == "leave":
        a.leave(ROOM)
    elif how == "close":
        a.session.close(1000)
    else:
        a.join(ROOM, {"presence": {"key": "alice"}})
    d = diff_of(b.one())
    assert list(d["leaves"]) == ["alice"] and d["joins"] == {}


def test_track_payload_must_be_a_map() -> None:
    a = joined(pair(), V2)
    ref = a.push(ROOM, "presence", {"type": "presence", "event": "track", "payload": [1, 2]})
    m = a.one()
    assert m.ref == ref
    assert m.payload == {"status": "error", "response": {"reason": "Presence track payload must be a map"}}


def test_unknown_presence_event_is_an_error() -> None:
    a = joined(pair(), V2)
    a.push(ROOM, "presence", {"event": "dance"})
    assert a.one().status == "error"


def test_presence_event_is_case_insensitive_and_type_not_required() -> None:
    a = joined(pair(), V1, presence={"key": "k"})
    a.push(ROOM, "presence", {"event": "TRACK", "payload": {"a": 1}})
    reply, diff = a.texts()
    assert reply.status == "ok" and diff.event == "presence_diff"


# -- limits, each with its exact reason -----------------------------------------------------------


def test_max_channels_per_client() -> None:
    p = pair(max_channels_per_client=2)
    c = p.connect(V2)
    for topic in ("realtime:a", "realtime:b"):
        c.join(topic)
        assert c.one().status == "ok"
    c.join("realtime:c")
    join_error(c, "ChannelRateLimitReached: Too many channels")
    assert not c.closed
    c.join("realtime:a")
    assert c.one().status == "ok", "a duplicate join does not count twice"


def test_max_joins_per_second_refuses_and_closes_with_1001() -> None:
    p = pair(max_joins_per_second=1)  # a burst of 10 (averaged over 10 s)
    c = p.connect(V2)
    for i in range(10):
        c.join(f"realtime:r{i}")
        assert c.one().status == "ok"
    c.join("realtime:r10")
    join_error(c, "ClientJoinRateLimitReached: Too many joins per second")
    assert c.session.close_code == 1001
    assert c.session.channels == {}


def test_max_messages_per_second_shuts_the_channel_down() -> None:
    p = pair(max_messages_per_second=3)
    a = joined(p, V2)
    b = joined(p, V2)
    for _ in range(4):
        a.broadcast(ROOM, "flood", {})
    system_error(a, "Too many messages per second")
    assert len(b.texts()) == 3
    assert not a.closed, "the connection stays; only the channel is closed"
    a.heartbeat("h")
    assert a.one().ref == "h"


def test_max_node_messages_per_second_counts_all_clients() -> None:
    p = pair(max_node_messages_per_second=3, max_messages_per_second=100)
    a, b = joined(p, V2), joined(p, V2)
    a.broadcast(ROOM, "1", {})
    b.broadcast(ROOM, "2", {})
    a.broadcast(ROOM, "3", {})
    a.received(), b.received()
    b.broadcast(ROOM, "4", {})
    system_error(b, "Too many messages per second")


def test_payload_too_large_is_dropped_with_an_error_ack() -> None:
    p = pair(max_payload_size_kb=1)
    a = joined(p, V2, broadcast={"ack": True})
    b = joined(p, V2)
    ref = a.broadcast(ROOM, "big", {"x": "y" * 2000})
    m = a.one()
    assert m.ref == ref
    assert m.payload == {"status": "error", "response": {"reason": "payload_size_exceeded"}}
    assert b.received() == []
    assert ROOM in a.session.channels


def test_payload_too_large_without_ack_is_dropped_silently() -> None:
    p = pair(max_payload_size_kb=1)
    a = joined(p, V2)
    b = joined(p, V2)
    a.broadcast(ROOM, "big", {"x": "y" * 2000})
    assert a.received() == [] and b.received() == []


def test_client_presence_rate_limit() -> None:
    a = joined(pair(), V2, presence={"key": "k"})
    for i in range(5):
        a.track(ROOM, {"i": i})
        assert [m.event for m in a.texts()] == ["phx_reply", "presence_diff"]
    a.track(ROOM, {"i": 5})
    system_error(a, "Client presence rate limit exceeded")


def test_track_message_size_exceeded() -> None:
    a = joined(pair(max_payload_size_kb=1), V2)
    a.track(ROOM, {"blob": "z" * 2000})
    system_error(a, "Track message size exceeded")


def test_draining_refuses_joins() -> None:
    p = pair()
    c = p.connect(V2)
    p.node.draining = True
    c.join(ROOM)
    join_error(c, "RealtimeRestarting: Realtime is restarting, please standby")


# -- auth: join tokens, refresh and expiry -----------------------------------------------------------


#: Private channel ``room``: readable and writable by the authenticated role.
ROOM_POLICY = parse_channel_policy('[{"topic": "room", "read": true, "write": true}]')


def auth_pair(**settings: Any) -> SessionPair:
    return pair(jwt_secret=SECRET, **({"channel_policy": ROOM_POLICY} | settings))


def token(ttl: float, role: str = "authenticated", now: float | None = None, **claims: Any) -> str:
    return mint_token(SECRET, role=role, sub="u1", ttl=ttl, now=now, **claims)


def test_join_with_an_expired_access_token() -> None:
    p = auth_pair()
    c = p.connect(V2, token=token(3600))
    c.join(ROOM, access_token=token(-30))
    reply = c.one()
    assert reply.status == "error"
    assert re.fullmatch(r"InvalidJWTToken: Token has expired 3[01] seconds ago", reply.response["reason"])


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("garbage", "MalformedJWT: The token provided is not a valid JWT"),
        (
            mint_token("some-other-secret-that-is-also-long-enough!", ttl=86400),
            "JwtSignatureError: Failed to validate JWT signature",
        ),
    ],
)
def test_join_with_a_bad_access_token(bad: str, reason: str) -> None:
    c = auth_pair().connect(V2, token=token(3600))
    c.join(ROOM, access_token=bad)
    join_error(c, reason)


def test_join_without_access_token_uses_the_apikey_identity() -> None:
    c = auth_pair().connect(V2, token=token(3600, role="authenticated"))
    c.join(ROOM, {"private": True})
    assert c.one().status == "ok"


def test_sb_access_token_means_the_apikey() -> None:
    c = auth_pair().connect(V2, token=token(3600))
    c.join(ROOM, {"private": True}, access_token="sb_publishable_xyz")
    assert c.one().status == "ok"


def test_private_channel_needs_an_authenticated_role() -> None:
    c = auth_pair().connect(V2, token=token(3600, role="anon"))
    c.join(ROOM, {"private": True})
    join_error(c, "Unauthorized: You do not have permissions to read from this Channel topic: room")


def test_token_expiry_closes_the_channel_with_seconds_ago() -> None:
    p = auth_pair()
    t = token(100)
    c = p.connect(V2, token=t)
    c.join(ROOM, access_token=t)
    c.received()
    exp = c.session.channels[ROOM].principal.exp
    assert exp is not None
    p.node.sweep(now=exp - 1)
    assert c.received() == []
    p.node.sweep(now=exp + 12)
    system_error(c, "Token has expired 12 seconds ago")
    assert not c.closed


def test_access_token_refresh_moves_the_expiry_and_is_never_replied() -> None:
    p = auth_pair()
    now = time.time()
    t1, t2 = token(100, now=now), token(500, now=now)
    c = p.connect(V2, token=t1)
    c.join(ROOM, access_token=t1)
    c.received()
    c.push(ROOM, "access_token", {"access_token": t2})
    assert c.received() == []
    p.node.sweep(now=now + 200)
    assert c.received() == [], "the old token's expiry no longer applies"
    assert c.session.channels[ROOM].principal.token == t2
    p.node.sweep(now=now + 507)
    system_error(c, "Token has expired 7 seconds ago")


@pytest.mark.parametrize("same", ["null", "sb", "same"])
def test_access_token_refresh_ignored(same: str) -> None:
    p = auth_pair()
    t = token(100)
    c = p.connect(V2, token=t)
    c.join(ROOM, access_token=t)
    c.received()
    value = {"null": None, "sb": "sb_secret_abc", "same": t}[same]
    c.push(ROOM, "access_token", {"access_token": value})
    assert c.received() == []
    assert c.session.channels[ROOM].principal.token == t


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda: "not-a-jwt", "The token provided is not a valid JWT"),
        (lambda: mint_token(SECRET, role="anon", ttl=-20), r"Token has expired (20|21) seconds ago"),
        (
            lambda: jwt.encode({"sub": "x", "exp": time.time() + 100}, SECRET, algorithm="HS256"),
            "Fields `role` and `exp` are required in JWT",
        ),
    ],
)
def test_access_token_refresh_failure_closes_the_channel(bad: Callable[[], str], message: str) -> None:
    p = auth_pair()
    t = token(100)
    c = p.connect(V1, token=t)
    c.join(ROOM, access_token=t)
    c.received()
    c.push(ROOM, "access_token", {"access_token": bad()})
    system, close = c.texts()
    assert system.event == "system" and set(system.payload) == SYSTEM_KEYS
    assert system.payload["status"] == "error" and system.payload["channel"] == "room"
    assert re.fullmatch(message, system.payload["message"])
    assert close.event == "phx_close" and close.ref == c.join_refs[ROOM]


def test_refresh_to_a_role_that_cannot_read_a_private_channel() -> None:
    p = auth_pair()
    t = token(100)
    c = p.connect(V2, token=t)
    c.join(ROOM, {"private": True}, access_token=t)
    c.received()
    c.push(ROOM, "access_token", {"access_token": token(100, role="anon")})
    system_error(c, "You no longer have permission to read from this Channel topic: room")


# -- heartbeat deadline ------------------------------------------------------------------------------


def test_silent_connection_is_closed_after_two_heartbeat_intervals() -> None:
    p = pair(heartbeat_interval=1.0)
    quiet = joined(p, V2, presence={"key": "q"})
    quiet.track(ROOM, {})
    talker = joined(p, V2)
    talker.received()
    for _ in range(2):
        p.node.sweep()
        talker.session.last_seen = p.node.tick  # what the I/O layer does on every read
    assert not quiet.closed
    p.node.sweep()
    assert (quiet.session.close_code, quiet.session.close_reason) == (1000, "heartbeat timeout")
    assert not talker.closed
    assert quiet.session not in p.node.sessions
    assert p.node.metrics.heartbeat_timeouts == 1
    assert list(diff_of(talker.one())["leaves"]) == ["q"]


# -- replay ------------------------------------------------------------------------------------------


def recovery(reply: Received) -> tuple[Any, Any]:
    """``postgres_changes`` and ``recovered`` of a join reply (Tidings may add keys beside them)."""
    assert reply.event == "phx_reply" and reply.status == "ok", reply
    return reply.response["postgres_changes"], reply.response["recovered"]


def seqs_of(msgs: list[Received]) -> list[int]:
    return [m.payload["meta"]["seq"] for m in msgs if m.event == "broadcast"]


def test_replay_since_seq_recovered() -> None:
    p = pair()
    pub = joined(p, V2)
    sub = joined(p, V2)
    for i in range(3):
        pub.broadcast(ROOM, "e", {"i": i})
    first, *rest = seqs_of(sub.texts())
    c = p.connect(V1)
    c.join(ROOM, {"broadcast": {"replay": {"since_seq": first}}, "presence": {"enabled": True}})
    got = c.texts()
    assert [m.event for m in got] == ["phx_reply", "broadcast", "broadcast", "presence_state"]
    assert got[0].status == "ok"
    assert recovery(got[0]) == ([], True)
    assert seqs_of(got) == rest
    for m in got[1:3]:
        assert m.payload["meta"]["replayed"] is True and m.ref is None
    assert [m.payload["payload"] for m in got[1:3]] == [{"i": 1}, {"i": 2}]


def test_replay_up_to_date_is_recovered_and_empty() -> None:
    p = pair()
    pub, sub = joined(p, V2), joined(p, V2)
    pub.broadcast(ROOM, "e", {})
    [last] = seqs_of(sub.texts())
    c = p.connect(V2)
    c.join(ROOM, {"broadcast": {"replay": {"since_seq": last}}})
    [reply] = c.texts()
    assert recovery(reply) == ([], True)


def test_replay_beyond_history_is_not_recovered() -> None:
    p = pair(history_size=2)
    pub, sub = joined(p, V2), joined(p, V2)
    for i in range(5):
        pub.broadcast(ROOM, "e", {"i": i})
    seqs = seqs_of(sub.texts())
    c = p.connect(V2)
    c.join(ROOM, {"broadcast": {"replay": {"since_seq": seqs[0]}}})
    got = c.texts()
    assert recovery(got[0]) == ([], False)
    assert seqs_of(got) == seqs[3:]


def test_replay_over_the_limit_is_not_recovered() -> None:
    p = pair()
    pub, sub = joined(p, V2), joined(p, V2)
    for i in range(5):
        pub.broadcast(ROOM, "e", {"i": i})
    seqs = seqs_of(sub.texts())
    c = p.connect(V2)
    c.join(ROOM, {"broadcast": {"replay": {"since_seq": seqs[0], "limit": 2}}})
    got = c.texts()
    assert got[0].response["recovered"] is False
    assert seqs_of(got) == seqs[1:3]


def test_replay_by_time() -> None:
    p = pair()
    pub, sub = joined(p, V2), joined(p, V2)
    # After the channel's history began (at the first join): before it nothing can be proven.
    since_ms = int(time.time() * 1000) + 1
    time.sleep(0.002)
    pub.broadcast(ROOM, "e", {"i": 0})
    sub.received()
    c = p.connect(V2)
    c.join(ROOM, {"broadcast": {"replay": {"since": since_ms}}})
    got = c.texts()
    assert recovery(got[0]) == ([], True)
    assert [m.payload["payload"] for m in got[1:]] == [{"i": 0}]


def test_replay_skips_raw_binary_and_says_so() -> None:
    p = pair()
    pub, sub = joined(p, V2), joined(p, V2)
    pub.broadcast(ROOM, "json", {"i": 0})
    pub.send_binary(ROOM, "bin", b"\x01", encoding=0)
    [m] = [x for x in sub.received() if isinstance(x, Received)]
    c = p.connect(V2)
    c.join(ROOM, {"broadcast": {"replay": {"since_seq": m.payload["meta"]["seq"] - 1}}})
    got = c.texts()
    assert got[0].response["recovered"] is False
    assert [x.payload["event"] for x in got[1:]] == ["json"]


def test_live_messages_after_a_replay_join() -> None:
    p = pair()
    pub, sub = joined(p, V2), joined(p, V2)
    pub.broadcast(ROOM, "e", {"i": 0})
    [seq] = seqs_of(sub.texts())
    c = p.connect(V2)
    c.join(ROOM, {"broadcast": {"replay": {"since_seq": seq}}})
    c.received()
    pub.broadcast(ROOM, "e", {"i": 1})
    assert seqs_of(c.texts()) == [seq + 1]


# -- v1 frames never carry join_ref -----------------------------------------------------------------


def test_v1_server_frames_always_have_ref_and_never_join_ref() -> None:
    p = pair(max_messages_per_second=2)
    c = p.connect(V1)
    other = joined(p, V2, presence={"key": "o"})
    c.join(ROOM, {"presence": {"enabled": True, "key": "me"}, "broadcast": {"ack": True, "self": True}})
    c.heartbeat("")
    c.track(ROOM, {"a": 1})
    other.track(ROOM, {"b": 1})
    c.broadcast(ROOM, "e", {})
    c.push("realtime:nope", "broadcast", {})
    c.broadcast(ROOM, "e", {})
    c.broadcast(ROOM, "e", {})  # over the limit: system + phx_close
    frames = c.frames()
    events = set()
    for frame in frames:
        obj = orjson.loads(bytes(frame.data))
        assert set(obj) == {"topic", "event", "payload", "ref"}, obj
        events.add(obj["event"])
    assert events == {"phx_reply", "presence_state", "presence_diff", "broadcast", "system", "phx_close"}


# -- join error backoff --------------------------------------------------------------------------------


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_join_errors_wait_for_channel_error_backoff() -> None:
    p = pair(channel_error_backoff=0.05)
    c = p.connect(V2)
    c.join("realtime:")
    assert c.session.sent == [], "the error reply is not sent at once"
    await wait_until(lambda: bool(c.session.sent))
    join_error(c, "TopicNameRequired: You must provide a topic name")


async def test_join_rate_limit_with_backoff_replies_then_closes_1001() -> None:
    p = pair(channel_error_backoff=0.05, max_joins_per_second=1)
    c = p.connect(V2)
    for i in range(11):
        c.join(f"realtime:r{i}")
    assert not c.closed
    await wait_until(lambda: c.closed)
    assert c.session.close_code == 1001
    replies = c.texts()
    assert [m.status for m in replies] == ["ok"] * 10 + ["error"]
    assert replies[-1].response == {"reason": "ClientJoinRateLimitReached: Too many joins per second"}


async def test_delayed_join_error_is_dropped_once_the_connection_closed() -> None:
    p = pair(channel_error_backoff=0.02)
    c = p.connect(V2)
    c.join("realtime:")
    c.session.close(1000)
    await asyncio.sleep(0.1)
    assert c.session.sent == []


def test_binary_push_to_an_unjoined_topic_is_unmatched() -> None:
    c = pair().connect(V2)
    c.join_refs["realtime:x"] = "4"
    ref = c.send_binary("realtime:x", "e", b"{}")
    assert c.one().raw == [
        "4",
        ref,
        "realtime:x",
        "phx_reply",
        {"status": "error", "response": {"reason": "unmatched topic"}},
    ]


# -- bounded memory --------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [False, True])
def test_closed_connections_are_not_retained(auth: bool) -> None:
    # A client that connects, joins and goes away in a loop must not grow the node's memory,
    # whatever its token (a long-lived one must not pin every closed channel until it expires).
    p = auth_pair() if auth else pair()
    apikey = token(10 * 365 * 86400) if auth else None
    refs = []
    n = 3000
    for i in range(n):
        c = p.connect(V2, token=apikey)
        c.join(f"realtime:room{i % 7}")
        refs.append(weakref.ref(c.session))
        c.session.close(1000)
    del c
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive <= n // 2, f"{alive} of {n} closed sessions are still referenced"


# -- property: peer input never raises ------------------------------------------------------------

TOPICS = st.sampled_from(["realtime:a", "realtime:b", "realtime:", "phoenix", "x"])
EVENTS = st.sampled_from(
    ["phx_join", "phx_leave", "broadcast", "presence", "access_token", "heartbeat", "phx_reply", "other"]
)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
PAYLOADS = st.fixed_dictionaries(
    {},
    optional={
        "config": st.fixed_dictionaries(
            {},
            optional={
                "broadcast": st.fixed_dictionaries(
                    {}, optional={"self": VALUES, "ack": VALUES, "replay": VALUES}
                ),
                "presence": st.fixed_dictionaries({}, optional={"key": VALUES, "enabled": VALUES}),
                "private": VALUES,
            },
        )
        | VALUES,
        "type": st.just("broadcast") | VALUES,
        "event": st.sampled_from(["track", "untrack", "e", "TRACK"]) | VALUES,
        "payload": VALUES,
        "access_token": st.sampled_from(["garbage", "sb_x"]) | VALUES,
        "id": VALUES,
    },
)
MESSAGES = st.lists(
    st.tuples(st.sampled_from(["text", "binary", "raw"]), TOPICS, EVENTS, PAYLOADS, st.binary(max_size=40)),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(serializer=st.sampled_from([V1, V2]), auth=st.booleans(), messages=MESSAGES)
def test_property_peer_input_never_raises(serializer: Serializer, auth: bool, messages: list[Any]) -> None:
    p = auth_pair(max_messages_per_second=10) if auth else pair(max_messages_per_second=10)
    c = p.connect(serializer, token=token(3600) if auth else None)
    watcher = joined(p, V2, topic="realtime:a", presence={"enabled": True})
    for kind, topic, event, payload, raw in messages:
        if kind == "text":
            c.push(topic, event, payload)
        elif kind == "binary":
            c.send_binary(
                topic, event if isinstance(event, str) else "e", raw, encoding=raw[0] % 3 if raw else 1
            )
        else:
            c.session.receive_binary(raw)
            c.send_raw(raw)
    p.node.sweep(now=time.time() + 7200)
    c.received()
    watcher.received()
    for frame in c.frames():
        assert frame.opcode.name in ("TEXT", "BINARY")
