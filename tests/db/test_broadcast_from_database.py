"""Broadcast from Database against a PostgreSQL prepared like Supabase's image: realtime.send,
send_binary and broadcast_changes rows reach the publish callback; transactions; restarts lose and
repeat nothing; limits; the publication; failed hand-overs; readiness; the slot keeps up when idle."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.postgres import PostgresServer
from tests.support.supabase_db import SupabaseDatabase, create_supabase_database
from tidings.broker.base import FAILED, PublishDone
from tidings.config import Config
from tidings.db.broadcast import (
    PUBLICATION,
    BroadcastFromDatabase,
    BroadcastFromDatabaseError,
    MessageDecoder,
    ensure_messages_publication,
    start_broadcast_from_database,
)
from tidings.db.migrations import prepare

pytestmark = pytest.mark.postgres

_slots = itertools.count(1)


@dataclass
class Published:
    private: bool
    topic: str
    event: str
    payload: Any
    msg_id: str | None


@dataclass
class Recorder:
    """A ``publish`` callback: records every row; ``fail`` makes the next calls report FAILED."""

    items: list[Published] = field(default_factory=list)
    fail: int = 0
    failed: list[Published] = field(default_factory=list)
    held: list[tuple[PublishDone, int]] = field(default_factory=list)
    hold: bool = False

    def __call__(
        self,
        private: bool,
        sub_topic: str,
        event: str,
        payload: Any,
        msg_id: str | None = None,
        *,
        done: PublishDone | None = None,
    ) -> None:
        item = Published(private, sub_topic, event, payload, msg_id)
        if self.fail > 0:
            self.fail -= 1
            self.failed.append(item)
            if done is not None:
                done(FAILED)
            return
        self.items.append(item)
        if done is None:
            return
        if self.hold:
            self.held.append((done, len(self.items)))
        else:
            done(len(self.items))

    def release(self) -> None:
        held, self.held = self.held, []
        for done, seq in held:
            done(seq)

    def events(self) -> list[str]:
        return [i.event for i in self.items]


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll *predicate* until true (the timeout only stops a hung test; no speed is asserted)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


def drop_slots(postgres: PostgresServer, dbname: str) -> None:
    """Drop the database's slots once their readers are gone (slots are few, and pin WAL)."""
    for _ in range(100):
        postgres.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE database = %s AND NOT active",
            (dbname,),
        )
        if not postgres.execute("SELECT 1 FROM pg_replication_slots WHERE database = %s", (dbname,)):
            return
        time.sleep(0.1)


@pytest.fixture
def messages_db(postgres: PostgresServer) -> Iterator[SupabaseDatabase]:
    """A Supabase-like database after Tidings' migrations; its slots are dropped afterwards."""
    db = create_supabase_database(postgres)
    conn = db.connect()
    try:
        prepare(conn)
    finally:
        conn.close()
    yield db
    drop_slots(postgres, db.name)


@pytest.fixture
async def make_stream(
    messages_db: SupabaseDatabase,
) -> AsyncIterator[Callable[..., BroadcastFromDatabase]]:
    """Build streams on the test's database (one slot per test); all are stopped at the end."""
    made: list[BroadcastFromDatabase] = []
    slot = f"tidings_msg_test_{next(_slots)}"

    def make(publish: Any, **kwargs: Any) -> BroadcastFromDatabase:
        kwargs.setdefault("slot", slot)
        stream = BroadcastFromDatabase(messages_db.dsn, publish, **kwargs)
        made.append(stream)
        return stream

    yield make
    for stream in made:
        await stream.stop()


def send(db: SupabaseDatabase, payload: dict[str, Any], event: str, topic: str, private: bool = True) -> None:
    db.execute("SELECT realtime.send(%s::jsonb, %s, %s, %s)", (json.dumps(payload), event, topic, private))


def row_ids(db: SupabaseDatabase, event: str) -> list[str]:
    return [str(r[0]) for r in db.execute("SELECT id FROM realtime.messages WHERE event = %s", (event,))]


async def test_send_send_binary_and_broadcast_changes_reach_publish(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    db = messages_db
    got = Recorder()
    stream = make_stream(got)
    await stream.start()

    send(db, {"text": "hello"}, "public-ev", "room-1", private=False)
    send(db, {"text": "secret", "id": "mine"}, "private-ev", "room-1")
    db.execute("SELECT realtime.send_binary(%s, 'bin-ev', 'room-2')", (b"\x00\x01\xfe\xff",))
    db.execute(
        """
        CREATE TABLE public.notes (id int PRIMARY KEY, body text);
        CREATE FUNCTION public.notes_changed() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER AS $$
        BEGIN
          PERFORM realtime.broadcast_changes('notes:' || COALESCE(NEW.id, OLD.id)::text, TG_OP, TG_OP,
            TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD);
          RETURN NULL;
        END $$;
        CREATE TRIGGER notes_changed AFTER INSERT OR UPDATE OR DELETE ON public.notes
          FOR EACH ROW EXECUTE FUNCTION public.notes_changed();
        """
    )
    db.execute("INSERT INTO public.notes VALUES (7, 'first')")
    db.execute("UPDATE public.notes SET body = 'second' WHERE id = 7")
    db.execute("DELETE FROM public.notes WHERE id = 7")
    await wait_until(lambda: len(got.items) >= 6)
    assert got.events() == ["public-ev", "private-ev", "bin-ev", "INSERT", "UPDATE", "DELETE"]

    public, private, binary, insert, update, delete = got.items
    (public_id,) = row_ids(db, "public-ev")
    assert public == Published(False, "room-1", "public-ev", {"text": "hello", "id": public_id}, public_id)
    (private_id,) = row_ids(db, "private-ev")
    # realtime.send keeps a payload's own id; meta.id is the row's id.
    assert private == Published(True, "room-1", "private-ev", {"text": "secret", "id": "mine"}, private_id)
    (binary_id,) = row_ids(db, "bin-ev")
    assert binary == Published(True, "room-2", "bin-ev", b"\x00\x01\xfe\xff", binary_id)

    assert insert.private and insert.topic == "notes:7"
    assert {k: v for k, v in insert.payload.items() if k != "id"} == {
        "operation": "INSERT",
        "table": "notes",
        "schema": "public",
        "record": {"id": 7, "body": "first"},
        "old_record": None,
    }
    assert update.payload["record"] == {"id": 7, "body": "second"}
    assert update.payload["old_record"] == {"id": 7, "body": "first"}
    assert delete.payload["record"] is None and delete.payload["old_record"] == {"id": 7, "body": "second"}
    assert stream.counters.db_broadcasts == 6


async def test_rollback_delivers_nothing_and_commit_delivers_once(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    db = messages_db
    got = Recorder()
    stream = make_stream(got)
    await stream.start()

    conn = db.connect()
    try:
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("SELECT realtime.send('{\"n\": 1}', 'rolled-back', 'tx')")
            cur.execute("SELECT realtime.send('{\"n\": 2}', 'rolled-back', 'tx')")
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT realtime.send('{\"n\": 3}', 'committed', 'tx')")
            cur.execute("SELECT realtime.send('{\"n\": 4}', 'committed', 'tx')")
        conn.commit()
    finally:
        conn.close()
    send(db, {}, "marker", "tx")
    await wait_until(lambda: "marker" in got.events())
    assert got.events() == ["committed", "committed", "marker"]
    assert [i.payload["n"] for i in got.items[:2]] == [3, 4]
    assert not row_ids(db, "rolled-back")


async def test_rows_sent_while_stopped_are_delivered_once_after_a_restart(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    db = messages_db
    first = Recorder()
    stream = make_stream(first)
    await stream.start()
    send(db, {"n": 1}, "before", "r")
    await wait_until(lambda: first.events() == ["before"])
    await stream.stop()

    # Tidings is down: Supabase's temporary slot would lose these.
    for n in (2, 3):
        send(db, {"n": n}, "while-down", "r")

    second = Recorder()
    again = make_stream(second)
    await again.start()
    send(db, {"n": 4}, "after", "r")
    await wait_until(lambda: "after" in second.events())
    assert [(i.event, i.payload["n"]) for i in second.items] == [
        ("while-down", 2),
        ("while-down", 3),
        ("after", 4),
    ]
    assert first.events() == ["before"]


async def test_a_stop_before_the_broker_stored_repeats_the_rows(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    """Not confirmed until ``done``: rows whose hand-over never finished come again, same ids."""
    db = messages_db
    first = Recorder(hold=True)
    stream = make_stream(first)
    await stream.start()
    send(db, {"n": 1}, "unstored", "r")
    await wait_until(lambda: len(first.items) == 1)
    await stream.stop(drain_timeout=0.5)  # the broker never answered

    second = Recorder()
    again = make_stream(second)
    await again.start()
    await wait_until(lambda: len(second.items) == 1)
    assert second.items[0].msg_id == first.items[0].msg_id


async def test_a_failed_publish_is_streamed_again(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    db = messages_db
    got = Recorder(fail=1)
    stream = make_stream(got)
    await stream.start()
    send(db, {"n": 1}, "retried", "r")
    send(db, {"n": 2}, "next", "r")
    await wait_until(lambda: got.events() == ["retried", "next"])
    assert [i.event for i in got.failed] == ["retried"]
    (row_id,) = row_ids(db, "retried")
    assert got.failed[0].msg_id == got.items[0].msg_id == row_id


async def test_oversized_rows_and_long_names_are_dropped_and_counted(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    db = messages_db
    got = Recorder()
    stream = make_stream(got, max_payload_bytes=200, max_topic_bytes=20, max_event_bytes=10)
    await stream.start()

    send(db, {"big": "x" * 300}, "big", "r")
    db.execute("SELECT realtime.send_binary(%s, 'bigbin', 'r')", (b"\x01" * 201,))
    send(db, {"ok": True}, "fits", "t" * 21)  # topic over 20 bytes
    send(db, {"ok": True}, "e" * 11, "r")  # event over 10 bytes
    db.execute(
        "INSERT INTO realtime.messages (topic, extension, event, private) "
        "VALUES ('r', 'broadcast', 'nopay', true)"
    )
    db.execute("SELECT realtime.send_binary(%s, 'edge', 'r')", (b"\x02" * 200,))  # exactly the limit
    send(db, {}, "marker", "r")
    await wait_until(lambda: "marker" in got.events())
    assert got.events() == ["edge", "marker"]
    counters = stream.counters
    assert counters.db_broadcasts_too_large == 2
    assert counters.db_broadcasts_names_too_long == 2
    assert counters.db_broadcasts_malformed == 1
    assert counters.db_broadcasts == 2


async def test_binary_rows_keep_within_the_binary_frame_limits(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    """realtime:<topic> and the event of a kind-4 frame have 255 bytes each."""
    db = messages_db
    got = Recorder()
    stream = make_stream(got, max_topic_bytes=1000)
    await stream.start()
    db.execute("SELECT realtime.send_binary('\\x01', 'long', %s)", ("t" * 247,))  # 9 + 247 > 255
    db.execute("SELECT realtime.send_binary('\\x01', 'fits', %s)", ("t" * 246,))
    send(db, {}, "json-long-topic", "t" * 300)  # JSON rows only need MAX_TOPIC_LENGTH
    await wait_until(lambda: "json-long-topic" in got.events())
    assert got.events() == ["fits", "json-long-topic"]
    assert stream.counters.db_broadcasts_names_too_long == 1


async def test_the_rate_limit_delays_rows_and_loses_none(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    db = messages_db
    got = Recorder()
    stream = make_stream(got, rate=20)
    await stream.start()
    db.execute(
        "SELECT realtime.send(jsonb_build_object('n', n), 'burst', 'r', true) FROM generate_series(1, 50) n"
    )
    await wait_until(lambda: len(got.items) == 50)
    assert [i.payload["n"] for i in got.items] == list(range(1, 51))
    assert stream.counters.db_broadcasts_throttled >= 1


async def test_publication_is_created_kept_and_recreated_when_its_tables_differ(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    db = messages_db

    def tables() -> list[tuple[str, bool]]:
        return [
            (str(r[0]), bool(r[1]))
            for r in db.execute(
                "SELECT r.prrelid::regclass::text, p.pubviaroot FROM pg_publication p "
                "JOIN pg_publication_rel r ON r.prpubid = p.oid WHERE p.pubname = %s",
                (PUBLICATION,),
            )
        ]

    db.execute("CREATE TABLE public.other (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE public.other, realtime.messages")
    got = Recorder()
    stream = make_stream(got)
    await stream.check()
    assert tables() == [("realtime.messages", True)]
    ((oid,),) = db.execute("SELECT oid FROM pg_publication WHERE pubname = %s", (PUBLICATION,))
    await stream.check()  # as wanted now: kept
    assert db.execute("SELECT oid FROM pg_publication WHERE pubname = %s", (PUBLICATION,)) == [(oid,)]

    # Supabase Realtime's own (no publish_via_partition_root): kept, and its partition rows read.
    db.execute(
        f"DROP PUBLICATION {PUBLICATION}; CREATE PUBLICATION {PUBLICATION} FOR TABLE realtime.messages"
    )
    await stream.start()
    assert tables() == [("realtime.messages", False)]
    send(db, {"n": 1}, "via-partition", "r")
    await wait_until(lambda: got.events() == ["via-partition"])


async def test_a_publication_this_role_may_not_recreate_is_one_line(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    db = messages_db
    db.execute(
        "DO $$ BEGIN CREATE ROLE tidings_msg_repl LOGIN REPLICATION; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    db.execute(f'GRANT ALL ON DATABASE "{db.name}" TO tidings_msg_repl')
    db.execute("GRANT USAGE ON SCHEMA realtime TO tidings_msg_repl")
    db.execute("CREATE TABLE public.other (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE public.other")
    slot = f"tidings_msg_test_{next(_slots)}"
    stream = BroadcastFromDatabase(db.dsn_for("tidings_msg_repl"), Recorder(), slot=slot)
    try:
        with pytest.raises(BroadcastFromDatabaseError) as caught:
            await stream.check()
    finally:
        await stream.stop()
    message = str(caught.value)
    assert "\n" not in message
    assert f"cannot recreate publication {PUBLICATION}" in message
    assert "FOR TABLE realtime.messages" in message
    # The failed DROP/CREATE transaction does not leave the connection unusable.
    conn = db.server.connect(db.name, "tidings_msg_repl")
    try:
        with pytest.raises(BroadcastFromDatabaseError):
            ensure_messages_publication(conn)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == [(1,)]
    finally:
        conn.close()


async def test_drop_slot_drops_a_slot_this_start_created(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    stream = make_stream(Recorder())
    await stream.check()
    assert stream.created_slot
    await stream.drop_slot()
    assert not stream.created_slot
    assert not messages_db.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (stream.slot,))


async def test_ready_and_wait_ready(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    stream = make_stream(Recorder())
    assert not stream.ready
    assert await stream.wait_ready(0.05) is False
    waiting = asyncio.ensure_future(stream.wait_ready(30))
    await stream.start()
    assert await waiting is True
    assert stream.ready
    assert await stream.wait_ready(0) is True  # at once when live
    await stream.stop()
    assert not stream.ready


async def test_an_idle_stream_lets_the_slot_follow_other_writes(
    messages_db: SupabaseDatabase, make_stream: Callable[..., BroadcastFromDatabase]
) -> None:
    """The slot publishes one table; other writes must not pile up WAL behind it."""
    db = messages_db
    got = Recorder()
    stream = make_stream(got)
    await stream.start()
    send(db, {}, "one", "r")
    await wait_until(lambda: got.events() == ["one"])
    db.execute("CREATE TABLE public.busy (id int)")
    db.execute("INSERT INTO public.busy SELECT generate_series(1, 1000)")
    ((written,),) = db.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")

    def confirmed() -> int:
        rows = db.execute(
            "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
            (stream.slot,),
        )
        return int(rows[0][0])

    await wait_until(lambda: confirmed() >= int(written), timeout=60)
    assert got.events() == ["one"]


async def test_start_broadcast_from_database_prepares_an_empty_realtime_schema(
    postgres: PostgresServer,
) -> None:
    db = create_supabase_database(postgres)
    slot = f"tidings_msg_test_{next(_slots)}"
    config = Config(database_url=db.dsn, db_messages_slot=slot, db_resume_grace=0)
    got = Recorder()
    stream = await start_broadcast_from_database(config, got)
    try:
        assert stream.created_slot
        assert await stream.wait_ready(30)
        send(db, {"n": 1}, "first", "r")
        await wait_until(lambda: got.events() == ["first"])
    finally:
        await stream.stop()
        drop_slots(postgres, db.name)


def test_decoder_ignores_updates_and_unknown_relations_raise() -> None:
    decoder = MessageDecoder(100)
    assert not decoder.in_transaction
    with pytest.raises(ValueError):
        # An Insert ('I') for relation 42 before any Relation message.
        decoder.feed(b"I" + (42).to_bytes(4, "big") + b"N" + (0).to_bytes(2, "big"))
