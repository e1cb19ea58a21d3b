"""Render PostgreSQL text-format column values the way ``to_jsonb()`` does (spec 6.3).

pgoutput sends each column in its type's text output form. The replication session is opened with
``DateStyle=ISO``, ``TimeZone=UTC``, ``IntervalStyle=postgres``, ``bytea_output=hex`` and
``extra_float_digits=1`` so that those forms are stable; :func:`render` then maps them to JSON-ready
Python values:

============================  ===================================================================
type                          rendered as
============================  ===================================================================
int2, int4, int8              ``int``
float4, float8                ``int`` when the text is integral (``to_jsonb`` prints ``1``, not
                              ``1.0``), else ``float``; ``NaN``/``Infinity``/``-Infinity`` stay
                              strings, as ``to_jsonb`` gives them
numeric                       ``int`` when integral and within int64; ``float`` when the float
                              prints back to the same decimal value; otherwise the exact text as
                              a ``str`` (precision is never silently lost; JSON encoders cannot
                              carry arbitrary-precision numbers)
bool                          ``True``/``False``
json, jsonb                   the parsed JSON value (integers beyond int64 become floats: JSON
                              encoders cannot write them, and JavaScript reads them as doubles)
timestamptz                   ``"2026-08-21T12:00:00.123+00:00"`` (ISO, ``T``, ``+HH:MM``)
timestamp                     ``"2026-08-21T12:00:00"``
arrays (``_int4``, ...)       nested lists, elements rendered by their own type, NULL -> None
composite types               objects, fields rendered by their own types
everything else               the text itself (text, varchar, uuid, date, time, interval, bytea as
                              ``\\x0102``, enums, ranges, ...)
============================  ===================================================================

Types are described by :class:`PgType`; :data:`BUILTIN_TYPES` covers PostgreSQL's built-in ones and
:func:`catalog_type` builds the others (domains, enums, arrays of them) from ``pg_type`` rows.

Pure: no asyncio, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from tidings.protocol.filters import parse_array_literal

__all__ = [
    "ARRAY",
    "BOOL",
    "BUILTIN_TYPES",
    "COMPOSITE",
    "FLOAT",
    "INT",
    "JSON",
    "NUMERIC",
    "STRING",
    "TIMESTAMP",
    "TIMESTAMPTZ",
    "PgType",
    "builtin_type",
    "catalog_type",
    "parse_record_literal",
    "render",
    "unknown_type",
]

# Render kinds.
BOOL = "bool"
INT = "int"
FLOAT = "float"
NUMERIC = "numeric"
JSON = "json"
TIMESTAMPTZ = "timestamptz"
TIMESTAMP = "timestamp"
ARRAY = "array"
COMPOSITE = "composite"
STRING = "string"

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INTEGRAL = re.compile(r"-?\d+\Z")
_SPECIAL_FLOATS = frozenset({"NaN", "Infinity", "-Infinity"})


@dataclass(frozen=True, slots=True)
class PgType:
    """A column type: its name for ``columns``, how to render it, and how filters compare it."""

    oid: int
    """``pg_type.oid``."""
    name: str
    """``pg_type.typname`` (``int4``, ``_text``, a domain's or enum's own name)."""
    kind: str
    """One of the render kinds (:data:`INT`, :data:`STRING`, ...)."""
    element: PgType | None = None
    """Arrays: the element type."""
    delimiter: str = ","
    """Arrays: the element delimiter (``;`` for ``box``)."""
    filter_name: str = field(default="")
    """Type name the filter engine compares by (a domain's base type); defaults to :attr:`name`."""
    fields: tuple[tuple[str, PgType], ...] = ()
    """Composite types: (attribute name, type) in order."""

    def __post_init__(self) -> None:
        if not self.filter_name:
            object.__setattr__(self, "filter_name", self.name)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _render_bool(_t: PgType, text: str) -> Any:
    return text == "t"


def _render_int(_t: PgType, text: str) -> Any:
    return int(text)


def _render_float(_t: PgType, text: str) -> Any:
    if text in _SPECIAL_FLOATS:
        return text
    if _INTEGRAL.match(text):
        n = int(text)
        if _INT64_MIN <= n <= _INT64_MAX:
            return n
    return float(text)


def _render_numeric(_t: PgType, text: str) -> Any:
    if text in _SPECIAL_FLOATS:
        return text
    if _INTEGRAL.match(text):
        n = int(text)
        return n if _INT64_MIN <= n <= _INT64_MAX else text
    f = float(text)
    try:
        if Decimal(repr(f)) == Decimal(text):
            return f
    except InvalidOperation:
        pass
    return text


def _json_int(text: str) -> Any:
    n = int(text)
    return n if _INT64_MIN <= n <= _INT64_MAX else float(text)


def _render_json(_t: PgType, text: str) -> Any:
    return json.loads(text, parse_int=_json_int)


def _iso_timestamptz(text: str) -> str:
    """``2026-08-21 12:00:00.123+00`` -> ``2026-08-21T12:00:00.123+00:00`` (keeps `` BC``)."""
    if text in ("infinity", "-infinity"):
        return text
    suffix = ""
    if text.endswith(" BC"):
        text, suffix = text[:-3], " BC"
    text = text.replace(" ", "T", 1)
    # The zone is the last +HH[:MM[:SS]] / -HH... after the time part.
    t_pos = text.find("T")
    for i in range(len(text) - 1, t_pos, -1):
        if text[i] in "+-":
            zone = text[i:]
            if len(zone) == 3:
                text = text + ":00"
            break
    return text + suffix


def _render_timestamptz(_t: PgType, text: str) -> Any:
    return _iso_timestamptz(text)


def _render_timestamp(_t: PgType, text: str) -> Any:
    return text.replace(" ", "T", 1) if text[:1].isdigit() else text


def _render_string(_t: PgType, text: str) -> Any:
    return text


def _render_array(t: PgType, text: str) -> Any:
    element = t.element or _UNKNOWN
    render_one = _RENDERERS[element.kind]

    def convert(items: list[Any]) -> list[Any]:
        return [
            convert(x) if isinstance(x, list) else None if x is None else render_one(element, x)
            for x in items
        ]

    return convert(parse_array_literal(text, t.delimiter))


def parse_record_literal(text: str) -> list[str | None]:
    """Split a composite value's text form ``(1,"a b",)`` into fields (``None`` for NULL).

    Raises ``ValueError`` when malformed.
    """
    if len(text) < 2 or text[0] != "(" or text[-1] != ")":
        raise ValueError("malformed record literal")
    body = text[1:-1]
    fields: list[str | None] = []
    i, n = 0, len(body)
    while True:
        if i >= n or body[i] == ",":
            fields.append(None)  # nothing between delimiters is NULL
        else:
            buf: list[str] = []
            while i < n and body[i] != ",":
                ch = body[i]
                if ch == '"':
                    i += 1
                    while True:
                        if i >= n:
                            raise ValueError("malformed record literal: unterminated quote")
                        ch = body[i]
                        if ch == '"' and i + 1 < n and body[i + 1] == '"':
                            buf.append('"')
                            i += 2
                        elif ch == '"':
                            i += 1
                            break
                        elif ch == "\\" and i + 1 < n:
                            buf.append(body[i + 1])
                            i += 2
                        else:
                            buf.append(ch)
                            i += 1
                elif ch == "\\" and i + 1 < n:
                    buf.append(body[i + 1])
                    i += 2
                else:
                    buf.append(ch)
                    i += 1
            fields.append("".join(buf))
        if i >= n:
            return fields
        i += 1  # the comma
        if i >= n:
            fields.append(None)
            return fields


def _render_composite(t: PgType, text: str) -> Any:
    values = parse_record_literal(text)
    if len(values) != len(t.fields):
        raise ValueError("record literal does not fit its type")
    return {
        name: None if value is None else _RENDERERS[ftype.kind](ftype, value)
        for (name, ftype), value in zip(t.fields, values, strict=True)
    }


_RENDERERS: dict[str, Callable[[PgType, str], Any]] = {
    BOOL: _render_bool,
    INT: _render_int,
    FLOAT: _render_float,
    NUMERIC: _render_numeric,
    JSON: _render_json,
    TIMESTAMPTZ: _render_timestamptz,
    TIMESTAMP: _render_timestamp,
    ARRAY: _render_array,
    COMPOSITE: _render_composite,
    STRING: _render_string,
}


def render(pgtype: PgType, text: str | None) -> Any:
    """The ``to_jsonb`` rendering of one text-format value (``None`` stays ``None``).

    A value that does not parse as its type claims (which PostgreSQL never sends) is returned as
    its text rather than raising, so one odd value cannot stop the change stream.
    """
    if text is None:
        return None
    try:
        return _RENDERERS[pgtype.kind](pgtype, text)
    except (ValueError, KeyError):
        return text


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------

# fmt: off
# Built-in scalar types: oid -> (typname, render kind). Their OIDs are fixed across versions.
_SCALARS: dict[int, tuple[str, str]] = {
    16: ("bool", BOOL), 17: ("bytea", STRING), 18: ("char", STRING), 19: ("name", STRING),
    20: ("int8", INT), 21: ("int2", INT), 23: ("int4", INT), 25: ("text", STRING), 26: ("oid", STRING),
    114: ("json", JSON), 142: ("xml", STRING), 600: ("point", STRING), 601: ("lseg", STRING),
    602: ("path", STRING), 603: ("box", STRING), 604: ("polygon", STRING), 628: ("line", STRING),
    650: ("cidr", STRING), 700: ("float4", FLOAT), 701: ("float8", FLOAT), 718: ("circle", STRING),
    774: ("macaddr8", STRING), 790: ("money", STRING), 829: ("macaddr", STRING), 869: ("inet", STRING),
    1042: ("bpchar", STRING), 1043: ("varchar", STRING), 1082: ("date", STRING), 1083: ("time", STRING),
    1114: ("timestamp", TIMESTAMP), 1184: ("timestamptz", TIMESTAMPTZ), 1186: ("interval", STRING),
    1266: ("timetz", STRING), 1560: ("bit", STRING), 1562: ("varbit", STRING), 1700: ("numeric", NUMERIC),
    2950: ("uuid", STRING), 3614: ("tsvector", STRING), 3615: ("tsquery", STRING), 3802: ("jsonb", JSON),
    3904: ("int4range", STRING), 3906: ("numrange", STRING), 3908: ("tsrange", STRING),
    3910: ("tstzrange", STRING), 3912: ("daterange", STRING), 3926: ("int8range", STRING),
    4072: ("jsonpath", STRING), 5069: ("xid8", STRING),
}

# Built-in array types: array oid -> element oid; the array's typname is "_" + the element's.
_ARRAYS: dict[int, int] = {
    143: 142, 199: 114, 629: 628, 651: 650, 719: 718, 775: 774, 791: 790, 1000: 16, 1001: 17, 1002: 18,
    1003: 19, 1005: 21, 1007: 23, 1009: 25, 1014: 1042, 1015: 1043, 1016: 20, 1017: 600, 1018: 601,
    1019: 602, 1020: 603, 1021: 700, 1022: 701, 1027: 604, 1028: 26, 1040: 829, 1041: 869, 1115: 1114,
    1182: 1082, 1183: 1083, 1185: 1184, 1187: 1186, 1231: 1700, 1270: 1266, 1561: 1560, 1563: 1562,
    2951: 2950, 3643: 3614, 3645: 3615, 3807: 3802, 3905: 3904, 3907: 3906, 3909: 3908, 3911: 3910,
    3913: 3912, 3927: 3926,
}
# fmt: on


def _build_builtins() -> dict[int, PgType]:
    # box is the one built-in type whose typdelim is ';' (its text form contains commas).
    types = {
        oid: PgType(oid, name, kind, None, ";" if name == "box" else ",")
        for oid, (name, kind) in _SCALARS.items()
    }
    for oid, elem in _ARRAYS.items():
        element = types[elem]
        types[oid] = PgType(oid, "_" + element.name, ARRAY, element, element.delimiter)
    return types


BUILTIN_TYPES: dict[int, PgType] = _build_builtins()
"""Built-in types by OID (their OIDs are fixed across PostgreSQL versions)."""

_UNKNOWN = PgType(0, "unknown", STRING)


def builtin_type(oid: int) -> PgType | None:
    """The built-in type with this OID, if it is one."""
    return BUILTIN_TYPES.get(oid)


def unknown_type(oid: int, name: str = "unknown") -> PgType:
    """A type rendered as plain text (used when the catalog cannot be asked)."""
    return PgType(oid, name, STRING)


def catalog_type(
    oid: int,
    name: str,
    typtype: str,
    category: str,
    *,
    base: PgType | None = None,
    element: PgType | None = None,
    delimiter: str = ",",
    fields: tuple[tuple[str, PgType], ...] = (),
) -> PgType:
    """Build a non-built-in type from its ``pg_type`` row.

    Args:
        oid, name, typtype, category: ``pg_type.oid``, ``typname``, ``typtype``, ``typcategory``.
        base: for a domain (``typtype = 'd'``), its resolved base type: values render like it.
        element: for an array (``typcategory = 'A'``), its resolved element type.
        delimiter: the element's ``typdelim``.
        fields: for a composite (``typtype = 'c'``), its attributes and their resolved types.
    """
    if typtype == "d" and base is not None:
        return PgType(oid, name, base.kind, base.element, base.delimiter, base.filter_name)
    if category == "A" and element is not None:
        return PgType(oid, name, ARRAY, element, delimiter, "_" + element.filter_name)
    if typtype == "c" and fields:
        return PgType(oid, name, COMPOSITE, fields=fields)
    # Enums, ranges and other extension types: to_jsonb gives their text.
    return PgType(oid, name, STRING)
