"""Alert thresholds: evaluation over the window, floors for small volumes, log lines, webhook."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tidings.alerts import MIN_CONNECTIONS, MIN_MESSAGES, Alerts, AlertStats
from tidings.broker import make_broker
from tidings.config import Config
from tidings.node import Node
from tidings.server.monitor import Monitor


def names(changes: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    return [(state, alert.name) for state, alert in changes]


def test_the_four_thresholds_of_the_guide_fire_and_resolve() -> None:
    alerts = Alerts(Config())
    assert alerts.evaluate(AlertStats(rtt_p95=0.1, delivery_p95=0.001, connections=100)) == []
    busy = AlertStats(
        rtt_p95=0.6,
        reconnects=11,
        connections=100,
        failed=6,
        attempts=100,
        queue=51,
    )
    assert sorted(names(alerts.evaluate(busy))) == [
        ("firing", "failure_rate"),
        ("firing", "high_latency"),
        ("firing", "queue_backlog"),
        ("firing", "reconnect_rate"),
    ]
    assert alerts.evaluate(busy) == []  # still firing: no new transition
    assert alerts.fired_total == 4
    assert names(alerts.evaluate(AlertStats(connections=100))) == [
        ("resolved", "high_latency"),
        ("resolved", "reconnect_rate"),
        ("resolved", "failure_rate"),
        ("resolved", "queue_backlog"),
    ]
    assert alerts.active == {}


def test_delivery_latency_counts_for_the_latency_alert() -> None:
    alerts = Alerts(Config(alert_p95_latency=0.2))
    [(state, alert)] = alerts.evaluate(AlertStats(rtt_p95=0.01, delivery_p95=0.3))
    assert (state, alert.name) == ("firing", "high_latency")
    assert "delivery latency 300 ms > 200 ms" in alert.message


def test_small_volumes_do_not_trip_the_rates() -> None:
    alerts = Alerts(Config())
    # Two reconnects among two connections, one failure among two messages: floors apply.
    quiet = AlertStats(reconnects=2, connections=2, failed=1, attempts=2)
    assert alerts.evaluate(quiet) == []
    loud = AlertStats(reconnects=2, connections=10, failed=2, attempts=2)
    changes = alerts.evaluate(loud)
    assert sorted(names(changes)) == [("firing", "failure_rate"), ("firing", "reconnect_rate")]
    alert = alerts.active["reconnect_rate"]
    assert alert.value == 0.2 and "20.0% of connections reconnected (2 of 10; > 10%)" in alert.message
    assert MIN_CONNECTIONS == 10 and MIN_MESSAGES == 20


def test_transitions_are_logged_with_fields(caplog: pytest.LogCaptureFixture) -> None:
    alerts = Alerts(Config(alert_queue_size=5))
    with caplog.at_level(logging.INFO, logger="tidings.alerts"):
        alerts.evaluate(AlertStats(queue=6))
        alerts.evaluate(AlertStats(queue=0))
    fired, resolved = caplog.records
    assert fired.levelno == logging.WARNING and "queue_backlog" in fired.getMessage()
    assert fired.fields == {"alert": "queue_backlog", "value": 6.0, "threshold": 5.0}  # type: ignore[attr-defined]
    assert resolved.levelno == logging.INFO and "resolved" in resolved.getMessage()


def test_the_node_evaluates_alerts_every_sweep() -> None:
    config = Config(alert_failure_rate=0.01)
    node = Node(config, make_broker(config))
    monitor = Monitor(node)  # registered on the node's tick, as the server's lifespan does
    node.sweep()
    node.metrics.malformed += 25
    node.sweep()
    assert list(monitor.alerts.active) == ["failure_rate"]
    assert monitor.snapshot()["alerts"][0]["name"] == "failure_rate"


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]]
    status = 204

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.received.append({"path": self.path, "type": self.headers["Content-Type"], **json.loads(body)})
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, list[dict[str, Any]], type[_Hook]]]:
    received: list[dict[str, Any]] = []
    handler = type("Hook", (_Hook,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts/t0k3n", received, handler
    finally:
        server.shutdown()
        server.server_close()


def test_transitions_are_posted_to_the_webhook(hook: tuple[str, list[dict[str, Any]], type[_Hook]]) -> None:
    url, received, _ = hook
    alerts = Alerts(Config(alert_webhook_url=url, alert_queue_size=1), node_id="n1")
    alerts.evaluate(AlertStats(queue=2), now=1000.0)
    assert alerts.last_post is not None
    alerts.last_post.join(10)
    [body] = received
    assert body["path"] == "/alerts/t0k3n" and body["type"] == "application/json"
    assert body["source"] == "tidings" and body["node"] == "n1" and body["at"] == 1000.0
    [alert] = body["alerts"]
    assert alert["name"] == "queue_backlog" and alert["state"] == "firing"
    assert (alert["value"], alert["threshold"]) == (2.0, 1.0)


def test_a_failing_webhook_is_logged_without_its_url(
    hook: tuple[str, list[dict[str, Any]], type[_Hook]], caplog: pytest.LogCaptureFixture
) -> None:
    url, _, handler = hook
    handler.status = 500
    alerts = Alerts(Config(alert_webhook_url=url, alert_queue_size=1))
    with caplog.at_level(logging.WARNING, logger="tidings.alerts"):
        for queue in (2, 0):
            if queue == 0:
                alerts.webhook_url = "http://127.0.0.1:1/unreachable/t0k3n"
            alerts.evaluate(AlertStats(queue=queue))
            assert alerts.last_post is not None
            alerts.last_post.join(10)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "alert webhook failed: HTTPError" in text
    assert "alert webhook failed: URLError" in text
    assert "t0k3n" not in text
