"""Pieces of the bench that need no server: framing, payload parsing, statistics, reports."""

from __future__ import annotations

from pathlib import Path

from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from tidings.bench.pool import split_addresses
from tidings.bench.report import check_targets, flatten, get_path, write_run
from tidings.bench.scenarios import Outcome
from tidings.bench.stats import percentile, summarize_ms
from tidings.bench.wire import (
    OP_TEXT,
    PhoenixDialect,
    SocketIODialect,
    accept_key,
    bench_payload,
    client_frame,
    handshake_request,
    read_t_n,
)


def test_client_frames_are_masked_and_parse_as_websocket() -> None:
    server = ServerProtocol()
    request, expected = handshake_request("127.0.0.1", 4000, "/socket/websocket?vsn=2.0.0")
    server.receive_data(request)
    [req] = server.events_received()
    response = server.accept(req)
    assert response.headers["Sec-WebSocket-Accept"].encode() == expected
    server.send_response(response)
    for text in (b"", b"x" * 5, b"y" * 200, b"z" * 70000):
        frame = client_frame(OP_TEXT, text)
        assert frame[1] & 0x80, "client frames must be masked"
        server.receive_data(frame)
        [event] = server.events_received()
        assert isinstance(event, Frame) and event.opcode is Opcode.TEXT and event.data == text


def test_accept_key_rfc_example() -> None:
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_bench_payload_round_trip_and_spaces() -> None:
    payload = bench_payload(7, 90)
    assert 85 <= len(payload) <= 95
    t, n = read_t_n(b'[null,null,"realtime:x","broadcast",{"payload":' + payload + b"}]") or (0, 0)
    assert n == 7 and t > 0
    assert read_t_n(b'42["broadcast",{"t": 12, "n": 3, "p": "x"}]') == (12, 3)
    assert read_t_n(b'{"type":"broadcast"}') is None


def test_dialect_frames() -> None:
    v1, v2 = PhoenixDialect("1.0.0"), PhoenixDialect("2.0.0")
    assert v2.join(1, "realtime:a", None).startswith(b'["1","1","realtime:a","phx_join",')
    assert b'"join_ref":"1"' in v1.join(1, "realtime:a", "k")
    assert v2.decode(b'["1","1","realtime:a","phx_reply",{"status":"ok"}]') == (
        "1",
        "realtime:a",
        "phx_reply",
        {"status": "ok"},
    )
    assert SocketIODialect().join(3, "room", None) == b'423["join","room"]'


def test_percentiles_and_summary() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    s = summarize_ms([1_000_000, 2_000_000, 3_000_000])
    assert s["count"] == 3 and s["min"] == 1.0 and s["max"] == 3.0 and s["p50"] == 2.0
    assert summarize_ms([]) == {"count": 0}


def test_split_addresses() -> None:
    assert split_addresses(["a", "b", "c", "d"], 2) == [["a", "c"], ["b", "d"]]
    assert split_addresses(["a"], 3) == [["a"], ["a"], ["a"]]


def test_report_helpers(tmp_path: Path) -> None:
    metrics = {"lost": 0, "lat": {"p50": 1.0, "p99": 2.0}, "errors": {"timeout": 2}}
    assert get_path(metrics, "lat.p99") == 2.0 and get_path(metrics, "lat.nope") is None
    assert ("lat.p50", 1.0) in flatten(metrics)
    assert ("errors", "timeout: 2") in flatten(metrics)
    [target] = check_targets("memory", {"bytes_per_connection": 5000}, {})
    assert target["met"] is False
    report = {
        "scenario": "memory",
        "target": "tidings",
        "status": "ok",
        "date": "2026-01-01T00:00:00+00:00",
        "command": "tidings bench memory",
        "machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "kernel": "k", "python": "3", "nofile": [1, 1]},
        "load_average": {"before": [0.1, 0, 0], "after": [0.2, 0, 0]},
        "params": {"n": 1},
        "metrics": metrics,
    }
    paths = write_run(tmp_path, report, Outcome(metrics))
    assert "| lat.p99 | 2 |" in paths["md"].read_text()
