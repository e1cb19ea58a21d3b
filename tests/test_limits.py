"""Token buckets: the caller passes the clock, so every case is exact."""

from __future__ import annotations

import pytest

from tidings.limits import TokenBucket


def test_starts_full_and_empties() -> None:
    bucket = TokenBucket(rate=2, capacity=3, now=0.0)
    assert bucket.available(0.0) == 3
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.available(0.0) == 0


def test_refills_at_rate() -> None:
    bucket = TokenBucket(rate=2, capacity=3, now=0.0)
    for _ in range(3):
        bucket.take(0.0)
    assert not bucket.take(0.25)  # half a token
    assert bucket.available(0.25) == pytest.approx(0.5)
    assert bucket.take(0.5)  # one token after 0.5 s at 2/s
    assert not bucket.take(0.5)


def test_never_holds_more_than_capacity() -> None:
    bucket = TokenBucket(rate=100, capacity=5, now=0.0)
    assert bucket.available(1000.0) == 5
    assert [bucket.take(1000.0) for _ in range(6)] == [True] * 5 + [False]


def test_take_several() -> None:
    bucket = TokenBucket(rate=1, capacity=10, now=0.0)
    assert bucket.take(0.0, 7)
    assert not bucket.take(0.0, 4), "only 3 left"
    assert bucket.available(0.0) == 3, "a refused take consumes nothing"
    assert bucket.take(1.0, 4)


def test_a_refused_take_keeps_the_refill() -> None:
    bucket = TokenBucket(rate=1, capacity=1, now=0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.6)
    assert bucket.take(1.0), "0.6 s accrued before the refusal still counts"


def test_sustained_rate() -> None:
    # 8/s with a one-second burst, asked every 1/64 s (exact in binary) for 10 s: 8 + 80 succeed.
    bucket = TokenBucket(rate=8, capacity=8, now=0.0)
    ok = sum(bucket.take(i / 64) for i in range(641))
    assert ok == 88
