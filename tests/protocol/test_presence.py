"""Presence state and diffs (spec 5): track, update, identical no-op, untrack, several owners."""

from __future__ import annotations

from tidings.protocol.presence import PresenceState, RefMaker


def make() -> PresenceState:
    return PresenceState(RefMaker(b"test"))


def test_refs_are_unique_opaque_strings() -> None:
    refs = RefMaker()
    seen = {refs() for _ in range(1000)}
    assert len(seen) == 1000
    assert all(isinstance(r, str) and r for r in seen)
    assert RefMaker(b"a")() != RefMaker(b"b")()


def test_empty_state() -> None:
    p = make()
    assert p.state() == {}
    assert not p and len(p) == 0


def test_track_gives_a_join_diff_with_phx_ref() -> None:
    p = make()
    user = {"online_at": "now", "name": "a"}
    diff = p.track("owner1", "user-1", user)
    assert diff is not None
    assert diff["leaves"] == {}
    [meta] = diff["joins"]["user-1"]["metas"]
    assert meta["name"] == "a" and meta["online_at"] == "now"
    assert isinstance(meta["phx_ref"], str) and meta["phx_ref"]
    assert "phx_ref_prev" not in meta
    assert user == {"online_at": "now", "name": "a"}, "the caller's dict is not changed"
    assert p.state() == {"user-1": {"metas": [meta]}}
    assert p.meta_of("owner1") == meta
    assert p and len(p) == 1


def test_update_has_phx_ref_prev_and_leaves_the_old_meta() -> None:
    p = make()
    first = p.track("o", "k", {"name": "a"})
    assert first is not None
    [old] = first["joins"]["k"]["metas"]
    diff = p.track("o", "k", {"name": "b"})
    assert diff is not None
    [new] = diff["joins"]["k"]["metas"]
    assert new["name"] == "b"
    assert new["phx_ref_prev"] == old["phx_ref"]
    assert new["phx_ref"] != old["phx_ref"]
    assert diff["leaves"] == {"k": {"metas": [old]}}
    assert p.state() == {"k": {"metas": [new]}}
    assert len(p) == 1


def test_identical_track_is_a_no_op() -> None:
    p = make()
    p.track("o", "k", {"name": "a"})
    before = p.state()
    assert p.track("o", "k", {"name": "a"}) is None
    assert p.state() == before


def test_identical_track_after_an_update_is_a_no_op() -> None:
    p = make()
    p.track("o", "k", {"name": "a"})
    p.track("o", "k", {"name": "b"})
    assert p.track("o", "k", {"name": "b"}) is None


def test_track_under_another_key_moves_the_owner() -> None:
    p = make()
    p.track("o", "k1", {"x": 1})
    diff = p.track("o", "k2", {"x": 1})
    assert diff is not None
    assert list(diff["joins"]) == ["k2"] and list(diff["leaves"]) == ["k1"]
    assert list(p.state()) == ["k2"]


def test_client_supplied_phx_ref_prev_is_not_kept() -> None:
    p = make()
    diff = p.track("o", "k", {"phx_ref_prev": "forged", "a": 1})
    assert diff is not None
    assert "phx_ref_prev" not in diff["joins"]["k"]["metas"][0]


def test_untrack() -> None:
    p = make()
    joined = p.track("o", "k", {"a": 1})
    assert joined is not None
    [meta] = joined["joins"]["k"]["metas"]
    assert p.untrack("o") == {"joins": {}, "leaves": {"k": {"metas": [meta]}}}
    assert p.state() == {}
    assert p.meta_of("o") is None
    assert p.untrack("o") is None, "untracking twice gives nothing"


def test_untrack_of_an_unknown_owner() -> None:
    assert make().untrack("nobody") is None


def test_several_owners_under_one_key() -> None:
    p = make()
    d1 = p.track("tab1", "user-1", {"tab": 1})
    d2 = p.track("tab2", "user-1", {"tab": 2})
    assert d1 is not None and d2 is not None
    assert d2["leaves"] == {}, "a second tab is a join, not an update"
    state = p.state()
    assert list(state) == ["user-1"]
    metas = state["user-1"]["metas"]
    assert [m["tab"] for m in metas] == [1, 2]
    assert len({m["phx_ref"] for m in metas}) == 2
    assert len(p) == 2

    leave = p.untrack("tab1")
    assert leave is not None
    assert [m["tab"] for m in leave["leaves"]["user-1"]["metas"]] == [1]
    assert [m["tab"] for m in p.state()["user-1"]["metas"]] == [2]
    p.untrack("tab2")
    assert p.state() == {}


def test_state_shape_with_several_keys() -> None:
    p = make()
    p.track("a", "user-1", {"n": 1})
    p.track("b", "user-2", {"n": 2})
    state = p.state()
    assert set(state) == {"user-1", "user-2"}
    for entry in state.values():
        assert set(entry) == {"metas"}
        for meta in entry["metas"]:
            assert "phx_ref" in meta


def test_shared_ref_maker_gives_unique_refs_across_states() -> None:
    refs = RefMaker()
    a, b = PresenceState(refs), PresenceState(refs)
    da, db = a.track("o", "k", {}), b.track("o", "k", {})
    assert da is not None and db is not None
    assert da["joins"]["k"]["metas"][0]["phx_ref"] != db["joins"]["k"]["metas"][0]["phx_ref"]
