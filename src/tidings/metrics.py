"""Counters and gauges of one node; rendered by ``server/metrics_http.py``. No logic here."""

from __future__ import annotations

__all__ = ["NodeMetrics"]

COUNTERS = (
    "broadcasts",
    "bytes_in",
    "connections_refused",
    "connections_total",
    "deliveries",
    "heartbeat_timeouts",
    "joins",
    "joins_refused",
    "malformed",
    "messages_in",
    "presence_events",
    "rate_limited",
    "slow_consumer_closes",
    "dropped_payload_too_large",
)


class NodeMetrics:
    """Plain integer counters, bumped on the hot path without locks (one event loop)."""

    __slots__ = COUNTERS

    broadcasts: int
    bytes_in: int
    connections_refused: int
    connections_total: int
    deliveries: int
    heartbeat_timeouts: int
    joins: int
    joins_refused: int
    malformed: int
    messages_in: int
    presence_events: int
    rate_limited: int
    slow_consumer_closes: int
    dropped_payload_too_large: int

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        """Every counter by name."""
        return {name: getattr(self, name) for name in COUNTERS}
