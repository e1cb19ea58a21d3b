"""``phx_join`` validation (spec 3.2): lenient defaults, string booleans, replay, exact reasons."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from tidings.protocol import errors
from tidings.protocol.join import JoinConfig, JoinError, Replay, parse_bool, parse_join
from tidings.protocol.positions import ChangesResume

REPLAY_INVALID = "UnableToReplayMessages: Replay params are not valid"


def test_defaults_of_spec_3_2() -> None:
    cfg = parse_join("realtime:room1", {"config": {}})
    assert cfg == JoinConfig(topic="realtime:room1", sub_topic="room1")
    assert cfg.private is False
    assert cfg.broadcast_self is False
    assert cfg.broadcast_ack is False
    assert cfg.presence_key == ""
    assert cfg.presence_enabled is False
    assert cfg.postgres_changes == ()
    assert cfg.access_token is None
    assert cfg.replay is None
    assert cfg.warnings == ()


def test_realtime_js_join_payload() -> None:
    # Spec 3.2, measured from realtime-js.
    payload = {
        "config": {
            "broadcast": {"self": True, "ack": True},
            "presence": {"key": "u1", "enabled": True},
            "postgres_changes": [{"event": "INSERT", "schema": "public", "table": "t", "filter": "id=eq.1"}],
            "private": False,
        },
        "access_token": "user-jwt",
        "version": "realtime-js/2.119.0",
    }
    cfg = parse_join("realtime:room1", payload)
    assert (cfg.broadcast_self, cfg.broadcast_ack, cfg.presence_key, cfg.presence_enabled) == (
        True,
        True,
        "u1",
        True,
    )
    assert cfg.postgres_changes == (
        {"event": "INSERT", "schema": "public", "table": "t", "filter": "id=eq.1"},
    )
    assert cfg.access_token == "user-jwt"
    assert cfg.private is False
    assert cfg.warnings == ()


def test_sub_topic_keeps_everything_after_the_prefix() -> None:
    assert parse_join("realtime:a:b:c", {}).sub_topic == "a:b:c"


def test_no_config_at_all_means_defaults() -> None:
    cfg = parse_join("realtime:room1", {})
    assert cfg.warnings == ()
    assert cfg.broadcast_self is False


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(True, True), (False, False), ("true", True), ("TRUE", True), (" False ", False), ("fAlSe", False)],
)
def test_booleans_as_strings(raw: Any, expected: bool) -> None:
    cfg = parse_join(
        "realtime:r",
        {"config": {"private": raw, "broadcast": {"self": raw, "ack": raw}, "presence": {"enabled": raw}}},
    )
    assert (cfg.private, cfg.broadcast_self, cfg.broadcast_ack, cfg.presence_enabled) == (expected,) * 4
    assert cfg.warnings == ()


def test_null_booleans_are_defaults_without_warning() -> None:
    cfg = parse_join("realtime:r", {"config": {"private": None, "broadcast": {"self": None}}})
    assert cfg.private is False and cfg.broadcast_self is False
    assert cfg.warnings == ()


@pytest.mark.parametrize("raw", ["yes", 1, 0, [], {}, "1"])
def test_bad_booleans_warn_and_use_false(raw: Any) -> None:
    cfg = parse_join("realtime:r", {"config": {"broadcast": {"ack": raw}}})
    assert cfg.broadcast_ack is False
    assert cfg.warnings == ("broadcast.ack is not a boolean; using false",)


def test_parse_bool() -> None:
    assert parse_bool(None) is False
    assert parse_bool(None, default=True) is True
    assert parse_bool("TrUe") is True
    assert parse_bool("no") is None
    assert parse_bool(1) is None


@pytest.mark.parametrize(("raw", "expected"), [("u1", "u1"), (None, ""), ("", ""), (42, "42")])
def test_presence_key(raw: Any, expected: str) -> None:
    assert parse_join("realtime:r", {"config": {"presence": {"key": raw}}}).presence_key == expected


def test_presence_key_missing_is_empty() -> None:
    assert parse_join("realtime:r", {"config": {"presence": {"enabled": True}}}).presence_key == ""


def test_topic_name_required() -> None:
    with pytest.raises(JoinError) as info:
        parse_join("realtime:", {"config": {}})
    assert (
        info.value.reason == errors.TOPIC_NAME_REQUIRED == "TopicNameRequired: You must provide a topic name"
    )
    assert str(info.value) == info.value.reason


@pytest.mark.parametrize("topic", ["room1", "phoenix", "Realtime:room1", ""])
def test_topics_outside_realtime_are_unmatched(topic: str) -> None:
    with pytest.raises(JoinError) as info:
        parse_join(topic, {})
    assert info.value.reason == "unmatched topic"


# -- replay ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replay", "expected"),
    [
        ({"since": 1700000000000}, Replay(since=1700000000000, since_seq=None, limit=None)),
        ({"since": 1700000000000, "limit": 10}, Replay(since=1700000000000, since_seq=None, limit=10)),
        ({"since": 1, "limit": 1000}, Replay(since=1, since_seq=None, limit=1000)),  # clamped later
        ({"since": 1, "limit": 0}, Replay(since=1, since_seq=None, limit=1)),
        ({"since": 1, "limit": -5}, Replay(since=1, since_seq=None, limit=1)),
        ({"since": "1700000000000", "limit": "3"}, Replay(since=1700000000000, since_seq=None, limit=3)),
        ({"since": 17.0}, Replay(since=17, since_seq=None, limit=None)),
        ({"since_seq": 42}, Replay(since=None, since_seq=42, limit=None)),
        ({"since_seq": 42, "since": 5, "limit": 2}, Replay(since=5, since_seq=42, limit=2)),
    ],
)
def test_replay_params(replay: dict[str, Any], expected: Replay) -> None:
    cfg = parse_join("realtime:r", {"config": {"private": True, "broadcast": {"replay": replay}}})
    assert cfg.replay == expected


@pytest.mark.parametrize(
    "replay",
    [
        "yesterday",
        [1],
        {},
        {"limit": 5},
        {"since": "yesterday"},
        {"since": 1.5},
        {"since": True},
        {"since": None, "since_seq": None},
        {"since_seq": "x"},
        {"since": 1, "limit": "many"},
        {"since": 1, "limit": 2.5},
        {"since": "--5"},
        {"since": "²"},
        {"since_seq": "1-2"},
    ],
)
def test_replay_errors(replay: Any) -> None:
    with pytest.raises(JoinError) as info:
        parse_join("realtime:r", {"config": {"private": True, "broadcast": {"replay": replay}}})
    assert info.value.reason == REPLAY_INVALID


def test_replay_null_means_no_replay() -> None:
    assert parse_join("realtime:r", {"config": {"broadcast": {"replay": None}}}).replay is None


# -- postgres_changes, tokens, lenient warnings -------------------------------------------------


def test_postgres_changes_are_echoed_verbatim_and_nulls_removed() -> None:
    entry = {"event": "update", "schema": "public", "table": "t", "select": ["a", "b"], "extra": 1}
    cfg = parse_join("realtime:r", {"config": {"postgres_changes": [None, entry, None]}})
    assert cfg.postgres_changes == (entry,)
    assert cfg.postgres_changes[0] is entry


def test_postgres_changes_entry_not_an_object_is_an_error() -> None:
    with pytest.raises(JoinError):
        parse_join("realtime:r", {"config": {"postgres_changes": ["public:t"]}})


def test_postgres_changes_resume_option() -> None:
    """``postgres_changes_options.resume`` (Tidings): true or {since, epoch}; positions normalised."""

    def resume(value: Any) -> Any:
        options = {"postgres_changes_options": {"wait": True, "resume": value}}
        return parse_join("realtime:r", {"config": options}).changes_resume

    assert parse_join("realtime:r", {"config": {}}).changes_resume is None
    assert resume(None) is None
    assert resume(True) == ChangesResume()
    assert resume({"since": "0000000016b3a2f8/00000003", "epoch": "e"}) == ChangesResume(
        "0000000016B3A2F8/00000003", "e"
    )
    for bad in ("true", {"since": "16B3A2F8/3"}, {"since": 5}, {"epoch": 5}, 0):
        with pytest.raises(JoinError) as info:
            resume(bad)
        assert info.value.reason.startswith(errors.RESUME_INVALID + ": ")


def test_access_token_and_legacy_user_token() -> None:
    assert parse_join("realtime:r", {"access_token": "a"}).access_token == "a"
    assert parse_join("realtime:r", {"user_token": "u"}).access_token == "u"
    assert parse_join("realtime:r", {"access_token": "a", "user_token": "u"}).access_token == "a"


@pytest.mark.parametrize(
    ("payload", "warning"),
    [
        ({"config": "yes"}, "config is not an object; using defaults"),
        ({"config": []}, "config is not an object; using defaults"),
        ({"config": {"postgres_changes": {"event": "*"}}}, "postgres_changes is not a list; ignoring it"),
        ({"access_token": 12}, "access_token is not a string; ignoring it"),
        ({"config": {"private": "maybe"}}, "config.private is not a boolean; using false"),
        ({"config": {"presence": {"enabled": 2}}}, "presence.enabled is not a boolean; using false"),
        ({"config": {"broadcast": {"self": "sure"}}}, "broadcast.self is not a boolean; using false"),
    ],
)
def test_lenient_warnings(payload: dict[str, Any], warning: str) -> None:
    cfg = parse_join("realtime:r", payload)
    assert cfg.warnings == (warning,)
    assert cfg.access_token is None or isinstance(cfg.access_token, str)


def test_broadcast_and_presence_not_objects_use_defaults() -> None:
    cfg = parse_join("realtime:r", {"config": {"broadcast": "x", "presence": 3}})
    assert (cfg.broadcast_self, cfg.broadcast_ack, cfg.presence_enabled, cfg.presence_key) == (
        False,
        False,
        False,
        "",
    )


# -- property ----------------------------------------------------------------------------------

TEXT = st.text(max_size=12)
SCALAR = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | TEXT
    | st.sampled_from(["true", "FALSE", "1e3", ""])
    | st.from_regex(r"[ \-+0-9٣²]{0,6}", fullmatch=True)
)
ANY = st.recursive(
    SCALAR, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8
)


def maybe(keys: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Objects with some of the known keys (each any value or a well-shaped one), or anything."""
    return st.fixed_dictionaries({}, optional=keys) | ANY


REPLAY = maybe({"since": ANY, "since_seq": ANY, "limit": ANY})
PAYLOADS = maybe(
    {
        "config": maybe(
            {
                "broadcast": maybe({"self": ANY, "ack": ANY, "replay": REPLAY, "replication_ready": ANY}),
                "presence": maybe({"key": ANY, "enabled": ANY}),
                "postgres_changes": st.lists(ANY, max_size=3) | ANY,
                "private": ANY,
            }
        ),
        "access_token": ANY,
        "user_token": ANY,
    }
).filter(lambda p: isinstance(p, dict))


@settings(max_examples=500)
@given(topic=st.sampled_from(["realtime:", "realtime:room", "other"]) | TEXT, payload=PAYLOADS)
def test_property_parse_join_raises_only_join_error(topic: str, payload: dict[str, Any]) -> None:
    try:
        cfg = parse_join(topic, payload)
    except JoinError as exc:
        assert exc.reason
        return
    assert cfg.topic == topic and cfg.sub_topic
    assert isinstance(cfg.presence_key, str)
    assert cfg.access_token is None or isinstance(cfg.access_token, str)
    if cfg.replay is not None:
        assert 1 <= cfg.replay.limit <= 25


@settings(max_examples=300)
@given(replay=st.dictionaries(st.sampled_from(["since", "since_seq", "limit"]), SCALAR, max_size=3) | ANY)
def test_property_replay_raises_only_join_error(replay: Any) -> None:
    try:
        cfg = parse_join("realtime:r", {"config": {"broadcast": {"replay": replay}}})
    except JoinError as exc:
        assert exc.reason == REPLAY_INVALID
        return
    assert cfg.replay is not None or replay is None
