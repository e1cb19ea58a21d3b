"""The bench scenarios. Each is an ``async`` function of a :class:`Run` returning an :class:`Outcome`.

Latency timestamps: senders put ``time.time_ns()`` into the payload; receivers on the same host
subtract it from their own ``time.time_ns()`` (one clock for every process of the machine).
Server cost comes from ``/proc/PID``: ``VmRSS`` for memory, ``utime + stime`` for CPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import secrets
import signal
import time
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

from .nginx import pids_of_tree
from .pool import Pool
from .procstat import cpu_seconds, fd_count, redis_info, redis_pid, rss_kb
from .progress import Progress
from .publishers import ORDERS_TABLE, SOURCES, PublishRecord, SourceOptions, UpdateSource, WsPublisher
from .stats import percentile, summarize_ms
from .targets import ServerHandle, Target
from .wire import make_dialect
from .worker import RECOVERY_NO_FLAG, RECOVERY_NOT_ASKED

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
    replay_limit: int = 25
    recover_timeout: float = 60.0
    in_flight: int = 0  # connect: burst mode, this many attempts at a time instead of --rate
    private: bool = False  # connect: join private channels (authorization on every join)
    distinct_claims: bool = False  # connect: each join with a token of its own (no shared cache)


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
        self.port = server.client_port
        # Where updates are sent: another node of a cluster target, else the same server.
        self.pub_port = server.pub_port

    def rss_kb(self) -> int:
        """Server RSS now."""
        return rss_kb(self.server.measured_pid)

    def cpu(self) -> float:
        """Server CPU seconds so far."""
        return cpu_seconds(self.server.measured_pid)

    async def open(
        self,
        clients: list[tuple[int, str]],
        rate: float,
        presence: bool = False,
        changes_table: str | None = None,
        track_seq: bool = False,
        in_flight: int = 0,
        private: bool = False,
        distinct_claims: bool = False,
    ) -> dict[str, Any]:
        """Open ``clients`` at ``rate``/s across the workers (open loop); merged results.

        ``in_flight`` > 0: closed loop instead, that many attempts at a time (split across the
        workers), each ended attempt starting the next.
        """
        w = self.pool.size
        shares: list[list[tuple[int, str]]] = [[] for _ in range(w)]
        for c in clients:
            shares[c[0] % w].append(c)
        t0 = time.time() + 0.3
        opening = len(clients) / rate if in_flight <= 0 else len(clients) / 500  # >= 500/s in a burst
        timeout = opening + self.params.connect_timeout + 10
        args = [
            {
                "clients": s,
                "rate": rate / w,
                "t0": t0,
                "timeout": timeout,
                "presence": presence,
                "changes_table": changes_table,
                "track_seq": track_seq,
                "in_flight": in_flight // w + (1 if k < in_flight % w else 0) if in_flight > 0 else 0,
                "private": private,
                "distinct_claims": distinct_claims,
            }
            for k, s in enumerate(shares)
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
    against: str = "tidings"  # default --against


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
    """N connections opened at rate R (or ``--in-flight`` at a time): connect+upgrade+join
    latency and errors."""
    p = run.params
    clients = [(i, f"{TOPIC}connect-{i % p.channels}") for i in range(p.n)]
    cpu0 = run.cpu()
    run.progress.set_phase("connecting")
    opened = await run.open(
        clients, p.rate, in_flight=p.in_flight, private=p.private, distinct_claims=p.distinct_claims
    )
    cpu1 = run.cpu()
    metrics = _connect_metrics(run, opened, p.n)
    metrics.update(
        offered_rate_per_s=p.rate if p.in_flight <= 0 else None,
        in_flight=p.in_flight or None,
        server_cpu_s=round(cpu1 - cpu0, 3),
        server_cpu_us_per_connection=round((cpu1 - cpu0) * 1e6 / max(1, opened["joined"]), 1),
        server_rss_kb=run.rss_kb(),
    )
    if p.private:
        metrics["authorization"] = "database (row level security)" if p.database_url else "CHANNEL_POLICY"
        metrics["distinct_claims"] = p.distinct_claims
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
        server_fds=fd_count(run.server.measured_pid),
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


class SteadyPublisher:
    """Updates round-robin over ``channels`` at ``rate``/s (absolute schedule) until stopped."""

    def __init__(self, source: UpdateSource, channels: list[str], rate: float, size: int) -> None:
        self.source = source
        self.channels = channels
        self.rate = rate
        self.size = size
        self.records: list[PublishRecord] = []
        self.counters: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin sending (in a task)."""
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop and wait for the requests in flight."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start, k = loop.time(), 0
        pending: set[asyncio.Task[PublishRecord]] = set()

        def done(task: asyncio.Task[PublishRecord]) -> None:
            pending.discard(task)
            self.records.append(task.result())

        while not self._stop.is_set():
            ch = self.channels[k % len(self.channels)]
            n = self.counters[ch] = self.counters.get(ch, 0) + 1
            task = asyncio.ensure_future(self.source.send(ch, n, self.size))
            pending.add(task)
            task.add_done_callback(done)
            k += 1
            await asyncio.sleep(max(0.0, start + k / self.rate - loop.time()))
        if pending:
            await asyncio.gather(*pending)


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


def _pcts_s(values: list[int], complete: bool) -> dict[str, float | None]:
    """p50/p99/100% in seconds of sorted ns values (100% only when nobody is missing)."""
    if not values:
        return {"p50": None, "p99": None, "100%": None}
    return {
        "p50": round(percentile(values, 50) / 1e9, 3),
        "p99": round(percentile(values, 99) / 1e9, 3),
        "100%": round(values[-1] / 1e9, 3) if complete else None,
    }


def _redis_connections(url: str | None) -> int | None:
    """Connections Redis has accepted so far (``total_connections_received``)."""
    raw = redis_info(url, "stats").get("total_connections_received") if url else None
    return int(raw) if raw and raw.isdigit() else None


def _cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


async def scenario_node_death(run: Run) -> Outcome:
    """N clients through nginx on one of two nodes (one Redis); that node is SIGKILLed.

    Updates flow over REST to the other node (straight, not through nginx) before, during and
    after. Clients reconnect with backoff; nginx sends them to the survivor, where they rejoin with
    ``replay: {since_seq: <last meta.seq seen>, limit}``. Per client: kill -> rejoined, kill ->
    recovered (rejoined and holding every update accepted before its rejoin), recovered minus its
    own backoff delay; lost updates; replies that said ``recovered: false``.
    """
    p = run.params
    server = run.server
    victim, survivor, front = server.routed, server.other, server.front
    if victim is None or survivor is None or front is None:
        raise RuntimeError("node-death needs a target with two nodes behind nginx (tidings-nginx)")
    channels = max(1, p.channels)
    # Fresh channel names per run: a Redis shared between runs keeps older runs' history.
    tag = secrets.token_hex(3)
    names = [f"death-{tag}-{c}" for c in range(channels)]
    run.progress.set_phase("connecting")
    opened = await run.open(
        [(i, TOPIC + names[i % channels]) for i in range(p.n)], p.connect_rate, track_seq=True
    )
    joined = int(opened["joined"])
    on_victim = victim.health().get("connections")
    on_survivor = survivor.health().get("connections")
    await run.pool.call(
        "reconnect",
        {"enabled": True, "base": p.backoff, "cap": p.backoff_cap, "replay_limit": p.replay_limit},
    )
    await run.pool.call("record", {"on": True, "track_n": True})
    source = SOURCES["rest"](SourceOptions(run.host, survivor.port))
    await source.start()
    publisher = SteadyPublisher(source, names, p.rate, p.size)
    publisher.start()
    run.progress.set_phase("steady")
    run.progress.extra = lambda: f"updates {len(publisher.records):,}"
    await asyncio.sleep(2.0)

    nginx_pids = pids_of_tree(front.pid)
    rpid = redis_pid(p.redis_url) if p.redis_url else None
    gen_pids = [os.getpid(), *(proc.pid for proc in run.pool.procs)]
    cpu0 = {
        "survivor": cpu_seconds(survivor.pid),
        "nginx": _cpu_of(nginx_pids),
        "redis": cpu_seconds(rpid) if rpid else 0.0,
        "load_generator": _cpu_of(gen_pids),
    }
    redis_conns0 = _redis_connections(p.redis_url)
    base_total = run.pool.totals().get("joined_total", 0)
    run.progress.set_phase("killing")
    t_kill = time.time_ns()
    await asyncio.to_thread(victim.kill, signal.SIGKILL)
    t_dead = time.time_ns()
    run.progress.set_phase("recovering")
    run.progress.extra = lambda: (
        f"rejoined {run.pool.totals().get('joined_total', 0) - base_total:,}/{joined:,}"
    )

    def all_back() -> bool:
        t = run.pool.totals()
        return t.get("joined_total", 0) - base_total >= joined and t.get("joined", 0) >= joined

    back = await run.wait_for(all_back, p.recover_timeout, 0.05)
    t_back = time.time_ns()
    redis_conns1 = _redis_connections(p.redis_url)
    cpu1 = {
        "survivor": cpu_seconds(survivor.pid),
        "nginx": _cpu_of(nginx_pids),
        "redis": cpu_seconds(rpid) if rpid else 0.0,
        "load_generator": _cpu_of(gen_pids),
    }
    run.progress.set_phase("after")
    await asyncio.sleep(2.0)
    await publisher.stop()
    await source.close()
    run.progress.set_phase("draining")
    await asyncio.sleep(1.5)
    await run.pool.call("record", {"on": False})
    await run.pool.call("reconnect", {"enabled": False})
    on_survivor_after = survivor.health().get("connections")
    errors_before: dict[str, int] = dict(opened["errors"])
    nginx_errors = front.error_counts()
    nginx_samples = front.error_samples()
    results = await run.collect()

    by_channel: dict[str, list[PublishRecord]] = {}
    for rec in publisher.records:
        if rec.accepted:
            by_channel.setdefault(rec.channel, []).append(rec)
    rejoin: list[int] = []
    recovered: list[int] = []
    after_backoff: list[int] = []
    after_attempt: list[int] = []
    close_seen: list[int] = []
    delays: list[int] = []
    tries: list[int] = []
    not_rejoined = not_recovered = incomplete = no_flag = not_asked = 0
    lost = missing_at_rejoin = ended_disconnected = 0
    replayed = dups = delivered = 0
    lost_examples: list[str] = []
    incomplete_examples: list[str] = []
    false_alarms = 0
    sent_ns: array[int] = array("q")
    lat_ns: array[int] = array("q")
    reconnect_errors: dict[str, int] = {}
    for r in results:
        for kind, count in r["errors"].items():
            reconnect_errors[kind] = reconnect_errors.get(kind, 0) + count
        sent_ns.extend(r["rec_sent"])
        lat_ns.extend(r["rec_lat"])
        replayed += r["replayed"]
        dups += r["dups"]
        for idx, sessions in r["sessions"].items():
            ch = names[idx % channels]
            recs = by_channel.get(ch, [])
            ns, ts = r["first_rx"].get(idx, ([], []))
            rx = dict(zip(ns, ts, strict=True))
            delivered += len(rx)
            before = [s for s in sessions if s[0] <= t_kill]
            after = [s for s in sessions if s[0] > t_kill]
            if before and before[-1][1]:
                close_seen.append(before[-1][1] - t_kill)
            if sessions[-1][1]:
                ended_disconnected += 1
            else:
                missing = {x.n for x in recs} - rx.keys()
                lost += len(missing)
                if missing and len(lost_examples) < 5:
                    lost_examples.append(f"{ch} client {idx}: n={sorted(missing)[:10]}")
            if not after:
                not_rejoined += 1
                continue
            t_rj = after[0][0]
            rejoin.append(t_rj - t_kill)
            joins = [j for j in r["join_log"].get(idx, []) if j[0] > t_kill]
            flags = [j[1] for j in joins]
            if flags:
                if flags[0] == 0:
                    incomplete += 1
                    if len(incomplete_examples) < 5:
                        _, _, since, reply_seq = joins[0]
                        got = sorted(n for n, t in rx.items() if t >= joins[0][0])[:5]
                        incomplete_examples.append(
                            f"{ch} client {idx}: since_seq={since}, reply seq={reply_seq}, "
                            f"accepted before rejoin={sum(1 for x in recs if x.end <= t_rj)}, "
                            f"received before kill={sum(1 for t in rx.values() if t < t_kill)}, "
                            f"first n after rejoin={got}"
                        )
                elif flags[0] == RECOVERY_NO_FLAG:
                    no_flag += 1
                elif flags[0] == RECOVERY_NOT_ASKED:
                    not_asked += 1
            starts = [a for a in r["attempt_starts"].get(idx, []) if a >= t_kill]
            tries.append(len(starts))
            own = next((d for ts_, d in r["retry_delays"].get(idx, []) if ts_ >= t_kill), None)
            if own is not None:
                delays.append(int(own * 1e9))
            need = [x.n for x in recs if x.end <= t_rj]
            if any(n not in rx for n in need):
                not_recovered += 1
                missing_at_rejoin += sum(1 for n in need if n not in rx)
                continue
            if flags and flags[0] == 0:
                false_alarms += 1  # said incomplete, yet nothing accepted before the rejoin is missing
            t_rec = max([t_rj, *(rx[n] for n in need)])
            recovered.append(t_rec - t_kill)
            if own is not None:
                after_backoff.append(t_rec - t_kill - int(own * 1e9))
            if starts:
                after_attempt.append(t_rec - starts[0])
    rejoin.sort()
    recovered.sort()
    clients = joined
    cpu = {k: round(cpu1[k] - cpu0[k], 3) for k in cpu0}
    window = (t_back - t_kill) / 1e9
    accepted = sum(len(v) for v in by_channel.values())
    while_down = sum(1 for v in by_channel.values() for x in v if t_kill <= x.end <= t_back)
    metrics: dict[str, Any] = {
        "clients": clients,
        "connect_failed": p.n - joined,
        "connect_errors": opened["errors"],
        "channels": channels,
        "rate_per_s": p.rate,
        "replay_limit": p.replay_limit,
        "backoff_base_s": p.backoff,
        "victim": f"node on port {victim.port} (nginx ip_hash route of 127.0.0.0/24)",
        "connections_before_kill": {"victim": on_victim, "survivor": on_survivor},
        "survivor_connections_after": on_survivor_after,
        "kill_to_exit_ms": round((t_dead - t_kill) / 1e6, 1),
        "rejoined": len(rejoin),
        "not_rejoined": not_rejoined,
        "recovered": len(recovered),
        "not_recovered": not_recovered,
        "incomplete_replays": incomplete,
        "incomplete_replays_with_nothing_missing": false_alarms,
        "replies_without_recovered_flag": no_flag,
        "rejoins_without_replay": not_asked,
        "rejoin_since_kill_s": _pcts_s(rejoin, not_rejoined == 0 and len(rejoin) == clients),
        "recovered_since_kill_s": _pcts_s(recovered, len(recovered) == clients),
        "recovered_after_backoff_ms": summarize_ms(after_backoff, (50, 99)),
        "recovered_after_first_attempt_ms": summarize_ms(after_attempt, (50, 99)),
        "close_seen_after_kill_ms": summarize_ms(close_seen, (50, 99)),
        "backoff_delay_ms": summarize_ms(delays, (50,)),
        "reconnect_errors": {
            k: v - errors_before.get(k, 0) for k, v in reconnect_errors.items() if v > errors_before.get(k, 0)
        },
        "attempts_per_client": {
            "mean": round(sum(tries) / len(tries), 2) if tries else None,
            "max": max(tries) if tries else None,
        },
        "all_back_within_timeout": back,
        "updates_sent": len(publisher.records),
        "updates_accepted": accepted,
        "updates_accepted_during_recovery": while_down,
        "delivered": delivered,
        "replayed_received": replayed,
        "duplicates_dropped": dups,
        "missing_at_rejoin": missing_at_rejoin,
        "lost": lost,
        "ended_disconnected": ended_disconnected,
        "delivery_latency_ms": summarize_ms(lat_ns),
        "recovery_window_s": round(window, 3),
        "cpu_during_recovery_s": cpu,
        "survivor_cpu_us_per_rejoin": round(cpu["survivor"] * 1e6 / len(rejoin), 1) if rejoin else None,
        "redis_connections_opened_during_recovery": (
            redis_conns1 - redis_conns0 if redis_conns0 is not None and redis_conns1 is not None else None
        ),
        "nginx_error_log": nginx_errors,
    }
    # With anyone left behind, "max" figures are of a subset: the target check reads this.
    metrics["all_recovered"] = len(recovered) == clients
    notes = [
        "recovered = rejoined and holding every update accepted (HTTP 202) before its rejoin, "
        "received live before the kill, replayed, or live after the rejoin; its time is the later "
        "of the rejoin and the last of those arrivals",
        "recovered_after_backoff = recovered time - kill time - the client's own first backoff delay "
        "(the issue's measure); recovered_after_first_attempt starts at the first reconnect attempt",
        "lost = accepted updates of a client's channel it never received (checked for clients "
        "joined at the end); every update here is inside the history window (HISTORY_SIZE=1000)",
        f"cpu_during_recovery_s covers the kill until all clients were back ({window:.2f} s); nginx "
        "and Redis are not pinned",
    ]
    if nginx_samples:
        notes.append("nginx error log: " + " | ".join(nginx_samples))
    if incomplete_examples:
        notes.append("replies with recovered=false, first cases: " + "; ".join(incomplete_examples))
    if lost_examples:
        notes.append("lost, first cases: " + "; ".join(lost_examples))
    curve = [(x / 1e9, (i + 1) / max(1, clients)) for i, x in enumerate(recovered)]
    return Outcome(
        metrics,
        "update delivery (first receipt, live or replayed)",
        sent_ns,
        lat_ns,
        "fraction recovered vs s since the kill",
        curve,
        notes,
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
            "node-death",
            "N clients through nginx on one of two nodes, that node SIGKILLed; rejoin + replay time, losses",
            {"n": 10000, "rate": 100, "channels": 100},
            scenario_node_death,
            "tidings-nginx",
        ),
        Scenario(
            "presence",
            "N members join one channel; time until every member sees the full state",
            {"n": 500, "rate": 500, "channels": 1},
            scenario_presence,
        ),
    )
}
