"""Postgres Changes subscriptions: parameter validation and the per-table matching index.

* :func:`parse_binding` validates one ``config.postgres_changes[i]`` entry (spec 6.1) into a
  :class:`BindingSpec`, raising :class:`SubscriptionError` with the Supabase server's message.
* :class:`SubscriptionIndex` maps ``(schema, table)`` to its subscribers. Subscriptions whose filter
  has a plain ``eq`` (or ``in``) condition are also keyed by that value, so a change costs
  O(subscribers that can match) rather than O(all subscribers): 10,000 subscribers with
  ``id=eq.N`` on one table cost one dict lookup per change.
* :func:`binding_id` is the stable id echoed in the join reply (like Supabase's ``phash2``).

Pure: no asyncio, no I/O.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tidings.protocol.filters import (
    BoundFilter,
    Condition,
    FilterError,
    KeyFn,
    inspect_conditions,
    parse_filter,
)

__all__ = [
    "ALL_EVENTS",
    "Binding",
    "BindingSpec",
    "SubscriptionError",
    "SubscriptionIndex",
    "binding_id",
    "no_tables_message",
    "parse_binding",
]

ALL_EVENTS: frozenset[str] = frozenset({"INSERT", "UPDATE", "DELETE"})


class SubscriptionError(Exception):
    """A subscription that cannot be made; ``str(exc)`` is the message for the client's system error.

    :attr:`transient` is True when the cause is an outage (worth retrying), False for bad params.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def binding_id(binding: Mapping[str, Any]) -> int:
    """A stable non-negative id below 2**31 for a binding's params (same params, same id)."""
    canonical = json.dumps(binding, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.blake2b(canonical.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindingSpec:
    """A validated subscription request (not yet checked against the database)."""

    action: str
    """``*``, ``INSERT``, ``UPDATE`` or ``DELETE``."""
    schema: str
    """Schema name or ``*``."""
    table: str
    """Table name or ``*``."""
    conditions: tuple[Condition, ...]
    select: tuple[str, ...] | None
    """Requested columns (plus the primary key), or None for all (also for ``select: []``)."""

    @property
    def events(self) -> frozenset[str]:
        return ALL_EVENTS if self.action == "*" else frozenset({self.action})


def _action(params: Mapping[str, Any]) -> str:
    event = params.get("event")
    if isinstance(event, str):
        upper = event.upper()
        if upper in ALL_EVENTS:
            return upper
    return "*"


def _inspect(value: Any) -> str:
    """Elixir ``inspect/1`` of decoded JSON (for the reference server's error texts)."""
    if value is None:
        return "nil"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_inspect(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        return "%{" + ", ".join(f"{_inspect(str(k))} => {_inspect(v)}" for k, v in items) + "}"
    return str(value)


def parse_binding(params: Mapping[str, Any]) -> BindingSpec:
    """Validate one ``postgres_changes`` entry (accepted shapes and messages as in spec 6.1).

    ``null`` values count as absent (realtime-py may send ``"filter": null``).

    Raises:
        SubscriptionError: bad filter, bad ``select``, or neither ``schema`` nor ``table``.
    """
    action = _action(params)
    present = {k: v for k, v in params.items() if v is not None}
    select: tuple[str, ...] | None = None
    raw_select = present.get("select")
    if isinstance(raw_select, list):
        # No column names at all (``[]``, or none of them strings) asks for nothing in particular:
        # every column, as without ``select`` (not a key-only record).
        select = tuple(c for c in raw_select if isinstance(c, str)) or None
    elif isinstance(raw_select, str):
        raise SubscriptionError(
            "Error parsing `select` params: expected a list of column name strings, "
            'e.g. select: ["col1", "col2"]'
        )

    schema = present.get("schema")
    table = present.get("table")
    filt = present.get("filter")
    conditions: tuple[Condition, ...] = ()
    if isinstance(schema, str) and isinstance(table, str) and isinstance(filt, str):
        try:
            conditions = parse_filter(filt)
        except FilterError as exc:
            raise SubscriptionError(str(exc)) from None
    elif isinstance(schema, str) and isinstance(table, str) and "filter" not in present:
        pass
    elif isinstance(schema, str) and "table" not in present and "filter" not in present:
        table = "*"
    elif isinstance(table, str) and "schema" not in present and "filter" not in present:
        schema = "public"
    elif "user_token" in params or "auth_token" in params:
        raise SubscriptionError(
            "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: "
            "<redacted>"
        )
    else:
        raise SubscriptionError(
            "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: "
            + _inspect(dict(params))
        )
    assert isinstance(schema, str) and isinstance(table, str)
    if select is not None and (schema == "*" or table == "*"):
        raise SubscriptionError(
            "Column selection is not supported for wildcard subscriptions. "
            "Provide an explicit schema and table name."
        )
    return BindingSpec(action, schema, table, conditions, select)


def no_tables_message(spec: BindingSpec) -> str:
    """The error when no published table matches *spec*."""
    select = "nil" if spec.select is None else _inspect(list(spec.select))
    return (
        "Unable to subscribe to changes with given parameters. "
        "Please check Realtime is enabled for the given connect parameters: "
        f"[event: {spec.action}, schema: {spec.schema}, table: {spec.table}, "
        f"filters: {inspect_conditions(spec.conditions)}, select: {select}]"
    )


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Binding:
    """One subscription on one table, ready to match."""

    id: int
    """The id echoed in the join reply and sent in ``ids``."""
    events: frozenset[str]
    filter: BoundFilter
    visible: frozenset[str] | None = None
    """Columns this subscriber may see (``select``, column privileges); None for all."""


class _Entry:
    __slots__ = ("binding", "owner", "token")

    def __init__(self, owner: Hashable, binding: Binding, token: int) -> None:
        self.owner = owner
        self.binding = binding
        self.token = token


class _Table:
    __slots__ = ("by_value", "scan")

    def __init__(self) -> None:
        self.scan: dict[int, _Entry] = {}
        # column -> (key function, value key -> entries)
        self.by_value: dict[str, tuple[KeyFn, dict[Hashable, dict[int, _Entry]]]] = {}

    def empty(self) -> bool:
        return not self.scan and not self.by_value


TableKey = tuple[str, str]
# Where an entry lives: (table, indexed column or None, value keys, token, the binding)
_Place = tuple[TableKey, str | None, tuple[Hashable, ...], int, Binding]


class SubscriptionIndex:
    """Subscriptions by table, and by value for ``eq``/``in`` filters.

    Owners are opaque hashable values (the server uses one per joined channel).
    """

    def __init__(self) -> None:
        self._tables: dict[TableKey, _Table] = {}
        self._places: dict[Hashable, list[_Place]] = {}
        self._tokens = itertools.count()

    def __len__(self) -> int:
        """Number of (owner, table, binding) registrations."""
        return sum(len(p) for p in self._places.values())

    @property
    def owners(self) -> int:
        return len(self._places)

    def tables(self) -> set[TableKey]:
        """Tables that currently have subscribers."""
        return set(self._tables)

    def add(self, owner: Hashable, table: TableKey, binding: Binding) -> None:
        """Register *binding* of *owner* on *table*."""
        token = next(self._tokens)
        entry = _Entry(owner, binding, token)
        t = self._tables.get(table)
        if t is None:
            t = self._tables[table] = _Table()
        f = binding.filter
        if f.index_column is not None and f.index_keys is not None and f.index_key is not None:
            keyfn, buckets = t.by_value.setdefault(f.index_column, (f.index_key, {}))
            for key in f.index_keys:
                buckets.setdefault(key, {})[token] = entry
            place: _Place = (table, f.index_column, tuple(f.index_keys), token, binding)
        else:
            t.scan[token] = entry
            place = (table, None, (), token, binding)
        self._places.setdefault(owner, []).append(place)

    def remove(self, owner: Hashable) -> int:
        """Drop every registration of *owner*; returns how many there were."""
        places = self._places.pop(owner, [])
        for table, column, keys, token, _ in places:
            t = self._tables.get(table)
            if t is None:
                continue
            if column is None:
                t.scan.pop(token, None)
            else:
                slot = t.by_value.get(column)
                if slot is not None:
                    buckets = slot[1]
                    for key in keys:
                        bucket = buckets.get(key)
                        if bucket is not None:
                            bucket.pop(token, None)
                            if not bucket:
                                del buckets[key]
                    if not buckets:
                        del t.by_value[column]
            if t.empty():
                del self._tables[table]
        return len(places)

    def bindings_of(self, owner: Hashable) -> dict[TableKey, list[Binding]]:
        """*owner*'s bindings by table (what a replay for it matches against)."""
        out: dict[TableKey, list[Binding]] = {}
        for table, _, _, _, binding in self._places.get(owner, ()):
            out.setdefault(table, []).append(binding)
        return out

    def match(self, table: TableKey, event: str, row: Mapping[str, Any]) -> dict[Hashable, list[Binding]]:
        """Owners whose bindings on *table* accept this *event* and *row*, with those bindings."""
        t = self._tables.get(table)
        if t is None:
            return {}
        out: dict[Hashable, list[Binding]] = {}
        for entry in t.scan.values():
            b = entry.binding
            if event in b.events and b.filter.matches(row):
                out.setdefault(entry.owner, []).append(b)
        for column, (keyfn, buckets) in t.by_value.items():
            if column not in row:
                # The column is not in this row (a DELETE's key-only old record): its condition is
                # skipped, so every entry of this column is a candidate. Entries may sit under
                # several keys (``in``); see each once.
                self._consider(_unique(buckets.values()), event, row, out)
                continue
            value = row[column]
            if value is None:
                continue  # eq/in never match NULL
            try:
                key = keyfn(value)
            except (ValueError, TypeError, ArithmeticError):
                continue
            bucket = buckets.get(key)
            if bucket:
                self._consider(bucket.values(), event, row, out)
        return out

    @staticmethod
    def _consider(
        entries: Iterable[_Entry], event: str, row: Mapping[str, Any], out: dict[Hashable, list[Binding]]
    ) -> None:
        for entry in entries:
            b = entry.binding
            if event in b.events and b.filter.matches(row):
                out.setdefault(entry.owner, []).append(b)


def _unique(buckets: Iterable[dict[int, _Entry]]) -> list[_Entry]:
    seen: dict[int, _Entry] = {}
    for bucket in buckets:
        seen.update(bucket)
    return list(seen.values())
