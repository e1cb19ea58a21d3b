"""``tidings bench SCENARIO [options]``: run a scenario against Tidings and reference servers.

Each run starts its server on a free loopback port (pinned to its own core when the machine has
two or more), spawns the load-generator workers (pinned to the other cores), drives the scenario
with a live progress line, and writes ``<target>.json``, ``<target>.md`` and ``<target>.png`` into
the output folder, plus ``summary.md`` when several targets ran.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..limits import raise_open_files_limit
from .pool import Pool
from .procstat import cpu_seconds, loadavg, machine_info
from .profile import Profiler, summarize_collapsed
from .progress import Progress
from .publishers import BENCH_CHANNEL_POLICY, SOURCES, bench_policy, drop_slot
from .report import check_targets, write_run, write_summary
from .scenarios import SCENARIOS, Outcome, Params, Run
from .targets import TARGETS, ServerHandle, Target, benchmarks_dir, free_port
from .worker import run_loop

__all__ = ["bench", "run_bench", "setup_references"]

HOST = "127.0.0.1"
QUIET_LOAD = 0.5


def setup_references(bench: Path) -> None:
    """Install what the references need: python-socketio and matplotlib (PyPI), ``ws`` (npm)."""
    click.echo("installing python-socketio and matplotlib into this Python environment ...")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "python-socketio>=5.11,<6", "matplotlib>=3.7,<4"],
        check=True,
    )
    node_dir = bench / "node"
    click.echo(f"installing the npm package ws into {node_dir} ...")
    subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=node_dir, check=True)
    click.echo("references ready: " + ", ".join(TARGETS))


def tidings_source() -> dict[str, Any]:
    """Which Tidings code is measured: package path, git commit, uncommitted changes."""
    import tidings

    path = Path(tidings.__file__).resolve().parent
    info: dict[str, Any] = {"path": str(path), "commit": os.environ.get("TIDINGS_BENCH_COMMIT")}
    if info["commit"] is None:
        try:
            head = subprocess.run(
                ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            dirty = subprocess.run(
                ["git", "-C", str(path), "status", "--porcelain", "--", "."],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if head.returncode == 0:
                info["commit"] = head.stdout.strip()
                info["uncommitted_changes"] = bool(dirty.stdout.strip())
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def _cpu_split(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """Server on the first allowed core, load generators on the others (when there are two)."""
    if not pin:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def _wait_quiet(limit: float, progress: Progress) -> None:
    """Wait (at most ``limit`` s) for the 1-minute load average to drop below 0.5."""
    deadline = time.monotonic() + limit
    while loadavg()[0] >= QUIET_LOAD and time.monotonic() < deadline:
        progress.note(f"load average {loadavg()[0]:.2f} >= {QUIET_LOAD}: waiting for a quiet machine")
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))


async def run_target(
    scenario: str,
    target: Target,
    params: Params,
    env: dict[str, str],
    bench: Path,
    quiet: bool,
    profile_dir: Path | None = None,
    profile_native: bool = False,
) -> tuple[dict[str, Any], Outcome | None]:
    """Run ``scenario`` against ``target``; the report and the outcome (``None`` if not run)."""
    progress = Progress(f"{scenario} {target.name}", quiet)
    report: dict[str, Any] = {"scenario": scenario, "target": target.name, "target_doc": target.doc}
    if scenario not in target.scenarios:
        report["status"] = "n/a"
        return report, None
    why = target.unavailable(bench)
    if why is None and target.redis and not params.redis_url:
        why = "needs --redis-url"
    if why is not None:
        report["status"] = f"unavailable: {why}"
        progress.note(report["status"])
        return report, None
    env = dict(env)
    slot = None
    private_db = target.tidings and scenario == "connect" and params.private and bool(params.database_url)
    if private_db or (
        target.tidings and params.source == "postgres" and params.database_url and scenario == "order-status"
    ):
        slot = f"tidings_bench_{os.getpid()}"
        env.update(DATABASE_URL=params.database_url or "", DB_SLOT=slot, DB_RESUME_GRACE="0")
    elif target.tidings and scenario == "connect" and params.private:
        env.setdefault("CHANNEL_POLICY", BENCH_CHANNEL_POLICY)
    if target.redis and params.redis_url:
        env.update(REDIS_URL=params.redis_url)
    server = ServerHandle(target, HOST, free_port(HOST), env, params.server_cpus, bench)
    if target.nginx:
        # Both nodes on the server core: after one dies, the survivor has that core to itself.
        server.peer = ServerHandle(target, HOST, free_port(HOST), env, params.server_cpus, bench)
        server.front_clients = params.n
    elif target.nodes > 1:
        # The second node (where updates enter) runs beside the load generator, not on the server core.
        server.peer = ServerHandle(target, HOST, free_port(HOST), env, params.client_cpus, bench)
    try:
        await asyncio.to_thread(server.start)
        if private_db and params.database_url:
            # Tidings listens before it starts: realtime.messages exists once it answers requests.
            deadline = time.monotonic() + 60
            while not await asyncio.to_thread(server.health):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer /api/health:\n{server.logs()}")
                await asyncio.sleep(0.1)
            await asyncio.to_thread(bench_policy, params.database_url, True)
    except Exception as exc:  # whatever failed, stop what did start (nodes, nginx) before reporting
        await asyncio.to_thread(server.stop)
        report["status"] = f"failed: {exc}" if isinstance(exc, RuntimeError) else f"failed: {exc!r}"
        progress.done(report["status"])
        return report, None
    pool = Pool(
        params.workers,
        HOST,
        server.client_port,
        target.dialect,
        params.vsn,
        params.source_addrs,
        params.client_cpus,
        params.heartbeat,
        params.connect_timeout,
    )
    progress.counters = pool.totals
    pool.on_progress = progress.refresh
    outcome: Outcome | None = None
    try:
        await pool.start()
        run = Run(target, server, pool, params, progress)
        profiler = None
        if profile_dir is not None and target.name != "node-ws":
            # With nginx the node that takes the clients over (the survivor) is the one of interest.
            watched = (
                server.other.pid if server.other is not None and scenario == "node-death" else server.pid
            )
            profiler = Profiler(watched, profile_dir / f"{target.name}-profile.txt", native=profile_native)
        pids = [os.getpid(), *(p.pid for p in pool.procs)]
        gen0, wall0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
        try:
            outcome = await SCENARIOS[scenario].run(run)
            gen = sum(cpu_seconds(p) for p in pids) - gen0
            cores = len(params.client_cpus or os.sched_getaffinity(0))
            busy = 100 * gen / max(1e-9, time.monotonic() - wall0) / cores
            outcome.metrics["load_generator_cpu_percent"] = round(busy, 1)
            if busy > 80:
                outcome.notes.append(
                    f"the load generator used {busy:.0f}% of its cores: it may have limited this run"
                )
        finally:
            written = await asyncio.to_thread(profiler.stop) if profiler is not None else None
        if written is not None:
            report["profile"] = {"file": written.name, **summarize_collapsed(written)}
        await pool.call("close_all")
        report["status"] = "ok"
        report["metrics"] = outcome.metrics
        report["notes"] = outcome.notes
    except Exception as exc:
        report["status"] = f"failed: {type(exc).__name__}: {exc}"
        report["server_log_tail"] = server.logs()
    finally:
        await pool.stop()
        await asyncio.to_thread(server.stop)
        if slot is not None and params.database_url:
            try:
                if private_db:
                    await asyncio.to_thread(bench_policy, params.database_url, False)
                for name in (slot, f"{slot}_messages"):  # Postgres Changes', Broadcast from Database's
                    await asyncio.to_thread(drop_slot, params.database_url, name)
            except Exception as exc:  # the report says so; the run itself is over
                report.setdefault("notes", []).append(f"could not drop replication slot {slot}: {exc}")
    report["server"] = {"pid": server.pid, "cpus": sorted(params.server_cpus or []), "log": server.log.name}
    if server.peer is not None and server.peer.proc is not None:
        report["server"]["peer"] = {"pid": server.peer.pid, "log": server.peer.log.name}
    progress.done(report["status"] if report["status"] != "ok" else "done")
    return report, outcome


async def run_bench(
    scenario: str,
    targets: list[str],
    params: Params,
    env: dict[str, str],
    out_dir: Path,
    bench: Path,
    quiet: bool = False,
    wait_quiet: float = 0.0,
    profile: bool = False,
    profile_native: bool = False,
) -> list[dict[str, Any]]:
    """Run ``scenario`` against each target in turn; write every report and the summary."""
    reports = []
    machine = machine_info()
    source = tidings_source()
    command = "tidings bench " + shlex.join(sys.argv[2:]) if len(sys.argv) > 1 else "tidings bench"
    for name in targets:
        if wait_quiet > 0:
            await asyncio.to_thread(_wait_quiet, wait_quiet, Progress(f"{scenario} {name}", quiet))
        before = loadavg()
        date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        report, outcome = await run_target(
            scenario,
            TARGETS[name],
            params,
            env,
            bench,
            quiet,
            out_dir if profile or profile_native else None,
            profile_native,
        )
        report.update(
            date=date,
            command=command,
            machine=machine,
            tidings_source=source,
            load_average={"before": before, "after": loadavg()},
            params=_params_dict(scenario, params),
            setup=(
                f"server pinned to CPU {sorted(params.server_cpus or [])}, {params.workers} load-generator "
                f"processes pinned to CPU {sorted(params.client_cpus or [])}, source addresses "
                f"{params.source_addrs[0]}–{params.source_addrs[-1]}, vsn {params.vsn}"
            ),
        )
        if report["status"] == "ok" and (name == "tidings" or scenario == "node-death"):
            report["targets"] = check_targets(scenario, report["metrics"], report["params"])
        paths = write_run(out_dir, report, outcome)
        if not quiet:
            click.echo(f"  {name}: {report['status']} -> {paths['md']}", err=True)
        reports.append(report)
    summary = write_summary(out_dir, scenario, reports)
    if not quiet:
        click.echo(summary.read_text())
    return reports


def _params_dict(scenario: str, p: Params) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n": p.n,
        "vsn": p.vsn,
        "workers": p.workers,
        "source_addresses": len(p.source_addrs),
    }
    if scenario == "connect" and p.private:
        out["private"] = "database" if p.database_url else "policy"
        out["distinct_claims"] = p.distinct_claims
    if scenario == "connect" and p.in_flight > 0:
        out["in_flight"] = p.in_flight
    elif scenario in ("connect", "presence"):
        out["rate"] = p.rate
    else:
        out["connect_rate"] = p.connect_rate
    if scenario in ("fanout", "order-status"):
        out.update(rate=p.rate, duration_s=p.duration, payload_bytes=p.size)
    if scenario == "order-status":
        out["source"] = p.source
    if scenario == "reconnect-storm":
        out.update(rate=p.rate, channels=p.channels, restart=p.restart, backoff_ms=p.backoff * 1000)
    if scenario == "node-death":
        out.update(rate=p.rate, channels=p.channels, backoff_ms=p.backoff * 1000, replay_limit=p.replay_limit)
    return out


def _parse_targets(against: str) -> list[str]:
    names = (
        list(TARGETS) if against.strip() == "all" else [a.strip() for a in against.split(",") if a.strip()]
    )
    for n in names:
        if n not in TARGETS:
            raise click.BadParameter(f"unknown target {n!r} (choose from {', '.join(TARGETS)}, all)")
    return names


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("scenario", required=False, type=click.Choice(list(SCENARIOS)))
@click.option(
    "--against",
    default=None,
    help=f"Comma-separated targets: {', '.join(TARGETS)}, or all "
    "(default: tidings; tidings-nginx for node-death).",
)
@click.option("-n", "--connections", "n", type=int, default=None, help="Clients (scenario default if unset).")
@click.option(
    "--rate",
    type=float,
    default=None,
    help="connect/presence: connections/s; fanout: messages/s; order-status/reconnect-storm: updates/s.",
)
@click.option(
    "--connect-rate",
    type=float,
    default=1000,
    show_default=True,
    help="Connections/s while setting up the other scenarios.",
)
@click.option(
    "--duration",
    type=float,
    default=None,
    help="Seconds of sending (fanout, order-status; scenario default).",
)
@click.option("--size", type=int, default=90, show_default=True, help="Bench payload size in bytes.")
@click.option("--channels", type=int, default=None, help="Channels the clients spread over.")
@click.option(
    "--vsn",
    type=click.Choice(["1.0.0", "2.0.0"]),
    default="2.0.0",
    show_default=True,
    help="Phoenix serializer the load generator speaks.",
)
@click.option("--workers", type=int, default=0, help="Load-generator processes (0 = auto).")
@click.option(
    "--source-addrs", type=int, default=0, help="Loopback source addresses 127.0.0.2... (0 = auto)."
)
@click.option(
    "--pin/--no-pin", default=True, show_default=True, help="Pin server and load generator to separate cores."
)
@click.option(
    "--restart",
    type=click.Choice(["term", "kill"]),
    default="term",
    show_default=True,
    help="reconnect-storm: SIGTERM (drain) or SIGKILL.",
)
@click.option(
    "--backoff-ms",
    type=float,
    default=1000,
    show_default=True,
    help="reconnect-storm, node-death: first reconnect delay (doubles, ±25% jitter, capped at 30 s).",
)
@click.option(
    "--replay-limit",
    type=int,
    default=25,
    show_default=True,
    help="node-death: replay.limit a rejoin asks for (the server clamps it to REPLAY_MAX, 100 by default).",
)
@click.option(
    "--source",
    type=click.Choice(list(SOURCES)),
    default="rest",
    show_default=True,
    help="order-status: how updates are sent.",
)
@click.option(
    "--database-url",
    default=None,
    metavar="DSN",
    help="order-status --source postgres: PostgreSQL (wal_level=logical) for the server and the updates; "
    "connect --private: the database whose row level security authorizes the joins.",
)
@click.option(
    "--redis-url",
    default=None,
    metavar="URL",
    help="Redis for the tidings-redis, tidings-cluster and tidings-nginx targets.",
)
@click.option("--server-env", multiple=True, metavar="KEY=VALUE", help="Extra environment for the server.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Report folder (default bench-results/<time>-<scenario>).",
)
@click.option(
    "--wait-quiet",
    type=float,
    default=0,
    show_default=True,
    help="Wait up to this many seconds for load average < 0.5 before each target.",
)
@click.option(
    "--in-flight",
    type=int,
    default=0,
    show_default=True,
    help="connect: burst mode, this many connection attempts at a time (closed loop; "
    "--rate is ignored). 0 = open loop at --rate.",
)
@click.option(
    "--private",
    is_flag=True,
    help="connect: join private channels, so every join is authorized: by a CHANNEL_POLICY the "
    "server is given, or with --database-url by Supabase's row level security check (a policy "
    "on realtime.messages is created for the run and dropped after).",
)
@click.option(
    "--distinct-claims",
    is_flag=True,
    help="connect: each client joins with a token of its own (sub bench-<n>), so no two joins share "
    "a cached permission check.",
)
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--profile", is_flag=True, help="Sample the (Python) server with py-spy during the run.")
@click.option(
    "--profile-native",
    is_flag=True,
    help="As --profile, pausing the server for each sample and with C frames (uvloop, system "
    "calls, the garbage collector): exact stacks, a slower server.",
)
@click.option(
    "--setup", is_flag=True, help="Install the references (python-socketio, matplotlib, npm ws) and exit."
)
@click.option("--list", "list_", is_flag=True, help="List scenarios and targets and exit.")
def bench(
    scenario: str | None,
    against: str | None,
    n: int | None,
    rate: float | None,
    connect_rate: float,
    duration: float | None,
    size: int,
    channels: int | None,
    vsn: str,
    workers: int,
    source_addrs: int,
    pin: bool,
    restart: str,
    backoff_ms: float,
    replay_limit: int,
    source: str,
    database_url: str | None,
    redis_url: str | None,
    server_env: tuple[str, ...],
    out_dir: Path | None,
    wait_quiet: float,
    in_flight: int,
    private: bool,
    distinct_claims: bool,
    quiet: bool,
    profile: bool,
    profile_native: bool,
    setup: bool,
    list_: bool,
) -> None:
    """Measure a SCENARIO against Tidings and reference servers (loopback only)."""
    bench_dir = benchmarks_dir()
    if setup:
        setup_references(bench_dir)
        return
    if list_ or scenario is None:
        # One width for both tables, so every description starts in the same column.
        width = max(len(name) for name in (*SCENARIOS, *TARGETS)) + 2
        click.echo("Scenarios:")
        for s in SCENARIOS.values():
            click.echo(f"  {s.name:<{width}}{s.doc}")
        click.echo("")
        click.echo("Targets:")
        for t in TARGETS.values():
            why = t.unavailable(bench_dir)
            scen = ", ".join(sorted(t.scenarios))
            click.echo(f"  {t.name:<{width}}{t.doc} [{scen}]" + (f" — {why}" if why else ""))
        if scenario is None and not list_:
            raise click.UsageError("give a SCENARIO (or --list / --setup)")
        return
    spec = SCENARIOS[scenario]
    n = n if n is not None else int(spec.defaults["n"])
    rate = rate if rate is not None else float(spec.defaults["rate"])
    channels = channels if channels is not None else int(spec.defaults["channels"])
    duration = duration if duration is not None else float(spec.defaults.get("duration", 10))
    if replay_limit < 1:
        raise click.BadParameter("--replay-limit must be at least 1")
    if n <= 0 or size < 40 or (rate <= 0 and scenario != "memory"):
        raise click.BadParameter("need -n > 0, --rate > 0 and --size >= 40")
    if n > 60_000:
        raise click.BadParameter("at most 60,000 connections (bounded load)")
    if in_flight < 0 or (in_flight and scenario != "connect"):
        raise click.BadParameter("--in-flight is for the connect scenario, and at least 0")
    if (private or distinct_claims) and scenario != "connect":
        raise click.BadParameter("--private and --distinct-claims are for the connect scenario")
    env: dict[str, str] = {}
    for item in server_env:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"--server-env wants KEY=VALUE, got {item!r}")
        env[key] = value
    if source == "postgres" and scenario == "order-status" and not database_url:
        raise click.BadParameter("--source postgres needs --database-url")
    nofile = raise_open_files_limit()
    workers = workers or max(2, min(8, math.ceil(n / 5000)))
    if math.ceil(n / workers) > nofile - 64:
        raise click.BadParameter(
            f"{math.ceil(n / workers)} connections per worker exceed the open-files limit {nofile}"
        )
    addrs = source_addrs or max(workers, math.ceil(n / 20000))
    if addrs > 250:
        raise click.BadParameter("at most 250 source addresses")
    server_cpus, client_cpus = _cpu_split(pin)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    params = Params(
        n=n,
        rate=rate,
        connect_rate=connect_rate,
        duration=duration,
        size=size,
        channels=max(1, channels),
        vsn=vsn,
        workers=workers,
        source_addrs=[f"127.0.0.{2 + i}" for i in range(addrs)],
        server_cpus=server_cpus,
        client_cpus=client_cpus,
        backoff=backoff_ms / 1000,
        restart=restart,
        replay_limit=replay_limit,
        source=source,
        database_url=database_url,
        db_publication=env.get("DB_PUBLICATION", "supabase_realtime"),
        redis_url=redis_url,
        in_flight=in_flight if scenario == "connect" else 0,
        private=private,
        distinct_claims=distinct_claims,
    )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out_dir or Path("bench-results") / f"{stamp}-{scenario}"
    targets = _parse_targets(against or spec.against)
    if (profile or profile_native) and not Profiler.available():
        raise click.UsageError("--profile needs py-spy (pip install py-spy)")
    run_loop(
        run_bench(scenario, targets, params, env, out, bench_dir, quiet, wait_quiet, profile, profile_native)
    )
    click.echo(f"reports in {out}/", err=True)
