"""Stream framing against a live server: parse its w/k frames, and our r message moves the slot."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.cdc.conftest import Database, unique_slot, wait_until
from tests.cdc.rawrepl import RawReplication
from tidings.cdc.pgoutput import (
    Commit,
    Insert,
    PrimaryKeepalive,
    XLogData,
    decode,
    parse_copy_data,
    pg_time,
    standby_status_update,
)

pytestmark = pytest.mark.postgres


async def test_frames_from_a_live_stream_and_status_update(db: Database) -> None:
    slot = unique_slot()
    db.execute("CREATE TABLE t (id int4 PRIMARY KEY)")
    db.execute("CREATE PUBLICATION p FOR TABLE t")
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    raw = RawReplication("127.0.0.1", db.server.port, "postgres", db.name)
    try:
        raw.start_replication(slot, "p")
        db.execute("INSERT INTO t VALUES (42)")
        messages = []
        while not any(isinstance(m, Commit) for m in messages):
            frame = parse_copy_data(raw.read_copy_data())
            if isinstance(frame, XLogData):
                messages.append(decode(frame.payload))
            else:
                assert isinstance(frame, PrimaryKeepalive)
        (insert,) = [m for m in messages if isinstance(m, Insert)]
        assert insert.new == ("42",)
        commit = messages[-1]
        assert isinstance(commit, Commit)
        assert db.confirmed_lsn(slot) < commit.end_lsn

        now = pg_time(datetime.now(UTC))
        end = commit.end_lsn
        raw.send_copy_data(standby_status_update(end, end, end, now, reply_requested=True))
        await wait_until(lambda: db.confirmed_lsn(slot) >= end)
        assert db.confirmed_lsn(slot) == end
        # The server answers a reply request with a keepalive; the stream is still healthy.
        while not isinstance(parse_copy_data(raw.read_copy_data()), PrimaryKeepalive):
            pass
    finally:
        raw.close()
