"""values.render against PostgreSQL's own to_jsonb, and the built-in type table against pg_type."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import psycopg2
import pytest

from tests.cdc.conftest import Database
from tidings.cdc import catalog
from tidings.cdc.replication import SESSION_OPTIONS
from tidings.cdc.values import BUILTIN_TYPES, render

pytestmark = pytest.mark.postgres

# (SQL type, literal). Each value goes through its type's text output (what pgoutput sends, in the
# replication session's settings) and through to_jsonb; render(text) must give to_jsonb's value.
CASES: list[tuple[str, str]] = [
    ("int2", "-32768"),
    ("int4", "2147483647"),
    ("int8", "-9223372036854775808"),
    ("float4", "1.5"),
    ("float4", "1e-7"),
    ("float4", "NaN"),
    ("float4", "-0"),
    ("float8", "0.1"),
    ("float8", "1"),
    ("float8", "1e300"),
    ("float8", "-Infinity"),
    ("float8", "123456.789012345"),
    ("numeric", "1.50"),
    ("numeric", "-5"),
    ("numeric", "0.000"),
    ("numeric", "NaN"),
    ("numeric", "Infinity"),
    ("numeric", "12345678901234567890.123456789"),
    ("numeric", "99999999999999999999"),
    ("bool", "true"),
    ("bool", "false"),
    ("text", 'it\'s "quoted", with \\ and ünïcode'),
    ("varchar(10)", "abc"),
    ("bpchar(5)", "ab"),
    ('"char"', "a"),
    ("name", "nm"),
    ("uuid", "639F86B1-738B-43ED-BB09-C8D3F3BAFA30"),
    ("json", '{"b": [1, 2.5, null], "a": "x"}'),
    ("jsonb", '{"b": [1, 2.5, null], "a": {"c": true}}'),
    ("jsonb", "12345678901234567890"),
    ("timestamptz", "2026-08-21 12:00:00.123+02"),
    ("timestamptz", "2026-08-21 12:00:00+00"),
    ("timestamptz", "infinity"),
    ("timestamptz", "0044-03-15 12:00 BC"),
    ("timestamp", "2026-08-21 12:00:00.5"),
    ("timestamp", "-infinity"),
    ("date", "2026-08-21"),
    ("date", "0044-03-15 BC"),
    ("time", "12:00:01.5"),
    ("timetz", "12:00:01+02"),
    ("interval", "1 day 2 hours"),
    ("bytea", "\\x0102ff"),
    ("money", "1.5"),
    ("inet", "10.0.0.1/8"),
    ("cidr", "10.0.0.0/8"),
    ("macaddr", "08:00:2b:01:02:03"),
    ("point", "(1,2)"),
    ("box", "(1,2),(3,4)"),
    ("int4range", "[1,5)"),
    ("tsvector", "a fat cat"),
    ("bit(3)", "101"),
    ("varbit", "10"),
    ("xml", "<a>1</a>"),
    ("oid", "12"),
    ("int4[]", "{1,NULL,3}"),
    ("int4[]", "{}"),
    ("int4[]", "{{1,2},{3,4}}"),
    ("int4[]", "[0:1]={1,2}"),
    ("text[]", '{a,"b c",NULL,"","NULL","q\\"x","back\\\\slash"}'),
    ("bool[]", "{t,f}"),
    ("numeric[]", "{1.5,NaN,12345678901234567890.5}"),
    ("float8[]", "{NaN,Infinity,0.1}"),
    ("jsonb[]", '{"{\\"a\\": 1}","[1, 2]"}'),
    ("timestamptz[]", '{"2026-08-21 12:00:00+00",infinity}'),
    ("date[]", "{2026-08-21}"),
    ("box[]", "{(1,2),(3,4);(0,0),(1,1)}"),
    ("uuid[]", "{639f86b1-738b-43ed-bb09-c8d3f3bafa30}"),
    ("interval[]", '{"1 day"}'),
    ("bytea[]", '{"\\\\x01"}'),
    # Non-built-in types, resolved through pg_type.
    ("mood", "happy"),
    ("mood[]", "{sad,happy}"),
    ("positive", "7"),
    ("tags_domain", "{x,y}"),
    ("pair", "(1,x)"),
    ("pair", '(1,"a ""b"" \\\\c, d")'),
    ("pair", "(,)"),
    ("pair[]", '{"(1,x)","(2,)"}'),
    ("rich", '(1,"{a,b}","2026-08-21 12:00:00+00","(2,y)")'),
]

SETUP = [
    "CREATE TYPE mood AS ENUM ('sad', 'happy')",
    "CREATE DOMAIN positive AS int4 CHECK (VALUE > 0)",
    "CREATE DOMAIN tags_domain AS text[]",
    "CREATE TYPE pair AS (a int4, b text)",
    "CREATE TYPE rich AS (n int4, tags text[], at timestamptz, inner_pair pair)",
]


def same(ours: Any, expected: Any) -> bool:
    """Equal as JSON values, numbers compared exactly; our exact-text numeric counts as its number."""
    if isinstance(expected, Decimal):
        if isinstance(ours, bool) or not isinstance(ours, int | float | str):
            return False
        if isinstance(ours, float) and abs(expected) >= 2**63 and expected == expected.to_integral_value():
            return ours == float(expected)  # documented: JSON integers beyond int64 become floats
        return Decimal(repr(ours) if isinstance(ours, float) else str(ours)) == expected
    if isinstance(expected, list):
        return isinstance(ours, list) and len(ours) == len(expected) and all(map(same, ours, expected))
    if isinstance(expected, dict):
        return (
            isinstance(ours, dict)
            and ours.keys() == expected.keys()
            and all(same(ours[k], expected[k]) for k in expected)
        )
    return type(ours) is type(expected) and ours == expected


def test_render_agrees_with_to_jsonb(db: Database) -> None:
    for sql in SETUP:
        db.execute(sql)
    # The replication session's settings, on a plain connection.
    conn = catalog.connect(catalog.connection_dsn(db.dsn, options=SESSION_OPTIONS))
    try:
        with conn.cursor() as cur:
            for sqltype, literal in CASES:
                cur.execute(
                    f"SELECT format('%%s', v), to_jsonb(v)::text, pg_typeof(v)::oid "
                    f"FROM (SELECT %s::{sqltype} AS v) s",
                    (literal,),
                )
                text, jsonb, oid = cur.fetchone()
                pgtype = catalog.resolve_type(conn, int(oid))
                expected = json.loads(jsonb, parse_float=Decimal, parse_int=Decimal)
                got = render(pgtype, text)
                assert same(got, expected), (
                    f"{sqltype} {literal!r}: text {text!r} -> {got!r}, to_jsonb {jsonb}"
                )
    finally:
        conn.close()


def test_builtin_types_match_pg_type(db: Database) -> None:
    rows = db.execute(
        "SELECT t.oid, t.typname, t.typelem, t.typdelim FROM pg_type t WHERE t.oid = ANY(%s)",
        (list(BUILTIN_TYPES),),
    )
    found = {int(oid): (name, int(elem), delim) for oid, name, elem, delim in rows}
    assert set(found) == set(BUILTIN_TYPES)
    for oid, typ in BUILTIN_TYPES.items():
        name, elem, delim = found[oid]
        assert typ.name == name
        assert typ.delimiter == delim
        if typ.kind == "array":
            assert typ.element is not None and typ.element.oid == elem


def test_resolve_type_for_missing_oid(db: Database) -> None:
    conn = psycopg2.connect(db.dsn)
    try:
        assert catalog.resolve_type(conn, 4_000_000_000).name == "unknown"
    finally:
        conn.close()
