"""Supabase's Realtime Authorization: row level security policies on ``realtime.messages`` decide.

As ``lib/realtime/tenants/authorization.ex`` does:

* **Read check** (at join, and again on ``access_token``): in one transaction, insert one probe
  row per extension (``broadcast``, and ``presence`` when presence is enabled) into
  ``realtime.messages`` as Tidings' role (the owner: row level security does not apply to it),
  then ``set_config`` (local) ``role`` (the JWT's role), ``realtime.topic`` (the sub-topic),
  ``request.jwt.claims``, ``request.jwt.claim.sub``, ``request.jwt.claim.role`` and
  ``request.headers``, select the probe rows back under that role (a visible row = read allowed),
  and roll back. Nothing is ever stored.
* **Write check** (at the first broadcast or track, and for REST): the same settings, then per
  extension an ``INSERT`` as the JWT's role in a savepoint; ``insufficient_privilege`` (which a
  row level security ``WITH CHECK`` raises) = no write. Rolled back.
* A policy that raises (or a role the database does not know, or may not be switched to) counts
  as not allowed, logged as ``RlsPolicyError``. ``service_role`` is allowed without a query.
* Beyond Supabase: a JWT role that would skip row level security (a superuser, a ``BYPASSRLS``
  role other than ``service_role``, the owner of ``realtime.messages`` or a role inheriting from
  it, Tidings' own role) is not allowed either.

Results are cached per (sub-topic, claims, headers) in a
:class:`~tidings.auth.policy.PermissionCache`; concurrent checks of one key share one query. A
missing partition (the maintenance did not run) is created on the spot and the check retried.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors

from tidings.auth.policy import (
    ALLOW_ALL,
    EXTENSIONS,
    AuthorizationContext,
    AuthorizationUnavailable,
    PermissionCache,
    Permissions,
    restrict_read,
    restrict_write,
)
from tidings.cdc import catalog
from tidings.cdc.catalog import ConnectionPool
from tidings.db.partitions import maintain_partitions
from tidings.logs import Clipped, first_line
from tidings.protocol import errors

__all__ = [
    "DEFAULT_STATEMENT_TIMEOUT",
    "MissingPartition",
    "RlsAuthorizer",
    "check_read",
    "check_write",
]

log = logging.getLogger("tidings.db")

T = TypeVar("T")

DEFAULT_STATEMENT_TIMEOUT = 5.0
"""Seconds a check's statements may run (slow policies); beyond, the check is unavailable."""

_SET_CONFIG = (
    "SELECT set_config('role', %s, true), set_config('realtime.topic', %s, true), "
    "set_config('request.jwt.claims', %s, true), set_config('request.jwt.claim.sub', %s, true), "
    "set_config('request.jwt.claim.role', %s, true), set_config('request.headers', %s, true)"
)


_SKIPS_RLS = (
    "SELECT EXISTS (SELECT FROM pg_roles r, pg_class c WHERE r.rolname = %s "
    "AND c.oid = 'realtime.messages'::regclass AND (r.rolname = current_user OR r.rolsuper "
    "OR r.rolbypassrls OR pg_has_role(r.oid, c.relowner, 'USAGE')))"
)
"""True when the JWT's role would skip row level security on ``realtime.messages``: a superuser,
a ``BYPASSRLS`` role, this connection's own role, or one with the privileges of the table's owner
(``supabase_realtime_admin`` in a database Supabase migrated). Refused before switching."""


class MissingPartition(AuthorizationUnavailable):
    """``realtime.messages`` has no partition for today: the probe row has nowhere to go."""

    def __init__(self, detail: str) -> None:
        super().__init__(errors.MISSING_PARTITION, errors.DATABASE_UNAVAILABLE_MESSAGE, detail)


def _config_params(context: AuthorizationContext) -> list[Any]:
    return [context.role, context.topic, context.claims_json, context.sub, context.role, context.headers_json]


def _rollback(conn: Any, cur: Any) -> None:
    if conn.closed:
        return
    try:
        cur.execute("ROLLBACK")
    except psycopg2.Error:
        conn.close()  # the pool drops a closed connection


def _unavailable(exc: psycopg2.Error) -> AuthorizationUnavailable:
    if isinstance(exc, psycopg2.errors.QueryCanceled):
        return AuthorizationUnavailable(
            f"QueryCanceled: {first_line(exc)}", "Query was cancelled, please try again", first_line(exc)
        )
    if isinstance(exc, psycopg2.errors.CheckViolation):
        return MissingPartition(first_line(exc))
    return AuthorizationUnavailable(
        errors.DATABASE_UNAVAILABLE, errors.DATABASE_UNAVAILABLE_MESSAGE, first_line(exc)
    )


def _policy_error(context: AuthorizationContext, check: str, exc: psycopg2.Error) -> None:
    log.warning(
        "RlsPolicyError: the %s check of realtime.messages for topic %s as role %s failed, not allowed: %s",
        check,
        Clipped(context.topic),
        Clipped(context.role),
        Clipped(first_line(exc)),
    )


def _privileged_role(context: AuthorizationContext) -> None:
    log.warning(
        "a token with role %s asked for topic %s: that role skips row level security (a superuser, "
        "BYPASSRLS, or the owner of realtime.messages), not allowed",
        Clipped(context.role),
        Clipped(context.topic),
    )


def check_read(
    conn: Any,
    context: AuthorizationContext,
    *,
    presence: bool = True,
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
) -> Permissions:
    """Supabase's read check on the autocommit connection *conn* (blocking).

    Returns:
        Broadcast read (and presence read when *presence*) evaluated; the other values None.

    Raises:
        AuthorizationUnavailable: the probe could not be inserted (no ``realtime.messages``, a
            role that does not own it), a :class:`MissingPartition`, or a statement timeout.
        psycopg2.OperationalError: the connection failed (worth retrying).
    """
    extensions = EXTENSIONS if presence else ("broadcast",)
    denied = Permissions.of(False, None, False if presence else None, None)
    if context.role is None:
        return denied
    ids = {ext: str(uuid.uuid4()) for ext in extensions}
    values = ", ".join("(%s::uuid, %s, %s)" for _ in ids)
    params: list[Any] = [int(statement_timeout * 1000)]
    for ext, probe_id in ids.items():
        params += [probe_id, context.topic, ext]
    with conn.cursor() as cur:
        try:
            try:
                cur.execute(
                    "BEGIN; SET LOCAL statement_timeout = %s; "
                    f"INSERT INTO realtime.messages (id, topic, extension) VALUES {values}; {_SKIPS_RLS}",
                    [*params, context.role],
                )
                skips_rls = bool(cur.fetchone()[0])
            except psycopg2.errors.QueryCanceled as exc:  # an OperationalError, but not the connection's
                raise _unavailable(exc) from None
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                raise
            except psycopg2.Error as exc:
                raise _unavailable(exc) from None
            if skips_rls:
                _privileged_role(context)
                return denied
            try:
                cur.execute(
                    f"{_SET_CONFIG}; SELECT id::text FROM realtime.messages WHERE id = ANY(%s::uuid[])",
                    [*_config_params(context), list(ids.values())],
                )
                visible = {str(row[0]) for row in cur.fetchall()}
            except psycopg2.errors.QueryCanceled as exc:
                raise _unavailable(exc) from None
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                raise
            except psycopg2.Error as exc:
                _policy_error(context, "read", exc)
                return denied
        finally:
            _rollback(conn, cur)
    broadcast = ids["broadcast"] in visible
    presence_read = (ids["presence"] in visible) if presence else None
    return Permissions.of(broadcast, None, presence_read, None)


def check_write(
    conn: Any,
    context: AuthorizationContext,
    *,
    presence: bool = True,
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
) -> Permissions:
    """Supabase's write check on the autocommit connection *conn* (blocking).

    Returns:
        Broadcast write (and presence write when *presence*) evaluated; the other values None.

    Raises:
        AuthorizationUnavailable: a :class:`MissingPartition`, a statement timeout, or a database
            that refuses the transaction itself.
        psycopg2.OperationalError: the connection failed (worth retrying).
    """
    extensions = EXTENSIONS if presence else ("broadcast",)
    denied = Permissions.of(None, False, None, False if presence else None)
    if context.role is None:
        return denied
    allowed: dict[str, bool] = {}
    with conn.cursor() as cur:
        try:
            try:
                cur.execute(
                    f"BEGIN; SET LOCAL statement_timeout = %s; {_SKIPS_RLS}",
                    [int(statement_timeout * 1000), context.role],
                )
                skips_rls = bool(cur.fetchone()[0])
            except psycopg2.errors.QueryCanceled as exc:  # an OperationalError, but not the connection's
                raise _unavailable(exc) from None
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                raise
            except psycopg2.Error as exc:
                raise _unavailable(exc) from None
            if skips_rls:
                _privileged_role(context)
                return denied
            try:
                cur.execute(_SET_CONFIG, _config_params(context))
            except psycopg2.errors.QueryCanceled as exc:
                raise _unavailable(exc) from None
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                raise
            except psycopg2.Error as exc:
                _policy_error(context, "write", exc)
                return denied
            for ext in extensions:
                try:
                    cur.execute(
                        "SAVEPOINT tidings_write_check; "
                        "INSERT INTO realtime.messages (topic, extension) VALUES (%s, %s)",
                        [context.topic, ext],
                    )
                    allowed[ext] = True
                except psycopg2.errors.InsufficientPrivilege:
                    allowed[ext] = False
                    cur.execute("ROLLBACK TO SAVEPOINT tidings_write_check")
                except (psycopg2.errors.QueryCanceled, psycopg2.errors.CheckViolation) as exc:
                    raise _unavailable(exc) from None
                except (psycopg2.OperationalError, psycopg2.InterfaceError):
                    raise
                except psycopg2.Error as exc:
                    _policy_error(context, "write", exc)
                    return denied  # Supabase stops at the first error: nothing is writable
        finally:
            _rollback(conn, cur)
    return Permissions.of(None, allowed["broadcast"], None, allowed["presence"] if presence else None)


class RlsAuthorizer:
    """The :class:`~tidings.auth.policy.Authorizer` with a database: Supabase's checks, cached.

    Args:
        database_url: ``DATABASE_URL``; its role owns ``realtime.messages`` and may act as the
            JWT roles (see :mod:`tidings.db.privileges`).
        pool_size: connections (and worker threads) for checks.
        ssl: require TLS unless the URL sets ``sslmode``.
        statement_timeout: seconds a check may run before it is unavailable (``QueryCanceled``).
        cache: where results are kept (default: 50,000 entries, 16 MiB, 60 s).
        repair_partitions: on a missing partition, run the partition maintenance and retry once.
    """

    def __init__(
        self,
        database_url: str,
        *,
        pool_size: int = 5,
        ssl: bool = False,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
        cache: PermissionCache | None = None,
        repair_partitions: bool = True,
    ) -> None:
        self._dsn = catalog.connection_dsn(database_url, ssl=ssl, application_name="tidings-authorization")
        self._where = catalog.describe_dsn(self._dsn)
        self._pool_size = max(1, pool_size)
        self._pool: ConnectionPool | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.statement_timeout = statement_timeout
        self.cache = cache if cache is not None else PermissionCache()
        self.repair_partitions = repair_partitions
        self._inflight: dict[tuple[str, tuple[str, str, str], bool], asyncio.Task[Permissions]] = {}
        self.queries = 0
        """Check transactions run (cache misses)."""
        self.cache_hits = 0
        """Checks answered from the cache."""

    def read_now(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions | None:
        """The read permissions without a query (``service_role``, a live cache entry), or None."""
        if context.is_service_role:
            return restrict_read(ALLOW_ALL, presence=presence)
        if not refresh:
            cached = self.cache.get(context.key)
            if (
                cached is not None
                and cached.broadcast_read is not None
                and (not presence or cached.presence_read is not None)
            ):
                self.cache_hits += 1
                return restrict_read(cached, presence=presence)
        return None

    def write_now(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions | None:
        """The write permissions without a query (``service_role``, a live cache entry), or None."""
        if context.is_service_role:
            return restrict_write(ALLOW_ALL, presence=presence)
        if not refresh:
            cached = self.cache.get(context.key)
            if (
                cached is not None
                and cached.broadcast_write is not None
                and (not presence or cached.presence_write is not None)
            ):
                self.cache_hits += 1
                return restrict_write(cached, presence=presence)
        return None

    async def read(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions:
        """Read permissions (see :meth:`tidings.auth.policy.Authorizer.read`)."""
        known = self.read_now(context, presence=presence, refresh=refresh)
        if known is not None:
            return known
        result = await self._shared("read", context, presence, check_read)
        return restrict_read(result, presence=presence)

    async def write(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions:
        """Write permissions (see :meth:`tidings.auth.policy.Authorizer.write`)."""
        known = self.write_now(context, presence=presence, refresh=refresh)
        if known is not None:
            return known
        result = await self._shared("write", context, presence, check_write)
        return restrict_write(result, presence=presence)

    def invalidate(self, context: AuthorizationContext | None = None) -> None:
        """Forget the cached results of *context* (all of them when None)."""
        self.cache.invalidate(None if context is None else context.key)

    async def close(self) -> None:
        """Close the connections; later checks open new ones."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def _shared(
        self,
        kind: str,
        context: AuthorizationContext,
        presence: bool,
        check: Callable[..., Permissions],
    ) -> Permissions:
        # One task per key: concurrent joins of one user share it, and a caller that goes away
        # (its client disconnected) does not cancel the others' check.
        key = (kind, context.key, presence)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._evaluate(context, presence, check))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task)

    def _finished(self, key: tuple[str, tuple[str, str, str], bool], task: asyncio.Task[Permissions]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled():
            return
        exc = task.exception()  # retrieved even when every caller went away
        if exc is None:
            self.cache.put(key[1], task.result())

    async def _evaluate(
        self, context: AuthorizationContext, presence: bool, check: Callable[..., Permissions]
    ) -> Permissions:
        for attempt in (1, 2):
            try:
                self.queries += 1
                return await self._db(
                    check, context, presence=presence, statement_timeout=self.statement_timeout
                )
            except MissingPartition as exc:
                if attempt == 2 or not self.repair_partitions:
                    raise
                log.warning(
                    "realtime.messages lacks today's partition (%s): creating the partitions now", exc.detail
                )
                try:
                    await self._db(maintain_partitions)
                except psycopg2.Error as repair:
                    log.error("creating the partitions of realtime.messages failed: %s", first_line(repair))
                    raise exc from None
            except (psycopg2.OperationalError, psycopg2.InterfaceError, RuntimeError) as exc:
                raise AuthorizationUnavailable(
                    errors.DATABASE_UNAVAILABLE,
                    errors.DATABASE_UNAVAILABLE_MESSAGE,
                    f"PostgreSQL at {self._where}: {first_line(exc)}",
                ) from None
        raise AssertionError("unreachable")

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._pool is None or self._executor is None:
            self._executor = ThreadPoolExecutor(self._pool_size, thread_name_prefix="tidings-authz")
            self._pool = ConnectionPool(self._dsn, self._pool_size)
        pool = self._pool

        def call() -> T:
            return pool.run(lambda conn: fn(conn, *args, **kwargs))

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)
