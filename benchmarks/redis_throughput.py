"""Broadcasts per second through one Redis, with Tidings' own broker (``tidings.broker.redis``).

``--publishers`` processes each run a :class:`RedisBroker` (one node each) and publish bench
broadcasts over ``--channels`` channels on an absolute schedule, ``--rate`` in total; one or more
``--subscribers`` processes (one node each) subscribe to every channel and time each delivery
from the send time in its payload. Every publish is the broker's real path: one ``EVAL`` of the
publish script (dedup mark, ``INCR``, ``XADD`` with ``MAXLEN``, ``PUBLISH``), pipelined per loop
turn. A rate is sustained when the acks keep up with the schedule and the delivery lag does not
grow from the first half of the run to the second. Prints one JSON object.

    .venv/bin/python benchmarks/redis_throughput.py --redis-url redis://127.0.0.1:6379/0 --rate 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time
from array import array
from multiprocessing.connection import Connection
from typing import Any

from tidings.bench.stats import summarize_ms
from tidings.bench.worker import run_loop
from tidings.broker.base import Envelope
from tidings.broker.redis import RedisBroker


def _key(c: int) -> str:
    return f"tp-{c}"


async def _publisher(
    url: str, idx: int, rate: float, duration: float, channels: int, t0: float
) -> dict[str, Any]:
    broker = RedisBroker(url, prefix="tpbench")
    broker.bind(lambda env: None)
    await broker.start()
    loop = asyncio.get_running_loop()
    ack: array[int] = array("q")
    count = int(rate * duration)
    acked = 0
    rejected = 0  # DUPLICATE or FAILED: not published
    run = os.urandom(4).hex()  # message ids are de-duplicated by Redis: unique per run

    def done_for(start: int) -> Any:
        def done(result: Any) -> None:
            nonlocal acked, rejected
            if isinstance(result, int) and result > 0:
                acked += 1
            else:
                rejected += 1
            ack.append(time.time_ns() - start)

        return done

    await asyncio.sleep(max(0.0, t0 - time.time()))
    base = loop.time()
    k = 0
    while k < count:
        due = int((loop.time() - base) * rate) + 1
        while k < min(due, count):
            now = time.time_ns()
            payload = {"t": now, "n": k, "p": "x" * 60}
            broker.publish(
                _key((k * 7919 + idx) % channels),
                "realtime:tp",
                "bench",
                payload,
                f"{run}-{idx}-{k}",
                done=done_for(now),
            )
            k += 1
        await asyncio.sleep(0.001)
    sent_end = loop.time() - base
    deadline = loop.time() + 15
    while acked + rejected < count and loop.time() < deadline:
        await asyncio.sleep(0.01)
    acked_end = loop.time() - base
    await broker.stop()
    return {
        "sent": count,
        "acked": acked,
        "rejected": rejected,
        "send_s": sent_end,
        "ack_s": acked_end,
        "ack_ns": ack,
    }


async def _subscriber(url: str, channels: int, conn: Connection, duration: float) -> dict[str, Any]:
    broker = RedisBroker(url, prefix="tpbench")
    lat: array[int] = array("q")
    sent: array[int] = array("q")

    def deliver(env: Envelope) -> None:
        if env.kind == Envelope.BROADCAST and isinstance(env.payload, dict):
            t = env.payload["t"]
            sent.append(t)
            lat.append(time.time_ns() - t)

    broker.bind(deliver)
    await broker.start()
    for c in range(channels):
        await broker.subscribe(_key(c))
    conn.send("ready")
    t_stop = conn.recv()  # wall time until which to listen
    await asyncio.sleep(max(0.0, t_stop - time.time()))
    await broker.stop()
    return {"lat_ns": lat, "sent_ns": sent}


def _run_pub(conn: Connection, *args: Any) -> None:
    conn.send(run_loop(_publisher(*args)))


def _run_sub(conn: Connection, url: str, channels: int, duration: float) -> None:
    conn.send(run_loop(_subscriber(url, channels, conn, duration)))


def _redis_cpu(url: str) -> tuple[int, float]:
    """(first pid, CPU seconds) of the Redis at ``url``; of every node summed for a Redis Cluster."""
    import redis

    r = redis.Redis.from_url(url)
    clients = [r]
    if r.info("cluster").get("cluster_enabled") == 1:
        raw = r.execute_command("CLUSTER", "NODES")
        if isinstance(raw, dict):
            addrs = list(raw)
        else:
            addrs = [line.split()[1].split("@")[0] for line in raw.decode().splitlines()]
        clients = [redis.Redis(host=a.rsplit(":", 1)[0], port=int(a.rsplit(":", 1)[1])) for a in addrs]
    pids = [int(c.info("server")["process_id"]) for c in clients]
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return pids[0], total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--rate", type=float, default=10000, help="broadcasts/s in total")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--publishers", type=int, default=3)
    ap.add_argument("--subscribers", type=int, default=1)
    ap.add_argument("--channels", type=int, default=1000)
    a = ap.parse_args()
    if a.rate * a.duration > 2_000_000:
        raise SystemExit("at most 2,000,000 broadcasts per run (bounded load)")
    ctx = multiprocessing.get_context("spawn")
    subs = []
    for _ in range(a.subscribers):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_run_sub, args=(child, a.redis_url, a.channels, a.duration), daemon=True)
        p.start()
        subs.append((p, parent))
    for _, parent in subs:
        if not parent.poll(60):
            raise SystemExit("subscriber did not start")
        parent.recv()
    t0 = time.time() + 3.0  # time for the publisher processes to start (spawn + import)
    for _, parent in subs:
        parent.send(t0 + a.duration + 5.0)
    _, cpu0 = _redis_cpu(a.redis_url)
    w0 = time.monotonic()
    pubs = []
    for i in range(a.publishers):
        parent, child = ctx.Pipe()
        args = (child, a.redis_url, i, a.rate / a.publishers, a.duration, a.channels, t0)
        p = ctx.Process(target=_run_pub, args=args, daemon=True)
        p.start()
        pubs.append((p, parent))
    pres = [parent.recv() for _, parent in pubs]
    _, cpu1 = _redis_cpu(a.redis_url)
    w1 = time.monotonic()
    sres = [parent.recv() for _, parent in subs]
    for p, _ in pubs + subs:
        p.join(10)
    sent = sum(r["sent"] for r in pres)
    acked = sum(r["acked"] for r in pres)
    ack: array[int] = array("q")
    for r in pres:
        ack.extend(r["ack_ns"])
    lat: array[int] = array("q")
    halves: list[list[int]] = [[], []]
    first_sent = min((min(r["sent_ns"]) for r in sres if r["sent_ns"]), default=int(t0 * 1e9))
    t_mid = first_sent + int(a.duration / 2 * 1e9)
    for r in sres:
        lat.extend(r["lat_ns"])
        for s, x in zip(r["sent_ns"], r["lat_ns"], strict=True):
            halves[s >= t_mid].append(x)
    send_s = max(r["send_s"] for r in pres)
    ack_s = max(r["ack_s"] for r in pres)
    first, second = summarize_ms(halves[0]), summarize_ms(halves[1])
    out = {
        "offered_broadcasts_per_s": a.rate,
        "publishers": a.publishers,
        "subscriber_nodes": a.subscribers,
        "channels": a.channels,
        "duration_s": a.duration,
        "sent": sent,
        "acked": acked,
        "rejected": sum(r["rejected"] for r in pres),
        "achieved_broadcasts_per_s": round(acked / ack_s, 1) if ack_s else None,
        "schedule_kept": send_s <= a.duration * 1.05,
        "deliveries": len(lat),
        "deliveries_per_s": round(len(lat) / ack_s, 1) if ack_s else None,
        "lost": sent * a.subscribers - len(lat),
        "ack_latency_ms": summarize_ms(ack),
        "delivery_latency_ms": summarize_ms(lat),
        "delivery_p50_ms_first_half": first.get("p50"),
        "delivery_p50_ms_second_half": second.get("p50"),
        "send_s": round(send_s, 3),
        "redis_cpu_percent": round(100 * (cpu1 - cpu0) / (w1 - w0), 1),
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
