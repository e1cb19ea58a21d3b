"""Counters, histograms and gauges of one node, and the once-a-second monitor over them.

Hot-path cost is kept tiny: counters are plain ``int`` attributes bumped without locks (one event
loop), a histogram is a fixed list of bucket counts bumped through :func:`bisect.bisect_left`, and
nothing here runs per recipient of a fan-out. Everything that costs more (windows, percentiles,
RTT pings, busiest channels, alerts) runs in :meth:`Monitor.tick`, once a second from the node's
sweeper, or when an HTTP client asks (``server/metrics_http.py``, ``server/web.py``).

Measures that need explaining:

* **Delivery latency**: from the moment this node hands a broadcast to the broker to the end of its
  local fan-out (every local subscriber's frame written to its transport), observed once per
  fan-out. Only messages published on this node with local subscribers are timed; with Redis the
  figure includes the round trip through Redis.
* **Heartbeat RTT**: the server cannot time a client's heartbeat (the client sends it, the server
  only answers), so the monitor sends a WebSocket ping to a few recently active connections each
  second and times the pong. A connection is pinged at most once per heartbeat timeout, and only
  when it was active in the last two seconds, so pongs never keep a silent client alive.
* **Reconnects**: a new connection from an identity (JWT ``sub``, else the peer address) that had
  a connection end without a goodbye in the last :data:`RECONNECT_WINDOW` seconds; each such end
  pairs with at most one later connection. A goodbye is a close the client started itself with
  1000, 1001 or no code (``disconnect()``, a page unloading, a script ending), except the
  ``heartbeat timeout`` close after which realtime-js reconnects. So clients that share one
  address (localhost, a NAT) and come and go on purpose are not reconnects; connections that
  drop, time out or are closed by the server are.
* **Reconnect rate**: reconnects in the alert window over the connections that existed during it
  (open at its start, or opened in it): a share between 0 and 1, 0 without connections, the same
  figure in ``/api/metrics``, on the dashboard and in the alert (:func:`tidings.alerts.reconnect_share`).
"""

from __future__ import annotations

import collections
import heapq
import random
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .alerts import Alerts, AlertStats, reconnect_share

if TYPE_CHECKING:
    from .node import Node
    from .session import Session

__all__ = [
    "COUNTERS",
    "DELIVERY_BUCKETS",
    "RECEIVED_KINDS",
    "RTT_BUCKETS",
    "Histogram",
    "Monitor",
    "NodeMetrics",
    "Sample",
]

COUNTERS = (
    "broadcasts",
    "bytes_in",
    "bytes_out",
    "catchup_allowances",
    "connections_closed",
    "connections_near_fd_limit",
    "connections_refused",
    "connections_total",
    "db_broadcasts",
    "db_broadcasts_malformed",
    "db_broadcasts_names_too_long",
    "db_broadcasts_throttled",
    "db_broadcasts_too_large",
    "dropped_payload_too_large",
    "fragment_buffer_full",
    "fragment_timeouts",
    "heartbeat_timeouts",
    "http_refused_anonymous_per_ip",
    "http_refused_body_timeout",
    "http_refused_body_too_large",
    "http_refused_head_timeout",
    "http_refused_head_too_large",
    "http_refused_metrics_token",
    "http_refused_origin",
    "http_refused_per_ip",
    "http_refused_url_too_long",
    "join_errors_undelayed",
    "joins",
    "joins_refused",
    "malformed",
    "names_too_long",
    "presence_events",
    "published",
    "rate_limited",
    "reconnects",
    "sent_broadcast",
    "sent_postgres_changes",
    "sent_presence",
    "sent_reply",
    "slow_consumer_closes",
)

#: Kinds of client messages counted by :meth:`NodeMetrics.receive` (label ``kind``).
RECEIVED_KINDS = ("heartbeat", "join", "leave", "broadcast", "presence", "access_token", "other")
_KIND_INDEX = {
    "heartbeat": 0,
    "phx_join": 1,
    "phx_leave": 2,
    "broadcast": 3,
    "presence": 4,
    "access_token": 5,
}
_OTHER = len(RECEIVED_KINDS) - 1

#: Histogram bucket upper bounds, in seconds.
DELIVERY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

RECONNECT_WINDOW = 60.0  # a connection closed this long ago may still be "reconnected"
GOODBYE_CODES = frozenset((1000, 1001, 1005))  # client closes that mean "I am leaving"
PUBLISH_FORGET = 30.0  # a publish not back from the broker after this long is forgotten
PING_FORGET = 10.0  # a ping unanswered after this long is forgotten
PING_CANDIDATES = 32  # connections looked at per second for an RTT ping
PING_PER_TICK = 4  # pings sent per second at most
TOP_WINDOW = 10  # seconds of per-channel message counts kept for "busiest channels"
HISTORY = 120  # per-second samples kept at least (dashboard history, windows)
_PING_PREFIX = b"tdg:"


class Histogram:
    """Fixed buckets (Prometheus ``le`` semantics): ``counts[i]`` holds values ``<= bounds[i]``,
    the last slot is ``+Inf``. :meth:`observe` is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value (seconds)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Values observed."""
        return sum(self.counts)

    def quantile(self, q: float, counts: Sequence[int] | None = None) -> float | None:
        """The ``q`` quantile of ``counts`` (default: everything so far), interpolated linearly
        inside its bucket like Prometheus' ``histogram_quantile``; ``None`` without values.
        A quantile falling in ``+Inf`` is reported as the highest finite bound."""
        counts = self.counts if counts is None else counts
        total = sum(counts)
        if total <= 0:
            return None
        rank = q * total
        seen = 0
        for i, n in enumerate(counts):
            if n and seen + n >= rank:
                if i >= len(self.bounds):
                    return self.bounds[-1]
                lower = self.bounds[i - 1] if i else 0.0
                return lower + (self.bounds[i] - lower) * ((rank - seen) / n)
            seen += n
        return self.bounds[-1]


class NodeMetrics:
    """Plain integer counters, two histograms and the gauges others set, bumped on the hot path
    without locks (one event loop). Names map to Prometheus names in ``server/metrics_http.py``."""

    __slots__ = (
        *COUNTERS,
        "channel_messages",
        "delivery_latency",
        "heartbeat_rtt",
        "pings",
        "published_at",
        "received",
        "recent_closes",
        "replication_lag_seconds",
        "replication_slot_bytes",
    )

    broadcasts: int
    bytes_in: int
    bytes_out: int
    catchup_allowances: int
    connections_closed: int
    connections_near_fd_limit: int
    connections_refused: int
    connections_total: int
    db_broadcasts: int
    db_broadcasts_malformed: int
    db_broadcasts_names_too_long: int
    db_broadcasts_throttled: int
    db_broadcasts_too_large: int
    dropped_payload_too_large: int
    fragment_buffer_full: int
    fragment_timeouts: int
    heartbeat_timeouts: int
    http_refused_anonymous_per_ip: int
    http_refused_body_timeout: int
    http_refused_body_too_large: int
    http_refused_head_timeout: int
    http_refused_head_too_large: int
    http_refused_metrics_token: int
    http_refused_origin: int
    http_refused_per_ip: int
    http_refused_url_too_long: int
    join_errors_undelayed: int
    joins: int
    joins_refused: int
    malformed: int
    names_too_long: int
    presence_events: int
    published: int
    rate_limited: int
    reconnects: int
    sent_broadcast: int
    sent_postgres_changes: int
    sent_presence: int
    sent_reply: int
    slow_consumer_closes: int

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        #: Client messages by kind, indexed like :data:`RECEIVED_KINDS`.
        self.received = [0] * len(RECEIVED_KINDS)
        self.delivery_latency = Histogram(DELIVERY_BUCKETS)
        self.heartbeat_rtt = Histogram(RTT_BUCKETS)
        #: Message id -> ``perf_counter()`` when handed to the broker (insertion = age order).
        self.published_at: dict[str, float] = {}
        #: Broadcasts fanned out per channel key in the current second.
        self.channel_messages: dict[str, int] = {}
        #: Ping payload -> ``perf_counter()`` when sent.
        self.pings: dict[bytes, float] = {}
        #: Identity -> monotonic times of its recent closes (oldest first).
        self.recent_closes: dict[str, collections.deque[float]] = {}
        #: Set by Postgres Changes (:meth:`set_replication`); absent from /metrics while ``None``.
        self.replication_lag_seconds: float | None = None
        self.replication_slot_bytes: int | None = None

    # -- hot-path hooks ----------------------------------------------------------------------

    def receive(self, event: str, size: int) -> None:
        """One client message of ``size`` bytes with Phoenix ``event``."""
        self.received[_KIND_INDEX.get(event, _OTHER)] += 1
        self.bytes_in += size

    @property
    def messages_in(self) -> int:
        """Client messages received, every kind."""
        return sum(self.received)

    @property
    def deliveries(self) -> int:
        """Frames written by fan-out (broadcast, presence and postgres changes)."""
        return self.sent_broadcast + self.sent_presence + self.sent_postgres_changes

    @property
    def failed(self) -> int:
        """Client messages refused or dropped: malformed, rate-limited, too large."""
        return self.malformed + self.rate_limited + self.dropped_payload_too_large

    def pong(self, data: bytes | bytearray | memoryview) -> None:
        """A pong arrived: if it answers one of our RTT pings, observe the round trip."""
        sent = self.pings.pop(bytes(data), None)
        if sent is not None:
            self.heartbeat_rtt.observe(time.perf_counter() - sent)

    def count_changes(self, deliveries: int, nbytes: int = 0) -> None:
        """Postgres Changes wrote ``deliveries`` frames (``nbytes`` in all) to subscribers."""
        self.sent_postgres_changes += deliveries
        self.bytes_out += nbytes

    def set_replication(self, lag_seconds: float | None = None, slot_bytes: int | None = None) -> None:
        """Postgres Changes: replication lag (seconds behind the database's current WAL position)
        and the WAL the slot retains (bytes). ``None`` leaves a gauge as it is."""
        if lag_seconds is not None:
            self.replication_lag_seconds = float(lag_seconds)
        if slot_bytes is not None:
            self.replication_slot_bytes = int(slot_bytes)

    # -- connections -------------------------------------------------------------------------

    def connection_opened(self, session: Session, user: str | None) -> None:
        """Count a reconnect when ``session``'s identity closed a connection recently."""
        ident = user or _peer(session)
        closes = self.recent_closes.get(ident) if ident else None
        if closes:
            closes.popleft()
            if not closes:
                del self.recent_closes[ident]  # type: ignore[arg-type]
            self.reconnects += 1

    def connection_closed(self, session: Session, user: str | None) -> None:
        """Remember the close, so the identity's next connection counts as a reconnect (unless
        the client said goodbye: see the module doc)."""
        self.connections_closed += 1
        ident = user or _peer(session)
        if ident and not _said_goodbye(session):
            closes = self.recent_closes.get(ident)
            if closes is None:
                closes = self.recent_closes[ident] = collections.deque()
            closes.append(time.monotonic())

    def as_dict(self) -> dict[str, int]:
        """Every counter by name."""
        return {name: getattr(self, name) for name in COUNTERS}


def _said_goodbye(session: Session) -> bool:
    """The client closed the connection itself, on purpose (see the module doc)."""
    close = getattr(getattr(session, "ws", None), "close_rcvd", None)
    if close is None:
        return False  # dropped, timed out, or closed by this server (before any reply)
    return int(close.code) in GOODBYE_CODES and close.reason != "heartbeat timeout"


def _peer(session: Session) -> str | None:
    transport = getattr(session, "transport", None)
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


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
        self.channel_history: collections.deque[dict[str, int]] = collections.deque(maxlen=TOP_WINDOW)
        self.alerts = Alerts(config, node.node_id)
        self._pinged: dict[Session, int] = {}
        self._ping_seq = 0
        self._top_cache: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self.rng = random.Random()

    # -- the tick ----------------------------------------------------------------------------

    def tick(self) -> None:
        """One pass; called by ``Node.sweep`` once a second."""
        node = self.node
        m = node.metrics
        now = time.perf_counter()
        mono = time.monotonic()
        _forget_older(m.published_at, now - PUBLISH_FORGET)
        _forget_older(m.pings, now - PING_FORGET)
        if m.recent_closes:
            cutoff = mono - RECONNECT_WINDOW
            for ident in [i for i, q in m.recent_closes.items() if q[0] < cutoff]:
                q = m.recent_closes[ident]
                while q and q[0] < cutoff:
                    q.popleft()
                if not q:
                    del m.recent_closes[ident]
        self.channel_history.append(m.channel_messages)
        m.channel_messages = {}
        self.ping(now)
        self.samples.append(Sample(node, self.queue_size()))
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
        pending = getattr(node.broker, "_ops", None)
        return len(node.metrics.published_at) + (len(pending) if pending is not None else 0)

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
        seconds = max(1, len(self.channel_history))
        for per_second in self.channel_history:
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
                "pollWaiters": sum(len(w) for w in node.waiters.values()),
            },
            "counters": {**m.as_dict(), "messages_in": m.messages_in, "deliveries": m.deliveries},
            "received": dict(zip(RECEIVED_KINDS, m.received, strict=True)),
            "replication": {
                "lagBytes": getattr(node, "replication_lag_bytes", None),
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


def _forget_older(stamps: dict[Any, float], cutoff: float) -> None:
    """Drop entries stamped before ``cutoff`` from an insertion-ordered dict (oldest first)."""
    while stamps:
        key = next(iter(stamps))
        if stamps[key] >= cutoff:
            return
        del stamps[key]
