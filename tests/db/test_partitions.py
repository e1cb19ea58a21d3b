"""Daily partitions of realtime.messages: the pure helpers, then maintenance on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from tests.support.supabase_db import SupabaseDatabase
from tidings.db.partitions import (
    PartitionMaintenance,
    create_partition_sql,
    drop_partition_sql,
    existing_partitions,
    expired_partitions,
    maintain_partitions,
    partition_day,
    partition_name,
    wanted_days,
)

days = st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 12, 31))


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def test_names_are_supabases() -> None:
    assert partition_name(date(2025, 1, 31)) == "messages_2025_01_31"
    assert partition_day("messages_2025_01_31") == date(2025, 1, 31)


@given(days)
def test_name_and_day_round_trip(day: date) -> None:
    assert partition_day(partition_name(day)) == day


@pytest.mark.parametrize(
    "name",
    ["messages", "messages_default", "messages_2025_13_01", "messages_2025_02_30", "messages_2025_1_01",
     "xmessages_2025_01_01", "messages_2025_01_01_old", "messages_2025_01_01; DROP TABLE x"],
)  # fmt: skip
def test_other_names_are_not_daily_partitions(name: str) -> None:
    assert partition_day(name) is None
    with pytest.raises(ValueError):
        drop_partition_sql(name)


def test_wanted_days_are_yesterday_to_three_days_ahead_across_a_year_end() -> None:
    assert wanted_days(date(2025, 1, 1)) == [
        date(2024, 12, 31),
        date(2025, 1, 1),
        date(2025, 1, 2),
        date(2025, 1, 3),
        date(2025, 1, 4),
    ]


def test_sql_covers_one_day() -> None:
    assert create_partition_sql(date(2024, 2, 28)) == (
        "CREATE TABLE IF NOT EXISTS realtime.messages_2024_02_28 PARTITION OF realtime.messages "
        "FOR VALUES FROM ('2024-02-28') TO ('2024-02-29')"
    )
    assert "TO ('2024-03-01')" in create_partition_sql(date(2024, 2, 29))
    assert drop_partition_sql("messages_2024_02_28") == "DROP TABLE IF EXISTS realtime.messages_2024_02_28"


def test_partitions_older_than_72_hours_are_expired() -> None:
    now = datetime(2025, 1, 10, 12, 0)
    names = [partition_name(date(2025, 1, d)) for d in range(1, 15)] + ["messages_archive"]
    # 72 h before 2025-01-10 12:00 is 2025-01-07 12:00: days before the 7th go, as in Supabase.
    assert expired_partitions(names, now) == [partition_name(date(2025, 1, d)) for d in range(1, 7)]


def test_expiry_is_judged_in_utc() -> None:
    names = [partition_name(date(2025, 1, 6))]
    # 2025-01-10 01:00 at UTC+3 is 2025-01-09 22:00 UTC: the limit is the 6th, which stays.
    assert expired_partitions(names, datetime(2025, 1, 10, 1, 0, tzinfo=timezone(timedelta(hours=3)))) == []
    assert expired_partitions(names, datetime(2025, 1, 10, 1, 0, tzinfo=UTC)) == names


@given(days, st.integers(min_value=0, max_value=86_399))
def test_a_wanted_partition_is_never_expired(today: date, second: int) -> None:
    now = datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(seconds=second)
    wanted = [partition_name(d) for d in wanted_days(today)]
    assert expired_partitions(wanted, now) == []


# --------------------------------------------------------------------------------------------
# On PostgreSQL
# --------------------------------------------------------------------------------------------

pg = pytest.mark.postgres


def db_today(db: SupabaseDatabase) -> date:
    ((now,),) = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date")
    return now  # type: ignore[no-any-return]


def bounds(db: SupabaseDatabase, name: str) -> str:
    ((expr,),) = db.execute(
        "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = 'realtime' AND c.relname = %s",
        (name,),
    )
    return str(expr)


@pg
def test_migration_creates_the_partitions_from_yesterday_to_three_days_ahead(
    migrated: SupabaseDatabase,
) -> None:
    today = db_today(migrated)
    conn = migrated.connect()
    try:
        names = existing_partitions(conn)
    finally:
        conn.close()
    assert names == [partition_name(d) for d in wanted_days(today)]
    tomorrow = today + timedelta(days=1)
    assert bounds(migrated, partition_name(tomorrow)) == (
        f"FOR VALUES FROM ('{tomorrow} 00:00:00') TO ('{tomorrow + timedelta(days=1)} 00:00:00')"
    )


@pg
def test_old_partitions_are_dropped_and_others_left_alone(migrated: SupabaseDatabase) -> None:
    conn = migrated.connect()
    try:
        report = maintain_partitions(conn, now=datetime(2020, 3, 1, 9, 30))
        assert report.created == tuple(partition_name(d) for d in wanted_days(date(2020, 3, 1)))
        assert "messages_2020_02_29" in report.created  # a leap day
        migrated.execute(
            "CREATE TABLE realtime.messages_archive PARTITION OF realtime.messages "
            "FOR VALUES FROM ('2000-01-01') TO ('2000-02-01')"
        )
        migrated.execute(
            "INSERT INTO realtime.messages (topic, extension, inserted_at) "
            "VALUES ('old', 'broadcast', '2020-03-02')"
        )
        report = maintain_partitions(conn)  # the database's clock: years later
        today = db_today(migrated)
        assert report.created == ()
        assert report.dropped == tuple(partition_name(d) for d in wanted_days(date(2020, 3, 1)))
        assert existing_partitions(conn) == sorted(
            ["messages_archive", *(partition_name(d) for d in wanted_days(today))]
        )
        assert migrated.execute("SELECT count(*) FROM realtime.messages WHERE topic = 'old'") == [(0,)]
        assert maintain_partitions(conn) == type(report)()  # nothing left to do
    finally:
        conn.close()


@pg
def test_rows_of_send_land_in_todays_partition(migrated: SupabaseDatabase) -> None:
    migrated.execute("SELECT realtime.send('{}'::jsonb, 'e', 'room-1')")
    ((partition, inserted),) = migrated.execute(
        "SELECT tableoid::regclass::text, inserted_at FROM realtime.messages"
    )
    assert partition == f"realtime.{partition_name(inserted.date())}"


@pg
def test_two_nodes_maintaining_at_once_create_each_partition_once(supabase_db: SupabaseDatabase) -> None:
    conn = supabase_db.connect()
    try:
        from tidings.db.migrations import migrate

        migrate(conn)  # the table, without partitions
    finally:
        conn.close()
    barrier = threading.Barrier(2)
    reports = []
    errors: list[BaseException] = []

    def node() -> None:
        c = supabase_db.connect()
        try:
            barrier.wait(timeout=30)
            reports.append(maintain_partitions(c))
        except BaseException as exc:
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=node) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    created = [name for r in reports for name in r.created]
    assert sorted(created) == [partition_name(d) for d in wanted_days(db_today(supabase_db))]


@pg
def test_a_day_covered_by_another_partition_is_reported_and_the_rest_created(
    supabase_db: SupabaseDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    from tidings.db.migrations import migrate

    conn = supabase_db.connect()
    try:
        migrate(conn)
        today = db_today(supabase_db)
        tomorrow = today + timedelta(days=1)
        supabase_db.execute(
            "CREATE TABLE realtime.messages_custom PARTITION OF realtime.messages "
            f"FOR VALUES FROM ('{tomorrow}') TO ('{tomorrow + timedelta(days=1)}')"
        )
        with caplog.at_level(logging.WARNING, "tidings.db"):
            report = maintain_partitions(conn)
    finally:
        conn.close()
    assert report.failed == (partition_name(tomorrow),)
    assert set(report.created) == {partition_name(d) for d in wanted_days(today)} - {partition_name(tomorrow)}
    assert any(
        partition_name(tomorrow) in r.getMessage() and "overlap" in r.getMessage() for r in caplog.records
    )


@pg
async def test_the_maintenance_task_runs_at_start(supabase_db: SupabaseDatabase) -> None:
    from tidings.db.migrations import migrate

    conn = supabase_db.connect()
    try:
        migrate(conn)
    finally:
        conn.close()
    job = PartitionMaintenance(supabase_db.dsn, interval=3600)
    job.start()
    try:
        for _ in range(600):
            if job.runs:
                break
            await asyncio.sleep(0.05)
    finally:
        await job.stop()
    assert job.runs == 1 and job.last_error is None
    assert job.last_report is not None and len(job.last_report.created) == 5
    assert (await job.run_once()).created == ()


@pg
async def test_a_failed_run_is_recorded(supabase_db: SupabaseDatabase) -> None:
    job = PartitionMaintenance(supabase_db.dsn)  # no realtime.messages yet
    with pytest.raises(Exception, match="messages"):
        await job.run_once()
    assert job.runs == 1 and job.last_error is not None and "messages" in job.last_error
