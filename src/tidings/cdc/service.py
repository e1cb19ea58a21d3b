"""Postgres Changes: the service the server starts, subscribes channels to, and stops.

::

    changes = PostgresChanges(url, deliver=on_change)
    await changes.start()                 # checks, publication, slot, streaming
    await changes.subscribe(channel, [(id, params), ...], claims)
    ...
    changes.unsubscribe(channel)
    await changes.stop()

``deliver(matches, data, change_id)`` runs on the asyncio loop thread for each change that has
subscribers: *matches* maps each subscriber owner to the binding ids that matched (the ``ids`` of
the ``postgres_changes`` push), *data* is the spec 6.3 ``data`` object, *change_id* the change's
stable id. Owners whose bindings restrict columns (``select``, or column privileges of their role)
get their own call with a narrowed *data*; an owner appears in at most one call per change. Treat
*data* as read-only: the same object may be shared.

Guarantees: at-least-once. The slot's position is confirmed only after ``deliver`` returned for
every change of a transaction, so a restart (of Tidings or of PostgreSQL) re-delivers what was not
confirmed, with the same change ids. If ``deliver`` raises, the error is logged and the change counts
as handed over (retrying a failing callback would only fail again).

Setup, done by :meth:`PostgresChanges.start`:

* ``wal_level`` must be ``logical`` and the role must have REPLICATION (or be superuser).
* The publication (default ``supabase_realtime``) is created ``FOR ALL TABLES`` only if it does not
  exist; an existing one is used as it is, so a user who listed tables keeps that list.
* The slot (default ``tidings_slot``) is a permanent pgoutput slot, created if missing. It keeps
  WAL while Tidings is down: drop it (``pg_drop_replication_slot``) when retiring Tidings.

Authorization: subscriptions honour column privileges of the JWT ``role`` (when that role exists
in the database). Rows are checked against row level security policies with ``rls=True``
(``DB_RLS``, the default; ``rls=False`` is an opt-out, unsafe for tables with row level
security), as Supabase does:

* INSERT/UPDATE on a table with row level security enabled (``pg_class.relrowsecurity``, looked up
  at most every 2 s per table) reach a subscriber only if its role, with its JWT claims, may SELECT
  the row: in a transaction that is rolled back, ``SET LOCAL ROLE <role>``, ``request.jwt.claims``
  (plus ``request.jwt.claim.sub`` and ``request.jwt.claim.role``), then a SELECT by primary key.
  Subscribers with identical claims share one check; the rows of a run of queued changes are
  checked together (one transaction per table and claims). The check waits until its snapshot
  sees the transactions that wrote the rows (the stream can bring a commit before other sessions
  see it). The row is judged as it is when checked, not as it was committed (like Supabase): a
  row deleted meanwhile is delivered to nobody. Withheld deliveries are counted
  (:attr:`PostgresChanges.rls_hidden`) and logged at debug level.
  A role missing from the database, a role this connection may not ``SET ROLE`` to (connect as a
  superuser, or ``GRANT authenticated TO <tidings user>``), a subscriber without a ``role`` claim,
  or a check that fails (no SELECT privilege, a policy raising, 10 s statement timeout): not
  visible. Transient failures (the database unreachable) are retried; delivery waits meanwhile.
* DELETE is never checked; on a table with row level security its ``old_record`` keeps only the
  primary key (spec 6.5), and filters see only that.
* Tables without row level security are delivered as without the option (no query).

With ``rls=True`` every change goes through one ordered pipeline (:mod:`tidings.cdc.rls`), so
changes stay in stream order and a transaction is confirmed only after every change before it was
delivered. It holds the reader's batches until they are delivered, so the reader's in-flight limit
bounds memory. In a cluster the check happens on each delivering node (:meth:`dispatch`); there a
node that falls more than 10,000 changes behind drops changes (logged), as a slow Redis subscriber
would lose them. With ``rls=False`` changes are delivered straight from the reader's batches.

Setting PostgreSQL up, and what each option costs: ``docs/postgres-changes.md``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import orjson
import psycopg2

from tidings.cdc import catalog
from tidings.cdc.catalog import ColumnInfo, ConnectionPool, PostgresChangesError
from tidings.cdc.changelog import Candidates, ChangeLog, MemoryChangeLog
from tidings.cdc.changes import Change, TransactionEnd, narrow
from tidings.cdc.index import (
    Binding,
    BindingSpec,
    SubscriptionError,
    SubscriptionIndex,
    binding_id,
    no_tables_message,
    parse_binding,
)
from tidings.cdc.pgoutput import format_lsn
from tidings.cdc.replication import SESSION_OPTIONS, Batch, ReplicationStream
from tidings.cdc.rls import Identity, RlsCounters, RlsPipeline, identity_of
from tidings.logs import first_line
from tidings.protocol.errors import RESUME_INVALID
from tidings.protocol.filters import FilterError, bind_filter
from tidings.protocol.positions import ChangesReplay, ResumeRefused, position_of

__all__ = ["Deliver", "Forwarder", "PostgresChanges", "PostgresChangesError", "SubscriptionError"]

log = logging.getLogger("tidings.cdc")

T = TypeVar("T")

Deliver = Callable[[dict[Hashable, list[int]], dict[str, Any], str], None]
"""``deliver(matches, data, change_id)``."""

UNAVAILABLE = "UnableToConnectToProject: Realtime was unable to connect to the project database"
"""Subscription error when the database cannot be reached (transient: retry later)."""

_CACHE_SECONDS = 2.0  # how long subscribe() reuses catalog answers (bursts of joins)
_RLS_BACKLOG = 10_000  # changes a cluster node queues for RLS checks before it drops some
_WARN_SECONDS = 60.0  # the same RLS check failure is logged at most this often
_VISIBLE_WAIT_SECONDS = 10.0  # longest wait for a streamed commit to become visible to RLS checks
RECENT_CHANGES = 10_000  # change ids remembered to drop re-deliveries from the slot
_REPLAY_OWNER = "replay"  # the one owner of a replay's matching (see _replay)

Bound = dict[tuple[str, str], list[Binding]]
"""One subscriber's bindings by table (what a replay matches against)."""


class Forwarder(Protocol):
    """Takes streamed changes to every node (the cluster's broker) instead of delivering locally."""

    def change(self, change: Change) -> None:
        """Hand one change over."""

    def end(self, end_lsn: int, confirm: Callable[[int], None]) -> None:
        """A transaction ended: call ``confirm(end_lsn)`` once every change before it was handed over."""

    def started(self, start_lsn: int) -> None:
        """A stream starts at the slot position *start_lsn* (before any of its changes)."""


class PostgresChanges:
    """Streams INSERT/UPDATE/DELETE of published tables to matching subscribers.

    Args:
        database_url: libpq URL or key/value string.
        publication: publication to stream (created FOR ALL TABLES if missing).
        slot: permanent logical replication slot (created if missing).
        pool_size: connections (and worker threads) for catalog queries.
        ssl: require TLS (``sslmode=require``) unless the URL sets ``sslmode``.
        deliver: called on the loop thread for each change with subscribers (see module doc).
        rls: deliver INSERT/UPDATE of tables with row level security only to subscribers whose
            role and claims may SELECT the row (see module doc); costs a query per change (run)
            and distinct claims. On by default; False delivers every row to every subscriber of
            the table.
        counters: where RLS checks count (the node's metrics: ``changes_rls_hidden``,
            ``changes_rls_rechecks``); by default counters of its own.
        change_log: where streamed changes are logged for resumes (:mod:`tidings.cdc.changelog`);
            by default a :class:`MemoryChangeLog` of 10,000 changes, 16 MiB and 10 minutes per table.
    """

    def __init__(
        self,
        database_url: str,
        *,
        publication: str = "supabase_realtime",
        slot: str = "tidings_slot",
        pool_size: int = 5,
        ssl: bool = False,
        deliver: Deliver,
        rls: bool = True,
        counters: RlsCounters | None = None,
        change_log: ChangeLog | None = None,
    ) -> None:
        self.publication = publication
        self.slot = slot
        self._deliver = deliver
        self._pool_size = max(1, pool_size)
        try:
            self._dsn = catalog.connection_dsn(database_url, ssl=ssl)
            self._stream_dsn = catalog.connection_dsn(
                database_url,
                ssl=ssl,
                options=SESSION_OPTIONS,
                client_encoding="UTF8",
                application_name="tidings-cdc",
            )
        except psycopg2.ProgrammingError as exc:
            raise PostgresChangesError(f"invalid database URL: {first_line(exc)}") from None
        self._where = catalog.describe_dsn(self._dsn)
        self._index = SubscriptionIndex()
        self._pool: ConnectionPool | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stream: ReplicationStream | None = None
        self._running = False
        self._tables_cache: dict[tuple[str, str], tuple[float, list[tuple[str, str]]]] = {}
        self._columns_cache: dict[tuple[str, str, str | None], tuple[float, list[ColumnInfo]]] = {}
        self._timezone: str | None = None
        self._stopped = False
        self._held = False
        self._released = asyncio.Event()
        self.created_slot = False
        """True when this instance created the slot (so a start cut short can drop it again)."""
        self.delivered = 0
        """Changes handed to ``deliver`` (with at least one subscriber)."""
        self.forwarder: Forwarder | None = None
        """In a cluster: where streamed changes go instead of local delivery (see :class:`Forwarder`)."""
        self.rls = rls
        self.rls_queries = 0
        """RLS visibility checks run (one transaction each)."""
        self._identities: dict[Hashable, Identity] = {}
        self._rls_cache: dict[tuple[str, str], tuple[float, catalog.TableSecurity]] = {}
        self._warned: dict[tuple[str, ...], float] = {}
        if change_log is None:
            change_log = MemoryChangeLog(10_000, 16 << 20, 600.0)
        self.log: ChangeLog = change_log
        """Where streamed changes are logged before delivery, and what resumes and polls read."""
        self._wal_lsn = 0  # the database's WAL end when last asked (positions beyond it are bogus)
        self._table_waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()  # ids delivered lately (see _deliver_matched)
        self._pipeline: RlsPipeline | None = None
        if rls:
            self._pipeline = RlsPipeline(
                match=self._match,
                identity=self._identities.get,
                row_security=self._row_security,
                check=self._visible,
                deliver=self._deliver_matched,
                backlog=_RLS_BACKLOG,
                counters=counters,
            )

    # -- lifecycle ----------------------------------------------------------------------------

    async def check(self) -> None:
        """Check the server and create publication and slot if needed, without streaming yet.

        Lets a server fail at start on a bad set-up while it delays :meth:`start` until its
        clients had time to rejoin (their subscriptions then see what the slot replays).

        Raises:
            PostgresChangesError: with one line saying what is wrong.
        """
        try:
            await self._db(catalog.check_server)
            await self._db(catalog.ensure_publication, self.publication)
            # Last: a slot keeps WAL from now on, so nothing that can still fail comes after it.
            if await self._db(catalog.ensure_slot, self.slot):
                self.created_slot = True
        except psycopg2.Error as exc:
            raise PostgresChangesError(f"PostgreSQL at {self._where}: {first_line(exc)}") from None

    def hold(self) -> None:
        """Streaming starts later (``DB_RESUME_GRACE``): until :meth:`release`, :meth:`subscribe`
        registers at once but returns only then, so that whoever announces a subscription after
        it ("Subscribed to PostgreSQL") does so once changes flow."""
        self._held = True
        self._released.clear()

    def release(self) -> None:
        """Changes flow now (or will not: a start that failed, a stop): waiting subscriptions return."""
        self._held = False
        self._released.set()

    async def drop_slot(self) -> None:
        """Drop the slot unless something streams from it (a start cut short created it).

        Failures are logged, not raised: this runs while a start is being abandoned.
        """

        def drop() -> None:
            conn = catalog.connect(self._dsn)
            try:
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        "WHERE slot_name = %s AND NOT active",
                        (self.slot,),
                    )
            finally:
                conn.close()

        try:
            await asyncio.get_running_loop().run_in_executor(None, drop)
        except psycopg2.Error as exc:
            log.warning("could not drop replication slot %s: %s", self.slot, first_line(exc))
            return
        self.created_slot = False
        log.info("dropped replication slot %s: the start that created it did not finish", self.slot)

    async def start(self, *, timeout: float = 30.0) -> None:
        """Check the server, create publication and slot if needed, and start streaming.

        Returns once the replication stream is live: changes committed after that are delivered.

        Raises:
            PostgresChangesError: with one line saying what is wrong (connection refused,
                ``wal_level``, privileges, slot busy for longer than *timeout*, ...).
        """
        if self._running:
            return
        self._stopped = False
        loop = asyncio.get_running_loop()
        try:
            await self._db(catalog.check_server)
            await self._db(catalog.ensure_publication, self.publication)
            await self._db(catalog.ensure_slot, self.slot)
            self._stream = ReplicationStream(
                self._stream_dsn,
                slot=self.slot,
                publication=self.publication,
                loop=loop,
                on_batch=self._on_batch,
                on_session=functools.partial(self._session_started, loop),
            )
            self._running = True
            self._stream.start()
            await loop.run_in_executor(None, self._stream.wait_connected, timeout)
        except PostgresChangesError:
            await self._shutdown()
            raise
        except psycopg2.Error as exc:
            await self._shutdown()
            raise PostgresChangesError(f"PostgreSQL at {self._where}: {first_line(exc)}") from None

    async def stop(self, *, drain_timeout: float = 5.0) -> None:
        """Stop streaming and close connections.

        First drains: the transaction being read is read to its end, what was already read is
        delivered, and the slot is told, so a clean stop repeats nothing on the next start.
        """
        stream = self._stream
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        if stream is not None and self._running:
            stream.drain()
            while not (stream.drained and stream.inflight == 0) and loop.time() < deadline:
                await asyncio.sleep(0.01)  # queued batches are delivered meanwhile
        self._stopped = True
        self.release()
        if self._pipeline is not None:
            while not self._pipeline.idle and loop.time() < deadline:
                await asyncio.sleep(0.01)
            await self._pipeline.close()  # what is left is not confirmed: the slot repeats it
        await self._shutdown()

    async def stop_streaming(self) -> None:
        """Stop only the replication stream (a cluster node that lost the lease); subscriptions stay.

        Positions not yet confirmed are streamed again by whoever streams next.
        """
        self._running = False
        stream, self._stream = self._stream, None
        if stream is not None:
            await asyncio.get_running_loop().run_in_executor(None, stream.stop)

    @property
    def streaming(self) -> bool:
        """True from :meth:`start` until :meth:`stop_streaming` or :meth:`stop`."""
        return self._running

    async def _shutdown(self) -> None:
        self._running = False
        stream, self._stream = self._stream, None
        if stream is not None:
            await asyncio.get_running_loop().run_in_executor(None, stream.stop)
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    @property
    def connected(self) -> bool:
        """True while the replication stream is live."""
        return self._stream is not None and self._stream.connected

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        # Created on first use, so subscribe() also works before start().
        if self._pool is None or self._executor is None:
            self._executor = ThreadPoolExecutor(self._pool_size, thread_name_prefix="tidings-cdc-db")
            self._pool = ConnectionPool(self._dsn, self._pool_size)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._pool.run, fn, *args)

    # -- subscriptions ------------------------------------------------------------------------

    @staticmethod
    def binding_id(binding: dict[str, Any]) -> int:
        """A stable non-negative int < 2**31 for the binding's params (same params, same id)."""
        return binding_id(binding)

    async def subscribe(
        self, owner: Hashable, bindings: Sequence[tuple[int, dict[str, Any]]], claims: dict[str, Any] | None
    ) -> None:
        """Validate *bindings* and register them for *owner*, replacing its earlier ones.

        Each binding is ``(id, params)`` with params as the client sent them (spec 6.1). All are
        checked before any is registered: on error, *owner*'s registrations are unchanged. May be
        called before :meth:`start`: then the changes the stream replays at start are matched too.
        While the stream is held (:meth:`hold`) it returns only once it is released, with the
        bindings registered from the start.

        Raises:
            SubscriptionError: with the message for the client (``invalid column for filter x``,
                ``Unable to subscribe to changes with given parameters...``). Its ``transient``
                attribute is True when the database could not be reached (worth retrying).
        """
        compiled = await self.compile(bindings, claims)
        self._index.remove(owner)
        for table, binding in compiled:
            self._index.add(owner, table, binding)
        if self._pipeline is not None:
            self._identities[owner] = identity_of(claims)
        if self._held:
            await self._released.wait()

    async def compile(
        self, bindings: Sequence[tuple[int, dict[str, Any]]], claims: dict[str, Any] | None
    ) -> list[tuple[tuple[str, str], Binding]]:
        """Validate *bindings* against the database for a subscriber with *claims*: ``(table,
        binding)`` for every published table each one covers (see :meth:`subscribe` for errors)."""
        specs = [(bid, parse_binding(params)) for bid, params in bindings]
        role = claims.get("role") if isinstance(claims, dict) else None
        if not isinstance(role, str):
            role = None
        compiled: list[tuple[tuple[str, str], Binding]] = []
        try:
            if self._timezone is None:
                self._timezone = await self._db(catalog.server_timezone)
            for bid, spec in specs:
                tables = await self._published(spec.schema, spec.table)
                if not tables:
                    raise SubscriptionError(no_tables_message(spec))
                for table in tables:
                    columns = await self._columns(table, role)
                    compiled.append((table, _compile(bid, spec, columns, self._timezone)))
        except (psycopg2.Error, PostgresChangesError) as exc:
            log.warning("postgres changes subscription failed: %s", first_line(exc))
            raise SubscriptionError(UNAVAILABLE, transient=True) from None
        return compiled

    def unsubscribe(self, owner: Hashable) -> None:
        """Drop every binding of *owner* (no error if it has none)."""
        self._index.remove(owner)
        if self._identities.pop(owner, None) is not None and self._pipeline is not None:
            self._pipeline.removed()

    @property
    def index(self) -> SubscriptionIndex:
        """The subscription index (read-only use: sizes, tables)."""
        return self._index

    async def _published(self, schema: str, table: str) -> list[tuple[str, str]]:
        key = (schema, table)
        hit = self._tables_cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < _CACHE_SECONDS:
            return hit[1]
        tables = await self._db(catalog.publication_tables, self.publication, schema, table)
        if tables:  # a miss is not cached: the user may be adding the table right now
            self._tables_cache[key] = (time.monotonic(), tables)
        return tables

    async def _columns(self, table: tuple[str, str], role: str | None) -> list[ColumnInfo]:
        key = (table[0], table[1], role)
        hit = self._columns_cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < _CACHE_SECONDS:
            return hit[1]
        columns = await self._db(catalog.table_columns, table[0], table[1], role)
        self._columns_cache[key] = (time.monotonic(), columns)
        return columns

    async def slot_lag_bytes(self) -> int | None:
        """WAL bytes between the server's current position and the slot's confirmed one.

        ``None`` when the slot does not exist or the database cannot be reached.
        """
        try:
            return await self._db(catalog.slot_lag, self.slot)
        except (psycopg2.Error, PostgresChangesError):
            return None

    # -- resuming and polling ----------------------------------------------------------------

    async def resume(
        self, owner: Hashable, since: str | None, epoch: str | None, *, max_changes: int, max_bytes: int
    ) -> ChangesReplay:
        """The changes after *since* that *owner*'s bindings (subscribed just before) match now.

        Filters, ``select``, column privileges and RLS checks apply with the owner's current
        claims, as to live changes. *owner* must be subscribed (:meth:`subscribe`) before this is
        called: every change after the returned ``position`` then reaches it live, every change
        up to it that matches is in the replay (``recovered``) or the replay says it is not.

        Raises:
            ResumeRefused: *since* is ahead of the database.
        """
        return await self._replay(
            self._index.bindings_of(owner), self._identities.get(owner), since, epoch, max_changes, max_bytes
        )

    async def poll(
        self,
        bindings: Sequence[tuple[int, dict[str, Any]]],
        claims: dict[str, Any] | None,
        since: str | None,
        epoch: str | None,
        *,
        max_changes: int,
        max_bytes: int,
        timeout: float = 0.0,
        stop: asyncio.Future[None] | None = None,
    ) -> ChangesReplay:
        """What a resume of these bindings would replay, for a client with *claims* that holds no
        subscription (``GET /api/changes``). A page cut by the limits ends at its last change
        (``truncated``: ask again from there). With nothing to send and a *timeout*, waits up to
        that long for a matching change (or until *stop* is done).

        Raises:
            SubscriptionError: bad bindings (as :meth:`subscribe`).
            ResumeRefused: *since* is ahead of the database.
        """
        bound: Bound = {}
        for table, binding in await self.compile(bindings, claims):
            bound.setdefault(table, []).append(binding)
        ident = identity_of(claims) if self._pipeline is not None else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            replay = await self._replay(bound, ident, since, epoch, max_changes, max_bytes, page=True)
            remaining = deadline - loop.time()
            if replay.items or since is None or not replay.recovered or remaining <= 0:
                return replay
            if stop is not None and stop.done():
                return replay
            await self.wait_for_change(list(bound), remaining, stop)

    async def wait_for_change(
        self, tables: Sequence[tuple[str, str]], timeout: float, stop: asyncio.Future[None] | None = None
    ) -> None:
        """Return once a change of one of *tables* was logged (or received), after *timeout*, or
        once *stop* is done."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        for table in tables:
            self._table_waiters.setdefault(table, []).append(fut)
        wake: set[asyncio.Future[Any]] = {fut} if stop is None else {fut, stop}
        try:
            await asyncio.wait(wake, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for table in tables:
                waiting = self._table_waiters.get(table)
                if waiting is not None and fut in waiting:
                    waiting.remove(fut)
                    if not waiting:
                        del self._table_waiters[table]

    async def _replay(
        self,
        bound: Bound,
        ident: Identity | None,
        since: str | None,
        epoch: str | None,
        max_changes: int,
        max_bytes: int,
        page: bool = False,
    ) -> ChangesReplay:
        state = await self.log.state()
        current = state.epoch or ""
        if since is not None and since > state.baseline:
            await self._refuse_if_ahead(since)
        # The baseline is read before the tables: every change up to it is in the log now (or
        # trimmed, which the reads tell), every later one is logged after the owner subscribed.
        position = max(state.baseline, since or "")
        if since is None:
            return ChangesReplay([], True, position, current)
        if not self.log.enabled:
            return ChangesReplay([], False, position, current, "the change log is off (DB_CHANGE_LOG_SIZE=0)")
        if state.epoch is None:
            return ChangesReplay([], False, position, current, "the change log has not started yet")
        reason = ""
        if epoch is not None and epoch != state.epoch:
            reason = "the change log started over (another epoch): changes may be missing"
        elif since < state.after:
            reason = "the change log does not reach back to this position"
        changes: list[Change] = []
        size = max(1, self.log.size)
        for table, bindings in bound.items():
            candidates: list[Candidates] | None = []
            for b in bindings:
                f = b.filter
                if f.index_column is None or f.index_keys is None or f.index_key is None:
                    candidates = None
                    break
                assert candidates is not None
                candidates.append(Candidates(f.index_column, f.index_keys, f.index_key))
            read = await self.log.read(table, since, size, candidates)
            if not read.complete and not reason:
                reason = "changes after this position were trimmed from the change log"
            changes += [c for c in read.changes if c.position <= state.baseline]
        if len(bound) > 1:
            changes.sort(key=lambda c: c.position)
        items: list[tuple[str, list[int], dict[str, Any]]] = []
        total = 0
        cut = False

        def collect(change: Change, matched: dict[Hashable, list[Binding]]) -> None:
            nonlocal total, cut
            bindings = matched.get(_REPLAY_OWNER)
            if not bindings or cut:
                return
            ids, data = _view(change, bindings)
            total += len(orjson.dumps(data))
            if len(items) >= max_changes or (total > max_bytes and items):
                cut = True
                return
            items.append((change.position, ids, data))

        def match(change: Change) -> dict[Hashable, list[Binding]]:
            hits = [
                b
                for b in bound.get((change.schema, change.table), ())
                if change.type in b.events and b.filter.matches(change.row)
            ]
            return {_REPLAY_OWNER: hits} if hits else {}

        if self._pipeline is not None:
            checker = RlsPipeline(
                match=match,
                identity=lambda _: ident,
                row_security=self._row_security,
                check=self._visible,
                deliver=collect,
                counters=self._pipeline.counters,
            )
            await checker.judge(changes)
        else:
            for change in changes:
                matched = match(change)
                if matched:
                    collect(change, matched)
        if cut:
            if page:
                return ChangesReplay(items, not reason, items[-1][0], current, reason, truncated=True)
            reason = reason or (
                f"more changes to replay than the limits allow ({max_changes} changes, {max_bytes} bytes)"
            )
        return ChangesReplay(items, not reason, position, current, reason)

    async def _refuse_if_ahead(self, since: str) -> None:
        """Refuse a position beyond the database's WAL: no stream of this database produced it."""
        lsn = position_of(since)[0]
        if lsn <= self._wal_lsn:
            return
        try:
            self._wal_lsn = max(self._wal_lsn, await self._db(catalog.current_wal_lsn))
        except (psycopg2.Error, PostgresChangesError):
            return  # cannot tell: the log's own answer stands (nothing to replay after it)
        if lsn > self._wal_lsn:
            raise ResumeRefused(
                f"{RESUME_INVALID}: position {since} is ahead of the database "
                f"(its WAL ends at {format_lsn(self._wal_lsn)})"
            )

    # -- delivery (loop thread) ---------------------------------------------------------------

    def _on_batch(self, batch: Batch) -> None:
        stream = self._stream
        handed = False
        try:
            if not self._running or stream is None:
                return
            forwarder = self.forwarder
            self._log_batch(batch)  # before delivery, and (cluster) queued before the publishes
            if forwarder is None and self._pipeline is not None:
                # RLS checks: the pipeline delivers in order, confirms, and releases the batch.
                self._pipeline.put_batch(batch, stream)
                handed = True
                return
            for item in batch:
                if isinstance(item, TransactionEnd):
                    if forwarder is not None:
                        # Confirmed once the cluster broker took every change before it.
                        forwarder.end(item.end_lsn, stream.confirm)
                    else:
                        # Every change of this transaction was handed over (batches arrive in order).
                        stream.confirm(item.end_lsn)
                    continue
                try:
                    if forwarder is not None:
                        forwarder.change(item)
                    else:
                        self._dispatch(item)
                except Exception:
                    log.exception("delivering change %s failed", item.id)
        finally:
            if stream is not None and not handed:
                stream.batch_done()

    def dispatch(self, change: Change) -> None:
        """Match *change* against this process's subscriptions and deliver it.

        Called for the changes this process streams, or (in a cluster) for changes the
        replication leader streamed and the broker brought here. With RLS checks the change is
        queued and delivered (in order, after its checks) on the loop; must then be called on
        the loop thread.
        """
        if self._table_waiters:
            self._wake_table((change.schema, change.table))
        if self._pipeline is not None:
            if not self._stopped:
                self._pipeline.put_change(change)
            return
        self._dispatch(change)

    def _log_batch(self, batch: Batch) -> None:
        """Log a batch before any of it is delivered: a resume that reads the log after its
        subscription was made then misses nothing that was delivered before it."""
        change_log, waiters = self.log, self._table_waiters
        for item in batch:
            if isinstance(item, TransactionEnd):
                change_log.transaction_end(item.end_lsn)
                continue
            try:
                change_log.append(item)
            except Exception:
                log.exception("logging change %s failed", item.id)
            if waiters:
                self._wake_table((item.schema, item.table))

    def _session_started(self, loop: asyncio.AbstractEventLoop, start_lsn: int) -> None:
        # The reader thread: before any batch of the session is handed to the loop.
        loop.call_soon_threadsafe(self._stream_started, start_lsn)

    def _stream_started(self, start_lsn: int) -> None:
        """A replication session streams from *start_lsn*: the log continues there, or starts over."""
        self.log.begin(start_lsn)
        if self.forwarder is not None:
            self.forwarder.started(start_lsn)

    def _wake_table(self, table: tuple[str, str]) -> None:
        for fut in self._table_waiters.pop(table, ()):
            if not fut.done():
                fut.set_result(None)

    def _match(self, change: Change) -> dict[Hashable, list[Binding]]:
        return self._index.match((change.schema, change.table), change.type, change.row)

    def _dispatch(self, change: Change) -> None:
        matched = self._match(change)
        if matched:
            self._deliver_matched(change, matched)

    def _deliver_matched(self, change: Change, matched: dict[Hashable, list[Binding]]) -> None:
        # At least once from the slot (a restart, a new leader): a change seen recently is dropped
        # here, once for all its deliveries (not per call: one change may make several).
        recent = self._recent
        if change.id in recent:
            return
        recent[change.id] = None
        if len(recent) > RECENT_CHANGES:
            recent.popitem(last=False)
        groups: dict[frozenset[str] | None, dict[Hashable, list[int]]] = {}
        for owner, bound in matched.items():
            groups.setdefault(_visible_columns(bound), {})[owner] = sorted({b.id for b in bound})
        self.delivered += 1
        for visible, owners in groups.items():
            data = change.data if visible is None else narrow(change.data, visible)
            self._deliver(owners, data, change.id)

    # -- RLS checks (loop thread; the SQL runs in the pool) -------------------------------------

    async def _row_security(self, schema: str, table: str) -> bool:
        key = (schema, table)
        hit = self._rls_cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < _CACHE_SECONDS:
            return hit[1].enabled
        try:
            security = await self._db_retrying(catalog.table_security, schema, table)
        except Exception as exc:
            self._warn(
                ("relrowsecurity", schema, table),
                "cannot tell whether %s.%s has row level security (%s): checking its rows",
                schema,
                table,
                first_line(exc),
            )
            security = catalog.TableSecurity(True, {})
        self._rls_cache[key] = (time.monotonic(), security)
        return security.enabled

    async def _visible(
        self,
        schema: str,
        table: str,
        key_columns: tuple[str, ...],
        ident: Identity,
        keys: list[tuple[Any, ...]],
        xids: list[int],
    ) -> set[int]:
        """Indexes of *keys* whose rows *ident* may select; failures count as not visible.

        The check is run again, with backoff, while a transaction of *xids* is not yet visible to
        its snapshot (the stream can bring a commit before other sessions see it); after
        ``_VISIBLE_WAIT_SECONDS`` the rows are judged as that snapshot sees them.
        """
        if ident.role is None:
            return set()
        hit = self._rls_cache.get((schema, table))  # filled by _row_security for this run
        key_types = hit[1].key_types if hit is not None else {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _VISIBLE_WAIT_SECONDS
        delay = 0.001
        try:
            while True:
                self.rls_queries += 1
                try:
                    return await self._db_retrying(
                        catalog.visible_keys,
                        schema,
                        table,
                        key_columns,
                        key_types,
                        ident.role,
                        ident.claims_json,
                        keys,
                        xids,
                    )
                except catalog.NotYetVisible:
                    self._counters.changes_rls_rechecks += 1
                    if loop.time() + delay > deadline:
                        self._warn(
                            ("not-yet-visible", schema, table),
                            "transactions writing %s.%s stayed invisible to other sessions for %.0f s "
                            "after their commit streamed (a synchronous standby not answering?): "
                            "their rows are judged as other sessions see them now",
                            schema,
                            table,
                            _VISIBLE_WAIT_SECONDS,
                        )
                        xids = []
                        continue
                await asyncio.sleep(delay)
                delay = min(0.05, delay * 2)
        except Exception as exc:  # whatever went wrong, the row is not shown
            self._warn(
                ("visible", schema, table, ident.role, type(exc).__name__),
                "RLS check of %s.%s for role %r failed (%s): not delivered to its subscribers",
                schema,
                table,
                ident.role,
                first_line(exc),
            )
            return set()

    async def _db_retrying(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`_db`, retrying (with backoff, until it works) while the database is unreachable.

        Raises:
            psycopg2.Error: a failure that is not an outage (and whatever *fn* raises).
        """
        delay = 0.2
        shut_down = 0
        while True:
            try:
                return await self._db(fn, *args)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                self._warn(("db",), "RLS checks wait for the database: %s", first_line(exc))
            except RuntimeError:
                # The executor was shut down under us (a failed start): _db makes a new one.
                shut_down += 1
                if shut_down > 3:
                    raise
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    def _warn(self, key: tuple[str, ...], message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -_WARN_SECONDS) >= _WARN_SECONDS:
            self._warned[key] = now
            log.warning("postgres changes: " + message, *args)

    @property
    def _counters(self) -> RlsCounters:
        assert self._pipeline is not None  # only RLS checks count
        return self._pipeline.counters

    @property
    def rls_hidden(self) -> int:
        """Deliveries withheld by RLS checks: (change, subscriber) pairs whose row it may not see."""
        return 0 if self._pipeline is None else self._pipeline.counters.changes_rls_hidden

    @property
    def rls_rechecks(self) -> int:
        """RLS checks run again because their snapshot did not see the writing transaction yet."""
        return 0 if self._pipeline is None else self._pipeline.counters.changes_rls_rechecks

    @property
    def rls_dropped(self) -> int:
        """Changes a cluster node dropped because its RLS checks fell too far behind."""
        return 0 if self._pipeline is None else self._pipeline.dropped


def _visible_columns(bound: list[Binding]) -> frozenset[str] | None:
    """What an owner whose bindings *bound* matched may see: the union of theirs (None: all)."""
    if all(b.visible is not None for b in bound):
        return frozenset().union(*(b.visible for b in bound if b.visible is not None))
    return None


def _view(change: Change, bound: list[Binding]) -> tuple[list[int], dict[str, Any]]:
    """The binding ids and the (narrowed) data one owner gets for *change* (as delivered live)."""
    visible = _visible_columns(bound)
    return sorted({b.id for b in bound}), change.data if visible is None else narrow(change.data, visible)


def _compile(bid: int, spec: BindingSpec, columns: list[ColumnInfo], timezone: str) -> Binding:
    """Bind one binding to one table's columns (only columns the role may select count)."""
    selectable = [c for c in columns if c.selectable]
    try:
        bound = bind_filter(spec.conditions, {c.name: c.filter_typname for c in selectable}, timezone)
    except FilterError as exc:
        raise SubscriptionError(str(exc)) from None
    visible: frozenset[str] | None = None
    if spec.select is not None:
        names = {c.name for c in selectable}
        for name in spec.select:
            if name not in names:
                raise SubscriptionError(f"invalid column for select {name}")
        visible = frozenset(spec.select) | {c.name for c in selectable if c.primary_key}
    elif len(selectable) != len(columns):
        visible = frozenset(c.name for c in selectable)
    return Binding(bid, spec.events, bound, visible)
