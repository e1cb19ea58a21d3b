"""Every knob of the client SDK, with the defaults of the guide the project grew from.

``RealtimeClient(url, token, **settings)`` accepts any field of :class:`ClientSettings` as a keyword.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["AlertThresholds", "ClientSettings"]


@dataclasses.dataclass(frozen=True, slots=True)
class AlertThresholds:
    """When :class:`~tidings.client.metrics.Metrics` raises an alert."""

    max_p95_latency_ms: float = 500.0
    """Alert when the p95 latency of the rolling window exceeds this."""
    max_reconnect_rate: float = 0.10
    """Alert when more than this share of recent connection checks ended in a reconnect."""
    max_failure_rate: float = 0.05
    """Alert when more than this share of sent messages failed."""
    max_queue_size: int = 50
    """Alert when more messages than this wait in the send queue."""
    min_latency_samples: int = 5
    """Latency alerts need at least this many samples (one slow heartbeat is not a trend)."""
    min_rate_samples: int = 20
    """Rate alerts need at least this many events (1 failure out of 2 is not 50 %)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClientSettings:
    """Configuration of a :class:`~tidings.client.RealtimeClient`.

    Times are in seconds unless the name ends in ``_ms``.
    """

    # Protocol
    vsn: str = "2.0.0"
    """Serializer: ``"2.0.0"`` (JSON arrays + binary broadcasts, realtime-js' default) or ``"1.0.0"``."""
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Extra query parameters for the WebSocket URL (e.g. ``{"log_level": "info"}``)."""
    access_token: str | None = None
    """User JWT sent in joins; defaults to the API key. Change it later with ``set_auth()``."""
    max_message_size: int | None = 5_000_000
    """Largest inbound WebSocket message accepted (Supabase's frame limit)."""

    # Connection manager
    max_reconnect_attempts: int = 10
    """Attempts after a lost connection before the client turns ``failed``."""
    reconnect_base_delay: float = 1.0
    """Delay before the first reconnect attempt; doubles on each further attempt."""
    reconnect_max_delay: float = 30.0
    """Cap of the exponential delay (before jitter)."""
    reconnect_jitter: float = 0.25
    """Relative jitter: each delay is multiplied by a uniform factor in ``[1 - j, 1 + j]``."""
    connect_timeout: float = 10.0
    """Time allowed for TCP connect, TLS and the WebSocket handshake."""
    close_timeout: float = 2.0
    """Time allowed for the closing handshake before the TCP connection is aborted."""
    heartbeat_interval: float = 30.0
    """Seconds between heartbeats; the first is sent right after connecting."""
    heartbeat_timeout: float | None = None
    """A heartbeat without reply after this long means a dead connection (default: one interval)."""
    latency_warning_ms: float = 500.0
    """Heartbeat round trips above this are logged as a warning."""
    push_timeout: float = 10.0
    """Time allowed for the reply to a join, leave, presence push or acknowledged broadcast."""
    max_rejoin_attempts: int = 10
    """Rejoins of one channel after errors before the channel is given up."""

    # Send queue
    send_queue_size: int = 100
    """Outgoing broadcasts kept while not connected; the oldest is dropped when full."""

    # Quality monitor
    quality_window: int = 20
    """Heartbeat latencies kept by the quality monitor."""
    excellent_ms: float = 100.0
    """Average latency below this is ``excellent``."""
    good_ms: float = 300.0
    """Average latency below this is ``good``; above it, ``poor``."""
    slow_ms: float = 500.0
    """A latency above this counts as slow for ``should_reconnect``."""
    slow_count: int = 4
    """Reconnect when this many of the last ``slow_window`` latencies are slow."""
    slow_window: int = 5
    """How many recent latencies ``should_reconnect`` looks at."""
    reconnect_on_poor_quality: bool = True
    """Reconnect when the quality monitor says ``should_reconnect``."""

    # Fallback and recovery
    fallback_enabled: bool = True
    """Poll the HTTP history endpoint while quality is poor or disconnected."""
    fallback_poll_interval: float = 5.0
    """Seconds between polls in fallback mode."""
    http_base: str | None = None
    """Base URL of the HTTP API; derived from the realtime URL (ws -> http) when ``None``."""
    http_timeout: float = 10.0
    """Timeout of one HTTP request (history, metrics report)."""
    history_page_limit: int = 100
    """``limit`` of one history request."""
    history_max_pages: int = 10
    """History pages fetched at most for one gap or one poll."""
    recovery: bool = True
    """Tidings extensions: per-channel sequence ordering, replay on rejoin, history fill of gaps,
    filtering of the client's own echoes. Turn off against a stock Supabase server."""
    replay_limit: int = 100
    """``limit`` asked for in ``config.broadcast.replay`` on rejoin (the server may clamp it)."""
    dedup_size: int = 1000
    """Message ids remembered for deduplication (least recently seen evicted first)."""
    order_gap_timeout: float = 2.0
    """A sequence gap not filled in this time is fetched from history, then given up on."""
    order_max_buffered: int = 1000
    """Out-of-order messages buffered per channel before a gap is given up on at once."""

    # Metrics
    latency_window: int = 1000
    """Latency samples kept for average, p95 and p99."""
    health_window: int = 100
    """Connection checks (heartbeats and reconnects) kept for the reconnect rate."""
    alert_thresholds: AlertThresholds = dataclasses.field(default_factory=AlertThresholds)
    """Thresholds that fire the alert callback."""
    metrics_report_url: str | None = None
    """POST a metrics snapshot (JSON) to this URL every ``metrics_report_interval`` seconds."""
    metrics_report_interval: float = 60.0
    """Seconds between metrics reports."""

    # Injection points for tests
    rng: random.Random | None = dataclasses.field(default=None, compare=False, repr=False)
    """Random source of the backoff jitter (``None``: a private ``random.Random()``)."""
    clock: Callable[[], float] = dataclasses.field(default=time.monotonic, compare=False, repr=False)
    """Monotonic clock in seconds, used by the ordering buffer and metrics."""

    def replace(self, **changes: Any) -> ClientSettings:
        """Return a copy with ``changes`` applied.

        Raises:
            TypeError: when a name is not a setting.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown client setting(s): {', '.join(unknown)}")
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        """Check the values.

        Raises:
            ValueError: naming the first bad setting.
        """
        positive = (
            "reconnect_base_delay",
            "reconnect_max_delay",
            "connect_timeout",
            "heartbeat_interval",
            "push_timeout",
            "fallback_poll_interval",
            "http_timeout",
            "order_gap_timeout",
            "metrics_report_interval",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        at_least_one = (
            "send_queue_size",
            "quality_window",
            "slow_window",
            "history_page_limit",
            "history_max_pages",
            "replay_limit",
            "dedup_size",
            "order_max_buffered",
            "latency_window",
            "health_window",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_reconnect_attempts < 0 or self.max_rejoin_attempts < 0:
            raise ValueError("max_reconnect_attempts and max_rejoin_attempts must be >= 0")
        if not 0 <= self.reconnect_jitter < 1:
            raise ValueError("reconnect_jitter must be in [0, 1)")
        if self.heartbeat_timeout is not None and self.heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be > 0")
        if not 1 <= self.slow_count <= self.slow_window:
            raise ValueError("slow_count must be between 1 and slow_window")
        if self.vsn.split(".", 1)[0] not in ("1", "2"):
            raise ValueError("vsn must be 1.0.0 or 2.0.0")
