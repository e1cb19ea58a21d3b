"""Rate limits as token buckets (pure: the caller passes the clock), and the open-files limit."""

from __future__ import annotations

import resource

__all__ = ["TokenBucket", "raise_open_files_limit"]


def raise_open_files_limit() -> int:
    """Raise this process's soft open-files limit to the hard limit; returns the new soft limit.

    The server and the load generator both hold one descriptor per connection.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


class TokenBucket:
    """``rate`` tokens per second, holding at most ``capacity``; starts full."""

    __slots__ = ("capacity", "rate", "_stamp", "_tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens; False (and nothing taken) when there are not enough."""
        tokens = self._tokens + (now - self._stamp) * self.rate
        if tokens > self.capacity:
            tokens = self.capacity
        self._stamp = now
        if tokens < n:
            self._tokens = tokens
            return False
        self._tokens = tokens - n
        return True

    def available(self, now: float) -> float:
        """Tokens available at ``now``."""
        return min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
