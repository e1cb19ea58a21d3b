"""The replication reader: one thread streaming pgoutput from a permanent logical slot.

psycopg2's replication connection is blocking libpq, so it lives in a dedicated thread. The thread
decodes messages into :class:`~tidings.cdc.changes.Change` and
:class:`~tidings.cdc.changes.TransactionEnd` items and hands them to the asyncio loop in batches
(``loop.call_soon_threadsafe``). The server pushes changes as they commit; nothing polls.

Delivery is at-least-once. The slot's confirmed position moves only when the loop side calls
:meth:`ReplicationStream.confirm` with a transaction's end position, which the service does after
its callback returned for every change of that transaction. A crash or restart before that replays
the transaction (with the same change ids). After a lost connection the thread reconnects with
jittered exponential backoff; before restarting the stream it lets the loop finish the batches it
already has, then resumes from the last confirmed position.

Backpressure: at most ``max_inflight`` batches wait on the loop; beyond that the thread fills one
more batch (up to ``max_batch`` items) and then stops reading (PostgreSQL then buffers in the slot)
while still sending status updates.
"""

from __future__ import annotations

import asyncio
import logging
import random
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import psycopg2
import psycopg2.errors
import psycopg2.extras

from tidings.cdc import catalog
from tidings.cdc.catalog import PostgresChangesError
from tidings.cdc.changes import DEFAULT_MAX_RECORD_BYTES, Change, ChangeDecoder, TransactionEnd
from tidings.cdc.pgoutput import format_lsn
from tidings.logs import first_line

__all__ = ["Batch", "ReplicationStream", "StreamDecoder"]

log = logging.getLogger("tidings.cdc")

Batch = list[Change | TransactionEnd]


class StreamDecoder(Protocol):
    """What the reader needs of a session's decoder (see ``make_decoder``)."""

    @property
    def in_transaction(self) -> bool:
        """True between a Begin and its Commit."""

    def feed(self, payload: bytes) -> Any:
        """One pgoutput message in; an item for the batch, or ``None``."""


_LOGICAL = psycopg2.extras.LogicalReplicationConnection

# The replication session's output settings: values then render the same whatever the server's
# defaults are (see tidings.cdc.values).
SESSION_OPTIONS = (
    "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres -c bytea_output=hex -c extra_float_digits=1"
)


class ReplicationStream:
    """Streams a slot in a background thread and calls ``on_batch(batch)`` on the loop thread.

    ``on_batch`` must call :meth:`batch_done` when it has finished with a batch (whatever
    happened), and :meth:`confirm` with the ``end_lsn`` of each transaction fully handed over.

    Args:
        dsn: libpq connection string (Tidings' settings already merged, see
            :func:`tidings.cdc.catalog.connection_dsn`).
        slot: logical slot to stream (created again, with a loud log, if it disappeared).
        publication: publication whose tables are streamed.
        loop: the asyncio loop that receives batches.
        on_batch: called on the loop thread with each batch.
        status_interval: seconds between status updates sent to the server when idle.
        max_inflight: batches handed to the loop and not yet done before reading pauses.
        max_batch: items per batch at most.
        backoff: (first, max) reconnect delay in seconds; doubles per failed attempt, with jitter.
        make_decoder: builds the decoder of each session from the session's catalog connection;
            by default a :class:`~tidings.cdc.changes.ChangeDecoder` (Postgres Changes). Another
            stream (Broadcast from Database) passes its own: ``feed(payload)`` returns an item
            for the batch or ``None``, and ``in_transaction`` tells where a drain may stop.
        on_connected: called on the reader thread each time a session starts streaming.
        on_session: called on the reader thread with the position a session streams from (the
            slot's confirmed position), before it is connected and before any of its batches.
        name: the reader thread's name.
    """

    def __init__(
        self,
        dsn: str,
        *,
        slot: str,
        publication: str,
        loop: asyncio.AbstractEventLoop,
        on_batch: Callable[[list[Any]], None],
        status_interval: float = 10.0,
        max_inflight: int = 16,
        max_batch: int = 512,
        backoff: tuple[float, float] = (0.2, 5.0),
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        make_decoder: Callable[[Any], StreamDecoder] | None = None,
        on_connected: Callable[[], None] | None = None,
        on_session: Callable[[int], None] | None = None,
        name: str = "tidings-cdc-replication",
    ) -> None:
        self._dsn = dsn
        self._make_decoder = make_decoder
        self._on_connected = on_connected
        self._on_session = on_session
        self._name = name
        self.slot = slot
        self.publication = publication
        self._loop = loop
        self._on_batch = on_batch
        self._status_interval = status_interval
        self._max_inflight = max_inflight
        self._max_batch = max_batch
        self._backoff = backoff
        self._max_record_bytes = max_record_bytes

        self._stop = threading.Event()
        self._draining = threading.Event()
        self._drained = threading.Event()
        self._connected_event = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._inflight = 0
        self._confirmed = 0  # written by the loop thread, read by the reader thread
        self._thread: threading.Thread | None = None

        self.connected = False
        """True while a replication session is streaming."""
        self.sessions = 0
        """Replication sessions started so far (reconnects included)."""
        self.last_error: str | None = None
        """The last connection error, one line."""
        self.fatal_error: PostgresChangesError | None = None
        """Set when the stream gave up for good (a misconfiguration, not an outage)."""

    # -- control (any thread) -----------------------------------------------------------------

    @property
    def confirmed_lsn(self) -> int:
        """The highest position confirmed so far (0 before the first)."""
        return self._confirmed

    def start(self) -> None:
        """Start the reader thread."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> None:
        """Block until the first session streams.

        Raises:
            PostgresChangesError: the stream gave up, or did not connect within *timeout*.
        """
        deadline = time.monotonic() + timeout
        while not self._connected_event.wait(0.05):
            if self.fatal_error is not None:
                raise self.fatal_error
            if time.monotonic() > deadline:
                raise PostgresChangesError(
                    f"replication did not start within {timeout:.0f}s: {self.last_error or 'no reason given'}"
                )

    def confirm(self, lsn: int) -> None:
        """Every change up to *lsn* (a transaction's end) was handed over; report it to the slot."""
        if lsn > self._confirmed:
            self._confirmed = lsn
            self._wake()

    def batch_done(self) -> None:
        """The loop has finished with one batch."""
        with self._lock:
            self._inflight -= 1
        self._wake()

    @property
    def inflight(self) -> int:
        """Batches handed to the loop and not yet done."""
        with self._lock:
            return self._inflight

    def drain(self) -> None:
        """Stop reading at the next transaction boundary (the one in progress is read to its end)."""
        self._draining.set()
        self._wake()

    @property
    def drained(self) -> bool:
        """After :meth:`drain`: reading has stopped (or no session is streaming)."""
        return self._drained.is_set() or not self.connected

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (after a last status update) and wait for it. Blocking."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\x00")
        except (BlockingIOError, OSError):
            pass  # already has a pending byte, or closed during shutdown

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._session()
            except PostgresChangesError as exc:
                self.last_error = str(exc)
                if not self._connected_event.is_set():
                    self.fatal_error = exc
                    log.error("postgres changes: %s", exc)
                    return
                log.error("postgres changes: %s; retrying", exc)
            except Exception as exc:  # connection lost, server restarting, slot busy, ...
                self.last_error = first_line(exc)
                if not self._stop.is_set():
                    log.warning("replication stream interrupted: %s", self.last_error)
            finally:
                self.connected = False
            if self._stop.is_set():
                break
            if time.monotonic() - started > 30:
                attempt = 0  # the last session was healthy: start the backoff over
            first, cap = self._backoff
            delay = min(cap, first * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            self._stop.wait(delay)

    def _session(self) -> None:
        cat = catalog.connect(self._dsn)
        conn = None
        try:
            if catalog.ensure_slot(cat, self.slot) and self.sessions:
                log.error(
                    "replication slot %s was missing and has been recreated: changes made "
                    "meanwhile were not delivered",
                    self.slot,
                )
            decoder: StreamDecoder
            if self._make_decoder is not None:
                decoder = self._make_decoder(cat)
            else:
                decoder = ChangeDecoder(
                    resolve_type=lambda oid: catalog.resolve_type(cat, oid),
                    primary_key=lambda rel: catalog.primary_key(cat, rel),
                    max_record_bytes=self._max_record_bytes,
                )
            # Let the loop finish the previous session's batches, so this one starts after them
            # and does not hand them over a second time.
            self._wait_inflight(0, deadline=time.monotonic() + 30)
            if self._stop.is_set():
                return
            # Where this session starts: what the slot confirmed (a first session asks from 0).
            start_lsn = max(self._confirmed, catalog.slot_confirmed_lsn(cat, self.slot))
            conn = psycopg2.connect(self._dsn, connection_factory=_LOGICAL)
            cur = conn.cursor()
            cur.start_replication(
                slot_name=self.slot,
                decode=False,
                start_lsn=self._confirmed,
                options={"proto_version": "1", "publication_names": self.publication},
                status_interval=self._status_interval,
            )
            if self._on_session is not None:
                self._on_session(start_lsn)
            self.connected = True
            self.sessions += 1
            self.last_error = None
            self._connected_event.set()
            if self._on_connected is not None:
                self._on_connected()
            log.info("streaming replication slot %s from %s", self.slot, format_lsn(self._confirmed))
            self._stream(conn, cur, decoder)
        finally:
            if conn is not None:
                conn.close()
            cat.close()

    def _stream(self, conn: Any, cur: Any, decoder: StreamDecoder) -> None:
        fd = conn.fileno()
        sent = 0
        batch: Batch = []
        while not self._stop.is_set():
            if self._draining.is_set() and not decoder.in_transaction:
                if batch:
                    self._post(batch, cur)
                    batch = []
                self._drained.set()
                confirmed = self._confirmed
                if confirmed > sent:
                    cur.send_feedback(
                        write_lsn=confirmed, flush_lsn=confirmed, apply_lsn=confirmed, force=True
                    )
                    sent = confirmed
                select.select([self._wake_r], [], [], 0.5)
                self._drain_wake()
                continue
            msg = cur.read_message()
            if msg is not None:
                item = decoder.feed(msg.payload)
                if item is not None:
                    batch.append(item)
                    if len(batch) >= self._max_batch:
                        self._post(batch, cur)
                        batch = []
                continue
            if batch and self.inflight < self._max_inflight:
                self._post(batch, cur)
                batch = []
            # Else the loop is behind: keep reading into this batch (until max_batch) rather than
            # wait with it, so a slow consumer gets fewer, larger batches; batch_done wakes us.
            confirmed = self._confirmed
            if confirmed > sent:
                cur.send_feedback(write_lsn=confirmed, flush_lsn=confirmed, apply_lsn=confirmed, force=True)
                sent = confirmed
            # psycopg2 sends the periodic status itself from read_message(); wake up for it.
            select.select([fd, self._wake_r], [], [], self._status_interval / 2)
            self._drain_wake()
        confirmed = self._confirmed
        cur.send_feedback(write_lsn=confirmed, flush_lsn=confirmed, apply_lsn=confirmed, force=True)

    def _post(self, batch: Batch, cur: Any) -> None:
        self._wait_inflight(self._max_inflight - 1, cur=cur)
        with self._lock:
            self._inflight += 1
        try:
            self._loop.call_soon_threadsafe(self._on_batch, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop.set()
            with self._lock:
                self._inflight -= 1

    def _wait_inflight(self, most: int, *, cur: Any = None, deadline: float | None = None) -> None:
        """Wait until at most *most* batches are on the loop, keeping the server informed."""
        last_status = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                if self._inflight <= most:
                    return
            if deadline is not None and time.monotonic() > deadline:
                return
            select.select([self._wake_r], [], [], 0.5)
            self._drain_wake()
            if cur is not None and time.monotonic() - last_status > self._status_interval / 2:
                confirmed = self._confirmed
                cur.send_feedback(write_lsn=confirmed, flush_lsn=confirmed, apply_lsn=confirmed, force=True)
                last_status = time.monotonic()
