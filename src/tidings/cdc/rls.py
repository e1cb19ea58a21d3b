"""Row level security for Postgres Changes (``DB_RLS``): one ordered pipeline that asks the database.

With RLS checks on, every change goes through :class:`RlsPipeline`: a queue consumed by one task,
so changes are delivered in stream order and a transaction's end is confirmed only after every
change before it was delivered. The task takes what is queued (a run), works out which
subscribers need a check, asks the database once per (table, identical claims) for all rows of
the run, then delivers the run in order:

* INSERT/UPDATE on a table with row level security enabled: delivered to a subscriber only if its
  role, with its JWT claims, may SELECT the row by primary key (see
  :func:`tidings.cdc.catalog.visible_keys`). Subscribers without a role, and rows whose key is not
  in the record, are not delivered.
* DELETE is never checked (the row is gone); on a table with row level security its
  ``old_record`` keeps only the primary key columns (spec 6.5), filters then see only those.
* Tables without row level security, and error rows without a record: delivered as without RLS.

The database calls are injected (:class:`RlsPipeline` does no I/O itself); the service retries
transient failures and answers "not visible" for checks that fail for good.

Memory is bounded: batches of the replication stream stay "in flight" for the reader until the
pipeline finished them, so the reader stops reading once its in-flight limit is reached; changes
handed over one by one (:meth:`RlsPipeline.put_change`, a cluster node) are dropped, with an error
log, beyond *backlog* queued changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tidings.cdc.changes import Change, TransactionEnd
from tidings.cdc.index import Binding

__all__ = ["Identity", "RlsCounters", "RlsPipeline", "identity_of", "key_only", "row_key"]

log = logging.getLogger("tidings.cdc")

Matched = dict[Hashable, list[Binding]]


class RlsCounters(Protocol):
    """Where RLS checks count (:class:`tidings.metrics.NodeMetrics` has these fields)."""

    changes_rls_hidden: int
    """Deliveries withheld: (change, subscriber) pairs whose row the subscriber may not see."""
    changes_rls_rechecks: int
    """Checks run again because their snapshot did not see the writing transaction yet."""


class _OwnCounters:
    """Counters of a service built without node metrics (tests, tools)."""

    def __init__(self) -> None:
        self.changes_rls_hidden = 0
        self.changes_rls_rechecks = 0


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a subscriber is for RLS checks: its claims as JSON (the grouping key) and its role."""

    claims_json: str
    role: str | None


def identity_of(claims: Mapping[str, Any] | None) -> Identity:
    """The :class:`Identity` of a subscriber with these JWT claims (role None: never visible)."""
    if not isinstance(claims, Mapping):
        return Identity("null", None)
    role = claims.get("role")
    text = json.dumps(claims, sort_keys=True, separators=(",", ":"), default=str)
    return Identity(text, role if isinstance(role, str) and role else None)


def row_key(change: Change) -> tuple[Any, ...] | None:
    """Primary key values of an INSERT/UPDATE's new record (None: no key, or not in the record)."""
    record = change.data.get("record")
    if not change.primary_key or not isinstance(record, dict):
        return None
    values = []
    for column in change.primary_key:
        value = record.get(column)
        if value is None:
            return None  # an oversized row keeps only small values: cannot be looked up
        values.append(value)
    return tuple(values)


def key_only(change: Change) -> Change:
    """A DELETE whose ``old_record`` (and filter row) keeps only the primary key columns."""
    old = change.data.get("old_record")
    if not isinstance(old, dict) or set(old) <= set(change.primary_key):
        return change
    narrowed = {k: v for k, v in old.items() if k in change.primary_key}
    data = dict(change.data)
    data["old_record"] = narrowed
    return dataclasses.replace(change, data=data, row=narrowed)


class Stream(Protocol):
    """What the pipeline needs of the replication stream a batch came from."""

    def confirm(self, lsn: int) -> None: ...

    def batch_done(self) -> None: ...


@dataclass(slots=True)
class _Unit:
    items: Sequence[Change | TransactionEnd]
    stream: Stream | None
    """The stream to confirm to and release the batch of; None for changes handed over alone."""


@dataclass(slots=True)
class _Check:
    """Rows of one table to check for one identity."""

    schema: str
    table: str
    key_columns: tuple[str, ...]
    identity: Identity
    keys: list[tuple[Any, ...]] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)
    visible: set[int] = field(default_factory=set)
    xids: set[int] = field(default_factory=set)
    """Transactions that wrote the rows: the check waits until its snapshot sees them."""

    def add(self, key: tuple[Any, ...], token: str, xid: int) -> int:
        if xid:
            self.xids.add(xid)
        pos = self.positions.get(token)
        if pos is None:
            pos = self.positions[token] = len(self.keys)
            self.keys.append(key)
        return pos


_Gates = dict[Hashable, tuple[_Check, int] | None]


@dataclass(slots=True)
class _Delivery:
    change: Change
    matched: Matched
    gates: _Gates | None
    """Each matched owner's (check, position), or None when it may not see the row; None for a
    change delivered without a check."""


@dataclass(slots=True)
class _End:
    end: TransactionEnd
    stream: Stream | None


class RlsPipeline:
    """The ordered queue and its consumer task (created on first use, on the running loop).

    Args:
        match: change -> owners and their matching bindings.
        identity: owner -> its :class:`Identity`, or None once it unsubscribed.
        row_security: ``(schema, table)`` -> whether row level security is enabled (cached by the
            caller).
        check: ``(schema, table, key columns, identity, keys, xids)`` -> indexes of the visible
            keys, judged by a snapshot that sees the writing transactions *xids*; must not raise
            (failures count as not visible).
        deliver: hands one change to its (visible) owners.
        backlog: most changes queued by :meth:`put_change` before further ones are dropped.
        counters: where withheld deliveries are counted; by default counters of its own.
    """

    def __init__(
        self,
        *,
        match: Callable[[Change], Matched],
        identity: Callable[[Hashable], Identity | None],
        row_security: Callable[[str, str], Awaitable[bool]],
        check: Callable[
            [str, str, tuple[str, ...], Identity, list[tuple[Any, ...]], list[int]], Awaitable[set[int]]
        ],
        deliver: Callable[[Change, Matched], None],
        backlog: int = 10_000,
        run_items: int = 1024,
        counters: RlsCounters | None = None,
    ) -> None:
        self._match = match
        self._identity = identity
        self._row_security = row_security
        self._check = check
        self._deliver = deliver
        self._backlog = backlog
        self._run_items = run_items
        self._units: deque[_Unit] = deque()
        self._single = 0  # changes queued by put_change
        self._busy = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_drop_log = 0.0
        self.dropped = 0
        """Changes dropped by :meth:`put_change` because the backlog was full."""
        self.counters: RlsCounters = counters if counters is not None else _OwnCounters()
        self._removals = 0  # owners unsubscribed so far (see removed())

    # -- producers (loop thread) -------------------------------------------------------------

    def put_batch(self, batch: Sequence[Change | TransactionEnd], stream: Stream) -> None:
        """Queue a batch of the replication stream; ``stream.batch_done()`` is called once it was
        handled (delivered, or dropped by :meth:`close`)."""
        self._units.append(_Unit(batch, stream))
        self._kick()

    def put_change(self, change: Change) -> bool:
        """Queue one change (a cluster node's share of the leader's stream); False if dropped."""
        if self._single >= self._backlog:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log > 10:
                self._last_drop_log = now
                log.error(
                    "postgres changes: RLS checks fall behind (%d changes queued): change %s dropped "
                    "(%d so far)",
                    self._single,
                    change.id,
                    self.dropped,
                )
            return False
        self._single += 1
        self._units.append(_Unit((change,), None))
        self._kick()
        return True

    def removed(self) -> None:
        """An owner unsubscribed: changes matched before must skip it (checked per owner only
        for runs during which someone unsubscribed)."""
        self._removals += 1

    @property
    def idle(self) -> bool:
        """Nothing queued or being handled."""
        return not self._units and not self._busy

    async def close(self) -> None:
        """Stop the consumer; queued batches are released unconfirmed (the slot repeats them)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        while self._units:
            self._release(self._units.popleft())

    async def judge(self, changes: Sequence[Change]) -> None:
        """Match, check and deliver *changes* in order, now, outside the queue: a resume's replay,
        on a pipeline built for it (its ``deliver`` collects what the subscriber may see)."""
        await self._handle([_Unit(tuple(changes), None)])

    def _kick(self) -> None:
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tidings-cdc-rls")

    # -- consumer ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._units:
                self._wake.clear()
                await self._wake.wait()
                continue
            run: list[_Unit] = []
            items = 0
            while self._units and (not run or items + len(self._units[0].items) <= self._run_items):
                unit = self._units.popleft()
                run.append(unit)
                items += len(unit.items)
            self._busy = True
            try:
                await self._handle(run)
            except Exception:
                log.exception("postgres changes: RLS pipeline failed on a run of %d changes", items)
            finally:
                self._busy = False
                for unit in run:
                    self._release(unit)

    def _release(self, unit: _Unit) -> None:
        if unit.stream is not None:
            unit.stream.batch_done()
        else:
            self._single -= len(unit.items)

    async def _handle(self, run: list[_Unit]) -> None:
        removals = self._removals
        plan: list[_Delivery | _End] = []
        checks: dict[tuple[str, str, str], _Check] = {}
        for unit in run:
            for item in unit.items:
                if isinstance(item, TransactionEnd):
                    plan.append(_End(item, unit.stream))
                    continue
                try:
                    planned = await self._plan(item, checks)
                except Exception:
                    log.exception("postgres changes: matching change %s failed", item.id)
                    continue
                if planned is not None:
                    plan.append(planned)
        if checks:
            pending = list(checks.values())
            results = await asyncio.gather(
                *(
                    self._check(c.schema, c.table, c.key_columns, c.identity, c.keys, sorted(c.xids))
                    for c in pending
                )
            )
            for c, visible in zip(pending, results, strict=True):
                c.visible = visible
        for entry in plan:
            if isinstance(entry, _End):
                if entry.stream is not None:
                    entry.stream.confirm(entry.end.end_lsn)  # every change before it was delivered
                continue
            change, gates = entry.change, entry.gates
            if gates is None and removals == self._removals:
                owners = entry.matched  # unchecked, and nobody left meanwhile: as matched
                if owners:
                    try:
                        self._deliver(change, owners)
                    except Exception:
                        log.exception("delivering change %s failed", change.id)
                continue
            owners = {}
            for owner, bound in entry.matched.items():
                if self._identity(owner) is None:
                    continue  # unsubscribed meanwhile
                if gates is not None:
                    gate = gates.get(owner)
                    if gate is None or gate[1] not in gate[0].visible:
                        self.counters.changes_rls_hidden += 1
                        if log.isEnabledFor(logging.DEBUG):
                            log.debug(
                                "postgres changes: change %s of %s.%s not visible to a subscriber "
                                "with role %r (row level security)",
                                change.id,
                                change.schema,
                                change.table,
                                None if gate is None else gate[0].identity.role,
                            )
                        continue
                owners[owner] = bound
            if owners:
                try:
                    self._deliver(change, owners)
                except Exception:
                    log.exception("delivering change %s failed", change.id)

    async def _plan(self, change: Change, checks: dict[tuple[str, str, str], _Check]) -> _Delivery | None:
        if change.type == "DELETE":
            # Never RLS-checked; under row level security only the key of the old row is sent.
            old = change.data.get("old_record")
            if (
                isinstance(old, dict)
                and not set(old) <= set(change.primary_key)
                and await self._row_security(change.schema, change.table)
            ):
                change = key_only(change)
            matched = self._match(change)
            return _Delivery(change, matched, None) if matched else None
        matched = self._match(change)
        if not matched:
            return None
        if "record" not in change.data or not await self._row_security(change.schema, change.table):
            return _Delivery(change, matched, None)  # no row level security, or an error row without a record
        key = row_key(change)
        token = "" if key is None else json.dumps(key, default=str)
        gates: _Gates = {}
        for owner in matched:
            ident = self._identity(owner)
            if key is None or ident is None or ident.role is None:
                gates[owner] = None
                continue
            group = (change.schema, change.table, ident.claims_json)
            check = checks.get(group)
            if check is None:
                check = checks[group] = _Check(change.schema, change.table, change.primary_key, ident)
            gates[owner] = (check, check.add(key, token, change.xid))
        return _Delivery(change, matched, gates)
