"""Tenant migrations on a database prepared like Supabase's image, and the SQL they create:
realtime.messages, realtime.topic(), realtime.send(), realtime.send_binary(), realtime.broadcast_changes()."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import psycopg2
import pytest

from tests.support.supabase_db import SupabaseDatabase
from tidings.db.migrations import (
    MIGRATIONS,
    DatabaseSetupError,
    Migration,
    applied_versions,
    migrate,
    prepare,
)
from tidings.db.partitions import existing_partitions

pytestmark = pytest.mark.postgres

VERSIONS = [m.version for m in MIGRATIONS]


def run_prepare(db: SupabaseDatabase, user: str = "postgres") -> Any:
    conn = db.connect(user)
    try:
        return prepare(conn)
    finally:
        conn.close()


def one(db: SupabaseDatabase, sql: str, params: Any = None) -> Any:
    ((value,),) = db.execute(sql, params)
    return value


# --------------------------------------------------------------------------------------------
# The schema, exactly
# --------------------------------------------------------------------------------------------


def test_an_empty_realtime_schema_is_migrated_as_supabase_has_it(supabase_db: SupabaseDatabase) -> None:
    db = supabase_db
    assert db.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                      "WHERE n.nspname = 'realtime'") == [(0,)]  # fmt: skip
    report = run_prepare(db)
    assert list(report.applied) == VERSIONS == [1, 2, 3]
    assert len(report.partitions.created) == 5

    columns = db.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
        "pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a "
        "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE a.attrelid = 'realtime.messages'::regclass AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY a.attnum"
    )
    assert columns == [
        ("topic", "text", True, None),
        ("extension", "text", True, None),
        ("payload", "jsonb", False, None),
        ("event", "text", False, None),
        ("private", "boolean", False, "false"),
        ("updated_at", "timestamp without time zone", True, "now()"),
        ("inserted_at", "timestamp without time zone", True, "now()"),
        ("id", "uuid", True, "gen_random_uuid()"),
        ("binary_payload", "bytea", False, None),
    ]
    assert one(db, "SELECT pg_get_partkeydef('realtime.messages'::regclass)") == "RANGE (inserted_at)"
    constraints = dict(
        db.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'realtime.messages'::regclass"
        )
    )
    assert constraints == {
        "messages_pkey": "PRIMARY KEY (id, inserted_at)",
        "messages_payload_exclusive": "CHECK (((payload IS NULL) OR (binary_payload IS NULL))) NOT VALID",
    }
    assert one(db, "SELECT pg_get_indexdef('realtime.messages_inserted_at_topic_index'::regclass)") == (
        "CREATE INDEX messages_inserted_at_topic_index ON ONLY realtime.messages USING btree "
        "(inserted_at DESC, topic) WHERE ((extension = 'broadcast'::text) AND (private IS TRUE))"
    )
    assert one(db, "SELECT relrowsecurity FROM pg_class WHERE oid = 'realtime.messages'::regclass") is True
    for role in ("anon", "authenticated", "service_role"):
        assert one(db, "SELECT has_schema_privilege(%s, 'realtime', 'USAGE')", (role,)) is True
        for privilege, granted in (("INSERT", True), ("SELECT", True), ("UPDATE", True), ("DELETE", False)):
            assert (
                one(db, "SELECT has_table_privilege(%s, 'realtime.messages', %s)", (role, privilege))
                is granted
            ), (role, privilege)
    assert db.execute(
        "SELECT rolcanlogin, rolinherit, rolreplication, rolsuper FROM pg_roles "
        "WHERE rolname = 'supabase_realtime_admin'"
    ) == [(False, False, False, False)]

    functions = db.execute(
        "SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), p.prosecdef "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'realtime' ORDER BY 1"
    )
    assert functions == [
        (
            "broadcast_changes",
            "topic_name text, event_name text, operation text, table_name text, table_schema text, "
            "new record, old record, level text DEFAULT 'ROW'::text",
            "void",
            False,
        ),
        ("send", "payload jsonb, event text, topic text, private boolean DEFAULT true", "void", False),
        ("send_binary", "payload bytea, event text, topic text, private boolean DEFAULT true", "void", False),
        ("topic", "", "text", False),
    ]
    assert db.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a "
        "WHERE a.attrelid = 'realtime.schema_migrations'::regclass AND a.attnum > 0 ORDER BY a.attnum"
    ) == [("version", "bigint", True), ("inserted_at", "timestamp(0) without time zone", False)]
    assert [v for (v,) in db.execute("SELECT version FROM realtime.schema_migrations ORDER BY 1")] == VERSIONS


def test_running_again_changes_nothing(migrated: SupabaseDatabase) -> None:
    db = migrated
    snapshot = db.execute(
        "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'realtime' ORDER BY 1"
    )
    functions = db.execute("SELECT oid, prosrc FROM pg_proc WHERE pronamespace = 'realtime'::regnamespace")
    report = run_prepare(db)
    assert report.applied == () and report.partitions.created == ()
    assert (
        db.execute(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'realtime' ORDER BY 1"
        )
        == snapshot
    )
    assert (
        db.execute("SELECT oid, prosrc FROM pg_proc WHERE pronamespace = 'realtime'::regnamespace")
        == functions
    )


def test_two_nodes_migrating_at_once_apply_each_version_once(supabase_db: SupabaseDatabase) -> None:
    barrier = threading.Barrier(2)
    results: list[Any] = []
    failures: list[BaseException] = []

    def node() -> None:
        conn = supabase_db.connect()
        try:
            barrier.wait(timeout=30)
            results.append(prepare(conn))
        except BaseException as exc:
            failures.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=node) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures
    assert sorted(r.applied for r in results) == [(), tuple(VERSIONS)]
    assert sorted(n for r in results for n in r.partitions.created) == sorted(
        existing_partitions_of(supabase_db)
    )
    assert supabase_db.execute(
        "SELECT version, count(*) FROM realtime.schema_migrations GROUP BY 1 ORDER BY 1"
    ) == [(v, 1) for v in VERSIONS]


def existing_partitions_of(db: SupabaseDatabase) -> list[str]:
    conn = db.connect()
    try:
        return existing_partitions(conn)
    finally:
        conn.close()


def test_a_database_without_the_schema_gets_it(supabase_db: SupabaseDatabase) -> None:
    supabase_db.execute("DROP SCHEMA realtime")
    assert list(run_prepare(supabase_db).applied) == VERSIONS
    assert one(supabase_db, "SELECT to_regclass('realtime.messages')::text") == "realtime.messages"


def test_a_schema_migrated_elsewhere_is_adopted_without_losing_rows(migrated: SupabaseDatabase) -> None:
    """A database Supabase Realtime migrated: its objects exist, its own versions are recorded,
    Tidings' are not. Tidings keeps what it finds (and Supabase's rows)."""
    db = migrated
    db.execute("DELETE FROM realtime.schema_migrations")
    db.execute("INSERT INTO realtime.schema_migrations (version, inserted_at) VALUES (20260709120000, now())")
    db.execute("SELECT realtime.send('{\"kept\": true}', 'e', 'room-1', false)")
    functions = db.execute("SELECT oid FROM pg_proc WHERE pronamespace = 'realtime'::regnamespace ORDER BY 1")
    assert list(run_prepare(db).applied) == VERSIONS
    assert one(db, "SELECT count(*) FROM realtime.messages WHERE payload->>'kept' = 'true'") == 1
    assert (
        db.execute("SELECT oid FROM pg_proc WHERE pronamespace = 'realtime'::regnamespace ORDER BY 1")
        == functions
    )
    assert {v for (v,) in db.execute("SELECT version FROM realtime.schema_migrations")} == {
        20260709120000,
        *VERSIONS,
    }


def test_a_missing_piece_is_restored(migrated: SupabaseDatabase) -> None:
    db = migrated
    db.execute("DROP INDEX realtime.messages_inserted_at_topic_index")
    db.execute("ALTER TABLE realtime.messages DISABLE ROW LEVEL SECURITY")
    db.execute("REVOKE INSERT ON realtime.messages FROM anon")
    db.execute("DROP FUNCTION realtime.send_binary(bytea, text, text, boolean)")
    db.execute("DELETE FROM realtime.schema_migrations WHERE version IN (2, 3)")
    assert run_prepare(db).applied == (2, 3)
    assert one(db, "SELECT to_regclass('realtime.messages_inserted_at_topic_index') IS NOT NULL") is True
    assert one(db, "SELECT relrowsecurity FROM pg_class WHERE oid = 'realtime.messages'::regclass") is True
    assert one(db, "SELECT has_table_privilege('anon', 'realtime.messages', 'INSERT')") is True
    assert one(db, "SELECT to_regprocedure('realtime.send_binary(bytea, text, text, boolean)') IS NOT NULL")


def test_an_unpartitioned_messages_table_is_refused_with_one_line(supabase_db: SupabaseDatabase) -> None:
    supabase_db.execute("CREATE TABLE realtime.messages (id bigserial PRIMARY KEY, topic text)")
    with pytest.raises(DatabaseSetupError) as info:
        run_prepare(supabase_db)
    message = str(info.value)
    assert "\n" not in message and "realtime.messages exists but is not partitioned" in message
    assert one(supabase_db, "SELECT to_regclass('realtime.schema_migrations')") is None  # all rolled back


def test_a_failing_migration_leaves_nothing_behind(supabase_db: SupabaseDatabase) -> None:
    boom = Migration(4, "boom", lambda cur: cur.execute("SELECT 1/0"))
    conn = supabase_db.connect()
    try:
        with pytest.raises(
            DatabaseSetupError, match=r"^realtime schema migration 4 \(boom\) failed: division by zero$"
        ):
            migrate(conn, [*MIGRATIONS, boom])
        assert applied_versions(conn) == set()
        assert migrate(conn) == VERSIONS  # the connection is still usable
    finally:
        conn.close()
    assert one(supabase_db, "SELECT to_regclass('realtime.messages') IS NOT NULL") is True


# --------------------------------------------------------------------------------------------
# realtime.topic(), realtime.send(), realtime.send_binary()
# --------------------------------------------------------------------------------------------


def messages(db: SupabaseDatabase) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT id::text, topic, extension, payload, event, private, binary_payload FROM realtime.messages "
        "ORDER BY inserted_at, id"
    )
    keys = ("id", "topic", "extension", "payload", "event", "private", "binary_payload")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def test_topic_reads_the_setting(migrated: SupabaseDatabase) -> None:
    conn = migrated.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT realtime.topic()")
            assert cur.fetchone() == (None,)
            cur.execute("BEGIN; SELECT set_config('realtime.topic', 'room-1', true), realtime.topic()")
            assert cur.fetchone() == ("room-1", "room-1")
            cur.execute("SELECT set_config('realtime.topic', '', true), realtime.topic()")
            assert cur.fetchone() == ("", None)
            cur.execute("ROLLBACK")
    finally:
        conn.close()


def test_send_adds_an_id_and_defaults_to_private(migrated: SupabaseDatabase) -> None:
    migrated.execute("SELECT realtime.send('{\"a\": 1}', 'status', 'room-1')")
    migrated.execute("SELECT realtime.send('{\"id\": \"mine\"}', 'status', 'room-2', false)")
    first, second = messages(migrated)
    assert first["payload"] == {"a": 1, "id": first["id"]}
    assert (first["topic"], first["extension"], first["event"], first["private"]) == (
        "room-1",
        "broadcast",
        "status",
        True,
    )
    assert first["binary_payload"] is None
    assert second["payload"] == {"id": "mine"} and second["id"] != "mine"
    assert second["private"] is False


def test_send_sets_the_topic_for_the_rest_of_the_transaction(migrated: SupabaseDatabase) -> None:
    conn = migrated.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN; SELECT realtime.send('{}', 'e', 'room-7'); SELECT realtime.topic()")
            assert cur.fetchone() == ("room-7",)
            cur.execute("COMMIT; SELECT realtime.topic()")
            assert cur.fetchone() == (None,)
    finally:
        conn.close()


def test_send_in_a_rolled_back_transaction_leaves_no_row(migrated: SupabaseDatabase) -> None:
    conn = migrated.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN; SELECT realtime.send('{\"n\": 1}', 'e', 'room-1'); ROLLBACK")
            assert messages(migrated) == []
            cur.execute("BEGIN; SELECT realtime.send('{\"n\": 2}', 'e', 'room-1'); COMMIT")
    finally:
        conn.close()
    assert [m["payload"]["n"] for m in messages(migrated)] == [2]


def test_send_binary_writes_binary_payload(migrated: SupabaseDatabase) -> None:
    migrated.execute("SELECT realtime.send_binary('\\x00ff10'::bytea, 'blob', 'room-1')")
    (row,) = messages(migrated)
    assert bytes(row["binary_payload"]) == b"\x00\xff\x10"
    assert row["payload"] is None and row["private"] is True and row["extension"] == "broadcast"


def test_payload_and_binary_payload_are_exclusive(migrated: SupabaseDatabase) -> None:
    with pytest.raises(psycopg2.errors.CheckViolation, match="messages_payload_exclusive"):
        migrated.execute(
            "INSERT INTO realtime.messages (topic, extension, payload, binary_payload) "
            "VALUES ('t', 'broadcast', '{}', '\\x00')"
        )


def test_a_failing_send_warns_instead_of_failing_the_caller(migrated: SupabaseDatabase) -> None:
    conn = migrated.connect()
    try:
        with conn.cursor() as cur:
            for name in existing_partitions(conn):
                cur.execute(f"DROP TABLE realtime.{name}")
            cur.execute(
                "SELECT realtime.send('{}', 'e', 'room-1'); "
                "SELECT realtime.send_binary('\\x01', 'e', 'r'); SELECT 42"
            )
            assert cur.fetchone() == (42,)
        assert [n.strip() for n in conn.notices[-2:]] == [
            'WARNING:  WarnSendingBroadcastMessage: no partition of relation "messages" found for row'
        ] * 2
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# realtime.broadcast_changes() from triggers, as the API roles write
# --------------------------------------------------------------------------------------------

# Supabase's documented trigger (guides/realtime/subscribing-to-database-changes), unchanged.
DOCUMENTED_TRIGGER = """
create table public.your_table (id bigint primary key, title text);

create or replace function public.your_table_changes()
returns trigger
security definer
language plpgsql
as $$
begin
  perform realtime.broadcast_changes(
    'topic:' || coalesce(NEW.id, OLD.id) ::text,       -- topic - the topic to which you're broadcasting where you can use the topic id to build the topic name
    TG_OP,                                             -- event - the event that triggered the function
    TG_OP,                                             -- operation - the operation that triggered the function
    TG_TABLE_NAME,                                     -- table - the table that caused the trigger
    TG_TABLE_SCHEMA,                                   -- schema - the schema of the table that caused the trigger
    NEW,                                               -- new record - the record after the change
    OLD                                                -- old record - the record before the change
  );
  return null;
end;
$$;

create trigger handle_your_table_changes
after insert or update or delete
on public.your_table
for each row
execute function your_table_changes ();
"""  # noqa: E501


def test_the_documented_trigger_broadcasts_each_change_as_the_authenticated_role(
    migrated: SupabaseDatabase,
) -> None:
    db = migrated
    db.execute(DOCUMENTED_TRIGGER)
    user = {"role": "authenticated", "sub": str(uuid.uuid4())}
    with db.as_role("authenticated", user) as cur:
        cur.execute("INSERT INTO public.your_table VALUES (1, 'a')")
        cur.execute("UPDATE public.your_table SET title = 'b' WHERE id = 1")
        cur.execute("DELETE FROM public.your_table WHERE id = 1")
    order = ["INSERT", "UPDATE", "DELETE"]  # one transaction: one inserted_at for all three
    insert, update, delete = sorted(messages(db), key=lambda m: order.index(m["event"]))
    for row, op in ((insert, "INSERT"), (update, "UPDATE"), (delete, "DELETE")):
        assert (row["topic"], row["event"], row["extension"], row["private"]) == (
            "topic:1",
            op,
            "broadcast",
            True,
        )
        assert row["payload"]["operation"] == op
        assert (row["payload"]["table"], row["payload"]["schema"]) == ("your_table", "public")
        assert row["payload"]["id"] == row["id"]
    assert insert["payload"]["record"] == {"id": 1, "title": "a"} and insert["payload"]["old_record"] is None
    assert update["payload"]["record"] == {"id": 1, "title": "b"}
    assert update["payload"]["old_record"] == {"id": 1, "title": "a"}
    assert delete["payload"]["record"] is None and delete["payload"]["old_record"] == {"id": 1, "title": "b"}


def test_a_trigger_running_as_anon_never_fails_the_users_insert(migrated: SupabaseDatabase) -> None:
    """Without security definer the send runs as the caller: with no INSERT policy on
    realtime.messages it is refused, which only warns. (The issue's failure was "permission denied
    for schema realtime" failing the user's INSERT.)"""
    db = migrated
    db.execute(DOCUMENTED_TRIGGER.replace("security definer\n", ""))
    with db.as_role("anon") as cur:
        cur.execute("INSERT INTO public.your_table VALUES (2, 'x')")
        notices = list(cur.connection.notices)
    assert db.execute("SELECT id, title FROM public.your_table") == [(2, "x")]
    assert messages(db) == []
    assert any(
        'WarnSendingBroadcastMessage: new row violates row-level security policy for table "messages"' in n
        for n in notices
    )


def test_a_trigger_as_the_caller_sends_when_a_policy_lets_it(migrated: SupabaseDatabase) -> None:
    db = migrated
    db.execute(DOCUMENTED_TRIGGER.replace("security definer\n", ""))
    db.execute(
        'create policy "authenticated user write to all" on "realtime"."messages" as permissive '
        "for insert to authenticated with check ( true )"
    )
    with db.as_role("authenticated", {"role": "authenticated", "sub": str(uuid.uuid4())}) as cur:
        cur.execute("INSERT INTO public.your_table VALUES (3, 'y')")
    (row,) = messages(db)
    assert row["topic"] == "topic:3" and row["payload"]["record"] == {"id": 3, "title": "y"}


def test_broadcast_changes_refuses_statement_level(migrated: SupabaseDatabase) -> None:
    db = migrated
    db.execute(
        """
        create table public.stmt (id int);
        create function public.stmt_changes() returns trigger language plpgsql as $$
        begin
          perform realtime.broadcast_changes(
            't', TG_OP, TG_OP, TG_TABLE_NAME, TG_TABLE_SCHEMA, NULL, NULL, TG_LEVEL);
          return null;
        end $$;
        create trigger stmt_changes after insert on public.stmt
          for each statement execute function public.stmt_changes();
        """
    )
    with pytest.raises(
        psycopg2.errors.RaiseException,
        match="Failed to process the row: function can only be triggered for each row, "
        "not for each statement",
    ):
        db.execute("INSERT INTO public.stmt VALUES (1)")
    assert db.execute("SELECT count(*) FROM public.stmt") == [(0,)]
    with pytest.raises(
        psycopg2.errors.RaiseException, match="Failed to process the row: Unexpected operation type: TRUNCATE"
    ):
        db.execute("SELECT realtime.broadcast_changes('t', 'e', 'TRUNCATE', 'x', 'public', NULL, NULL)")


def test_broadcast_changes_payload_as_json(migrated: SupabaseDatabase) -> None:
    migrated.execute(
        "SELECT realtime.broadcast_changes('room', 'ev', 'INSERT', 'tbl', 'sch', ROW(1, 'two'), NULL)"
    )
    (row,) = messages(migrated)
    assert row["payload"] == {
        "old_record": None,
        "record": {"f1": 1, "f2": "two"},
        "operation": "INSERT",
        "table": "tbl",
        "schema": "sch",
        "id": row["id"],
    }
    assert json.loads(json.dumps(row["payload"])) == row["payload"]
