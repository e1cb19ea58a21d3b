"""Daily partitions of ``realtime.messages``, as Supabase's janitor keeps them.

``realtime.messages`` is partitioned by range on ``inserted_at``. One partition per UTC day, named
``realtime.messages_YYYY_MM_DD`` and covering ``[day, day + 1)``, exists from yesterday to three
days ahead; a partition whose day is older than 72 hours is dropped with its rows (Supabase's
``Realtime.Tenants.create_messages_partitions`` and ``Realtime.Messages.delete_old_messages``).
A day ahead and a day behind also cover a database whose ``TimeZone`` is not UTC: ``inserted_at``
defaults to ``now()`` in the session's zone.

The pure helpers (:func:`partition_name`, :func:`wanted_days`, :func:`expired_partitions`,
:func:`create_partition_sql`, ...) do no I/O. :func:`maintain_partitions` runs them on a blocking
psycopg2 connection under an advisory lock, so several nodes may run it at once;
:class:`PartitionMaintenance` runs it at start and then hourly from asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from tidings.logs import first_line

__all__ = [
    "DAYS_AHEAD",
    "DAYS_BEHIND",
    "PARTITION_LOCK_KEY",
    "RETENTION",
    "PartitionMaintenance",
    "PartitionReport",
    "create_partition_sql",
    "drop_partition_sql",
    "existing_partitions",
    "expired_partitions",
    "maintain_partitions",
    "partition_day",
    "partition_name",
    "wanted_days",
]

log = logging.getLogger("tidings.db")

DAYS_BEHIND = 1
"""Days before today that keep a partition (rows stamped in a zone behind UTC land there)."""
DAYS_AHEAD = 3
"""Days after today that get a partition in advance."""
RETENTION = timedelta(hours=72)
"""Partitions of days before ``(now - RETENTION)``'s day are dropped."""
PARTITION_LOCK_KEY = 0x74696469_6E677302
"""``pg_advisory_xact_lock`` key of partition maintenance ("tiding" + 0x73 0x02)."""

_NAME = re.compile(r"messages_(\d{4})_(\d{2})_(\d{2})")


def partition_name(day: date) -> str:
    """``messages_2025_01_31`` for 2025-01-31 (the table name, without the schema)."""
    return f"messages_{day.year:04d}_{day.month:02d}_{day.day:02d}"


def partition_day(name: str) -> date | None:
    """The day of a partition named by :func:`partition_name`; None for any other name."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    try:
        return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def wanted_days(today: date) -> list[date]:
    """The days that must have a partition: yesterday to three days ahead, in order."""
    return [today + timedelta(days=offset) for offset in range(-DAYS_BEHIND, DAYS_AHEAD + 1)]


def expired_partitions(names: Iterable[str], now: datetime) -> list[str]:
    """Of *names*, the partitions to drop at UTC time *now*: day before ``(now - 72 h)``'s day.

    Names that are not ``messages_YYYY_MM_DD`` (a partition someone else made) are never dropped.
    """
    limit = (_as_utc(now) - RETENTION).date()
    out = []
    for name in names:
        day = partition_day(name)
        if day is not None and day < limit:
            out.append(name)
    return sorted(out)


def create_partition_sql(day: date) -> str:
    """``CREATE TABLE IF NOT EXISTS realtime.messages_YYYY_MM_DD PARTITION OF ...`` for *day*."""
    return (
        f"CREATE TABLE IF NOT EXISTS realtime.{partition_name(day)} PARTITION OF realtime.messages "
        f"FOR VALUES FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"
    )


def drop_partition_sql(name: str) -> str:
    """``DROP TABLE IF EXISTS realtime.<name>`` for a partition named by :func:`partition_name`.

    Raises:
        ValueError: *name* is not such a partition name (nothing else is ever dropped).
    """
    if partition_day(name) is None:
        raise ValueError(f"not a daily partition of realtime.messages: {name!r}")
    return f"DROP TABLE IF EXISTS realtime.{name}"


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class PartitionReport:
    """What one maintenance run changed."""

    created: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    """Partitions that could not be created (one warning each was logged), e.g. a day that an
    existing partition of another name already covers."""


def existing_partitions(conn: Any) -> list[str]:
    """Names of the partitions of ``realtime.messages`` in schema ``realtime``, sorted."""
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT child.relname
            FROM pg_inherits
            JOIN pg_class parent ON pg_inherits.inhparent = parent.oid
            JOIN pg_class child ON pg_inherits.inhrelid = child.oid
            JOIN pg_namespace nmsp_parent ON nmsp_parent.oid = parent.relnamespace
            JOIN pg_namespace nmsp_child ON nmsp_child.oid = child.relnamespace
            WHERE parent.relname = 'messages' AND nmsp_parent.nspname = 'realtime'
              AND nmsp_child.nspname = 'realtime'
            ORDER BY 1
            """
        )
        return [str(row[0]) for row in cur.fetchall()]


def maintain_partitions(
    conn: Any, *, now: datetime | None = None, lock_timeout: float = 5.0
) -> PartitionReport:
    """Create the partitions :func:`wanted_days` lists and drop :func:`expired_partitions`.

    *conn* is an autocommit psycopg2 connection whose role owns ``realtime.messages``. *now* is the
    current time (naive = UTC); by default the database's clock. Creating and dropping each run in
    a transaction of their own under :data:`PARTITION_LOCK_KEY`; a partition that another node made
    meanwhile is skipped. Creating or dropping waits at most *lock_timeout* seconds for the lock
    on ``realtime.messages`` (a long query reading it), then fails until the next run.

    Raises:
        psycopg2.Error: the database refused (no ``realtime.messages``, a lock timeout, ...).
    """
    import psycopg2.errors

    created: list[str] = []
    failed: list[str] = []
    timeout = f"{max(1, int(lock_timeout * 1000))}ms"
    with conn.cursor() as cur:
        try:
            cur.execute(
                "BEGIN; SET LOCAL lock_timeout = %s; SELECT pg_advisory_xact_lock(%s)",
                (timeout, PARTITION_LOCK_KEY),
            )
            cur.execute("SELECT 'realtime.messages'::regclass")  # raises UndefinedTable before migrations
            if now is None:
                cur.execute("SELECT now() AT TIME ZONE 'UTC'")
                now = cur.fetchone()[0]
            assert now is not None
            now = _as_utc(now)
            existing = set(existing_partitions(conn))
            for day in wanted_days(now.date()):
                name = partition_name(day)
                if name in existing:
                    continue
                cur.execute("SAVEPOINT partition")
                try:
                    cur.execute(create_partition_sql(day))
                except (psycopg2.errors.InvalidObjectDefinition, psycopg2.errors.CheckViolation) as exc:
                    # The day overlaps a partition of another name, or rows of a default partition.
                    cur.execute("ROLLBACK TO SAVEPOINT partition")
                    failed.append(name)
                    log.warning("cannot create partition realtime.%s: %s", name, first_line(exc))
                    continue
                cur.execute("RELEASE SAVEPOINT partition")
                created.append(name)
            cur.execute("COMMIT")
        except BaseException:
            _rollback(conn, cur)
            raise
        for name in created:
            log.info("created partition realtime.%s", name)
        dropped = expired_partitions(existing, now)
        if dropped:
            try:
                cur.execute(
                    "BEGIN; SET LOCAL lock_timeout = %s; SELECT pg_advisory_xact_lock(%s)",
                    (timeout, PARTITION_LOCK_KEY),
                )
                for name in dropped:
                    cur.execute(drop_partition_sql(name))
                cur.execute("COMMIT")
            except BaseException:
                _rollback(conn, cur)
                raise
            for name in dropped:
                log.info("dropped partition realtime.%s (older than 72 hours)", name)
    return PartitionReport(tuple(created), tuple(dropped), tuple(failed))


def _rollback(conn: Any, cur: Any) -> None:
    import psycopg2

    if conn.closed:
        return
    try:
        cur.execute("ROLLBACK")
    except psycopg2.Error:
        conn.close()


class PartitionMaintenance:
    """Runs :func:`maintain_partitions` at :meth:`start` and then every *interval* seconds.

    Each run opens a connection of its own in a worker thread and closes it. A failed run is
    logged (the partitions ahead leave days of slack) and retried at the next interval.

    Args:
        database_url: libpq URL or key/value string of the database.
        interval: seconds between runs (Supabase's janitor runs every few hours; hourly here).
        ssl: require TLS unless the URL sets ``sslmode``.
    """

    def __init__(self, database_url: str, *, interval: float = 3600.0, ssl: bool = False) -> None:
        from tidings.cdc import catalog

        self._dsn = catalog.connection_dsn(database_url, ssl=ssl, application_name="tidings-partitions")
        self._where = catalog.describe_dsn(self._dsn)
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.runs = 0
        """Runs finished, successful or not."""
        self.last_report: PartitionReport | None = None
        self.last_error: str | None = None
        """First line of the last run's error; None after a successful run."""

    def _run_blocking(self) -> PartitionReport:
        from tidings.cdc import catalog

        conn = catalog.connect(self._dsn)
        try:
            return maintain_partitions(conn)
        finally:
            conn.close()

    async def run_once(self) -> PartitionReport:
        """One maintenance run now.

        Raises:
            psycopg2.Error: the run failed (also recorded in :attr:`last_error`).
        """
        try:
            report = await asyncio.to_thread(self._run_blocking)
        except Exception as exc:
            self.last_error = first_line(exc)
            raise
        finally:
            self.runs += 1
        self.last_report, self.last_error = report, None
        return report

    def start(self) -> None:
        """Start the periodic task on the running loop (the first run happens at once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="tidings-partitions")

    async def stop(self) -> None:
        """Stop the periodic task (a run in progress finishes in its thread)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.warning(
                    "partition maintenance of realtime.messages at %s failed: %s (retried in %ds)",
                    self._where,
                    self.last_error,
                    int(self.interval),
                )
            await asyncio.sleep(self.interval)
