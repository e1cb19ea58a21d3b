"""Postgres Changes with row level security checks (``rls=True``) against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cdc.conftest import Collector, Database, ensure_role, unique_slot, wait_until
from tests.support.postgres import PostgresServer
from tidings.cdc import catalog
from tidings.cdc.changes import Change
from tidings.cdc.cluster import decode_change, encode_change
from tidings.cdc.pgoutput import parse_lsn
from tidings.cdc.rls import identity_of, key_only, row_key
from tidings.cdc.service import PostgresChanges

pytestmark = pytest.mark.postgres

Make = Callable[..., PostgresChanges]
REPO = Path(__file__).resolve().parents[2]

SCHEMA = """
CREATE TABLE notes (id int4 PRIMARY KEY, owner text NOT NULL, body text);
ALTER TABLE notes REPLICA IDENTITY FULL;
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON notes FOR SELECT TO authenticated
    USING (owner = (current_setting('request.jwt.claims', true)::json->>'sub'));
GRANT SELECT ON notes TO authenticated;
CREATE TABLE plain (id int4 PRIMARY KEY, owner text);
ALTER TABLE plain REPLICA IDENTITY FULL;
GRANT SELECT ON plain TO authenticated;
"""

ALICE = {"role": "authenticated", "sub": "alice", "exp": 2_000_000_000}
BOB = {"role": "authenticated", "sub": "bob", "exp": 2_000_000_000}
GHOST = {"role": "no_such_role", "sub": "alice", "exp": 2_000_000_000}


@pytest.fixture
def rls_db(db: Database) -> Database:
    ensure_role(db, "authenticated")
    db.execute(SCHEMA)
    return db


def both(table: str = "*") -> list[tuple[int, dict[str, Any]]]:
    if table == "*":
        return [(1, {"event": "*", "schema": "public", "table": "notes"}),
                (2, {"event": "*", "schema": "public", "table": "plain"})]  # fmt: skip
    return [(1, {"event": "*", "schema": "public", "table": table})]


def seen(col: Collector, owner: Any) -> list[tuple[str, str, int]]:
    """(table, type, id) of what *owner* received, in order."""
    out = []
    for d in col.for_owner(owner):
        row = d.data.get("record", d.data.get("old_record"))
        out.append((d.data["table"], d.data["type"], row["id"]))
    return out


async def test_rows_reach_only_subscribers_allowed_to_read_them(rls_db: Database, make_changes: Make) -> None:
    db = rls_db
    col = Collector()
    pc = make_changes(col, rls=True)
    await pc.start()
    await pc.subscribe("alice", both(), ALICE)
    await pc.subscribe("bob", both(), BOB)
    await pc.subscribe("ghost", both(), GHOST)  # its role does not exist in the database
    await pc.subscribe("nobody", both(), None)  # no claims at all

    db.execute("INSERT INTO notes VALUES (1, 'alice', 'a'), (2, 'bob', 'b')")
    db.execute("INSERT INTO plain VALUES (1, 'alice')")
    db.execute("UPDATE notes SET body = 'a2' WHERE id = 1")
    db.execute("UPDATE plain SET owner = 'bob' WHERE id = 1")
    # Rows are judged as they are when checked: let the checks run before the row goes.
    for owner in ("alice", "bob"):
        await col.wait_for(lambda c, o=owner: ("plain", "UPDATE", 1) in seen(c, o))
    db.execute("DELETE FROM notes WHERE id = 1")
    db.execute("DELETE FROM plain WHERE id = 1")
    # The last change reaches everybody: once it did, everything before it was decided.
    for owner in ("alice", "bob", "ghost", "nobody"):
        await col.wait_for(lambda c, o=owner: ("plain", "DELETE", 1) in seen(c, o))

    unchecked = [
        ("plain", "INSERT", 1),
        ("plain", "UPDATE", 1),
        ("notes", "DELETE", 1),
        ("plain", "DELETE", 1),
    ]
    assert seen(col, "alice") == [
        ("notes", "INSERT", 1),
        *unchecked[:1],
        ("notes", "UPDATE", 1),
        *unchecked[1:],
    ]
    assert seen(col, "bob") == [("notes", "INSERT", 2), *unchecked]
    assert seen(col, "ghost") == unchecked
    assert seen(col, "nobody") == unchecked

    def data(owner: str, table: str, kind: str) -> dict[str, Any]:
        return next(
            d.data for d in col.for_owner(owner) if d.data["table"] == table and d.data["type"] == kind
        )

    assert data("alice", "notes", "INSERT")["record"] == {"id": 1, "owner": "alice", "body": "a"}
    assert data("alice", "notes", "UPDATE")["old_record"] == {"id": 1, "owner": "alice", "body": "a"}
    # DELETE is not RLS-checked: under row level security only the key of the old row is sent.
    assert data("bob", "notes", "DELETE")["old_record"] == {"id": 1}
    assert {"name": "owner", "type": "text"} in data("bob", "notes", "DELETE")["columns"]
    # A table without row level security: as without the option (the whole old row).
    assert data("bob", "plain", "DELETE")["old_record"] == {"id": 1, "owner": "bob"}


async def test_identical_claims_share_one_check(rls_db: Database, make_changes: Make) -> None:
    db = rls_db
    col = Collector()
    pc = make_changes(col, rls=True)
    await pc.start()
    for n in range(5):
        await pc.subscribe(("alice", n), both("notes"), dict(ALICE))
    await pc.subscribe("bob", both("notes"), BOB)
    await pc.subscribe("nobody", both("notes"), None)
    db.execute("INSERT INTO plain VALUES (1)")  # no row level security: no query
    db.execute("INSERT INTO notes VALUES (1, 'alice')")
    await col.wait_count(1)
    await asyncio.sleep(0.2)
    # alice's claims once, bob's once, none for no claims (plus any re-run of a check that ran
    # before the commit was visible)
    assert pc.rls_queries - pc.rls_rechecks == 2
    (delivery,) = col.items
    assert delivery.matches == {("alice", n): [1] for n in range(5)}


async def test_order_is_kept_across_checked_and_unchecked_tables(
    rls_db: Database, make_changes: Make
) -> None:
    db = rls_db
    col = Collector()
    pc = make_changes(col, rls=True)
    await pc.start()
    await pc.subscribe("alice", both(), ALICE)
    await pc.subscribe("bob", both(), BOB)
    expected_alice, expected_bob = [], []
    for i in range(20):  # one transaction each, mixing both tables
        db.execute(
            "INSERT INTO notes VALUES (%s, 'alice'); INSERT INTO plain VALUES (%s); "
            "INSERT INTO notes VALUES (%s, 'bob')",
            (100 + i, 100 + i, 200 + i),
        )
        expected_alice += [("notes", "INSERT", 100 + i), ("plain", "INSERT", 100 + i)]
        expected_bob += [("plain", "INSERT", 100 + i), ("notes", "INSERT", 200 + i)]
    # A transaction larger than a batch and a run: 3,000 rows, every other one alice's.
    db.execute(
        "INSERT INTO notes SELECT g, CASE WHEN g % 2 = 0 THEN 'alice' ELSE 'bob' END "
        "FROM generate_series(1000, 3999) g; INSERT INTO plain VALUES (1)"
    )
    expected_alice += [("notes", "INSERT", g) for g in range(1000, 4000, 2)] + [("plain", "INSERT", 1)]
    expected_bob += [("notes", "INSERT", g) for g in range(1001, 4000, 2)] + [("plain", "INSERT", 1)]
    await col.wait_for(
        lambda c: ("plain", "INSERT", 1) in seen(c, "bob") and ("plain", "INSERT", 1) in seen(c, "alice")
    )
    assert seen(col, "alice") == expected_alice
    assert seen(col, "bob") == expected_bob
    ids = [d.change_id for d in col.items]
    assert len(ids) == len(set(ids))  # one call per change (alice and bob see the same columns)
    assert pc.rls_queries - pc.rls_rechecks < 200  # checked by the run, not by the row
    # Confirmed once delivered.
    last_commit = max(parse_lsn(i.split(":")[0]) for i in ids)
    await wait_until(lambda: db.confirmed_lsn(pc.slot) > last_commit)


async def test_failed_checks_hide_the_row_and_delivery_goes_on(
    rls_db: Database, make_changes: Make, caplog: pytest.LogCaptureFixture
) -> None:
    db = rls_db
    db.execute("CREATE TABLE hidden (id int4 PRIMARY KEY); ALTER TABLE hidden ENABLE ROW LEVEL SECURITY")
    col = Collector()
    pc = make_changes(col, rls=True)
    await pc.start()
    await pc.subscribe("alice", [*both(), (3, {"event": "*", "schema": "public", "table": "hidden"})], ALICE)
    db.execute("INSERT INTO hidden VALUES (1)")  # authenticated may not SELECT it at all
    db.execute("INSERT INTO notes VALUES (1, 'alice')")
    await col.wait_for(lambda c: ("notes", "INSERT", 1) in seen(c, "alice"))
    assert seen(col, "alice") == [("notes", "INSERT", 1)]
    assert "RLS check of public.hidden for role 'authenticated' failed (permission denied" in caplog.text


async def test_postgres_restart_during_rls_checks(
    postgres: PostgresServer, rls_db: Database, make_changes: Make
) -> None:
    db = rls_db
    col = Collector()
    pc = make_changes(col, rls=True)
    await pc.start()
    await pc.subscribe("alice", both(), ALICE)
    db.execute("INSERT INTO notes VALUES (1, 'alice')")
    await col.wait_count(1)
    await asyncio.to_thread(postgres.restart)  # pooled connections are dead now
    db.execute("INSERT INTO notes VALUES (2, 'bob'), (3, 'alice')")
    await col.wait_for(lambda c: ("notes", "INSERT", 3) in seen(c, "alice"))
    assert seen(col, "alice") == [("notes", "INSERT", 1), ("notes", "INSERT", 3)]


async def test_restart_with_rls_loses_nothing(rls_db: Database, make_changes: Make) -> None:
    db = rls_db
    first = Collector()
    a = make_changes(first, rls=True)
    await a.start()
    await a.subscribe("alice", both(), ALICE)
    for i in range(1, 6):
        db.execute(
            "INSERT INTO notes VALUES (%s, 'alice'); INSERT INTO notes VALUES (%s, 'bob')", (i, 100 + i)
        )
    await first.wait_count(5)
    await a.stop()
    for i in range(6, 11):  # committed while nothing runs
        db.execute("INSERT INTO notes VALUES (%s, 'alice'); INSERT INTO plain VALUES (%s)", (i, i))
    second = Collector()
    b = make_changes(second, rls=True)
    await b.subscribe("alice", both(), ALICE)
    await b.start()
    db.execute("INSERT INTO notes VALUES (11, 'alice')")
    await second.wait_for(lambda c: ("notes", "INSERT", 11) in seen(c, "alice"))
    assert seen(first, "alice") == [("notes", "INSERT", i) for i in range(1, 6)]
    # A clean stop confirmed what it delivered: nothing lost, nothing repeated.
    assert seen(second, "alice") == [
        *[x for i in range(6, 11) for x in (("notes", "INSERT", i), ("plain", "INSERT", i))],
        ("notes", "INSERT", 11),
    ]


async def test_crash_mid_transaction_with_rls_redelivers_the_whole_transaction(
    rls_db: Database, make_changes: Make
) -> None:
    db = rls_db
    slot = unique_slot()
    conn = catalog.connect(db.dsn)
    catalog.ensure_publication(conn, "supabase_realtime")
    catalog.ensure_slot(conn, slot)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO notes VALUES (1, 'alice')")
        cur.execute("BEGIN")
        cur.execute("INSERT INTO notes VALUES (2, 'alice'), (50, 'bob'), (3, 'alice'), (4, 'alice')")
        cur.execute("COMMIT")
        cur.execute("INSERT INTO notes VALUES (5, 'alice')")
    conn.close()
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tests.cdc.crash_consumer", db.dsn, slot, "notes", "3", json.dumps(ALICE)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    crashed = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [c["row"] for c in crashed] == [1, 2, 3]  # bob's row 50 was not delivered
    col = Collector()
    b = make_changes(col, slot=slot, rls=True)
    await b.subscribe("alice", both("notes"), ALICE)
    await b.start()
    await col.wait_for(lambda c: ("notes", "INSERT", 5) in seen(c, "alice"))
    again = {d.change_id: d.data for d in col.items}
    for c in crashed[1:]:
        assert again[c["id"]] == c["data"]
    assert [r for _, _, r in seen(col, "alice")][-4:] == [2, 3, 4, 5]


async def test_cluster_nodes_check_the_changes_they_deliver(rls_db: Database, make_changes: Make) -> None:
    """In a cluster the leader streams without checks and each node checks what it delivers."""
    db = rls_db
    node_col = Collector()
    node = PostgresChanges(db.dsn, deliver=node_col, rls=True)  # a node that does not stream
    forwarded: list[Change] = []

    class Forwarder:
        def change(self, change: Change) -> None:
            forwarded.append(change)
            node.dispatch(decode_change(json.loads(json.dumps(encode_change(change)))))

        def end(self, end_lsn: int, confirm: Callable[[int], None]) -> None:
            confirm(end_lsn)

    leader = make_changes(Collector(), rls=True)
    leader.forwarder = Forwarder()
    try:
        await leader.start()
        await node.subscribe("alice", both(), ALICE)
        await node.subscribe("bob", both(), BOB)
        db.execute("INSERT INTO notes VALUES (1, 'alice'), (2, 'bob'); INSERT INTO plain VALUES (3)")
        await node_col.wait_for(lambda c: len(seen(c, "alice")) == len(seen(c, "bob")) == 2)
        db.execute("DELETE FROM notes WHERE id = 1")
        await node_col.wait_for(lambda c: len(seen(c, "alice")) == len(seen(c, "bob")) == 3)
        assert seen(node_col, "alice") == [
            ("notes", "INSERT", 1),
            ("plain", "INSERT", 3),
            ("notes", "DELETE", 1),
        ]
        assert seen(node_col, "bob") == [
            ("notes", "INSERT", 2),
            ("plain", "INSERT", 3),
            ("notes", "DELETE", 1),
        ]
        assert node_col.items[-1].data["old_record"] == {"id": 1}
        assert forwarded[-1].data["old_record"] == {"id": 1, "owner": "alice", "body": None}
        assert forwarded[-1].xid > 0 and decode_change(encode_change(forwarded[-1])).xid == forwarded[-1].xid
        assert leader.rls_queries == 0 and node.rls_queries > 0
    finally:
        await node.stop()


# --------------------------------------------------------------------------------------------
# Without a database
# --------------------------------------------------------------------------------------------


def change(
    kind: str, record: dict[str, Any] | None, old: dict[str, Any] | None, pk: tuple[str, ...] = ("id",)
) -> Change:
    data: dict[str, Any] = {"schema": "public", "table": "t", "type": kind, "columns": [], "errors": None}
    if record is not None:
        data["record"] = record
    if old is not None:
        data["old_record"] = old
    return Change("0/1:0", 1, 0, "public", "t", kind, data, record or old or {}, {}, pk)


def test_helpers() -> None:
    assert identity_of({"sub": "u", "role": "authenticated"}) == identity_of(
        {"role": "authenticated", "sub": "u"}
    )
    assert identity_of(None).role is None and identity_of({"sub": "u"}).role is None
    assert row_key(change("INSERT", {"id": 1, "a": 2}, None)) == (1,)
    assert row_key(change("INSERT", {"a": 2}, None)) is None  # key left out (an oversized row)
    assert row_key(change("INSERT", {"id": 1}, None, pk=())) is None
    full = change("DELETE", None, {"id": 1, "secret": "x"})
    narrowed = key_only(full)
    assert narrowed.data["old_record"] == narrowed.row == {"id": 1}
    assert full.data["old_record"] == {"id": 1, "secret": "x"}  # not modified
    assert key_only(change("DELETE", None, {"id": 1})).data["old_record"] == {"id": 1}


async def test_cluster_backlog_is_bounded() -> None:
    pc = PostgresChanges("postgresql://postgres@127.0.0.1:1/none", deliver=Collector(), rls=True)
    assert pc._pipeline is not None
    pc._pipeline._backlog = 3
    try:
        accepted = [pc._pipeline.put_change(change("INSERT", {"id": i}, None)) for i in range(5)]
        assert accepted == [True, True, True, False, False] and pc.rls_dropped == 2
        await wait_until(lambda: pc._pipeline is not None and pc._pipeline.idle)  # nobody subscribed
        assert pc._pipeline.put_change(change("INSERT", {"id": 9}, None))
    finally:
        await pc.stop()


def test_visible_keys_for_every_kind_of_key(rls_db: Database) -> None:
    """Composite, uuid, timestamptz, numeric and array keys are looked up by the record's values."""
    db = rls_db
    policy = "USING (owner = (current_setting('request.jwt.claims', true)::json->>'sub'))"
    tables = {
        "composite": ("a int8, b text", "(1, 'x', 'alice'), (1, 'y', 'bob'), (2, 'x', 'alice')", "a, b"),
        "uuids": ("u uuid", "('639f86b1-738b-43ed-bb09-c8d3f3bafa30', 'alice')", "u"),
        "times": ("t timestamptz", "('2026-08-21 14:00:00.123+02', 'alice')", "t"),
        "nums": ("n numeric", "(1.5, 'alice'), (12345678901234567890.5, 'alice')", "n"),
        "arrays": ("v int4[]", "('{1,2}', 'alice'), ('{3}', 'bob')", "v"),
    }
    for name, (columns, rows, key) in tables.items():
        db.execute(
            f"CREATE TABLE {name} ({columns}, owner text, PRIMARY KEY ({key})); "
            f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY; "
            f"CREATE POLICY p ON {name} FOR SELECT TO authenticated {policy}; "
            f"GRANT SELECT ON {name} TO authenticated; INSERT INTO {name} VALUES {rows}"
        )
    conn = catalog.connect(db.dsn)
    claims = json.dumps(ALICE)

    def visible(table: str, key_columns: tuple[str, ...], keys: list[tuple[Any, ...]]) -> set[int]:
        security = catalog.table_security(conn, "public", table)
        assert security.enabled and set(security.key_types) == set(key_columns)
        return catalog.visible_keys(
            conn, "public", table, key_columns, security.key_types, "authenticated", claims, keys
        )

    try:
        # Values as the change's record holds them (see tidings.cdc.values).
        assert visible("composite", ("a", "b"), [(1, "x"), (1, "y"), (2, "x"), (3, "z")]) == {0, 2}
        assert visible("uuids", ("u",), [("639f86b1-738b-43ed-bb09-c8d3f3bafa30",)]) == {0}
        assert visible("times", ("t",), [("2026-08-21T12:00:00.123+00:00",)]) == {0}
        assert visible("nums", ("n",), [(1.5,), ("12345678901234567890.5",), (2,)]) == {0, 1}
        assert visible("arrays", ("v",), [([1, 2],), ([3],)]) == {0}
        assert catalog.table_security(conn, "public", "plain") == catalog.TableSecurity(
            False, {"id": "pg_catalog.int4"}
        )
        with pytest.raises(catalog.CheckFailed, match="no_such_role"):
            catalog.visible_keys(conn, "public", "uuids", ("u",), {}, "no_such_role", claims, [("x",)])
        # A check names the transactions that wrote the rows: while one of them is still running
        # for the check's snapshot, the check says so instead of answering "not visible".
        writer = db.connect()
        with writer.cursor() as cur:
            cur.execute("BEGIN; INSERT INTO uuids VALUES ('00000000-0000-0000-0000-000000000001', 'alice')")
            cur.execute("SELECT txid_current() % 4294967296")  # the 32-bit id the stream carries
            ((xid,),) = cur.fetchall()
            key = [("00000000-0000-0000-0000-000000000001",)]
            with pytest.raises(catalog.NotYetVisible):
                catalog.visible_keys(
                    conn,
                    "public",
                    "uuids",
                    ("u",),
                    {"u": "pg_catalog.uuid"},
                    "authenticated",
                    claims,
                    key,
                    [xid],
                )
            cur.execute("COMMIT")
        writer.close()
        assert catalog.visible_keys(
            conn, "public", "uuids", ("u",), {"u": "pg_catalog.uuid"}, "authenticated", claims, key, [xid]
        ) == {0}
        # The connection is usable afterwards: nothing of the check is left on it.
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, current_setting('request.jwt.claims', true)")
            assert cur.fetchone() == ("postgres", "")
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# A commit arrives before other sessions see it
# --------------------------------------------------------------------------------------------

WRITERS = 4
ROWS_PER_WRITER = 500


def write_rows(db: Database, writer: int) -> None:
    """ROWS_PER_WRITER single-row autocommit INSERTs, every other one alice's."""
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            for n in range(ROWS_PER_WRITER):
                row = writer * ROWS_PER_WRITER + n
                cur.execute("INSERT INTO notes VALUES (%s, %s)", (row, "alice" if row % 2 == 0 else "bob"))
    finally:
        conn.close()


async def test_every_committed_row_reaches_its_readers_under_load(sync_postgres: PostgresServer) -> None:
    """2,000 single-row INSERTs from 4 concurrent writers: each row reaches exactly its owner.

    Every commit here reaches Tidings while other sessions still see its transaction as running.
    Checked right away, no row would be visible to anyone (all 2,000 were lost before the checks
    waited for the writing transaction). Each check now waits until its snapshot sees it.
    """
    dsn = sync_postgres.create_database()
    db = Database(sync_postgres, dsn.rsplit("/", 1)[1], dsn)
    ensure_role(db, "authenticated")
    db.execute(SCHEMA)
    col = Collector()
    pc = PostgresChanges(db.dsn, slot=unique_slot(), deliver=col, rls=True)
    try:
        await pc.start()
        inserts = [
            (i, {"event": "INSERT", "schema": "public", "table": t}) for i, t in ((1, "notes"), (2, "plain"))
        ]
        await pc.subscribe("alice", inserts, ALICE)
        await pc.subscribe("bob", inserts, BOB)
        await asyncio.gather(*(asyncio.to_thread(write_rows, db, w) for w in range(WRITERS)))
        total = WRITERS * ROWS_PER_WRITER
        db.execute("INSERT INTO plain VALUES (1)")  # unchecked, after every INSERT: the end marker
        # Changes are delivered in order: once the marker arrived, every row before it was decided.
        await wait_until(lambda: all(("plain", "INSERT", 1) in seen(col, o) for o in ("alice", "bob")), 90)
        got = {o: sorted(r for t, _, r in seen(col, o) if t == "notes") for o in ("alice", "bob")}
        lost = {o: sorted(set(range(i, total, 2)) - set(got[o])) for i, o in enumerate(("alice", "bob"))}
        assert lost == {"alice": [], "bob": []}
        assert got["alice"] == list(range(0, total, 2))
        assert got["bob"] == list(range(1, total, 2))
        assert pc.rls_hidden == total  # each row withheld from the other reader, and counted
        assert pc.rls_rechecks > 0  # the window was hit, and waited out
    finally:
        await pc.stop()


def test_check_looks_rows_up_by_the_primary_key_index(rls_db: Database) -> None:
    """Under row level security only leakproof conditions may run before the policy: with the
    cast in the join condition the policy ran on every row of the table (a check cost grew with
    the table). The arrays are cast instead, and the lookup goes through the primary key."""
    db = rls_db
    db.execute(
        "INSERT INTO notes SELECT g, 'user' || (g % 100) FROM generate_series(1, 20000) g; ANALYZE notes"
    )
    conn = catalog.connect(db.dsn)
    try:
        security = catalog.table_security(conn, "public", "notes")
        query = catalog._check_query(conn, "public", "notes", ("id",), (security.key_types["id"],))
        settings, check = query.split("; ", 1)
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute(settings, ["authenticated", json.dumps(ALICE), "alice", "authenticated"])
            cur.execute("EXPLAIN " + check, [["1", "2", "3"], []])
            plan = "\n".join(row[0] for row in cur.fetchall())
            cur.execute("ROLLBACK")
        assert "Index Scan using notes_pkey" in plan and "Seq Scan on notes" not in plan, plan
    finally:
        conn.close()
