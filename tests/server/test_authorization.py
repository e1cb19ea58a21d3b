"""Realtime Authorization without a database, driven in memory (:class:`SessionPair`): private
channels are denied to every role but ``service_role`` unless ``CHANNEL_POLICY`` allows them, per
extension, and every path (join, broadcast, track, refresh, fan-out) follows it. The same rules
with a database (Supabase's row level security) are tested in ``tests/db/test_authorization_server.py``.
"""

from __future__ import annotations

import time
from typing import Any

from tests.support.session_pair import ClientEnd, Received, SessionPair
from tidings.auth.policy import parse_channel_policy
from tidings.auth.tokens import mint_token
from tidings.protocol import errors
from tidings.protocol.codec import Serializer

V1, V2 = Serializer.V1, Serializer.V2
SECRET = "authorization-test-secret-that-is-long-enough"


def token(sub: str | None = "u1", role: str = "authenticated", ttl: float = 3600, **claims: Any) -> str:
    return mint_token(SECRET, role=role, sub=sub, ttl=ttl, **claims)


def node_pair(policy: str | None = None, **settings: Any) -> SessionPair:
    return SessionPair(
        jwt_secret=SECRET,
        channel_policy=parse_channel_policy(policy),
        channel_error_backoff=0.0,
        connect_error_backoff=0.0,
        **settings,
    )


def join(p: SessionPair, topic: str, tok: str, serializer: Serializer = V2, **config: Any) -> ClientEnd:
    c = p.connect(serializer, token=tok)
    c.join(topic, {"private": True, **config})
    return c


def reply_of(c: ClientEnd) -> Received:
    got = c.texts()
    assert got and got[0].event == "phx_reply", got
    return got[0]


def assert_joined(c: ClientEnd) -> list[Received]:
    got = c.texts()
    assert got[0].event == "phx_reply" and got[0].status == "ok", got
    return got[1:]


def assert_refused(c: ClientEnd, topic: str) -> None:
    reply = reply_of(c)
    assert reply.status == "error"
    assert reply.response == {"reason": errors.unauthorized_read_reason(topic.removeprefix("realtime:"))}
    assert topic not in c.session.channels


def events(c: ClientEnd) -> list[str]:
    return [m.event for m in c.texts()]


def test_private_channels_are_denied_by_default_to_every_role_but_service_role() -> None:
    p = node_pair()
    for role in ("anon", "authenticated", "supabase_admin"):
        assert_refused(join(p, "realtime:room", token(role=role)), "realtime:room")
    service = join(p, "realtime:room", token(role="service_role"), broadcast={"ack": True})
    assert_joined(service)
    service.broadcast("realtime:room", "e", {})
    assert events(service) == ["phx_reply"]  # the ack: service_role writes too
    assert p.node.metrics.authz_denied_reads == 3


def test_open_mode_tokens_follow_the_policy_too() -> None:
    p = SessionPair(channel_error_backoff=0.0)  # no JWT_SECRET: claims are not verified
    c = p.connect(V2)  # no token: anon
    c.join("realtime:room", {"private": True})
    assert_refused(c, "realtime:room")
    public = p.connect(V2)
    public.join("realtime:room", {})
    assert_joined(public)


def test_user_sub_policy_lets_only_the_owner_in() -> None:
    p = node_pair('[{"topic": "user:{sub}", "read": true, "write": true}]')
    owner = join(p, "realtime:user:u1", token("u1"), broadcast={"ack": True, "self": True})
    assert_joined(owner)
    assert_refused(join(p, "realtime:user:u1", token("u2")), "realtime:user:u1")
    assert_refused(join(p, "realtime:user:u1", token("u1", role="anon")), "realtime:user:u1")
    assert_refused(join(p, "realtime:user:", token(None)), "realtime:user:")
    other_own = join(p, "realtime:user:u2", token("u2"))
    assert_joined(other_own)
    owner.broadcast("realtime:user:u1", "hello", {"n": 1})
    assert sorted(events(owner)) == ["broadcast", "phx_reply"]  # its own copy and the ack
    assert other_own.texts() == []


def test_broadcast_without_write_is_dropped_silently_and_never_delivered() -> None:
    p = node_pair('[{"topic": "room", "read": true}, {"topic": "room", "roles": ["service_role"]}]')
    reader = join(p, "realtime:room", token("u1"), broadcast={"ack": True, "self": True})
    other = join(p, "realtime:room", token("u2"))
    assert_joined(reader), assert_joined(other)
    reader.broadcast("realtime:room", "sneaky", {})
    reader.broadcast("realtime:room", "again", {})
    assert reader.texts() == [] and other.texts() == []  # no ack, no copy, no delivery
    assert p.node.metrics.authz_denied_writes == 2
    assert p.node.metrics.published == 0


def test_track_without_presence_write_gets_an_error_reply() -> None:
    p = node_pair('[{"topic": "room", "read": true, "write": ["broadcast"]}]')
    c = join(p, "realtime:room", token("u1"), presence={"enabled": True, "key": "me"})
    watcher = join(p, "realtime:room", token("u2"), presence={"enabled": True})
    assert [m.event for m in assert_joined(c)] == ["presence_state"]
    assert_joined(watcher)
    ref = c.track("realtime:room", {"online": True})
    [reply] = c.texts()
    assert reply.ref == ref and reply.payload == {"status": "error", "response": {}}
    assert watcher.texts() == []
    c.untrack("realtime:room")  # untrack needs no permission (nothing tracked: no diff)
    assert reply_of(c).status == "ok"


def test_members_get_only_the_extensions_they_may_read() -> None:
    policy = """[
        {"topic": "room", "read": true, "write": true},
        {"topic": "room", "roles": ["broadcast_only"], "read": ["broadcast"]},
        {"topic": "room", "roles": ["presence_only"], "read": ["presence"]}
    ]"""
    p = node_pair(policy)
    full = join(p, "realtime:room", token("u1"), presence={"enabled": True, "key": "full"})
    bonly = join(p, "realtime:room", token("b", role="broadcast_only"), V1, presence={"enabled": True})
    ponly = join(p, "realtime:room", token("p", role="presence_only"), presence={"enabled": True})
    assert [m.event for m in assert_joined(full)] == ["presence_state"]
    assert assert_joined(bonly) == []  # no presence_state without presence read
    assert [m.event for m in assert_joined(ponly)] == ["presence_state"]
    full.track("realtime:room", {"here": True})
    assert events(full) == ["phx_reply", "presence_diff"]
    assert events(bonly) == []
    assert events(ponly) == ["presence_diff"]
    full.broadcast("realtime:room", "news", {"n": 1})
    assert events(bonly) == ["broadcast"]
    assert events(ponly) == []
    # A broadcast-only member that leaves and comes back: nothing stale is kept for it.
    bonly.leave("realtime:room")
    assert p.node.presence_unread == {}
    assert [c.topic for c in p.node.broadcast_unread["x:room"]] == ["realtime:room"]  # ponly's


def test_presence_is_not_delivered_to_a_private_member_that_did_not_enable_it_until_it_tracks() -> None:
    p = node_pair('[{"topic": "room", "read": true, "write": true}]')
    tracker = join(p, "realtime:room", token("u1"), presence={"enabled": True, "key": "t"})
    quiet = join(p, "realtime:room", token("u2"))  # presence not enabled: read not evaluated
    assert_joined(tracker), assert_joined(quiet)
    tracker.track("realtime:room", {"a": 1})
    tracker.texts()
    assert quiet.texts() == []  # as Supabase: presence read unevaluated, diffs withheld
    quiet.track("realtime:room", {"b": 1})  # tracking evaluates presence read (and write)
    assert events(quiet) == ["phx_reply", "presence_diff"]
    tracker.track("realtime:room", {"a": 2})
    assert "presence_diff" in events(quiet)


def test_refresh_that_loses_read_closes_the_channel_and_stops_delivery() -> None:
    p = node_pair('[{"topic": "user:{sub}", "read": true, "write": true}]')
    owner = join(p, "realtime:user:u1", token("u1"))
    sender = join(p, "realtime:user:u1", token(role="service_role"))
    assert_joined(owner), assert_joined(sender)
    owner.push("realtime:user:u1", "access_token", {"access_token": token("u1", ttl=7200)})
    assert owner.texts() == []  # same permissions: nothing to say
    owner.push("realtime:user:u1", "access_token", {"access_token": token("u2")})
    system, close = owner.texts()
    assert system.event == "system" and close.event == "phx_close"
    assert system.payload == {
        "extension": "system",
        "status": "error",
        "message": errors.read_permission_revoked_message("user:u1"),
        "channel": "user:u1",
    }
    sender.broadcast("realtime:user:u1", "after", {})
    assert owner.texts() == []
    assert "realtime:user:u1" not in owner.session.channels
    assert p.node.metrics.authz_denied_reads == 1


def test_refresh_re_evaluates_write() -> None:
    policy = '[{"topic": "room", "read": true}, {"topic": "room", "claims": {"writer": true}, "write": true}]'
    p = node_pair(policy)
    c = join(p, "realtime:room", token("u1"), broadcast={"ack": True})
    assert_joined(c)
    c.broadcast("realtime:room", "e", {})
    assert c.texts() == []  # no write yet
    c.push("realtime:room", "access_token", {"access_token": token("u1", writer=True)})
    c.broadcast("realtime:room", "e", {})
    assert events(c) == ["phx_reply"]


def test_replication_ready_without_a_database_closes_the_channel_at_once() -> None:
    p = node_pair()
    c = p.connect(V2, token=token())
    c.join("realtime:feed", {"broadcast": {"replication_ready": True}})
    reply, system, close = c.texts()
    assert reply.status == "ok"
    assert system.payload == {
        "extension": "system",
        "status": "error",
        "message": errors.REPLICATION_NOT_READY,
        "channel": "feed",
    }
    assert close.event == "phx_close"


def seqs(msgs: list[Received]) -> list[int]:
    return [m.payload["meta"]["seq"] for m in msgs if m.event == "broadcast"]


def history_of(p: SessionPair, count: int) -> list[int]:
    pub = p.connect(V2)
    pub.join("realtime:log", {})
    sub = p.connect(V2)
    sub.join("realtime:log", {})
    pub.texts(), sub.texts()
    for i in range(count):
        pub.broadcast("realtime:log", "e", {"i": i})
    return seqs(sub.texts())


def test_since_seq_replay_honours_replay_max_not_25() -> None:
    p = SessionPair(channel_error_backoff=0.0)  # REPLAY_MAX 100, history 100
    got = history_of(p, 60)
    c = p.connect(V2)
    c.join("realtime:log", {"broadcast": {"replay": {"since_seq": got[0] - 1, "limit": 100}}})
    reply, *replayed = c.texts()
    assert reply.response["recovered"] is True
    assert seqs(replayed) == got


def test_since_seq_replay_is_clamped_to_replay_max() -> None:
    p = SessionPair(channel_error_backoff=0.0, replay_max=30)
    got = history_of(p, 40)
    c = p.connect(V2)
    c.join("realtime:log", {"broadcast": {"replay": {"since_seq": got[0] - 1, "limit": 100}}})
    reply, *replayed = c.texts()
    assert reply.response["recovered"] is False
    assert seqs(replayed) == got[:30]


def test_since_replay_keeps_supabases_1_to_25() -> None:
    p = SessionPair(channel_error_backoff=0.0)
    since = int(time.time() * 1000) - 1
    got = history_of(p, 30)
    c = p.connect(V2)
    c.join("realtime:log", {"broadcast": {"replay": {"since": since, "limit": 100}}})
    _, *replayed = c.texts()
    assert seqs(replayed) == got[-25:]  # the newest 25, oldest first


def test_a_replay_needs_broadcast_read() -> None:
    p = node_pair('[{"topic": "room", "roles": ["presence_only"], "read": ["presence"]}]')
    c = join(p, "realtime:room", token("p", role="presence_only"), broadcast={"replay": {"since_seq": 0}})
    assert_refused(c, "realtime:room")
    plain = join(p, "realtime:room", token("p", role="presence_only"), presence={"enabled": True})
    assert_joined(plain)
