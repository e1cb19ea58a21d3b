"""pgoutput v1 decoding and stream framing, on bytes captured from PostgreSQL (fixtures/) and by hand."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tidings.cdc.pgoutput import (
    UNCHANGED,
    Begin,
    Binary,
    Commit,
    DecodeError,
    Delete,
    Insert,
    Message,
    Origin,
    PrimaryKeepalive,
    Relation,
    Truncate,
    Type,
    Update,
    XLogData,
    decode,
    format_lsn,
    parse_copy_data,
    parse_lsn,
    pg_time,
    pg_timestamp,
    standby_status_update,
)

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "pgoutput_v1.json").read_text())
CASES = {case["name"]: [decode(bytes.fromhex(m)) for m in case["messages"]] for case in FIXTURES["cases"]}
ITEMS_COLUMNS = [
    ("id", 20, True),
    ("title", 25, False),
    ("n", 23, False),
    ("tags", 1009, False),
    ("body", 25, False),
    ("mood", None, False),
    ("price", 1700, False),
    ("flag", 16, False),
    ("at", 1184, False),
]


def kinds(messages: list[Any]) -> list[str]:
    return [type(m).__name__ for m in messages]


def only(messages: list[Any], cls: type) -> Any:
    (found,) = [m for m in messages if isinstance(m, cls)]
    return found


def test_fixture_comes_from_a_real_server() -> None:
    assert FIXTURES["server_version"].startswith("15.")
    assert FIXTURES["options"]["proto_version"] == "1"


def test_insert_with_type_and_relation() -> None:
    msgs = CASES["insert"]
    assert kinds(msgs) == ["Begin", "Type", "Relation", "Insert", "Commit"]
    begin, typ, rel, ins, commit = msgs
    assert isinstance(begin, Begin) and isinstance(commit, Commit)
    assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
    assert begin.commit_time == commit.commit_time
    assert begin.xid > 0
    assert isinstance(typ, Type) and (typ.namespace, typ.name) == ("public", "mood")
    assert isinstance(rel, Relation)
    assert (rel.namespace, rel.name, rel.replica_identity) == ("public", "items", "d")
    assert [(c.name, c.is_key) for c in rel.columns] == [(n, k) for n, _, k in ITEMS_COLUMNS]
    assert [c.type_oid for c in rel.columns if c.name != "mood"] == [
        o for n, o, _ in ITEMS_COLUMNS if n != "mood"
    ]
    assert only(msgs, Relation).columns[5].type_oid == typ.type_oid
    assert all(c.type_modifier == -1 for c in rel.columns)
    assert isinstance(ins, Insert) and ins.relation_id == rel.relation_id
    # The SQL session that captured this ran with TimeZone=Europe/Paris.
    assert ins.new == (
        "1",
        "hello",
        None,
        '{a,"b c",NULL}',
        None,
        "happy",
        "1.50",
        "t",
        "2026-08-21 14:00:00.123+02",
    )


def test_commit_timestamp_is_a_recent_utc_time() -> None:
    begin = CASES["insert"][0]
    assert isinstance(begin, Begin)
    moment = pg_timestamp(begin.commit_time)
    assert moment.tzinfo is UTC
    assert datetime(2024, 1, 1, tzinfo=UTC) < moment < datetime(2100, 1, 1, tzinfo=UTC)


def test_two_inserts_share_one_transaction() -> None:
    msgs = CASES["insert_two_in_one_transaction"]
    assert kinds(msgs) == ["Begin", "Type", "Relation", "Insert", "Insert", "Commit"]
    assert [m.new[:2] for m in msgs if isinstance(m, Insert)] == [("2", "two"), ("3", "three")]


def test_update_without_old_tuple_when_the_key_is_unchanged() -> None:
    upd = only(CASES["update_default_identity"], Update)
    assert upd.old_kind is None and upd.old is None
    assert upd.new[:2] == ("1", "bye")


def test_update_with_key_tuple_when_the_key_changes() -> None:
    upd = only(CASES["update_key_change"], Update)
    assert upd.old_kind == "K"
    assert upd.old == ("1",) + (None,) * 8  # every column, non-key ones NULL
    assert upd.new[:2] == ("10", "bye")


def test_unchanged_toast_value() -> None:
    big = only(CASES["toast_insert"], Insert)
    assert big.new[4] == "x" * 10000
    upd = only(CASES["toast_unchanged_update"], Update)
    assert upd.new[:2] == ("4", "still big")
    assert upd.new[4] is UNCHANGED
    assert repr(UNCHANGED) == "UNCHANGED"


def test_replica_identity_full() -> None:
    rel = only(CASES["full_insert"], Relation)
    assert rel.replica_identity == "f"
    assert all(c.is_key for c in rel.columns)
    upd = only(CASES["full_update"], Update)
    assert (upd.old_kind, upd.old, upd.new) == ("O", ("1", "a"), ("1", "b"))
    dele = only(CASES["delete_full_identity"], Delete)
    assert (dele.old_kind, dele.old) == ("O", ("1", "b"))


def test_delete_with_key() -> None:
    dele = only(CASES["delete_default_identity"], Delete)
    assert dele.old_kind == "K"
    assert dele.old == ("10",) + (None,) * 8


def test_table_without_primary_key() -> None:
    rel = only(CASES["nopk_insert"], Relation)
    assert not any(c.is_key for c in rel.columns)
    assert only(CASES["nopk_insert"], Insert).new == ("1", "x")


def test_truncate() -> None:
    msgs = CASES["truncate"]
    trunc = only(msgs, Truncate)
    rels = [m for m in msgs if isinstance(m, Relation)]
    assert trunc.relation_ids == tuple(r.relation_id for r in rels)
    assert {r.name for r in rels} == {"nopk", "full_items"}
    assert not trunc.cascade and not trunc.restart_identity


def test_logical_messages_and_origin() -> None:
    msgs = CASES["messages"] + CASES["origin"]
    texts = {(m.transactional, m.prefix, m.content) for m in msgs if isinstance(m, Message)}
    assert texts == {(True, "tidings", b"in a transaction"), (False, "tidings", b"outside")}
    origin = only(CASES["origin"], Origin)
    assert origin.name == "fx_origin"
    assert origin.commit_lsn == parse_lsn("0/AB")


def test_stream_frames() -> None:
    frames = [parse_copy_data(bytes.fromhex(f)) for f in FIXTURES["stream_frames"]]
    data = [f for f in frames if isinstance(f, XLogData)]
    keepalives = [f for f in frames if isinstance(f, PrimaryKeepalive)]
    assert keepalives and data
    messages = [decode(d.payload) for d in data]
    assert kinds(messages) == ["Begin", "Type", "Relation", "Insert", "Commit"]
    commit = messages[-1]
    assert isinstance(commit, Commit)
    # A Commit's XLogData starts at the commit's end: confirming it acknowledges the transaction.
    assert data[-1].data_start == commit.end_lsn
    assert keepalives[-1].wal_end >= commit.end_lsn
    assert all(f.send_time > 0 for f in frames)
    assert all(k.wal_end > 0 for k in keepalives)


# --------------------------------------------------------------------------------------------
# Hand-built edge cases
# --------------------------------------------------------------------------------------------


def _tuple(*cols: bytes) -> bytes:
    return struct.pack("!h", len(cols)) + b"".join(cols)


def _text(s: str) -> bytes:
    raw = s.encode()
    return b"t" + struct.pack("!i", len(raw)) + raw


def test_binary_and_null_columns() -> None:
    payload = (
        b"I"
        + struct.pack("!I", 7)
        + b"N"
        + _tuple(b"n", b"b" + struct.pack("!i", 2) + b"\x01\x02", b"u", _text("é"))
    )
    msg = decode(payload)
    assert msg == Insert(7, (None, Binary(b"\x01\x02"), UNCHANGED, "é"))


def test_empty_tuple_and_empty_text() -> None:
    assert decode(b"I" + struct.pack("!I", 1) + b"N" + _tuple()) == Insert(1, ())
    assert decode(b"I" + struct.pack("!I", 1) + b"N" + _tuple(_text(""))) == Insert(1, ("",))


def test_update_with_old_row() -> None:
    payload = b"U" + struct.pack("!I", 9) + b"O" + _tuple(_text("a")) + b"N" + _tuple(_text("b"))
    assert decode(payload) == Update(9, "O", ("a",), ("b",))


def test_relation_in_pg_catalog_and_identity_index() -> None:
    payload = (
        b"R"
        + struct.pack("!I", 3)
        + b"\0"
        + b"t\0"
        + b"i"
        + struct.pack("!h", 1)
        + b"\x01"
        + b"k\0"
        + struct.pack("!Ii", 23, -1)
    )
    rel = decode(payload)
    assert isinstance(rel, Relation)
    assert (rel.namespace, rel.name, rel.replica_identity) == ("", "t", "i")
    assert rel.columns[0].is_key


def test_truncate_options() -> None:
    t = decode(b"T" + struct.pack("!IB", 2, 3) + struct.pack("!II", 10, 11))
    assert t == Truncate(3, (10, 11)) and t.cascade and t.restart_identity


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", "empty pgoutput message"),
        (b"Z", "unsupported pgoutput message type 'Z'"),
        (b"S" + b"\0" * 4, "unsupported pgoutput message type 'S'"),  # streaming is protocol v2
        (b"B" + b"\0" * 10, "truncated 'B' message"),
        (b"B" + b"\0" * 21, "1 trailing bytes in 'B' message"),
        (b"I" + struct.pack("!I", 1) + b"X", "Insert: expected 'N', got 'X'"),
        (b"D" + struct.pack("!I", 1) + b"N", "Delete: expected 'K' or 'O', got 'N'"),
        (b"U" + struct.pack("!I", 1) + b"K" + _tuple() + b"Q", "Update: expected 'N', got 'Q'"),
        (b"I" + struct.pack("!I", 1) + b"N" + _tuple(b"z"), "unknown tuple column kind 'z'"),
        (
            b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", 5) + b"ab",
            "truncated 'I' message",
        ),
        (
            b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", -1),
            "truncated 'I' message",
        ),
        (b"Y" + struct.pack("!I", 1) + b"public", "unterminated string in 'Y' message"),
    ],
)
def test_malformed(payload: bytes, error: str) -> None:
    with pytest.raises(DecodeError) as exc:
        decode(payload)
    assert str(exc.value) == error


def test_framing_round_trip_by_hand() -> None:
    w = b"w" + struct.pack("!QQq", 1, 2, 3) + b"B..."
    assert parse_copy_data(w) == XLogData(1, 2, 3, b"B...")
    k = b"k" + struct.pack("!QqB", 5, 6, 1)
    assert parse_copy_data(k) == PrimaryKeepalive(5, 6, True)
    for bad, error in [
        (b"", "empty replication frame"),
        (b"w\0", "truncated XLogData header"),
        (b"k\0", "truncated primary keepalive"),
        (b"x", "unknown replication frame type 'x'"),
    ]:
        with pytest.raises(DecodeError, match=error):
            parse_copy_data(bad)


def test_standby_status_update_layout() -> None:
    msg = standby_status_update(0x10, 0x20, 0x30, 0x40, reply_requested=True)
    assert msg == b"r" + struct.pack("!QQQqB", 0x10, 0x20, 0x30, 0x40, 1)
    assert len(standby_status_update(1, 1, 1, 1)) == 34


def test_lsn_and_time_helpers() -> None:
    assert format_lsn(0x16B3748) == "0/16B3748"
    assert format_lsn((0xA << 32) | 0xFF) == "A/FF"
    assert parse_lsn("A/FF") == (0xA << 32) | 0xFF
    with pytest.raises(ValueError):
        parse_lsn("nope")
    moment = datetime(2026, 8, 21, 12, 0, 0, 123456, tzinfo=UTC)
    assert pg_timestamp(pg_time(moment)) == moment
    assert pg_time(datetime(2000, 1, 1, tzinfo=UTC)) == 0
