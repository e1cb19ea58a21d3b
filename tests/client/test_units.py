"""Pure unit tests: backoff, send queue, quality, LRU, ordering, metrics, alerts. No sockets, no sleeps."""

from __future__ import annotations

import random
import statistics

import pytest

from tidings.client import (
    Alert,
    AlertMonitor,
    AlertThresholds,
    Backoff,
    LRUSet,
    Metrics,
    OrderBuffer,
    OutboundMessage,
    Quality,
    QualityMonitor,
    SendQueue,
    check_alerts,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- backoff


def test_backoff_nominal_doubles_to_the_cap() -> None:
    b = Backoff(1.0, 30.0, 0.25, random.Random(1))
    assert [b.nominal(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.nominal(10_000) == 30
    with pytest.raises(ValueError):
        b.nominal(0)


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 6, 10])
def test_backoff_delays_stay_within_jitter_bounds(attempt: int) -> None:
    b = Backoff(1.0, 30.0, 0.25, random.Random(attempt))
    low, high = b.bounds(attempt)
    delays = b.schedule(attempt, 2000)
    assert low == pytest.approx(0.75 * b.nominal(attempt))
    assert high == pytest.approx(1.25 * b.nominal(attempt))
    assert all(low <= d <= high for d in delays)
    # Spread: the jitter is used, not a constant.
    assert max(delays) - min(delays) > 0.45 * b.nominal(attempt)


def test_backoff_jitter_is_uniform_over_the_window() -> None:
    b = Backoff(1.0, 30.0, 0.25, random.Random(42))
    factors = [d / b.nominal(3) for d in b.schedule(3, 10_000)]
    # Uniform on [0.75, 1.25]: mean 1, standard deviation 0.5/sqrt(12) ~ 0.1443.
    assert statistics.fmean(factors) == pytest.approx(1.0, abs=0.01)
    assert statistics.pstdev(factors) == pytest.approx(0.5 / 12**0.5, rel=0.05)
    buckets = [0] * 10
    for f in factors:
        buckets[min(9, int((f - 0.75) / 0.05))] += 1
    assert all(800 <= n <= 1200 for n in buckets), buckets


def test_backoff_zero_jitter_is_exact_and_injected_rng_is_used() -> None:
    assert Backoff(1.0, 30.0, 0.0).delay(3) == 4.0

    class MaxRng(random.Random):
        def random(self) -> float:
            return 0.999999

    assert Backoff(1.0, 30.0, 0.25, MaxRng()).delay(1) == pytest.approx(1.25, abs=1e-5)
    with pytest.raises(ValueError):
        Backoff(1.0, 30.0, 1.0)


# ---------------------------------------------------------------- send queue


def _msg(n: int) -> OutboundMessage:
    return OutboundMessage(id=f"m{n}", topic="realtime:a", event="e", payload={"n": n}, queued_at=0.0)


def test_queue_drops_oldest_when_full_and_reports_it() -> None:
    dropped: list[str] = []
    outcomes: list[str] = []
    q = SendQueue(3, on_drop=lambda m: dropped.append(m.id))
    first = _msg(0)
    first.on_done = outcomes.append
    q.put(first)
    for n in range(1, 5):
        q.put(_msg(n))
    assert [m.id for m in q] == ["m2", "m3", "m4"]
    assert dropped == ["m0", "m1"] and q.dropped == 2
    assert outcomes == ["dropped"]


def test_queue_take_keeps_order_of_the_rest_and_push_front_restores() -> None:
    q = SendQueue(10)
    for n in range(6):
        q.put(_msg(n))
    taken = q.take(lambda m: m.payload["n"] % 2 == 0)
    assert [m.id for m in taken] == ["m0", "m2", "m4"]
    assert [m.id for m in q] == ["m1", "m3", "m5"]
    q.push_front(taken[1:])
    assert [m.id for m in q] == ["m2", "m4", "m1", "m3", "m5"]
    assert q.has_topic("realtime:a") and not q.has_topic("realtime:b")


def test_queue_requeues_a_failed_message_once_only() -> None:
    q = SendQueue(10)
    m = _msg(1)
    m.attempts = 1
    assert q.requeue(m) is True
    assert q.take(lambda _: True) == [m]
    m.attempts = 2
    assert q.requeue(m) is False
    assert len(q) == 0


def test_message_finish_reports_once() -> None:
    seen: list[str] = []
    m = _msg(1)
    m.on_done = seen.append
    m.finish("ok")
    m.finish("error")
    assert seen == ["ok"]


# ---------------------------------------------------------------- quality


def test_quality_levels() -> None:
    q = QualityMonitor()
    assert q.quality is Quality.DISCONNECTED
    q.record(50)
    assert q.quality is Quality.EXCELLENT
    q.record(250)  # average 150
    assert q.quality is Quality.GOOD
    q.record(700)  # average 333
    assert q.quality is Quality.POOR
    q.reset()
    assert q.quality is Quality.DISCONNECTED and q.latencies == []


def test_quality_keeps_last_20() -> None:
    q = QualityMonitor()
    for n in range(30):
        q.record(float(n))
    assert q.latencies == [float(n) for n in range(10, 30)]


def test_should_reconnect_needs_4_of_last_5_slow() -> None:
    q = QualityMonitor()
    for latency in [600, 600, 600, 100, 100]:
        q.record(latency)
    assert not q.should_reconnect
    q.record(600)  # last 5: 600 600 100 100 600
    assert not q.should_reconnect
    q.record(600)
    q.record(501)  # last 5: 100 100 600 600 501 -> 3
    assert not q.should_reconnect
    q.record(900)  # 100 600 600 501 900 -> 4
    assert q.should_reconnect
    q.record(500)  # exactly 500 is not "above 500": 600 600 501 900 500 -> 4
    assert q.should_reconnect
    q.record(10)  # 600 501 900 500 10 -> 3
    assert not q.should_reconnect


# ---------------------------------------------------------------- LRU


def test_lru_detects_duplicates_and_evicts_least_recently_seen() -> None:
    lru = LRUSet(3)
    assert [lru.seen(k) for k in "abc"] == [False, False, False]
    assert lru.seen("a") is True  # refreshes a: order b, c, a
    assert lru.seen("d") is False  # evicts b, the least recently seen
    assert "b" not in lru and "a" in lru
    assert lru.keys() == ["c", "a", "d"]
    assert lru.seen("b") is False  # b is new again


def test_lru_differs_from_insertion_order_eviction() -> None:
    lru = LRUSet(1000)
    lru.seen("hot")
    for n in range(2000):
        lru.seen(n)
        if n % 100 == 0:
            assert lru.seen("hot")  # kept alive by its hits
    assert "hot" in lru and len(lru) == 1000


# ---------------------------------------------------------------- ordering


def test_ordering_in_order_passes_through() -> None:
    buf: OrderBuffer[str] = OrderBuffer(clock=FakeClock())
    assert buf.offer(5, "a") == ["a"]  # the first item sets the baseline
    assert buf.offer(6, "b") == ["b"]
    assert buf.last_released == 6


def test_ordering_buffers_out_of_order_and_drops_old() -> None:
    buf: OrderBuffer[int] = OrderBuffer(clock=FakeClock())
    buf.reset(1)
    assert buf.offer(3, 3) == []
    assert buf.offer(4, 4) == []
    assert buf.gap() == (1, 2)
    assert buf.offer(1, 1) == [1]
    assert buf.gap() == (2, 2)
    assert buf.offer(2, 2) == [2, 3, 4]
    assert buf.gap() is None
    assert buf.offer(3, 3) == [] and buf.offer(4, 4) == []
    assert buf.dropped == 2
    assert buf.offer(6, 6) == [] and buf.offer(6, 6) == []  # a duplicate of a buffered one
    assert buf.dropped == 3


def test_ordering_gap_expires_and_can_be_skipped() -> None:
    clock = FakeClock()
    buf: OrderBuffer[int] = OrderBuffer(gap_timeout=2.0, clock=clock)
    buf.reset(1)
    buf.offer(3, 3)
    assert buf.gap_deadline() == 102.0 and not buf.gap_expired()
    clock.now = 102.0
    assert buf.gap_expired()
    assert buf.skip_gap() == [3]
    assert buf.expected == 4 and buf.gap() is None and buf.gap_deadline() is None
    assert buf.offer(2, 2) == []  # arrived too late: old


def test_ordering_moving_gap_gets_a_fresh_timeout() -> None:
    clock = FakeClock()
    buf: OrderBuffer[int] = OrderBuffer(gap_timeout=2.0, clock=clock)
    buf.reset(1)
    buf.offer(2, 2)
    buf.offer(4, 4)
    clock.now = 101.5
    assert buf.offer(1, 1) == [1, 2]
    assert buf.gap() == (3, 3)
    assert buf.gap_deadline() == 103.5


def test_ordering_overflow_and_reset() -> None:
    buf: OrderBuffer[int] = OrderBuffer(max_buffered=2, clock=FakeClock())
    buf.reset(1)
    for n in (3, 4, 5):
        buf.offer(n, n)
    assert buf.overflowing
    assert buf.reset(4) == [4, 5]
    assert buf.dropped == 1 and len(buf) == 0
    assert buf.reset(None) == [] and buf.expected is None


# ---------------------------------------------------------------- metrics and alerts


def test_metrics_percentiles_over_a_rolling_window() -> None:
    m = Metrics(latency_window=100)
    for n in range(1, 201):
        m.record_latency(float(n))
    snap = m.snapshot("connected", "good", 0)
    assert snap.latency_samples == 100  # 101..200
    assert snap.avg_latency_ms == pytest.approx(150.5)
    assert snap.p95_latency_ms == 195.0
    assert snap.p99_latency_ms == 199.0
    empty = Metrics().snapshot("disconnected", "disconnected", 0)
    assert empty.p95_latency_ms is None and empty.avg_latency_ms is None


def test_metrics_rates() -> None:
    m = Metrics(health_window=10)
    for _ in range(20):
        m.record_sent()
    m.record_failed()
    m.record_dropped()
    assert m.failure_rate == pytest.approx(0.1)
    assert m.dropped_messages == 1 and m.failed_messages == 2
    for _ in range(9):
        m.record_heartbeat_ok()
    m.record_reconnect()
    assert m.reconnect_rate == pytest.approx(0.1)
    m.record_reconnect()  # window of 10: 8 ok + 2 reconnects
    assert m.reconnect_rate == pytest.approx(0.2)
    snap = m.snapshot("connected", "good", 7, fallback_active=True)
    assert snap.to_dict()["queue_size"] == 7 and snap.reconnect_count == 2


def _snapshot(**changes: object) -> object:
    m = Metrics()
    base = m.snapshot("connected", "good", 0)
    import dataclasses

    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_check_alerts_thresholds() -> None:
    t = AlertThresholds()
    calm = _snapshot(
        latency_samples=10,
        p95_latency_ms=500.0,
        total_messages=100,
        failure_rate=0.05,
        reconnect_rate=0.1,
        queue_size=50,
    )
    assert check_alerts(calm, t, health_samples=100) == []  # type: ignore[arg-type]
    hot = _snapshot(
        latency_samples=10,
        p95_latency_ms=501.0,
        total_messages=100,
        failure_rate=0.051,
        reconnect_rate=0.11,
        queue_size=51,
    )
    names = [a.name for a in check_alerts(hot, t, health_samples=100)]  # type: ignore[arg-type]
    assert names == ["high_latency", "high_reconnect_rate", "high_failure_rate", "queue_backlog"]
    few = _snapshot(
        latency_samples=2, p95_latency_ms=900.0, total_messages=3, failure_rate=1.0, reconnect_rate=0.5
    )
    assert check_alerts(few, t, health_samples=3) == []  # type: ignore[arg-type]


def test_alert_monitor_fires_on_crossing_only() -> None:
    fired: list[Alert] = []
    monitor = AlertMonitor(AlertThresholds(), fired.append)
    monitor.evaluate(_snapshot(queue_size=60))  # type: ignore[arg-type]
    monitor.evaluate(_snapshot(queue_size=70))  # type: ignore[arg-type]
    assert [a.name for a in fired] == ["queue_backlog"] and fired[0].value == 60
    monitor.evaluate(_snapshot(queue_size=10))  # type: ignore[arg-type]
    monitor.evaluate(_snapshot(queue_size=55))  # type: ignore[arg-type]
    assert len(fired) == 2


def test_alert_callback_errors_are_contained() -> None:
    def boom(alert: Alert) -> None:
        raise RuntimeError("x")

    monitor = AlertMonitor(AlertThresholds(), boom)
    assert [a.name for a in monitor.evaluate(_snapshot(queue_size=99))] == ["queue_backlog"]  # type: ignore[arg-type]
