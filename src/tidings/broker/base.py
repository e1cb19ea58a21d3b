"""The broker contract: how a node publishes to, and hears from, every node of the cluster.

Delivery guarantees, stated once for every implementation:

* ``publish`` gives the message a per-channel sequence number and appends it to the channel's
  bounded history in one atomic step, then delivers it to every node subscribed to the channel
  (the publishing node included) through :meth:`Broker.bind`'s callback, in sequence order per
  channel. De-duplication is per sender: a ``msg_id`` this ``sender`` already published (and the
  channel's history still holds) is not published again; one that *another* sender holds is
  published under a scoped id (``<msg_id>~<tag>``), so no sender can suppress another's message.
* Every channel's numbering has an *epoch*, which changes whenever the numbering was lost (history
  expired or evicted, a restart of the memory broker, a Redis data loss). :meth:`Broker.position`
  gives a join's baseline ``(seq, epoch)``; a replay is complete only when the history provably
  holds everything after ``since_seq`` in that epoch.
* Live delivery between nodes is at-most-once; what a node misses (a Redis reconnect) is filled
  from history, and what history no longer holds is reported (``gap`` callback), never silent.
* A join's reads (:meth:`Broker.join`) come after the node's subscription is live, so a message
  published meanwhile is either in the replay or delivered live (the node drops what is both).
  An in-process broker answers them at once (:meth:`Broker.join_now`): a join is then complete
  inside the call that received it, with no task and no await.

The change feed of Postgres Changes between nodes is a separate, smaller contract,
:class:`ChangeBus`: the brokers that span nodes offer it (:attr:`Broker.change_bus`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from ..history import ReplayResult

__all__ = [
    "DUPLICATE",
    "FAILED",
    "Broker",
    "ChangeBus",
    "Envelope",
    "JoinRead",
    "PresenceState",
    "PublishDone",
    "ReplayQuery",
    "sender_scope",
]

#: ``done`` results besides a sequence number: the id was already published / publishing failed.
DUPLICATE = 0
FAILED = -1

PublishDone = Callable[[int], None]
#: A ``presence_state`` payload: presence key -> ``{"metas": [meta, ...]}``.
PresenceState = dict[str, dict[str, list[dict[str, Any]]]]


class ReplayQuery(NamedTuple):
    """What a rejoin asks to be replayed: after ``since_seq`` (of ``epoch``), or since ``since_time``."""

    since_seq: int | None
    since_time: float | None
    limit: int
    epoch: str | None = None


class JoinRead(NamedTuple):
    """What a join reads from the broker: the replay asked for, ``presence_state``, the baseline.

    ``position`` is the channel's newest sequence number and the epoch of its numbering.
    """

    replay: ReplayResult | None
    presence: PresenceState | None
    position: tuple[int, str]


def sender_scope(role: str, sub: str | None, host: str) -> str:
    """Who published a message, for de-duplication and history accounting.

    The token's ``sub`` when it has one (the same user on any connection or address), else its
    role at the client's address (``anon@203.0.113.7``): tokens without ``sub``, such as the anon
    and service keys, are shared by many clients, and one of them must not pass for another.
    """
    return f"sub:{sub}" if sub else f"{role}@{host}"


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

    def history_stats(self) -> dict[str, int]:
        """Counters and gauges of this broker's history for ``/metrics`` (see metrics_http)."""
        return {"scoped_ids": getattr(self, "scoped_ids", 0)}

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Disconnect."""

    def sweep(self, now: float) -> None:  # noqa: B027 - optional hook
        """Periodic upkeep from the node's sweeper (every few seconds): expire old history.

        ``now`` is wall-clock seconds (tests pass a fake one).
        """

    def pending(self) -> int:
        """Commands queued for the broker and not answered yet (0 when it queues none).

        Part of ``tidings_queued_messages`` and the queue-backlog alert.
        """
        return 0

    @property
    def change_bus(self) -> ChangeBus | None:
        """The change feed between nodes, when this broker spans nodes; ``None`` when it does not
        (one process: Postgres Changes stream the slot and deliver locally)."""
        return None

    def join_now(
        self, key: str, replay: ReplayQuery | None, presence: bool, owner: str = ""
    ) -> JoinRead | None:
        """:meth:`join` answered at once, or ``None`` (nothing done) when the reads need I/O.

        In-process brokers answer here, so the node completes a join inside the call that
        received it: no task, no await, nothing delivered in between.
        """
        return None

    async def join(self, key: str, replay: ReplayQuery | None, presence: bool, owner: str = "") -> JoinRead:
        """Subscribe this node to ``key`` (:meth:`subscribe`), then read what a join needs.

        In this order, once the subscription is live: the ``replay`` asked for (``None``: none),
        the ``presence_state`` when ``presence``, and the :meth:`position` (charged to ``owner``).
        """
        await self.subscribe(key)
        result = await self.replay(key, *replay) if replay is not None else None
        state = await self.presence_state(key) if presence else None
        position = await self.position(key, owner)
        return JoinRead(result, state, position)

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
        sender: str = "",
    ) -> None:
        """Number, store and deliver a broadcast; then ``done(seq)``, or ``DUPLICATE`` / ``FAILED``.

        ``sender`` (see :func:`sender_scope`) scopes the de-duplication of ``msg_id``.
        """

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
        self,
        key: str,
        since_seq: int | None,
        since_time: float | None,
        limit: int,
        epoch: str | None = None,
    ) -> ReplayResult:
        """History after ``since_seq`` (or since ``since_time`` seconds), oldest first.

        ``complete`` only when nothing after ``since_seq`` is missing: ``since_seq`` was given by
        the channel's current numbering (its ``epoch``, when the client passes it back, matches),
        and nothing after it was trimmed or cut by ``limit``.
        """

    @abc.abstractmethod
    async def last_seq(self, key: str) -> int | None:
        """The newest sequence number given on ``key`` (``None`` if none is known)."""

    @abc.abstractmethod
    async def position(self, key: str, owner: str = "") -> tuple[int, str]:
        """``(newest seq, epoch)`` of ``key``, starting its numbering if it has none.

        A join's baseline, so a client that joined before any message can later prove it missed
        nothing. ``owner`` is the joining sender (history of a new channel is charged to it).
        """

    @abc.abstractmethod
    def track(self, key: str, owner: int, presence_key: str, meta: dict[str, Any]) -> None:
        """Record ``owner``'s presence meta cluster-wide."""

    @abc.abstractmethod
    def untrack(self, key: str, owner: int) -> None:
        """Forget ``owner``'s presence meta."""

    @abc.abstractmethod
    async def presence_state(self, key: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """The cluster-wide ``presence_state`` payload of ``key``."""


class ChangeBus(Protocol):
    """Postgres Changes between nodes: one node streams the slot, every node delivers.

    The node holding the lease (:meth:`lease`) publishes each streamed change with
    :meth:`publish_change`; every node subscribed to the key (:meth:`subscribe`), the publisher
    included, receives it as an :attr:`Envelope.CHANGE` through :meth:`Broker.bind`'s callback.
    Commands run in the order they are queued: ``after_queued(done)`` is called once every publish
    queued before it was answered, which is when the slot position may be confirmed.
    """

    node_id: str

    async def subscribe(self, key: str) -> None:
        """Start receiving ``key``'s envelopes on this node."""

    def publish_change(self, key: str, change: dict[str, Any], done: Callable[[Any], None]) -> None:
        """Send one change (JSON-ready data) to every node subscribed to ``key``; then ``done(result)``,
        an exception instance when it could not be handed over."""

    def after_queued(self, done: Callable[[Any], None]) -> None:
        """Call ``done(result)`` once every command queued before it was answered (in order)."""

    async def lease(self, name: str, ttl: float) -> bool:
        """Take the lease ``name`` for ``ttl`` seconds when it is free, or renew it when this node
        holds it; True when this node holds it afterwards. Raises when the bus is unreachable."""

    async def resign(self, name: str) -> None:
        """Give up the lease ``name`` if this node holds it (another node may take it at once)."""

    # The change log (``cdc.cluster.BusChangeLog``): written by the lease holder in the order of
    # its publishes, read by every node. Positions are ``protocol.positions`` strings.

    def log_begin(self, start: str, after: str, epoch: str) -> None:
        """A stream starts at ``start`` (16 hex digits): continue the log if it recorded up to
        there, else start over with ``epoch``, covering what comes ``after`` (queued)."""

    def log_change(
        self, table: str, position: str, entry: bytes, limits: tuple[int, int, float], epoch: str, before: str
    ) -> None:
        """Log one change of ``table`` (JSON ``entry``), bounded by ``limits`` (count, bytes, ttl
        seconds); ``epoch`` and ``before`` start a log that was lost. Queued before what follows."""

    def log_through(self, end: str) -> None:
        """Every change before the transaction end ``end`` (16 hex digits) was logged (queued)."""

    async def log_state(self) -> dict[str, str]:
        """The log's state: ``epoch``, ``after``, ``head``, ``last:<table>``, ``trim:<table>``."""

    async def log_read(self, table: str, after: str, count: int) -> list[tuple[str, float, bytes]]:
        """``(position, logged at, change JSON)`` of ``table`` after ``after``, at most ``count``."""
