"""Alert thresholds of the guide, evaluated once a second over a sliding window.

The node's monitor (:class:`tidings.metrics.Monitor`) computes :class:`AlertStats` each second and
calls :meth:`Alerts.evaluate`. An alert fires when its figure passes its threshold and resolves
when it is back under it; both transitions are logged, listed on the dashboard and, when
``ALERT_WEBHOOK_URL`` is set, POSTed there as JSON (from a daemon thread, so a slow webhook never
blocks the event loop).

Rates need volume to mean anything. The reconnect rate is a true share, the same figure on the
dashboard, in ``/api/metrics`` and in the alert (:func:`reconnect_share`); its alert fires only once
the window saw at least :data:`MIN_CONNECTIONS` connections. The failure rate is computed against at
least :data:`MIN_MESSAGES` messages. Two clients reconnecting once do not page anybody.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import urllib.request
from typing import Any

import orjson

from .config import Config

__all__ = [
    "ALERT_NAMES",
    "MIN_CONNECTIONS",
    "MIN_MESSAGES",
    "Alert",
    "AlertStats",
    "Alerts",
    "post_json",
    "reconnect_share",
]

log = logging.getLogger("tidings.alerts")

ALERT_NAMES = ("high_latency", "reconnect_rate", "failure_rate", "queue_backlog")
MIN_CONNECTIONS = 10
MIN_MESSAGES = 20
WEBHOOK_TIMEOUT = 5.0


def reconnect_share(reconnects: int, connections: int) -> float:
    """The reconnect rate: the share of the window's connections that were reconnects, 0..1.

    ``connections`` are those that existed during the window (open at its start, or opened in it);
    every reconnect is one of them, so the share never passes 1. No connections: 0.
    """
    if connections <= 0:
        return 0.0
    return min(1.0, reconnects / connections)


@dataclasses.dataclass(frozen=True, slots=True)
class AlertStats:
    """The figures alerts are evaluated on (over the alert window). Latencies in seconds."""

    rtt_p95: float | None = None
    delivery_p95: float | None = None
    reconnect_rate: float = 0.0
    failure_rate: float = 0.0
    reconnects: int = 0
    connections: int = 0
    """Connections that existed during the window: open at its start, or opened in it."""
    failed: int = 0
    attempts: int = 0
    queue: int = 0


@dataclasses.dataclass(slots=True)
class Alert:
    """One firing alert."""

    name: str
    message: str
    value: float
    threshold: float
    since: float  # wall-clock seconds

    def as_json(self) -> dict[str, Any]:
        """The alert as the dashboard and the webhook see it."""
        return {
            "name": self.name,
            "message": self.message,
            "value": round(self.value, 6),
            "threshold": self.threshold,
            "since": self.since,
        }


def post_json(url: str, body: dict[str, Any], timeout: float = WEBHOOK_TIMEOUT) -> int:
    """POST ``body`` as JSON to ``url``; returns the HTTP status (raises on network errors)."""
    request = urllib.request.Request(
        url,
        data=orjson.dumps(body),
        headers={"Content-Type": "application/json", "User-Agent": "tidings-alerts"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return int(response.status)


class Alerts:
    """The four thresholds of the guide and the alerts currently firing."""

    def __init__(self, config: Config, node_id: str = "") -> None:
        self.max_latency = config.alert_p95_latency
        self.max_reconnect_rate = config.alert_reconnect_rate
        self.max_failure_rate = config.alert_failure_rate
        self.max_queue = config.alert_queue_size
        self.webhook_url = config.alert_webhook_url
        self.node_id = node_id
        self.active: dict[str, Alert] = {}
        #: Alert transitions since start (``tidings_alerts_fired_total``).
        self.fired_total = 0
        #: The thread of the latest webhook POST (tests join it).
        self.last_post: threading.Thread | None = None

    def thresholds_json(self) -> dict[str, float]:
        """The thresholds, in the dashboard's units (milliseconds, fractions, messages)."""
        return {
            "p95LatencyMs": round(self.max_latency * 1000.0, 3),
            "reconnectRate": self.max_reconnect_rate,
            "failureRate": self.max_failure_rate,
            "queueSize": self.max_queue,
        }

    def active_json(self) -> list[dict[str, Any]]:
        """Firing alerts, oldest first."""
        return [a.as_json() for a in sorted(self.active.values(), key=lambda a: a.since)]

    def check(self, stats: AlertStats) -> dict[str, tuple[bool, float, float, str]]:
        """``name -> (firing, value, threshold, message)`` for every alert."""
        latencies = [v for v in (stats.rtt_p95, stats.delivery_p95) if v is not None]
        latency = max(latencies) if latencies else 0.0
        which = "heartbeat RTT" if latency and latency == stats.rtt_p95 else "delivery latency"
        reconnect_rate = reconnect_share(stats.reconnects, stats.connections)
        failure_rate = stats.failed / max(stats.attempts, MIN_MESSAGES)
        return {
            "high_latency": (
                latency > self.max_latency,
                latency,
                self.max_latency,
                f"p95 {which} {latency * 1000:.0f} ms > {self.max_latency * 1000:.0f} ms",
            ),
            "reconnect_rate": (
                stats.connections >= MIN_CONNECTIONS and reconnect_rate > self.max_reconnect_rate,
                reconnect_rate,
                self.max_reconnect_rate,
                f"{reconnect_rate:.1%} of connections reconnected ({stats.reconnects} of "
                f"{stats.connections}; > {self.max_reconnect_rate:.0%})",
            ),
            "failure_rate": (
                failure_rate > self.max_failure_rate,
                failure_rate,
                self.max_failure_rate,
                f"{failure_rate:.1%} of messages failed (> {self.max_failure_rate:.0%})",
            ),
            "queue_backlog": (
                stats.queue > self.max_queue,
                float(stats.queue),
                float(self.max_queue),
                f"{stats.queue} messages queued (> {self.max_queue})",
            ),
        }

    def evaluate(self, stats: AlertStats, now: float | None = None) -> list[tuple[str, Alert]]:
        """Compare ``stats`` with the thresholds; returns the ``("firing"|"resolved", alert)``
        transitions (already logged and sent to the webhook)."""
        now = time.time() if now is None else now
        changes: list[tuple[str, Alert]] = []
        for name, (firing, value, threshold, message) in self.check(stats).items():
            current = self.active.get(name)
            if firing:
                if current is None:
                    alert = self.active[name] = Alert(name, message, value, threshold, now)
                    self.fired_total += 1
                    changes.append(("firing", alert))
                    log.warning(
                        "alert firing: %s: %s",
                        name,
                        message,
                        extra={"fields": {"alert": name, "value": value, "threshold": threshold}},
                    )
                else:
                    current.value, current.message = value, message
            elif current is not None:
                del self.active[name]
                current.value = value
                changes.append(("resolved", current))
                log.info(
                    "alert resolved: %s (now %s)",
                    name,
                    f"{value:.4g}",
                    extra={"fields": {"alert": name, "value": value, "threshold": threshold}},
                )
        if changes and self.webhook_url:
            self.last_post = self.notify(changes, now)
        return changes

    def notify(self, changes: list[tuple[str, Alert]], now: float) -> threading.Thread:
        """POST the transitions to the webhook from a daemon thread."""
        url = self.webhook_url
        assert url is not None
        body = {
            "source": "tidings",
            "node": self.node_id,
            "at": now,
            "alerts": [{"state": state, **alert.as_json()} for state, alert in changes],
        }

        def send() -> None:
            try:
                status = post_json(url, body)
            except Exception as exc:  # the URL may carry a token: never log it
                log.warning("alert webhook failed: %s", type(exc).__name__)
                return
            if status >= 300:
                log.warning("alert webhook answered HTTP %d", status)

        thread = threading.Thread(target=send, name="tidings-alert-webhook", daemon=True)
        thread.start()
        return thread
