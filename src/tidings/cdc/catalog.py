"""Blocking catalog access with psycopg2: setup checks, publication and slot, table metadata.

Everything here runs in worker threads (the service wraps calls with ``run_in_executor``) or in the
replication thread; nothing here touches asyncio. Connections are autocommit: an idle transaction
would hold a snapshot, and creating a logical slot waits for every open transaction to finish.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from tidings.cdc.values import PgType, builtin_type, catalog_type, unknown_type
from tidings.logs import first_line

__all__ = [
    "CheckFailed",
    "ColumnInfo",
    "ConnectionPool",
    "NotYetVisible",
    "PostgresChangesError",
    "TableSecurity",
    "check_server",
    "connect",
    "connection_dsn",
    "current_wal_lsn",
    "describe_dsn",
    "ensure_publication",
    "ensure_slot",
    "primary_key",
    "publication_tables",
    "resolve_type",
    "server_timezone",
    "slot_confirmed_lsn",
    "slot_lag",
    "table_columns",
    "table_security",
    "visible_keys",
]

log = logging.getLogger("tidings.cdc")

T = TypeVar("T")


class PostgresChangesError(RuntimeError):
    """Postgres Changes cannot run against this database; the message is one line saying why."""


class CheckFailed(Exception):
    """An RLS visibility check failed for a reason other than a lost connection (one line)."""


class NotYetVisible(Exception):
    """An RLS check ran before the changes' transactions were visible to its snapshot: run it again.

    The stream brings a commit once its WAL is flushed; the committing session leaves the list of
    running transactions a moment later (after a synchronous standby acknowledged it, with
    synchronous replication). Until then no other session sees its rows.
    """


def connection_dsn(dsn: str, *, ssl: bool = False, **extra: str) -> str:
    """*dsn* with Tidings' connection settings merged in (``sslmode=require`` when *ssl*)."""
    params = psycopg2.extensions.parse_dsn(dsn)
    if ssl and "sslmode" not in params:
        extra["sslmode"] = "require"
    extra_options = extra.pop("options", "")
    if extra_options:
        extra["options"] = (params.get("options", "") + " " + extra_options).strip()
    params.update(extra)
    params.setdefault("application_name", "tidings")
    # Notice a dead peer within ~25 s even when the link is silent.
    for key, value in (
        ("keepalives", "1"),
        ("keepalives_idle", "10"),
        ("keepalives_interval", "5"),
        ("keepalives_count", "3"),
        ("connect_timeout", "10"),
    ):
        params.setdefault(key, value)
    return str(psycopg2.extensions.make_dsn(**params))


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` for messages (never the password)."""
    try:
        p = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "<invalid database URL>"
    return f"{p.get('host', 'localhost')}:{p.get('port', '5432')}/{p.get('dbname', p.get('user', ''))}"


def connect(dsn: str, **kwargs: Any) -> Any:
    """An autocommit psycopg2 connection."""
    conn = psycopg2.connect(dsn, **kwargs)
    conn.autocommit = True
    return conn


class ConnectionPool:
    """At most *size* autocommit connections, handed to one thread at a time.

    A connection that raised :class:`psycopg2.OperationalError` or :class:`psycopg2.InterfaceError`
    (PostgreSQL restarted, network cut) is thrown away; the next use opens a fresh one.
    """

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[Any]:
        self._slots.acquire()
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = connect(self._dsn)
            try:
                yield conn
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                conn.close()
                conn = None
                raise
        finally:
            if conn is not None:
                if self._closed or conn.closed:
                    conn.close()
                else:
                    self._idle.put(conn)
            self._slots.release()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` on a pooled connection; retried once on a connection that went stale."""
        for attempt in (1, 2):
            try:
                with self.connection() as conn:
                    return fn(conn, *args)
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def _rows(conn: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []


# --------------------------------------------------------------------------------------------
# Setup: server settings, publication, slot
# --------------------------------------------------------------------------------------------


def check_server(conn: Any) -> None:
    """Require ``wal_level = logical`` and a role with REPLICATION (or superuser)."""
    ((wal_level, role, is_super, can_replicate),) = _rows(
        conn,
        "SELECT current_setting('wal_level'), current_user, r.rolsuper, r.rolreplication "
        "FROM pg_roles r WHERE r.rolname = current_user",
    )
    if wal_level != "logical":
        raise PostgresChangesError(
            f"PostgreSQL wal_level is '{wal_level}', Postgres Changes needs wal_level = logical "
            "(set it in postgresql.conf and restart PostgreSQL)"
        )
    if not (is_super or can_replicate):
        raise PostgresChangesError(
            f"database role '{role}' lacks the REPLICATION privilege (ALTER ROLE \"{role}\" REPLICATION)"
        )


def ensure_publication(conn: Any, name: str) -> bool:
    """Create publication *name* ``FOR ALL TABLES`` unless it exists; True if it was created.

    An existing publication is used as it is: a user who listed tables in it keeps that choice.
    """
    if _rows(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)):
        return False
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE PUBLICATION {_ident(conn, name)} FOR ALL TABLES")
    except psycopg2.errors.DuplicateObject:
        return False  # created concurrently by another node
    except psycopg2.errors.InsufficientPrivilege:
        raise PostgresChangesError(
            f"publication '{name}' does not exist and this role may not create it FOR ALL TABLES "
            f"(needs superuser): run CREATE PUBLICATION {name} FOR TABLE ... as an administrator"
        ) from None
    log.info("created publication %s FOR ALL TABLES", name)
    return True


def ensure_slot(conn: Any, slot: str) -> bool:
    """Create the permanent pgoutput slot *slot* in this database unless it exists; True if created."""
    rows = _rows(
        conn,
        "SELECT plugin, database, slot_type FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    if rows:
        plugin, database, slot_type = rows[0]
        ((current_db,),) = _rows(conn, "SELECT current_database()")
        if slot_type != "logical" or plugin != "pgoutput" or database != current_db:
            raise PostgresChangesError(
                f"replication slot '{slot}' exists but is a {slot_type} slot for plugin {plugin!r} "
                f"in database {database!r}; Tidings needs a logical pgoutput slot in {current_db!r} "
                "(choose another slot name)"
            )
        return False
    try:
        _rows(conn, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    except psycopg2.errors.DuplicateObject:
        return False
    except psycopg2.errors.ConfigurationLimitExceeded as exc:
        raise PostgresChangesError(f"cannot create replication slot '{slot}': {first_line(exc)}") from None
    log.info("created logical replication slot %s (pgoutput)", slot)
    return True


def _ident(conn: Any, name: str) -> str:
    return str(psycopg2.extensions.quote_ident(name, conn))


def server_timezone(conn: Any) -> str:
    """The database's ``TimeZone`` setting (how it reads zone-less timestamps)."""
    ((zone,),) = _rows(conn, "SELECT current_setting('TimeZone')")
    return str(zone)


def slot_lag(conn: Any, slot: str) -> int | None:
    """Bytes of WAL between the server's current position and the slot's confirmed position."""
    rows = _rows(
        conn,
        "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots "
        "WHERE slot_name = %s",
        (slot,),
    )
    if not rows or rows[0][0] is None:
        return None
    return max(0, int(rows[0][0]))


def current_wal_lsn(conn: Any) -> int:
    """The server's current WAL write position (no stream has produced a position beyond it)."""
    ((lsn,),) = _rows(conn, "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
    return int(lsn)


def slot_confirmed_lsn(conn: Any, slot: str) -> int:
    """The slot's confirmed position (0 when unknown): where its next stream starts."""
    rows = _rows(
        conn,
        "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


# --------------------------------------------------------------------------------------------
# Tables and types
# --------------------------------------------------------------------------------------------


def publication_tables(conn: Any, publication: str, schema: str, table: str) -> list[tuple[str, str]]:
    """Tables of *publication* matching *schema*/*table* (``*`` matches any), sorted."""
    return [
        (str(s), str(t))
        for s, t in _rows(
            conn,
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s "
            "AND (%s = '*' OR schemaname = %s) AND (%s = '*' OR tablename = %s) ORDER BY 1, 2",
            (publication, schema, schema, table, table),
        )
    ]


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """A column as the subscription checks see it."""

    name: str
    typname: str
    """``pg_type.typname`` (for ``columns``)."""
    filter_typname: str
    """The type filters compare by: a domain's base type, else :attr:`typname`."""
    selectable: bool
    """The subscriber's role may SELECT it (True when the role does not exist here)."""
    primary_key: bool


def table_columns(conn: Any, schema: str, table: str, role: str | None) -> list[ColumnInfo]:
    """Columns of ``schema.table`` in attnum order, with privileges for *role* when it exists."""
    rows = _rows(
        conn,
        """
        SELECT a.attname, t.typname,
               CASE WHEN t.typtype = 'd' THEN bt.typname ELSE t.typname END,
               CASE WHEN r.oid IS NULL THEN true
                    ELSE has_column_privilege(r.oid, a.attrelid, a.attnum, 'SELECT') END,
               COALESCE(a.attnum = ANY(i.indkey), false)
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_type bt ON bt.oid = t.typbasetype
        LEFT JOIN pg_roles r ON r.rolname = %s
        LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
        WHERE n.nspname = %s AND c.relname = %s
        ORDER BY a.attnum
        """,
        (role, schema, table),
    )
    return [ColumnInfo(str(a), str(b), str(c), bool(d), bool(e)) for a, b, c, d, e in rows]


def primary_key(conn: Any, relation_id: int) -> tuple[str, ...]:
    """Primary key column names of the table with this OID, in key order (empty: no PK)."""
    rows = _rows(
        conn,
        "SELECT a.attname FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = %s AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
        (relation_id,),
    )
    return tuple(str(r[0]) for r in rows)


def resolve_type(conn: Any, oid: int, _depth: int = 0) -> PgType:
    """The :class:`PgType` of *oid*, asking ``pg_type`` for non-built-in types."""
    known = builtin_type(oid)
    if known is not None:
        return known
    rows = _rows(
        conn,
        "SELECT typname, typtype, typcategory, typbasetype, typelem, typdelim, typrelid FROM pg_type "
        "WHERE oid = %s",
        (oid,),
    )
    if not rows or _depth > 8:
        return unknown_type(oid)
    name, typtype, category, base_oid, elem_oid, delim, relid = rows[0]
    base = resolve_type(conn, int(base_oid), _depth + 1) if typtype == "d" and base_oid else None
    element = resolve_type(conn, int(elem_oid), _depth + 1) if category == "A" and elem_oid else None
    fields: tuple[tuple[str, PgType], ...] = ()
    if typtype == "c" and relid:
        attrs = _rows(
            conn,
            "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            (relid,),
        )
        fields = tuple((str(a), resolve_type(conn, int(t), _depth + 1)) for a, t in attrs)
    return catalog_type(
        oid,
        str(name),
        str(typtype),
        str(category),
        base=base,
        element=element,
        delimiter=str(delim),
        fields=fields,
    )


# --------------------------------------------------------------------------------------------
# Row level security (DB_RLS)
# --------------------------------------------------------------------------------------------

RLS_STATEMENT_TIMEOUT_MS = 10_000
"""A visibility check running longer fails (the rows count as not visible): a slow policy must not
hold up every delivery behind it."""


@dataclass(frozen=True, slots=True)
class TableSecurity:
    """What RLS checks need to know about a table."""

    enabled: bool
    """``pg_class.relrowsecurity``."""
    key_types: dict[str, str]
    """Primary key column -> its type, schema-qualified and quoted for a cast."""


def table_security(conn: Any, schema: str, table: str) -> TableSecurity:
    """Whether ``schema.table`` has row level security enabled, and its key columns' types.

    A table that is gone counts as enabled: nothing is delivered unchecked from a table that
    cannot be looked at.
    """
    rows = _rows(
        conn,
        """
        SELECT c.relrowsecurity, a.attname, quote_ident(tn.nspname) || '.' || quote_ident(t.typname)
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
        LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
        LEFT JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_namespace tn ON tn.oid = t.typnamespace
        WHERE n.nspname = %s AND c.relname = %s
        """,
        (schema, table),
    )
    if not rows:
        return TableSecurity(True, {})
    return TableSecurity(bool(rows[0][0]), {str(r[1]): str(r[2]) for r in rows if r[1] is not None})


def _key_text(value: Any) -> str | None:
    """A key value of a change's record in the type's text input form (None: not a scalar)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # the record holds a float only when repr() is exact
    if isinstance(value, str):
        return value
    return None


_check_queries: dict[tuple[str, str, tuple[str, ...], tuple[str | None, ...]], str] = {}
"""Check statements by table, key columns and how each is compared (the text is the same for
every role and claims): composing one costs more than the rest of the Python side of a check."""


def _check_query(
    conn: Any, schema: str, table: str, key_columns: Sequence[str], typed: Sequence[str | None]
) -> str:
    """The statement :func:`visible_keys` runs, as text with %s placeholders.

    No BEGIN/ROLLBACK: the statements of one query string form one implicit transaction, so the
    ``set_config(..., true)`` settings (the role too, as ``SET LOCAL ROLE`` does) end with it,
    and nothing is written. One round trip per check.
    """
    # The arrays are cast, not the values in the join: under row level security only a leakproof
    # condition may run before the policy, and a cast (int8in, ...) is not one. ``r.id = k.k0``
    # with k0 already an int8 is (int8eq), so the primary key index is used rather than the
    # policy being evaluated on every row of the table.
    conditions: list[sql.Composable] = []
    arrays: list[sql.Composable] = []
    for j, (column, type_name) in enumerate(zip(key_columns, typed, strict=True)):
        name = sql.Identifier(f"k{j}")
        if type_name is not None:
            arrays.append(sql.SQL("%s::text[]::{}[]").format(sql.SQL(type_name)))
            cond = sql.SQL("r.{} = k.{}").format(sql.Identifier(column), name)
        else:
            arrays.append(sql.SQL("%s::text[]::jsonb[]"))
            cond = sql.SQL("to_jsonb(r.{}) = k.{}").format(sql.Identifier(column), name)
        conditions.append(cond)
    query = sql.SQL(
        "SELECT set_config('role', %s, true), set_config('statement_timeout', {timeout}, true), "
        "set_config('request.jwt.claims', %s, true), set_config('request.jwt.claim.sub', %s, true), "
        "set_config('request.jwt.claim.role', %s, true); "
        "SELECT k.n - 1 FROM unnest({arrays}) WITH ORDINALITY AS k({names}, n) "
        "WHERE EXISTS (SELECT 1 FROM {schema}.{table} r WHERE {conditions}) "
        # -1: a writer is still running for this statement's snapshot. The 32-bit xid becomes a
        # 64-bit one by its distance below the snapshot's xmax (it was assigned before it).
        "UNION ALL SELECT -1 FROM unnest(%s::int8[]) AS x(xid), "
        "(SELECT s, txid_snapshot_xmax(s) AS m FROM txid_current_snapshot() AS s) AS snap "
        "WHERE NOT txid_visible_in_snapshot(m - ((m - x.xid) %% 4294967296 + 4294967296) %% 4294967296, s)"
    ).format(
        timeout=sql.Literal(str(RLS_STATEMENT_TIMEOUT_MS)),
        arrays=sql.SQL(", ").join(arrays),
        names=sql.SQL(", ").join(sql.Identifier(f"k{j}") for j in range(len(key_columns))),
        schema=sql.Identifier(schema),
        table=sql.Identifier(table),
        conditions=sql.SQL(" AND ").join(conditions),
    )
    return str(query.as_string(conn))


def visible_keys(
    conn: Any,
    schema: str,
    table: str,
    key_columns: Sequence[str],
    key_types: Mapping[str, str],
    role: str,
    claims_json: str,
    keys: Sequence[Sequence[Any]],
    xids: Sequence[int] = (),
) -> set[int]:
    """Indexes into *keys* (primary key values, in *key_columns* order) of the rows that *role*
    with these JWT claims may SELECT under the table's row level security policies.

    *xids* are the 32-bit ids of the transactions that wrote the rows. The same statement (so the
    same snapshot) checks that each of them is visible; :class:`NotYetVisible` says one is not yet.

    As Supabase does: in one transaction that writes nothing, the role (as ``SET LOCAL ROLE``),
    ``request.jwt.claims`` (and the older ``request.jwt.claim.sub`` / ``request.jwt.claim.role``),
    then a ``SELECT`` by primary key. One statement checks every key: the values travel as text
    arrays, cast to each key column's type (from *key_types*) so the primary key index is used. A
    column of arrays or composites (JSON in the record), or of unknown type, is compared with
    ``to_jsonb``. *conn* must be in autocommit mode (the pool's are): the check is then one
    implicit transaction, and nothing of it stays on the connection.

    Raises:
        NotYetVisible: a transaction of *xids* is still running for this snapshot (try again).
        CheckFailed: the check itself failed: a role missing from the database, a role this
            connection may not switch to, no SELECT privilege, a policy raising, the statement
            timeout, ...
        psycopg2.OperationalError: the connection failed (worth retrying).
    """
    try:
        claims = json.loads(claims_json)
    except ValueError:
        claims = {}
    sub = claims.get("sub") if isinstance(claims, dict) else None
    arrays: list[list[str]] = []
    typed: list[str | None] = []  # per key column: the cast, or None to compare as JSON
    for j, column in enumerate(key_columns):
        texts = [_key_text(key[j]) for key in keys]
        type_name = key_types.get(column)
        if type_name is not None and all(t is not None for t in texts):
            arrays.append([t for t in texts if t is not None])
            typed.append(type_name)
        else:
            arrays.append([json.dumps(key[j]) for key in keys])
            typed.append(None)
    shape = (schema, table, tuple(key_columns), tuple(typed))
    query = _check_queries.get(shape)
    if query is None:
        if len(_check_queries) >= 1024:
            _check_queries.clear()
        query = _check_queries[shape] = _check_query(conn, schema, table, key_columns, typed)
    params: list[Any] = [role, claims_json, "" if sub is None else str(sub), role, *arrays, sorted(set(xids))]
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(query, params)
                visible = {int(row[0]) for row in cur.fetchall()}
            finally:
                if not conn.autocommit and not conn.closed:
                    conn.rollback()  # an explicit transaction would keep the role and claims
    except psycopg2.errors.QueryCanceled as exc:
        raise CheckFailed(first_line(exc)) from None
    except (psycopg2.OperationalError, psycopg2.InterfaceError):
        raise
    except psycopg2.Error as exc:
        raise CheckFailed(first_line(exc)) from None
    if -1 in visible:
        raise NotYetVisible()
    return visible
