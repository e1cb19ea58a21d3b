"""The bench scenarios. Each is an ``async`` function of a :class:`Run` returning an :class:`Outcome`.

Latency timestamps: senders put ``time.time_ns()`` into the payload; receivers on the same host
subtract it from their own ``time.time_ns()`` (one clock for every process of the machine).
Server cost comes from ``/proc/PID``: ``VmRSS`` for memory, ``utime + stime`` for CPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import time
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

from .pool import Pool
from .procstat import cpu_seconds, fd_count, rss_kb
from .progress import Progress
from .publishers import ORDERS_TABLE, SOURCES, PublishRecord, SourceOptions, UpdateSource, WsPublisher
from .stats import percentile, summarize_ms
from .targets import ServerHandle, Target
from .wire import make_dialect

__all__ = ["SCENARIOS", "Outcome", "Params", "Run", "Scenario"]

TOPIC = "realtime:"  # Phoenix topics; the references accept any string


@dataclasses.dataclass
class Params:
    """Options of one run (see ``tidings bench --help``)."""

    n: int
    rate: float
    connect_rate: float
    duration: float
    size: int
    channels: int
    vsn: str
    workers: int
    source_addrs: list[str]
    server_cpus: set[int] | None
    client_cpus: set[int] | None
    backoff: float = 1.0
    backoff_cap: float = 30.0
    restart: str = "term"
    source: str = "rest"
    heartbeat: float = 25.0
    connect_timeout: float = 10.0
    database_url: str | None = None
    db_publication: str = "supabase_realtime"
    redis_url: str | None = None


@dataclasses.dataclass
class Outcome:
    """What a scenario measured."""

    metrics: dict[str, Any]
    latency_label: str = ""
    sent_ns: array[int] = dataclasses.field(default_factory=lambda: array("q"))
    lat_ns: array[int] = dataclasses.field(default_factory=lambda: array("q"))
    curve_label: str = ""
    curve: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


class Run:
    """One scenario against one started server, with its worker pool."""

    def __init__(
        self, target: Target, server: ServerHandle, pool: Pool, params: Params, progress: Progress
    ) -> None:
        self.target = target
        self.server = server
        self.pool = pool
        self.params = params
        self.progress = progress
        self.host = server.host
        self.port = server.port
        # Where updates are sent: another node of a cluster target, else the same server.
        self.pub_port = server.pub_port

    def rss_kb(self) -> int:
        """Server RSS now."""
        return rss_kb(self.server.pid)

    def cpu(self) -> float:
        """Server CPU seconds so far."""
        return cpu_seconds(self.server.pid)

    async def open(
        self,
        clients: list[tuple[int, str]],
        rate: float,
        presence: bool = False,
        changes_table: str | None = None,
    ) -> dict[str, Any]:
        """Open ``clients`` at ``rate``/s across the workers (open loop); merged results."""
        w = self.pool.size
        shares: list[list[tuple[int, str]]] = [[] for _ in range(w)]
        for c in clients:
            shares[c[0] % w].append(c)
        t0 = time.time() + 0.3
        timeout = len(clients) / rate + self.params.connect_timeout + 10
        args = [
            {
                "clients": s,
                "rate": rate / w,
                "t0": t0,
                "timeout": timeout,
                "presence": presence,
                "changes_table": changes_table,
            }
            for s in shares
        ]
        results = await self.pool.call("open", args)
        lat: array[int] = array("q")
        start: array[int] = array("q")
        errors: dict[str, int] = {}
        for r in results:
            lat.extend(r["join_lat_ns"])
            start.extend(r["join_start_ns"])
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        return {"lat": lat, "start": start, "errors": errors, "t0": t0, "joined": len(lat)}

    async def collect(self) -> list[dict[str, Any]]:
        """Everything the workers recorded."""
        return await self.pool.call("collect")

    async def wait_for(self, cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
        """Poll ``cond`` until true or ``timeout``; refreshes the display."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            self.progress.refresh()
            await asyncio.sleep(step)
        return cond()


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A named scenario, its defaults and its function."""

    name: str
    doc: str
    defaults: dict[str, float]
    run: Callable[[Run], Awaitable[Outcome]]


def _connect_metrics(run: Run, opened: dict[str, Any], n: int) -> dict[str, Any]:
    ends = [s + lat for s, lat in zip(opened["start"], opened["lat"], strict=True)]
    span = (max(ends) - min(opened["start"])) / 1e9 if ends else 0.0
    return {
        "attempted": n,
        "joined": opened["joined"],
        "failed": n - opened["joined"],
        "errors": opened["errors"],
        "join_latency_ms": summarize_ms(opened["lat"]),
        "achieved_rate_per_s": round(opened["joined"] / span, 1) if span > 0 else None,
    }


async def scenario_connect(run: Run) -> Outcome:
    """N connections opened at rate R: connect+upgrade+join latency and errors."""
    p = run.params
    clients = [(i, f"{TOPIC}connect-{i % p.channels}") for i in range(p.n)]
    cpu0 = run.cpu()
    run.progress.set_phase("connecting")
    opened = await run.open(clients, p.rate)
    cpu1 = run.cpu()
    metrics = _connect_metrics(run, opened, p.n)
    metrics.update(
        offered_rate_per_s=p.rate,
        server_cpu_s=round(cpu1 - cpu0, 3),
        server_cpu_us_per_connection=round((cpu1 - cpu0) * 1e6 / max(1, opened["joined"]), 1),
        server_rss_kb=run.rss_kb(),
    )
    rel = [s - opened["start"][0] for s in opened["start"]] if opened["start"] else []
    return Outcome(
        metrics, "connect + upgrade + join", array("q", [opened["start"][0] + r for r in rel]), opened["lat"]
    )


async def scenario_memory(run: Run) -> Outcome:
    """Server RSS per idle connection joined to one channel."""
    p = run.params
    await asyncio.sleep(1.0)
    before = run.rss_kb()
    run.progress.set_phase("connecting")
    opened = await run.open([(i, f"{TOPIC}memory-{i % p.channels}") for i in range(p.n)], p.connect_rate)
    run.progress.set_phase("settling")
    await asyncio.sleep(2.0)
    after = run.rss_kb()
    joined = opened["joined"]
    metrics = _connect_metrics(run, opened, p.n)
    metrics.update(
        rss_before_kb=before,
        rss_after_kb=after,
        bytes_per_connection=round((after - before) * 1024 / joined) if joined else None,
        server_fds=fd_count(run.server.pid),
    )
    return Outcome(metrics, "connect + upgrade + join", opened["start"], opened["lat"])


async def _publish_paced(rate: float, count: int, send: Callable[[int], None]) -> float:
    """Call ``send(k)`` ``count`` times at ``rate``/s on an absolute schedule; returns the start."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for k in range(count):
        delay = start + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        send(k)
    return start


async def scenario_fanout(run: Run) -> Outcome:
    """N subscribers on one channel, R broadcasts/s: delivery latency, losses, CPU per delivery."""
    p = run.params
    topic = f"{TOPIC}fanout"
    run.progress.set_phase("connecting")
    opened = await run.open([(i, topic) for i in range(p.n)], p.connect_rate)
    joined = opened["joined"]
    pub = WsPublisher(make_dialect(run.target.dialect, p.vsn), run.host, run.pub_port, topic)
    await pub.connect()
    await asyncio.sleep(1.0)
    await run.pool.call("record", {"on": True})
    count = max(1, int(p.rate * p.duration))
    expected = count * joined
    run.progress.set_phase("publishing")
    run.progress.extra = lambda: f"sent {pub.sent:,}/{count:,}"
    cpu0, t0 = run.cpu(), time.monotonic()
    await _publish_paced(p.rate, count, lambda k: pub.publish(p.size))
    run.progress.set_phase("draining")
    # Slow servers get time to finish (about 200 µs a delivery), within a bound.
    drain = min(120.0, 10.0 + expected * 200e-6)
    complete = await run.wait_for(lambda: run.pool.totals().get("received", 0) >= expected, drain)
    cpu1, t1 = run.cpu(), time.monotonic()
    await run.pool.call("record", {"on": False})
    pub.close()
    results = await run.collect()
    sent_ns: array[int] = array("q")
    lat_ns: array[int] = array("q")
    lost = 0
    for r in results:
        sent_ns.extend(r["rec_sent"])
        lat_ns.extend(r["rec_lat"])
        per = r["per_client"]
        lost += sum(max(0, count - per.get(idx, 0)) for idx in r["joined_clients"])
    delivered = len(lat_ns)
    cpu = cpu1 - cpu0
    metrics = {
        "subscribers": joined,
        "connect_failed": p.n - joined,
        "messages_sent": count,
        "rate_per_s": p.rate,
        "payload_bytes": p.size,
        "expected_deliveries": expected,
        "delivered": delivered,
        "lost": lost,
        "all_delivered": complete,
        "delivery_latency_ms": summarize_ms(lat_ns),
        "window_s": round(t1 - t0, 2),
        "deliveries_per_s": round(delivered / (t1 - t0), 1),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_delivery": round(cpu * 1e6 / delivered, 2) if delivered else None,
        "server_rss_kb": run.rss_kb(),
    }
    return Outcome(metrics, "broadcast delivery", sent_ns, lat_ns)


async def _run_source(
    source: UpdateSource, rate: float, count: int, channel_of: Callable[[int], str], size: int
) -> list[PublishRecord]:
    """Send ``count`` updates at ``rate``/s (open loop); every record once all are done."""
    counters: dict[str, int] = {}
    tasks: list[asyncio.Task[PublishRecord]] = []

    def send(k: int) -> None:
        ch = channel_of(k)
        n = counters[ch] = counters.get(ch, 0) + 1
        tasks.append(asyncio.ensure_future(source.send(ch, n, size)))

    await _publish_paced(rate, count, send)
    return list(await asyncio.gather(*tasks))


async def scenario_order_status(run: Run) -> Outcome:
    """N clients on their own channels; R updates/s through an update source (REST by default).

    With ``--source postgres`` client ``i`` also binds to Postgres Changes of ``orders`` row
    ``id = i`` and each update is a SQL ``UPDATE`` of that row.
    """
    p = run.params
    pg = p.source == "postgres"
    opts = SourceOptions(run.host, run.pub_port, p.database_url, p.n, p.db_publication)
    source = SOURCES[p.source](opts)
    run.progress.set_phase("preparing")
    await source.start()  # the table must exist before clients bind to it
    run.progress.set_phase("connecting")
    opened = await run.open(
        [(i, f"{TOPIC}order-{i}") for i in range(p.n)],
        p.connect_rate,
        changes_table=ORDERS_TABLE if pg else None,
    )
    joined = opened["joined"]
    subscribed = None
    if pg:
        run.progress.set_phase("subscribing")
        await run.wait_for(lambda: run.pool.totals().get("pg_subscribed", 0) >= joined, 60.0, 0.1)
        subscribed = run.pool.totals().get("pg_subscribed", 0)
    await asyncio.sleep(1.0)
    await run.pool.call("record", {"on": True})
    count = max(1, int(p.rate * p.duration))
    order = list(range(p.n))
    random.Random(1).shuffle(order)
    run.progress.set_phase("updating")
    cpu0, t0 = run.cpu(), time.monotonic()
    records = await _run_source(source, p.rate, count, lambda k: f"order-{order[k % p.n]}", p.size)
    t_sent = time.monotonic()
    accepted = sum(1 for r in records if r.accepted)
    run.progress.set_phase("draining")
    complete = await run.wait_for(lambda: run.pool.totals().get("received", 0) >= accepted, 10.0)
    cpu1, t1 = run.cpu(), time.monotonic()
    await run.pool.call("record", {"on": False})
    await source.close()
    results = await run.collect()
    sent_ns: array[int] = array("q")
    lat_ns: array[int] = array("q")
    for r in results:
        sent_ns.extend(r["rec_sent"])
        lat_ns.extend(r["rec_lat"])
    req = [r.end - r.start for r in records]
    metrics = {
        "clients": joined,
        "connect_failed": p.n - joined,
        "source": p.source,
        "updates_sent": count,
        "updates_accepted": accepted,
        "rate_per_s": p.rate,
        "delivered": len(lat_ns),
        "lost": max(0, accepted - len(lat_ns)),
        "all_delivered": complete,
        "end_to_end_latency_ms": summarize_ms(lat_ns),
        "request_latency_ms": summarize_ms(req),
        "achieved_rate_per_s": round(count / max(1e-9, t_sent - t0), 1),
        "server_cpu_s": round(cpu1 - cpu0, 3),
        "server_cpu_us_per_update": round((cpu1 - cpu0) * 1e6 / max(1, accepted), 1),
        "window_s": round(t1 - t0, 2),
    }
    notes: list[str] = []
    if pg:
        metrics["pg_subscribed"] = subscribed
        metrics["pg_subscribe_errors"] = run.pool.totals().get("pg_errors", 0)
        notes.append(
            "latency: from time.time_ns() taken right before the UPDATE statement (autocommit) to "
            "the postgres_changes push at the client; request = due time to commit acknowledged"
        )
    return Outcome(metrics, "update end to end", sent_ns, lat_ns, notes=notes)


async def scenario_reconnect_storm(run: Run) -> Outcome:
    """N joined clients; the server restarts; time until they are back, and messages lost."""
    p = run.params
    channels = max(1, p.channels)
    run.progress.set_phase("connecting")
    opened = await run.open([(i, f"{TOPIC}storm-{i % channels}") for i in range(p.n)], p.connect_rate)
    await run.pool.call("reconnect", {"enabled": True, "base": p.backoff, "cap": p.backoff_cap})
    await run.pool.call("record", {"on": True, "track_n": True})
    source = SOURCES["rest"](SourceOptions(run.host, run.pub_port))
    await source.start()
    records: list[PublishRecord] = []
    stop = asyncio.Event()
    counters: dict[str, int] = {}

    async def publisher() -> None:
        loop = asyncio.get_running_loop()
        start, k = loop.time(), 0
        pending: set[asyncio.Task[PublishRecord]] = set()

        def done(task: asyncio.Task[PublishRecord]) -> None:
            pending.discard(task)
            records.append(task.result())

        while not stop.is_set():
            ch = f"storm-{k % channels}"
            n = counters[ch] = counters.get(ch, 0) + 1
            task = asyncio.ensure_future(source.send(ch, n, p.size))
            pending.add(task)
            task.add_done_callback(done)
            k += 1
            await asyncio.sleep(max(0.0, start + k / p.rate - loop.time()))
        if pending:
            await asyncio.gather(*pending)

    # References have no REST API: they rejoin without updates flowing (no loss figures).
    pub_task = asyncio.ensure_future(publisher() if run.target.rest else stop.wait())
    run.progress.set_phase("steady")
    await asyncio.sleep(2.0)
    run.progress.set_phase("restarting")
    sig = signal.SIGKILL if p.restart == "kill" else signal.SIGTERM
    t_signal = time.time_ns()
    await asyncio.to_thread(run.server.stop, sig)
    t_down = time.time_ns()
    t_ready = int(await asyncio.to_thread(run.server.start) * 1e9)
    run.progress.set_phase("rejoining")
    await run.wait_for(lambda: run.pool.totals().get("joined", 0) >= opened["joined"], 60.0, 0.1)
    await asyncio.sleep(2.0)
    stop.set()
    await pub_task
    await source.close()
    run.progress.set_phase("draining")
    await asyncio.sleep(1.5)
    await run.pool.call("record", {"on": False})
    await run.pool.call("reconnect", {"enabled": False})
    results = await run.collect()
    by_channel: dict[str, list[PublishRecord]] = {}
    for rec in records:
        if rec.accepted:
            by_channel.setdefault(rec.channel, []).append(rec)
    rejoin: list[int] = []
    excess: list[int] = []
    waited: list[int] = []
    tries: list[int] = []
    lost = missed = received = 0
    sent_ns: array[int] = array("q")
    lat_ns: array[int] = array("q")
    for r in results:
        sent_ns.extend(r["rec_sent"])
        lat_ns.extend(r["rec_lat"])
        for idx, sessions in r["sessions"].items():
            after = [s for s in sessions if s[0] > t_signal]
            if after:
                joined_at = after[0][0]
                rejoin.append(joined_at - t_ready)
                starts = [a for a in r["attempt_starts"].get(idx, []) if a >= t_signal]
                tries.append(len(starts))
                first_after_ready = next((a for a in starts if a >= t_ready), joined_at)
                waited.append(first_after_ready - t_ready)
                excess.append(max(0, joined_at - first_after_ready))
            recs = by_channel.get(f"storm-{idx % channels}", [])
            got_any: set[int] = set()
            for joined_at, closed_at, ns in sessions:
                got = set(ns)
                got_any |= got
                received += len(ns)
                if closed_at:
                    # An ended session: only gaps before its last message are certain losses.
                    top = max(got) if got else 0
                    exp = {x.n for x in recs if x.start >= joined_at and x.end <= closed_at and x.n <= top}
                else:
                    exp = {x.n for x in recs if x.start >= joined_at}
                lost += len(exp - got)
            missed += len({x.n for x in recs} - got_any)
    n_clients = opened["joined"]
    rejoin.sort()

    def pct(q: float) -> float | None:
        if len(rejoin) < n_clients or not rejoin:
            return None
        return round(percentile(rejoin, q) / 1e9, 3)

    missing = n_clients - len(rejoin)
    metrics = {
        "clients": n_clients,
        "channels": channels,
        "restart": p.restart,
        "backoff_base_s": p.backoff,
        "server_down_s": round((t_ready - t_signal) / 1e9, 3),
        "server_stop_s": round((t_down - t_signal) / 1e9, 3),
        "rejoined": len(rejoin),
        "not_rejoined": missing,
        "rejoin_since_ready_s": {
            "p50": round(percentile(rejoin, 50) / 1e9, 3) if rejoin else None,
            "p99": round(percentile(rejoin, 99) / 1e9, 3) if rejoin else None,
            "100%": pct(100),
        },
        "rejoin_since_signal_s": {
            "p50": round((percentile(rejoin, 50) + t_ready - t_signal) / 1e9, 3) if rejoin else None,
            "p99": round((percentile(rejoin, 99) + t_ready - t_signal) / 1e9, 3) if rejoin else None,
            "100%": round((rejoin[-1] + t_ready - t_signal) / 1e9, 3) if rejoin and not missing else None,
        },
        "backoff_wait_after_ready_ms": summarize_ms(waited, (50, 99)),
        "rejoin_after_backoff_ms": summarize_ms(excess, (50, 99)),
        "attempts_per_client": {
            "mean": round(sum(tries) / len(tries), 2) if tries else None,
            "max": max(tries) if tries else None,
        },
        "updates_sent": len(records),
        "updates_accepted": sum(len(v) for v in by_channel.values()),
        "delivered": received,
        "lost": lost if run.target.rest else None,
        "missed_while_disconnected": missed if run.target.rest else None,
        "delivery_latency_ms": summarize_ms(lat_ns),
    }
    curve = [(x / 1e9, (i + 1) / max(1, n_clients)) for i, x in enumerate(rejoin)]
    notes = [
        "lost = accepted updates a client should have received while joined (sent after its join "
        "and, for an ended session, before its last received update) but did not",
        "missed_while_disconnected = accepted updates a client never saw because it was not joined; "
        "history is in memory, so a restart cannot replay them",
    ]
    return Outcome(
        metrics, "update delivery", sent_ns, lat_ns, "fraction rejoined vs s since server ready", curve, notes
    )


async def scenario_presence(run: Run) -> Outcome:
    """N members join one channel and track; time until every member sees all N."""
    p = run.params
    await run.pool.call("presence_expect", {"n": p.n})
    run.progress.set_phase("joining")
    run.progress.extra = lambda: f"full {run.pool.totals().get('presence_full', 0):,}/{p.n:,}"
    topic = f"{TOPIC}presence"
    opened = await run.open([(i, topic) for i in range(p.n)], p.rate, presence=True)
    run.progress.set_phase("syncing")
    done = await run.wait_for(
        lambda: run.pool.totals().get("presence_full", 0) >= opened["joined"], 60.0, 0.1
    )
    results = await run.collect()
    full: list[int] = []
    for r in results:
        full.extend(r["presence_full"].values())
    start = int(opened["t0"] * 1e9)
    last_join = max((s + lat for s, lat in zip(opened["start"], opened["lat"], strict=True)), default=start)
    rel = sorted(f - start for f in full)
    metrics = _connect_metrics(run, opened, p.n)
    metrics.update(
        members=opened["joined"],
        saw_full_state=len(full),
        all_synced=done and len(full) >= opened["joined"],
        all_full_since_first_join_s=round(rel[-1] / 1e9, 3) if rel else None,
        all_full_since_last_join_s=round((max(full) - last_join) / 1e9, 3) if full else None,
        full_state_since_first_join_s={
            "p50": round(percentile(rel, 50) / 1e9, 3) if rel else None,
            "p99": round(percentile(rel, 99) / 1e9, 3) if rel else None,
        },
        server_rss_kb=run.rss_kb(),
    )
    curve = [(x / 1e9, (i + 1) / max(1, p.n)) for i, x in enumerate(rel)]
    return Outcome(
        metrics,
        "connect + upgrade + join",
        opened["start"],
        opened["lat"],
        "fraction of members with the full state vs s since the first join",
        curve,
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "connect",
            "N connections opened at rate R; connect+join latency, errors",
            {"n": 1000, "rate": 1000, "channels": 1},
            scenario_connect,
        ),
        Scenario(
            "memory",
            "server RSS per idle connection joined to one channel",
            {"n": 10000, "rate": 0, "channels": 1},
            scenario_memory,
        ),
        Scenario(
            "fanout",
            "N subscribers on one channel, R messages/s; latency, losses, CPU per delivery",
            {"n": 10000, "rate": 2, "duration": 15, "channels": 1},
            scenario_fanout,
        ),
        Scenario(
            "order-status",
            "N clients on their own channels, R updates/s via REST; end-to-end latency",
            {"n": 10000, "rate": 200, "duration": 10, "channels": 1},
            scenario_order_status,
        ),
        Scenario(
            "reconnect-storm",
            "N clients, server restarted; time until rejoined, messages lost",
            {"n": 10000, "rate": 20, "channels": 100},
            scenario_reconnect_storm,
        ),
        Scenario(
            "presence",
            "N members join one channel; time until every member sees the full state",
            {"n": 500, "rate": 500, "channels": 1},
            scenario_presence,
        ),
    )
}
