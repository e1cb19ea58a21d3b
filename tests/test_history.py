"""Channel history: sequence numbers, bounds, recovery answers that never hide a gap."""

from __future__ import annotations

from tidings.history import HistoryRecord, MemoryHistory, ReplayResult

T0 = 1_800_000_000.0


def filled(
    n: int, size: int = 100, ttl: float = 300.0, key: str = "p:room"
) -> tuple[MemoryHistory, list[int]]:
    h = MemoryHistory(size, ttl)
    seqs = [h.append(key, f"id{i}", "e", {"i": i}, now=T0 + i) for i in range(n)]
    return h, seqs


def test_sequence_numbers_start_from_the_clock_and_grow_by_one() -> None:
    h, seqs = filled(3)
    assert seqs[0] == int(T0 * 1_000_000)
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    assert h.last_seq("p:room") == seqs[-1]
    assert h.last_seq("p:other") is None


def test_channels_are_numbered_separately() -> None:
    h = MemoryHistory(10, 300)
    a = h.append("p:a", "1", "e", {}, now=T0)
    b = h.append("p:b", "2", "e", {}, now=T0 + 5)
    assert h.append("p:a", "3", "e", {}, now=T0 + 6) == a + 1
    assert h.append("p:b", "4", "e", {}, now=T0 + 7) == b + 1


def test_numbering_survives_a_restart() -> None:
    _, before = filled(3)
    later = MemoryHistory(100, 300).append("p:room", "x", "e", {}, now=T0 + 60)
    assert later > before[-1]


def test_seen() -> None:
    h, _ = filled(2)
    assert h.seen("p:room", "id0") and h.seen("p:room", "id1")
    assert not h.seen("p:room", "id9")
    assert not h.seen("p:none", "id0")


def test_records() -> None:
    h, seqs = filled(2)
    result = h.since_seq("p:room", seqs[0] - 1, 10, now=T0 + 2)
    assert result == ReplayResult(
        [
            HistoryRecord(seqs[0], "id0", T0, "e", {"i": 0}),
            HistoryRecord(seqs[1], "id1", T0 + 1, "e", {"i": 1}),
        ],
        complete=True,
    )


def test_size_bound() -> None:
    h, seqs = filled(10, size=3)
    result = h.since_seq("p:room", seqs[6], 10, now=T0 + 10)
    assert [r.seq for r in result.records] == seqs[7:]
    assert result.complete
    assert not h.seen("p:room", "id0")


def test_since_seq_up_to_date_is_complete_and_empty() -> None:
    h, seqs = filled(3)
    assert h.since_seq("p:room", seqs[-1], 10, now=T0 + 3) == ReplayResult([], complete=True)


def test_since_seq_older_than_retained_is_incomplete() -> None:
    h, seqs = filled(10, size=3)
    result = h.since_seq("p:room", seqs[2], 10, now=T0 + 10)
    assert [r.seq for r in result.records] == seqs[7:]
    assert not result.complete


def test_since_seq_beyond_what_was_numbered_is_incomplete() -> None:
    h, seqs = filled(3)
    assert h.since_seq("p:room", seqs[-1] + 50, 10, now=T0 + 3) == ReplayResult([], complete=False)


def test_since_seq_on_an_unknown_channel_is_incomplete() -> None:
    assert MemoryHistory(10, 300).since_seq("p:x", 5, 10) == ReplayResult([], complete=False)


def test_since_seq_over_the_limit_is_incomplete_and_oldest_first() -> None:
    h, seqs = filled(10)
    result = h.since_seq("p:room", seqs[0], 4, now=T0 + 10)
    assert [r.seq for r in result.records] == seqs[1:5]
    assert not result.complete


def test_ttl() -> None:
    h, seqs = filled(5, ttl=2.5)
    result = h.since_seq("p:room", seqs[0] - 1, 10, now=T0 + 5)
    assert [r.seq for r in result.records] == seqs[3:]
    assert not result.complete
    assert not h.seen("p:room", "id0")


def test_size_zero_keeps_nothing_but_numbers_on() -> None:
    h, seqs = filled(3, size=0)
    assert seqs[2] == seqs[0] + 2
    assert not h.seen("p:room", "id0")
    assert h.since_seq("p:room", seqs[0], 10, now=T0 + 3) == ReplayResult([], complete=False)
    assert h.since_seq("p:room", seqs[2], 10, now=T0 + 3) == ReplayResult([], complete=True)


def test_since_time_takes_the_newest_oldest_first() -> None:
    h, seqs = filled(10)
    result = h.since_time("p:room", T0 + 2, 3, now=T0 + 10)
    assert [r.seq for r in result.records] == seqs[7:]
    assert not result.complete
    result = h.since_time("p:room", T0 + 8, 3, now=T0 + 10)
    assert [r.seq for r in result.records] == seqs[8:]
    assert result.complete


def test_since_time_unknown_channel_is_incomplete() -> None:
    # Nothing proves no message was sent since T0 (a restart or an eviction would look the same).
    assert MemoryHistory(10, 300).since_time("p:x", T0, 5) == ReplayResult([], complete=False)


def test_max_channels_drops_the_least_recently_published() -> None:
    h = MemoryHistory(10, 300, max_channels=2)
    h.append("p:a", "1", "e", {}, now=T0)
    h.append("p:b", "2", "e", {}, now=T0)
    h.append("p:a", "3", "e", {}, now=T0)  # a is now the most recent
    h.append("p:c", "4", "e", {}, now=T0)
    assert h.last_seq("p:b") is None
    assert h.last_seq("p:a") is not None and h.last_seq("p:c") is not None


def test_sweep_keeps_the_numbering_of_a_channel_with_subscribers() -> None:
    h, seqs = filled(3, ttl=10)
    h.pin("p:room")
    h.sweep(now=T0 + 100)
    assert not h.seen("p:room", "id2")
    assert h.last_seq("p:room") == seqs[-1]
    assert h.append("p:room", "new", "e", {}, now=T0 + 100) == seqs[-1] + 1


def test_sweep_drops_an_expired_ring_nobody_subscribes_to() -> None:
    h, seqs = filled(3, ttl=10)
    epoch = h.epoch("p:room")
    h.sweep(now=T0 + 100)
    assert h.last_seq("p:room") is None and len(h) == 0 and h.bytes == 0 and h.expired == 1
    # The channel's next ring numbers from the clock again, in another epoch.
    assert h.append("p:room", "new", "e", {}, now=T0 + 100) == int((T0 + 100) * 1_000_000)
    assert h.epoch("p:room") != epoch
    assert not h.since_seq("p:room", seqs[-1], 10, now=T0 + 100, epoch=epoch).complete
