"""The postgres_changes filter grammar (spec 6.2): parse once, bind to column types, match rows fast.

Grammar (the Supabase server's parser, errors included)::

    filter    := condition ( "," condition )*     ; ANDed; commas inside (...) or "..." don't split
    condition := column "=" [ "not." ] op "." value
    op        := eq | neq | lt | lte | gt | gte | in | like | ilike | is | match | imatch | isdistinct

Three steps, so the costly work happens once per subscription and not once per change:

1. :func:`parse_filter` turns the text into :class:`Condition` tuples, or raises :class:`FilterError`
   whose message is the client-facing text (``Error parsing `filter` params: ["foo", "hey"]``).
2. :func:`bind_filter` checks the columns against the table and casts every value to its column's
   type (``pg_type.typname``: ``int4``, ``text``, ``timestamptz``, ``_int4`` ...), giving a
   :class:`BoundFilter`.
3. :meth:`BoundFilter.matches` tests a decoded row: a mapping column -> value as rendered for the
   client (ints, floats, bools, strings, lists, parsed JSON; see ``tidings.cdc.values``).

Semantics follow PostgreSQL: a NULL column fails every comparison (negated or not) except ``is`` and
``isdistinct``; ``not.is`` is ``IS NOT`` and ``not.isdistinct`` is ``IS NOT DISTINCT FROM``. A
condition whose column is *absent* from the row is skipped, as Supabase's SQL join does (a DELETE
under REPLICA IDENTITY DEFAULT only carries the key columns).

Known differences from PostgreSQL, kept on purpose: text ordering is by code point (the ``C``
collation); ``match``/``imatch`` use Python's ``re`` (close to, not identical with, POSIX ARE);
ordering operators are refused on types without an obvious order here (json, arrays, enums, ...).

Pure: no asyncio, no I/O.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "MAX_IN_VALUES",
    "OPERATORS",
    "BoundFilter",
    "Condition",
    "FilterError",
    "bind_filter",
    "inspect_conditions",
    "matches",
    "parse_array_literal",
    "parse_filter",
]

OPERATORS: tuple[str, ...] = (
    "eq", "neq", "lt", "lte", "gt", "gte", "in", "like", "ilike", "is", "match", "imatch", "isdistinct",
)  # fmt: skip
"""Every operator of the grammar, in the spec's order."""

MAX_IN_VALUES = 100
"""Most values an ``in.(...)`` list may hold."""

MAX_REGEX_LENGTH = 1000
"""Longest ``match``/``imatch`` pattern accepted: patterns run on every change of the table."""

_PARSE_PREFIX = "Error parsing `filter` params: "
_OPERATOR_SET = frozenset(OPERATORS)
_ORDERING = frozenset({"lt", "lte", "gt", "gte"})
_PATTERN_OPS = frozenset({"like", "ilike", "match", "imatch"})
_IS_VALUES = frozenset({"null", "true", "false", "unknown"})


class FilterError(ValueError):
    """A filter that cannot be parsed or bound. ``str(exc)`` is the message for the client."""


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``column=[not.]op.value`` condition, as parsed (not yet typed)."""

    column: str
    """Column name, exactly as written."""
    op: str
    """One of :data:`OPERATORS`."""
    value: str
    """The value with quotes removed; for ``in``, the PostgreSQL array literal ``{a,b}``."""
    negate: bool = False
    """True with the ``not.`` prefix."""
    items: tuple[str | None, ...] = ()
    """``in`` only: the list's elements (``None`` for an unquoted NULL)."""


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def parse_filter(text: str | None) -> tuple[Condition, ...]:
    """Parse a filter string; ``None``, ``""`` and whitespace mean no condition.

    Raises:
        FilterError: with the Supabase server's message for that mistake.
    """
    if text is None:
        return ()
    trimmed = text.strip()
    if not trimmed:
        return ()
    return tuple(_parse_segment(segment) for segment in _split_top_level(trimmed))


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses and outside double quotes.

    A double quote opens a quoted run only right after ``.``, ``(`` or ``,`` (as the reference
    parser does), so a stray quote inside a plain value stays a plain character.
    """
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    quoted = False
    prev = ""
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if quoted:
            if ch == "\\" and i + 1 < n:
                current.append(ch + text[i + 1])
                prev = text[i + 1]
                i += 2
                continue
            if ch == '"':
                quoted = False
            current.append(ch)
        elif ch == '"' and prev in (".", "(", ","):
            quoted = True
            current.append(ch)
        elif ch == "(":
            depth += 1
            current.append(ch)
        elif ch == ")":
            depth = max(0, depth - 1)
            current.append(ch)
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            ch = ""
        else:
            current.append(ch)
        prev = ch
        i += 1
    parts.append("".join(current))
    return parts


def _parse_segment(segment: str) -> Condition:
    trimmed = segment.strip()
    if not trimmed:
        raise FilterError(_PARSE_PREFIX + "filter must not contain empty segments (check for extra commas)")
    column, eq, rest = trimmed.partition("=")
    if not eq:
        raise FilterError(_PARSE_PREFIX + _inspect_list([trimmed]))
    negate = rest.startswith("not.")
    if negate:
        rest = rest[4:]
    op, dot, value = rest.partition(".")
    if not dot:
        raise FilterError(_PARSE_PREFIX + _inspect_list([op]))
    if op not in _OPERATOR_SET:
        raise FilterError(_PARSE_PREFIX + _inspect_list([op, value]))
    if op == "in":
        if len(value) < 2 or value[0] != "(" or value[-1] != ")":
            raise FilterError(_PARSE_PREFIX + "`in` filter value must be wrapped by parentheses")
        literal = "{" + value[1:-1] + "}"
        try:
            items = tuple(_flatten(parse_array_literal(literal)))
        except ValueError:
            raise FilterError(f'malformed array literal: "{literal}"') from None
        if len(items) > MAX_IN_VALUES:
            raise FilterError(f"too many values for `in` filter. Maximum {MAX_IN_VALUES}")
        return Condition(column, op, literal, negate, items)
    value = _unquote(value)
    if op == "is" and value.lower() not in _IS_VALUES:
        raise FilterError(_PARSE_PREFIX + "`is` filter value must be one of null, true, false, unknown")
    return Condition(column, op, value, negate)


def _unquote(value: str) -> str:
    """``"a,b"`` -> ``a,b`` with backslash escapes; anything not a single quoted string is kept."""
    if not value.startswith('"'):
        return value
    out: list[str] = []
    i = 1
    n = len(value)
    while i < n:
        ch = value[i]
        if ch == '"':
            return "".join(out) if i == n - 1 else value
        if ch == "\\" and i + 1 < n:
            out.append(value[i + 1])
            i += 2
            continue
        out.append(ch)
        i += 1
    return value


def _inspect_str(s: str) -> str:
    """An Elixir ``inspect/1`` of a string (the reference server's error text uses it)."""
    escaped = (
        s.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
        .replace("#{", "\\#{")
    )
    return f'"{escaped}"'


def _inspect_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_inspect_str(s) for s in items) + "]"


def inspect_conditions(conditions: Iterable[Condition]) -> str:
    """Conditions as the reference server logs them: ``[{"id", "eq", "5", false}]``."""
    parts = [
        "{"
        + ", ".join([_inspect_str(c.column), _inspect_str(c.op), _inspect_str(c.value)])
        + (", true}" if c.negate else ", false}")
        for c in conditions
    ]
    return "[" + ", ".join(parts) + "]"


# --------------------------------------------------------------------------------------------
# PostgreSQL array literals
# --------------------------------------------------------------------------------------------


def parse_array_literal(text: str, delimiter: str = ",") -> list[Any]:
    """Parse a PostgreSQL array literal (``{1,"a b",NULL,{2,3}}``) into nested lists.

    Elements are strings, ``None`` for an unquoted NULL, or lists for inner dimensions. A leading
    dimension decoration (``[0:1]={...}``) is skipped. Raises ``ValueError`` when malformed.
    """
    s = text.strip()
    if s.startswith("["):
        eq = s.find("=")
        if eq < 0:
            raise ValueError("malformed array literal: missing '='")
        s = s[eq + 1 :].lstrip()
    if not s.startswith("{"):
        raise ValueError("malformed array literal: must start with '{'")
    result, pos = _parse_array_body(s, 1, delimiter)
    if s[pos:].strip():
        raise ValueError("malformed array literal: junk after closing '}'")
    return result


def _parse_array_body(s: str, pos: int, delim: str) -> tuple[list[Any], int]:
    """Parse from just after a ``{`` to just after its ``}``."""
    items: list[Any] = []
    n = len(s)
    expect_item = True
    while True:
        while pos < n and s[pos].isspace():
            pos += 1
        if pos >= n:
            raise ValueError("malformed array literal: unexpected end")
        ch = s[pos]
        if ch == "}":
            if expect_item and items:
                raise ValueError("malformed array literal: empty element")
            return items, pos + 1
        if not expect_item:
            if ch != delim:
                raise ValueError("malformed array literal: expected delimiter")
            pos += 1
            expect_item = True
            continue
        if ch == "{":
            inner, pos = _parse_array_body(s, pos + 1, delim)
            items.append(inner)
        elif ch == '"':
            buf: list[str] = []
            pos += 1
            while True:
                if pos >= n:
                    raise ValueError("malformed array literal: unterminated quote")
                c = s[pos]
                if c == "\\":
                    if pos + 1 >= n:
                        raise ValueError("malformed array literal: unterminated quote")
                    buf.append(s[pos + 1])
                    pos += 2
                elif c == '"':
                    pos += 1
                    break
                else:
                    buf.append(c)
                    pos += 1
            items.append("".join(buf))
        else:
            buf = []
            while pos < n and s[pos] not in (delim, "}"):
                c = s[pos]
                if c in '{"':
                    raise ValueError("malformed array literal: unexpected character")
                if c == "\\":
                    if pos + 1 >= n:
                        raise ValueError("malformed array literal: unexpected end")
                    # An escaped character is never trimmed; mark it with a sentinel-free copy.
                    buf.append("\x00" + s[pos + 1])
                    pos += 2
                else:
                    buf.append(c)
                    pos += 1
            raw = "".join(buf)
            stripped = _strip_unescaped(raw)
            if stripped == "":
                raise ValueError("malformed array literal: empty element")
            if stripped.upper() == "NULL" and "\x00" not in raw:
                items.append(None)
            else:
                items.append(stripped.replace("\x00", ""))
        expect_item = False


def _strip_unescaped(raw: str) -> str:
    """Trim whitespace that was not escaped (escaped chars carry a NUL marker before them)."""
    start = 0
    end = len(raw)
    while start < end and raw[start].isspace():
        start += 1
    while end > start and raw[end - 1].isspace() and not (end >= 2 and raw[end - 2] == "\x00"):
        end -= 1
    return raw[start:end]


def _flatten(items: Iterable[Any]) -> Iterable[str | None]:
    for item in items:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


# --------------------------------------------------------------------------------------------
# Types: how a column's values are keyed (compared) and how filter text is cast
# --------------------------------------------------------------------------------------------

KeyFn = Callable[[Any], Any]
"""Maps a rendered row value (never None) to a comparable, hashable key."""

_INT_RANGES = {"int2": 2**15, "int4": 2**31, "int8": 2**63}
_INT_RE = re.compile(r"\s*[+-]?\d+\s*\Z")
_NUM_RE = re.compile(
    r"\s*[+-]?(\d+\.?\d*(e[+-]?\d+)?|\.\d+(e[+-]?\d+)?|nan|inf|infinity)\s*\Z", re.IGNORECASE
)
_TRUE = frozenset({"t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"})
_FALSE = frozenset({"f", "fa", "fal", "fals", "false", "n", "no", "off", "0"})
_NAN_KEY: tuple[int, Decimal] = (1, Decimal(0))
_TEXT_TYPES = frozenset({"text", "varchar", "name", "char", "citext", "bpchar", "unknown"})
_INFINITE = {"infinity": 1, "+infinity": 1, "-infinity": -1}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Type:
    """How one column type compares: its key function, its caster, and what it allows."""

    __slots__ = ("cast", "key", "name", "ordered", "patterns")

    def __init__(
        self, name: str, key: KeyFn, cast: Callable[[str], Hashable], *, ordered: bool, patterns: bool = False
    ) -> None:
        self.name = name
        self.key = key
        self.cast = cast
        self.ordered = ordered
        self.patterns = patterns


def _invalid(type_label: str, text: str) -> FilterError:
    return FilterError(f'invalid input syntax for type {type_label}: "{text}"')


def _int_type(name: str) -> _Type:
    bound = _INT_RANGES[name]
    label = {"int2": "smallint", "int4": "integer", "int8": "bigint"}[name]

    def key(v: Any) -> Hashable:
        return v if type(v) is int else int(str(v))

    def cast(text: str) -> Hashable:
        if not _INT_RE.match(text):
            raise _invalid(label, text)
        n = int(text)
        if not -bound <= n < bound:
            raise FilterError(f'value "{text}" is out of range for type {label}')
        return n

    return _Type(name, key, cast, ordered=True)


def _num_key(v: Any) -> Hashable:
    if type(v) is int:
        return (0, Decimal(v))
    if type(v) is float:
        return _NAN_KEY if v != v else (0, Decimal(repr(v)))
    d = Decimal(str(v).strip())
    return _NAN_KEY if d.is_nan() else (0, d)


def _num_type(name: str) -> _Type:
    label = {"float4": "real", "float8": "double precision"}.get(name, name)

    def cast(text: str) -> Hashable:
        if not _NUM_RE.match(text):
            raise _invalid(label, text)
        return _num_key(text)

    return _Type(name, _num_key, cast, ordered=True)


def _bool_cast(text: str) -> Hashable:
    s = text.strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise _invalid("boolean", text)


def _bool_key(v: Any) -> Hashable:
    if isinstance(v, bool):
        return v
    return _bool_cast(str(v))


def _text_type(name: str) -> _Type:
    if name == "bpchar":

        def key(v: Any) -> Hashable:
            return str(v).rstrip(" ")
    elif name == "citext":

        def key(v: Any) -> Hashable:
            return str(v).lower()
    else:

        def key(v: Any) -> Hashable:
            return v if type(v) is str else str(v)

    return _Type(name, key, key, ordered=True, patterns=True)


def _uuid_key(v: Any) -> Hashable:
    return str(uuid.UUID(str(v)))


def _uuid_cast(text: str) -> Hashable:
    try:
        return _uuid_key(text.strip())
    except ValueError:
        raise _invalid("uuid", text) from None


def _moment_type(name: str, zone: tzinfo) -> _Type:
    """timestamptz, timestamp, date, time: keyed by (rank, value) so +-infinity sort at the ends."""
    label = {
        "timestamptz": "timestamp with time zone",
        "timestamp": "timestamp without time zone",
        "date": "date",
        "time": "time without time zone",
    }[name]

    def parse(text: str) -> tuple[int, Any]:
        s = text.strip()
        rank = _INFINITE.get(s.lower())
        if rank is not None:
            return (rank, _EPOCH)
        if name == "date":
            return (0, date.fromisoformat(s[:10]) if len(s) > 10 and s[10] in " T" else date.fromisoformat(s))
        if name == "time":
            return (0, time.fromisoformat(s))
        dt = datetime.fromisoformat(s)
        if name == "timestamptz":
            # A zone-less value is read in the database's TimeZone, as PostgreSQL does.
            return (0, dt if dt.tzinfo else dt.replace(tzinfo=zone))
        return (0, dt.replace(tzinfo=None))

    def key(v: Any) -> Hashable:
        return parse(str(v))

    def cast(text: str) -> Hashable:
        try:
            return key(text)
        except ValueError:
            raise _invalid(label, text) from None

    return _Type(name, key, cast, ordered=True)


def _freeze_json(v: Any) -> Hashable:
    """A hashable form of a JSON value with jsonb equality (1 == 1.0, key order ignored)."""
    if v is None:
        return ("null",)
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, int | float):
        return ("num", Decimal(repr(v)) if isinstance(v, float) else Decimal(v))
    if isinstance(v, str):
        return ("str", v)
    if isinstance(v, list):
        return ("list", tuple(_freeze_json(x) for x in v))
    if isinstance(v, dict):
        return ("obj", tuple(sorted((str(k), _freeze_json(x)) for k, x in v.items())))
    return ("str", str(v))


def _json_cast(text: str) -> Hashable:
    try:
        return _freeze_json(json.loads(text))
    except ValueError:
        raise _invalid("json", text) from None


def _other_type(name: str) -> _Type:
    def key(v: Any) -> Hashable:
        return v if type(v) is str else json.dumps(v, sort_keys=True)

    return _Type(name, key, key, ordered=False, patterns=True)


def _array_type(name: str, element: _Type) -> _Type:
    def conv(v: Any, elem: Callable[[Any], Hashable]) -> Hashable:
        if isinstance(v, list):
            return tuple(conv(x, elem) for x in v)
        return None if v is None else elem(v)

    def key(v: Any) -> Hashable:
        if isinstance(v, str):
            v = parse_array_literal(v)
        return conv(v, element.key)

    def cast(text: str) -> Hashable:
        try:
            parsed = parse_array_literal(text)
        except ValueError:
            raise FilterError(f'malformed array literal: "{text}"') from None
        return conv(parsed, element.cast)

    return _Type(name, key, cast, ordered=False)


def _column_type(typname: str, zone: tzinfo = UTC) -> _Type:
    if typname.startswith("_") and len(typname) > 1:
        return _array_type(typname, _column_type(typname[1:], zone))
    if typname in _INT_RANGES:
        return _int_type(typname)
    if typname in ("float4", "float8", "numeric"):
        return _num_type(typname)
    if typname == "bool":
        return _Type(typname, _bool_key, _bool_cast, ordered=True)
    if typname in _TEXT_TYPES:
        return _text_type(typname)
    if typname == "uuid":
        return _Type(typname, _uuid_key, _uuid_cast, ordered=True)
    if typname in ("timestamptz", "timestamp", "date", "time"):
        return _moment_type(typname, zone)
    if typname in ("json", "jsonb"):
        return _Type(typname, _freeze_json, _json_cast, ordered=False)
    return _other_type(typname)


# --------------------------------------------------------------------------------------------
# Binding and matching
# --------------------------------------------------------------------------------------------

Check = Callable[[Any], bool]


def _like_regex(pattern: str, flags: int) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            if i + 1 >= len(pattern):
                raise FilterError("LIKE pattern must not end with escape character")
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.compile("".join(out), flags | re.DOTALL)


def _compile_condition(cond: Condition, typ: _Type) -> Check:
    op = cond.op
    neg = cond.negate
    key = typ.key

    if op == "is":
        which = cond.value.lower()
        if which == "null":
            return (lambda v: v is not None) if neg else (lambda v: v is None)
        if typ.name != "bool":
            raise FilterError(f"`is.{which}` filter needs a boolean column: {cond.column} is {typ.name}")
        expected: bool | None = {"true": True, "false": False, "unknown": None}[which]
        if neg:
            return lambda v: v is not expected
        return lambda v: v is expected

    if op in _ORDERING and not typ.ordered:
        raise FilterError(f"operator `{op}` is not supported for column {cond.column} of type {typ.name}")
    if op in _PATTERN_OPS and not typ.patterns:
        raise FilterError(f"operator `{op}` is not supported for column {cond.column} of type {typ.name}")

    def guarded(test: Callable[[Any], bool]) -> Check:
        # NULL (and values this type cannot read) fail, negated or not, like SQL's NULL result.
        def check(v: Any) -> bool:
            if v is None:
                return False
            try:
                return test(v) is not neg
            except (ValueError, TypeError, ArithmeticError):
                return False

        return check

    if op == "in":
        targets = frozenset(typ.cast(item) for item in cond.items if item is not None)
        return guarded(lambda v: key(v) in targets)
    if op in _PATTERN_OPS:
        if op in ("like", "ilike"):
            rx = _like_regex(cond.value, re.IGNORECASE if op == "ilike" else 0)
            return guarded(lambda v: rx.fullmatch(key(v)) is not None)
        if len(cond.value) > MAX_REGEX_LENGTH:
            raise FilterError(f"regular expression is too long (max {MAX_REGEX_LENGTH} characters)")
        try:
            rx = re.compile(cond.value, re.IGNORECASE if op == "imatch" else 0)
        except re.error as exc:
            raise FilterError(f"invalid regular expression: {exc}") from None
        return guarded(lambda v: rx.search(key(v)) is not None)

    target = typ.cast(cond.value)
    if op == "isdistinct":

        def distinct(v: Any) -> bool:
            if v is None:
                return not neg
            try:
                return (key(v) != target) is not neg
            except (ValueError, TypeError, ArithmeticError):
                return not neg

        return distinct
    if op == "eq":
        return guarded(lambda v: key(v) == target)
    if op == "neq":
        return guarded(lambda v: key(v) != target)
    t = target
    if op == "lt":
        return guarded(lambda v: key(v) < t)
    if op == "lte":
        return guarded(lambda v: key(v) <= t)
    if op == "gt":
        return guarded(lambda v: key(v) > t)
    return guarded(lambda v: key(v) >= t)


class BoundFilter:
    """Conditions cast to their columns' types; :meth:`matches` tests one row.

    ``index_column``/``index_keys``/``index_key`` describe the first plain ``eq`` or ``in`` condition
    (or are ``None``): a row can only match if ``index_key(row[index_column])`` is in
    ``index_keys``. A subscription index uses them to find candidates by value.
    """

    __slots__ = ("_checks", "conditions", "index_column", "index_key", "index_keys")

    def __init__(
        self,
        conditions: tuple[Condition, ...],
        checks: list[tuple[str, Check]],
        index: tuple[str, frozenset[Hashable], KeyFn] | None,
    ) -> None:
        self.conditions = conditions
        self._checks = tuple(checks)
        self.index_column: str | None = index[0] if index else None
        self.index_keys: frozenset[Hashable] | None = index[1] if index else None
        self.index_key: KeyFn | None = index[2] if index else None

    def matches(self, row: Mapping[str, Any]) -> bool:
        """True when every condition holds; conditions on columns absent from *row* are skipped."""
        for column, check in self._checks:
            if column in row and not check(row[column]):
                return False
        return True

    def __bool__(self) -> bool:
        return bool(self._checks)

    def __repr__(self) -> str:
        return f"BoundFilter({inspect_conditions(self.conditions)})"


def bind_filter(
    conditions: Sequence[Condition], column_types: Mapping[str, str], timezone: str | tzinfo = "UTC"
) -> BoundFilter:
    """Cast each condition's value to its column's type (``column_types``: name -> typname).

    *timezone* (the database's ``TimeZone`` setting) is how zone-less ``timestamptz`` values are
    read; an IANA name PostgreSQL knows but this machine does not falls back to UTC.

    Raises:
        FilterError: ``invalid column for filter <c>``, a value that does not cast
            (``invalid input syntax for type integer: "x"``), or an operator the type lacks.
    """
    checks: list[tuple[str, Check]] = []
    index: tuple[str, frozenset[Hashable], KeyFn] | None = None
    types: dict[str, _Type] = {}
    zone = _zone(timezone)
    for cond in conditions:
        typname = column_types.get(cond.column)
        if typname is None:
            raise FilterError(f"invalid column for filter {cond.column}")
        typ = types.get(typname) or types.setdefault(typname, _column_type(typname, zone))
        checks.append((cond.column, _compile_condition(cond, typ)))
        if index is None and not cond.negate and cond.op in ("eq", "in"):
            if cond.op == "eq":
                keys = frozenset([typ.cast(cond.value)])
            else:
                keys = frozenset(typ.cast(item) for item in cond.items if item is not None)
            index = (cond.column, keys, typ.key)
    return BoundFilter(tuple(conditions), checks, index)


def _zone(timezone: str | tzinfo) -> tzinfo:
    if not isinstance(timezone, str):
        return timezone
    if timezone.upper() in ("UTC", "GMT", "Z", "ETC/UTC", "UCT"):
        return UTC
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def matches(filter_text: str | None, row: Mapping[str, Any], column_types: Mapping[str, str]) -> bool:
    """Parse, bind and test in one go (convenient, slow: bind once and reuse in hot paths)."""
    return bind_filter(parse_filter(filter_text), column_types).matches(row)
