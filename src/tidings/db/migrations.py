"""Tenant migrations: the ``realtime`` schema Supabase Realtime keeps, created and kept current.

Supabase Realtime migrates the database it serves ("tenant migrations", ``priv/repo/tenant_schema/``
and ``lib/realtime/tenants/repo/migrations/`` in supabase/realtime). Tidings creates the part of
that schema its features use, with Supabase's names, columns, defaults and function bodies:

* the role ``supabase_realtime_admin`` (when missing) and ``USAGE`` on schema ``realtime`` for
  ``anon``, ``authenticated`` and ``service_role``;
* ``realtime.messages``, partitioned by range on ``inserted_at``, primary key
  ``(id, inserted_at)``, the ``messages_payload_exclusive`` check, row level security enabled,
  ``INSERT, SELECT, UPDATE`` for the API roles and the replay index
  ``messages_inserted_at_topic_index``;
* ``realtime.topic()``, ``realtime.send()``, ``realtime.send_binary()`` and
  ``realtime.broadcast_changes()``.

The applied versions are rows of ``realtime.schema_migrations (version bigint, inserted_at
timestamp(0))``, the table Supabase's migrator (Ecto) keeps. Tidings' versions are small integers
(1, 2, 3, ...) that never collide with Supabase's timestamps, and each side ignores the other's.

A run takes ``pg_advisory_xact_lock`` and applies every pending migration in one transaction, so
nodes starting together apply each migration once and a failure leaves nothing half done. Every
step looks before it acts (a database that Supabase Realtime already migrated keeps its objects),
so it is also safe on a database whose ``realtime`` schema exists and is empty, or is complete.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tidings.db.partitions import PartitionReport, maintain_partitions
from tidings.db.privileges import (
    ADMIN_ROLE,
    API_ROLES,
    DatabaseSetupError,
    check_privileges,
    quote_ident,
)

__all__ = [
    "BROADCAST_CHANGES_SQL",
    "MIGRATIONS",
    "MIGRATION_LOCK_KEY",
    "SEND_BINARY_SQL",
    "SEND_SQL",
    "TOPIC_SQL",
    "DatabaseSetupError",
    "Migration",
    "SetupReport",
    "applied_versions",
    "migrate",
    "prepare",
    "prepare_database",
]

log = logging.getLogger("tidings.db")

MIGRATION_LOCK_KEY = 0x74696469_6E677301
"""``pg_advisory_xact_lock`` key of the migrations ("tiding" + 0x73 0x01)."""
LOCK_TIMEOUT = "60s"
"""How long a node waits for another node's migrations before it gives up."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One version: *apply* runs on a cursor inside the migration transaction."""

    version: int
    name: str
    apply: Callable[[Any], None]


def _one(cur: Any, sql: str, params: Any = None) -> Any:
    cur.execute(sql, params)
    row = cur.fetchone()
    return None if row is None else row[0]


def _existing_api_roles(cur: Any) -> list[str]:
    cur.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s) ORDER BY 1", (list(API_ROLES),))
    found = [str(r[0]) for r in cur.fetchall()]
    missing = [r for r in API_ROLES if r not in found]
    if missing:
        log.warning(
            "roles %s do not exist: not granted on schema realtime (create them, then run GRANT USAGE "
            "ON SCHEMA realtime TO ...; GRANT INSERT, SELECT, UPDATE ON realtime.messages TO ...)",
            ", ".join(missing),
        )
    return [r for r in API_ROLES if r in found]


# --------------------------------------------------------------------------------------------
# 1: the admin role and the schema's grants
# --------------------------------------------------------------------------------------------

_CREATE_ADMIN_ROLE = f"""
DO $do$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{ADMIN_ROLE}') THEN
    CREATE ROLE {ADMIN_ROLE} WITH NOINHERIT NOLOGIN NOREPLICATION;
  END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
  NULL; -- created meanwhile by a node migrating another database of the cluster
END
$do$
"""


def _grant_api_roles_to_admin(cur: Any) -> None:
    import psycopg2

    # Supabase's admin role is a member of the API roles; where this role may not grant that
    # (PostgreSQL 16+ without ADMIN OPTION on them), the admin role simply stays without.
    for role in _existing_api_roles(cur):
        cur.execute("SAVEPOINT grant_admin")
        try:
            cur.execute(f"GRANT {quote_ident(role)} TO {ADMIN_ROLE}")
        except psycopg2.Error:
            cur.execute("ROLLBACK TO SAVEPOINT grant_admin")
        else:
            cur.execute("RELEASE SAVEPOINT grant_admin")


def _schema_grants(cur: Any) -> None:
    existed = bool(_one(cur, "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = %s)", (ADMIN_ROLE,)))
    cur.execute(_CREATE_ADMIN_ROLE)
    if not existed:
        _grant_api_roles_to_admin(cur)
    lacking = [
        r
        for r in _existing_api_roles(cur)
        if not _one(cur, "SELECT has_schema_privilege(%s, 'realtime', 'USAGE')", (r,))
    ]
    if lacking:
        cur.execute(f"GRANT USAGE ON SCHEMA realtime TO {', '.join(quote_ident(r) for r in lacking)}")
    can_grant = _one(
        cur,
        "SELECT pg_has_role(current_user, nspowner, 'USAGE') FROM pg_namespace WHERE nspname = 'realtime'",
    )
    if can_grant and not _one(cur, "SELECT has_schema_privilege(%s, 'realtime', 'CREATE')", (ADMIN_ROLE,)):
        cur.execute(f"GRANT CREATE, USAGE ON SCHEMA realtime TO {ADMIN_ROLE} WITH GRANT OPTION")


# --------------------------------------------------------------------------------------------
# 2: realtime.messages
# --------------------------------------------------------------------------------------------

_CREATE_MESSAGES = """
CREATE TABLE realtime.messages (
  topic          text                        NOT NULL,
  extension      text                        NOT NULL,
  payload        jsonb,
  event          text,
  private        boolean                     DEFAULT false,
  updated_at     timestamp without time zone DEFAULT now() NOT NULL,
  inserted_at    timestamp without time zone DEFAULT now() NOT NULL,
  id             uuid                        DEFAULT gen_random_uuid() NOT NULL,
  binary_payload bytea
) PARTITION BY RANGE (inserted_at)
"""


def _messages(cur: Any) -> None:
    kind = _one(
        cur,
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'realtime' AND c.relname = 'messages'",
    )
    if kind is None:
        cur.execute(_CREATE_MESSAGES)
    elif kind != "p":
        raise DatabaseSetupError(
            "realtime.messages exists but is not partitioned (an old Supabase Realtime schema?): "
            "rename or drop it, then start Tidings again"
        )
    elif not _one(
        cur,
        "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'realtime.messages'::regclass "
        "AND attname = 'binary_payload' AND NOT attisdropped)",
    ):
        cur.execute("ALTER TABLE realtime.messages ADD COLUMN binary_payload bytea")

    def constraint(name: str) -> bool:
        return bool(
            _one(
                cur,
                "SELECT EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'realtime.messages'::regclass "
                "AND conname = %s)",
                (name,),
            )
        )

    if not constraint("messages_payload_exclusive"):
        cur.execute(
            "ALTER TABLE realtime.messages ADD CONSTRAINT messages_payload_exclusive "
            "CHECK (((payload IS NULL) OR (binary_payload IS NULL))) NOT VALID"
        )
    if not _one(
        cur,
        "SELECT EXISTS (SELECT FROM pg_index "
        "WHERE indrelid = 'realtime.messages'::regclass AND indisprimary)",
    ):
        cur.execute(
            "ALTER TABLE realtime.messages ADD CONSTRAINT messages_pkey PRIMARY KEY (id, inserted_at)"
        )
    if not _one(cur, "SELECT to_regclass('realtime.messages_inserted_at_topic_index') IS NOT NULL"):
        cur.execute(
            "CREATE INDEX messages_inserted_at_topic_index ON realtime.messages "
            "USING btree (inserted_at DESC, topic) "
            "WHERE ((extension = 'broadcast'::text) AND (private IS TRUE))"
        )
    if not _one(cur, "SELECT relrowsecurity FROM pg_class WHERE oid = 'realtime.messages'::regclass"):
        cur.execute("ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY")
    for role in _existing_api_roles(cur):
        missing = [
            p
            for p in ("INSERT", "SELECT", "UPDATE")
            if not _one(cur, "SELECT has_table_privilege(%s, 'realtime.messages', %s)", (role, p))
        ]
        if missing:
            cur.execute(f"GRANT {', '.join(missing)} ON TABLE realtime.messages TO {quote_ident(role)}")
    if _one(
        cur,
        "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class "
        "WHERE oid = 'realtime.messages'::regclass",
    ):
        cur.execute(f"GRANT ALL ON TABLE realtime.messages TO {ADMIN_ROLE}")


# --------------------------------------------------------------------------------------------
# 3: the functions (bodies exactly as priv/repo/tenant_schema/realtime/functions/*.sql)
# --------------------------------------------------------------------------------------------

TOPIC_SQL = """create or replace function realtime.topic()
  returns text
  language sql
  stable
  AS $function$
select nullif(current_setting('realtime.topic', true), '')::text;
$function$"""
"""``realtime.topic()``: the topic a policy is evaluated for (``SET LOCAL realtime.topic``)."""

SEND_SQL = """create or replace function realtime.send (
  payload jsonb,
  event   text,
  topic   text,
  private boolean default true
)
  returns void
  language plpgsql
  AS $function$
DECLARE
  generated_id uuid;
  final_payload jsonb;
BEGIN
  BEGIN
    generated_id := gen_random_uuid();

    -- Check if payload has an 'id' key, if not, add the generated UUID
    IF payload ? 'id' THEN
      final_payload := payload;
    ELSE
      final_payload := jsonb_set(payload, '{id}', to_jsonb(generated_id));
    END IF;

    -- Set the topic configuration
    EXECUTE format('SET LOCAL realtime.topic TO %L', topic);

    INSERT INTO realtime.messages (id, payload, event, topic, private, extension)
    VALUES (generated_id, final_payload, event, topic, private, 'broadcast');
  EXCEPTION
    WHEN OTHERS THEN
      RAISE WARNING 'WarnSendingBroadcastMessage: %', SQLERRM;
  END;
END;
$function$"""
"""``realtime.send(payload jsonb, event text, topic text, private boolean default true)``."""

SEND_BINARY_SQL = """create or replace function realtime.send_binary (
  payload bytea,
  event   text,
  topic   text,
  private boolean default true
)
  returns void
  language plpgsql
  AS $function$
DECLARE
  generated_id uuid;
BEGIN
  BEGIN
    generated_id := gen_random_uuid();

    EXECUTE format('SET LOCAL realtime.topic TO %L', topic);

    INSERT INTO realtime.messages (id, binary_payload, event, topic, private, extension)
    VALUES (generated_id, payload, event, topic, private, 'broadcast');
  EXCEPTION
    WHEN OTHERS THEN
      RAISE WARNING 'WarnSendingBroadcastMessage: %', SQLERRM;
  END;
END;
$function$"""
"""``realtime.send_binary(payload bytea, event text, topic text, private boolean default true)``."""

BROADCAST_CHANGES_SQL = """create or replace function realtime.broadcast_changes (
  topic_name   text,
  event_name   text,
  operation    text,
  table_name   text,
  table_schema text,
  new          record,
  old          record,
  level        text   default 'ROW'::text
)
  returns void
  language plpgsql
  AS $function$
DECLARE
    -- Declare a variable to hold the JSONB representation of the row
    row_data jsonb := '{}'::jsonb;
BEGIN
    IF level = 'STATEMENT' THEN
        RAISE EXCEPTION 'function can only be triggered for each row, not for each statement';
    END IF;
    -- Check the operation type and handle accordingly
    IF operation = 'INSERT' OR operation = 'UPDATE' OR operation = 'DELETE' THEN
        row_data := jsonb_build_object('old_record', OLD, 'record', NEW, 'operation', operation, 'table', table_name, 'schema', table_schema);
        PERFORM realtime.send (row_data, event_name, topic_name);
    ELSE
        RAISE EXCEPTION 'Unexpected operation type: %', operation;
    END IF;
EXCEPTION
    WHEN OTHERS THEN
        RAISE EXCEPTION 'Failed to process the row: %', SQLERRM;
END;

$function$"""  # noqa: E501 (Supabase's body, byte for byte)
"""``realtime.broadcast_changes(topic_name, event_name, operation, table_name, table_schema, new
record, old record, level text default 'ROW')``."""

_FUNCTIONS = (
    ("realtime.topic()", TOPIC_SQL),
    ("realtime.send(jsonb, text, text, boolean)", SEND_SQL),
    ("realtime.send_binary(bytea, text, text, boolean)", SEND_BINARY_SQL),
    ("realtime.broadcast_changes(text, text, text, text, text, record, record, text)", BROADCAST_CHANGES_SQL),
)


def _body(ddl: str) -> str:
    return ddl.split("$function$")[1]


def _functions(cur: Any) -> None:
    for signature, ddl in _FUNCTIONS:
        source = _one(cur, "SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(%s)", (signature,))
        if source is not None and source.strip() == _body(ddl).strip():
            continue  # already there (Supabase Realtime, or an earlier run), and owned by whoever made it
        cur.execute(ddl)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create_admin_role_and_schema_grants", _schema_grants),
    Migration(2, "create_partitioned_messages", _messages),
    Migration(3, "create_send_and_broadcast_functions", _functions),
)
"""Tidings' migrations, in version order. A new version is appended, never edited in place."""


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------

_CREATE_SCHEMA = (
    "DO $do$ BEGIN IF to_regnamespace('realtime') IS NULL THEN CREATE SCHEMA realtime; END IF; END $do$"
)

_CREATE_SCHEMA_MIGRATIONS = (
    "CREATE TABLE realtime.schema_migrations ("
    "version bigint NOT NULL CONSTRAINT schema_migrations_pkey PRIMARY KEY, "
    "inserted_at timestamp(0) without time zone DEFAULT now())"
)


def _has_migrations_table(cur: Any) -> bool:
    return bool(
        _one(
            cur,
            "SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'realtime' AND c.relname = 'schema_migrations')",
        )
    )


def applied_versions(conn: Any) -> set[int]:
    """The versions recorded in ``realtime.schema_migrations`` (Supabase's rows included; empty
    when the table or the schema does not exist)."""
    with conn.cursor() as cur:
        if not _has_migrations_table(cur):
            return set()
        cur.execute("SELECT version FROM realtime.schema_migrations")
        return {int(r[0]) for r in cur.fetchall()}


def _pending(applied: set[int], migrations: Sequence[Migration]) -> list[Migration]:
    return [m for m in migrations if m.version not in applied]


def migrate(conn: Any, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the pending *migrations* on the autocommit psycopg2 connection *conn*.

    One transaction under :data:`MIGRATION_LOCK_KEY`: the schema and
    ``realtime.schema_migrations`` are created if missing, then each pending migration runs and
    its version is recorded. A node that finds another migrating waits (up to
    :data:`LOCK_TIMEOUT`) and then sees the versions applied.

    Returns:
        The versions this call applied (empty when everything was applied already).

    Raises:
        DatabaseSetupError: one line naming the migration that failed and why.
    """
    import psycopg2
    import psycopg2.errors

    applied_now: list[int] = []
    current: Migration | None = None
    with conn.cursor() as cur:
        try:
            cur.execute("BEGIN; SET LOCAL lock_timeout = %s", (LOCK_TIMEOUT,))
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            cur.execute(_CREATE_SCHEMA)
            if not _has_migrations_table(cur):
                cur.execute(_CREATE_SCHEMA_MIGRATIONS)
            cur.execute("SELECT version FROM realtime.schema_migrations")
            applied = {int(r[0]) for r in cur.fetchall()}
            for migration in _pending(applied, migrations):
                current = migration
                migration.apply(cur)
                cur.execute(
                    "INSERT INTO realtime.schema_migrations (version, inserted_at) VALUES (%s, now())",
                    (migration.version,),
                )
                applied_now.append(migration.version)
            current = None
            cur.execute("COMMIT")
        except BaseException as exc:
            if not conn.closed:
                try:
                    cur.execute("ROLLBACK")
                except psycopg2.Error:
                    conn.close()
            if isinstance(exc, DatabaseSetupError):
                raise
            if isinstance(exc, psycopg2.errors.LockNotAvailable) and current is None and not applied_now:
                raise DatabaseSetupError(
                    f"waited {LOCK_TIMEOUT} for another node's migrations of the realtime schema "
                    "(advisory lock); is one stuck?"
                ) from None
            if isinstance(exc, psycopg2.Error) and not isinstance(
                exc, psycopg2.OperationalError | psycopg2.InterfaceError
            ):
                where = (
                    f"migration {current.version} ({current.name})" if current else "preparing the migrations"
                )
                raise DatabaseSetupError(f"realtime schema {where} failed: {_first_line(exc)}") from None
            raise
    for version in applied_now:
        name = next(m.name for m in migrations if m.version == version)
        log.info("applied realtime schema migration %d (%s)", version, name)
    return applied_now


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True, slots=True)
class SetupReport:
    """What :func:`prepare` did."""

    applied: tuple[int, ...]
    """Migration versions applied by this call."""
    partitions: PartitionReport


def prepare(conn: Any, *, replication: bool = False) -> SetupReport:
    """Check the role's privileges, migrate, and create today's partitions; blocking.

    Args:
        conn: an autocommit psycopg2 connection as Tidings' database role.
        replication: also require ``REPLICATION`` (the node will stream a logical slot).

    Raises:
        PrivilegeError: the role lacks a privilege (the message names it and its GRANT).
        DatabaseSetupError: a migration or the partitions failed (one line).
        psycopg2.OperationalError: the connection failed.
    """
    import psycopg2

    check_privileges(
        conn, migrating=lambda: bool(_pending(applied_versions(conn), MIGRATIONS)), replication=replication
    )
    versions = migrate(conn)
    try:
        partitions = maintain_partitions(conn)
    except (psycopg2.OperationalError, psycopg2.InterfaceError):
        raise
    except psycopg2.Error as exc:
        raise DatabaseSetupError(
            f"creating the partitions of realtime.messages failed: {_first_line(exc)}"
        ) from None
    return SetupReport(tuple(versions), partitions)


async def prepare_database(database_url: str, *, ssl: bool = False, replication: bool = False) -> SetupReport:
    """:func:`prepare` on a connection of its own, in a worker thread: what a node runs at start.

    Args:
        database_url: ``DATABASE_URL`` (libpq URL or key/value string).
        ssl: require TLS unless the URL sets ``sslmode`` (``DB_SSL``).
        replication: also require ``REPLICATION``.

    Raises:
        PrivilegeError: the role lacks a privilege (one line with the SQL that grants it).
        DatabaseSetupError: anything else, one line (connection refused included).
    """
    return await asyncio.to_thread(_prepare_url, database_url, ssl, replication)


def _prepare_url(database_url: str, ssl: bool, replication: bool) -> SetupReport:
    import psycopg2

    from tidings.cdc import catalog

    try:
        dsn = catalog.connection_dsn(database_url, ssl=ssl, application_name="tidings-migrations")
    except psycopg2.ProgrammingError as exc:
        raise DatabaseSetupError(f"invalid database URL: {_first_line(exc)}") from None
    where = catalog.describe_dsn(dsn)
    try:
        conn = catalog.connect(dsn)
    except psycopg2.Error as exc:
        raise DatabaseSetupError(f"PostgreSQL at {where}: {_first_line(exc)}") from None
    try:
        return prepare(conn, replication=replication)
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        raise DatabaseSetupError(f"PostgreSQL at {where}: {_first_line(exc)}") from None
    finally:
        conn.close()
