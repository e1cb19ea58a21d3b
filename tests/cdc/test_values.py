"""Rendering text-format values like to_jsonb: pure table tests (the DB comparison is in test_values_pg)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tidings.cdc.values import (
    ARRAY,
    BUILTIN_TYPES,
    STRING,
    PgType,
    builtin_type,
    catalog_type,
    parse_record_literal,
    render,
    unknown_type,
)


def t(name: str) -> PgType:
    found = [typ for typ in BUILTIN_TYPES.values() if typ.name == name]
    assert len(found) == 1, name
    return found[0]


@pytest.mark.parametrize(
    ("typname", "text", "expected"),
    [
        ("int2", "-32768", -32768),
        ("int4", "42", 42),
        ("int8", "9223372036854775807", 2**63 - 1),
        ("float4", "1.5", 1.5),
        ("float8", "0.1", 0.1),
        ("float8", "1", 1),
        ("float8", "-0", 0),
        ("float8", "1e+300", 1e300),
        ("float4", "1e-07", 1e-07),
        ("float8", "NaN", "NaN"),
        ("float8", "Infinity", "Infinity"),
        ("float4", "-Infinity", "-Infinity"),
        ("numeric", "1.50", 1.5),
        ("numeric", "-5", -5),
        ("numeric", "0", 0),
        ("numeric", "NaN", "NaN"),
        ("numeric", "Infinity", "Infinity"),
        # Precision is never lost silently: what a float cannot hold stays exact, as a string.
        ("numeric", "12345678901234567890.123456789", "12345678901234567890.123456789"),
        ("numeric", "123456789012345678901234567890", "123456789012345678901234567890"),
        ("numeric", "0.1000000000000000055511151231257827", "0.1000000000000000055511151231257827"),
        ("bool", "t", True),
        ("bool", "f", False),
        ("text", 'it\'s "quoted"', 'it\'s "quoted"'),
        ("varchar", "é", "é"),
        ("bpchar", "ab   ", "ab   "),
        ("uuid", "639f86b1-738b-43ed-bb09-c8d3f3bafa30", "639f86b1-738b-43ed-bb09-c8d3f3bafa30"),
        ("json", '{"a": [1, 2.5, null]}', {"a": [1, 2.5, None]}),
        ("jsonb", '"s"', "s"),
        ("jsonb", "3", 3),
        ("jsonb", "123456789012345678901234567890", 1.2345678901234568e29),  # beyond int64: a float
        ("timestamptz", "2026-08-21 12:00:00.123+00", "2026-08-21T12:00:00.123+00:00"),
        ("timestamptz", "2026-08-21 12:00:00+00", "2026-08-21T12:00:00+00:00"),
        ("timestamptz", "2026-08-21 12:00:00+05:30", "2026-08-21T12:00:00+05:30"),
        ("timestamptz", "2026-08-21 12:00:00-03", "2026-08-21T12:00:00-03:00"),
        ("timestamptz", "0044-03-15 12:00:00+00 BC", "0044-03-15T12:00:00+00:00 BC"),
        ("timestamptz", "infinity", "infinity"),
        ("timestamptz", "-infinity", "-infinity"),
        ("timestamp", "2026-08-21 12:00:00", "2026-08-21T12:00:00"),
        ("timestamp", "2026-08-21 12:00:00.5", "2026-08-21T12:00:00.5"),
        ("timestamp", "infinity", "infinity"),
        ("date", "2026-08-21", "2026-08-21"),
        ("time", "12:00:00", "12:00:00"),
        ("timetz", "12:00:01.5+02", "12:00:01.5+02"),
        ("interval", "1 day 02:00:00", "1 day 02:00:00"),
        ("bytea", "\\x0102", "\\x0102"),
        ("money", "$1.50", "$1.50"),
        ("inet", "10.0.0.1", "10.0.0.1"),
        ("int4range", "[1,2)", "[1,2)"),
        ("oid", "12", "12"),
        ("char", "a", "a"),
        ("_int4", "{1,NULL,3}", [1, None, 3]),
        ("_int4", "{}", []),
        ("_int4", "{{1,2},{3,4}}", [[1, 2], [3, 4]]),
        ("_int4", "[0:1]={1,2}", [1, 2]),
        ("_text", '{a,"b c",NULL,"","NULL","q\\"x"}', ["a", "b c", None, "", "NULL", 'q"x']),
        ("_bool", "{t,f}", [True, False]),
        ("_numeric", "{1.5,NaN}", [1.5, "NaN"]),
        ("_jsonb", '{"{\\"a\\": 1}"}', [{"a": 1}]),
        ("_timestamptz", '{"2026-08-21 12:00:00+00"}', ["2026-08-21T12:00:00+00:00"]),
        ("_box", "{(3,4),(1,2);(1,1),(0,0)}", ["(3,4),(1,2)", "(1,1),(0,0)"]),
    ],
)
def test_render(typname: str, text: str, expected: Any) -> None:
    got = render(t(typname), text)
    assert got == expected
    assert type(got) is type(expected)


def test_render_null_and_nan_float() -> None:
    assert render(t("int4"), None) is None
    assert math.isclose(render(t("float8"), "3.14"), 3.14)


def test_unparseable_values_fall_back_to_text() -> None:
    assert render(t("int4"), "not a number") == "not a number"
    assert render(t("jsonb"), "{bad") == "{bad"
    assert render(t("_int4"), "{1,") == "{1,"


def test_builtin_table() -> None:
    assert builtin_type(23) == t("int4")
    assert builtin_type(99999) is None
    assert t("_int4").element == t("int4")
    assert t("_box").delimiter == ";"
    assert all(typ.kind == ARRAY for typ in BUILTIN_TYPES.values() if typ.name.startswith("_"))
    assert all(typ.filter_name == typ.name for typ in BUILTIN_TYPES.values())


def test_catalog_types() -> None:
    domain = catalog_type(20000, "positive", "d", "N", base=t("int4"))
    assert (domain.name, domain.kind, domain.filter_name) == ("positive", "int", "int4")
    assert render(domain, "7") == 7
    enum = catalog_type(20001, "mood", "e", "E")
    assert (enum.kind, enum.filter_name) == (STRING, "mood")
    enum_array = catalog_type(20002, "_mood", "b", "A", element=enum)
    assert render(enum_array, "{sad,happy}") == ["sad", "happy"]
    assert enum_array.filter_name == "_mood"
    domain_array = catalog_type(20003, "_positive", "b", "A", element=domain)
    assert domain_array.filter_name == "_int4"
    assert render(domain_array, "{1,2}") == [1, 2]
    assert unknown_type(5, "thing") == PgType(5, "thing", STRING)


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("(1,x)", ["1", "x"]),
        ("(,)", [None, None]),
        ("()", [None]),
        ('("")', [""]),
        ('(1,"a ""b"" \\\\c, d")', ["1", 'a "b" \\c, d']),
        ('("(2,y)",)', ["(2,y)", None]),
    ],
)
def test_parse_record_literal(literal: str, expected: list[str | None]) -> None:
    assert parse_record_literal(literal) == expected


@pytest.mark.parametrize("literal", ["", "1,2", "(1", '("x)'])
def test_parse_record_literal_rejects(literal: str) -> None:
    with pytest.raises(ValueError):
        parse_record_literal(literal)


def test_composite_render() -> None:
    pair = catalog_type(30000, "pair", "c", "C", fields=(("a", t("int4")), ("b", t("text"))))
    assert render(pair, "(1,x)") == {"a": 1, "b": "x"}
    assert render(pair, "(,)") == {"a": None, "b": None}
    assert render(pair, "(1,2,3)") == "(1,2,3)"  # does not fit: falls back to the text
