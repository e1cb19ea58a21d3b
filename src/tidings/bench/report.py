"""Reports of a run: JSON (everything), Markdown (for people) and a PNG latency plot.

A comparison over several targets adds ``summary.md`` / ``summary.json`` with the key metrics of
each target and their ratio to Tidings. Targets from the performance guide are checked and shown,
never asserted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .scenarios import Outcome

__all__ = ["KEY_METRICS", "check_targets", "flatten", "get_path", "write_run", "write_summary"]

# (metric path, column label, which direction is better) per scenario.
KEY_METRICS: dict[str, list[tuple[str, str, str]]] = {
    "connect": [
        ("join_latency_ms.p50", "join p50 ms", "lower"),
        ("join_latency_ms.p99", "join p99 ms", "lower"),
        ("failed", "failed", "lower"),
        ("achieved_rate_per_s", "conn/s", "higher"),
        ("server_cpu_us_per_connection", "server CPU µs/conn", "lower"),
    ],
    "memory": [
        ("bytes_per_connection", "bytes/conn", "lower"),
        ("rss_after_kb", "RSS after KiB", "lower"),
        ("joined", "joined", "higher"),
    ],
    "fanout": [
        ("server_cpu_us_per_delivery", "server CPU µs/delivery", "lower"),
        ("delivery_latency_ms.p50", "p50 ms", "lower"),
        ("delivery_latency_ms.p95", "p95 ms", "lower"),
        ("delivery_latency_ms.p99", "p99 ms", "lower"),
        ("lost", "lost", "lower"),
    ],
    "order-status": [
        ("end_to_end_latency_ms.p50", "p50 ms", "lower"),
        ("end_to_end_latency_ms.p99", "p99 ms", "lower"),
        ("lost", "lost", "lower"),
        ("server_cpu_us_per_update", "server CPU µs/update", "lower"),
    ],
    "reconnect-storm": [
        ("rejoin_since_ready_s.p50", "50% s", "lower"),
        ("rejoin_since_ready_s.p99", "99% s", "lower"),
        ("rejoin_since_ready_s.100%", "100% s", "lower"),
        ("rejoin_after_backoff_ms.max", "max after backoff ms", "lower"),
        ("lost", "lost", "lower"),
    ],
    "node-death": [
        ("recovered_since_kill_s.p50", "recovered 50% s", "lower"),
        ("recovered_since_kill_s.p99", "recovered 99% s", "lower"),
        ("recovered_since_kill_s.100%", "recovered 100% s", "lower"),
        ("recovered_after_backoff_ms.p50", "after backoff p50 ms", "lower"),
        ("recovered_after_backoff_ms.max", "after backoff max ms", "lower"),
        ("recovered", "recovered", "higher"),
        ("incomplete_replays", "incomplete replays", "lower"),
        ("lost", "lost", "lower"),
    ],
    "presence": [
        ("all_full_since_first_join_s", "all synced s", "lower"),
        ("all_full_since_last_join_s", "after last join s", "lower"),
        ("saw_full_state", "members synced", "higher"),
    ],
}


def get_path(metrics: dict[str, Any], path: str) -> Any:
    """``metrics["a"]["b"]`` for ``"a.b"`` (``None`` when missing)."""
    cur: Any = metrics
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested metrics as ``(dotted.name, value)`` rows."""
    rows: list[tuple[str, Any]] = []
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(not isinstance(x, dict) for x in v.values()) and k == "errors":
            rows.append((name, ", ".join(f"{ek}: {ev}" for ek, ev in v.items()) or "none"))
        elif isinstance(v, dict) and v:
            rows.extend(flatten(v, name + "."))
        elif isinstance(v, dict):
            rows.append((name, "none"))
        else:
            rows.append((name, v))
    return rows


def check_targets(scenario: str, metrics: dict[str, Any], params: dict[str, Any]) -> list[dict[str, Any]]:
    """The guide's targets that apply to one Tidings run, with whether each was met."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, limit: float, unit: str, note: str = "") -> None:
        met = None if value is None else bool(value <= limit)
        out.append({"target": name, "value": value, "limit": limit, "unit": unit, "met": met, "note": note})

    if scenario == "connect" and params.get("in_flight"):
        pass  # a burst measures cost and throughput; the latency target is for a given rate
    elif scenario == "connect":
        add(
            "connect p99 < 100 ms at 1,000 connections/s",
            get_path(metrics, "join_latency_ms.p99"),
            100,
            "ms",
            f"offered {params.get('rate')}/s",
        )
    elif scenario == "order-status":
        add(
            "order-status p99 < 50 ms with 10,000 clients",
            get_path(metrics, "end_to_end_latency_ms.p99"),
            50,
            "ms",
            f"{metrics.get('clients')} clients",
        )
    elif scenario == "memory":
        add("memory <= 4 KB per connection", metrics.get("bytes_per_connection"), 4096, "bytes")
    elif scenario == "reconnect-storm":
        add(
            "rejoined within 2 s after restart + backoff",
            get_path(metrics, "rejoin_after_backoff_ms.max"),
            2000,
            "ms",
            f"not rejoined: {metrics.get('not_rejoined')}",
        )
        add("zero messages lost", metrics.get("lost"), 0, "messages")
    elif scenario == "node-death":
        worst = get_path(metrics, "recovered_after_backoff_ms.max") if metrics.get("all_recovered") else None
        add(
            "all recovered within 2 s of their backoff delay after their node died",
            worst,
            2000,
            "ms",
            f"recovered {metrics.get('recovered')} of {metrics.get('clients')}",
        )
        add("zero messages lost", metrics.get("lost"), 0, "messages")
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _header_md(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    la = report["load_average"]
    out = [
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, open files {m['nofile'][0]}",
        f"- Load average (1 min) before / after: {la['before'][0]:.2f} / {la['after'][0]:.2f}",
    ]
    src = report.get("tidings_source")
    if src:
        dirty = " (with uncommitted changes)" if src.get("uncommitted_changes") else ""
        out.append(f"- Tidings code: {src.get('commit') or 'unknown commit'}{dirty} from `{src.get('path')}`")
    return out


def write_run(out_dir: Path, report: dict[str, Any], outcome: Outcome | None) -> dict[str, Path]:
    """Write ``<target>.json``, ``<target>.md`` and (if possible) ``<target>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / report["target"]
    paths = {"json": base.with_suffix(".json"), "md": base.with_suffix(".md")}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# tidings bench {report['scenario']} — {report['target']}", ""]
    lines += _header_md(report)
    lines.append(f"- Status: {report['status']}")
    lines.append(f"- Setup: {report.get('setup', '')}")
    lines.append("- Parameters: " + ", ".join(f"{k}={v}" for k, v in report["params"].items()))
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    for name, value in flatten(report.get("metrics", {})):
        lines.append(f"| {name} | {_fmt(value)} |")
    if report.get("targets"):
        lines += [
            "",
            "## Targets (reported, not asserted)",
            "",
            "| target | value | limit | met |",
            "|---|---|---|---|",
        ]
        for t in report["targets"]:
            met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['target']} | {_fmt(t['value'])} {t['unit']} | {_fmt(t['limit'])} | {met} |")
    prof = report.get("profile")
    if prof:
        lines += ["", f"## Server profile (py-spy, {prof['file']})", "", "| own % | function |", "|---|---|"]
        lines += [f"| {pct} | `{name}` |" for name, pct in prof["self"][:15]]
        lines += ["", "| incl. % | function |", "|---|---|"]
        lines += [f"| {pct} | `{name}` |" for name, pct in prof["inclusive"][:30]]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if outcome is not None:
        png = base.with_suffix(".png")
        err = plot(png, report, outcome)
        if err is None:
            paths["png"] = png
            lines += ["", f"![latency]({png.name})"]
        else:
            lines += ["", f"(no plot: {err})"]
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths


def plot(path: Path, report: dict[str, Any], outcome: Outcome) -> str | None:
    """Latency over time and its percentile curve (plus a curve the scenario adds); error or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'tidings[bench]')"
    lat = outcome.lat_ns
    panels = 2 + (1 if outcome.curve else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    load = report["load_average"]["before"][0]
    fig.suptitle(f"{report['scenario']} — {report['target']} ({report['date'][:16]}, load {load:.2f})")
    ax0, ax1 = axes[0], axes[1]
    if len(lat):
        t0 = min(outcome.sent_ns) if len(outcome.sent_ns) else 0
        step = max(1, len(lat) // 40000)  # thin the scatter; percentiles use every sample
        xs = [(outcome.sent_ns[i] - t0) / 1e9 for i in range(0, len(lat), step)]
        ys = [lat[i] / 1e6 for i in range(0, len(lat), step)]
        ax0.scatter(xs, ys, s=1, alpha=0.3)
        ax0.set_xlabel("send time (s)")
        ax0.set_ylabel(f"{outcome.latency_label} latency (ms)")
        ax0.set_title("latency over time")
        srt = sorted(lat)
        qs = [50, 75, 90, 95, 99, 99.5, 99.9, 99.99, 100]
        vals = [srt[min(len(srt) - 1, max(0, math.ceil(q / 100 * len(srt)) - 1))] / 1e6 for q in qs]
        ax1.plot(range(len(qs)), vals, marker="o")
        ax1.set_xticks(range(len(qs)), [f"p{q:g}" for q in qs], rotation=45)
        ax1.set_ylabel("latency (ms)")
        ax1.set_title(f"percentiles (n={len(lat):,})")
        ax1.grid(True, alpha=0.3)
    else:
        ax0.text(0.5, 0.5, "no samples", ha="center")
        ax1.text(0.5, 0.5, "no samples", ha="center")
    if outcome.curve:
        ax2 = axes[2]
        ax2.plot([c[0] for c in outcome.curve], [c[1] for c in outcome.curve])
        ax2.set_title(outcome.curve_label, fontsize=9)
        ax2.set_xlabel("s")
        ax2.set_ylim(0, 1.02)
        ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def write_summary(out_dir: Path, scenario: str, reports: list[dict[str, Any]]) -> Path:
    """``summary.md`` / ``summary.json``: key metrics of every target and ratios to Tidings."""
    keys = KEY_METRICS.get(scenario, [])
    tidings = next((r for r in reports if r["target"] == "tidings" and r["status"] == "ok"), None)
    lines = [f"# tidings bench {scenario}: comparison", ""]
    if reports:
        lines += _header_md(reports[0])
        lines.append("- Parameters: " + ", ".join(f"{k}={v}" for k, v in reports[0]["params"].items()))
    lines += ["", "| server | " + " | ".join(k[1] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    rows = []
    for r in reports:
        if r["status"] != "ok":
            cells = [r["status"].split(":")[0]] * len(keys)
        else:
            cells = [_fmt(get_path(r["metrics"], k[0])) for k in keys]
        lines.append(f"| {r['target']} | " + " | ".join(cells) + " |")
        rows.append(
            {
                "target": r["target"],
                "status": r["status"],
                "metrics": {k[0]: get_path(r.get("metrics", {}), k[0]) for k in keys},
            }
        )
    if tidings is not None and len(reports) > 1:
        lines += [
            "",
            "Ratios: Tidings ÷ reference (below 1 means Tidings uses less / is faster).",
            "",
            "| reference | " + " | ".join(k[1] for k in keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for r in reports:
            if r["target"] == "tidings":
                continue
            cells = []
            for path, _label, _better in keys:
                a = get_path(tidings["metrics"], path)
                b = get_path(r.get("metrics", {}), path) if r["status"] == "ok" else None
                ok = isinstance(a, int | float) and isinstance(b, int | float) and b
                cells.append(f"{a / b:.2f}×" if ok else "n/a")
            lines.append(f"| {r['target']} | " + " | ".join(cells) + " |")
    summary = out_dir / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps({"scenario": scenario, "rows": rows}, indent=2) + "\n")
    return summary
