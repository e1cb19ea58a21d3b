"""Replay from the database (private channels) against a PostgreSQL prepared like Supabase's image:
which rows, how many, in what order, in any database time zone, and the params' validation."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.support.postgres import PostgresServer
from tests.support.supabase_db import SupabaseDatabase, create_supabase_database
from tidings.db.migrations import prepare
from tidings.db.replay import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    DatabaseReplay,
    ReplayedMessage,
    ReplayError,
    ReplayParamsError,
    read_replay,
    replay_params,
)
from tidings.protocol import errors
from tidings.protocol.join import Replay, parse_join

pytestmark = pytest.mark.postgres


def now_ms() -> int:
    return int(time.time() * 1000)


def insert(
    db: SupabaseDatabase,
    event: str,
    *,
    topic: str = "room",
    private: bool = True,
    extension: str = "broadcast",
    age: str = "0 seconds",
    payload: Any = None,
    binary: bytes | None = None,
) -> None:
    """A row as Tidings' role writes it, stamped ``now() - age`` in the database's zone."""
    db.execute(
        "INSERT INTO realtime.messages (topic, extension, event, payload, binary_payload, private, "
        "inserted_at) VALUES (%s, %s, %s, %s::jsonb, %s, %s, now() - %s::interval)",
        (
            topic,
            extension,
            event,
            None if binary is not None else json.dumps(payload if payload is not None else {"e": event}),
            binary,
            private,
            age,
        ),
    )


def replay(db: SupabaseDatabase, topic: str, since: int, limit: int = DEFAULT_LIMIT) -> list[ReplayedMessage]:
    conn = db.connect()
    try:
        return read_replay(conn, topic, since, limit)
    finally:
        conn.close()


def events(messages: list[ReplayedMessage]) -> list[str]:
    return [m.event for m in messages]


@pytest.fixture
def migrated_db(postgres: PostgresServer) -> SupabaseDatabase:
    db = create_supabase_database(postgres)
    conn = db.connect()
    try:
        prepare(conn)
    finally:
        conn.close()
    return db


def test_only_private_broadcasts_of_the_topic_since_the_time_newest_limit_oldest_first(
    migrated_db: SupabaseDatabase,
) -> None:
    db = migrated_db
    insert(db, "too-old", age="10 minutes")
    for i in range(5):
        insert(db, f"m{i}", age=f"{5 - i} minutes")
    insert(db, "public", private=False, age="1 minute")
    insert(db, "presence", extension="presence", age="1 minute")
    insert(db, "other-topic", topic="room-2", age="1 minute")
    insert(db, "prefix-topic", topic="roo", age="1 minute")
    insert(db, "future", age="-2 minutes")  # beyond now() + 1 minute
    insert(db, "soon", age="-30 seconds")  # within it

    since = now_ms() - 7 * 60_000
    assert events(replay(db, "room", since)) == ["m0", "m1", "m2", "m3", "m4", "soon"]
    assert events(replay(db, "room", since, limit=2)) == ["m4", "soon"]  # the newest, oldest first
    got = replay(db, "room", since, limit=1)
    assert got[0].payload == {"e": "soon"} and not got[0].binary
    (row_id,) = db.execute("SELECT id::text FROM realtime.messages WHERE event = 'soon'")[0]
    assert got[0].id == row_id


def test_since_is_inclusive_and_compared_in_the_database_zone(postgres: PostgresServer) -> None:
    for zone in ("Asia/Tokyo", "America/Los_Angeles", "UTC"):
        db = create_supabase_database(postgres)
        db.execute(f"ALTER DATABASE \"{db.name}\" SET timezone = '{zone}'")
        conn = db.connect()
        try:
            prepare(conn)
        finally:
            conn.close()
        before = now_ms() - 2_000
        db.execute("SELECT realtime.send('{\"n\": 1}', 'sent', 'zone-room')")
        ((stamp_ms,),) = db.execute(
            "SELECT floor(extract(epoch FROM inserted_at::timestamptz) * 1000)::bigint "
            "FROM realtime.messages WHERE event = 'sent'"
        )
        assert events(replay(db, "zone-room", before)) == ["sent"], zone
        assert events(replay(db, "zone-room", int(stamp_ms))) == ["sent"], zone  # >= since
        assert replay(db, "zone-room", int(stamp_ms) + 1) == [], zone
        assert replay(db, "zone-room", now_ms() + 60_000) == [], zone


def test_limit_is_clamped_to_1_through_25(migrated_db: SupabaseDatabase) -> None:
    db = migrated_db
    db.execute(
        "INSERT INTO realtime.messages (topic, extension, event, payload, private, inserted_at) "
        "SELECT 'many', 'broadcast', 'n' || n, jsonb_build_object('n', n), true, "
        "now() - (40 - n) * interval '1 second' FROM generate_series(1, 30) n"
    )
    since = now_ms() - 3_600_000
    assert events(replay(db, "many", since, 100)) == [f"n{n}" for n in range(6, 31)]
    assert len(replay(db, "many", since, MAX_LIMIT)) == 25
    assert events(replay(db, "many", since, 0)) == ["n30"]
    assert events(replay(db, "many", since, -5)) == ["n30"]


def test_rows_of_one_transaction_come_in_the_order_they_were_written(migrated_db: SupabaseDatabase) -> None:
    db = migrated_db
    db.execute(
        "SELECT realtime.send(jsonb_build_object('n', n), 'tx' || n, 'tx-room') FROM generate_series(1, 5) n"
    )
    assert events(replay(db, "tx-room", now_ms() - 60_000)) == ["tx1", "tx2", "tx3", "tx4", "tx5"]


def test_binary_rows_come_back_as_bytes(migrated_db: SupabaseDatabase) -> None:
    db = migrated_db
    db.execute("SELECT realtime.send_binary(%s, 'bin', 'bin-room')", (b"\x00\xff\x10",))
    db.execute("SELECT realtime.send('{\"a\": 1}', 'json', 'bin-room')")
    binary, text = replay(db, "bin-room", now_ms() - 60_000)
    assert binary.binary and binary.payload == b"\x00\xff\x10" and binary.event == "bin"
    assert not text.binary and text.payload["a"] == 1


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        "since",
        {},
        {"limit": 5},
        {"since": "not a number"},
        {"since": True},
        {"since": 1.5},
        {"since": 10**20},
        {"since": now_ms(), "limit": "not a number"},
        {"since": now_ms(), "limit": 2.5},
    ],
)
def test_bad_params_are_the_join_error(raw: Any) -> None:
    with pytest.raises(ReplayParamsError) as caught:
        replay_params(raw)
    assert caught.value.reason == errors.REPLAY_PARAMS_INVALID == str(caught.value)
    assert errors.REPLAY_PARAMS_INVALID == "UnableToReplayMessages: Replay params are not valid"


def test_params_default_and_clamp_limit() -> None:
    since = now_ms()
    assert replay_params({"since": since}) == (since, 25)
    assert replay_params({"since": since, "limit": None}) == (since, 25)
    assert replay_params({"since": since, "limit": 3}) == (since, 3)
    assert replay_params({"since": float(since), "limit": 1000}) == (since, 25)
    assert replay_params({"since": since, "limit": 0}) == (since, 1)
    assert replay_params(Replay(since=since, since_seq=None, limit=7)) == (since, 7)


def test_a_join_with_a_bad_since_is_refused_with_the_reason() -> None:
    from tidings.protocol.join import JoinError

    payload = {"config": {"private": True, "broadcast": {"replay": {"since": "yesterday", "limit": 2}}}}
    with pytest.raises(JoinError) as caught:
        parse_join("realtime:room", payload)
    assert caught.value.reason == errors.REPLAY_PARAMS_INVALID


async def test_database_replay_runs_in_a_pool_and_reports_failures(
    migrated_db: SupabaseDatabase, postgres: PostgresServer
) -> None:
    db = migrated_db
    insert(db, "pooled", age="1 second")
    reader = DatabaseReplay(db.dsn)
    try:
        got = await reader.replay("room", now_ms() - 60_000, 5)
        assert events(got) == ["pooled"]
    finally:
        await reader.close()

    unreachable = DatabaseReplay(f"postgresql://postgres@127.0.0.1:{postgres.port}/no_such_database")
    try:
        with pytest.raises(ReplayError) as caught:
            await unreachable.replay("room", now_ms())
        assert caught.value.reason == errors.REPLAY_FAILED
        assert "\n" not in str(caught.value)
    finally:
        await unreachable.close()
