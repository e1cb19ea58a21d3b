"""The change log (pure parts): positions, bounds, trim marks, value indexes, a cluster node's mirror."""

from __future__ import annotations

from typing import Any

import pytest

from tidings.cdc.changelog import Candidates, MemoryChangeLog, covered_after, position_before
from tidings.cdc.changes import Change
from tidings.protocol.filters import bind_filter, parse_filter
from tidings.protocol.positions import (
    ChangesResume,
    PositionError,
    format_position,
    parse_position,
    position_of,
)

TABLE = ("public", "orders")
TYPES = {"id": "int8", "status": "text"}


def change(lsn: int, index: int, row: dict[str, Any], kind: str = "UPDATE", table: str = "orders") -> Change:
    data = {"schema": "public", "table": table, "type": kind, "position": format_position(lsn, index)}
    data["old_record" if kind == "DELETE" else "record"] = row
    return Change(f"{lsn:X}:{index}", lsn, index, "public", table, kind, data, row, TYPES, ("id",))


def positions(read: Any) -> list[str]:
    return [c.position for c in read.changes]


def test_positions_compare_as_strings_in_stream_order() -> None:
    pairs = [(0, 0), (1, 0), (1, 1), (0xFF, 3), (0x16B3A2F8, 0), (0x16B3A2F8, 0x10), (2**63, 7)]
    texts = [format_position(*p) for p in pairs]
    assert texts == sorted(texts) and texts[4] == "0000000016B3A2F8/00000000"
    assert [position_of(t) for t in texts] == pairs
    assert parse_position("0000000016b3a2f8/0000000a") == "0000000016B3A2F8/0000000A"
    for bad in ("16B3A2F8/3", "0000000016B3A2F8-00000003", "", None, 7, "0000000016B3A2F8/0000000G"):
        with pytest.raises(PositionError):
            parse_position(bad)
    assert position_before(format_position(5, 0)) == covered_after(5) == format_position(4, 0xFFFFFFFF)
    assert position_before(format_position(5, 2)) == format_position(5, 1)


def test_resume_options_parse() -> None:
    assert ChangesResume.parse(True) == ChangesResume()
    assert ChangesResume.parse({}) == ChangesResume()
    since = format_position(9, 1)
    assert ChangesResume.parse({"since": since.lower(), "epoch": "e1"}) == ChangesResume(since, "e1")
    for bad in ("yes", 1, [], {"since": "x"}, {"epoch": 3}, {"epoch": ""}, {"epoch": "e" * 65}):
        with pytest.raises(PositionError):
            ChangesResume.parse(bad)


def test_a_log_covers_what_follows_its_start_and_continues_a_stream_that_resumes_inside() -> None:
    log = MemoryChangeLog(100, 1 << 20, 600)
    assert log.state_now().epoch is None
    log.append(change(10, 0, {"id": 1}))  # before any stream: nothing vouches for it
    assert len(log) == 0
    log.begin(100)
    first = log.state_now()
    assert first.after == covered_after(100) and first.head == "" and first.baseline == covered_after(100)
    log.append(change(120, 0, {"id": 1}))
    log.append(change(120, 1, {"id": 2}))
    log.transaction_end(130)
    log.append(change(120, 1, {"id": 2}))  # a stream repeating what it sent: ignored
    assert len(log) == 2 and log.state_now().head == format_position(120, 1)
    log.begin(130)  # a reconnect at the confirmed position: the same stretch
    assert log.state_now().epoch == first.epoch
    log.begin(500)  # beyond what was logged (a slot recreated): a new epoch
    assert log.state_now().epoch != first.epoch and len(log) == 0


def test_trims_by_count_bytes_and_age_leave_a_mark_that_makes_reads_incomplete() -> None:
    log = MemoryChangeLog(3, 1 << 20, 600)
    log.begin(1)
    for i in range(5):
        log.append(change(10 + i, 0, {"id": i}), now=1000.0)
    read = log.read_now(TABLE, covered_after(1), 100, None, now=1000.0)
    assert positions(read) == [format_position(12 + i, 0) for i in range(3)] and not read.complete
    read = log.read_now(TABLE, format_position(11, 0), 100, None, now=1000.0)
    assert read.complete and len(read.changes) == 3  # nothing after 11 was trimmed
    assert log.read_now(TABLE, format_position(12, 0), 1, None, now=1000.0).complete is False  # limit
    aged = log.read_now(TABLE, format_position(11, 0), 100, None, now=1000.0 + 601)
    assert aged.changes == [] and not aged.complete and len(log) == 0
    by_bytes = MemoryChangeLog(100, 900, 600)
    by_bytes.begin(1)
    for i in range(5):
        by_bytes.append(change(10 + i, 0, {"id": i, "pad": "x" * 300}))
    assert 1 <= len(by_bytes) < 5 and by_bytes.bytes <= 900
    assert by_bytes.read_now(("public", "other"), covered_after(1), 100, None).complete  # never written


def test_value_indexes_find_what_a_scan_finds() -> None:
    """A read through the index of an eq/in filter returns exactly the changes a full scan returns
    that the filter can match: rows with the value, and rows without the column (a key-only DELETE)."""
    log = MemoryChangeLog(50, 1 << 20, 600)
    log.begin(1)
    rows = [{"id": i % 7, "status": "s"} for i in range(120)]
    for n, row in enumerate(rows):
        kind = "DELETE" if n % 11 == 0 else "UPDATE"
        log.append(change(10 + n, 0, {"status": "s"} if kind == "DELETE" else row, kind))
    bound = bind_filter(parse_filter("id=in.(3,5)"), TYPES, "UTC")
    assert bound.index_column == "id" and bound.index_keys is not None and bound.index_key is not None
    candidates = [Candidates(bound.index_column, bound.index_keys, bound.index_key)]
    for since in (covered_after(1), format_position(80, 0), format_position(125, 0)):
        indexed = log.read_now(TABLE, since, 1000, candidates)
        scanned = log.read_now(TABLE, since, 1000, None)
        want = [c for c in scanned.changes if bound.matches(c.row)]
        assert [c for c in indexed.changes if bound.matches(c.row)] == want
        assert all(bound.matches(c.row) or "id" not in c.row for c in indexed.changes)
        assert indexed.complete == scanned.complete
    for n in range(120, 200):  # trimming keeps the indexes in step
        log.append(change(10 + n, 0, {"id": n % 7, "status": "s"}))
    indexed = log.read_now(TABLE, format_position(150, 0), 1000, candidates)
    assert [c.position for c in indexed.changes] == [
        format_position(10 + n, 0)
        for n in range(150, 200)
        if n % 7 in (3, 5)  # the 50 kept
    ]
    assert not indexed.complete  # n = 141..149 were trimmed: after the position asked from
    indexed = log.read_now(TABLE, format_position(170, 0), 1000, candidates)
    assert indexed.complete and all(c.commit_lsn > 170 for c in indexed.changes)


def test_a_mirror_starts_over_at_a_hole() -> None:
    mirror = MemoryChangeLog(100, 1 << 20, 600)
    a, b, c = change(10, 0, {"id": 1}), change(11, 0, {"id": 1}), change(30, 0, {"id": 1})
    mirror.follow(a, covered_after(5))
    assert mirror.state_now().after == covered_after(5)
    mirror.follow(b, a.position)  # follows what it has: continuous
    epoch = mirror.state_now().epoch
    mirror.follow(b, a.position)  # a repeat: ignored
    assert len(mirror) == 2
    lost = change(20, 0, {"id": 1})
    mirror.follow(c, lost.position)  # follows a change it never got: starts over after that one
    state = mirror.state_now()
    assert state.epoch != epoch and len(mirror) == 1 and state.after == lost.position
    mirror.follow(change(40, 0, {"id": 1}), None)  # no predecessor known: covers from just before it
    assert mirror.state_now().after == covered_after(40)
