"""The postgres_changes filter grammar: parsing (messages included), casting, matching."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from tidings.protocol.filters import (
    MAX_IN_VALUES,
    OPERATORS,
    Condition,
    FilterError,
    bind_filter,
    inspect_conditions,
    matches,
    parse_array_literal,
    parse_filter,
)

P = "Error parsing `filter` params: "

# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, ()),
        ("", ()),
        ("   ", ()),
        ("id=eq.5", (Condition("id", "eq", "5"),)),
        ("id=not.eq.5", (Condition("id", "eq", "5", negate=True),)),
        ("id=gt.0,id=lt.100", (Condition("id", "gt", "0"), Condition("id", "lt", "100"))),
        ("  id=eq.5 , name=neq.x ", (Condition("id", "eq", "5"), Condition("name", "neq", "x"))),
        (
            "status=in.(active,pending)",
            (Condition("status", "in", "{active,pending}", items=("active", "pending")),),
        ),
        (
            "status=not.in.(draft,archived)",
            (Condition("status", "in", "{draft,archived}", negate=True, items=("draft", "archived")),),
        ),
        ('name=in.("a,b",c)', (Condition("name", "in", '{"a,b",c}', items=("a,b", "c")),)),
        ("x=in.(1,NULL)", (Condition("x", "in", "{1,NULL}", items=("1", None)),)),
        ("x=in.()", (Condition("x", "in", "{}", items=()),)),
        ('name=eq."a,b"', (Condition("name", "eq", "a,b"),)),
        ('name=eq."say \\"hi\\""', (Condition("name", "eq", 'say "hi"'),)),
        ('name=eq."back\\\\slash"', (Condition("name", "eq", "back\\slash"),)),
        ('name=eq."a"b', (Condition("name", "eq", '"a"b'),)),  # not one quoted string: kept as is
        ('name=eq.a"b', (Condition("name", "eq", 'a"b'),)),  # a quote mid-value is a plain character
        ("title=like.%foo%", (Condition("title", "like", "%foo%"),)),
        ("title=ilike.*x_", (Condition("title", "ilike", "*x_"),)),
        ("deleted_at=is.null", (Condition("deleted_at", "is", "null"),)),
        ("deleted_at=not.is.null", (Condition("deleted_at", "is", "null", negate=True),)),
        ("flag=is.TRUE", (Condition("flag", "is", "TRUE"),)),
        ("email=imatch.^a.*@x\\.com$", (Condition("email", "imatch", "^a.*@x\\.com$"),)),
        ("a=isdistinct.5", (Condition("a", "isdistinct", "5"),)),
        ("a=eq.", (Condition("a", "eq", ""),)),
        ("a=eq.x=y.z", (Condition("a", "eq", "x=y.z"),)),
        (
            "amount=gt.100,status=in.(open,pending)",
            (
                Condition("amount", "gt", "100"),
                Condition("status", "in", "{open,pending}", items=("open", "pending")),
            ),
        ),
    ],
)
def test_parse(text: str | None, expected: tuple[Condition, ...]) -> None:
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("undefined", P + '["undefined"]'),
        ("subject=foo.hey", P + '["foo", "hey"]'),
        ("subject=fts.hey", P + '["fts", "hey"]'),
        ("id=eq", P + '["eq"]'),
        ("id=not.eq", P + '["eq"]'),
        ('id=x."y', P + '["x", "\\"y"]'),
        ("title=eq.Hello, World", P + '["World"]'),  # an unquoted comma splits the value
        ("id=eq.1,,id=eq.2", P + "filter must not contain empty segments (check for extra commas)"),
        ("id=eq.1,", P + "filter must not contain empty segments (check for extra commas)"),
        (",id=eq.1", P + "filter must not contain empty segments (check for extra commas)"),
        ("id=in.1,2", P + "`in` filter value must be wrapped by parentheses"),
        ("id=in.(1,2", P + "`in` filter value must be wrapped by parentheses"),
        ("id=in.", P + "`in` filter value must be wrapped by parentheses"),
        ("id=is.maybe", P + "`is` filter value must be one of null, true, false, unknown"),
        (
            "id=in.(" + ",".join(map(str, range(MAX_IN_VALUES + 1))) + ")",
            "too many values for `in` filter. Maximum 100",
        ),
        ('id=in.("a)', 'malformed array literal: "{"a}"'),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(FilterError) as exc:
        parse_filter(text)
    assert str(exc.value) == message


def test_in_accepts_exactly_the_maximum() -> None:
    (cond,) = parse_filter("id=in.(" + ",".join(map(str, range(MAX_IN_VALUES))) + ")")
    assert len(cond.items) == MAX_IN_VALUES


def test_inspect_conditions_matches_the_reference_log_format() -> None:
    assert inspect_conditions(()) == "[]"
    assert inspect_conditions(parse_filter('id=eq.5,n=not.like."a\\"b"')) == (
        '[{"id", "eq", "5", false}, {"n", "like", "a\\"b", true}]'
    )


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("{}", []),
        ("{1,2,3}", ["1", "2", "3"]),
        ('{a,"b c",NULL,"NULL"}', ["a", "b c", None, "NULL"]),
        ('{"a\\"b","c\\\\d"}', ['a"b', "c\\d"]),
        ("{ a , b }", ["a", "b"]),
        ("{{1,2},{3,4}}", [["1", "2"], ["3", "4"]]),
        ("[0:1]={1,2}", ["1", "2"]),
        ("{a\\,b}", ["a,b"]),
        ('{""}', [""]),
    ],
)
def test_parse_array_literal(literal: str, expected: list[Any]) -> None:
    assert parse_array_literal(literal) == expected


def test_parse_array_literal_other_delimiter() -> None:
    assert parse_array_literal("{(1,2),(0,0);(3,4),(1,1)}", ";") == ["(1,2),(0,0)", "(3,4),(1,1)"]


@pytest.mark.parametrize("literal", ["", "1,2", "{1,2", "{1,,2}", '{"a}', "{a}x", "{,}", "[1:2]"])
def test_parse_array_literal_rejects(literal: str) -> None:
    with pytest.raises(ValueError):
        parse_array_literal(literal)


# --------------------------------------------------------------------------------------------
# Binding and matching
# --------------------------------------------------------------------------------------------

TYPES = {
    "id": "int8",
    "n": "int4",
    "s": "int2",
    "price": "numeric",
    "ratio": "float8",
    "flag": "bool",
    "title": "text",
    "name": "varchar",
    "code": "bpchar",
    "email": "citext",
    "uid": "uuid",
    "at": "timestamptz",
    "local": "timestamp",
    "day": "date",
    "clock": "time",
    "doc": "jsonb",
    "tags": "_text",
    "nums": "_int4",
    "mood": "mood",
    "blob": "bytea",
}

ROW: dict[str, Any] = {
    "id": 5,
    "n": 7,
    "s": -3,
    "price": 1.5,
    "ratio": 0.25,
    "flag": True,
    "title": "Hello, World",
    "name": "alice",
    "code": "ab",
    "email": "Bob@X.com",
    "uid": "639f86b1-738b-43ed-bb09-c8d3f3bafa30",
    "at": "2026-08-21T12:00:00.123+00:00",
    "local": "2026-08-21T12:00:00",
    "day": "2026-08-21",
    "clock": "12:30:00",
    "doc": {"a": 1, "b": [True, None]},
    "tags": ["x", "y z"],
    "nums": [1, 2],
    "mood": "happy",
    "blob": "\\x0102",
    "gone": None,
}
TYPES["gone"] = "text"


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        # integers
        ("id=eq.5", True),
        ("id=eq.6", False),
        ("id=neq.5", False),
        ("id=neq.6", True),
        ("id=lt.6", True),
        ("id=lt.5", False),
        ("id=lte.5", True),
        ("id=gt.4", True),
        ("id=gt.5", False),
        ("id=gte.5", True),
        ("id=gte.6", False),
        ("id=eq. 5 ", True),
        ("id=eq.+5", True),
        ("id=in.(1,5,9)", True),
        ("id=in.(1,9)", False),
        ("id=not.in.(1,9)", True),
        ("id=in.()", False),
        ("id=not.eq.5", False),
        ("id=not.gt.9", True),
        ("s=lt.0", True),
        ("n=gt.6,n=lt.8", True),
        ("n=gt.6,n=lt.7", False),
        # numeric and floats
        ("price=eq.1.5", True),
        ("price=eq.1.50", True),
        ("price=gt.1.49", True),
        ("price=lt.1.5", False),
        ("ratio=eq.0.25", True),
        ("ratio=lt.NaN", True),
        ("ratio=gt.-Infinity", True),
        ("price=in.(1.5,2)", True),
        # booleans
        ("flag=eq.true", True),
        ("flag=eq.t", True),
        ("flag=eq.yes", True),
        ("flag=eq.false", False),
        ("flag=neq.f", True),
        ("flag=is.true", True),
        ("flag=is.false", False),
        ("flag=not.is.true", False),
        ("flag=is.unknown", False),
        ("flag=not.is.unknown", True),
        # text
        ('title=eq."Hello, World"', True),
        ("name=eq.alice", True),
        ("name=neq.alice", False),
        ("name=gt.al", True),
        ("name=lt.b", True),
        ("name=lt.B", False),  # code point order
        ("name=in.(bob,alice)", True),
        ("code=eq.ab   ", True),
        ("email=eq.bob@x.COM", True),
        # like / ilike / match / imatch
        ("title=like.Hello%", True),
        ("title=like.hello%", False),
        ("title=ilike.hello%", True),
        ("name=like.al_ce", True),
        ("name=like.al_e", False),
        ("name=like.%", True),
        ("name=not.like.a%", False),
        ("title=like.Hello\\%", False),
        ("name=match.^ali", True),
        ("name=match.ice$", True),
        ("name=match.^ice", False),
        ("email=imatch.^bob@x\\.com$", True),
        ("name=match.^ALI", False),
        ("email=match.^bob", True),  # citext compares case-insensitively, regexes included
        ("name=not.imatch.ALICE", False),
        ("mood=like.hap%", True),
        # uuid
        ("uid=eq.639F86B1-738B-43ED-BB09-C8D3F3BAFA30", True),
        ("uid=eq.{639f86b1738b43edbb09c8d3f3bafa30}", True),
        ("uid=neq.b423f213-ac24-402a-95ea-cf1d94d8e9f0", True),
        # timestamps, dates, times
        ("at=eq.2026-08-21 12:00:00.123+00", True),
        ("at=eq.2026-08-21T14:00:00.123+02:00", True),
        ("at=gt.2026-08-21T12:00:00Z", True),
        ("at=lt.2026-08-21 12:00:00.123", False),
        ("at=lt.infinity", True),
        ("at=gt.-infinity", True),
        ("at=gt.infinity", False),
        ("local=eq.2026-08-21 12:00:00", True),
        ("local=eq.2026-08-21 12:00:00+05", True),
        ("local=lt.2026-08-22", True),
        ("day=eq.2026-08-21", True),
        ("day=gte.2026-08-22", False),
        ("clock=gt.12:00", True),
        ("clock=lt.12:00", False),
        # json, arrays, enums, other
        ('doc=eq."{\\"b\\":[true,null],\\"a\\":1.0}"', True),
        ('doc=neq.{"a":1}', True),
        ('tags=eq."{x,\\"y z\\"}"', True),
        ('nums=eq."{1,2}"', True),
        ('nums=eq."{2,1}"', False),
        ("mood=eq.happy", True),
        ("mood=in.(sad,happy)", True),
        ("blob=eq.\\x0102", True),
        # NULL column: every comparison fails, negated or not; is/isdistinct are null-aware
        ("gone=eq.x", False),
        ("gone=neq.x", False),
        ("gone=not.eq.x", False),
        ("gone=in.(x)", False),
        ("gone=not.in.(x)", False),
        ("gone=like.%", False),
        ("gone=not.like.%", False),
        ("gone=is.null", True),
        ("gone=not.is.null", False),
        ("title=is.null", False),
        ("title=not.is.null", True),
        ("gone=isdistinct.x", True),
        ("gone=not.isdistinct.x", False),
        ("name=isdistinct.alice", False),
        ("name=not.isdistinct.alice", True),
        ("name=isdistinct.bob", True),
        # a column absent from the row (a DELETE's key-only old record) is skipped
        ("missing_col=eq.1", True),
    ],
)
def test_match_table(filter_text: str, expected: bool) -> None:
    types = dict(TYPES, missing_col="int4")
    assert bind_filter(parse_filter(filter_text), types).matches(ROW) is expected


def test_matches_convenience() -> None:
    assert matches("id=eq.5", {"id": 5}, {"id": "int4"})
    assert not matches("id=eq.5", {"id": 6}, {"id": "int4"})
    assert matches(None, {"id": 6}, {"id": "int4"})


@pytest.mark.parametrize(
    ("filter_text", "message"),
    [
        ("nope=eq.1", "invalid column for filter nope"),
        ("id=eq.abc", 'invalid input syntax for type bigint: "abc"'),
        ("n=eq.1.5", 'invalid input syntax for type integer: "1.5"'),
        ("s=eq.40000", 'value "40000" is out of range for type smallint'),
        ("id=in.(1,x)", 'invalid input syntax for type bigint: "x"'),
        ("price=eq.cheap", 'invalid input syntax for type numeric: "cheap"'),
        ("flag=eq.maybe", 'invalid input syntax for type boolean: "maybe"'),
        ("uid=eq.123", 'invalid input syntax for type uuid: "123"'),
        ("at=gt.yesterday", 'invalid input syntax for type timestamp with time zone: "yesterday"'),
        ("doc=eq.{nope", 'invalid input syntax for type json: "{nope"'),
        ("nums=eq.1", 'malformed array literal: "1"'),
        ("title=is.true", "`is.true` filter needs a boolean column: title is text"),
        ("doc=gt.1", "operator `gt` is not supported for column doc of type jsonb"),
        ("mood=lt.sad", "operator `lt` is not supported for column mood of type mood"),
        ("id=like.1%", "operator `like` is not supported for column id of type int8"),
        ("name=match.(", "invalid regular expression: missing ), unterminated subpattern at position 0"),
        ("name=like.abc\\", "LIKE pattern must not end with escape character"),
    ],
)
def test_bind_errors(filter_text: str, message: str) -> None:
    with pytest.raises(FilterError) as exc:
        bind_filter(parse_filter(filter_text), TYPES)
    assert str(exc.value) == message


def test_index_hint_is_the_first_plain_eq_or_in() -> None:
    bound = bind_filter(parse_filter("n=gt.1,id=not.eq.3,id=in.(4,5),n=eq.7"), TYPES)
    assert bound.index_column == "id"
    assert bound.index_keys == frozenset({4, 5})
    assert bound.index_key is not None and bound.index_key(5) == 5
    assert bind_filter(parse_filter("id=gt.1"), TYPES).index_column is None


def test_a_value_the_type_cannot_read_fails_instead_of_raising() -> None:
    bound = bind_filter(parse_filter("at=gt.2026-01-01"), TYPES)
    assert bound.matches({"at": "0044-03-15T12:00:00+00:00 BC"}) is False


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True)
values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(
    st.lists(
        st.tuples(
            identifiers,
            st.sampled_from([o for o in OPERATORS if o not in ("in", "is")]),
            st.booleans(),
            values,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_quoted_values_round_trip(conds: list[tuple[str, str, bool, str]]) -> None:
    text = ",".join(f"{c}={'not.' if neg else ''}{op}.{quote(v)}" for c, op, neg, v in conds)
    assert parse_filter(text) == tuple(Condition(c, op, v, neg) for c, op, neg, v in conds)


@given(st.lists(st.one_of(st.none(), values), max_size=MAX_IN_VALUES))
def test_in_lists_round_trip(items: list[str | None]) -> None:
    inner = ",".join("NULL" if v is None else quote(v) for v in items)
    (cond,) = parse_filter(f"col=in.({inner})")
    assert list(cond.items) == items


@given(st.text(max_size=60))
def test_parser_only_raises_filter_error(text: str) -> None:
    try:
        conditions = parse_filter(text)
    except FilterError:
        return
    for cond in conditions:
        assert cond.op in OPERATORS


_PY_OPS = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
}


@given(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from(sorted(_PY_OPS)),
    st.booleans(),
)
def test_integer_comparisons_agree_with_python(row: int, value: int, op: str, negate: bool) -> None:
    bound = bind_filter(parse_filter(f"id={'not.' if negate else ''}{op}.{value}"), {"id": "int8"})
    assert bound.matches({"id": row}) is (_PY_OPS[op](row, value) is not negate)
    assert bound.matches({"id": None}) is False


@given(
    st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-(10**6), max_value=10**6),
    st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-(10**6), max_value=10**6),
    st.sampled_from(sorted(_PY_OPS)),
)
def test_numeric_comparisons_agree_with_decimal(row: Any, value: Any, op: str) -> None:
    bound = bind_filter(parse_filter(f"p={op}.{value}"), {"p": "numeric"})
    assert bound.matches({"p": str(row)}) is _PY_OPS[op](row, value)


@given(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
)
def test_like_with_escaped_literal_is_equality(pattern_source: str, candidate: str) -> None:
    escaped = "".join("\\" + ch if ch in "%_\\" else ch for ch in pattern_source)
    bound = bind_filter((Condition("t", "like", escaped),), {"t": "text"})
    assert bound.matches({"t": candidate}) is (candidate == pattern_source)
    assert bound.matches({"t": pattern_source})


@given(st.from_regex(r"[A-Za-z0-9]{1,20}", fullmatch=True), st.data())
def test_like_wildcards(s: str, data: st.DataObject) -> None:
    # Replace some characters by _ and some runs by %: the pattern still matches s, ignoring case for ilike.
    chars = list(s)
    for i in data.draw(st.lists(st.integers(0, len(s) - 1), max_size=3)):
        chars[i] = "_"
    pattern = "".join(chars)
    cut = data.draw(st.integers(0, len(pattern)))
    pattern = pattern[:cut] + "%"
    assert bind_filter((Condition("t", "like", pattern),), {"t": "text"}).matches({"t": s})
    assert bind_filter((Condition("t", "ilike", pattern.upper()),), {"t": "text"}).matches({"t": s.lower()})


@settings(max_examples=50)
@given(
    st.from_regex(r"[a-z]{1,5}", fullmatch=True),
    st.text(st.characters(whitelist_categories=("Ll",)), max_size=15),
)
def test_match_is_an_unanchored_search(needle: str, haystack: str) -> None:
    bound = bind_filter((Condition("t", "match", re.escape(needle)),), {"t": "text"})
    assert bound.matches({"t": haystack}) is (needle in haystack)
