"""The change log of Postgres Changes: recent changes per table, so a rejoining client can resume.

Every streamed change is appended to its table's log before it is delivered; a client that
rejoins with the position of the last change it received (``postgres_changes_options.resume``)
is sent the changes after it that match its bindings now (:meth:`PostgresChanges.resume`).

**Coverage and epochs.** A log records a continuous stretch of the stream: everything after
:attr:`LogState.after` (the position just before the slot's confirmed position when the stream
started) up to :attr:`LogState.head`. When the stretch is broken (a new process with the memory
log, a slot that started beyond what the log recorded, a log lost in Redis) the log starts over
with a new :attr:`LogState.epoch`. A replay is complete only when the log provably holds every
change after ``since``: ``since`` is within the stretch (and of its epoch, when the client passes
one), and nothing after it was trimmed from the tables read.

**Bounds**, per table: ``size`` changes, ``max_bytes`` (estimated: the JSON of the change) and
``ttl`` seconds; the oldest go first, and their position is remembered as the table's trim mark.

:class:`MemoryChangeLog` keeps the log in this process (the memory broker); the Redis log of a
cluster (written by the change-feed leader, read by every node) is
:class:`tidings.cdc.cluster.BusChangeLog`. Both are :class:`ChangeLog`.
"""

from __future__ import annotations

import bisect
import time
import uuid
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple, Protocol

import orjson

from tidings.cdc.changes import Change
from tidings.protocol.filters import KeyFn
from tidings.protocol.positions import format_position, position_of

__all__ = [
    "ENTRY_BYTES",
    "MAX_INDEXES",
    "ChangeLog",
    "Candidates",
    "LogState",
    "MemoryChangeLog",
    "TableRead",
    "covered_after",
    "new_epoch",
    "position_before",
]

TableKey = tuple[str, str]

ENTRY_BYTES = 200
"""Estimated bookkeeping bytes of one logged change besides its JSON."""
MAX_INDEXES = 4
"""Columns per table the memory log indexes by value (for ``eq``/``in`` filters) at most."""


def new_epoch() -> str:
    """A fresh epoch: a log that starts over gets one no earlier log had."""
    return uuid.uuid4().hex[:12]


def covered_after(start_lsn: int) -> str:
    """The position just before *start_lsn*: a stream starting there yields every change after it."""
    return format_position(start_lsn - 1, 0xFFFFFFFF) if start_lsn > 0 else format_position(0, 0)


def position_before(position: str) -> str:
    """The position just before *position*."""
    lsn, index = position_of(position)
    return format_position(lsn, index - 1) if index else covered_after(lsn)


class LogState(NamedTuple):
    """Where the log stands: its epoch (``None`` before it started), the position after which it
    holds everything (minus trims), and the newest position it holds (``""``: none yet)."""

    epoch: str | None
    after: str
    head: str

    @property
    def baseline(self) -> str:
        """The newest position the log vouches for: its head, or the start of its coverage."""
        return max(self.head, self.after)


class TableRead(NamedTuple):
    """Changes of one table after a position, oldest first, and whether that is all of them."""

    changes: list[Change]
    complete: bool


class Candidates(NamedTuple):
    """A shortcut for :meth:`ChangeLog.read`: only rows whose ``column`` value keys (``key``) to one
    of ``keys`` can match (an ``eq``/``in`` filter), plus rows without the column."""

    column: str
    keys: frozenset[Hashable]
    key: KeyFn


class ChangeLog(Protocol):
    """What Postgres Changes need of a change log (memory, or Redis through the change bus)."""

    enabled: bool
    size: int
    """Changes kept per table at most (a read never returns more)."""

    def begin(self, start_lsn: int) -> None:
        """A stream starts at the slot position *start_lsn*: continue, or start over (new epoch)."""

    def append(self, change: Change) -> None:
        """Log one streamed change (changes already logged, at or below the head, are ignored)."""

    def transaction_end(self, end_lsn: int) -> None:
        """Every change of the transaction ending at *end_lsn* was appended."""

    async def state(self) -> LogState:
        """Epoch, coverage and head."""

    async def read(
        self, table: TableKey, since: str, limit: int, candidates: Sequence[Candidates] | None
    ) -> TableRead:
        """The table's changes after *since*, oldest first, at most *limit* (more: incomplete)."""


def change_bytes(change: Change) -> int:
    """Estimated bytes a logged change holds."""
    return ENTRY_BYTES + len(orjson.dumps(change.data))


class _Entry:
    __slots__ = ("change", "position", "size", "ts")

    def __init__(self, position: str, ts: float, size: int, change: Change) -> None:
        self.position = position
        self.ts = ts
        self.size = size
        self.change = change


class _Index:
    """A table's entries by the key of one column's value (built on first use, then kept)."""

    __slots__ = ("buckets", "column", "key", "missing")

    def __init__(self, column: str, key: KeyFn) -> None:
        self.column = column
        self.key = key
        self.buckets: dict[Hashable, deque[_Entry]] = {}
        self.missing: deque[_Entry] = deque()  # rows without the column (a key-only DELETE)

    _MISSING = object()

    def _key(self, entry: _Entry) -> Hashable | None:
        """The bucket of *entry*: its value's key, ``_MISSING`` without the column, ``None``: none."""
        row = entry.change.row
        if self.column not in row:
            return self._MISSING
        value = row[self.column]
        if value is None:
            return None  # eq/in never match NULL
        try:
            key: Hashable = self.key(value)
        except (ValueError, TypeError, ArithmeticError):
            return None
        return key

    def add(self, entry: _Entry) -> None:
        key = self._key(entry)
        if key is self._MISSING:
            self.missing.append(entry)
        elif key is not None:
            bucket = self.buckets.get(key)
            if bucket is None:
                bucket = self.buckets[key] = deque()
            bucket.append(entry)

    def drop(self, entry: _Entry) -> None:
        """*entry* is the table's oldest: it is first in its bucket."""
        key = self._key(entry)
        if key is self._MISSING:
            if self.missing and self.missing[0] is entry:
                self.missing.popleft()
        elif key is not None:
            bucket = self.buckets.get(key)
            if bucket and bucket[0] is entry:
                bucket.popleft()
                if not bucket:
                    del self.buckets[key]

    def after(self, keys: frozenset[Hashable], since: str) -> list[_Entry]:
        found: list[_Entry] = []
        for bucket in [self.buckets.get(k) for k in keys] + [self.missing]:
            if not bucket:
                continue
            for entry in reversed(bucket):
                if entry.position <= since:
                    break
                found.append(entry)
        found.sort(key=lambda e: e.position)
        return found


class _Table:
    __slots__ = ("bytes", "entries", "indexes", "start", "trimmed")

    def __init__(self) -> None:
        # A list read from `start` (popping the oldest is `start += 1`): positions bisect.
        self.entries: list[_Entry] = []
        self.start = 0
        self.bytes = 0
        self.trimmed = ""  # the newest position trimmed away ("" none)
        self.indexes: dict[str, _Index] = {}

    def __len__(self) -> int:
        return len(self.entries) - self.start

    def oldest(self) -> _Entry:
        return self.entries[self.start]

    def pop_oldest(self) -> None:
        entry = self.entries[self.start]
        self.entries[self.start] = None  # type: ignore[call-overload]  # freed now, compacted later
        self.start += 1
        self.bytes -= entry.size
        self.trimmed = entry.position
        for index in self.indexes.values():
            index.drop(entry)
        if self.start > 1024 and self.start * 2 > len(self.entries):
            del self.entries[: self.start]
            self.start = 0

    def index(self, column: str, key: KeyFn) -> _Index | None:
        index = self.indexes.get(column)
        if index is None:
            if len(self.indexes) >= MAX_INDEXES:
                return None
            index = self.indexes[column] = _Index(column, key)
            for i in range(self.start, len(self.entries)):
                index.add(self.entries[i])
        return index


class MemoryChangeLog:
    """The change log in this process (lost with it: a restart starts a new epoch).

    Args:
        size: changes kept per table (0: no log; every resume is then ``recovered: false``).
        max_bytes: estimated bytes kept per table.
        ttl: seconds a change is kept.
    """

    def __init__(self, size: int, max_bytes: int, ttl: float) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.enabled = size > 0
        self.epoch: str | None = None
        self.after = format_position(0, 0)
        self.head = ""
        self.logged_lsn = 0
        self._tables: dict[TableKey, _Table] = {}
        self.bytes = 0
        """Estimated bytes held, all tables."""
        self.trimmed = 0
        """Changes dropped over a bound (count, bytes or age)."""

    def __len__(self) -> int:
        return sum(len(t) for t in self._tables.values())

    def begin(self, start_lsn: int) -> None:
        """Continue when the stream starts at or before what was logged; else start over."""
        if self.epoch is not None and start_lsn <= self.logged_lsn:
            return
        self.epoch = new_epoch()
        self.after = covered_after(start_lsn)
        self.head = ""
        self.logged_lsn = start_lsn
        self._tables.clear()
        self.bytes = 0

    def follow(self, change: Change, prev: str | None) -> None:
        """Mirror a change published by the lease holder of a cluster (every node keeps one, to
        answer resumes without reading Redis). *prev*: the holder logged nothing between it and
        this change. A change after a hole (a lost publish, a new stream) starts the mirror over,
        covering from *prev*."""
        position = change.position
        if self.epoch is not None and position <= self.head:
            return
        if self.epoch is None or prev is None or prev > max(self.head, self.after):
            self.epoch = new_epoch()
            self.after = prev if prev is not None and prev < position else position_before(position)
            self.head = ""
            self._tables.clear()
            self.bytes = 0
        self.append(change)

    def append(self, change: Change, now: float | None = None) -> None:
        """Log *change* (ignored when at or below the head: a stream repeating what it sent)."""
        if not self.enabled or self.epoch is None:
            return
        position = change.position
        if position <= self.head:
            return
        now = time.time() if now is None else now
        self.head = position
        key = (change.schema, change.table)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = _Table()
        entry = _Entry(position, now, change_bytes(change), change)
        table.entries.append(entry)
        table.bytes += entry.size
        self.bytes += entry.size
        for index in table.indexes.values():
            index.add(entry)
        self._trim(table, now)

    def transaction_end(self, end_lsn: int) -> None:
        """Everything up to *end_lsn* was appended."""
        if end_lsn > self.logged_lsn:
            self.logged_lsn = end_lsn

    def _trim(self, table: _Table, now: float) -> None:
        cutoff = now - self.ttl
        # The newest change stays even when it alone is over max_bytes (it is fresh: not over ttl).
        while len(table) and (
            len(table) > self.size
            or (table.bytes > self.max_bytes and len(table) > 1)
            or table.oldest().ts < cutoff
        ):
            self.bytes -= table.oldest().size
            table.pop_oldest()
            self.trimmed += 1

    def sweep(self, now: float | None = None) -> None:
        """Drop changes older than ``ttl`` from every table (also from tables nobody writes to)."""
        now = time.time() if now is None else now
        for table in self._tables.values():
            self._trim(table, now)

    async def state(self) -> LogState:
        """See :class:`ChangeLog`."""
        return self.state_now()

    def state_now(self) -> LogState:
        """:meth:`state` without awaiting."""
        return LogState(self.epoch, self.after, self.head)

    async def read(
        self, table: TableKey, since: str, limit: int, candidates: Sequence[Candidates] | None
    ) -> TableRead:
        """See :class:`ChangeLog`; *candidates* narrow the read through the table's value indexes."""
        return self.read_now(table, since, limit, candidates)

    def read_now(
        self,
        table: TableKey,
        since: str,
        limit: int,
        candidates: Sequence[Candidates] | None,
        now: float | None = None,
    ) -> TableRead:
        """:meth:`read` without awaiting."""
        log = self._tables.get(table)
        if log is None:
            return TableRead([], True)  # nothing logged for it in this epoch
        self._trim(log, time.time() if now is None else now)
        complete = since >= log.trimmed
        entries: list[_Entry] | None = None
        if candidates:
            found: dict[str, _Entry] = {}
            for c in candidates:
                index = log.index(c.column, c.key)
                if index is None:
                    break
                for entry in index.after(c.keys, since):
                    found[entry.position] = entry
            else:
                entries = sorted(found.values(), key=lambda e: e.position)
        if entries is None:
            first = bisect.bisect_right(log.entries, since, lo=log.start, key=lambda e: e.position)
            entries = log.entries[first : first + limit + 1]
        if len(entries) > limit:
            return TableRead([e.change for e in entries[:limit]], False)
        return TableRead([e.change for e in entries], complete)

    def stats(self) -> dict[str, Any]:
        """Gauges for metrics: tables, changes and estimated bytes held."""
        return {"tables": len(self._tables), "changes": len(self), "bytes": self.bytes}
