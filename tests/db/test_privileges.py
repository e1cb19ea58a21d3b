"""The least-privileged database role: the preflight names each missing privilege with its GRANT,
and a role given exactly what it asks for migrates, keeps the partitions and runs the checks."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.support.postgres import PostgresServer
from tests.support.supabase_db import SupabaseDatabase
from tidings.auth.policy import AuthorizationContext
from tidings.db.authorization import check_read, check_write
from tidings.db.migrations import prepare, prepare_database
from tidings.db.partitions import existing_partitions, maintain_partitions
from tidings.db.privileges import DatabaseSetupError, PrivilegeError, RoleFacts, find_problem

_names = itertools.count(1)

TOPIC_POLICY = (
    'create policy "authenticated can read all messages on topic" on "realtime"."messages" '
    "for select to authenticated using ( (select realtime.topic()) = 'room-1' )"
)

# --------------------------------------------------------------------------------------------
# The rules, on facts (no database)
# --------------------------------------------------------------------------------------------

READY = RoleFacts(
    user="tidings",
    database="app",
    create_role=True,
    replication=True,
    create_in_database=True,
    schema_exists=True,
    schema_owner="tidings",
    owns_schema=True,
    schema_usage=True,
    schema_create=True,
    messages_owner="tidings",
    owns_messages=True,
    admin_role_exists=True,
    api_roles=("anon", "authenticated", "service_role"),
    member_of=frozenset({"anon", "authenticated", "service_role"}),
    usage_granted=frozenset({"anon", "authenticated", "service_role"}),
)


def problem(migrating: bool = True, replication: bool = False, **changes: Any) -> PrivilegeError | None:
    return find_problem(dataclasses.replace(READY, **changes), migrating=migrating, replication=replication)


def test_a_ready_role_and_a_superuser_pass() -> None:
    assert problem(replication=True) is None
    bare = RoleFacts(user="postgres", database="app", superuser=True)
    assert find_problem(bare, migrating=True, replication=True) is None


@pytest.mark.parametrize(
    ("changes", "migrating", "privilege", "sql"),
    [
        (
            {"schema_exists": False, "create_in_database": False},
            True,
            'CREATE on database "app"',
            'GRANT CREATE ON DATABASE "app" TO "tidings"; or create the schema for it: '
            'CREATE SCHEMA realtime AUTHORIZATION "tidings"',
        ),
        (
            {"schema_usage": False, "schema_create": False},
            False,
            "USAGE on schema realtime",
            'GRANT USAGE, CREATE ON SCHEMA realtime TO "tidings"',
        ),
        (
            {"schema_usage": False},
            True,
            "USAGE on schema realtime",
            'GRANT USAGE ON SCHEMA realtime TO "tidings"',
        ),
        (
            {"schema_create": False},
            False,
            "CREATE on schema realtime",
            'GRANT CREATE ON SCHEMA realtime TO "tidings"; or ALTER SCHEMA realtime OWNER TO "tidings"',
        ),
        (
            {"owns_schema": False, "schema_owner": "postgres", "usage_granted": frozenset({"service_role"})},
            True,
            "the right to grant USAGE on schema realtime",
            "GRANT USAGE ON SCHEMA realtime TO anon, authenticated; "
            'or ALTER SCHEMA realtime OWNER TO "tidings"',
        ),
        (
            {"admin_role_exists": False, "create_role": False},
            True,
            "CREATEROLE",
            "CREATE ROLE supabase_realtime_admin NOLOGIN NOINHERIT NOREPLICATION; "
            'or ALTER ROLE "tidings" CREATEROLE',
        ),
        (
            {"messages_owner": "supabase_realtime_admin", "owns_messages": False},
            False,
            'the privileges of "supabase_realtime_admin", owner of realtime.messages',
            'GRANT "supabase_realtime_admin" TO "tidings"',
        ),
        (
            {"migrations_table_exists": True, "migrations_table_usable": False},
            False,
            "SELECT, INSERT on realtime.schema_migrations",
            'GRANT SELECT, INSERT ON realtime.schema_migrations TO "tidings"',
        ),
        (
            {"member_of": frozenset({"anon"})},
            False,
            "membership in authenticated, service_role",
            'GRANT authenticated, service_role TO "tidings"',
        ),
    ],
)
def test_each_missing_privilege_is_one_line_with_its_grant(
    changes: dict[str, Any], migrating: bool, privilege: str, sql: str
) -> None:
    found = problem(migrating=migrating, **changes)
    assert found is not None
    assert (found.privilege, found.sql) == (privilege, sql)
    message = str(found)
    assert "\n" not in message
    assert message.startswith(f'database role "tidings" lacks {privilege} (')
    assert message.endswith(f"): run {sql}")


def test_what_only_migrations_need_is_not_asked_once_migrated() -> None:
    for changes in (
        {"admin_role_exists": False, "create_role": False},
        {"owns_schema": False, "usage_granted": frozenset()},
    ):
        assert problem(migrating=False, **changes) is None, changes


def test_replication_is_asked_only_when_streaming() -> None:
    found = find_problem(dataclasses.replace(READY, replication=False), migrating=False, replication=True)
    assert found is not None and found.sql == 'ALTER ROLE "tidings" REPLICATION'
    assert find_problem(dataclasses.replace(READY, replication=False), migrating=False) is None


def test_a_table_owned_by_a_superuser_is_handed_over_not_joined() -> None:
    found = problem(
        migrating=False, messages_owner="postgres", messages_owner_superuser=True, owns_messages=False
    )
    assert found is not None
    assert "GRANT" not in found.sql and 'ALTER TABLE %s OWNER TO "tidings"' in found.sql
    assert "pg_inherits" in found.sql  # its partitions too: ALTER TABLE does not recurse to them


# --------------------------------------------------------------------------------------------
# On PostgreSQL: a role given exactly what the preflight asks for
# --------------------------------------------------------------------------------------------


@pytest.fixture
def app_role(postgres: PostgresServer) -> Iterator[str]:
    """A fresh LOGIN role with no privileges at all (roles are cluster-wide: a new name per test)."""
    name = f"tidings_app_{os.getpid()}_{next(_names)}"
    postgres.execute(f'CREATE ROLE "{name}" LOGIN NOINHERIT')
    yield name


def follow_the_preflight(
    db: SupabaseDatabase, role: str, *, replication: bool = False
) -> list[PrivilegeError]:
    """Run prepare() as *role*; on each PrivilegeError run its first suggestion as an administrator."""
    asked: list[PrivilegeError] = []
    for _ in range(10):
        conn = db.connect(role)
        try:
            prepare(conn, replication=replication)
            return asked
        except PrivilegeError as exc:
            asked.append(exc)
            db.execute(exc.sql.split("; or ")[0])
        finally:
            conn.close()
    raise AssertionError(f"still refused after {[str(e) for e in asked]}")


@pytest.mark.postgres
def test_an_unprivileged_role_is_told_each_grant_and_then_works(
    supabase_db: SupabaseDatabase, app_role: str
) -> None:
    db = supabase_db  # its realtime schema exists, empty, owned by postgres
    asked = follow_the_preflight(db, app_role, replication=True)
    privileges = [e.privilege for e in asked]
    assert privileges[:2] == ["USAGE on schema realtime", "the right to grant USAGE on schema realtime"]
    assert "membership in anon, authenticated, service_role" in privileges
    assert privileges[-1] == "REPLICATION"
    assert all("\n" not in str(e) and f'"{app_role}"' in str(e) for e in asked)

    ((owner, superuser, createrole),) = db.execute(
        "SELECT pg_get_userbyid(c.relowner), r.rolsuper, r.rolcreaterole FROM pg_class c, pg_roles r "
        "WHERE c.oid = 'realtime.messages'::regclass AND r.rolname = %s",
        (app_role,),
    )
    assert (owner, superuser) == (app_role, False)
    assert db.execute("SELECT count(*) FROM realtime.schema_migrations") == [(3,)]

    conn = db.connect(app_role)
    try:
        # Day to day: partitions, and Supabase's checks (the probe is inserted by the owner).
        assert maintain_partitions(conn).created == ()
        report = maintain_partitions(conn, now=datetime(2020, 1, 1))
        assert len(report.created) == 5
        assert len(maintain_partitions(conn).dropped) == 5
        db.execute(TOPIC_POLICY)
        user = {"role": "authenticated", "sub": db.add_user()}
        assert check_read(conn, AuthorizationContext("room-1", user)).readable
        assert not check_read(conn, AuthorizationContext("room-2", user)).readable
        assert not check_write(conn, AuthorizationContext("room-1", user)).can_write("broadcast")
        # A token naming Tidings' own role would act as the table's owner: refused.
        assert not check_read(conn, AuthorizationContext("room-1", {"role": app_role})).readable
        assert existing_partitions(conn)
    finally:
        conn.close()


@pytest.mark.postgres
def test_without_the_schema_the_role_needs_create_on_the_database(
    supabase_db: SupabaseDatabase, app_role: str
) -> None:
    db = supabase_db
    db.execute("DROP SCHEMA realtime")
    asked = follow_the_preflight(db, app_role)
    assert asked[0].privilege == f'CREATE on database "{db.name}"'
    assert db.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'realtime'") == [
        (app_role,)
    ]


@pytest.mark.postgres
def test_a_schema_migrated_by_another_role_is_named_piece_by_piece(
    migrated: SupabaseDatabase, app_role: str
) -> None:
    db = migrated  # migrated by postgres: postgres owns realtime.schema_migrations and realtime.messages
    db.execute(f'GRANT USAGE ON SCHEMA realtime TO "{app_role}"')
    db.execute(f'GRANT anon, authenticated, service_role TO "{app_role}"')
    asked: list[PrivilegeError] = []
    for _ in range(5):
        conn = db.connect(app_role)
        try:
            prepare(conn)
            break
        except PrivilegeError as exc:
            asked.append(exc)
            db.execute(exc.sql.split("; or ")[0])  # the owner's hand-over: the table and its partitions
        finally:
            conn.close()
    assert [e.privilege for e in asked] == [
        "SELECT, INSERT on realtime.schema_migrations",
        "CREATE on schema realtime",  # every day's partition is a new table there
        'the privileges of "postgres", owner of realtime.messages',
    ]
    conn = db.connect(app_role)
    try:
        assert prepare(conn).applied == ()
        assert maintain_partitions(conn, now=datetime(2020, 1, 1)).created
        assert maintain_partitions(conn).dropped  # it may drop them: it owns them
    finally:
        conn.close()


@pytest.mark.postgres
def test_a_schema_owned_by_supabase_realtime_admin_is_used_through_membership(
    migrated: SupabaseDatabase, postgres: PostgresServer
) -> None:
    """A database Supabase Realtime migrated: its objects belong to supabase_realtime_admin."""
    db = migrated
    db.execute(
        "DO $$ DECLARE t regclass; BEGIN FOR t IN SELECT 'realtime.messages'::regclass UNION ALL "
        "SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'realtime.messages'::regclass "
        "LOOP EXECUTE format('ALTER TABLE %s OWNER TO supabase_realtime_admin', t); END LOOP; END $$"
    )
    db.execute(
        "GRANT CREATE, USAGE ON SCHEMA realtime TO supabase_realtime_admin;"
        "ALTER FUNCTION realtime.send(jsonb, text, text, boolean) OWNER TO supabase_realtime_admin"
    )
    role = f"tidings_app_{os.getpid()}_{next(_names)}"
    postgres.execute(f'CREATE ROLE "{role}" LOGIN INHERIT')  # inherits the owner's privileges
    db.execute(
        f'GRANT supabase_realtime_admin TO "{role}"; GRANT USAGE, CREATE ON SCHEMA realtime TO "{role}"; '
        f'GRANT SELECT, INSERT ON realtime.schema_migrations TO "{role}"; '
        f'GRANT anon, authenticated, service_role TO "{role}"'
    )
    db.execute(TOPIC_POLICY)
    conn = db.connect(role)
    try:
        assert prepare(conn).applied == ()
        assert maintain_partitions(conn, now=datetime(2020, 1, 1)).created
        assert maintain_partitions(conn).dropped
        user = {"role": "authenticated", "sub": db.add_user()}
        assert check_read(conn, AuthorizationContext("room-1", user)).readable
        assert not check_read(conn, AuthorizationContext("room-2", user)).readable
        # The owner's role would skip row level security: a token naming it gets nothing.
        admin = AuthorizationContext("room-2", {"role": "supabase_realtime_admin"})
        assert not check_read(conn, admin).readable
    finally:
        conn.close()


@pytest.mark.postgres
async def test_prepare_database_gives_one_line_for_an_unreachable_database(postgres: PostgresServer) -> None:
    with pytest.raises(DatabaseSetupError) as info:
        await prepare_database("postgresql://postgres@127.0.0.1:1/none")
    assert str(info.value).startswith("PostgreSQL at 127.0.0.1:1/none: ") and "\n" not in str(info.value)
    with pytest.raises(DatabaseSetupError, match="invalid database URL"):
        await prepare_database("postgresql://[bad")
