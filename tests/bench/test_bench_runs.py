"""``tidings bench`` end to end at tiny N: reports are written and their numbers add up.

These tests check that the tool works and its accounting is consistent (counts add up, nothing
negative), never that anything is fast: timing is measured by the bench, not asserted by tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tidings.bench.targets import TARGETS, benchmarks_dir


def bench(tmp_path: Path, *args: str, timeout: float = 90) -> dict[str, dict[str, Any]]:
    """Run ``tidings bench ARGS`` in a subprocess; the JSON report of each target by name."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tidings", "bench", *args, "--out", str(out), "--quiet", "--no-pin"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if p.stem != "summary"}
    for name, report in reports.items():
        assert (out / f"{name}.md").is_file()
        if report["status"] == "ok":
            assert (out / f"{name}.png").is_file(), f"no plot for {name}"
            assert report["load_average"]["before"][0] >= 0
            assert report["machine"]["cores"] >= 1
    assert (out / "summary.md").is_file()
    return reports


def sane_latency(summary: dict[str, float], count: int | None = None) -> None:
    """Percentiles are non-negative and ordered; ``count`` matches when given."""
    if count is not None:
        assert summary["count"] == count
    if summary["count"]:
        assert 0 <= summary["min"] <= summary["p50"] <= summary["p99"] <= summary["max"]


def test_connect_against_every_reference(tmp_path: Path) -> None:
    reports = bench(tmp_path, "connect", "-n", "20", "--rate", "200", "--against", "all")
    assert set(reports) == set(TARGETS)
    for name in ("tidings", "ceiling", "websockets"):
        assert reports[name]["status"] == "ok", reports[name]
    for name, r in reports.items():
        if r["status"] != "ok":
            assert r["status"].startswith("unavailable"), (name, r["status"])
            continue
        m = r["metrics"]
        assert m["attempted"] == 20
        assert m["joined"] + m["failed"] == 20
        assert m["joined"] == 20, (name, m["errors"])
        sane_latency(m["join_latency_ms"], m["joined"])
        assert m["server_cpu_s"] >= 0
    targets = reports["tidings"]["targets"]
    assert targets and targets[0]["target"].startswith("connect p99")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Tidings ÷ reference" in summary


def test_connect_burst_keeps_a_number_in_flight(tmp_path: Path) -> None:
    # Burst mode (issue 14): closed loop, --in-flight attempts at a time; no rate, no latency target.
    reports = bench(tmp_path, "connect", "-n", "60", "--in-flight", "8", "--against", "tidings,ceiling")
    for name in ("tidings", "ceiling"):
        r = reports[name]
        assert r["status"] == "ok", r
        m = r["metrics"]
        assert m["joined"] == 60 and m["failed"] == 0, m["errors"]
        assert m["in_flight"] == 8 and m["offered_rate_per_s"] is None
        assert r["params"]["in_flight"] == 8 and "rate" not in r["params"]
        sane_latency(m["join_latency_ms"], 60)
    assert reports["tidings"]["targets"] == []


def test_connect_private_joins_are_authorized_by_the_policy(tmp_path: Path) -> None:
    # --private: the server gets a CHANNEL_POLICY for the bench's topics; every join is checked.
    reports = bench(tmp_path, "connect", "-n", "30", "--rate", "200", "--private", "--distinct-claims")
    r = reports["tidings"]
    assert r["status"] == "ok", r
    m = r["metrics"]
    assert m["joined"] == 30 and m["failed"] == 0, m["errors"]
    assert m["authorization"] == "CHANNEL_POLICY" and m["distinct_claims"] is True
    assert r["params"]["private"] == "policy"


def test_fanout_counts_add_up(tmp_path: Path) -> None:
    reports = bench(
        tmp_path, "fanout", "-n", "20", "--rate", "10", "--duration", "1", "--against", "tidings,ceiling"
    )
    for name in ("tidings", "ceiling"):
        m = reports[name]["metrics"]
        assert reports[name]["status"] == "ok"
        assert m["subscribers"] == 20
        assert m["messages_sent"] == 10
        assert m["expected_deliveries"] == m["subscribers"] * m["messages_sent"]
        assert 0 <= m["lost"] <= m["expected_deliveries"]
        assert m["delivered"] + m["lost"] >= m["expected_deliveries"]
        sane_latency(m["delivery_latency_ms"], m["delivered"])
        assert m["server_cpu_s"] >= 0 and m["server_cpu_us_per_delivery"] >= 0


def test_memory_reads_server_rss(tmp_path: Path) -> None:
    m = bench(tmp_path, "memory", "-n", "20", "--vsn", "1.0.0")["tidings"]["metrics"]
    assert m["joined"] == 20
    assert m["rss_before_kb"] > 0 and m["rss_after_kb"] > 0
    assert isinstance(m["bytes_per_connection"], int)
    assert m["server_fds"] >= 20


def test_order_status_and_references_not_applicable(tmp_path: Path) -> None:
    reports = bench(
        tmp_path,
        "order-status",
        "-n",
        "20",
        "--rate",
        "20",
        "--duration",
        "1",
        "--against",
        "tidings,ceiling",
    )
    assert reports["ceiling"]["status"] == "n/a"
    m = reports["tidings"]["metrics"]
    assert m["clients"] == 20 and m["updates_sent"] == 20
    assert 0 <= m["updates_accepted"] <= m["updates_sent"]
    assert m["delivered"] + m["lost"] >= m["updates_accepted"]
    sane_latency(m["end_to_end_latency_ms"], m["delivered"])
    sane_latency(m["request_latency_ms"], m["updates_sent"])


def test_reconnect_storm_everyone_comes_back(tmp_path: Path) -> None:
    m = bench(
        tmp_path, "reconnect-storm", "-n", "20", "--rate", "10", "--channels", "4", "--backoff-ms", "200"
    )["tidings"]["metrics"]
    assert m["clients"] == 20
    assert m["rejoined"] + m["not_rejoined"] == m["clients"]
    assert m["rejoined"] == 20
    assert m["server_down_s"] > 0
    assert m["lost"] >= 0 and m["missed_while_disconnected"] >= 0
    assert m["updates_accepted"] <= m["updates_sent"]
    since_ready = m["rejoin_since_ready_s"]
    assert since_ready["p50"] <= since_ready["p99"] <= since_ready["100%"]


def test_presence_everyone_sees_everyone(tmp_path: Path) -> None:
    m = bench(tmp_path, "presence", "-n", "10", "--rate", "100")["tidings"]["metrics"]
    assert m["members"] == 10
    assert m["saw_full_state"] == 10
    assert m["all_full_since_first_join_s"] >= 0


@pytest.mark.parametrize("target", ["socketio", "node-ws", "websockets"])
def test_reference_fanout(tmp_path: Path, target: str) -> None:
    # `make test` installs the references (the bench extra and benchmarks/node): missing is a failure.
    why = TARGETS[target].unavailable(benchmarks_dir())
    assert why is None, why
    r = bench(tmp_path, "fanout", "-n", "10", "--rate", "5", "--duration", "1", "--against", target)[target]
    assert r["status"] == "ok", r
    assert r["metrics"]["delivered"] + r["metrics"]["lost"] >= r["metrics"]["expected_deliveries"]
