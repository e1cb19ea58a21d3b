"""A least-recently-used set of message ids.

A hit refreshes the id, so an id that keeps coming back (a retried message, a replay overlapping
live traffic) stays remembered; eviction removes the id seen longest ago, not the one inserted first.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable

__all__ = ["LRUSet"]


class LRUSet:
    """At most ``capacity`` ids, least recently seen evicted first.

    Args:
        capacity: ids remembered.
    """

    __slots__ = ("_items", "capacity")

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._items: collections.OrderedDict[Hashable, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        """Membership test that does not refresh the key."""
        return key in self._items

    def seen(self, key: Hashable) -> bool:
        """Record ``key``; True when it was already there (a duplicate), which refreshes it."""
        if key in self._items:
            self._items.move_to_end(key)
            return True
        self._items[key] = None
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return False

    def discard(self, key: Hashable) -> None:
        """Forget ``key``."""
        self._items.pop(key, None)

    def keys(self) -> list[Hashable]:
        """The ids, least recently seen first."""
        return list(self._items)
