"""The replication reader on its own: batching, backpressure, confirmation; and DSN handling."""

from __future__ import annotations

import asyncio

import psycopg2.extensions
import pytest

from tests.cdc.conftest import Database, unique_slot, wait_until
from tidings.cdc import catalog
from tidings.cdc.changes import Change, TransactionEnd
from tidings.cdc.replication import SESSION_OPTIONS, Batch, ReplicationStream


def test_connection_dsn() -> None:
    params = psycopg2.extensions.parse_dsn(
        catalog.connection_dsn(
            "postgresql://u:secret@db:6543/app?options=-c%20a%3D1", ssl=True, options="-c b=2"
        )
    )
    assert params["sslmode"] == "require"
    assert params["options"] == "-c a=1 -c b=2"
    assert params["keepalives"] == "1" and params["application_name"] == "tidings"
    kept = psycopg2.extensions.parse_dsn(
        catalog.connection_dsn("postgresql://db/app?sslmode=disable", ssl=True)
    )
    assert kept["sslmode"] == "disable"  # the URL's choice wins
    assert "sslmode" not in psycopg2.extensions.parse_dsn(catalog.connection_dsn("postgresql://db/app"))
    assert catalog.describe_dsn("postgresql://u:secret@db:6543/app") == "db:6543/app"
    assert "secret" not in catalog.describe_dsn("postgresql://u:secret@db:6543/app")


@pytest.mark.postgres
async def test_backpressure_bounds_what_waits_on_the_loop(db: Database) -> None:
    slot = unique_slot()
    db.execute("CREATE TABLE t (id int4 PRIMARY KEY)")
    db.execute("CREATE PUBLICATION p FOR TABLE t")
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    held: list[Batch] = []
    stream = ReplicationStream(
        catalog.connection_dsn(db.dsn, options=SESSION_OPTIONS),
        slot=slot,
        publication="p",
        loop=asyncio.get_running_loop(),
        on_batch=held.append,  # never calls batch_done until the test does
        max_inflight=2,
        max_batch=10,
    )
    stream.start()
    try:
        await asyncio.to_thread(stream.wait_connected, 30)
        db.execute("INSERT INTO t SELECT generate_series(1, 500)")  # one transaction, 500 changes
        await wait_until(lambda: len(held) == 2)
        await asyncio.sleep(0.5)  # room to overrun, were reading not paused
        assert len(held) == 2 and stream.inflight == 2
        assert all(len(b) <= 10 for b in held)

        items: list[Change | TransactionEnd] = []

        def drained() -> bool:
            while held:
                items.extend(held.pop(0))
                stream.batch_done()
            return any(isinstance(i, TransactionEnd) for i in items)

        await wait_until(drained)
        changes = [i for i in items if isinstance(i, Change)]
        assert [c.data["record"]["id"] for c in changes] == list(range(1, 501))
        assert len({c.id for c in changes}) == 500
        (end,) = [i for i in items if isinstance(i, TransactionEnd)]
        assert end.changes == 500 and stream.inflight == 0

        assert db.confirmed_lsn(slot) < end.end_lsn
        stream.confirm(end.end_lsn)
        await wait_until(lambda: db.confirmed_lsn(slot) >= end.end_lsn)
        assert stream.confirmed_lsn == end.end_lsn
    finally:
        await asyncio.to_thread(stream.stop)
