"""Turn a ``benchmarks/run_all.sh`` output folder into the result tables of ``BENCHMARKS.md``.

    python benchmarks/collect.py bench-results/full-<time>            # print the tables
    python benchmarks/collect.py bench-results/full-<time> --write    # replace them in BENCHMARKS.md

The tables go between the ``<!-- results:start -->`` and ``<!-- results:end -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tidings.bench.report import KEY_METRICS, get_path

ORDER = ["connect", "memory", "fanout", "order-status", "reconnect-storm", "presence"]
TARGET_ORDER = ["tidings", "ceiling", "websockets", "socketio", "node-ws"]


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def section(folder: Path, scenario: str) -> list[str]:
    reports = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json") if p.stem != "summary"}
    if not reports:
        return []
    order = [t for t in TARGET_ORDER if t in reports]
    first = reports[order[0]]
    keys = KEY_METRICS[scenario]
    lines = [f"### {scenario}", "", f"`{first['command']}`", ""]
    lines.append("Parameters: " + ", ".join(f"{k}={v}" for k, v in first["params"].items()))
    commit = (first.get("tidings_source") or {}).get("commit")
    if commit:
        lines[-1] += f"; Tidings commit {commit}"
    lines += [
        "",
        "| server | "
        + " | ".join(k[1] for k in keys)
        + " | Tidings ÷ this (first column) | date (UTC) | load avg |",
    ]
    lines.append("|---" * (len(keys) + 4) + "|")
    tid = reports.get("tidings")
    for name in order:
        r = reports[name]
        ok = r["status"] == "ok"
        cells = [fmt(get_path(r["metrics"], k[0])) if ok else r["status"].split(":")[0] for k in keys]
        ratio = "–"
        if ok and tid is not None and tid["status"] == "ok" and name != "tidings":
            a, b = get_path(tid["metrics"], keys[0][0]), get_path(r["metrics"], keys[0][0])
            if isinstance(a, int | float) and isinstance(b, int | float) and b:
                ratio = f"{a / b:.2f}×"
        load = r.get("load_average", {}).get("before", [None])[0]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {ratio} | {r.get('date', '')[:16]} | {fmt(load)} |"
        )
    lines.append("")
    if scenario == "fanout" and tid is not None and tid["status"] == "ok":
        mine = tid["metrics"]["server_cpu_us_per_delivery"]
        for ref, limit, text in (
            ("ceiling", 1.3, "<= 1.3 x the ceiling"),
            ("node-ws", 1.0, "below Node's ws"),
        ):
            other = reports.get(ref)
            if other is not None and other["status"] == "ok" and mine is not None:
                theirs = other["metrics"]["server_cpu_us_per_delivery"]
                met = "met" if mine <= limit * theirs else "**not met**"
                lines.append(f"- Target: server CPU per delivery {text}: {mine} vs {theirs} µs — {met}")
    if tid is not None and tid.get("targets"):
        for t in tid["targets"]:
            met = "met" if t["met"] else "**not met**"
            lines.append(f"- Target: {t['target']}: {fmt(t['value'])} {t['unit']} — {met}")
    lines.append("")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--write", action="store_true", help="replace the tables in BENCHMARKS.md")
    args = parser.parse_args()
    lines: list[str] = []
    for scenario in ORDER:
        if (args.folder / scenario).is_dir():
            lines += section(args.folder / scenario, scenario)
    text = "\n".join(lines)
    if not args.write:
        print(text)
        return 0
    doc = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
    body = doc.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in body or end not in body:
        print("BENCHMARKS.md has no results markers", file=sys.stderr)
        return 1
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n\n{text}\n{end}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
