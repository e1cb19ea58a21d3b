"""The broker contract: how a node publishes to, and hears from, every node of the cluster.

Delivery guarantees, stated once for every implementation:

* ``publish`` gives the message a per-channel sequence number and appends it to the channel's
  bounded history in one atomic step, then delivers it to every node subscribed to the channel
  (the publishing node included) through :meth:`Broker.bind`'s callback, in sequence order per
  channel. A message whose ``msg_id`` is already in the channel's history is not published again.
* Live delivery between nodes is at-most-once; what a node misses (a Redis reconnect) is filled
  from history, and what history no longer holds is reported (``gap`` callback), never silent.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from ..history import ReplayResult

__all__ = ["DUPLICATE", "FAILED", "Broker", "Envelope", "PublishDone"]

#: ``done`` results besides a sequence number: the id was already published / publishing failed.
DUPLICATE = 0
FAILED = -1

PublishDone = Callable[[int], None]


class Envelope:
    """A message travelling between nodes.

    ``kind`` is ``"b"`` (broadcast), ``"p"`` (presence diff) or ``"c"`` (postgres change).
    ``origin``/``exclude`` name the publishing node and the channel instance that must not get
    its own broadcast back (``self: false``).
    """

    __slots__ = ("event", "exclude", "id", "key", "kind", "origin", "payload", "seq", "topic")

    BROADCAST = "b"
    PRESENCE = "p"
    CHANGE = "c"

    def __init__(
        self,
        kind: str,
        key: str,
        topic: str,
        event: str,
        payload: Any,
        id: str | None = None,
        seq: int | None = None,
        origin: str | None = None,
        exclude: int | None = None,
    ) -> None:
        self.kind = kind
        self.key = key
        self.topic = topic
        self.event = event
        self.payload = payload
        self.id = id
        self.seq = seq
        self.origin = origin
        self.exclude = exclude

    def __repr__(self) -> str:
        return f"Envelope({self.kind!r}, {self.key!r}, event={self.event!r}, seq={self.seq!r})"


class Broker(abc.ABC):
    """Fan-out between nodes, channel history and cluster-wide presence."""

    #: True when every method completes before returning (the embedded memory broker), so a
    #: join can be answered in the same call; False when joins must wait for I/O.
    synchronous: bool = False
    node_id: str

    def bind(self, deliver: Callable[[Envelope], None], gap: Callable[[str], None] | None = None) -> None:
        """Set the callback that receives every envelope for channels this node subscribed to.

        ``gap(key)`` is called when messages of ``key`` were lost and history cannot fill them.
        """
        self._deliver = deliver
        self._gap = gap or (lambda key: None)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Disconnect."""

    @abc.abstractmethod
    def publish(
        self,
        key: str,
        topic: str,
        event: str,
        payload: Any,
        msg_id: str,
        exclude: int | None = None,
        done: PublishDone | None = None,
    ) -> None:
        """Number, store and deliver a broadcast; then ``done(seq)``, or ``DUPLICATE`` / ``FAILED``."""

    @abc.abstractmethod
    def publish_presence(self, key: str, topic: str, diff: dict[str, Any]) -> None:
        """Deliver a ``presence_diff`` to every node subscribed to ``key``."""

    @abc.abstractmethod
    async def subscribe(self, key: str) -> None:
        """Start receiving ``key``'s envelopes on this node (returns once it is live)."""

    @abc.abstractmethod
    def unsubscribe(self, key: str) -> None:
        """Stop receiving ``key`` (its last local subscriber left)."""

    @abc.abstractmethod
    async def replay(
        self, key: str, since_seq: int | None, since_time: float | None, limit: int
    ) -> ReplayResult:
        """History after ``since_seq`` (or since ``since_time`` seconds), oldest first."""

    @abc.abstractmethod
    async def last_seq(self, key: str) -> int | None:
        """The newest sequence number given on ``key`` (``None`` if none is known)."""

    @abc.abstractmethod
    def track(self, key: str, owner: int, presence_key: str, meta: dict[str, Any]) -> None:
        """Record ``owner``'s presence meta cluster-wide."""

    @abc.abstractmethod
    def untrack(self, key: str, owner: int) -> None:
        """Forget ``owner``'s presence meta."""

    @abc.abstractmethod
    async def presence_state(self, key: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """The cluster-wide ``presence_state`` payload of ``key``."""
