"""Percentiles and small summaries of latency samples."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentile", "summarize_ms"]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of already sorted values, nearest-rank; NaN when empty."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def summarize_ms(ns: Sequence[int], points: Sequence[float] = (50, 90, 95, 99, 99.9)) -> dict[str, float]:
    """``count``, ``min``, ``mean``, ``pNN`` and ``max`` in milliseconds of nanosecond samples."""
    values = sorted(ns)
    if not values:
        return {"count": 0}
    out: dict[str, float] = {
        "count": len(values),
        "min": round(values[0] / 1e6, 3),
        "mean": round(sum(values) / len(values) / 1e6, 3),
    }
    for p in points:
        out[f"p{p:g}"] = round(percentile(values, p) / 1e6, 3)
    out["max"] = round(values[-1] / 1e6, 3)
    return out
