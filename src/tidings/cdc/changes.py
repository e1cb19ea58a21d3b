"""From decoded pgoutput messages to the change payloads clients receive (spec 6.3).

:class:`ChangeDecoder` keeps the per-session state (relations, the open transaction) and turns each
Insert/Update/Delete into a :class:`Change` whose :attr:`Change.data` is the ``data`` object of a
``postgres_changes`` push::

    {"schema", "table", "commit_timestamp", "position", "type", "columns", "record", "old_record",
     "errors"}

INSERT has no ``old_record`` and DELETE no ``record``. ``old_record`` holds the replica identity:
the primary key under REPLICA IDENTITY DEFAULT (taken from the new row when the key did not
change), the whole previous row under FULL. An unchanged TOASTed value (not sent by PostgreSQL) is
filled from the old row when there is one, and left out of ``record`` otherwise.

Every change gets a stable id, ``<commit LSN>:<index in transaction>``: a transaction delivered
twice (after a restart before it was confirmed) yields the same ids, so duplicates can be dropped.
``data.position`` is the same pair as a string that compares in stream order
(:func:`tidings.protocol.positions.format_position`): a client resumes from it.
At a Commit the decoder returns :class:`TransactionEnd`; confirming its ``end_lsn`` to the slot
acknowledges the whole transaction.

Pure: no asyncio, no I/O. Type and primary-key lookups are injected as callables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tidings.cdc.pgoutput import (
    UNCHANGED,
    Begin,
    Binary,
    Commit,
    Delete,
    Insert,
    PgOutputMessage,
    Relation,
    TupleData,
    Type,
    Unchanged,
    Update,
    decode,
    format_lsn,
    pg_timestamp,
)
from tidings.cdc.values import PgType, builtin_type, render, unknown_type
from tidings.protocol.positions import format_position

__all__ = [
    "DEFAULT_MAX_RECORD_BYTES",
    "ERROR_NO_PRIMARY_KEY",
    "ERROR_TOO_LARGE",
    "Change",
    "ChangeDecoder",
    "TableInfo",
    "TransactionEnd",
    "format_commit_timestamp",
    "narrow",
]

DEFAULT_MAX_RECORD_BYTES = 1024 * 1024
"""Rows whose values exceed this many bytes are sent with ``Error 413`` and only small values."""
SMALL_VALUE_BYTES = 64
"""In an oversized row, values up to this size are kept."""
ERROR_NO_PRIMARY_KEY = "Error 400: Bad Request, no primary key"
ERROR_TOO_LARGE = "Error 413: Payload Too Large"


def format_commit_timestamp(micros: int) -> str:
    """Wire commit time -> ``2026-08-21T12:00:00.123Z`` (UTC, milliseconds truncated, ``Z``)."""
    moment = pg_timestamp(micros)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(slots=True)
class TableInfo:
    """A published table as the current replication session describes it."""

    relation_id: int
    schema: str
    table: str
    names: tuple[str, ...]
    types: tuple[PgType, ...]
    columns: tuple[dict[str, str], ...]
    """``[{name, type}]`` for the payload (copied into each change's list)."""
    identity_key: tuple[str, ...]
    """Columns flagged as the replica identity key."""
    primary_key: tuple[str, ...]
    replica_identity: str
    filter_types: dict[str, str]
    """Column -> type name the filter engine compares by."""


@dataclass(slots=True)
class Change:
    """One INSERT/UPDATE/DELETE, ready to match and deliver."""

    id: str
    """Stable id: ``<commit LSN>:<index>``."""
    commit_lsn: int
    index: int
    schema: str
    table: str
    type: str
    """``INSERT``, ``UPDATE`` or ``DELETE``."""
    data: dict[str, Any]
    """The spec 6.3 ``data`` object."""
    row: dict[str, Any]
    """What filters test: the new record, or for DELETE the old record (``{}`` for error rows)."""
    filter_types: dict[str, str]
    primary_key: tuple[str, ...]
    xid: int = 0
    """The writing transaction's 32-bit id (from its Begin); 0 when unknown. RLS checks wait until
    it is visible to their snapshot: the stream can bring a commit before other sessions see it."""

    @property
    def position(self) -> str:
        """Where the change is in the stream (``data.position``): compares in stream order."""
        return format_position(self.commit_lsn, self.index)


@dataclass(frozen=True, slots=True)
class TransactionEnd:
    """A transaction's last change was produced; confirm :attr:`end_lsn` once all were handed over."""

    commit_lsn: int
    end_lsn: int
    changes: int
    """Number of changes the transaction produced."""


TypeResolver = Callable[[int], PgType]
PrimaryKeyResolver = Callable[[int], tuple[str, ...] | None]


class ChangeDecoder:
    """Stateful pgoutput -> :class:`Change` conversion for one replication session.

    Args:
        resolve_type: OID -> :class:`PgType` for non-built-in types (I/O lives with the caller).
            Without it, such columns render as text and carry the name from the ``Y`` message.
        primary_key: relation OID -> primary key column names (``()`` for none), or ``None`` when
            unknown; then the replica identity key stands in for it.
        max_record_bytes: rows larger than this are sent with ``Error 413``.
    """

    def __init__(
        self,
        resolve_type: TypeResolver | None = None,
        primary_key: PrimaryKeyResolver | None = None,
        *,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        self._resolve_type = resolve_type
        self._primary_key = primary_key
        self.max_record_bytes = max_record_bytes
        self.tables: dict[int, TableInfo] = {}
        self._type_names: dict[int, str] = {}
        self._begin: Begin | None = None
        self._index = 0
        self._timestamp = ""

    @property
    def in_transaction(self) -> bool:
        """True between a Begin and its Commit."""
        return self._begin is not None

    def reset(self) -> None:
        """Forget the session state; call when a new replication session starts."""
        self.tables.clear()
        self._type_names.clear()
        self._begin = None
        self._index = 0

    def feed(self, payload: bytes) -> Change | TransactionEnd | None:
        """Decode one pgoutput message and handle it."""
        return self.handle(decode(payload))

    def handle(self, msg: PgOutputMessage) -> Change | TransactionEnd | None:
        """Handle one decoded message: a Change, a TransactionEnd at Commit, or None."""
        if isinstance(msg, Insert):
            return self._change("INSERT", msg.relation_id, msg.new, None, None)
        if isinstance(msg, Update):
            return self._change("UPDATE", msg.relation_id, msg.new, msg.old_kind, msg.old)
        if isinstance(msg, Delete):
            return self._change("DELETE", msg.relation_id, None, msg.old_kind, msg.old)
        if isinstance(msg, Begin):
            self._begin = msg
            self._index = 0
            self._timestamp = format_commit_timestamp(msg.commit_time)
            return None
        if isinstance(msg, Commit):
            self._begin = None
            return TransactionEnd(msg.commit_lsn, msg.end_lsn, self._index)
        if isinstance(msg, Relation):
            self.tables[msg.relation_id] = self._table(msg)
            return None
        if isinstance(msg, Type):
            self._type_names[msg.type_oid] = msg.name
        # Origin, Message, Truncate: nothing to deliver (TRUNCATE is not sent to clients).
        return None

    # -- internals ----------------------------------------------------------------------------

    def _type(self, oid: int) -> PgType:
        known = builtin_type(oid)
        if known is not None:
            return known
        if self._resolve_type is not None:
            return self._resolve_type(oid)
        return unknown_type(oid, self._type_names.get(oid, "unknown"))

    def _table(self, rel: Relation) -> TableInfo:
        names = tuple(c.name for c in rel.columns)
        types = tuple(self._type(c.type_oid) for c in rel.columns)
        identity_key = tuple(c.name for c in rel.columns if c.is_key)
        pk = self._primary_key(rel.relation_id) if self._primary_key is not None else None
        if pk is None:
            pk = identity_key  # the best guess without the catalog (all columns under FULL)
        return TableInfo(
            relation_id=rel.relation_id,
            schema=rel.namespace or "pg_catalog",
            table=rel.name,
            names=names,
            types=types,
            columns=tuple({"name": n, "type": t.name} for n, t in zip(names, types, strict=True)),
            identity_key=identity_key,
            primary_key=pk,
            replica_identity=rel.replica_identity,
            filter_types={n: t.filter_name for n, t in zip(names, types, strict=True)},
        )

    def _render_row(
        self, info: TableInfo, values: TupleData, only: tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for name, typ, value in zip(info.names, info.types, values, strict=False):
            if isinstance(value, Unchanged) or (only is not None and name not in only):
                continue
            if isinstance(value, Binary):
                row[name] = "\\x" + value.data.hex()
            else:
                row[name] = render(typ, value)
        return row

    def _change(
        self, kind: str, rel_id: int, new: TupleData | None, old_kind: str | None, old: TupleData | None
    ) -> Change:
        info = self.tables.get(rel_id)
        if info is None:
            raise ValueError(f"change for relation {rel_id} before its Relation message")
        begin = self._begin
        commit_lsn = begin.final_lsn if begin is not None else 0
        xid = begin.xid if begin is not None else 0
        index = self._index
        self._index += 1

        errors: list[str] | None = None
        too_large = _size(new) + _size(old) > self.max_record_bytes
        if too_large:
            errors = [ERROR_TOO_LARGE]

        record: dict[str, Any] | None = None
        old_record: dict[str, Any] | None = None
        if new is not None:
            record = self._render_row(info, new)
        if old is not None:
            # A 'K' tuple carries every column but only the key ones are real (others are NULL).
            old_record = self._render_row(info, old, None if old_kind == "O" else info.identity_key)
            if record is not None and old_kind == "O":
                for name, value in zip(info.names, new or (), strict=False):
                    if value is UNCHANGED and name in old_record:
                        record[name] = old_record[name]
        elif kind == "UPDATE" and record is not None:
            # The key did not change, so the new row holds the identity.
            old_record = {k: record[k] for k in info.identity_key if k in record}
        if too_large:
            record = _small_values(record, new, info)
            old_record = _small_values(old_record, old, info)

        data: dict[str, Any] = {
            "schema": info.schema,
            "table": info.table,
            "commit_timestamp": self._timestamp,
            "position": format_position(commit_lsn, index),
            "type": kind,
            "columns": list(info.columns),
        }
        if kind != "DELETE" and not info.primary_key:
            data["errors"] = [ERROR_NO_PRIMARY_KEY]
            return Change(
                _change_id(commit_lsn, index),
                commit_lsn,
                index,
                info.schema,
                info.table,
                kind,
                data,
                {},
                info.filter_types,
                info.primary_key,
                xid,
            )
        if kind != "DELETE":
            data["record"] = record if record is not None else {}
        if kind != "INSERT":
            data["old_record"] = old_record if old_record is not None else {}
        data["errors"] = errors
        row = data["record"] if kind != "DELETE" else data["old_record"]
        return Change(
            _change_id(commit_lsn, index),
            commit_lsn,
            index,
            info.schema,
            info.table,
            kind,
            data,
            row,
            info.filter_types,
            info.primary_key,
            xid,
        )


def _change_id(commit_lsn: int, index: int) -> str:
    return f"{format_lsn(commit_lsn)}:{index}"


def _size(values: TupleData | None) -> int:
    if not values:
        return 0
    total = 0
    for v in values:
        if isinstance(v, str):
            total += len(v)  # characters: a cheap lower bound of the byte size
        elif isinstance(v, Binary):
            total += len(v.data)
    return total


def _small_values(
    row: dict[str, Any] | None, values: TupleData | None, info: TableInfo
) -> dict[str, Any] | None:
    if row is None or values is None:
        return row
    raw = {name: v for name, v in zip(info.names, values, strict=False) if isinstance(v, str | Binary)}
    keep = {}
    for name, value in row.items():
        v = raw.get(name)
        size = len(v.encode()) if isinstance(v, str) else len(v.data) if isinstance(v, Binary) else 0
        if size <= SMALL_VALUE_BYTES:
            keep[name] = value
    return keep


def narrow(data: Mapping[str, Any], visible: frozenset[str]) -> dict[str, Any]:
    """A copy of a change's ``data`` restricted to *visible* columns (``select``, column privileges)."""
    out = dict(data)
    out["columns"] = [c for c in data["columns"] if c["name"] in visible]
    for key in ("record", "old_record"):
        row = data.get(key)
        if isinstance(row, dict):
            out[key] = {k: v for k, v in row.items() if k in visible}
    return out
