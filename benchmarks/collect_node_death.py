"""Markdown table of a ``benchmarks/run_node_death.sh`` output folder (pasted into BENCHMARKS.md).

.venv/bin/python benchmarks/collect_node_death.py bench-results/node-death-<time> [more folders]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEADER = (
    "| clients | redis-py pool | recovered | recovered after kill p50 / p99 / 100% s "
    "| recovered − own backoff p50 / p99 / max ms | joins refused | connect timeouts | incomplete replays "
    "| lost | survivor CPU s (µs/rejoin) | nginx / Redis CPU s | Redis conns opened | load before / after "
    "| time (UTC), commit |"
)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def row(r: dict[str, Any]) -> str:
    """One table row of a node-death report."""
    pool = "2000" if "max_connections=2000" in r.get("command", "") else "default (100)"
    if r["status"] != "ok":
        return f"| {r['params']['n']:,} | {pool} | {r['status']} |" + " |" * 12
    m = r["metrics"]
    rec, ab = m["recovered_since_kill_s"], m["recovered_after_backoff_ms"]
    err, cpu = m["reconnect_errors"], m["cpu_during_recovery_s"]
    refused = sum(v for k, v in err.items() if k.startswith("join-error"))
    la = r["load_average"]
    commit = r.get("tidings_source", {}).get("commit") or "?"
    return (
        f"| {m['clients']:,} | {pool} | {m['recovered']:,} "
        f"| {_fmt(rec['p50'])} / {_fmt(rec['p99'])} / {_fmt(rec['100%'])} "
        f"| {_fmt(ab.get('p50'))} / {_fmt(ab.get('p99'))} / {_fmt(ab.get('max'))} "
        f"| {refused:,} | {err.get('timeout', 0):,} | {m['incomplete_replays']} | {m['lost']:,} "
        f"| {cpu['survivor']:.1f} ({_fmt(m['survivor_cpu_us_per_rejoin'])}) "
        f"| {cpu['nginx']:.1f} / {cpu['redis']:.1f} "
        f"| {_fmt(m.get('redis_connections_opened_during_recovery'))} "
        f"| {la['before'][0]:.2f} / {la['after'][0]:.2f} | {r['date'][11:16]} {commit} |"
    )


def main(folders: list[str]) -> None:
    reports = []
    for folder in folders:
        for f in [*Path(folder).glob("tidings-nginx.json"), *Path(folder).glob("*/tidings-nginx.json")]:
            report = json.loads(f.read_text())
            if report.get("scenario") == "node-death":
                reports.append(report)
    reports.sort(key=lambda r: (-r["params"]["n"], "max_connections" in r.get("command", ""), r["date"]))
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for r in reports:
        print(row(r))


if __name__ == "__main__":
    main(sys.argv[1:])
