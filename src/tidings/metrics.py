"""Counters and histograms of one node: plain numbers bumped on the hot path.

Hot-path cost is kept tiny: counters are plain ``int`` attributes bumped without locks (one event
loop), a histogram is a fixed list of bucket counts bumped through :func:`bisect.bisect_left`, and
nothing here runs per recipient of a fan-out. This module imports nothing from the rest of
Tidings: what reads the figures once a second (RTT pings, samples, alerts) is
``server/monitor.py``, and what renders them is ``server/metrics_http.py`` and ``server/web.py``.

Measures that need explaining:

* **Delivery latency**: from the moment this node hands a broadcast to the broker to the end of its
  local fan-out (every local subscriber's frame written to its transport), observed once per
  fan-out. Only messages published on this node with local subscribers are timed; with Redis the
  figure includes the round trip through Redis.
* **Heartbeat RTT**: the round trip of the monitor's WebSocket pings (``server/monitor.py``),
  observed here when the pong arrives (:meth:`NodeMetrics.pong`).
* **Reconnects**: a new connection from an identity (JWT ``sub``, else the client address) that had
  a connection end without a goodbye in the last :data:`RECONNECT_WINDOW` seconds; each such end
  pairs with at most one later connection. A goodbye is a close the client started itself with
  1000, 1001 or no code (``disconnect()``, a page unloading, a script ending), except the
  ``heartbeat timeout`` close after which realtime-js reconnects (the connection says which:
  ``said_goodbye``). So clients that share one address (localhost, a NAT) and come and go on
  purpose are not reconnects; connections that drop, time out or are closed by the server are.
"""

from __future__ import annotations

import collections
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

__all__ = [
    "COUNTERS",
    "DELIVERY_BUCKETS",
    "RECEIVED_KINDS",
    "RTT_BUCKETS",
    "GOODBYE_CODES",
    "RECONNECT_WINDOW",
    "Histogram",
    "NodeMetrics",
]

COUNTERS = (
    "authz_denied_reads",
    "authz_denied_writes",
    "authz_unavailable",
    "authz_writes_dropped",
    "broadcasts",
    "bytes_in",
    "bytes_out",
    "catchup_allowances",
    "changes_polls",
    "changes_replayed",
    "changes_resumes_complete",
    "changes_resumes_incomplete",
    "changes_resumes_refused",
    "changes_rls_hidden",
    "changes_rls_rechecks",
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
    "internal_errors",
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
TOP_WINDOW = 10  # seconds of per-channel message counts kept for "busiest channels"


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
        "channel_history",
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

    authz_denied_reads: int
    authz_denied_writes: int
    authz_unavailable: int
    authz_writes_dropped: int
    broadcasts: int
    bytes_in: int
    bytes_out: int
    catchup_allowances: int
    changes_polls: int
    changes_replayed: int
    changes_resumes_complete: int
    changes_resumes_incomplete: int
    changes_resumes_refused: int
    changes_rls_hidden: int
    changes_rls_rechecks: int
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
    internal_errors: int
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
        #: The last :data:`TOP_WINDOW` seconds of ``channel_messages`` (oldest first).
        self.channel_history: collections.deque[dict[str, int]] = collections.deque(maxlen=TOP_WINDOW)
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

    def connection_opened(self, ident: str | None) -> None:
        """Count a reconnect when ``ident`` (``sub``, else the client address) closed a connection
        recently (see the module doc)."""
        closes = self.recent_closes.get(ident) if ident else None
        if closes:
            closes.popleft()
            if not closes:
                del self.recent_closes[ident]  # type: ignore[arg-type]
            self.reconnects += 1

    def connection_closed(self, ident: str | None, goodbye: bool) -> None:
        """Remember the close, so ``ident``'s next connection counts as a reconnect, unless the
        client said ``goodbye`` (see the module doc)."""
        self.connections_closed += 1
        if ident and not goodbye:
            closes = self.recent_closes.get(ident)
            if closes is None:
                closes = self.recent_closes[ident] = collections.deque()
            closes.append(time.monotonic())

    # -- once a second -----------------------------------------------------------------------

    def tick(self) -> None:
        """The node's sweeper, once a second: forget stale bookkeeping, start a second of
        per-channel counts."""
        now = time.perf_counter()
        _forget_older(self.published_at, now - PUBLISH_FORGET)
        _forget_older(self.pings, now - PING_FORGET)
        if self.recent_closes:
            cutoff = time.monotonic() - RECONNECT_WINDOW
            for ident in [i for i, q in self.recent_closes.items() if q[0] < cutoff]:
                q = self.recent_closes[ident]
                while q and q[0] < cutoff:
                    q.popleft()
                if not q:
                    del self.recent_closes[ident]
        self.channel_history.append(self.channel_messages)
        self.channel_messages = {}

    def as_dict(self) -> dict[str, int]:
        """Every counter by name."""
        return {name: getattr(self, name) for name in COUNTERS}


def _forget_older(stamps: dict[Any, float], cutoff: float) -> None:
    """Drop entries stamped before ``cutoff`` from an insertion-ordered dict (oldest first)."""
    while stamps:
        key = next(iter(stamps))
        if stamps[key] >= cutoff:
            return
        del stamps[key]
