"""Replay from the database: the messages a private channel missed, read from ``realtime.messages``.

A join with ``config.broadcast.replay = {since: <ms epoch>, limit}`` on a private channel (with
broadcast read permission, checked by the caller) gets, right after its join reply, the newest
``limit`` rows (clamped to 1..25, default 25) of::

    topic = <sub_topic> AND private IS TRUE AND extension = 'broadcast'
    AND inserted_at >= <since> AND inserted_at < now() + 1 minute

oldest first, each pushed as ``broadcast {type, event, payload, meta: {replayed: true, id}}``
(binary rows as binary broadcasts on vsn 2.0.0, skipped on vsn 1.0.0), as Supabase does
(``Realtime.Messages.replay``). ``inserted_at`` is a zone-less ``timestamp`` written by ``now()``
in the writer's session zone, so *since* is turned into a timestamp in SQL, in the database's
zone (``to_timestamp(...)::timestamp``), and compared as a timestamp: the replay index
``messages_inserted_at_topic_index`` and partition pruning then apply.

The query runs as Tidings' role, the owner of ``realtime.messages`` (row level security does not
apply to it): the read permission of the channel is what authorizes the replay.

::

    replay = DatabaseReplay(config.database_url)
    since, limit = replay_params(raw)          # ReplayParamsError -> join error
    messages = await replay.replay(sub_topic, since, limit)
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import psycopg2

from tidings.cdc import catalog
from tidings.cdc.catalog import ConnectionPool
from tidings.logs import first_line
from tidings.protocol import errors

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "REPLAY_SQL",
    "DatabaseReplay",
    "ReplayError",
    "ReplayParamsError",
    "ReplayedMessage",
    "read_replay",
    "replay_params",
]

MAX_LIMIT: Final = 25
"""Most rows one replay returns (Supabase's cap)."""
DEFAULT_LIMIT: Final = 25
"""Rows returned when the join gives no ``limit``."""

# Milliseconds since the epoch PostgreSQL's timestamp can hold (4713 BC .. 294276 AD, kept inside).
_MIN_SINCE = -210_866_803_200_000
_MAX_SINCE = 9_224_318_015_999_999

REPLAY_SQL: Final = """
SELECT id::text, event, payload, binary_payload
FROM realtime.messages
WHERE topic = %(topic)s
  AND private IS TRUE
  AND extension = 'broadcast'
  AND inserted_at >= to_timestamp(%(since)s::bigint / 1000.0)::timestamp
  AND inserted_at < (now() + interval '1 minute')::timestamp
ORDER BY inserted_at DESC, ctid DESC
LIMIT %(limit)s
"""
"""The newest *limit* rows (ties: the later written first); reversed for delivery."""


class ReplayParamsError(ValueError):
    """``config.broadcast.replay`` is not valid; :attr:`reason` is the join error."""

    reason = errors.REPLAY_PARAMS_INVALID

    def __init__(self) -> None:
        super().__init__(errors.REPLAY_PARAMS_INVALID)


class ReplayError(RuntimeError):
    """The replay query failed; :attr:`reason` is the join error (the log gets the cause)."""

    reason = errors.REPLAY_FAILED


@dataclass(frozen=True, slots=True)
class ReplayedMessage:
    """One row to push again, with ``meta: {replayed: true, id}``."""

    id: str
    event: str
    payload: Any
    """The JSON payload, or ``bytes`` for a binary row (see :attr:`binary`)."""
    binary: bool


def _integer(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def replay_params(raw: object) -> tuple[int, int]:
    """``(since, limit)`` of a ``config.broadcast.replay`` object; limit clamped to 1..25.

    Also takes a :class:`tidings.protocol.join.Replay` (its ``since`` and ``limit``).

    Raises:
        ReplayParamsError: not an object, ``since`` missing or not an integer within the range
            of a PostgreSQL timestamp, or ``limit`` given and not an integer.
    """
    if isinstance(raw, dict):
        since_raw, limit_raw = raw.get("since"), raw.get("limit")
    elif hasattr(raw, "since") and hasattr(raw, "limit"):
        since_raw, limit_raw = raw.since, raw.limit
    else:
        raise ReplayParamsError()
    since = _integer(since_raw)
    if since is None or not _MIN_SINCE <= since <= _MAX_SINCE:
        raise ReplayParamsError()
    limit = DEFAULT_LIMIT if limit_raw is None else _integer(limit_raw)
    if limit is None:
        raise ReplayParamsError()
    return since, max(1, min(limit, MAX_LIMIT))


def read_replay(conn: Any, sub_topic: str, since: int, limit: int) -> list[ReplayedMessage]:
    """The replay of *sub_topic* from *since* (ms epoch), oldest first; blocking.

    *conn* is a psycopg2 connection whose role may read ``realtime.messages`` (its owner).
    *limit* is clamped to 1..25.
    """
    limit = max(1, min(limit, MAX_LIMIT))
    with conn.cursor() as cur:
        cur.execute(REPLAY_SQL, {"topic": sub_topic, "since": since, "limit": limit})
        rows = cur.fetchall()
    out = []
    for row_id, event, payload, binary_payload in reversed(rows):
        if binary_payload is not None:
            out.append(ReplayedMessage(row_id, event or "", bytes(binary_payload), True))
        else:
            out.append(ReplayedMessage(row_id, event or "", payload, False))
    return out


class DatabaseReplay:
    """Replays from ``realtime.messages`` on a small pool of connections of its own.

    Args:
        database_url: ``DATABASE_URL``.
        ssl: require TLS unless the URL sets ``sslmode`` (``DB_SSL``).
        pool_size: connections (and threads) at most.
        statement_timeout: seconds one replay query may run.
    """

    def __init__(
        self, database_url: str, *, ssl: bool = False, pool_size: int = 2, statement_timeout: float = 5.0
    ) -> None:
        self._dsn = catalog.connection_dsn(
            database_url,
            ssl=ssl,
            application_name="tidings-replay",
            options=f"-c statement_timeout={int(statement_timeout * 1000)}",
        )
        self._size = max(1, pool_size)
        self._pool: ConnectionPool | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def replay(self, sub_topic: str, since: int, limit: int = DEFAULT_LIMIT) -> list[ReplayedMessage]:
        """:func:`read_replay` in a worker thread (*limit* clamped to 1..25).

        Raises:
            ReplayParamsError: *since* is outside what a PostgreSQL timestamp holds.
            ReplayError: the query failed (unreachable database, timeout, ...).
        """
        since, limit = replay_params({"since": since, "limit": limit})
        if self._pool is None or self._executor is None:
            self._pool = ConnectionPool(self._dsn, self._size)
            self._executor = ThreadPoolExecutor(self._size, thread_name_prefix="tidings-replay")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, self._pool.run, read_replay, sub_topic, since, limit
            )
        except psycopg2.Error as exc:
            raise ReplayError(first_line(exc)) from None

    async def close(self) -> None:
        """Close the connections."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
