"""Connection quality from the last heartbeat round trips.

``excellent`` below 100 ms on average, ``good`` below 300 ms, ``poor`` above, ``disconnected`` with
no sample (a fresh or lost connection). ``should_reconnect`` when 4 of the last 5 round trips took
more than 500 ms: a connection that slow is usually worse than a new one.
"""

from __future__ import annotations

import collections
import enum

__all__ = ["Quality", "QualityMonitor"]


class Quality(enum.StrEnum):
    """Connection quality levels."""

    EXCELLENT = "excellent"
    GOOD = "good"
    POOR = "poor"
    DISCONNECTED = "disconnected"


class QualityMonitor:
    """Keeps the last ``window`` latencies (milliseconds) and rates them.

    Args:
        window: latencies kept.
        excellent_ms: averages below this are excellent.
        good_ms: averages below this are good.
        slow_ms: a latency above this is slow.
        slow_count: ``should_reconnect`` when this many of the last ``slow_window`` are slow.
        slow_window: recent latencies looked at by ``should_reconnect``.
    """

    __slots__ = ("_latencies", "excellent_ms", "good_ms", "slow_count", "slow_ms", "slow_window")

    def __init__(
        self,
        window: int = 20,
        excellent_ms: float = 100.0,
        good_ms: float = 300.0,
        slow_ms: float = 500.0,
        slow_count: int = 4,
        slow_window: int = 5,
    ) -> None:
        if window < 1 or slow_window < 1 or not 1 <= slow_count <= slow_window:
            raise ValueError("window and slow_window must be >= 1, slow_count in [1, slow_window]")
        self._latencies: collections.deque[float] = collections.deque(maxlen=window)
        self.excellent_ms = excellent_ms
        self.good_ms = good_ms
        self.slow_ms = slow_ms
        self.slow_count = slow_count
        self.slow_window = slow_window

    def record(self, latency_ms: float) -> None:
        """Add one round trip."""
        self._latencies.append(latency_ms)

    def reset(self) -> None:
        """Forget every sample (the connection was lost)."""
        self._latencies.clear()

    @property
    def latencies(self) -> list[float]:
        """The samples, oldest first."""
        return list(self._latencies)

    @property
    def average(self) -> float | None:
        """Average of the samples, ``None`` without any."""
        if not self._latencies:
            return None
        return sum(self._latencies) / len(self._latencies)

    @property
    def quality(self) -> Quality:
        """The current quality level."""
        average = self.average
        if average is None:
            return Quality.DISCONNECTED
        if average < self.excellent_ms:
            return Quality.EXCELLENT
        if average < self.good_ms:
            return Quality.GOOD
        return Quality.POOR

    @property
    def should_reconnect(self) -> bool:
        """True when at least ``slow_count`` of the last ``slow_window`` samples are slow."""
        recent = list(self._latencies)[-self.slow_window :]
        return sum(1 for latency in recent if latency > self.slow_ms) >= self.slow_count
