"""The preflight: what the database role lacks, as one line naming the privilege and its GRANT.

Tidings needs no superuser. Its role (the user of ``DATABASE_URL``) needs:

* to create the ``realtime`` schema (``CREATE`` on the database), or ``USAGE`` and ``CREATE`` on an
  existing one (a partition of ``realtime.messages`` is a new table there every day), and, while
  migrating, the right to grant ``USAGE`` on it to ``anon``, ``authenticated`` and
  ``service_role`` (owning it, or ``WITH GRANT OPTION``) unless they have it;
* ``SELECT`` and ``INSERT`` on ``realtime.schema_migrations`` when someone else made it;
* ``CREATEROLE`` while the role ``supabase_realtime_admin`` does not exist (or an administrator
  creates it);
* to own ``realtime.messages`` (it creates it; in a database Supabase Realtime migrated, membership
  in its owner ``supabase_realtime_admin``): the authorization probe is inserted by the owner, to
  whom row level security does not apply, and the owner creates and drops the partitions;
* membership in ``anon``, ``authenticated`` and ``service_role``: policies run as the JWT's role;
* ``REPLICATION`` for the logical slots of Postgres Changes and Broadcast from Database.

:func:`read_facts` gathers what the catalog says in one query; :func:`find_problem` (pure) turns
the facts into the first :class:`PrivilegeError`, whose message is the line to print.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ADMIN_ROLE",
    "API_ROLES",
    "DatabaseSetupError",
    "PrivilegeError",
    "RoleFacts",
    "can_read_versions",
    "check_privileges",
    "find_problem",
    "quote_ident",
    "read_facts",
]

API_ROLES = ("anon", "authenticated", "service_role")
"""The API roles of a Supabase database, granted ``USAGE`` on ``realtime`` and rights on
``realtime.messages`` when they exist."""
ADMIN_ROLE = "supabase_realtime_admin"
"""Created if missing, as Supabase's tenant migrations do."""


class DatabaseSetupError(RuntimeError):
    """The ``realtime`` schema cannot be prepared; ``str()`` is one line saying why."""


class PrivilegeError(DatabaseSetupError):
    """The database role lacks a privilege; the message names it and the SQL that grants it."""

    def __init__(self, message: str, *, privilege: str, sql: str) -> None:
        super().__init__(message)
        self.privilege = privilege
        """The missing privilege, e.g. ``CREATE on database "app"``."""
        self.sql = sql
        """SQL an administrator runs to grant it."""


def quote_ident(name: str) -> str:
    """*name* as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class RoleFacts:
    """What the catalog says about the connected role and the ``realtime`` schema."""

    user: str
    database: str
    superuser: bool = False
    create_role: bool = False
    replication: bool = False
    create_in_database: bool = False
    schema_exists: bool = False
    schema_owner: str | None = None
    owns_schema: bool = False
    """Has the privileges of the schema's owner (is it, or inherits from it)."""
    schema_usage: bool = False
    schema_create: bool = False
    schema_grant_usage: bool = False
    """Holds ``USAGE`` on the schema ``WITH GRANT OPTION``."""
    migrations_table_exists: bool = False
    """``realtime.schema_migrations`` exists (Supabase's or Tidings')."""
    migrations_table_usable: bool = False
    """This role may SELECT and INSERT ``realtime.schema_migrations``."""
    messages_owner: str | None = None
    """Owner of ``realtime.messages``; None while it does not exist."""
    messages_owner_superuser: bool = False
    owns_messages: bool = False
    admin_role_exists: bool = False
    api_roles: tuple[str, ...] = ()
    """Which of :data:`API_ROLES` exist."""
    member_of: frozenset[str] = field(default_factory=frozenset)
    """The existing API roles this role may switch to (``SET ROLE``)."""
    usage_granted: frozenset[str] = field(default_factory=frozenset)
    """The existing API roles that hold ``USAGE`` on the schema."""


_FACTS_SQL = """
SELECT r.rolname, current_database(), r.rolsuper, r.rolcreaterole, r.rolreplication,
       has_database_privilege(current_database(), 'CREATE'),
       n.oid IS NOT NULL,
       pg_get_userbyid(n.nspowner),
       CASE WHEN n.oid IS NULL THEN false ELSE pg_has_role(r.oid, n.nspowner, 'USAGE') END,
       CASE WHEN n.oid IS NULL THEN false ELSE has_schema_privilege(r.oid, n.oid, 'USAGE') END,
       CASE WHEN n.oid IS NULL THEN false ELSE has_schema_privilege(r.oid, n.oid, 'CREATE') END,
       CASE WHEN n.oid IS NULL THEN false
            ELSE has_schema_privilege(r.oid, n.oid, 'USAGE WITH GRANT OPTION') END,
       sm.oid IS NOT NULL,
       CASE WHEN sm.oid IS NULL THEN false
            ELSE has_table_privilege(r.oid, sm.oid, 'SELECT')
                 AND has_table_privilege(r.oid, sm.oid, 'INSERT') END,
       pg_get_userbyid(m.relowner),
       COALESCE((SELECT o.rolsuper FROM pg_roles o WHERE o.oid = m.relowner), false),
       CASE WHEN m.oid IS NULL THEN false ELSE pg_has_role(r.oid, m.relowner, 'USAGE') END,
       EXISTS (SELECT FROM pg_roles WHERE rolname = %(admin)s),
       ARRAY(SELECT a.rolname::text FROM pg_roles a WHERE a.rolname = ANY(%(api)s) ORDER BY 1),
       ARRAY(SELECT a.rolname::text FROM pg_roles a
             WHERE a.rolname = ANY(%(api)s) AND pg_has_role(r.oid, a.oid, 'MEMBER')),
       ARRAY(SELECT a.rolname::text FROM pg_roles a
             WHERE n.oid IS NOT NULL AND a.rolname = ANY(%(api)s)
               AND has_schema_privilege(a.oid, n.oid, 'USAGE'))
FROM pg_roles r
LEFT JOIN pg_namespace n ON n.nspname = 'realtime'
LEFT JOIN pg_class m ON m.relnamespace = n.oid AND m.relname = 'messages'
LEFT JOIN pg_class sm ON sm.relnamespace = n.oid AND sm.relname = 'schema_migrations'
WHERE r.rolname = current_user
"""


def read_facts(conn: Any) -> RoleFacts:
    """The :class:`RoleFacts` of *conn*'s role (one catalog query; needs no privilege)."""
    with conn.cursor() as cur:
        cur.execute(_FACTS_SQL, {"admin": ADMIN_ROLE, "api": list(API_ROLES)})
        row = cur.fetchone()
    return RoleFacts(
        user=str(row[0]),
        database=str(row[1]),
        superuser=bool(row[2]),
        create_role=bool(row[3]),
        replication=bool(row[4]),
        create_in_database=bool(row[5]),
        schema_exists=bool(row[6]),
        schema_owner=row[7],
        owns_schema=bool(row[8]),
        schema_usage=bool(row[9]),
        schema_create=bool(row[10]),
        schema_grant_usage=bool(row[11]),
        migrations_table_exists=bool(row[12]),
        migrations_table_usable=bool(row[13]),
        messages_owner=row[14],
        messages_owner_superuser=bool(row[15]),
        owns_messages=bool(row[16]),
        admin_role_exists=bool(row[17]),
        api_roles=tuple(row[18]),
        member_of=frozenset(row[19]),
        usage_granted=frozenset(row[20]),
    )


def _problem(facts: RoleFacts, privilege: str, why: str, sql: str) -> PrivilegeError:
    return PrivilegeError(
        f"database role {quote_ident(facts.user)} lacks {privilege} ({why}): run {sql}",
        privilege=privilege,
        sql=sql,
    )


def find_problem(facts: RoleFacts, *, migrating: bool, replication: bool = False) -> PrivilegeError | None:
    """The first privilege *facts* show missing, or None.

    Args:
        migrating: migrations are pending (they create the schema's objects and grant on them).
        replication: the node streams a logical slot (Postgres Changes, Broadcast from Database).
    """
    user = quote_ident(facts.user)
    if facts.superuser:
        return None
    if not facts.schema_exists:
        if not facts.create_in_database:
            db = quote_ident(facts.database)
            return _problem(
                facts,
                f"CREATE on database {db}",
                "Tidings creates the schema realtime",
                f"GRANT CREATE ON DATABASE {db} TO {user}; or create the schema for it: "
                f"CREATE SCHEMA realtime AUTHORIZATION {user}",
            )
    else:
        if not facts.schema_usage:
            grants = "USAGE, CREATE" if not facts.schema_create else "USAGE"
            return _problem(
                facts,
                "USAGE on schema realtime",
                "Tidings keeps realtime.messages and its functions there",
                f"GRANT {grants} ON SCHEMA realtime TO {user}",
            )
        if facts.migrations_table_exists and not facts.migrations_table_usable:
            return _problem(
                facts,
                "SELECT, INSERT on realtime.schema_migrations",
                "Tidings records its migrations there",
                f"GRANT SELECT, INSERT ON realtime.schema_migrations TO {user}",
            )
        if not facts.schema_create:
            return _problem(
                facts,
                "CREATE on schema realtime",
                "Tidings creates its tables there, and a partition of realtime.messages every day",
                f"GRANT CREATE ON SCHEMA realtime TO {user}; or ALTER SCHEMA realtime OWNER TO {user}",
            )
        lacking = [r for r in facts.api_roles if r not in facts.usage_granted]
        if migrating and lacking and not (facts.owns_schema or facts.schema_grant_usage):
            roles = ", ".join(lacking)
            return _problem(
                facts,
                "the right to grant USAGE on schema realtime",
                f"{roles} need it for realtime.send() and authorization; the schema is owned by "
                f"{quote_ident(facts.schema_owner or '?')}",
                f"GRANT USAGE ON SCHEMA realtime TO {roles}; or ALTER SCHEMA realtime OWNER TO {user}",
            )
    if migrating and not facts.admin_role_exists and not facts.create_role:
        return _problem(
            facts,
            "CREATEROLE",
            f"Tidings creates the role {ADMIN_ROLE} as Supabase does",
            f"CREATE ROLE {ADMIN_ROLE} NOLOGIN NOINHERIT NOREPLICATION; or ALTER ROLE {user} CREATEROLE",
        )
    if facts.messages_owner is not None and not facts.owns_messages:
        owner = quote_ident(facts.messages_owner)
        if facts.messages_owner_superuser:
            # Never suggest membership in a superuser: hand the table and its partitions over.
            sql = (
                "DO $$ DECLARE t regclass; BEGIN FOR t IN SELECT 'realtime.messages'::regclass UNION ALL "
                "SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'realtime.messages'::regclass "
                f"LOOP EXECUTE format('ALTER TABLE %s OWNER TO {user.replace(chr(39), chr(39) * 2)}', t); "
                "END LOOP; END $$"
            )
        else:
            sql = f"GRANT {owner} TO {user}"
        return _problem(
            facts,
            f"the privileges of {owner}, owner of realtime.messages",
            "Tidings inserts its authorization probes and manages the partitions as the owner",
            sql,
        )
    not_member = [r for r in facts.api_roles if r not in facts.member_of]
    if not_member:
        roles = ", ".join(not_member)
        return _problem(
            facts,
            f"membership in {roles}",
            "Realtime Authorization runs the policies as the JWT's role",
            f"GRANT {roles} TO {user}",
        )
    if replication and not facts.replication:
        return _problem(
            facts,
            "REPLICATION",
            "Postgres Changes and Broadcast from Database stream a logical replication slot",
            f"ALTER ROLE {user} REPLICATION",
        )
    return None


def can_read_versions(facts: RoleFacts) -> bool:
    """The role may read ``realtime.schema_migrations`` (or there is nothing to read yet)."""
    if not facts.schema_exists or facts.superuser:
        return True
    return facts.schema_usage and (not facts.migrations_table_exists or facts.migrations_table_usable)


def check_privileges(
    conn: Any, *, migrating: bool | Callable[[], bool], replication: bool = False
) -> RoleFacts:
    """Read the facts of *conn*'s role and raise the first missing privilege.

    *migrating* says whether migrations are pending; a callable is asked only once the role is
    known to be able to read the applied versions.

    Returns:
        The facts, when nothing is missing.

    Raises:
        PrivilegeError: one line naming the privilege and the SQL that grants it.
    """
    facts = read_facts(conn)
    if callable(migrating):
        if not can_read_versions(facts):
            problem = find_problem(facts, migrating=True, replication=replication)
            if problem is not None:
                raise problem
        migrating = migrating()
    problem = find_problem(facts, migrating=migrating, replication=replication)
    if problem is not None:
        raise problem
    return facts
