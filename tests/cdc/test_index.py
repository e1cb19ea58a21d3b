"""Subscription params, binding ids and the matching index (pure; no database)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from tidings.cdc.index import (
    ALL_EVENTS,
    Binding,
    BindingSpec,
    SubscriptionError,
    SubscriptionIndex,
    binding_id,
    no_tables_message,
    parse_binding,
)
from tidings.protocol.filters import BoundFilter, Condition, bind_filter, parse_filter

TYPES = {"id": "int8", "status": "text", "n": "int4"}
T = ("public", "t")
NO_PARAMS = "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: "

# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"event": "*", "schema": "public", "table": "t", "filter": "id=eq.1"},
            BindingSpec("*", "public", "t", (Condition("id", "eq", "1"),), None),
        ),
        (
            {"event": "insert", "schema": "public", "table": "t"},
            BindingSpec("INSERT", "public", "t", (), None),
        ),
        ({"event": "Update", "schema": "s"}, BindingSpec("UPDATE", "s", "*", (), None)),
        ({"event": "DELETE", "table": "t"}, BindingSpec("DELETE", "public", "t", (), None)),
        ({"event": "other", "schema": "public", "table": "t"}, BindingSpec("*", "public", "t", (), None)),
        ({"schema": "public", "table": "t"}, BindingSpec("*", "public", "t", (), None)),
        (
            {"event": 5, "schema": "public", "table": "t", "filter": "  "},
            BindingSpec("*", "public", "t", (), None),
        ),
        # realtime-py may send null for what it did not set
        (
            {"event": "*", "schema": "public", "table": "t", "filter": None},
            BindingSpec("*", "public", "t", (), None),
        ),
        (
            {"event": "*", "schema": "public", "table": None, "filter": None},
            BindingSpec("*", "public", "*", (), None),
        ),
        (
            {"schema": "public", "table": "t", "select": ["a", 1, "b"]},
            BindingSpec("*", "public", "t", (), ("a", "b")),
        ),
        # No column names: every column, as without select (not a key-only record).
        ({"schema": "public", "table": "t", "select": []}, BindingSpec("*", "public", "t", (), None)),
        ({"schema": "public", "table": "t", "select": [1, None]}, BindingSpec("*", "public", "t", (), None)),
        ({"schema": "public", "select": []}, BindingSpec("*", "public", "*", (), None)),
    ],
)
def test_parse_binding(params: dict[str, Any], expected: BindingSpec) -> None:
    assert parse_binding(params) == expected


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"schema": "public", "table": "t", "filter": "undefined"},
            'Error parsing `filter` params: ["undefined"]',
        ),
        (
            {"schema": "public", "table": "t", "filter": "subject=foo.hey"},
            'Error parsing `filter` params: ["foo", "hey"]',
        ),
        ({}, NO_PARAMS + "%{}"),
        ({"event": "*"}, NO_PARAMS + '%{"event" => "*"}'),
        ({"event": "*", "filter": "id=eq.1"}, NO_PARAMS + '%{"event" => "*", "filter" => "id=eq.1"}'),
        (
            {"schema": "public", "filter": "id=eq.1"},
            NO_PARAMS + '%{"filter" => "id=eq.1", "schema" => "public"}',
        ),
        ({"schema": 1, "table": True}, NO_PARAMS + '%{"schema" => 1, "table" => true}'),
        ({"user_token": "secret"}, NO_PARAMS + "<redacted>"),
        (
            {"schema": "public", "table": "t", "select": "a,b"},
            "Error parsing `select` params: expected a list of column name strings, "
            'e.g. select: ["col1", "col2"]',
        ),
        (
            {"schema": "public", "select": ["a"]},
            "Column selection is not supported for wildcard subscriptions. "
            "Provide an explicit schema and table name.",
        ),
    ],
)
def test_parse_binding_errors(params: dict[str, Any], message: str) -> None:
    with pytest.raises(SubscriptionError) as exc:
        parse_binding(params)
    assert str(exc.value) == message
    assert exc.value.transient is False


def test_no_tables_message() -> None:
    assert no_tables_message(parse_binding({"event": "*", "schema": "public", "table": "x"})) == (
        "Unable to subscribe to changes with given parameters. "
        "Please check Realtime is enabled for the given connect parameters: "
        "[event: *, schema: public, table: x, filters: [], select: nil]"
    )
    spec = parse_binding(
        {"event": "insert", "schema": "public", "table": "x", "filter": "id=eq.5", "select": ["a"]}
    )
    assert no_tables_message(spec).endswith(
        '[event: INSERT, schema: public, table: x, filters: [{"id", "eq", "5", false}], select: ["a"]]'
    )


def test_binding_id() -> None:
    a = {"event": "INSERT", "schema": "public", "table": "t", "filter": "id=eq.1"}
    assert binding_id(a) == binding_id(dict(reversed(list(a.items()))))
    assert binding_id(a) != binding_id(a | {"filter": "id=eq.2"})
    assert binding_id(a) != binding_id(a | {"event": "insert"})  # echoed verbatim, so not normalised


@given(
    st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.text(max_size=8), st.integers()), max_size=5)
)
def test_binding_id_range(params: dict[str, Any]) -> None:
    assert 0 <= binding_id(params) < 2**31


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------


def binding(bid: int, filter_text: str = "", events: frozenset[str] = ALL_EVENTS) -> Binding:
    return Binding(bid, events, bind_filter(parse_filter(filter_text), TYPES))


def owners(result: Mapping[Hashable, list[Binding]]) -> dict[Hashable, list[int]]:
    return {owner: sorted(b.id for b in bs) for owner, bs in result.items()}


def test_match_by_table_event_and_filter() -> None:
    idx = SubscriptionIndex()
    idx.add("a", T, binding(1))
    idx.add("b", T, binding(2, "id=eq.5"))
    idx.add("c", T, binding(3, "id=in.(5,6)", frozenset({"INSERT"})))
    idx.add("d", T, binding(4, "status=eq.open"))
    idx.add("d", T, binding(5, "id=gt.1"))
    idx.add("e", ("public", "other"), binding(6))
    assert owners(idx.match(T, "INSERT", {"id": 5, "status": "open"})) == {
        "a": [1],
        "b": [2],
        "c": [3],
        "d": [4, 5],
    }
    assert owners(idx.match(T, "UPDATE", {"id": 6, "status": "closed"})) == {"a": [1], "d": [5]}
    assert owners(idx.match(T, "INSERT", {"id": None, "status": None})) == {"a": [1]}
    assert idx.match(("public", "nobody"), "INSERT", {"id": 5}) == {}
    assert len(idx) == 6 and idx.owners == 5
    assert idx.tables() == {T, ("public", "other")}


def test_absent_column_makes_indexed_entries_candidates_once() -> None:
    # A DELETE under REPLICA IDENTITY DEFAULT carries only the key: a filter on another column is skipped.
    idx = SubscriptionIndex()
    idx.add("a", T, binding(1, "status=in.(open,closed)"))
    idx.add("b", T, binding(2, "id=eq.5"))
    assert owners(idx.match(T, "DELETE", {"id": 7})) == {"a": [1]}
    assert owners(idx.match(T, "DELETE", {"id": 5})) == {"a": [1], "b": [2]}


def test_remove() -> None:
    idx = SubscriptionIndex()
    idx.add("a", T, binding(1, "id=in.(1,2)"))
    idx.add("a", T, binding(2))
    idx.add("b", T, binding(3, "id=eq.1"))
    assert idx.remove("a") == 2
    assert owners(idx.match(T, "INSERT", {"id": 1})) == {"b": [3]}
    assert idx.remove("a") == 0
    assert idx.remove("b") == 1
    assert idx.tables() == set() and len(idx) == 0


class CountingFilter(BoundFilter):
    """A BoundFilter that counts how often it is evaluated."""

    __slots__ = ()
    calls = 0

    def matches(self, row: Mapping[str, Any]) -> bool:
        CountingFilter.calls += 1
        return super().matches(row)


def counting(filter_text: str) -> CountingFilter:
    b = bind_filter(parse_filter(filter_text), TYPES)
    index = None
    if b.index_column is not None and b.index_keys is not None and b.index_key is not None:
        index = (b.index_column, b.index_keys, b.index_key)
    return CountingFilter(b.conditions, list(b._checks), index)


def test_ten_thousand_eq_subscribers_cost_one_evaluation_per_change() -> None:
    idx = SubscriptionIndex()
    for n in range(10_000):
        idx.add(("conn", n), T, Binding(n, ALL_EVENTS, counting(f"id=eq.{n}")))
    CountingFilter.calls = 0
    for n in (0, 1234, 9999):
        assert owners(idx.match(T, "UPDATE", {"id": n, "status": "x"})) == {("conn", n): [n]}
    assert owners(idx.match(T, "UPDATE", {"id": 10_001})) == {}
    assert CountingFilter.calls == 3
    for n in range(0, 10_000, 2):
        idx.remove(("conn", n))
    assert idx.match(T, "UPDATE", {"id": 1234}) == {}
    assert len(idx) == 5_000


FILTERS = st.sampled_from(
    [
        "",
        "id=eq.1",
        "id=eq.2",
        "id=in.(1,3)",
        "id=not.eq.1",
        "id=gt.1",
        "status=eq.a",
        "status=in.(a,b)",
        "status=eq.a,id=eq.2",
        "id=eq.1,status=eq.b",
        "n=is.null",
        "n=lt.5,id=in.(2,3)",
        "status=like.a%",
    ]
)
ROWS = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.none(), st.integers(0, 4)),
        "status": st.sampled_from([None, "a", "b", "c"]),
        "n": st.one_of(st.none(), st.integers(0, 9)),
    },
)


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.integers(0, 5), FILTERS, st.sampled_from(sorted(ALL_EVENTS) + ["*"])), max_size=25),
    st.lists(st.integers(0, 5), max_size=3),
    ROWS,
    st.sampled_from(sorted(ALL_EVENTS)),
)
def test_index_agrees_with_scanning_every_binding(
    subs: list[tuple[int, str, str]], removed: list[int], row: dict[str, Any], event: str
) -> None:
    idx = SubscriptionIndex()
    everything: list[tuple[int, Binding]] = []
    for i, (owner, text, ev) in enumerate(subs):
        b = binding(i, text, ALL_EVENTS if ev == "*" else frozenset({ev}))
        idx.add(owner, T, b)
        everything.append((owner, b))
    for owner in removed:
        idx.remove(owner)
    expected: dict[Hashable, list[int]] = {}
    for owner, b in everything:
        if owner not in removed and event in b.events and b.filter.matches(row):
            expected.setdefault(owner, []).append(b.id)
    assert owners(idx.match(T, event, row)) == {o: sorted(ids) for o, ids in expected.items()}
