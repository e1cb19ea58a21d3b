"""Per-channel ordering by sequence number.

Messages are released in ``seq`` order. One that arrives early waits in a buffer; one older than
what was already released is a duplicate and is dropped. A gap that is not filled within
``gap_timeout`` is reported (:meth:`OrderBuffer.gap_expired`) so the caller can fetch the missing
range from history, and then :meth:`OrderBuffer.skip_gap` gives up on what could not be found:
the stream never stalls forever on a sequence number that was lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["OrderBuffer"]

T = TypeVar("T")


class OrderBuffer(Generic[T]):
    """Releases items in sequence order.

    Args:
        gap_timeout: seconds a gap may stay open before :meth:`gap_expired` turns true.
        max_buffered: early items held at most; beyond it :attr:`overflowing` is true.
        clock: monotonic clock in seconds.
    """

    __slots__ = ("_buffer", "_clock", "_gap_since", "dropped", "expected", "gap_timeout", "max_buffered")

    def __init__(
        self, gap_timeout: float = 2.0, max_buffered: int = 1000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if gap_timeout <= 0 or max_buffered < 1:
            raise ValueError("gap_timeout must be > 0 and max_buffered >= 1")
        self.gap_timeout = gap_timeout
        self.max_buffered = max_buffered
        self._clock = clock
        self.expected: int | None = None
        """The next sequence number to release; ``None`` until the first item sets the baseline."""
        self.dropped = 0
        """Items dropped as duplicates or older than what was released."""
        self._buffer: dict[int, T] = {}
        self._gap_since: float | None = None

    def __len__(self) -> int:
        """Items waiting for a gap to fill."""
        return len(self._buffer)

    @property
    def last_released(self) -> int | None:
        """The highest sequence number released so far (``None`` before the first)."""
        return None if self.expected is None else self.expected - 1

    @property
    def overflowing(self) -> bool:
        """True when more than ``max_buffered`` items wait."""
        return len(self._buffer) > self.max_buffered

    def offer(self, seq: int, item: T) -> list[T]:
        """Add one item; returns the items now ready, in order (possibly none)."""
        if self.expected is None:
            self.expected = seq
        if seq < self.expected or seq in self._buffer:
            self.dropped += 1
            return []
        self._buffer[seq] = item
        if seq != self.expected:
            if self._gap_since is None:
                self._gap_since = self._clock()
            return []
        return self._release()

    def gap(self) -> tuple[int, int] | None:
        """The missing range ``(first, last)`` (inclusive) before the earliest buffered item."""
        if not self._buffer or self.expected is None:
            return None
        return self.expected, min(self._buffer) - 1

    def gap_deadline(self) -> float | None:
        """Clock time at which the current gap expires (``None`` without a gap)."""
        return None if self._gap_since is None else self._gap_since + self.gap_timeout

    def gap_expired(self) -> bool:
        """True when a gap has stayed open for ``gap_timeout``."""
        deadline = self.gap_deadline()
        return deadline is not None and self._clock() >= deadline

    def skip_gap(self) -> list[T]:
        """Give up on the current gap: release from the earliest buffered item on."""
        if not self._buffer:
            return []
        self.expected = min(self._buffer)
        return self._release()

    def reset(self, expected: int | None = None) -> list[T]:
        """Move the baseline to ``expected`` (``None``: the next item sets it).

        Buffered items at or after the new baseline stay; older ones are dropped. Returns whatever
        became ready.
        """
        if expected is None:
            if not self._buffer:
                self.expected = None
                self._gap_since = None
                return []
            expected = min(self._buffer)
        self.expected = expected
        for seq in [s for s in self._buffer if s < expected]:
            del self._buffer[seq]
            self.dropped += 1
        if not self._buffer:
            self._gap_since = None
            return []
        return self._release()

    def _release(self) -> list[T]:
        ready: list[T] = []
        assert self.expected is not None
        # Bounded by the buffer's size: each turn removes one item.
        while self.expected in self._buffer:
            ready.append(self._buffer.pop(self.expected))
            self.expected += 1
        # A gap that moved is a new gap: it gets its own full timeout.
        self._gap_since = self._clock() if self._buffer else None
        return ready
