"""The node's once-a-second monitor: RTT pings, per-second samples, alerts, ``/api/metrics``.

Registered on the node with :meth:`tidings.node.Node.on_tick` by the composition root
(``server/app.py``); the counters it reads are :mod:`tidings.metrics`, which knows nothing of it.
What the measures mean is documented there and in ``docs/observability.md``.

* **Heartbeat RTT**: the server cannot time a client's heartbeat (the client sends it, the server
  only answers), so the monitor sends a WebSocket ping to a few recently active connections each
  second and times the pong (:meth:`tidings.metrics.NodeMetrics.pong`). A connection is pinged at
  most once per heartbeat timeout, and only when it was active in the last two seconds, so pongs
  never keep a silent client alive.
* **Reconnect rate**: reconnects in the alert window over the connections that existed during it
  (open at its start, or opened in it): a share between 0 and 1, 0 without connections, the same
  figure in ``/api/metrics``, on the dashboard and in the alert (:func:`tidings.alerts.reconnect_share`).
"""

from __future__ import annotations

import collections
import heapq
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..alerts import Alerts, AlertStats, reconnect_share
from ..metrics import RECEIVED_KINDS

if TYPE_CHECKING:
    from ..node import Member, Node

__all__ = ["HISTORY", "PING_CANDIDATES", "PING_PER_TICK", "Monitor", "Sample"]

PING_CANDIDATES = 32  # connections looked at per second for an RTT ping
PING_PER_TICK = 4  # pings sent per second at most
HISTORY = 120  # per-second samples kept at least (dashboard history, windows)
_PING_PREFIX = b"tdg:"


class Sample:
    """Cumulative figures of the node at one second (the monitor keeps a ring of them)."""

    __slots__ = (
        "broadcasts",
        "bytes_in",
        "bytes_out",
        "channels",
        "connections",
        "delivery",
        "delivery_sum",
        "failed",
        "messages_in",
        "messages_out",
        "opened",
        "published",
        "queue",
        "reconnects",
        "rtt",
        "rtt_sum",
        "t",
    )

    def __init__(self, node: Node, queue: int) -> None:
        m = node.metrics
        self.t = time.time()
        self.connections = len(node.sessions)
        self.channels = len(node.hub.groups)
        self.messages_in = m.messages_in
        self.messages_out = m.deliveries + m.sent_reply
        self.broadcasts = m.broadcasts
        self.published = m.published
        self.failed = m.failed
        self.reconnects = m.reconnects
        self.opened = m.connections_total
        self.bytes_in = m.bytes_in
        self.bytes_out = m.bytes_out
        self.queue = queue
        self.rtt = tuple(m.heartbeat_rtt.counts)
        self.rtt_sum = m.heartbeat_rtt.sum
        self.delivery = tuple(m.delivery_latency.counts)
        self.delivery_sum = m.delivery_latency.sum


def _diff(new: Sequence[int], old: Sequence[int]) -> list[int]:
    return [a - b for a, b in zip(new, old, strict=True)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


class Monitor:
    """Once a second (from the node's sweeper): forget stale bookkeeping, ping a few connections
    for RTT, take a :class:`Sample`, evaluate alerts. Answers the JSON of ``/api/metrics``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        config = node.config
        self.window = max(1, int(round(config.alert_window)))
        self.samples: collections.deque[Sample] = collections.deque(maxlen=max(HISTORY, self.window) + 1)
        # The node's start (every counter 0) is the baseline until a full window has passed.
        self.samples.append(Sample(node, 0))
        self.alerts = Alerts(config, node.node_id)
        self._pinged: dict[Member, int] = {}
        self._ping_seq = 0
        self._top_cache: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self.rng = random.Random()
        node.on_tick(self.tick)

    # -- the tick ----------------------------------------------------------------------------

    def tick(self) -> None:
        """One pass; called by the node's sweeper once a second (after its own bookkeeping)."""
        self.ping(time.perf_counter())
        self.samples.append(Sample(self.node, self.queue_size()))
        self.alerts.evaluate(self.alert_stats())

    def ping(self, now: float) -> None:
        """Send an RTT ping to a few recently active connections (see the module doc)."""
        node = self.node
        tick = node.tick
        forget = tick - node.idle_ticks
        if self._pinged:
            for s in [s for s, t in self._pinged.items() if t <= forget]:
                del self._pinged[s]
        sessions = node.sessions
        if not sessions:
            return
        pool = list(sessions)
        if len(pool) > PING_CANDIDATES:
            pool = self.rng.sample(pool, PING_CANDIDATES)
        sent = 0
        for session in pool:
            if (
                session.closed
                or session.last_seen < tick - 1
                or session in self._pinged
                or getattr(session, "transport", None) is None
            ):
                continue
            self._ping_seq = (self._ping_seq + 1) & 0xFFFFFFFF
            payload = _PING_PREFIX + self._ping_seq.to_bytes(4, "big")
            node.metrics.pings[payload] = time.perf_counter()
            self._pinged[session] = tick
            session.write(b"\x89" + bytes((len(payload),)) + payload)  # unmasked server ping frame
            sent += 1
            if sent >= PING_PER_TICK:
                break

    # -- figures -----------------------------------------------------------------------------

    def queue_size(self) -> int:
        """Messages waiting inside the server: published here and not yet fanned out, plus
        commands queued for the broker (Redis)."""
        node = self.node
        return len(node.metrics.published_at) + node.broker.pending()

    def broker_lag(self) -> float:
        """Seconds the oldest message published here has been waiting for its fan-out (0: none)."""
        published = self.node.metrics.published_at
        if not published:
            return 0.0
        first = next(iter(published.values()))
        return max(0.0, time.perf_counter() - first)

    def _window_pair(self, seconds: int) -> tuple[Sample, Sample] | None:
        samples = self.samples
        if not samples:
            return None
        new = samples[-1]
        old = samples[max(0, len(samples) - 1 - seconds)]
        return new, old

    def alert_stats(self) -> AlertStats:
        """What the alert thresholds are compared with, over the alert window."""
        pair = self._window_pair(self.window)
        m = self.node.metrics
        if pair is None:
            return AlertStats()
        new, old = pair
        rtt = m.heartbeat_rtt.quantile(0.95, _diff(new.rtt, old.rtt))
        delivery = m.delivery_latency.quantile(0.95, _diff(new.delivery, old.delivery))
        reconnects = new.reconnects - old.reconnects
        # Every connection that existed during the window: open at its start, or opened in it.
        connections = old.connections + new.opened - old.opened
        failed = new.failed - old.failed
        attempts = failed + new.published - old.published
        return AlertStats(
            rtt_p95=rtt,
            delivery_p95=delivery,
            reconnect_rate=reconnect_share(reconnects, connections),
            failure_rate=failed / attempts if attempts else 0.0,
            reconnects=reconnects,
            connections=connections,
            failed=failed,
            attempts=attempts,
            queue=new.queue,
        )

    def top_channels(self, limit: int = 10) -> list[dict[str, Any]]:
        """The busiest channels: by messages per second over the last seconds, then subscribers.
        Cached for a second (it walks every channel group)."""
        now = time.monotonic()
        cached_at, cached = self._top_cache
        if now - cached_at < 1.0 and cached:
            return cached
        groups = self.node.hub.groups
        counts: collections.Counter[str] = collections.Counter()
        channel_history = self.node.metrics.channel_history
        seconds = max(1, len(channel_history))
        for per_second in channel_history:
            counts.update(per_second)
        keys = {k for k, _ in counts.most_common(limit)}
        keys.update(heapq.nlargest(limit, groups, key=lambda k: len(groups[k])))
        ranked: list[tuple[float, int, str]] = []
        for key in keys:
            group = groups.get(key)
            rate = round(counts.get(key, 0) / seconds, 2)
            ranked.append((rate, len(group) if group is not None else 0, key))
        ranked.sort(key=lambda r: (-r[0], -r[1], r[2]))
        rows = [
            {
                "channel": key[2:],
                "private": key.startswith("x:"),
                "subscribers": subs,
                "messagesPerSecond": rate,
            }
            for rate, subs, key in ranked[:limit]
        ]
        self._top_cache = (now, rows)
        return rows

    def snapshot(self, history: int = 60) -> dict[str, Any]:
        """The JSON of ``/api/metrics``: the guide's fields, then details for the dashboard."""
        node = self.node
        m = node.metrics
        stats = self.alert_stats()
        pair = self._window_pair(self.window)
        rtt_avg = delivery_avg = None
        rtt_q: dict[str, float | None] = {"p50": None, "p95": None, "p99": None}
        delivery_q: dict[str, float | None] = dict(rtt_q)
        if pair is not None:
            new, old = pair
            rtt_counts, delivery_counts = _diff(new.rtt, old.rtt), _diff(new.delivery, old.delivery)
            n = sum(rtt_counts)
            rtt_avg = (new.rtt_sum - old.rtt_sum) / n if n else None
            n = sum(delivery_counts)
            delivery_avg = (new.delivery_sum - old.delivery_sum) / n if n else None
            for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                rtt_q[name] = _ms(m.heartbeat_rtt.quantile(q, rtt_counts))
                delivery_q[name] = _ms(m.delivery_latency.quantile(q, delivery_counts))
        rates = self.rates(5)
        queue = self.queue_size()
        return {
            "timestamp": time.time(),
            "node": node.node_id,
            "uptimeSeconds": round(time.time() - node.started_at, 1),
            "windowSeconds": self.window,
            # The guide's WebSocketMetrics fields.
            "activeConnections": len(node.sessions),
            "totalMessages": m.published + m.failed,
            "failedMessages": m.failed,
            "avgLatency": _ms(rtt_avg),
            "p95Latency": rtt_q["p95"],
            "p99Latency": rtt_q["p99"],
            "reconnectRate": round(stats.reconnect_rate, 4),
            "messageQueueSize": queue,
            # Details.
            "channels": len(node.hub.groups),
            # reconnectRate = reconnects / connections (those that existed during the window).
            "reconnects": {"count": stats.reconnects, "connections": stats.connections},
            "failureRate": round(stats.failure_rate, 4),
            "heartbeatRtt": {"avg": _ms(rtt_avg), **rtt_q},
            "deliveryLatency": {"avg": _ms(delivery_avg), **delivery_q},
            "rates": rates,
            "queues": {
                "messages": queue,
                "brokerLagSeconds": round(self.broker_lag(), 6),
                "pollWaiters": node.waiting_for_broadcast(),
            },
            "counters": {**m.as_dict(), "messages_in": m.messages_in, "deliveries": m.deliveries},
            "received": dict(zip(RECEIVED_KINDS, m.received, strict=True)),
            "replication": {
                "lagBytes": node.replication_lag_bytes,
                "lagSeconds": m.replication_lag_seconds,
                "slotBytes": m.replication_slot_bytes,
            },
            "alerts": self.alerts.active_json(),
            "thresholds": self.alerts.thresholds_json(),
            "topChannels": self.top_channels(),
            "history": self.history(history),
        }

    def rates(self, seconds: int) -> dict[str, float]:
        """Per-second rates over the last ``seconds``."""
        pair = self._window_pair(seconds)
        keys = ("messagesIn", "messagesOut", "broadcasts", "failed", "bytesIn", "bytesOut")
        if pair is None or pair[0].t <= pair[1].t:
            return dict.fromkeys(keys, 0.0)
        new, old = pair
        dt = new.t - old.t
        values = (
            new.messages_in - old.messages_in,
            new.messages_out - old.messages_out,
            new.broadcasts - old.broadcasts,
            new.failed - old.failed,
            new.bytes_in - old.bytes_in,
            new.bytes_out - old.bytes_out,
        )
        return {k: round(v / dt, 2) for k, v in zip(keys, values, strict=True)}

    def history(self, points: int) -> list[dict[str, Any]]:
        """The last ``points`` seconds, one point per second: gauges, rates and the latency
        percentiles of the 10 seconds up to each point (the dashboard's charts)."""
        samples = list(self.samples)
        m = self.node.metrics
        out: list[dict[str, Any]] = []
        start = max(1, len(samples) - points)
        for i in range(start, len(samples)):
            new, prev = samples[i], samples[i - 1]
            old = samples[max(0, i - 10)]
            dt = max(new.t - prev.t, 1e-6)
            rtt = _diff(new.rtt, old.rtt)
            delivery = _diff(new.delivery, old.delivery)
            out.append(
                {
                    "t": round(new.t, 3),
                    "connections": new.connections,
                    "channels": new.channels,
                    "messagesIn": round((new.messages_in - prev.messages_in) / dt, 2),
                    "messagesOut": round((new.messages_out - prev.messages_out) / dt, 2),
                    "broadcasts": round((new.broadcasts - prev.broadcasts) / dt, 2),
                    "failed": round((new.failed - prev.failed) / dt, 2),
                    "queue": new.queue,
                    "rttP50": _ms(m.heartbeat_rtt.quantile(0.5, rtt)),
                    "rttP95": _ms(m.heartbeat_rtt.quantile(0.95, rtt)),
                    "rttP99": _ms(m.heartbeat_rtt.quantile(0.99, rtt)),
                    "deliveryP50": _ms(m.delivery_latency.quantile(0.5, delivery)),
                    "deliveryP95": _ms(m.delivery_latency.quantile(0.95, delivery)),
                    "deliveryP99": _ms(m.delivery_latency.quantile(0.99, delivery)),
                }
            )
        return out
