"""The bounded queue of outgoing broadcasts kept while the client is not connected.

When full, the oldest message is dropped (with a warning and a metric): a fresh update is worth
more than a stale one. A message that fails after being sent is put back once, and gives up the
second time, so a poisoned message can never circulate forever. Every message carries a client
id, so receivers drop the copy a retry may produce.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["OutboundMessage", "SendQueue"]

logger = logging.getLogger("tidings.client")


@dataclasses.dataclass(slots=True, eq=False)
class OutboundMessage:
    """One broadcast waiting to be sent."""

    id: str
    """Client message id, put in the broadcast so receivers can deduplicate."""
    topic: str
    """``realtime:<name>`` of the channel it is for."""
    event: str
    """User event name."""
    payload: Any
    """User payload (a JSON value, or ``bytes`` in vsn 2.0.0)."""
    queued_at: float
    """Clock time at which it was first queued."""
    attempts: int = 0
    """How many times it was written to a socket."""
    on_done: Callable[[str], None] | None = None
    """Called once with the final status: ``"sent"``, ``"ok"``, ``"error"``, ``"dropped"``."""

    def finish(self, status: str) -> None:
        """Report the final status (once)."""
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback(status)


class SendQueue:
    """A FIFO of :class:`OutboundMessage` holding at most ``maxsize`` messages.

    Args:
        maxsize: capacity.
        on_drop: called with each message dropped because the queue was full.
    """

    __slots__ = ("_items", "dropped", "maxsize", "on_drop")

    def __init__(self, maxsize: int = 100, on_drop: Callable[[OutboundMessage], None] | None = None) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self.on_drop = on_drop
        self.dropped = 0
        """Messages dropped because the queue was full."""
        self._items: collections.deque[OutboundMessage] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[OutboundMessage]:
        return iter(list(self._items))

    def put(self, message: OutboundMessage) -> OutboundMessage | None:
        """Append ``message``; returns the message dropped to make room, if any."""
        dropped = None
        if len(self._items) >= self.maxsize:
            dropped = self._items.popleft()
            self.dropped += 1
            logger.warning(
                "send queue full (%d): dropped the oldest message %s (%s)",
                self.maxsize,
                dropped.id,
                dropped.event,
            )
            dropped.finish("dropped")
            if self.on_drop is not None:
                self.on_drop(dropped)
        self._items.append(message)
        return dropped

    def requeue(self, message: OutboundMessage) -> bool:
        """Put back a message whose send failed, unless it already had its one retry.

        Returns:
            True when it was queued again, False when it has given up.
        """
        if message.attempts >= 2:
            return False
        self.put(message)
        return True

    def take(self, accept: Callable[[OutboundMessage], bool]) -> list[OutboundMessage]:
        """Remove and return, in order, the messages ``accept`` says can go now; the rest stay in order."""
        taken: list[OutboundMessage] = []
        kept: collections.deque[OutboundMessage] = collections.deque()
        for message in self._items:
            (taken if accept(message) else kept).append(message)
        self._items = kept
        return taken

    def push_front(self, messages: list[OutboundMessage]) -> None:
        """Put ``messages`` back at the head, in their order (a flush that was cut short)."""
        self._items.extendleft(reversed(messages))
        while len(self._items) > self.maxsize:
            dropped = self._items.popleft()
            self.dropped += 1
            dropped.finish("dropped")
            if self.on_drop is not None:
                self.on_drop(dropped)

    def has_topic(self, topic: str) -> bool:
        """True when a message for ``topic`` is waiting (a new one must queue behind it)."""
        return any(m.topic == topic for m in self._items)

    def clear(self) -> list[OutboundMessage]:
        """Remove and return everything."""
        items = list(self._items)
        self._items.clear()
        return items
