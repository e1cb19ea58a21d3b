"""Prometheus text rendering of a node's counters and gauges."""

from __future__ import annotations

from ..node import Node

__all__ = ["render_prometheus"]

_COUNTERS = {
    "connections_total": "WebSocket connections accepted",
    "connections_refused": "WebSocket upgrades refused",
    "joins": "channel joins accepted",
    "joins_refused": "channel joins refused",
    "messages_in": "Phoenix messages received from clients",
    "bytes_in": "bytes of Phoenix messages received",
    "broadcasts": "broadcasts published",
    "deliveries": "frames delivered to subscribers by fan-out",
    "presence_events": "presence diffs published",
    "malformed": "malformed messages dropped",
    "rate_limited": "messages refused by rate limits",
    "slow_consumer_closes": "connections closed as slow consumers (1013)",
    "heartbeat_timeouts": "connections closed for missing heartbeats",
    "dropped_payload_too_large": "broadcasts dropped for payload size",
}


def render_prometheus(node: Node) -> str:
    """Every metric of ``node`` as Prometheus exposition text."""
    lines: list[str] = []
    values = node.metrics.as_dict()
    for name, doc in _COUNTERS.items():
        full = f"tidings_{name}" if name.endswith("_total") else f"tidings_{name}_total"
        lines += [f"# HELP {full} {doc}", f"# TYPE {full} counter", f"{full} {values[name]}"]
    gauges = {
        "connections": (len(node.sessions), "open WebSocket connections"),
        "channels": (len(node.hub.groups), "channel groups with subscribers on this node"),
        "draining": (int(node.draining), "1 while the node drains connections"),
    }
    for name, (value, doc) in gauges.items():
        lines += [f"# HELP tidings_{name} {doc}", f"# TYPE tidings_{name} gauge", f"tidings_{name} {value}"]
    return "\n".join(lines) + "\n"
