"""Node metrics: histograms, hot-path hooks, RTT pings, reconnects, /metrics text and /api/metrics JSON."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.support.session_pair import SessionPair, parse_frames
from tidings.auth.tokens import Principal
from tidings.broker import make_broker
from tidings.config import Config, ConfigError, load_config
from tidings.metrics import DELIVERY_BUCKETS, RECEIVED_KINDS, Histogram
from tidings.node import Node
from tidings.protocol.codec import Serializer
from tidings.server.metrics_http import render_prometheus
from tidings.server.monitor import Monitor

# -- histogram ------------------------------------------------------------------------------------


def test_histogram_buckets_follow_prometheus_le() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    assert h.counts == [2, 2, 1]  # <= 0.1, <= 1.0, +Inf
    assert h.count == 5
    assert h.sum == pytest.approx(4.65)


def test_histogram_quantiles_interpolate_inside_buckets() -> None:
    h = Histogram((1.0, 2.0, 4.0))
    assert h.quantile(0.5) is None
    for _ in range(50):
        h.observe(0.5)
    for _ in range(50):
        h.observe(1.5)
    assert h.quantile(0.5) == pytest.approx(1.0)
    assert h.quantile(0.75) == pytest.approx(1.5)
    assert h.quantile(1.0) == pytest.approx(2.0)
    h.observe(100.0)  # +Inf reports the highest finite bound
    assert h.quantile(1.0) == 4.0
    assert h.quantile(0.5, [0, 0, 10, 0]) == pytest.approx(3.0)


# -- hot-path hooks ----------------------------------------------------------------------------


def user(sub: str) -> Principal:
    claims = {"sub": sub, "role": "authenticated"}
    return Principal(claims=claims, role="authenticated", sub=sub, exp=None, token=f"t-{sub}")


def test_received_messages_are_counted_by_kind_with_bytes() -> None:
    pair = SessionPair()
    c = pair.connect(Serializer.V1)
    c.heartbeat()
    c.join("realtime:room")
    c.broadcast("realtime:room", "e", {"a": 1})
    c.send_raw("garbage")
    c.send_raw('{"topic":"realtime:room","event":"whatever","payload":{},"ref":"9"}')
    m = pair.node.metrics
    received = dict(zip(RECEIVED_KINDS, m.received, strict=True))
    assert received == {
        "heartbeat": 1,
        "join": 1,
        "leave": 0,
        "broadcast": 1,
        "presence": 0,
        "access_token": 0,
        "other": 1,
    }
    assert m.malformed == 1 and m.messages_in == 4
    assert m.bytes_in > 0
    assert m.sent_reply == 2  # heartbeat and join replies


def test_fan_out_counts_bytes_and_times_delivery_once_per_fan_out() -> None:
    pair = SessionPair()
    clients = [pair.connect(Serializer.V2 if i % 2 else Serializer.V1) for i in range(4)]
    for c in clients:
        c.join("realtime:room")
    node = pair.node
    m = node.metrics
    node.publish_broadcast(False, "room", "e", {"n": 1})
    assert m.published == m.broadcasts == 1
    assert m.sent_broadcast == 4
    assert m.delivery_latency.count == 1  # one observation for four recipients
    written = sum(len(b) for c in clients for b in c.session.sent[-1:])
    assert m.bytes_out == written
    assert m.channel_messages == {"p:room": 1}
    assert not m.published_at
    # No local subscribers: nothing to time, nothing left behind.
    node.publish_broadcast(False, "nobody", "e", {"n": 2})
    assert m.delivery_latency.count == 1 and not m.published_at
    # A duplicate id is not delivered again, and its timestamp does not linger.
    node.publish_broadcast(False, "room", "e", {"n": 3}, msg_id="same")
    node.publish_broadcast(False, "room", "e", {"n": 3}, msg_id="same")
    assert m.delivery_latency.count == 2 and not m.published_at


def test_replication_gauges_have_a_setter_and_stay_absent_until_set() -> None:
    node = Node(Config(), make_broker(Config()))
    monitor = Monitor(node)
    text = render_prometheus(node, monitor)
    assert "tidings_replication_lag_seconds" not in text
    assert "tidings_replication_slot_bytes" not in text
    node.metrics.set_replication(lag_seconds=1.5, slot_bytes=4096)
    node.metrics.set_replication(lag_seconds=None)  # None leaves a gauge as it is
    text = render_prometheus(node, monitor)
    assert "tidings_replication_lag_seconds 1.5" in text
    assert "tidings_replication_slot_bytes 4096" in text
    node.metrics.count_changes(3, 300)
    assert 'tidings_messages_sent_total{kind="postgres_changes"} 3' in render_prometheus(node, monitor)


# -- reconnects -----------------------------------------------------------------------------------


def test_a_connection_replacing_a_recent_close_of_the_same_identity_is_a_reconnect() -> None:
    pair = SessionPair()
    m = pair.node.metrics
    first = pair.connect(principal=user("alice"))
    other = pair.connect(principal=user("bob"))
    assert m.reconnects == 0
    first.session.close(1006)
    pair.connect(principal=user("alice"))
    assert m.reconnects == 1
    pair.connect(principal=user("alice"))  # each close pairs with one later connection at most
    assert m.reconnects == 1
    other.session.close(1000)
    pair.connect(principal=user("carol"))
    assert m.reconnects == 1
    assert m.connections_closed == 2


# -- heartbeat RTT pings ----------------------------------------------------------------------------


class FakeTransport:
    def get_extra_info(self, name: str) -> Any:
        return ("10.1.2.3", 5555) if name == "peername" else None


def test_active_connections_get_an_rtt_ping_and_the_pong_is_timed() -> None:
    pair = SessionPair()
    c = pair.connect(Serializer.V1)
    c.session.transport = FakeTransport()  # type: ignore[attr-defined]
    node = pair.node
    node.sweep()  # active since the last tick: pinged
    pings = [f for f in parse_frames(b"".join(c.session.sent)) if f.opcode.name == "PING"]
    assert len(pings) == 1
    node.metrics.pong(b"not ours")
    assert node.metrics.heartbeat_rtt.count == 0
    node.metrics.pong(pings[0].data)
    assert node.metrics.heartbeat_rtt.count == 1
    node.metrics.pong(pings[0].data)  # answered once
    assert node.metrics.heartbeat_rtt.count == 1


def test_pings_never_keep_a_silent_connection_alive() -> None:
    pair = SessionPair(heartbeat_interval=2.0)  # closed after 4 silent ticks
    c = pair.connect(Serializer.V1)
    session = c.session
    session.transport = FakeTransport()  # type: ignore[attr-defined]
    node = pair.node
    for _ in range(20):
        node.sweep()
        for frame in parse_frames(b"".join(session.sent)):
            if frame.opcode.name == "PING":
                # A client answers every ping at once; the pong counts as activity on the socket.
                node.metrics.pong(frame.data)
                session.last_seen = node.tick
        session.sent.clear()
        if session.closed:
            break
    assert session.close_code == 1000 and session.close_reason == "heartbeat timeout"
    assert node.tick <= node.idle_ticks + 3


def test_connections_without_a_socket_are_never_pinged() -> None:
    pair = SessionPair()
    c = pair.connect(Serializer.V1)
    pair.node.sweep()
    assert not c.session.sent


# -- rendering ------------------------------------------------------------------------------------

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def parse_exposition(text: str) -> dict[str, tuple[str, list[tuple[str, str, float]]]]:
    """``family -> (type, [(sample name, labels, value)])``, checking the format on the way."""
    families: dict[str, tuple[str, list[tuple[str, str, float]]]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert _NAME.match(name) and name not in families, name
            assert kind in ("counter", "gauge", "histogram"), kind
            families[name] = (kind, [])
            current = name
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)", line)
        assert m, line
        sample, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        assert sample.startswith(current), (sample, current)
        families[current][1].append((sample, labels, value))
    return families


def test_prometheus_text_follows_the_conventions() -> None:
    pair = SessionPair()
    c = pair.connect(Serializer.V2)
    c.join("realtime:room")
    pair.node.publish_broadcast(False, "room", "e", {"n": 1})
    pair.node.sweep()
    families = parse_exposition(render_prometheus(pair.node, pair.monitor))
    for name, (kind, samples) in families.items():
        assert name.startswith("tidings_")
        assert samples, name
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
    expected = {
        "tidings_connections": "gauge",
        "tidings_connections_total": "counter",
        "tidings_reconnects_total": "counter",
        "tidings_joins_total": "counter",
        "tidings_channels": "gauge",
        "tidings_messages_received_total": "counter",
        "tidings_messages_sent_total": "counter",
        "tidings_received_bytes_total": "counter",
        "tidings_sent_bytes_total": "counter",
        "tidings_messages_dropped_total": "counter",
        "tidings_slow_consumer_closes_total": "counter",
        "tidings_connections_refused_total": "counter",
        "tidings_rate_limited_total": "counter",
        "tidings_heartbeat_rtt_seconds": "histogram",
        "tidings_delivery_latency_seconds": "histogram",
        "tidings_broker_lag_seconds": "gauge",
        "tidings_queued_messages": "gauge",
        "tidings_alert_firing": "gauge",
    }
    for name, kind in expected.items():
        assert families[name][0] == kind, name
    buckets = [s for s in families["tidings_delivery_latency_seconds"][1] if s[0].endswith("_bucket")]
    assert len(buckets) == len(DELIVERY_BUCKETS) + 1 and buckets[-1][1] == '{le="+Inf"}'
    values = [v for _, _, v in buckets]
    assert values == sorted(values) and values[-1] == 1  # cumulative; one fan-out observed
    sent = {labels: v for _, labels, v in families["tidings_messages_sent_total"][1]}
    assert sent['{kind="broadcast"}'] == 1 and sent['{kind="reply"}'] == 1


def test_api_metrics_json_has_the_fields_of_the_guide() -> None:
    pair = SessionPair()
    c = pair.connect(Serializer.V2)
    c.join("realtime:orders")
    for n in range(3):
        pair.node.publish_broadcast(False, "orders", "e", {"n": n})
    c.send_raw("garbage")
    pair.node.sweep()
    snap = pair.monitor.snapshot()
    for field in (
        "activeConnections",
        "totalMessages",
        "failedMessages",
        "avgLatency",
        "p95Latency",
        "p99Latency",
        "reconnectRate",
        "messageQueueSize",
    ):
        assert field in snap, field
    assert snap["activeConnections"] == 1
    assert (snap["totalMessages"], snap["failedMessages"]) == (4, 1)
    assert snap["failureRate"] == 0.25
    assert snap["deliveryLatency"]["p95"] is not None
    assert snap["topChannels"][0] == {
        "channel": "orders",
        "private": False,
        "subscribers": 1,
        "messagesPerSecond": 3.0,
    }
    assert snap["history"] and snap["history"][-1]["connections"] == 1
    assert snap["alerts"] == [] and snap["thresholds"]["p95LatencyMs"] == 500.0


# -- settings -------------------------------------------------------------------------------------


def test_alert_settings_parse_rates_durations_and_mask_the_webhook() -> None:
    cfg = load_config(
        {},
        environ={
            "ALERT_RECONNECT_RATE": "20%",
            "ALERT_FAILURE_RATE": "0.01",
            "ALERT_P95_LATENCY": "250",
            "ALERT_QUEUE_SIZE": "7",
            "ALERT_WINDOW": "30s",
            "ALERT_WEBHOOK_URL": "https://hooks.example/T0/s3cr3t",
        },
    )
    assert (cfg.alert_reconnect_rate, cfg.alert_failure_rate) == (0.2, 0.01)
    assert (cfg.alert_p95_latency, cfg.alert_queue_size, cfg.alert_window) == (0.25, 7, 30.0)
    shown = {env: value for env, value, _ in cfg.describe()}
    assert shown["ALERT_WEBHOOK_URL"] == "(set)"
    with pytest.raises(ConfigError, match="ALERT_FAILURE_RATE"):
        load_config({}, environ={"ALERT_FAILURE_RATE": "150%"})
