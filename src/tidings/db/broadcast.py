"""Broadcast from Database: rows inserted into ``realtime.messages`` become channel broadcasts.

``realtime.send()``, ``realtime.send_binary()`` and ``realtime.broadcast_changes()`` insert rows into
``realtime.messages``. This module streams those INSERTs (logical replication, pgoutput) and hands
each row to a ``publish`` callback with the signature of :meth:`tidings.node.Node.publish_broadcast`::

    stream = await start_broadcast_from_database(config, node.publish_broadcast, metrics=node.metrics)
    ...
    await stream.wait_ready(60)          # replication_ready joins
    await stream.stop()

A row becomes a broadcast on its ``topic`` (the private group when ``private``), with user event
``event``, message id (``meta.id``) the row's ``id`` and payload ``payload`` (JSON), or
``binary_payload`` as ``bytes`` (a binary user broadcast: vsn 2.0.0 frame kind 4, payload encoding
0; vsn 1.0.0 clients do not get it).

**Stream.** Publication :data:`PUBLICATION` ``FOR TABLE realtime.messages`` (created with
``publish_via_partition_root``, recreated in one transaction when it lists anything else) and a
PERMANENT pgoutput slot of its own (``DB_MESSAGES_SLOT``), read by the replication reader of
Postgres Changes (:class:`tidings.cdc.replication.ReplicationStream`) with :class:`MessageDecoder`.
Supabase uses a temporary slot and loses what was sent while it was down; here a transaction's
position is confirmed to the slot only once ``publish`` reported every row of it stored (its
``done`` callback), so a restart, a crash or a cluster failover loses nothing: rows sent meanwhile
are delivered when Tidings streams again. A clean :meth:`BroadcastFromDatabase.stop` confirms what
it delivered, so nothing is repeated either; after a crash the unconfirmed rows come again with the
same ids, and the broker's de-duplication by message id drops those it still remembers.

**Transactions.** Logical decoding sends committed transactions only: a ``realtime.send`` in a
transaction that rolls back delivers nothing, one that commits delivers once.

**Limits**, as for client broadcasts: a payload over ``MAX_PAYLOAD_SIZE_KB`` (JSON text, or the
binary payload), a topic over ``MAX_TOPIC_LENGTH`` or an event over ``MAX_EVENT_LENGTH`` bytes
(binary frames: 255 bytes for ``realtime:<topic>`` and the event) is dropped, counted and logged
(rate-limited); so is a row without ``event``, ``private`` or a payload. ``DB_BROADCAST_RATE`` rows
per second are delivered at most (a one-second burst); beyond it the stream waits and PostgreSQL
keeps the rest in the slot: a backlog is delivered late, never dropped.

**Batches.** The reader thread decodes rows (JSON parsed there) and hands them to the loop in
batches; the only per-row work on the loop is the ``publish`` call.

**Cluster.** :meth:`BroadcastFromDatabase.follow` streams only while a lease holder (the node's
:class:`tidings.cdc.cluster.ChangeFeedLeader`) holds the change-feed lease; the slot itself admits
one reader at a time, and a new leader resumes from the last confirmed position.

**replication_ready.** :attr:`BroadcastFromDatabase.ready` is True while the stream is live (on a
cluster node that does not stream: while the slot is streamed by another node), and
:meth:`BroadcastFromDatabase.wait_ready` waits for it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
import psycopg2
import psycopg2.errors

from tidings.broker.base import FAILED, PublishDone
from tidings.cdc import catalog
from tidings.cdc.catalog import ConnectionPool, PostgresChangesError
from tidings.cdc.changes import TransactionEnd
from tidings.cdc.pgoutput import Begin, Commit, Insert, Relation, decode
from tidings.cdc.replication import SESSION_OPTIONS, ReplicationStream
from tidings.db.partitions import PartitionMaintenance
from tidings.limits import TokenBucket
from tidings.logs import Clipped, first_line

if TYPE_CHECKING:
    from tidings.config import Config

__all__ = [
    "DEFAULT_RATE",
    "DEFAULT_SLOT",
    "PUBLICATION",
    "REPLICATION_READY_TIMEOUT",
    "BroadcastCounters",
    "BroadcastFromDatabase",
    "BroadcastFromDatabaseError",
    "LeaseHolder",
    "MessageDecoder",
    "MessageRow",
    "Publish",
    "ensure_messages_publication",
    "messages_slot",
    "start_broadcast_from_database",
]

log = logging.getLogger("tidings.db.broadcast")

PUBLICATION: Final = "supabase_realtime_messages_publication"
"""Supabase's name for the publication of ``realtime.messages``."""
DEFAULT_SLOT: Final = "tidings_slot_messages"
"""The slot of this stream with the default settings (``DB_SLOT`` ``tidings_slot`` + ``_messages``;
see :func:`messages_slot`); never Postgres Changes' own slot."""
DEFAULT_RATE: Final = 10_000
"""Default ``DB_BROADCAST_RATE``: rows delivered per second at most."""
REPLICATION_READY_TIMEOUT: Final = 60.0
"""Seconds a ``replication_ready`` join waits for the stream before its channel is closed."""

BINARY_NAME_BYTES: Final = 255
"""Longest ``realtime:<topic>`` and event of a binary (kind 4) frame."""
_TOPIC_PREFIX_BYTES = len("realtime:")

# Why a row was not delivered (MessageRow.problem).
TOO_LARGE: Final = "payload_too_large"
NAME_TOO_LONG: Final = "name_too_long"
MALFORMED: Final = "malformed"

_COLUMNS = ("id", "topic", "event", "private", "payload", "binary_payload")


class BroadcastFromDatabaseError(RuntimeError):
    """Broadcast from Database cannot run against this database; one line saying why."""


class Publish(Protocol):
    """``publish(private, sub_topic, event, payload, msg_id, done=done)``: what
    :meth:`tidings.node.Node.publish_broadcast` accepts. ``done(seq)`` once the broker stored it;
    ``done(FAILED)`` when it could not (``DUPLICATE``, 0: the id was published already)."""

    def __call__(
        self,
        private: bool,
        sub_topic: str,
        event: str,
        payload: Any,
        msg_id: str | None = ...,
        *,
        done: PublishDone | None = ...,
    ) -> None: ...


class BroadcastCounters(Protocol):
    """Where the stream counts (:class:`tidings.metrics.NodeMetrics` has these fields)."""

    db_broadcasts: int
    db_broadcasts_too_large: int
    db_broadcasts_names_too_long: int
    db_broadcasts_malformed: int
    db_broadcasts_throttled: int


class _OwnCounters:
    """Counters of a stream built without node metrics (tests, tools)."""

    def __init__(self) -> None:
        self.db_broadcasts = 0
        self.db_broadcasts_too_large = 0
        self.db_broadcasts_names_too_long = 0
        self.db_broadcasts_malformed = 0
        self.db_broadcasts_throttled = 0


class LeaseHolder(Protocol):
    """A cluster lease (``ChangeFeedLeader``): ``leader`` is True while this node holds it."""

    leader: bool


# --------------------------------------------------------------------------------------------
# Decoding (reader thread; pure)
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class MessageRow:
    """One inserted row of ``realtime.messages``, ready to publish (or why not: ``problem``)."""

    id: str
    topic: str
    event: str
    private: bool
    payload: Any
    """The JSON payload parsed, or ``bytes`` for ``binary_payload``."""
    size: int
    """Bytes of the payload (JSON text, or binary)."""
    problem: str | None = None
    """``None`` (deliver), or :data:`TOO_LARGE`, :data:`NAME_TOO_LONG`, :data:`MALFORMED`."""


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class MessageDecoder:
    """pgoutput -> :class:`MessageRow` / :class:`TransactionEnd` for ``realtime.messages``.

    Only INSERTs of relations carrying the message columns count (``realtime.messages``, or its
    partitions when the publication does not publish via the root); UPDATE, DELETE and TRUNCATE
    are ignored. Values arrive as text (``bytea_output=hex``, see ``SESSION_OPTIONS``). Limits are
    checked here, before the JSON is parsed, so an oversized row costs no parse.

    Args:
        max_payload_bytes: ``MAX_PAYLOAD_SIZE_KB`` in bytes.
        max_topic_bytes: ``MAX_TOPIC_LENGTH``.
        max_event_bytes: ``MAX_EVENT_LENGTH``.
    """

    def __init__(
        self, max_payload_bytes: int, max_topic_bytes: int = 255, max_event_bytes: int = 255
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.max_topic_bytes = max_topic_bytes
        self.max_event_bytes = max_event_bytes
        self._relations: dict[int, tuple[int, ...]] = {}
        self._begin: Begin | None = None
        self._rows = 0

    @property
    def in_transaction(self) -> bool:
        """True between a Begin and its Commit."""
        return self._begin is not None

    def feed(self, payload: bytes) -> MessageRow | TransactionEnd | None:
        """Decode one pgoutput message."""
        msg = decode(payload)
        if isinstance(msg, Insert):
            return self._row(msg)
        if isinstance(msg, Begin):
            self._begin = msg
            self._rows = 0
            return None
        if isinstance(msg, Commit):
            self._begin = None
            return TransactionEnd(msg.commit_lsn, msg.end_lsn, self._rows)
        if isinstance(msg, Relation):
            names = [c.name for c in msg.columns]
            self._relations[msg.relation_id] = tuple(names.index(c) if c in names else -1 for c in _COLUMNS)
        return None

    def _row(self, msg: Insert) -> MessageRow | None:
        where = self._relations.get(msg.relation_id)
        if where is None:
            raise ValueError(f"insert into relation {msg.relation_id} before its Relation message")
        self._rows += 1
        values, count = msg.new, len(msg.new)
        row_id, topic, event, private, text, hexed = (
            v if isinstance(v := (values[at] if 0 <= at < count else None), str) else None for at in where
        )
        row = MessageRow(row_id or "", topic or "", event or "", private == "t", None, 0)
        if row_id is None or topic is None or event is None or private is None:
            row.problem = MALFORMED
            return row
        if hexed is not None and text is None:
            row.size = (len(hexed) - 2) // 2
            binary = True
        elif text is not None and hexed is None:
            row.size = _utf8_len(text)
            binary = False
        else:  # neither (or both: the table's check forbids it)
            row.problem = MALFORMED
            return row
        if row.size > self.max_payload_bytes:
            row.problem = TOO_LARGE
            return row
        topic_bytes, event_bytes = _utf8_len(topic), _utf8_len(event)
        if topic_bytes > self.max_topic_bytes or event_bytes > self.max_event_bytes:
            row.problem = NAME_TOO_LONG
            return row
        if binary:
            if topic_bytes + _TOPIC_PREFIX_BYTES > BINARY_NAME_BYTES or event_bytes > BINARY_NAME_BYTES:
                row.problem = NAME_TOO_LONG
                return row
            try:
                row.payload = bytes.fromhex(hexed[2:]) if hexed is not None else b""
            except ValueError:
                row.problem = MALFORMED
            return row
        try:
            row.payload = orjson.loads(text) if text is not None else None
        except orjson.JSONDecodeError:
            row.problem = MALFORMED
        return row


# --------------------------------------------------------------------------------------------
# The publication (blocking; worker threads)
# --------------------------------------------------------------------------------------------

_CREATE_PUBLICATION = (
    "CREATE PUBLICATION {name} FOR TABLE realtime.messages WITH (publish_via_partition_root = true)"
)


def _publication_is_messages_only(conn: Any, name: str) -> bool | None:
    """True when *name* publishes exactly ``realtime.messages`` INSERTs; None when it does not exist."""
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('server_version_num')::int")
        ((version,),) = cur.fetchall()
        extra = (
            ", (SELECT count(*) FROM pg_publication_namespace n WHERE n.pnpubid = p.oid), "
            "(SELECT count(*) FROM pg_publication_rel r WHERE r.prpubid = p.oid "
            "AND (r.prqual IS NOT NULL OR r.prattrs IS NOT NULL))"
            if version >= 150000
            else ", 0, 0"
        )
        cur.execute(
            "SELECT p.puballtables, p.pubinsert, "
            "ARRAY(SELECT r.prrelid = 'realtime.messages'::regclass FROM pg_publication_rel r "
            f"WHERE r.prpubid = p.oid){extra} FROM pg_publication p WHERE p.pubname = %s",
            (name,),
        )
        rows = cur.fetchall()
    if not rows:
        return None
    all_tables, inserts, rels, schemas, restricted = rows[0]
    return bool(not all_tables and inserts and list(rels) == [True] and not schemas and not restricted)


def ensure_messages_publication(conn: Any, name: str = PUBLICATION) -> str:
    """Make publication *name* publish ``realtime.messages`` and nothing else.

    Created ``FOR TABLE realtime.messages WITH (publish_via_partition_root = true)`` when missing;
    dropped and created again in one transaction (so a slot decoding across the change always sees
    one) when it lists other tables, a schema, a row filter or column list, or does not publish
    INSERTs. One that Supabase Realtime made (without ``publish_via_partition_root``) is kept: its
    changes arrive as the partitions' rows, which :class:`MessageDecoder` reads the same.

    Returns:
        ``"kept"``, ``"created"`` or ``"recreated"``.

    Raises:
        BroadcastFromDatabaseError: this role may not create it (one line with what to run).
    """
    quoted = str(psycopg2.extensions.quote_ident(name, conn))
    for _attempt in range(3):
        state = _publication_is_messages_only(conn, name)
        if state:
            return "kept"
        create = _CREATE_PUBLICATION.format(name=quoted)
        try:
            with conn.cursor() as cur:
                if state is None:
                    cur.execute(create)
                else:
                    cur.execute(f"BEGIN; DROP PUBLICATION IF EXISTS {quoted}; {create}; COMMIT")
        except psycopg2.errors.DuplicateObject:
            _end_transaction(conn)
            continue  # another node made it meanwhile: look again
        except psycopg2.errors.InsufficientPrivilege as exc:
            _end_transaction(conn)
            raise BroadcastFromDatabaseError(
                f"cannot {'create' if state is None else 'recreate'} publication {name} "
                f"({first_line(exc)}): the role needs CREATE on the database and to own "
                "realtime.messages"
                + ("" if state is None else f" and {name}")
                + f"; or an administrator runs: DROP PUBLICATION IF EXISTS {quoted}; {create}"
            ) from None
        except psycopg2.Error:
            _end_transaction(conn)
            raise
        if state is None:
            log.info("created publication %s FOR TABLE realtime.messages", name)
            return "created"
        log.warning("publication %s listed other tables than realtime.messages: recreated it", name)
        return "recreated"
    raise BroadcastFromDatabaseError(f"publication {name} keeps being changed by someone else")


def _end_transaction(conn: Any) -> None:
    """Leave the failed ``BEGIN; ...`` of an autocommit connection (``rollback()`` would not)."""
    if conn.closed:
        return
    if conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        with conn.cursor() as cur:
            cur.execute("ROLLBACK")


def _slot_active(conn: Any, slot: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        rows = cur.fetchall()
    return bool(rows and rows[0][0])


def _run_once(dsn: str, fn: Callable[[Any], None]) -> None:
    conn = catalog.connect(dsn)
    try:
        fn(conn)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# Confirmation: a transaction's position goes to the slot once every row of it was stored
# --------------------------------------------------------------------------------------------


class _Transaction:
    __slots__ = ("end_lsn", "ledger", "waiting")

    def __init__(self, ledger: _Ledger) -> None:
        self.ledger = ledger
        self.waiting = 0
        self.end_lsn = 0  # set at its Commit

    def done(self, seq: int) -> None:
        """``publish``'s ``done``: stored (a sequence number or DUPLICATE), or FAILED."""
        if seq == FAILED:
            self.ledger.fail()
            return
        self.waiting -= 1
        if self.waiting == 0 and self.end_lsn:
            self.ledger.advance()


class _Ledger:
    """The transactions of one reader, in stream order, until each can be confirmed."""

    __slots__ = ("alive", "confirmable", "flushing", "on_failure", "open", "queue", "stream")

    def __init__(self, on_failure: Callable[[], None]) -> None:
        self.stream: ReplicationStream | None = None  # set once the reader exists
        self.on_failure = on_failure
        self.queue: collections.deque[_Transaction] = collections.deque()
        self.open: _Transaction | None = None
        self.alive = True
        self.confirmable = 0  # the highest position ready to confirm
        self.flushing = False

    def current(self) -> _Transaction:
        txn = self.open
        if txn is None:
            txn = self.open = _Transaction(self)
        return txn

    def end(self, end_lsn: int) -> None:
        txn = self.open or _Transaction(self)
        self.open = None
        txn.end_lsn = end_lsn
        self.queue.append(txn)
        if txn.waiting == 0:
            self.advance()

    def advance(self) -> None:
        if not self.alive:
            return
        queue, last = self.queue, 0
        while queue and queue[0].waiting == 0:
            last = queue.popleft().end_lsn
        if last:
            # One confirm per loop iteration, not per transaction: each wakes the reader thread.
            self.confirmable = last
            if not self.flushing:
                self.flushing = True
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flushing = False
        if self.alive and self.stream is not None:
            self.stream.confirm(self.confirmable)

    def is_alive(self) -> bool:
        """False once stopped, or once a publish failed."""
        return self.alive

    @property
    def settled(self) -> bool:
        """Every transaction handed over was confirmed (or this ledger gave up)."""
        return not self.alive or (not self.queue and self.open is None and not self.flushing)

    def fail(self) -> None:
        if self.alive:
            self.alive = False
            self.on_failure()


# --------------------------------------------------------------------------------------------
# The stream (asyncio)
# --------------------------------------------------------------------------------------------


class BroadcastFromDatabase:
    """Streams INSERTs of ``realtime.messages`` to ``publish`` (see the module doc).

    Args:
        database_url: libpq URL or key/value string (``DATABASE_URL``).
        publish: called on the loop thread for each row (see :class:`Publish`).
        slot: the permanent logical slot (``DB_MESSAGES_SLOT``).
        publication: the publication (Supabase's name by default).
        ssl: require TLS unless the URL sets ``sslmode`` (``DB_SSL``).
        max_payload_bytes: larger payloads are dropped (``MAX_PAYLOAD_SIZE_KB`` * 1024).
        max_topic_bytes: longer topics are dropped (``MAX_TOPIC_LENGTH``).
        max_event_bytes: longer events are dropped (``MAX_EVENT_LENGTH``).
        rate: rows delivered per second at most (``DB_BROADCAST_RATE``), a one-second burst.
        counters: where to count (the node's metrics); by default counters of its own.
    """

    def __init__(
        self,
        database_url: str,
        publish: Publish,
        *,
        slot: str = DEFAULT_SLOT,
        publication: str = PUBLICATION,
        ssl: bool = False,
        max_payload_bytes: int = 1_000 * 1024,
        max_topic_bytes: int = 255,
        max_event_bytes: int = 255,
        rate: float = DEFAULT_RATE,
        counters: BroadcastCounters | None = None,
    ) -> None:
        self.slot = slot
        self.publication = publication
        self._publish = publish
        self.max_payload_bytes = max_payload_bytes
        self.max_topic_bytes = max_topic_bytes
        self.max_event_bytes = max_event_bytes
        self.rate = float(rate)
        self.counters: BroadcastCounters = counters if counters is not None else _OwnCounters()
        try:
            self._dsn = catalog.connection_dsn(database_url, ssl=ssl, application_name="tidings-messages")
            self._stream_dsn = catalog.connection_dsn(
                database_url,
                ssl=ssl,
                options=SESSION_OPTIONS,
                client_encoding="UTF8",
                application_name="tidings-messages",
            )
        except psycopg2.ProgrammingError as exc:
            raise BroadcastFromDatabaseError(f"invalid database URL: {first_line(exc)}") from None
        self._where = catalog.describe_dsn(self._dsn)
        self._bucket = TokenBucket(self.rate, self.rate, time.monotonic())
        # Batches not yet delivered, oldest first, and the timer of a rate-limit pause.
        self._backlog: collections.deque[tuple[list[MessageRow | TransactionEnd], int, _Ledger]] = (
            collections.deque()
        )
        self._throttled: asyncio.TimerHandle | None = None
        self._stream: ReplicationStream | None = None
        self._ledger: _Ledger | None = None
        self._running = False
        self._start_lock = asyncio.Lock()
        self._pool: ConnectionPool | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._remote_live = False
        self._following = False
        self._task: asyncio.Task[None] | None = None
        self._restarts: set[asyncio.Task[None]] = set()
        self.created_slot = False
        """True when this instance created the slot."""
        self.maintenance: PartitionMaintenance | None = None
        """The partition maintenance :func:`start_broadcast_from_database` runs (stopped with this)."""

    # -- set-up -------------------------------------------------------------------------------

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._pool is None:
            self._pool = ConnectionPool(self._dsn, 1)
        return await asyncio.to_thread(self._pool.run, fn, *args)

    async def check(self) -> None:
        """Check the server; create (or fix) the publication and create the slot if missing.

        ``realtime.messages`` must exist (:func:`tidings.db.migrations.prepare_database`).

        Raises:
            BroadcastFromDatabaseError: one line saying what is wrong.
        """
        try:
            await self._db(catalog.check_server)
            await self._db(ensure_messages_publication, self.publication)
            # Last: from here on the slot keeps WAL.
            if await self._db(catalog.ensure_slot, self.slot):
                self.created_slot = True
        except (PostgresChangesError, BroadcastFromDatabaseError) as exc:
            raise BroadcastFromDatabaseError(str(exc)) from None
        except psycopg2.Error as exc:
            raise BroadcastFromDatabaseError(f"PostgreSQL at {self._where}: {first_line(exc)}") from None

    async def start(self, *, timeout: float = 30.0) -> None:
        """:meth:`check`, then stream; returns once the stream is live.

        Raises:
            BroadcastFromDatabaseError: one line (set-up refused, or not live within *timeout*).
        """
        async with self._start_lock:  # the supervisor and a restart after a failure
            if self._running:
                return
            await self.check()
            loop = asyncio.get_running_loop()
            stream = self._new_stream(loop)
            self._running = True
            stream.start()
            try:
                await loop.run_in_executor(None, stream.wait_connected, timeout)
            except PostgresChangesError as exc:
                await self.stop_streaming()
                raise BroadcastFromDatabaseError(str(exc)) from None

    def _new_stream(self, loop: asyncio.AbstractEventLoop) -> ReplicationStream:
        max_payload, max_topic, max_event = self.max_payload_bytes, self.max_topic_bytes, self.max_event_bytes

        def connected() -> None:  # reader thread
            try:
                loop.call_soon_threadsafe(self._set_ready)
            except RuntimeError:
                pass  # the loop closed

        # Each reader gets a ledger of its own: a batch of a reader already stopped is never
        # published or confirmed through the next one.
        ledger = _Ledger(self._on_publish_failed)
        stream = ReplicationStream(
            self._stream_dsn,
            slot=self.slot,
            publication=self.publication,
            loop=loop,
            on_batch=functools.partial(self._on_batch, ledger),
            # Rows hold their payloads (up to MAX_PAYLOAD_SIZE_KB each): at most 4 x 256 wait.
            max_inflight=4,
            max_batch=256,
            make_decoder=lambda _cat: MessageDecoder(max_payload, max_topic, max_event),
            on_connected=connected,
            name="tidings-messages-replication",
        )
        ledger.stream = stream
        self._stream, self._ledger = stream, ledger
        return stream

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def streaming(self) -> bool:
        """True from :meth:`start` until :meth:`stop_streaming` or :meth:`stop`."""
        return self._running

    @property
    def ready(self) -> bool:
        """The stream is live: here, or (a cluster node that does not stream) on another node."""
        stream = self._stream
        if stream is not None and stream.connected:
            return True
        return self._following and not self._running and self._remote_live

    async def wait_ready(self, timeout: float = REPLICATION_READY_TIMEOUT) -> bool:
        """Wait until :attr:`ready` (at once if it is); False when *timeout* seconds passed first."""
        if self.ready:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)
        return self.ready

    def _set_ready(self) -> None:
        if not self.ready:
            return
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def stop(self, *, drain_timeout: float = 5.0) -> None:
        """Stop streaming and close connections (the background task too).

        First drains: the transaction being read is read to its end, what was read is published,
        and once ``publish`` reported it stored the slot is told, so the next start repeats nothing.
        """
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        stream, ledger = self._stream, self._ledger
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        if stream is not None and self._running:
            stream.drain()
            while loop.time() < deadline and not (
                stream.drained and stream.inflight == 0 and (ledger is None or ledger.settled)
            ):
                await asyncio.sleep(0.01)  # queued batches are published meanwhile
        await self.stop_streaming()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        maintenance, self.maintenance = self.maintenance, None
        if maintenance is not None:
            await maintenance.stop()

    async def stop_streaming(self) -> None:
        """Stop the reader only (a cluster node that lost the lease); what was not confirmed is
        streamed again by whoever streams next."""
        self._running = False
        stream, self._stream = self._stream, None
        if self._ledger is not None:
            self._ledger.alive = False
            self._ledger = None
        if stream is not None:
            await asyncio.get_running_loop().run_in_executor(None, stream.stop)

    async def stop_when_cancelled(self) -> None:
        """Wait until cancelled, then :meth:`stop`: a task for ``node.background``, whose
        ``stop_tasks`` then drains this stream while the broker is still up."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    def run_in_background(self, delay: float = 0.0, leader: LeaseHolder | None = None) -> None:
        """Stream from a task of its own until :meth:`stop`: after *delay* seconds on a single
        node (start failures are logged and retried), or while *leader* holds the lease."""
        coro = self.follow(leader, first_delay=delay) if leader is not None else self._run_single(delay)
        self._task = asyncio.get_running_loop().create_task(coro, name="tidings-messages")

    async def _run_single(self, delay: float) -> None:
        """Keep streaming: start, and start again after a failed publish stopped the reader."""
        await asyncio.sleep(delay)
        attempt = 0
        while True:
            if not self._running:
                try:
                    await self.start()
                except BroadcastFromDatabaseError as exc:
                    log.error("Broadcast from Database cannot stream: %s; retrying", exc)
                    await asyncio.sleep(min(30.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0))
                    attempt += 1
                    continue
                attempt = 0
                log.info("Broadcast from Database streaming (slot %s)", self.slot)
            await asyncio.sleep(1.0)

    async def follow(self, leader: LeaseHolder, *, interval: float = 2.0, first_delay: float = 0.0) -> None:
        """Stream while *leader* holds the lease, stop when it loses it; until cancelled.

        While another node streams, :attr:`ready` follows the slot's ``active`` flag.
        """
        self._following = True
        await asyncio.sleep(first_delay)
        try:
            while True:
                if leader.leader and not self._running:
                    try:
                        await self.start()
                        log.info("Broadcast from Database streaming on this node (it holds the lease)")
                    except BroadcastFromDatabaseError as exc:
                        log.error("Broadcast from Database cannot stream: %s", exc)
                elif not leader.leader and self._running:
                    log.warning("lost the replication lease: Broadcast from Database stops streaming here")
                    await self.stop_streaming()
                if not self._running:
                    try:
                        self._remote_live = bool(await self._db(_slot_active, self.slot))
                    except psycopg2.Error:
                        self._remote_live = False
                    self._set_ready()
                await asyncio.sleep(interval)
        finally:
            self._following = False

    def _on_publish_failed(self) -> None:
        """A row could not be stored: stop this reader; the next streams from the last confirmed
        position (the background task starts it; without one, this does)."""
        if not self._running:
            return
        log.error(
            "the broker failed to store a database broadcast; streaming again from the last confirmed row"
        )
        supervised = self._task is not None and not self._task.done()

        async def restart() -> None:
            await self.stop_streaming()
            if supervised:
                return
            await asyncio.sleep(0.5)
            try:
                await self.start()
            except BroadcastFromDatabaseError as exc:
                log.error("Broadcast from Database cannot stream: %s", exc)

        task = asyncio.get_running_loop().create_task(restart())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    # -- delivery (loop thread) ---------------------------------------------------------------

    def _on_batch(self, ledger: _Ledger, batch: list[MessageRow | TransactionEnd]) -> None:
        self._backlog.append((batch, 0, ledger))
        if self._throttled is None:
            self._deliver_backlog()

    def _deliver_backlog(self) -> None:
        """Deliver waiting batches in stream order; a throttled one holds back every later one."""
        self._throttled = None
        backlog = self._backlog
        while backlog:
            batch, start, ledger = backlog[0]
            paused = self._deliver(batch, start, ledger)
            if paused is not None:
                index, wait = paused
                backlog[0] = (batch, index, ledger)
                self._throttled = asyncio.get_running_loop().call_later(wait, self._deliver_backlog)
                return
            backlog.popleft()

    def _deliver(
        self, batch: list[MessageRow | TransactionEnd], start: int, ledger: _Ledger
    ) -> tuple[int, float] | None:
        """Publish ``batch[start:]``; ``(index, seconds)`` when the rate limit pauses it there."""
        stream = ledger.stream
        if stream is None:
            return None
        if not ledger.alive:  # stopped, or a publish failed: the next reader streams these again
            stream.batch_done()
            return None
        bucket, now = self._bucket, time.monotonic()
        counters, publish = self.counters, self._publish
        for i in range(start, len(batch)):
            item = batch[i]
            if isinstance(item, TransactionEnd):
                ledger.end(item.end_lsn)
                continue
            if item.problem is not None:
                self._drop(item)
                continue
            if not bucket.take(now):
                counters.db_broadcasts_throttled += 1
                # The batch stays in flight: the reader pauses once enough are.
                return i, max(0.001, (1.0 - bucket.available(now)) / self.rate)
            txn = ledger.current()
            txn.waiting += 1
            try:
                publish(item.private, item.topic, item.event, item.payload, item.id, done=txn.done)
            except Exception:
                txn.waiting -= 1  # a failing callback would fail again: counted as handed over
                log.exception("publishing database broadcast %s failed", item.id)
                continue
            if not ledger.is_alive():  # the broker failed it (synchronously): streamed again later
                break
            counters.db_broadcasts += 1
        stream.batch_done()
        return None

    def _drop(self, row: MessageRow) -> None:
        counters = self.counters
        if row.problem == TOO_LARGE:
            counters.db_broadcasts_too_large += 1
            log.warning(
                "database broadcast %s on %s dropped: payload of %d bytes over MAX_PAYLOAD_SIZE_KB",
                row.id,
                Clipped(row.topic),
                row.size,
            )
        elif row.problem == NAME_TOO_LONG:
            counters.db_broadcasts_names_too_long += 1
            log.warning(
                "database broadcast %s dropped: topic %s or event %s over MAX_TOPIC_LENGTH / "
                "MAX_EVENT_LENGTH (binary: 255 bytes)",
                row.id,
                Clipped(row.topic),
                Clipped(row.event),
            )
        else:
            counters.db_broadcasts_malformed += 1
            log.warning(
                "database broadcast %s on %s dropped: it needs event, private and one valid payload",
                Clipped(row.id),
                Clipped(row.topic),
            )

    async def drop_slot(self) -> None:
        """Drop the slot unless something streams from it (for a start cut short that created it).

        Failures are logged, not raised: this runs while a start is being abandoned.
        """

        def drop(conn: Any) -> None:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE slot_name = %s AND NOT active",
                    (self.slot,),
                )

        try:
            await asyncio.to_thread(_run_once, self._dsn, drop)
        except psycopg2.Error as exc:
            log.warning("could not drop replication slot %s: %s", self.slot, first_line(exc))
            return
        self.created_slot = False
        log.info("dropped replication slot %s: the start that created it did not finish", self.slot)

    # -- introspection --------------------------------------------------------------------------

    @property
    def confirmed_lsn(self) -> int:
        """The position confirmed by the current reader (0 without one)."""
        return 0 if self._stream is None else self._stream.confirmed_lsn

    async def slot_lag_bytes(self) -> int | None:
        """WAL bytes between the server's position and the slot's confirmed one (None: unknown)."""
        try:
            lag: int | None = await self._db(catalog.slot_lag, self.slot)
        except (psycopg2.Error, PostgresChangesError):
            return None
        return lag


def messages_slot(config: Config) -> str:
    """``DB_MESSAGES_SLOT``, else ``<DB_SLOT>_messages``: nodes (and tests) that give Postgres
    Changes a slot of their own get one for this stream too."""
    return config.db_messages_slot or f"{config.db_slot}_messages"


async def start_broadcast_from_database(
    config: Config,
    publish: Publish,
    *,
    counters: BroadcastCounters | None = None,
    leader: LeaseHolder | None = None,
) -> BroadcastFromDatabase:
    """What a node runs at start when ``DATABASE_URL`` is set (the composition root calls it).

    Prepares the database (:func:`tidings.db.migrations.prepare_database`: privileges, the
    ``realtime`` schema, today's partitions) and keeps its partitions current (hourly
    :class:`~tidings.db.partitions.PartitionMaintenance`: ``realtime.send`` needs today's), checks
    the server, the publication and the slot, then streams from a background task: at once when
    the slot is new (nothing to resume), else after ``DB_RESUME_GRACE`` (clients rejoin first,
    then get what was sent while Tidings was down); in a cluster (*leader*) only while this node
    holds the change-feed lease. Stop it with :meth:`BroadcastFromDatabase.stop`.

    Raises:
        tidings.db.privileges.DatabaseSetupError: the database cannot be prepared (one line).
        BroadcastFromDatabaseError: the stream cannot be set up (one line).
    """
    from tidings.db.migrations import prepare_database

    assert config.database_url is not None
    await prepare_database(config.database_url, ssl=config.db_ssl, replication=True)
    stream = BroadcastFromDatabase(
        config.database_url,
        publish,
        slot=messages_slot(config),
        ssl=config.db_ssl,
        max_payload_bytes=config.max_payload_size_kb * 1024,
        max_topic_bytes=config.max_topic_length,
        max_event_bytes=config.max_event_length,
        rate=config.db_broadcast_rate,
        counters=counters,
    )
    try:
        await stream.check()
    except BaseException:
        await stream.stop()
        raise
    stream.maintenance = PartitionMaintenance(config.database_url, ssl=config.db_ssl)
    stream.maintenance.start()
    delay = 0.0 if stream.created_slot else config.db_resume_grace
    stream.run_in_background(delay, leader)
    return stream
