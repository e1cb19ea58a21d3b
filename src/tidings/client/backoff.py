"""Jittered exponential backoff: 1 s, 2 s, 4 s ... capped at 30 s, each delay times ``U(0.75, 1.25)``.

The jitter spreads the reconnects of many clients that lost the same server at the same moment
over a window instead of a spike (a "reconnection storm"). The random source is injectable so the
spread can be checked without sleeping.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays of reconnect attempts.

    Args:
        base: delay of attempt 1, in seconds.
        cap: the largest delay before jitter.
        jitter: relative spread; the factor is uniform in ``[1 - jitter, 1 + jitter]``.
        rng: random source (a private ``random.Random()`` when ``None``).
    """

    __slots__ = ("base", "cap", "jitter", "rng")

    def __init__(
        self, base: float = 1.0, cap: float = 30.0, jitter: float = 0.25, rng: random.Random | None = None
    ) -> None:
        if base <= 0 or cap <= 0:
            raise ValueError("base and cap must be > 0")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self.rng = rng if rng is not None else random.Random()

    def nominal(self, attempt: int) -> float:
        """The delay of ``attempt`` (1-based) before jitter: ``min(base * 2**(attempt-1), cap)``."""
        if attempt < 1:
            raise ValueError("attempt numbers start at 1")
        # Cap the exponent too, so attempt 10_000 does not build a huge float.
        exponent = min(attempt - 1, 64)
        return min(self.base * (2.0**exponent), self.cap)

    def bounds(self, attempt: int) -> tuple[float, float]:
        """The smallest and largest delay ``attempt`` can get."""
        nominal = self.nominal(attempt)
        return nominal * (1 - self.jitter), nominal * (1 + self.jitter)

    def delay(self, attempt: int) -> float:
        """A jittered delay for ``attempt`` (1-based), in seconds."""
        factor = 1 - self.jitter + self.rng.random() * 2 * self.jitter
        return self.nominal(attempt) * factor

    def schedule(self, attempt: int, clients: int) -> list[float]:
        """The delays ``clients`` independent clients would wait before ``attempt``.

        A planning and testing aid: it shows how a fleet spreads over the jitter window without
        opening any socket.
        """
        return [self.delay(attempt) for _ in range(clients)]
