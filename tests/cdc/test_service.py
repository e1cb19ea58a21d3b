"""PostgresChanges against a real PostgreSQL: payloads, filters, subscriptions, restarts, setup errors."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cdc.conftest import Collector, Database, ensure_role, unique_slot, wait_until
from tests.support.postgres import PostgresServer
from tidings.cdc import catalog
from tidings.cdc.pgoutput import parse_lsn
from tidings.cdc.service import PostgresChanges, PostgresChangesError, SubscriptionError
from tidings.protocol.filters import parse_filter

pytestmark = pytest.mark.postgres

Make = Callable[..., PostgresChanges]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
REPO = Path(__file__).resolve().parents[2]


def binding(table: str, event: str = "*", filter: str | None = None, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"event": event, "schema": "public", "table": table}
    if filter is not None:
        params["filter"] = filter
    params.update(extra)
    return params


def records(col: Collector, owner: Any, key: str = "record") -> list[Any]:
    return [d.data[key]["id"] for d in col.for_owner(owner)]


# --------------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------------


async def test_insert_update_delete_with_default_identity(db: Database, make_changes: Make) -> None:
    db.execute("CREATE TABLE items (id int8 PRIMARY KEY, title text, n int4, at timestamptz, tags text[])")
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    assert pc.connected
    await pc.subscribe("all", [(11, binding("items"))], None)
    await pc.subscribe("ins", [(12, binding("items", "insert"))], None)
    db.execute("INSERT INTO items VALUES (1, 'a', NULL, '2026-08-21 14:00:00.123+02', '{x,\"y z\"}')")
    db.execute("UPDATE items SET title = 'b' WHERE id = 1")
    db.execute("DELETE FROM items WHERE id = 1")
    await col.wait_count(3, owner="all")
    assert len(col.items) == 3  # one call per change: both owners see the same columns
    ins, upd, dele = col.items
    assert ins.matches == {"all": [11], "ins": [12]}
    assert upd.matches == {"all": [11]} and dele.matches == {"all": [11]}
    columns = [
        {"name": "id", "type": "int8"},
        {"name": "title", "type": "text"},
        {"name": "n", "type": "int4"},
        {"name": "at", "type": "timestamptz"},
        {"name": "tags", "type": "_text"},
    ]
    record = {"id": 1, "title": "a", "n": None, "at": "2026-08-21T12:00:00.123+00:00", "tags": ["x", "y z"]}
    assert TIMESTAMP.match(ins.data["commit_timestamp"])
    assert ins.data == {
        "schema": "public",
        "table": "items",
        "commit_timestamp": ins.data["commit_timestamp"],
        "position": ins.data["position"],
        "type": "INSERT",
        "columns": columns,
        "record": record,
        "errors": None,
    }
    assert upd.data["type"] == "UPDATE"
    assert upd.data["record"] == record | {"title": "b"}
    assert upd.data["old_record"] == {"id": 1}  # REPLICA IDENTITY DEFAULT: the primary key
    assert dele.data["type"] == "DELETE" and "record" not in dele.data
    assert dele.data["old_record"] == {"id": 1}
    assert dele.data["columns"] == columns and dele.data["errors"] is None
    ids = [d.change_id for d in col.items]
    assert len(set(ids)) == 3 and all(re.fullmatch(r"[0-9A-F]+/[0-9A-F]+:0", i) for i in ids)


async def test_replica_identity_full_and_key_change(db: Database, make_changes: Make) -> None:
    db.execute("CREATE TABLE f (id int4 PRIMARY KEY, title text, n int4)")
    db.execute("ALTER TABLE f REPLICA IDENTITY FULL")
    db.execute("CREATE TABLE d (id int4 PRIMARY KEY, title text)")
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    await pc.subscribe("f", [(1, binding("f"))], None)
    await pc.subscribe("d", [(2, binding("d", "UPDATE"))], None)
    db.execute("INSERT INTO f VALUES (1, 'a', 5)")
    db.execute("UPDATE f SET title = 'b' WHERE id = 1")
    db.execute("DELETE FROM f WHERE id = 1")
    db.execute("INSERT INTO d VALUES (1, 'a')")
    db.execute("UPDATE d SET id = 2 WHERE id = 1")
    await col.wait_count(3, owner="f")
    await col.wait_count(1, owner="d")
    _, upd, dele = col.for_owner("f")
    assert upd.data["old_record"] == {"id": 1, "title": "a", "n": 5}
    assert upd.data["record"] == {"id": 1, "title": "b", "n": 5}
    assert dele.data["old_record"] == {"id": 1, "title": "b", "n": 5}
    (key_change,) = col.for_owner("d")
    assert key_change.data["record"] == {"id": 2, "title": "a"}
    assert key_change.data["old_record"] == {"id": 1}


async def test_unchanged_toast_value(db: Database, make_changes: Make) -> None:
    for table, identity in (("plain", "DEFAULT"), ("whole", "FULL")):
        db.execute(f"CREATE TABLE {table} (id int4 PRIMARY KEY, title text, body text)")
        db.execute(f"ALTER TABLE {table} ALTER COLUMN body SET STORAGE EXTERNAL")  # big values go out of line
        db.execute(f"ALTER TABLE {table} REPLICA IDENTITY {identity}")
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    await pc.subscribe("w", [(1, binding("plain", "UPDATE")), (2, binding("whole", "UPDATE"))], None)
    body = "x" * 20_000
    for table in ("plain", "whole"):
        db.execute(f"INSERT INTO {table} VALUES (1, 'a', %s)", (body,))
        db.execute(f"UPDATE {table} SET title = 'b' WHERE id = 1")
    await col.wait_count(2)
    plain, full = col.items
    # Not sent by PostgreSQL and no old row to take it from: left out rather than made up.
    assert plain.data["record"] == {"id": 1, "title": "b"}
    assert {"name": "body", "type": "text"} in plain.data["columns"]
    # REPLICA IDENTITY FULL: filled from the old row.
    assert full.data["record"] == {"id": 1, "title": "b", "body": body}
    assert full.data["old_record"]["body"] == body


async def test_table_without_primary_key_and_truncate(db: Database, make_changes: Make) -> None:
    db.execute("CREATE TABLE nopk (a int4, b text)")
    db.execute("CREATE TABLE other (id int4 PRIMARY KEY)")
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    await pc.subscribe("o", [(1, binding("nopk")), (2, binding("other"))], None)
    db.execute("INSERT INTO nopk VALUES (1, 'x')")
    db.execute("TRUNCATE nopk")
    db.execute("INSERT INTO other VALUES (7)")
    await col.wait_count(2)
    nopk, other = col.items  # nothing for TRUNCATE
    assert nopk.data["errors"] == ["Error 400: Bad Request, no primary key"]
    assert "record" not in nopk.data and nopk.matches == {"o": [1]}
    assert other.data["record"] == {"id": 7}


# --------------------------------------------------------------------------------------------
# Filters: every operator, checked against PostgreSQL's own evaluation of the same condition
# --------------------------------------------------------------------------------------------

FILTER_TABLE = """
CREATE TABLE f (
    id int8 PRIMARY KEY, n int4, title text, flag bool, at timestamptz, price numeric, uid uuid, note text,
    tags text[]
)
"""
SQL_TYPES = {
    "id": "int8", "n": "int4", "title": "text", "flag": "bool", "at": "timestamptz", "price": "numeric",
    "uid": "uuid", "note": "text", "tags": "text[]",
}  # fmt: skip
U1, U2 = "639f86b1-738b-43ed-bb09-c8d3f3bafa30", "b423f213-ac24-402a-95ea-cf1d94d8e9f0"
FILTER_ROWS = [
    (1, 5, "alpha", True, "2026-01-01 00:00:00+00", "1.50", U1, None, "{a,b}"),
    (2, 3, "Beta", False, "2026-02-01 12:00:00+00", "2.5", U2, "n", "{}"),
    (3, None, "gamma", None, "2026-03-01 00:00:00+00", "10", None, "x", None),
    (4, 8, "a,b", True, None, None, U1, None, "{b}"),
    (5, 5, "ALPHA", False, "2026-03-01 00:00:00.5+00", "-1", U2, "", "{a,b}"),
    (6, 0, "", None, "2025-12-31 23:59:59+00", "2.50", None, "note", "{c}"),
    (7, 7, "beta%", True, "2026-06-01 00:00:00+02", "0", U1, None, "{a}"),
    (8, -2, None, False, "2026-03-01 01:00:00+01", "3", None, "n", None),
]
FILTERS = [
    "id=eq.3", "id=neq.3", "id=not.eq.2", "n=lt.5", "n=lte.5", "n=gt.5", "n=gte.5", "n=not.gt.5",
    "id=in.(1,4,7)", "id=not.in.(1,4,7)", "title=in.(alpha,\"a,b\",zeta)", "title=like.a%", "title=ilike.%A%",
    "title=like.beta\\%", "title=like._eta%", "title=not.like.%a%", "title=match.^[a-z]+$", "title=imatch.A$",
    "title=not.match.a", "note=is.null", "note=not.is.null", "flag=is.true", "flag=is.false",
    "flag=is.unknown", "flag=not.is.true", "flag=not.is.false", "flag=eq.false", "flag=neq.true",
    "n=isdistinct.5",
    "n=not.isdistinct.5", "note=isdistinct.n", "at=gt.2026-03-01T00:00:00Z", "at=lte.2026-03-01 01:00:00+01",
    "at=lt.2026-01-01", "price=gte.2.5", "price=eq.2.5", "price=lt.0", "uid=eq." + U1.upper(),
    "uid=neq." + U2,
    "title=eq.\"a,b\"", "title=gt.Beta", "n=gt.1,n=lt.8", "id=gte.2,flag=is.true,title=like.%a%",
    "tags=eq.\"{a,b}\"", "tags=neq.\"{}\"",
]  # fmt: skip


def to_sql(filter_text: str) -> tuple[str, list[str]]:
    """The same condition as SQL, for PostgreSQL to evaluate."""
    clauses, params = [], []
    for c in parse_filter(filter_text):
        col, typ = f'"{c.column}"', SQL_TYPES[c.column]
        if c.op == "is":
            clauses.append(f"{col} IS {'NOT ' if c.negate else ''}{c.value.upper()}")
            continue
        if c.op == "isdistinct":
            clauses.append(f"{col} IS {'NOT ' if c.negate else ''}DISTINCT FROM %s::{typ}")
        elif c.op == "in":
            clauses.append(f"{'NOT ' if c.negate else ''}({col} = ANY(%s::{typ}[]))")
        else:
            sql_op = {
                "eq": "=", "neq": "<>", "lt": "<", "lte": "<=", "gt": ">", "gte": ">=",
                "like": "LIKE", "ilike": "ILIKE", "match": "~", "imatch": "~*",
            }[c.op]  # fmt: skip
            rhs = "%s" if c.op in ("like", "ilike", "match", "imatch") else f"%s::{typ}"
            clauses.append(f"{'NOT ' if c.negate else ''}({col} {sql_op} {rhs})")
        params.append(c.value)
    return " AND ".join(clauses), params


async def test_every_filter_operator_agrees_with_postgres(db: Database, make_changes: Make) -> None:
    db.execute(FILTER_TABLE)
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    await pc.subscribe("all", [(0, binding("f", "INSERT"))], None)
    for i, text in enumerate(FILTERS):
        await pc.subscribe(("f", i), [(i + 1, binding("f", "INSERT", text))], None)
    conn = db.connect()
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO f VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", FILTER_ROWS)
    conn.close()
    await col.wait_count(len(FILTER_ROWS), owner="all")
    for i, text in enumerate(FILTERS):
        where, params = to_sql(text)
        expected = {r[0] for r in db.execute(f"SELECT id FROM f WHERE {where}", params)}
        got = set(records(col, ("f", i)))
        assert got == expected, f"{text}: PostgreSQL says {sorted(expected)}, Tidings matched {sorted(got)}"
    # Not vacuous: most filters select some rows but not all.
    assert sum(0 < len(records(col, ("f", i))) < len(FILTER_ROWS) for i in range(len(FILTERS))) > 35


async def test_filters_on_update_use_the_new_row_and_on_delete_the_old_key(
    db: Database, make_changes: Make
) -> None:
    db.execute("CREATE TABLE s (id int4 PRIMARY KEY, status text)")
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    await pc.subscribe("open", [(1, binding("s", "*", "status=eq.open"))], None)
    await pc.subscribe("id2", [(2, binding("s", "*", "id=eq.2"))], None)
    db.execute("INSERT INTO s VALUES (1, 'draft'), (2, 'open')")
    db.execute("UPDATE s SET status = 'open' WHERE id = 1")
    db.execute("UPDATE s SET status = 'closed' WHERE id = 2")
    db.execute("DELETE FROM s WHERE id = 2")
    await col.wait_count(3, owner="id2")

    def seen(owner: str) -> list[tuple[str, int]]:
        return [
            (d.data["type"], d.data.get("record", d.data.get("old_record"))["id"])
            for d in col.for_owner(owner)
        ]

    assert seen("id2") == [("INSERT", 2), ("UPDATE", 2), ("DELETE", 2)]
    # UPDATEs are filtered on the new row. status is not in a DELETE's key-only old record: that
    # condition is skipped (as Supabase's SQL join does), so the DELETE reaches "open" too.
    assert seen("open") == [("INSERT", 2), ("UPDATE", 1), ("DELETE", 2)]


# --------------------------------------------------------------------------------------------
# Subscriptions
# --------------------------------------------------------------------------------------------


async def test_subscription_errors(db: Database, make_changes: Make) -> None:
    db.execute("CREATE TABLE items (id int4 PRIMARY KEY, title text)")
    pc = make_changes(Collector())
    await pc.start()
    cases = [
        (binding("missing"), "Unable to subscribe to changes with given parameters. Please check Realtime is "
         "enabled for the given connect parameters: [event: *, schema: public, table: missing, filters: [], "
         "select: nil]"),
        (binding("items", filter="nope=eq.1"), "invalid column for filter nope"),
        (binding("items", filter="id=eq.abc"), 'invalid input syntax for type integer: "abc"'),
        (binding("items", filter="id=in.1"),
         "Error parsing `filter` params: `in` filter value must be wrapped by parentheses"),
        (binding("items", select=["title", "nope"]), "invalid column for select nope"),
        ({"event": "*"}, 'No subscription params provided. Please provide at least a `schema` or `table` to '
         'subscribe to: %{"event" => "*"}'),
    ]  # fmt: skip
    for params, message in cases:
        with pytest.raises(SubscriptionError) as exc:
            await pc.subscribe("x", [(1, binding("items")), (2, params)], None)
        assert str(exc.value) == message
        assert not exc.value.transient
    assert len(pc.index) == 0  # nothing registered by a failed call


async def test_subscribe_replace_unsubscribe_and_wildcards(db: Database, make_changes: Make) -> None:
    db.execute("CREATE TABLE a (id int4 PRIMARY KEY)")
    db.execute("CREATE TABLE b (id int4 PRIMARY KEY)")
    db.execute("CREATE SCHEMA other")
    db.execute("CREATE TABLE other.c (id int4 PRIMARY KEY)")
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    await pc.subscribe("schema", [(1, {"event": "INSERT", "schema": "public"})], None)
    await pc.subscribe("star", [(2, {"event": "INSERT", "schema": "*", "table": "*"})], None)
    await pc.subscribe("tableonly", [(3, {"event": "insert", "table": "b"})], None)
    await pc.subscribe("gone", [(4, binding("a"))], None)
    await pc.subscribe("replaced", [(5, binding("a"))], None)
    await pc.subscribe("replaced", [(6, binding("b")), (7, binding("b", "INSERT"))], None)
    pc.unsubscribe("gone")
    pc.unsubscribe("never-subscribed")
    db.execute("INSERT INTO a VALUES (1)")
    db.execute("INSERT INTO b VALUES (2)")
    db.execute("INSERT INTO other.c VALUES (3)")
    await col.wait_count(3)
    by_table = {d.data["table"]: d.matches for d in col.items}
    assert by_table == {
        "a": {"schema": [1], "star": [2]},
        "b": {"schema": [1], "star": [2], "tableonly": [3], "replaced": [6, 7]},
        "c": {"star": [2]},
    }


async def test_select_and_column_privileges(db: Database, make_changes: Make) -> None:
    db.execute("CREATE TABLE items (id int4 PRIMARY KEY, title text, secret text, n int4)")
    ensure_role(db, "authenticated")
    db.execute("GRANT SELECT (id, title, n) ON items TO authenticated")
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    user = {"role": "authenticated", "sub": "u1"}
    await pc.subscribe("admin", [(1, binding("items"))], None)
    await pc.subscribe("user", [(2, binding("items", filter="n=gt.0"))], user)
    await pc.subscribe("picky", [(3, binding("items", select=["title"]))], None)
    await pc.subscribe("unknown-role", [(4, binding("items"))], {"role": "no_such_role"})
    await pc.subscribe("empty-select", [(7, binding("items", select=[]))], None)  # every column
    with pytest.raises(SubscriptionError, match="invalid column for filter secret"):
        await pc.subscribe("user2", [(5, binding("items", filter="secret=eq.x"))], user)
    with pytest.raises(SubscriptionError, match="invalid column for select secret"):
        await pc.subscribe("user3", [(6, binding("items", select=["secret"]))], user)
    db.execute("INSERT INTO items VALUES (1, 't', 's', 5)")
    db.execute("UPDATE items SET secret = 'z' WHERE id = 1")
    await col.wait_count(2, owner="admin")
    calls = [d for d in col.items if d.data["type"] == "INSERT"]
    assert len(calls) == 3 and len({d.change_id for d in calls}) == 1
    seen = {owner: d.data for d in calls for owner in d.matches}
    assert set(seen) == {"admin", "user", "picky", "unknown-role", "empty-select"}
    assert seen["admin"]["record"] == {"id": 1, "title": "t", "secret": "s", "n": 5}
    assert seen["admin"] is seen["unknown-role"]  # a role missing from the database is not restricted
    assert seen["admin"] is seen["empty-select"]  # select: [] is no selection, not the key only
    assert seen["user"]["record"] == {"id": 1, "title": "t", "n": 5}
    assert [c["name"] for c in seen["user"]["columns"]] == ["id", "title", "n"]
    assert seen["picky"]["record"] == {"id": 1, "title": "t"}  # the primary key comes along
    upd = next(d for d in col.items if d.data["type"] == "UPDATE" and "user" in d.matches)
    assert upd.data["old_record"] == {"id": 1} and "secret" not in upd.data["record"]


async def test_existing_publication_is_used_as_it_is(db: Database, make_changes: Make) -> None:
    db.execute("CREATE TABLE a (id int4 PRIMARY KEY)")
    db.execute("CREATE TABLE b (id int4 PRIMARY KEY)")
    db.execute("CREATE PUBLICATION supabase_realtime FOR TABLE a")
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    assert db.execute("SELECT puballtables FROM pg_publication WHERE pubname = 'supabase_realtime'") == [
        (False,)
    ]
    with pytest.raises(SubscriptionError, match=r"Unable to subscribe .*table: b,"):
        await pc.subscribe("b", [(1, binding("b"))], None)
    await pc.subscribe("a", [(2, binding("a"))], None)
    db.execute("INSERT INTO b VALUES (1)")
    db.execute("INSERT INTO a VALUES (2)")
    await col.wait_count(1)
    assert [d.data["table"] for d in col.items] == ["a"]


async def test_custom_publication_name_is_created_for_all_tables(db: Database, make_changes: Make) -> None:
    db.execute("CREATE TABLE a (id int4 PRIMARY KEY)")
    pc = make_changes(Collector(), publication="my_pub")
    await pc.start()
    assert db.execute("SELECT puballtables FROM pg_publication WHERE pubname = 'my_pub'") == [(True,)]
    assert db.execute("SELECT count(*) FROM pg_publication WHERE pubname = 'supabase_realtime'") == [(0,)]


async def test_many_eq_subscribers_on_one_table(db: Database, make_changes: Make) -> None:
    db.execute("CREATE TABLE orders (id int8 PRIMARY KEY, status text)")
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    for n in range(2000):
        await pc.subscribe(("user", n), [(n, binding("orders", filter=f"id=eq.{n}"))], None)
    db.execute("INSERT INTO orders SELECT g, 'new' FROM generate_series(0, 9) g")
    db.execute("UPDATE orders SET status = 'paid' WHERE id = 1234 OR id = 7")
    await col.wait_count(11)
    assert [d.matches for d in col.items] == [{("user", n): [n]} for n in range(10)] + [{("user", 7): [7]}]


# --------------------------------------------------------------------------------------------
# Delivery guarantees: confirmation, restarts
# --------------------------------------------------------------------------------------------


async def test_position_is_confirmed_after_delivery_and_lag_is_reported(
    db: Database, make_changes: Make
) -> None:
    db.execute("CREATE TABLE t (id int4 PRIMARY KEY, body text)")
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    await pc.subscribe("o", [(1, binding("t"))], None)
    before = db.confirmed_lsn(pc.slot)
    db.execute("INSERT INTO t VALUES (1, 'a')")
    await col.wait_count(1)
    commit_lsn = parse_lsn(col.items[0].change_id.split(":")[0])
    assert before < commit_lsn
    # Confirmed past the commit record once delivered (to its end, or further on a keepalive).
    await wait_until(lambda: db.confirmed_lsn(pc.slot) > commit_lsn)
    lag = await pc.slot_lag_bytes()
    assert lag is not None and lag >= 0
    await pc.stop()
    assert not pc.connected
    # While nobody consumes, the slot holds everything written since: ~200 kB of values here.
    db.execute("INSERT INTO t SELECT g, repeat(md5(g::text), 60) FROM generate_series(2, 100) g")
    idle = PostgresChanges(db.dsn, slot=pc.slot, deliver=Collector())
    missing = PostgresChanges(db.dsn, slot="no_such_slot", deliver=Collector())
    try:
        lag = await idle.slot_lag_bytes()
        assert lag is not None and lag > 150_000
        assert await missing.slot_lag_bytes() is None
    finally:
        await idle.stop()
        await missing.stop()


async def test_service_restart_resumes_where_it_stopped(db: Database, make_changes: Make) -> None:
    db.execute("CREATE TABLE t (id int4 PRIMARY KEY)")
    first = Collector()
    a = make_changes(first)
    await a.start()
    await a.subscribe("o", [(1, binding("t"))], None)
    for i in range(1, 6):
        db.execute("INSERT INTO t VALUES (%s)", (i,))
    await first.wait_count(5)
    await a.stop()
    for i in range(6, 11):  # committed while nothing runs
        db.execute("INSERT INTO t VALUES (%s)", (i,))
    second = Collector()
    b = make_changes(second)
    # Subscribed before start (the publication exists now): the backlog is matched as it streams.
    await b.subscribe("o", [(1, binding("t"))], None)
    await b.start()
    await second.wait_count(5)
    db.execute("INSERT INTO t VALUES (11)")
    await second.wait_count(6)
    assert records(first, "o") == [1, 2, 3, 4, 5]
    # A clean stop confirmed what it delivered: nothing lost, nothing repeated.
    assert records(second, "o") == [6, 7, 8, 9, 10, 11]


async def test_crash_mid_transaction_redelivers_the_whole_transaction(
    db: Database, make_changes: Make
) -> None:
    db.execute("CREATE TABLE t (id int4 PRIMARY KEY, note text)")
    slot = unique_slot()
    conn = catalog.connect(db.dsn)
    catalog.ensure_publication(conn, "supabase_realtime")
    catalog.ensure_slot(conn, slot)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1, 'first')")
        cur.execute("BEGIN")
        cur.execute("INSERT INTO t VALUES (2, 'tx'), (3, 'tx'), (4, 'tx')")
        cur.execute("COMMIT")
        cur.execute("INSERT INTO t VALUES (5, 'last')")
    conn.close()

    # A separate process dies inside its third delivery: the middle of the 3-row transaction.
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tests.cdc.crash_consumer", db.dsn, slot, "t", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    crashed = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [c["row"] for c in crashed] == [1, 2, 3]

    col = Collector()
    b = make_changes(col, slot=slot)
    await b.subscribe("o", [(1, binding("t"))], None)
    await b.start()
    await col.wait_for(lambda c: 5 in records(c, "o"))
    again = {d.change_id: d.data for d in col.items}
    # The transaction whose delivery was cut short comes again, whole, with the same ids and data.
    for c in crashed[1:]:
        assert again[c["id"]] == c["data"]
    assert records(col, "o")[-4:] == [2, 3, 4, 5]
    assert set(records(col, "o")) | {c["row"] for c in crashed} == {1, 2, 3, 4, 5}


async def test_postgres_restart_is_survived(
    postgres: PostgresServer, db: Database, make_changes: Make
) -> None:
    db.execute("CREATE TABLE t (id int4 PRIMARY KEY)")
    col = Collector()
    pc = make_changes(col)
    await pc.start()
    await pc.subscribe("o", [(1, binding("t"))], None)
    db.execute("INSERT INTO t VALUES (1)")
    await col.wait_count(1)
    await asyncio.to_thread(postgres.restart)
    db.execute("INSERT INTO t VALUES (2)")
    await col.wait_count(2)
    assert pc.connected
    # Catalog connections recover too.
    await pc.subscribe("o2", [(2, binding("t", filter="id=eq.3"))], None)
    db.execute("INSERT INTO t VALUES (3)")
    await col.wait_for(lambda c: len(c.for_owner("o2")) == 1)
    assert sorted(set(records(col, "o"))) == [1, 2, 3]
    assert await pc.slot_lag_bytes() is not None


async def test_subscribe_while_database_is_down_is_transient(tmp_path: Path) -> None:
    pc = PostgresChanges("postgresql://postgres@127.0.0.1:1/none", deliver=Collector())
    with pytest.raises(SubscriptionError) as exc:
        await pc.subscribe("o", [(1, binding("t"))], None)
    assert exc.value.transient
    assert str(exc.value).startswith("UnableToConnectToProject:")
    await pc.stop()


# --------------------------------------------------------------------------------------------
# Setup errors
# --------------------------------------------------------------------------------------------


async def test_start_errors_are_one_clear_line(postgres: PostgresServer, db: Database) -> None:
    async def start_error(dsn: str, **kwargs: Any) -> str:
        pc = PostgresChanges(dsn, deliver=Collector(), **kwargs)
        with pytest.raises(PostgresChangesError) as exc:
            await pc.start(timeout=10)
        await pc.stop()
        message = str(exc.value)
        assert "\n" not in message
        return message

    assert (await start_error("postgresql://postgres@127.0.0.1:1/nowhere")).startswith(
        "PostgreSQL at 127.0.0.1:1/nowhere: "
    )
    db.execute("CREATE ROLE plain LOGIN")
    user_dsn = db.dsn.replace("postgres@", "plain@")
    assert await start_error(user_dsn) == (
        "database role 'plain' lacks the REPLICATION privilege (ALTER ROLE \"plain\" REPLICATION)"
    )
    db.execute("CREATE ROLE replicator LOGIN REPLICATION")
    assert (await start_error(db.dsn.replace("postgres@", "replicator@"), publication="pub_x")).startswith(
        "publication 'pub_x' does not exist and this role may not create it FOR ALL TABLES"
    )
    other_db = postgres.create_database()
    postgres.execute("SELECT pg_create_logical_replication_slot('elsewhere_slot', 'pgoutput')",
                     dbname=other_db.rsplit("/", 1)[1])  # fmt: skip
    try:
        assert "exists but is a logical slot" in await start_error(db.dsn, slot="elsewhere_slot")
    finally:
        postgres.execute("SELECT pg_drop_replication_slot('elsewhere_slot')")
    with pytest.raises(PostgresChangesError, match="invalid database URL"):
        PostgresChanges("not a url", deliver=Collector())


async def test_wal_level_must_be_logical() -> None:
    server = PostgresServer({"wal_level": "replica"})
    try:
        await asyncio.to_thread(server.start)
        pc = PostgresChanges(server.dsn(), deliver=Collector())
        with pytest.raises(PostgresChangesError) as exc:
            await pc.start()
        await pc.stop()
        assert str(exc.value) == (
            "PostgreSQL wal_level is 'replica', Postgres Changes needs wal_level = logical "
            "(set it in postgresql.conf and restart PostgreSQL)"
        )
    finally:
        await asyncio.to_thread(server.destroy)


def test_binding_id_is_stable() -> None:
    params = binding("t", "INSERT", "id=eq.1")
    assert PostgresChanges.binding_id(params) == PostgresChanges.binding_id(dict(params))
    assert 0 <= PostgresChanges.binding_id(params) < 2**31
