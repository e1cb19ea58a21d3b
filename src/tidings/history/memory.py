"""In-process channel history: a ring per channel, bounded in count, age and number of channels.

Sequence numbers start from the wall clock (milliseconds x 1000) when a channel's ring is created,
so they keep growing across evictions and server restarts: a client asking for ``since_seq`` older
than what is retained is told its recovery is incomplete instead of getting a silent gap.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict, deque
from typing import Any

__all__ = ["HistoryRecord", "MemoryHistory", "ReplayResult"]


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One stored broadcast."""

    seq: int
    id: str
    ts: float
    event: str
    payload: Any


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a rejoin gets: the records (oldest first) and whether nothing is missing."""

    records: list[HistoryRecord]
    complete: bool


class _Ring:
    __slots__ = ("first_seq", "ids", "last_seq", "records")

    def __init__(self, first_seq: int) -> None:
        self.records: deque[HistoryRecord] = deque()
        self.ids: dict[str, int] = {}
        self.first_seq = first_seq
        self.last_seq = first_seq - 1


class MemoryHistory:
    """History for the embedded (single-process) broker.

    Args:
        size: records kept per channel (0 keeps none but still numbers messages).
        ttl: seconds a record is kept.
        max_channels: channels with a ring; the least recently published is dropped beyond it.
    """

    def __init__(self, size: int, ttl: float, max_channels: int = 100_000) -> None:
        self.size = size
        self.ttl = ttl
        self.max_channels = max_channels
        self._rings: OrderedDict[str, _Ring] = OrderedDict()

    def _ring(self, key: str, now: float) -> _Ring:
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = _Ring(int(now * 1_000_000))
            if len(self._rings) > self.max_channels:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(key)
        return ring

    def seen(self, key: str, msg_id: str) -> bool:
        """True when a record with ``msg_id`` is still retained on ``key`` (a re-sent message)."""
        ring = self._rings.get(key)
        return ring is not None and msg_id in ring.ids

    def append(self, key: str, msg_id: str, event: str, payload: Any, now: float | None = None) -> int:
        """Store a broadcast and return its sequence number."""
        now = time.time() if now is None else now
        ring = self._ring(key, now)
        ring.last_seq += 1
        seq = ring.last_seq
        if self.size:
            rec = HistoryRecord(seq, msg_id, now, event, payload)
            ring.records.append(rec)
            ring.ids[msg_id] = seq
            self._trim(ring, now)
        return seq

    def _trim(self, ring: _Ring, now: float) -> None:
        records, cutoff = ring.records, now - self.ttl
        while records and (len(records) > self.size or records[0].ts < cutoff):
            old = records.popleft()
            ring.ids.pop(old.id, None)

    def last_seq(self, key: str) -> int | None:
        """The newest sequence number given on ``key``, if any."""
        ring = self._rings.get(key)
        return None if ring is None else ring.last_seq

    def since_seq(self, key: str, since_seq: int, limit: int, now: float | None = None) -> ReplayResult:
        """Records after ``since_seq``, oldest first, at most ``limit``; complete when none is missing."""
        now = time.time() if now is None else now
        ring = self._rings.get(key)
        if ring is None:
            return ReplayResult([], complete=False)
        self._trim(ring, now)
        if since_seq >= ring.last_seq:
            # Nothing newer; a since_seq beyond what we numbered means our numbering was lost.
            return ReplayResult([], complete=since_seq == ring.last_seq)
        newer = [r for r in ring.records if r.seq > since_seq]
        first_available = newer[0].seq if newer else ring.last_seq + 1
        # Asking from before the channel's first message is asking for everything.
        floor = max(since_seq, ring.first_seq - 1)
        complete = first_available == floor + 1 and len(newer) <= limit
        return ReplayResult(newer[:limit], complete)

    def since_time(self, key: str, since: float, limit: int, now: float | None = None) -> ReplayResult:
        """The newest ``limit`` records stored at or after ``since`` (seconds), oldest first."""
        now = time.time() if now is None else now
        ring = self._rings.get(key)
        if ring is None:
            return ReplayResult([], complete=True)
        self._trim(ring, now)
        newer = [r for r in ring.records if r.ts >= since]
        return ReplayResult(newer[-limit:], complete=len(newer) <= limit)

    def sweep(self, now: float | None = None) -> None:
        """Drop expired records (called by the node's periodic sweeper).

        Rings stay, so their numbering goes on; ``max_channels`` bounds how many there are.
        """
        now = time.time() if now is None else now
        for ring in self._rings.values():
            self._trim(ring, now)
