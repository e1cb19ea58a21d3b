"""Per-channel sequence numbers and bounded broadcast history."""

from .memory import HistoryRecord, MemoryHistory, ReplayResult

__all__ = ["HistoryRecord", "MemoryHistory", "ReplayResult"]
