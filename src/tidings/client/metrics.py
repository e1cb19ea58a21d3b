"""Client metrics over rolling windows, alert thresholds, and an optional HTTP reporter.

* Latency: average, p95 and p99 (nearest rank) over the last ``latency_window`` samples,
  computed whenever asked, not every N samples.
* Reconnect rate: the share of recent connection checks (heartbeat outcomes and reconnects, last
  ``health_window`` of them) that were reconnects. One reconnect among ten healthy heartbeats is 9 %.
* Failure rate: failed (given up or dropped) messages over all messages handed to the client.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from .settings import AlertThresholds

__all__ = ["Alert", "AlertMonitor", "Metrics", "MetricsReporter", "MetricsSnapshot", "check_alerts"]

logger = logging.getLogger("tidings.client")


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The client's numbers at one moment."""

    state: str
    quality: str
    total_messages: int
    """Broadcasts handed to ``send_broadcast``."""
    failed_messages: int
    """Broadcasts given up on: refused or unanswered twice, or dropped from a full queue."""
    dropped_messages: int
    """The part of ``failed_messages`` dropped because the send queue was full."""
    received_messages: int
    """Broadcasts delivered to the application."""
    duplicate_messages: int
    """Inbound broadcasts and Postgres Changes dropped as duplicates."""
    latency_samples: int
    avg_latency_ms: float | None
    p95_latency_ms: float | None
    p99_latency_ms: float | None
    reconnect_count: int
    """Connections lost (each starts a reconnect cycle)."""
    reconnect_attempts: int
    """Connection attempts after a loss."""
    reconnect_rate: float
    failure_rate: float
    queue_size: int
    fallback_active: bool

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a JSON-ready dict."""
        return dataclasses.asdict(self)


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values (``None`` when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class Metrics:
    """Counters and rolling windows.

    Args:
        latency_window: latency samples kept.
        health_window: connection checks kept for the reconnect rate.
    """

    def __init__(self, latency_window: int = 1000, health_window: int = 100) -> None:
        self._latencies: collections.deque[float] = collections.deque(maxlen=latency_window)
        self._health: collections.deque[bool] = collections.deque(maxlen=health_window)
        self.total_messages = 0
        self.failed_messages = 0
        self.dropped_messages = 0
        self.received_messages = 0
        self.duplicate_messages = 0
        self.reconnect_count = 0
        self.reconnect_attempts = 0

    def record_latency(self, latency_ms: float) -> None:
        """One round trip (heartbeat or acknowledged broadcast)."""
        self._latencies.append(latency_ms)

    def record_sent(self) -> None:
        """A broadcast was handed to the client."""
        self.total_messages += 1

    def record_failed(self) -> None:
        """A broadcast was given up on."""
        self.failed_messages += 1

    def record_dropped(self) -> None:
        """A broadcast was dropped from the full send queue (also a failure)."""
        self.dropped_messages += 1
        self.failed_messages += 1

    def record_received(self) -> None:
        """A broadcast was delivered to the application."""
        self.received_messages += 1

    def record_duplicate(self) -> None:
        """An inbound duplicate was dropped."""
        self.duplicate_messages += 1

    def record_heartbeat_ok(self) -> None:
        """A healthy connection check."""
        self._health.append(False)

    def record_reconnect(self) -> None:
        """A connection was lost and a reconnect cycle starts."""
        self.reconnect_count += 1
        self._health.append(True)

    def record_reconnect_attempt(self) -> None:
        """One connection attempt after a loss."""
        self.reconnect_attempts += 1

    @property
    def reconnect_rate(self) -> float:
        """Reconnects among the recent connection checks."""
        return sum(self._health) / len(self._health) if self._health else 0.0

    @property
    def health_samples(self) -> int:
        """Connection checks in the window."""
        return len(self._health)

    @property
    def failure_rate(self) -> float:
        """Failed over total messages."""
        return self.failed_messages / self.total_messages if self.total_messages else 0.0

    def snapshot(
        self, state: str, quality: str, queue_size: int, fallback_active: bool = False
    ) -> MetricsSnapshot:
        """Everything at once."""
        ordered = sorted(self._latencies)
        return MetricsSnapshot(
            state=state,
            quality=quality,
            total_messages=self.total_messages,
            failed_messages=self.failed_messages,
            dropped_messages=self.dropped_messages,
            received_messages=self.received_messages,
            duplicate_messages=self.duplicate_messages,
            latency_samples=len(ordered),
            avg_latency_ms=sum(ordered) / len(ordered) if ordered else None,
            p95_latency_ms=percentile(ordered, 0.95),
            p99_latency_ms=percentile(ordered, 0.99),
            reconnect_count=self.reconnect_count,
            reconnect_attempts=self.reconnect_attempts,
            reconnect_rate=self.reconnect_rate,
            failure_rate=self.failure_rate,
            queue_size=queue_size,
            fallback_active=fallback_active,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Alert:
    """A threshold crossed."""

    name: str
    """``high_latency``, ``high_reconnect_rate``, ``high_failure_rate`` or ``queue_backlog``."""
    message: str
    value: float
    threshold: float


def check_alerts(
    snapshot: MetricsSnapshot, thresholds: AlertThresholds, health_samples: int | None = None
) -> list[Alert]:
    """The thresholds ``snapshot`` is over.

    Args:
        snapshot: the numbers.
        thresholds: the limits.
        health_samples: connection checks behind ``reconnect_rate`` (``None``: assume enough).
    """
    alerts: list[Alert] = []
    p95 = snapshot.p95_latency_ms
    if (
        p95 is not None
        and snapshot.latency_samples >= thresholds.min_latency_samples
        and p95 > thresholds.max_p95_latency_ms
    ):
        alerts.append(Alert("high_latency", f"p95 latency {p95:.0f} ms", p95, thresholds.max_p95_latency_ms))
    enough_health = health_samples is None or health_samples >= thresholds.min_rate_samples
    if enough_health and snapshot.reconnect_rate > thresholds.max_reconnect_rate:
        alerts.append(
            Alert(
                "high_reconnect_rate",
                f"reconnect rate {snapshot.reconnect_rate:.1%}",
                snapshot.reconnect_rate,
                thresholds.max_reconnect_rate,
            )
        )
    if (
        snapshot.total_messages >= thresholds.min_rate_samples
        and snapshot.failure_rate > thresholds.max_failure_rate
    ):
        alerts.append(
            Alert(
                "high_failure_rate",
                f"message failure rate {snapshot.failure_rate:.1%}",
                snapshot.failure_rate,
                thresholds.max_failure_rate,
            )
        )
    if snapshot.queue_size > thresholds.max_queue_size:
        alerts.append(
            Alert(
                "queue_backlog",
                f"{snapshot.queue_size} messages waiting in the send queue",
                float(snapshot.queue_size),
                float(thresholds.max_queue_size),
            )
        )
    return alerts


class AlertMonitor:
    """Fires each alert once when its threshold is crossed, and again only after it cleared.

    Args:
        thresholds: the limits.
        callback: called with each new :class:`Alert` (exceptions are logged, not raised).
    """

    def __init__(
        self, thresholds: AlertThresholds, callback: Callable[[Alert], object] | None = None
    ) -> None:
        self.thresholds = thresholds
        self.callback = callback
        self.active: dict[str, Alert] = {}
        """Alerts currently over their threshold, by name."""

    def evaluate(self, snapshot: MetricsSnapshot, health_samples: int | None = None) -> list[Alert]:
        """Check ``snapshot``; returns (and reports) the alerts that just fired."""
        current = {a.name: a for a in check_alerts(snapshot, self.thresholds, health_samples)}
        fired = [a for name, a in current.items() if name not in self.active]
        self.active = current
        for alert in fired:
            logger.warning(
                "realtime client alert %s: %s (threshold %s)", alert.name, alert.message, alert.threshold
            )
            if self.callback is not None:
                try:
                    self.callback(alert)
                except Exception:
                    logger.exception("alert callback failed")
        return fired


class MetricsReporter:
    """POSTs metrics snapshots as JSON to an HTTP endpoint, every ``interval`` seconds.

    Args:
        url: where to POST.
        snapshot: returns the snapshot to send.
        interval: seconds between reports.
        headers: extra request headers.
        timeout: timeout of one request.
    """

    def __init__(
        self,
        url: str,
        snapshot: Callable[[], MetricsSnapshot],
        interval: float = 60.0,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.snapshot = snapshot
        self.interval = interval
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.reports_sent = 0
        self.reports_failed = 0
        self._task: asyncio.Task[None] | None = None

    async def report_once(self) -> bool:
        """Send one snapshot now; True when the endpoint answered 2xx."""
        from .http import request_json

        try:
            status, _ = await request_json(
                "POST", self.url, headers=self.headers, body=self.snapshot().to_dict(), timeout=self.timeout
            )
        except OSError as exc:
            self.reports_failed += 1
            logger.warning("metrics report to %s failed: %s", self.url, exc)
            return False
        if 200 <= status < 300:
            self.reports_sent += 1
            return True
        self.reports_failed += 1
        logger.warning("metrics report to %s answered HTTP %d", self.url, status)
        return False

    def start(self) -> None:
        """Start reporting in the background (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tidings-metrics-reporter")

    async def stop(self) -> None:
        """Stop reporting."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.report_once()
