"""From captured pgoutput messages to spec 6.3 change payloads (pure; no database)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tidings.cdc.changes import (
    ERROR_NO_PRIMARY_KEY,
    ERROR_TOO_LARGE,
    Change,
    ChangeDecoder,
    TransactionEnd,
    format_commit_timestamp,
    narrow,
)
from tidings.cdc.pgoutput import Begin, Commit, format_lsn, pg_time
from tidings.cdc.values import STRING, PgType

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "pgoutput_v1.json").read_text())
CASES = {case["name"]: [bytes.fromhex(m) for m in case["messages"]] for case in FIXTURES["cases"]}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
ITEMS_COLUMNS = [
    {"name": "id", "type": "int8"},
    {"name": "title", "type": "text"},
    {"name": "n", "type": "int4"},
    {"name": "tags", "type": "_text"},
    {"name": "body", "type": "text"},
    {"name": "mood", "type": "mood"},
    {"name": "price", "type": "numeric"},
    {"name": "flag", "type": "bool"},
    {"name": "at", "type": "timestamptz"},
]


def run(name: str, decoder: ChangeDecoder | None = None) -> tuple[list[Change], list[TransactionEnd]]:
    decoder = decoder or ChangeDecoder()
    out = [decoder.feed(m) for m in CASES[name]]
    return [c for c in out if isinstance(c, Change)], [e for e in out if isinstance(e, TransactionEnd)]


def test_insert_payload() -> None:
    (change,), (end,) = run("insert")
    data = change.data
    assert list(data) == [
        "schema", "table", "commit_timestamp", "position", "type", "columns", "record", "errors"
    ]  # fmt: skip
    assert TIMESTAMP.match(data["commit_timestamp"])
    # The position: commit LSN and index in the transaction, fixed-width hex (compares in order).
    assert data["position"] == f"{change.commit_lsn:016X}/{change.index:08X}" == change.position
    assert data | {"commit_timestamp": "-"} == {
        "schema": "public",
        "table": "items",
        "commit_timestamp": "-",
        "position": change.position,
        "type": "INSERT",
        "columns": ITEMS_COLUMNS,
        "record": {
            "id": 1,
            "title": "hello",
            "n": None,
            "tags": ["a", "b c", None],
            "body": None,
            "mood": "happy",
            "price": 1.5,
            "flag": True,
            "at": "2026-08-21T14:00:00.123+02:00",
        },
        "errors": None,
    }
    assert change.row is data["record"]
    assert change.type == "INSERT" and (change.schema, change.table) == ("public", "items")
    assert change.primary_key == ("id",)
    assert change.filter_types["tags"] == "_text"
    assert change.id == f"{format_lsn(end.commit_lsn)}:0"
    assert end.changes == 1 and end.end_lsn > end.commit_lsn


def test_ids_are_stable_and_indexed_within_a_transaction() -> None:
    first, (end,) = run("insert_two_in_one_transaction")
    again, _ = run("insert_two_in_one_transaction")
    assert (
        [c.id for c in first]
        == [c.id for c in again]
        == [f"{format_lsn(end.commit_lsn)}:{i}" for i in (0, 1)]
    )
    assert [c.data["record"]["id"] for c in first] == [2, 3]
    assert end.changes == 2


def test_update_with_default_identity_has_the_key_as_old_record() -> None:
    (change,), _ = run("update_default_identity")
    assert change.data["type"] == "UPDATE"
    assert change.data["record"]["title"] == "bye"
    assert change.data["old_record"] == {"id": 1}
    assert list(change.data) == [
        "schema",
        "table",
        "commit_timestamp",
        "position",
        "type",
        "columns",
        "record",
        "old_record",
        "errors",
    ]


def test_update_that_changes_the_key_has_the_old_key() -> None:
    (change,), _ = run("update_key_change")
    assert change.data["record"]["id"] == 10
    assert change.data["old_record"] == {"id": 1}


def test_unchanged_toast_is_left_out_without_an_old_row() -> None:
    (change,), _ = run("toast_unchanged_update")
    assert "body" not in change.data["record"]
    assert change.data["record"]["title"] == "still big"
    assert change.data["columns"] == ITEMS_COLUMNS


def test_replica_identity_full_gives_the_whole_old_row() -> None:
    decoder = ChangeDecoder()
    run("full_insert", decoder)
    (upd,), _ = run("full_update", decoder)
    assert upd.data["record"] == {"id": 1, "title": "b"}
    assert upd.data["old_record"] == {"id": 1, "title": "a"}
    (dele,), _ = run("delete_full_identity", decoder)
    assert "record" not in dele.data
    assert dele.data["old_record"] == {"id": 1, "title": "b"}
    assert dele.row is dele.data["old_record"]


def test_delete_with_default_identity() -> None:
    (change,), _ = run("delete_default_identity")
    assert change.data["type"] == "DELETE"
    assert change.data["old_record"] == {"id": 10}
    assert "record" not in change.data
    assert change.data["errors"] is None


def test_table_without_primary_key_gives_error_400() -> None:
    (change,), _ = run("nopk_insert")
    assert change.data["errors"] == [ERROR_NO_PRIMARY_KEY]
    assert "record" not in change.data and "old_record" not in change.data
    assert change.row == {}


def test_truncate_messages_and_origin_produce_no_change() -> None:
    changes, ends = run("truncate")
    assert changes == [] and len(ends) == 1 and ends[0].changes == 0
    changes, _ = run("messages")
    assert changes == []
    (change,), _ = run("origin")
    assert change.data["record"]["title"] == "from elsewhere"


def test_unchanged_toast_is_filled_from_a_full_old_row() -> None:
    # Hand-built: REPLICA IDENTITY FULL sends the old row with the TOASTed value, the new row marks it 'u'.
    decoder = ChangeDecoder()
    for payload in CASES["toast_insert"]:
        decoder.feed(payload)
    info = next(iter(decoder.tables.values()))
    info.replica_identity = "f"
    from tidings.cdc.pgoutput import UNCHANGED, Update

    old = ("4", "big", None, None, "x" * 10, None, None, None, None)
    new = ("4", "renamed", None, None, UNCHANGED, None, None, None, None)
    change = decoder.handle(Update(info.relation_id, "O", old, new))
    assert isinstance(change, Change)
    assert change.data["record"]["body"] == "x" * 10
    assert change.data["old_record"]["title"] == "big"


def test_oversized_row_gives_error_413_and_keeps_small_values() -> None:
    changes, _ = run("toast_insert", ChangeDecoder(max_record_bytes=1000))
    (change,) = changes
    assert change.data["errors"] == [ERROR_TOO_LARGE]
    assert change.data["record"]["title"] == "big"
    assert "body" not in change.data["record"]


def test_type_resolver_and_primary_key_resolver_are_used() -> None:
    asked: list[int] = []

    def resolve(oid: int) -> PgType:
        asked.append(oid)
        return PgType(oid, "feeling", STRING)

    decoder = ChangeDecoder(resolve_type=resolve, primary_key=lambda rel: ("id", "title"))
    (change,), _ = run("insert", decoder)
    assert len(asked) == 1
    assert {"name": "mood", "type": "feeling"} in change.data["columns"]
    assert change.primary_key == ("id", "title")
    nopk = ChangeDecoder(primary_key=lambda rel: ())
    (change,), _ = run("insert", nopk)
    assert change.data["errors"] == [ERROR_NO_PRIMARY_KEY]


def test_reset_forgets_relations() -> None:
    decoder = ChangeDecoder()
    run("insert", decoder)
    decoder.reset()
    assert decoder.tables == {}


def test_change_before_relation_is_an_error() -> None:
    decoder = ChangeDecoder()
    insert = [m for m in CASES["insert"] if m[:1] == b"I"][0]
    try:
        decoder.feed(insert)
    except ValueError as exc:
        assert "before its Relation" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_commit_timestamp_format_truncates_to_milliseconds() -> None:
    from datetime import UTC, datetime

    micros = pg_time(datetime(2026, 8, 21, 12, 0, 0, 123999, tzinfo=UTC))
    assert format_commit_timestamp(micros) == "2026-08-21T12:00:00.123Z"
    decoder = ChangeDecoder()
    decoder.handle(Begin(1, micros, 1))
    assert isinstance(decoder.handle(Commit(0, 1, 2, micros)), TransactionEnd)


def test_narrow() -> None:
    (change,), _ = run("update_default_identity")
    small: dict[str, Any] = narrow(change.data, frozenset({"id", "title"}))
    assert small["columns"] == [{"name": "id", "type": "int8"}, {"name": "title", "type": "text"}]
    assert small["record"] == {"id": 1, "title": "bye"}
    assert small["old_record"] == {"id": 1}
    assert change.data["record"]["n"] is None  # the original is untouched
