"""The authorization model without a database: Permissions, the declarative CHANNEL_POLICY, and
the permission cache (pure: no sockets, no PostgreSQL)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from tidings.auth.policy import (
    ALLOW_ALL,
    DENY_ALL,
    UNCHECKED,
    AuthorizationContext,
    ChannelPolicy,
    PermissionCache,
    Permissions,
    PolicyAuthorizer,
    PolicyError,
    parse_channel_policy,
    restrict_read,
    restrict_write,
)
from tidings.config import ConfigError, load_config
from tidings.protocol import errors

VALUES = (None, False, True)
ALL_PERMISSIONS = [Permissions.of(*v) for v in itertools.product(VALUES, repeat=4)]


def flags(p: Permissions) -> tuple[bool | None, ...]:
    return (p.broadcast_read, p.broadcast_write, p.presence_read, p.presence_write)


def user(sub: Any = "u1", role: str = "authenticated", **extra: Any) -> dict[str, Any]:
    claims = {"role": role, **extra}
    if sub is not None:
        claims["sub"] = sub
    return claims


# --------------------------------------------------------------------------------------------
# Permissions
# --------------------------------------------------------------------------------------------


def test_equal_permissions_are_one_object() -> None:
    assert Permissions.of(True, None, False, None) is Permissions.of(True, None, False, None)
    assert len({id(p) for p in ALL_PERMISSIONS}) == 81
    assert (
        flags(ALLOW_ALL) == (True,) * 4
        and flags(DENY_ALL) == (False,) * 4
        and flags(UNCHECKED) == (None,) * 4
    )


@pytest.mark.parametrize(
    "p", ALL_PERMISSIONS, ids=lambda p: "".join("-ft"[VALUES.index(v)] for v in flags(p))
)
def test_reading_a_permission(p: Permissions) -> None:
    assert p.readable == bool(p.broadcast_read or p.presence_read)
    assert p.can_read("broadcast") is (p.broadcast_read is True)
    assert p.can_read("presence") is (p.presence_read is True)
    assert p.can_write("broadcast") is (p.broadcast_write is True)
    assert p.can_write("presence") is (p.presence_write is True)
    assert p.read_checked == (p.broadcast_read is not None or p.presence_read is not None)
    assert p.write_checked == (p.broadcast_write is not None or p.presence_write is not None)


@given(st.sampled_from(ALL_PERMISSIONS), st.sampled_from(ALL_PERMISSIONS))
def test_merging_takes_what_the_newer_evaluated(old: Permissions, new: Permissions) -> None:
    merged = old.merged(new)
    for o, n, m in zip(flags(old), flags(new), flags(merged), strict=True):
        assert m == (o if n is None else n)
    assert merged is Permissions.of(*flags(merged))


@given(st.sampled_from(ALL_PERMISSIONS), st.sampled_from(ALL_PERMISSIONS))
def test_read_revoked_is_a_read_turning_from_allowed_to_denied(old: Permissions, new: Permissions) -> None:
    expected = (old.broadcast_read is True and new.broadcast_read is False) or (
        old.presence_read is True and new.presence_read is False
    )
    assert old.read_revoked(new) is expected


def test_restricting_to_read_or_write() -> None:
    assert flags(restrict_read(ALLOW_ALL, presence=True)) == (True, None, True, None)
    assert flags(restrict_read(ALLOW_ALL, presence=False)) == (True, None, None, None)
    assert flags(restrict_write(ALLOW_ALL, presence=True)) == (None, True, None, True)
    assert flags(restrict_write(ALLOW_ALL, presence=False)) == (None, True, None, False)  # as Supabase


def test_supabases_reason_strings() -> None:
    assert errors.unauthorized_read_reason("room-1") == (
        "Unauthorized: You do not have permissions to read from this Channel topic: room-1"
    )
    assert errors.read_permission_revoked_message("room-1") == (
        "You no longer have permission to read from this Channel topic: room-1"
    )


# --------------------------------------------------------------------------------------------
# AuthorizationContext
# --------------------------------------------------------------------------------------------


def test_the_context_reads_role_and_sub_from_the_claims() -> None:
    ctx = AuthorizationContext(
        "room-1", {"sub": 42, "role": "authenticated", "exp": 1}, {"X-Forwarded-For": "1.2.3.4"}
    )
    assert (ctx.topic, ctx.role, ctx.sub) == ("room-1", "authenticated", "42")
    assert ctx.headers == {"x-forwarded-for": "1.2.3.4"}
    assert json.loads(ctx.claims_json) == {"sub": 42, "role": "authenticated", "exp": 1}
    assert not ctx.is_service_role and AuthorizationContext("t", {"role": "service_role"}).is_service_role
    none = AuthorizationContext("t", None)
    assert (none.role, none.sub, none.claims_json, none.headers_json) == (None, None, "{}", "{}")
    assert AuthorizationContext("t", {"role": ""}).role is None


def test_the_cache_key_ignores_claim_order_and_follows_topic_claims_and_headers() -> None:
    a = AuthorizationContext("t", {"role": "authenticated", "sub": "x"})
    b = AuthorizationContext("t", {"sub": "x", "role": "authenticated"})
    assert a.key == b.key
    assert a.key != a.for_topic("u").key
    assert a.for_topic("u").claims_json == a.claims_json
    assert a.key != AuthorizationContext("t", {"role": "authenticated", "sub": "y"}).key
    assert a.key != AuthorizationContext("t", a.claims, {"x-a": "1"}).key


# --------------------------------------------------------------------------------------------
# The declarative policy
# --------------------------------------------------------------------------------------------

OWNER_POLICY = [{"topic": "user:{sub}", "read": True, "write": True}]


def test_no_policy_denies_everyone_but_service_role() -> None:
    policy = parse_channel_policy(None)
    assert policy.permissions("room-1", user()) is DENY_ALL
    assert policy.permissions("room-1", {"role": "anon"}) is DENY_ALL
    assert policy.permissions("room-1", None) is DENY_ALL
    assert policy.permissions("room-1", {"role": "service_role"}) is ALLOW_ALL
    assert parse_channel_policy("") == parse_channel_policy("  ") == ChannelPolicy()


def test_a_user_topic_is_readable_and_writable_by_its_owner_only() -> None:
    policy = parse_channel_policy(json.dumps(OWNER_POLICY))
    assert policy.permissions("user:u1", user("u1")) is ALLOW_ALL
    assert policy.permissions("user:u2", user("u1")) is DENY_ALL
    assert policy.permissions("user:u1x", user("u1")) is DENY_ALL
    assert policy.permissions("xuser:u1", user("u1")) is DENY_ALL
    assert (
        policy.permissions("user:u1", user("u1", role="anon")) is DENY_ALL
    )  # roles default to authenticated
    assert policy.permissions("user:", user(None)) is DENY_ALL  # no sub
    assert policy.permissions("user:", user("")) is DENY_ALL  # an empty sub matches nothing
    assert policy.permissions("user:42", user(42)) is ALLOW_ALL  # an integer sub
    assert policy.permissions("user:True", user(True)) is DENY_ALL  # a boolean is not a name
    assert policy.permissions("user:{'a': 1}", user({"a": 1})) is DENY_ALL


def test_defaults_read_both_write_none() -> None:
    (rule,) = parse_channel_policy([{"topic": "room:*"}]).rules
    assert rule.roles == ("authenticated",) and rule.read == {"broadcast", "presence"} and rule.write == set()
    policy = ChannelPolicy((rule,))
    assert flags(policy.permissions("room:1", user())) == (True, False, True, False)
    assert flags(policy.permissions("room:", user())) == (True, False, True, False)  # * may match nothing
    assert policy.permissions("rooms:1", user()) is DENY_ALL


def test_claims_roles_extensions_and_the_union_of_rules() -> None:
    policy = parse_channel_policy(
        {
            "rules": [
                {
                    "topic": "org:{app_metadata.org}:*",
                    "claims": {"app_metadata.org_role": ["admin", "owner"]},
                    "read": ["broadcast"],
                    "write": "broadcast",
                },
                {"topic": "org:{app_metadata.org}:*", "read": ["presence"], "write": ["presence"]},
                {"topic": "lobby", "roles": ["anon", "authenticated"], "read": ["broadcast"]},
                {"topic": "flags", "claims": {"beta": True, "level": 2}, "read": True},
            ]
        }
    )
    admin = user(app_metadata={"org": "acme", "org_role": "admin"})
    member = user(app_metadata={"org": "acme", "org_role": "member"})
    assert flags(policy.permissions("org:acme:general", admin)) == (True, True, True, True)
    assert flags(policy.permissions("org:acme:general", member)) == (False, False, True, True)
    assert policy.permissions("org:other:general", admin) is DENY_ALL
    assert flags(policy.permissions("lobby", {"role": "anon"})) == (True, False, False, False)
    assert policy.permissions("lobby", {"role": "other"}) is DENY_ALL
    assert policy.permissions("flags", user(beta=True, level=2.0)).readable
    assert not policy.permissions("flags", user(beta="true", level=2)).readable
    assert not policy.permissions("flags", user(beta=1, level=2)).readable
    assert not policy.permissions("flags", user(beta=True, level=True)).readable


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[", "not valid JSON (Expecting value at char 1)"),
        ('{"topic": "a"}', 'expected a list of rules, or {"rules": [...]}'),
        ("42", "expected a list of rules, got int"),
        ('["user:{sub}"]', "rule 1: must be an object with a topic"),
        ("[{}]", "rule 1: missing topic"),
        ('[{"topic": ""}]', "rule 1: topic must be a non-empty string"),
        ('[{"topic": 7}]', "rule 1: topic must be a non-empty string"),
        (
            '[{"topic": "a"}, {"topic": "user:{sub"}]',
            "rule 2: topic pattern 'user:{sub' has a '{' without its '}'",
        ),
        ('[{"topic": "user:sub}"}]', "rule 1: topic pattern 'user:sub}' has a '}' without its '{'"),
        ('[{"topic": "user:{}"}]', "rule 1: topic pattern 'user:{}' has a bad claim name {}"),
        ('[{"topic": "user:{a b}"}]', "rule 1: topic pattern 'user:{a b}' has a bad claim name {a b}"),
        ('[{"topic": "user:{a..b}"}]', "bad claim name {a..b}"),
        ('[{"topic": "user:{{sub}}"}]', "bad claim name {{sub}"),
        (
            '[{"topic": "a", "wirte": true}]',
            "rule 1: unknown key 'wirte' (expected topic, roles, claims, read, write)",
        ),
        ('[{"topic": "a", "read": ["presense"]}]', "rule 1: unknown extension 'presense' in read"),
        ('[{"topic": "a", "write": 1}]', "rule 1: write must be true, false or a list of extensions"),
        ('[{"topic": "a", "roles": []}]', "rule 1: roles must be a non-empty list of JWT roles"),
        ('[{"topic": "a", "roles": [""]}]', "rule 1: roles must be a non-empty list"),
        ('[{"topic": "a", "claims": []}]', "rule 1: claims must be an object"),
        ('[{"topic": "a", "claims": {"a b": 1}}]', "rule 1: bad claim name 'a b' in claims"),
        (
            '[{"topic": "a", "claims": {"x": {"y": 1}}}]',
            "rule 1: claim 'x' must equal a string, number or boolean",
        ),
        ('[{"topic": "a", "claims": {"x": []}}]', "rule 1: claim 'x' must equal"),
        ('[{"topic": "a", "claims": {"x": null}}]', "rule 1: claim 'x' must equal"),
        ('[{"topic": "a", "read": false}]', "rule 1: grants nothing (read and write are both empty)"),
    ],
)
def test_a_bad_policy_is_refused_with_one_line(value: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_channel_policy(value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_bad_setting_stops_the_start_with_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"CHANNEL_POLICY": '[{"topic": "user:{sub"}]'})
    text = str(info.value)
    assert text.startswith("invalid CHANNEL_POLICY (environment): ") and "\n" not in text
    assert "rule 1: topic pattern 'user:{sub' has a '{' without its '}'" in text


def test_the_setting_from_the_environment_and_from_toml(tmp_path: Path) -> None:
    config = load_config(environ={"CHANNEL_POLICY": json.dumps(OWNER_POLICY)})
    assert config.channel_policy is not None
    assert config.channel_policy.permissions("user:u1", user("u1")) is ALLOW_ALL
    toml = tmp_path / "tidings.toml"
    toml.write_text(
        '[[channel_policy]]\ntopic = "user:{sub}"\nwrite = true\n\n[[channel_policy]]\ntopic = "lobby"\n'
    )
    policy = load_config(environ={}, toml_path=str(toml)).channel_policy
    assert policy is not None and [r.topic for r in policy.rules] == ["user:{sub}", "lobby"]
    assert load_config(environ={}).channel_policy is None


def test_a_policy_prints_as_json_it_parses_back_from() -> None:
    policy = parse_channel_policy(
        [{"topic": "org:{org}:*", "roles": ["authenticated", "anon"], "claims": {"tier": ["a", "b"], "x": 1},
          "read": ["broadcast"], "write": True}]
    )  # fmt: skip
    assert parse_channel_policy(str(policy)) == policy


async def test_the_policy_authorizer() -> None:
    authz = PolicyAuthorizer(parse_channel_policy(OWNER_POLICY))
    ctx = AuthorizationContext("user:u1", user("u1"))
    assert flags(await authz.read(ctx)) == (True, None, True, None)
    assert flags(await authz.read(ctx, presence=False)) == (True, None, None, None)
    assert flags(await authz.write(ctx)) == (None, True, None, True)
    assert flags(await authz.write(ctx, presence=False)) == (None, True, None, False)
    assert not (await PolicyAuthorizer().read(ctx)).readable
    assert (await PolicyAuthorizer().read(AuthorizationContext("x", {"role": "service_role"}))).readable
    authz.invalidate(ctx)
    authz.invalidate()


# Properties -----------------------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
small = st.text(alphabet="ab:", max_size=8)


@given(names, names)
def test_an_owner_rule_matches_exactly_its_owners_topic(sub: str, other: str) -> None:
    policy = parse_channel_policy(OWNER_POLICY)
    allowed = policy.permissions("user:" + other, user(sub)).readable
    assert allowed == (sub != "" and other == sub)


@given(st.text(alphabet="ab:*", min_size=1, max_size=8), small)
@settings(max_examples=400)
def test_star_matches_any_run_of_characters(pattern: str, topic: str) -> None:
    policy = parse_channel_policy([{"topic": pattern}])
    expected = (
        re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), topic, re.S) is not None
    )
    assert policy.permissions(topic, user()).readable == expected


rules = st.fixed_dictionaries(
    {"topic": st.text(alphabet="ab:*", min_size=1, max_size=4)},
    optional={
        "read": st.sampled_from([True, ["broadcast"], ["presence"]]),
        "write": st.sampled_from([False, True, ["broadcast"]]),
        "roles": st.sampled_from([["authenticated"], ["anon"], ["anon", "authenticated"]]),
    },
)


@given(st.lists(rules, max_size=4), rules, small, st.sampled_from(["anon", "authenticated", "service_role"]))
def test_adding_a_rule_never_takes_a_permission_away(
    base: list[Any], extra: Any, topic: str, role: str
) -> None:
    before = parse_channel_policy(base).permissions(topic, {"role": role})
    after = parse_channel_policy([*base, extra]).permissions(topic, {"role": role})
    for b, a in zip(flags(before), flags(after), strict=True):
        assert not (b and not a)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def key(n: int, topic: str = "t") -> tuple[str, str, str]:
    return (topic, json.dumps({"sub": n}), "{}")


def test_the_cache_is_bounded_in_entries_least_recently_used_first() -> None:
    cache = PermissionCache(max_entries=2, ttl=None)
    cache.put(key(1), ALLOW_ALL)
    cache.put(key(2), DENY_ALL)
    assert cache.get(key(1)) is ALLOW_ALL  # 1 is now the most recent
    cache.put(key(3), ALLOW_ALL)
    assert cache.get(key(2)) is None and cache.get(key(1)) is ALLOW_ALL and cache.get(key(3)) is ALLOW_ALL
    assert len(cache) == 2 and cache.evictions == 1


def test_the_cache_is_bounded_in_bytes() -> None:
    one = sum(len(part) for part in key(1)) + 240
    cache = PermissionCache(max_bytes=one * 3, ttl=None)
    for n in range(10):
        cache.put(key(n), ALLOW_ALL)
    assert len(cache) == 3 and cache.bytes <= one * 3
    huge = ("t", "x" * 10_000, "{}")
    cache.put(huge, DENY_ALL)  # alone over the bound: kept, everything else goes
    assert len(cache) == 1 and cache.get(huge) is DENY_ALL


def test_entries_expire_and_writes_do_not_extend_reads() -> None:
    clock = Clock()
    cache = PermissionCache(ttl=10.0, clock=clock)
    cache.put(key(1), Permissions.of(True, None, True, None))
    clock.now = 9.0
    assert flags(cache.put(key(1), Permissions.of(None, False, None, False))) == (True, False, True, False)
    clock.now = 10.0
    assert cache.get(key(1)) is None and len(cache) == 0 and cache.bytes == 0
    cache.put(key(1), Permissions.of(None, True, None, None))  # a fresh entry after expiry: no old values
    assert flags(cache.get(key(1)) or UNCHECKED) == (None, True, None, None)


def test_invalidation() -> None:
    cache = PermissionCache()
    for n in range(3):
        cache.put(key(n, "a"), ALLOW_ALL)
    cache.put(key(9, "b"), ALLOW_ALL)
    cache.invalidate(key(0, "a"))
    assert cache.get(key(0, "a")) is None and len(cache) == 3
    assert cache.invalidate_topic("a") == 2 and len(cache) == 1
    cache.invalidate(key(5, "zzz"))  # unknown: nothing happens
    cache.invalidate()
    assert len(cache) == 0 and cache.bytes == 0


@given(st.lists(st.tuples(st.sampled_from(["put", "get", "drop", "topic"]), st.integers(0, 6)), max_size=60))
def test_the_byte_count_is_always_what_the_entries_hold(ops: list[tuple[str, int]]) -> None:
    clock = Clock()
    cache = PermissionCache(max_entries=4, max_bytes=1_200, ttl=5.0, clock=clock)
    for op, n in ops:
        clock.now += 1.0
        k = key(n, "ab"[n % 2])
        if op == "put":
            cache.put(k, ALL_PERMISSIONS[n])
        elif op == "get":
            cache.get(k)
        elif op == "drop":
            cache.invalidate(k)
        else:
            cache.invalidate_topic(k[0])
        held = cache._entries.values()
        assert cache.bytes == sum(e.size for e in held)
        assert len(cache) <= 4 and (cache.bytes <= 1_200 or len(cache) == 1)
