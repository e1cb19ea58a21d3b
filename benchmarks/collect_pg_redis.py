"""Markdown tables of a ``benchmarks/run_pg_redis.sh`` output folder (printed, pasted into BENCHMARKS.md).

.venv/bin/python benchmarks/collect_pg_redis.py bench-results/pgredis-<time> [more folders]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def _la(r: dict[str, Any]) -> str:
    return f"{r['load_average']['before'][0]:.2f} / {r['load_average']['after'][0]:.2f}"


def _commit(r: dict[str, Any]) -> str:
    return str(r.get("tidings_source", {}).get("commit") or "?")


def pg_table(folders: list[Path]) -> list[str]:
    rows = []
    for folder in folders:
        for f in sorted(folder.glob("pg-*/tidings.json"), key=lambda p: int(p.parent.name[3:])):
            r = _load(f)
            if r["status"] != "ok":
                rows.append(f"| {r['params']['rate']:,.0f} | {r['status']} |||||||||")
                continue
            m = r["metrics"]
            e, q = m["end_to_end_latency_ms"], m["request_latency_ms"]
            rows.append(
                f"| {m['rate_per_s']:,.0f} | {m['achieved_rate_per_s']:,.0f} "
                f"| {e['p50']} | {e['p99']} | {e['max']} "
                f"| {q['p50']} / {q['p99']} | {m['lost']} | {m['server_cpu_us_per_update']:,.0f} "
                f"| {m['load_generator_cpu_percent']} | {_la(r)} | {r['date'][11:16]} {_commit(r)} |"
            )
    head = [
        "| offered updates/s | achieved/s | p50 ms | p99 ms | max ms | UPDATE commit p50 / p99 ms | lost "
        "| server CPU µs/update | load gen CPU % | load avg before / after | time (UTC), commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return head + rows


def cluster_table(folder: Path, scenario: str) -> list[str]:
    rows = []
    key = "delivery_latency_ms" if scenario == "fanout" else "end_to_end_latency_ms"
    unit = "delivery" if scenario == "fanout" else "update"
    for name in ("tidings", "tidings-redis", "tidings-cluster"):
        f = folder / f"{name}.json"
        if not f.exists():
            continue
        r = _load(f)
        if r["status"] != "ok":
            rows.append(f"| {name} | {r['status']} |||||||")
            continue
        m = r["metrics"]
        lat = m[key]
        cpu = m.get(f"server_cpu_us_per_{unit}")
        rows.append(
            f"| {name} | {lat['p50']} | {lat['p99']} | {lat['max']} "
            f"| {m['delivered']:,} | {m['lost']} | {cpu} "
            f"| {_la(r)} | {_commit(r)} |"
        )
    head = [
        f"| target | p50 ms | p99 ms | max ms | delivered | lost | node A CPU µs/{unit} "
        "| load avg before / after | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return head + rows


def redis_table(folder: Path) -> list[str]:
    rows = []
    files = sorted(folder.glob("redis-*.json"), key=lambda p: int(p.stem[6:]))
    for f in files:
        r = _load(f)
        d, a = r["delivery_latency_ms"], r["ack_latency_ms"]
        rows.append(
            f"| {r['offered_broadcasts_per_s']:,.0f} | {r['achieved_broadcasts_per_s']:,.0f} "
            f"| {r['deliveries_per_s']:,.0f} | {r['lost']} "
            f"| {a.get('p50')} / {a.get('p99')} | {d.get('p50')} / {d.get('p99')} "
            f"| {r['delivery_p50_ms_first_half']} → {r['delivery_p50_ms_second_half']} "
            f"| {r['redis_cpu_percent']} | {r['loadavg'][0]:.2f} |"
        )
    head = [
        "| offered broadcasts/s | achieved/s | deliveries/s | lost | EVAL ack p50 / p99 ms "
        "| delivery p50 / p99 ms | delivery p50 1st → 2nd half ms | redis-server CPU % | load avg after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return head + rows


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:]]
    out: list[str] = []
    if any(next(f.glob("pg-*/tidings.json"), None) for f in folders):
        out += ["#### order-status via PostgreSQL", "", *pg_table(folders), ""]
    for folder in folders:
        for scen, sub in (("fanout", "fanout"), ("order-status", "order")):
            if (folder / sub).is_dir():
                out += [
                    f"#### {scen}: single node vs two nodes on one Redis",
                    "",
                    *cluster_table(folder / sub, scen),
                    "",
                ]
        if next(folder.glob("redis-*.json"), None):
            out += ["#### broadcasts through one Redis", "", *redis_table(folder), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
