"""One Tidings node: the one door between connections and everything they share.

Connections (``session.Session``) call the node's verbs: :meth:`Node.join_now` / :meth:`Node.join_read`
and :meth:`Node.attach` to join, :meth:`Node.leave`, :meth:`Node.track` / :meth:`Node.untrack`,
:meth:`Node.publish_broadcast` / :meth:`Node.publish_presence`, :meth:`Node.permissions_now` /
:meth:`Node.permissions` (private channels, through :attr:`Node.authorizer`). The node knows
them only through the small :class:`Member` and :class:`Subscriber` protocols, and the broker
only through :class:`~tidings.broker.base.Broker`.
The node never blocks. A single periodic sweeper checks heartbeat deadlines and token expiry for
all connections (no timer per connection); what else runs once a second registers with
:meth:`Node.on_tick` (the RTT monitor, ``server/monitor.py``).
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Hashable, Sequence
from datetime import datetime
from typing import Any, Protocol

import orjson

from .auth.policy import AuthorizationContext, Authorizer, Permissions, PolicyAuthorizer
from .auth.tokens import Principal, Verifier
from .broker.base import Broker, Envelope, JoinRead, PublishDone, ReplayQuery
from .config import Config
from .hub import Hub, Writer
from .limits import TokenBucket
from .logs import flush_suppressed, redact, secrets_of, set_log_rate_limit
from .metrics import NodeMetrics
from .protocol.codec import Outbound, Serializer, encode_change
from .protocol.join import TOPIC_PREFIX
from .protocol.positions import ChangesReplay, ChangesResume, ResumeRefused

__all__ = [
    "READ",
    "SWEEP_INTERVAL",
    "WRITE",
    "ArchivedMessage",
    "ChangeFeed",
    "Member",
    "MessageArchive",
    "MessagesFeed",
    "Node",
    "Subscriber",
    "group_key",
]

REPLICATION_LAG_WARNING = 64 * 1024 * 1024  # bytes of unconfirmed WAL worth a log line
STOP_TIMEOUT = 10.0  # seconds stop_tasks() waits for background tasks to finish their clean-up

log = logging.getLogger("tidings.node")

SWEEP_INTERVAL = 1.0
JOIN_WINDOW = 10.0  # joins/s are averaged over this window (Supabase averages over 60 s)
READ = "read"
"""What :meth:`Node.permissions_now` / :meth:`Node.permissions` evaluate: read (join, history)..."""
WRITE = "write"
"""... or write (broadcast, track, REST)."""
REPLAYED_IDS_MAX = 25  # ids of a replay from the database whose live copies a channel skips


def group_key(private: bool, sub_topic: str) -> str:
    """Fan-out group of a channel: public and private channels of one name are separate."""
    return ("x:" if private else "p:") + sub_topic


class Member(Protocol):
    """A connection, as the node sees it (``session.Session`` is one)."""

    serializer: Serializer
    #: Writes one complete WebSocket frame (the transport's ``write`` while open).
    write: Writer

    @property
    def closed(self) -> bool:
        """The connection is closed (or closing)."""

    @property
    def last_seen(self) -> int:
        """The sweeper tick at which the client last sent anything."""

    def close(self, code: int, reason: str = "") -> None:
        """Close the connection with a WebSocket close code."""

    def watch(self, tick: int) -> bool:
        """The sweeper's tick while in :attr:`Node.watched`; False stops the calls."""

    def peer_host(self) -> str:
        """The client's address ("" when unknown)."""

    def said_goodbye(self) -> bool:
        """The client closed the connection itself, on purpose (not a reconnect: see metrics)."""


class Subscriber(Hashable, Protocol):
    """A channel instance joined on this node (``session.Channel`` is one)."""

    #: Presence key of the channel; "" until the first track generates one.
    presence_key: str

    @property
    def cid(self) -> int:
        """Node-unique id (:meth:`Node.new_channel_id`)."""

    @property
    def key(self) -> str:
        """Fan-out group (:func:`group_key`)."""

    @property
    def topic(self) -> str:
        """``realtime:<sub_topic>``."""

    @property
    def closed(self) -> bool:
        """The channel was left."""

    @property
    def principal(self) -> Principal:
        """The identity the channel runs as (its token)."""

    @property
    def session(self) -> Member:
        """The connection the channel belongs to."""

    def token_expired(self, exp: float, now: float) -> None:
        """Called by the sweeper when a scheduled expiry (:meth:`Node.schedule_expiry`) is due."""

    def messages_lost(self) -> None:
        """The broker lost messages of the channel it cannot replay: tell the client."""


class ChangeFeed(Protocol):
    """Postgres Changes, as the node uses them (``cdc.service.PostgresChanges`` is one)."""

    def binding_id(self, binding: dict[str, Any]) -> int:
        """The stable id of a ``postgres_changes`` binding."""

    async def subscribe(
        self, owner: Hashable, bindings: Sequence[tuple[int, dict[str, Any]]], claims: dict[str, Any] | None
    ) -> None:
        """Register ``owner``'s bindings (raises ``cdc.index.SubscriptionError``)."""

    def unsubscribe(self, owner: Hashable) -> None:
        """Drop every binding of ``owner``."""

    async def slot_lag_bytes(self) -> int | None:
        """WAL bytes the slot has not confirmed (``None`` when unknown)."""

    async def resume(
        self, owner: Hashable, since: str | None, epoch: str | None, *, max_changes: int, max_bytes: int
    ) -> ChangesReplay:
        """The changes after ``since`` that ``owner``'s bindings match now (raises ``ResumeRefused``)."""

    async def poll(
        self,
        bindings: Sequence[tuple[int, dict[str, Any]]],
        claims: dict[str, Any] | None,
        since: str | None,
        epoch: str | None,
        *,
        max_changes: int,
        max_bytes: int,
        timeout: float = 0.0,
        stop: asyncio.Future[None] | None = None,
    ) -> ChangesReplay:
        """One page of the change log for bindings without a subscription (``GET /api/changes``;
        raises ``SubscriptionError``, ``ResumeRefused``)."""


class MessagesFeed(Protocol):
    """Broadcast from Database, as ``replication_ready`` joins see it
    (``db.broadcast.BroadcastFromDatabase`` is one; set by the composition root)."""

    @property
    def ready(self) -> bool:
        """The stream of ``realtime.messages`` is live."""

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until :attr:`ready` (at once if it is); False when *timeout* seconds passed first."""


class ArchivedMessage(Protocol):
    """One row of ``realtime.messages`` to replay (``db.replay.ReplayedMessage`` is one)."""

    @property
    def id(self) -> str:
        """The row's id (``meta.id``)."""

    @property
    def event(self) -> str:
        """The user event."""

    @property
    def payload(self) -> Any:
        """The JSON payload, or ``bytes`` when :attr:`binary`."""

    @property
    def binary(self) -> bool:
        """A ``binary_payload`` row (a binary broadcast, vsn 2.0.0 only)."""


class MessageArchive(Protocol):
    """Replay of private channels from ``realtime.messages`` (``db.replay.DatabaseReplay`` is one)."""

    async def replay(self, sub_topic: str, since: int, limit: int) -> Sequence[ArchivedMessage]:
        """The newest *limit* (1..25) messages of *sub_topic* since *since* (ms epoch), oldest first.

        Raises:
            Exception: with a ``reason`` attribute, the join error (bad *since*, query failed).
        """


class Node:
    """State shared by every connection of this process.

    Args:
        config: the settings.
        broker: between nodes (``broker.make_broker`` picks it; the node knows the interface only).
    """

    def __init__(self, config: Config, broker: Broker) -> None:
        self.config = config
        self.verifier = Verifier(
            config.jwt_secret,
            config.jwt_jwks,
            config.jwt_claim_validators,
            max_token_bytes=config.max_token_bytes,
            cache_bytes=config.token_cache_bytes,
        )
        #: Who may read and write private channels (join, broadcast, track, REST, history): the
        #: ``CHANNEL_POLICY``; the composition root puts Supabase's RLS checks here with a database.
        self.authorizer: Authorizer = PolicyAuthorizer(config.channel_policy)
        #: Broadcast from Database and its archive, when ``DATABASE_URL`` is set (composition root).
        self.messages_feed: MessagesFeed | None = None
        self.message_archive: MessageArchive | None = None
        # Members of a group that may not read its broadcasts / its presence (private channels
        # whose policies allow only the other extension): skipped by the fan-out of that kind.
        self.broadcast_unread: dict[str, set[Subscriber]] = {}
        self.presence_unread: dict[str, set[Subscriber]] = {}
        # Message ids a channel replayed from the database: their live copies skip it.
        self.replayed: dict[str, dict[str, set[Subscriber]]] = {}
        self._replayed_by: dict[Subscriber, tuple[str, ...]] = {}
        # Per channel, the messages waiting for its first write check, and the newest token a
        # refresh is checking (both only while a check runs; session.Session uses them).
        self.write_checks: dict[Subscriber, list[tuple[str, Any, int]]] = {}
        self.refreshes: dict[Subscriber, Principal] = {}
        self.hub = Hub()
        self.broker = broker
        self.broker.bind(self.deliver, self.report_gap)
        self.node_id = self.broker.node_id
        self.metrics = NodeMetrics()
        # Channel instances by id, so a broadcast coming back from the broker can skip its sender.
        self.channel_ids: dict[int, Subscriber] = {}
        self._next_cid = 0
        # The sequence number and id of the envelope being fanned out (read by joins still buffering).
        self.delivering_seq: int | None = None
        self.delivering_id: str | None = None
        # One-shot callbacks waiting for the next broadcast of a key (HTTP long-polls), and how
        # many holders besides channels keep each key's broker subscription (hold / let_go).
        self._next_broadcast: dict[str, list[Callable[[], None]]] = {}
        self._holds: Counter[str] = Counter()
        # Postgres Changes, when DATABASE_URL is set (attached by the app before start()).
        self.cdc: ChangeFeed | None = None
        self._on_change: Callable[[Any], None] | None = None
        # Channels resuming Postgres Changes: their live changes wait here while their replay is
        # read (position, frame); after it, live changes up to where it read are dropped (they
        # were replayed, or are not for them) until a later one comes; and the channels that get
        # each change's position as the push's ref.
        self._change_buffers: dict[Subscriber, list[tuple[str, bytes]]] = {}
        self._change_floors: dict[Subscriber, str] = {}
        self._position_refs: set[Subscriber] = set()
        self.replication_lag_bytes: int | None = None
        now = time.monotonic()
        self.join_bucket = TokenBucket(
            config.max_joins_per_second, config.max_joins_per_second * JOIN_WINDOW, now
        )
        self.message_bucket = TokenBucket(
            config.max_node_messages_per_second, config.max_node_messages_per_second, now
        )
        self.log_bucket = TokenBucket(5, 20, now)  # log lines about bad client input
        # Non-broadcast messages (heartbeats, joins, pushes, garbage) one connection may send a
        # second before the rest are dropped: far above any real client, far below a flood.
        self.control_limit = max(100, 10 * config.max_messages_per_second)
        self.sessions: set[Member] = set()
        self.users: Counter[str] = Counter()
        # Connections the sweeper calls each tick (Member.watch): an unfinished fragmented
        # message, a join's catch-up beyond MAX_UNSENT_BYTES. A set, not a slot or timer each.
        self.watched: set[Member] = set()
        # Connections still holding a join's catch-up beyond MAX_UNSENT_BYTES: the least unsent
        # bytes seen and the tick they were seen (server.websocket, end_catchup).
        self.catchups: dict[Member, tuple[int, int]] = {}
        self.fragment_bytes = 0  # bytes of unfinished fragmented messages, all connections
        # Join error replies waiting out CHANNEL_ERROR_BACKOFF_MS, per connection that has any.
        self.pending_join_errors: Counter[Member] = Counter()
        self.tick = 0
        self.draining = False
        self.started_at = time.time()
        self._expiry: list[tuple[float, int, Subscriber]] = []
        self._expiry_seq = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._tick_callbacks: list[Callable[[], None]] = []
        self._drain_callbacks: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_payload_bytes = config.max_payload_size_kb * 1024
        # Silent for more than 2 heartbeat intervals -> closed; counted in sweeper ticks.
        self.idle_ticks = max(2, math.ceil(2 * config.heartbeat_interval / SWEEP_INTERVAL))
        # Logs never carry these (the log handler's Redactor masks them).
        redact(*secrets_of(*config.secret_values()))
        set_log_rate_limit(config.log_rate_limit)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the node runs on."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the broker and start the shared sweeper."""
        self._loop = asyncio.get_running_loop()
        # Modules, classes and functions loaded at start live as long as the process: keep them
        # out of the cyclic collector's full passes, which otherwise scan them again and again.
        gc.freeze()
        await self.broker.start()
        self._sweeper = self._loop.create_task(self._sweep_forever(), name="tidings-sweeper")

    async def stop_tasks(self) -> None:
        """Stop the sweeper, then cancel the background tasks and wait for them to finish.

        Their clean-up runs while the broker is still up (the change-feed leader resigns its
        lease through it); a task still busy after :data:`STOP_TIMEOUT` is left behind.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            _, busy = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            if busy:
                log.warning("%d background tasks did not stop within %.0f s", len(busy), STOP_TIMEOUT)

    async def stop(self) -> None:
        """Stop the tasks (:meth:`stop_tasks`), then the broker (connections are closed by the drain).

        The composition root stops what it attached (Postgres Changes) between the two.
        """
        await self.stop_tasks()
        await self.broker.stop()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.sweep()
            except Exception:
                log.exception("sweeper failed")

    def on_tick(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` at the end of every sweep, once a second (the RTT monitor)."""
        self._tick_callbacks.append(callback)

    def on_drain(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once, when the node starts draining (waiting long-polls answer)."""
        self._drain_callbacks.append(callback)

    def sweep(self, now: float | None = None) -> None:
        """One pass: idle connections, expired channel tokens, old history, then the tick callbacks.

        ``now`` (wall-clock seconds) is for tests that fake the time; the sweeper passes none.
        """
        self.tick += 1
        limit = self.tick - self.idle_ticks
        for session in [s for s in self.sessions if s.last_seen < limit]:
            self.metrics.heartbeat_timeouts += 1
            session.close(1000, "heartbeat timeout")
        if self.watched:
            for session in list(self.watched):
                if not session.watch(self.tick):
                    self.watched.discard(session)
        flush_suppressed()
        now = time.time() if now is None else now
        heap = self._expiry
        while heap and heap[0][0] <= now:
            exp, _, channel = heapq.heappop(heap)
            channel.token_expired(exp, now)
        if self.tick % 10 == 0:
            self.broker.sweep(now)
            if self.cdc is not None:
                self.loop.create_task(self.refresh_replication_lag())
        self.metrics.tick()
        for callback in self._tick_callbacks:
            try:
                callback()
            except Exception:
                log.exception("tick callback %r failed", callback)

    def schedule_expiry(self, channel: Subscriber, exp: float) -> None:
        """Check ``channel``'s token at ``exp`` (stale entries are ignored by the channel)."""
        self._expiry_seq += 1
        heap = self._expiry
        if len(heap) > 2 * len(self.channel_ids) + 1024:
            # Drop entries of channels that left or got a new token: otherwise a client joining
            # and leaving with a long-lived token grows the heap, and pins every closed channel
            # (and its session), until that token expires. Amortised O(1) per call.
            heap[:] = [e for e in heap if not e[2].closed and e[2].principal.exp == e[0]]
            heapq.heapify(heap)
        heapq.heappush(heap, (exp, self._expiry_seq, channel))

    def drain(self, window: float | None = None) -> None:
        """Close every connection with 1012, in batches spread over ``window`` seconds."""
        if self.draining:
            return
        self.draining = True
        for callback in self._drain_callbacks:
            callback()
        window = self.config.drain_window if window is None else window
        pending = list(self.sessions)
        log.info("draining %d connections over %.1f s", len(pending), window)
        step = 0.1
        batches = max(1, int(window / step))
        size = max(1, math.ceil(len(pending) / batches))

        def close_batch(start: int) -> None:
            for session in pending[start : start + size]:
                session.close(1012, "server restarting")
            if start + size < len(pending):
                self.loop.call_later(step, close_batch, start + size)

        if pending:
            close_batch(0)

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a node-lifetime task; :meth:`stop_tasks` cancels it and waits for it."""
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- connections -------------------------------------------------------------------------

    def register(self, session: Member, user: str | None) -> None:
        """Count an accepted connection (``user``: what MAX_CONNECTIONS_PER_USER counts it as)."""
        self.sessions.add(session)
        if user is not None:
            self.users[user] += 1
        self.metrics.connections_total += 1
        self.metrics.connection_opened(user or session.peer_host() or None)

    def unregister(self, session: Member, user: str | None) -> None:
        """Forget a closed connection."""
        self.sessions.discard(session)
        self.metrics.connection_closed(user or session.peer_host() or None, session.said_goodbye())
        if user is not None:
            left = self.users[user] - 1
            if left > 0:
                self.users[user] = left
            else:
                del self.users[user]

    # -- authorization (private channels; public ones are open to every token) ---------------

    def access_context(
        self, principal: Principal, sub_topic: str, headers: Any = None
    ) -> AuthorizationContext:
        """Who asks about a private channel: ``principal``'s claims (and the request headers)."""
        return AuthorizationContext(sub_topic, principal.claims, headers)

    def permissions_now(
        self, context: AuthorizationContext, kind: str, *, presence: bool, refresh: bool = False
    ) -> Permissions | None:
        """The :data:`READ` or :data:`WRITE` permissions of ``context`` when known without I/O
        (the declarative policy, ``service_role``, a cached result); None: ask :meth:`permissions`."""
        authorizer = self.authorizer
        if kind == READ:
            return authorizer.read_now(context, presence=presence, refresh=refresh)
        return authorizer.write_now(context, presence=presence, refresh=refresh)

    async def permissions(
        self, context: AuthorizationContext, kind: str, *, presence: bool, refresh: bool = False
    ) -> Permissions:
        """The :data:`READ` or :data:`WRITE` permissions of ``context``, evaluated (a database
        query unless cached). Raises ``auth.policy.AuthorizationUnavailable``."""
        if kind == READ:
            return await self.authorizer.read(context, presence=presence, refresh=refresh)
        return await self.authorizer.write(context, presence=presence, refresh=refresh)

    def set_reads(self, channel: Subscriber, permissions: Permissions) -> None:
        """Deliver to ``channel`` the broadcasts and presence diffs ``permissions`` let it read,
        and no others (a private channel whose policies allow only one of them)."""
        key = channel.key
        for allowed, unread in (
            (permissions.broadcast_read is True, self.broadcast_unread),
            (permissions.presence_read is True, self.presence_unread),
        ):
            members = unread.get(key)
            if allowed:
                if members is not None:
                    members.discard(channel)
                    if not members:
                        del unread[key]
            elif members is None:
                unread[key] = {channel}
            else:
                members.add(channel)

    def skip_replayed(self, channel: Subscriber, ids: Sequence[str]) -> None:
        """``channel`` got the messages ``ids`` replayed from the database: skip their live copies
        (at most :data:`REPLAYED_IDS_MAX`, for as long as the channel is joined)."""
        ids = tuple(ids[-REPLAYED_IDS_MAX:])
        if not ids:
            return
        self._forget_replayed(channel)
        by_id = self.replayed.setdefault(channel.key, {})
        for msg_id in ids:
            by_id.setdefault(msg_id, set()).add(channel)
        self._replayed_by[channel] = ids

    def _forget_replayed(self, channel: Subscriber) -> None:
        ids = self._replayed_by.pop(channel, None)
        if ids is None:
            return
        by_id = self.replayed.get(channel.key)
        if by_id is None:
            return
        for msg_id in ids:
            members = by_id.get(msg_id)
            if members is not None:
                members.discard(channel)
                if not members:
                    del by_id[msg_id]
        if not by_id:
            del self.replayed[channel.key]

    def _forget_reads(self, channel: Subscriber) -> None:
        key = channel.key
        for unread in (self.broadcast_unread, self.presence_unread):
            members = unread.get(key)
            if members is not None:
                members.discard(channel)
                if not members:
                    del unread[key]

    # -- channels ----------------------------------------------------------------------------

    def new_channel_id(self) -> int:
        """A node-unique id for a channel instance."""
        self._next_cid += 1
        return self._next_cid

    def open_channel(self, channel: Subscriber) -> None:
        """A channel instance starts joining: known by id (``self: false``), counted, and its
        token's expiry scheduled."""
        self.channel_ids[channel.cid] = channel
        self.metrics.joins += 1
        exp = channel.principal.exp
        if exp is not None:
            self.schedule_expiry(channel, exp)

    def join_now(
        self, channel: Subscriber, write: Writer, replay: ReplayQuery | None, presence: bool, owner: str
    ) -> JoinRead | None:
        """Join at once when the broker answers a join's reads without I/O (the memory broker):
        ``channel`` then receives fan-out through ``write``. ``None``, with nothing done, when
        the broker needs I/O: then :meth:`attach` a buffering writer and :meth:`join_read`."""
        read = self.broker.join_now(channel.key, replay, presence, owner)
        if read is not None:
            self.hub.add(channel.key, channel.topic, channel, channel.session.serializer, write)
        return read

    def attach(self, channel: Subscriber, write: Writer) -> None:
        """Fan out ``channel``'s group to it through ``write`` (replacing an earlier writer)."""
        self.hub.add(channel.key, channel.topic, channel, channel.session.serializer, write)

    async def join_read(
        self, channel: Subscriber, replay: ReplayQuery | None, presence: bool, owner: str
    ) -> JoinRead:
        """Subscribe the node to ``channel``'s group in the broker, then read the replay, the
        presence state and the baseline position (``broker.base.Broker.join``)."""
        return await self.broker.join(channel.key, replay, presence, owner)

    def leave(self, channel: Subscriber) -> None:
        """``channel`` is gone: no more fan-out, its presence leaves, the broker subscription is
        dropped once nothing on this node needs it."""
        key = channel.key
        self.channel_ids.pop(channel.cid, None)
        if self.broadcast_unread or self.presence_unread:
            self._forget_reads(channel)
        if self._replayed_by:
            self._forget_replayed(channel)
        group = self.hub.remove(key, channel)
        if group is None:
            return
        if group.presence is not None:
            diff = group.presence.untrack(channel)
            if diff is not None:
                self.broker.untrack(key, channel.cid)
                self.publish_presence(key, channel.topic, diff)
            if not group.presence and not group.v1 and not group.v2:
                self.hub.groups.pop(key, None)
        self.release(key)

    # -- presence ----------------------------------------------------------------------------

    def track(self, channel: Subscriber, state: dict[str, Any]) -> dict[str, Any] | None:
        """Track ``channel``'s presence with ``state``; returns the diff to publish (``None``:
        nothing changed). Raises ``LookupError`` when the channel's group is not on this node."""
        group = self.hub.groups.get(channel.key)
        if group is None:
            raise LookupError(channel.key)
        presence = self.hub.presence_for(group)
        if not channel.presence_key:
            channel.presence_key = self.hub.refs()
        diff = presence.track(channel, channel.presence_key, state)
        meta = presence.meta_of(channel)
        if diff is not None and meta is not None:
            self.broker.track(channel.key, channel.cid, channel.presence_key, meta)
        return diff

    def untrack(self, channel: Subscriber) -> dict[str, Any] | None:
        """Stop tracking ``channel``'s presence; returns the diff to publish, like :meth:`track`."""
        group = self.hub.groups.get(channel.key)
        if group is None:
            raise LookupError(channel.key)
        diff = self.hub.presence_for(group).untrack(channel)
        if diff is not None:
            self.broker.untrack(channel.key, channel.cid)
        return diff

    # -- Postgres Changes for channels -------------------------------------------------------

    @property
    def changes_enabled(self) -> bool:
        """Postgres Changes are configured (``DATABASE_URL``)."""
        return self.cdc is not None

    def change_binding_id(self, binding: dict[str, Any]) -> int:
        """The id a ``postgres_changes`` binding gets in the join reply."""
        assert self.cdc is not None
        return self.cdc.binding_id(binding)

    async def subscribe_changes(
        self,
        channel: Subscriber,
        bindings: Sequence[tuple[int, dict[str, Any]]],
        claims: dict[str, Any] | None,
    ) -> None:
        """Register ``channel``'s bindings (raises ``cdc.index.SubscriptionError``)."""
        assert self.cdc is not None
        await self.cdc.subscribe(channel, bindings, claims)

    def unsubscribe_changes(self, channel: Subscriber) -> None:
        """Drop ``channel``'s bindings (nothing when Postgres Changes are off)."""
        self._change_buffers.pop(channel, None)
        self._change_floors.pop(channel, None)
        self._position_refs.discard(channel)
        if self.cdc is not None:
            self.cdc.unsubscribe(channel)

    def hold_changes(self, channel: Subscriber) -> None:
        """Keep ``channel``'s live changes until :meth:`release_changes` (a resume is being read),
        and send it each change's position as the push's ref from now on."""
        self._change_buffers[channel] = []
        self._position_refs.add(channel)

    def release_changes(self, channel: Subscriber, replayed_to: str) -> list[bytes]:
        """The live changes held for ``channel`` after ``replayed_to`` (where its replay read the
        log), in order; from now on they are written to it at once, but those up to
        ``replayed_to`` are dropped: a change logged before the replay read can reach delivery
        after it (behind the RLS checks, from another node)."""
        held = self._change_buffers.pop(channel, [])
        self._change_floors[channel] = replayed_to
        return [frame for position, frame in held if position > replayed_to]

    async def poll_changes(
        self,
        binding: dict[str, Any],
        claims: dict[str, Any] | None,
        since: str | None,
        epoch: str | None,
        timeout: float,
        stop: asyncio.Future[None] | None = None,
    ) -> ChangesReplay:
        """One page of the change log after ``since`` for one binding, as a resume with these
        claims would replay it (filters, columns, RLS); waits up to ``timeout`` for a first change.

        Raises:
            SubscriptionError: a bad binding.
            ResumeRefused: a position ahead of the database (counted).
        """
        assert self.cdc is not None
        config = self.config
        try:
            page = await self.cdc.poll(
                [(self.cdc.binding_id(binding), binding)],
                claims,
                since,
                epoch,
                max_changes=config.db_replay_max_changes,
                max_bytes=config.db_replay_max_bytes,
                timeout=timeout,
                stop=stop,
            )
        except ResumeRefused:
            self.metrics.changes_resumes_refused += 1
            raise
        self.metrics.changes_polls += 1
        return page

    async def resume_changes(self, channel: Subscriber, resume: ChangesResume) -> ChangesReplay:
        """What ``channel`` (subscribed, its changes held) missed after ``resume.since``: the
        changes its bindings match now, bounded by ``DB_REPLAY_MAX_CHANGES`` / ``_BYTES``.

        Raises:
            ResumeRefused: a position ahead of the database (counted).
        """
        assert self.cdc is not None
        config = self.config
        try:
            replay = await self.cdc.resume(
                channel,
                resume.since,
                resume.epoch,
                max_changes=config.db_replay_max_changes,
                max_bytes=config.db_replay_max_bytes,
            )
        except ResumeRefused:
            self.metrics.changes_resumes_refused += 1
            raise
        if resume.since is not None:
            if replay.recovered:
                self.metrics.changes_resumes_complete += 1
            else:
                self.metrics.changes_resumes_incomplete += 1
            self.metrics.changes_replayed += len(replay.items)
        return replay

    def on_change(self, callback: Callable[[Any], None]) -> None:
        """Hand every change envelope from the broker (a cluster's change feed) to ``callback``."""
        self._on_change = callback

    # -- broadcast ---------------------------------------------------------------------------

    def publish_broadcast(
        self,
        private: bool,
        sub_topic: str,
        event: str,
        payload: Any,
        msg_id: str | None = None,
        exclude: Subscriber | None = None,
        done: PublishDone | None = None,
        sender: str = "",
    ) -> None:
        """Publish a broadcast through the broker; ``done(seq)`` once it is stored.

        ``done(DUPLICATE)`` means ``sender`` (``broker.base.sender_scope``) already published
        ``msg_id`` on the channel (a client re-sending a message after a reconnect gets it
        delivered once); ``done(FAILED)``, that the broker failed. Another sender's message with
        the same id is not a duplicate: it goes out under a scoped id.
        """
        if isinstance(payload, bytearray):
            payload = bytes(payload)
        key = group_key(private, sub_topic)
        msg_id = msg_id or str(uuid.uuid4())
        metrics = self.metrics
        metrics.published += 1
        timed = key in self.hub.groups  # delivery latency is timed only when it fans out here
        if timed:
            metrics.published_at[msg_id] = time.perf_counter()
        self.broker.publish(
            key,
            TOPIC_PREFIX + sub_topic,
            event,
            payload,
            msg_id,
            None if exclude is None else exclude.cid,
            done,
            sender,
        )
        if timed and self.broker.synchronous:
            metrics.published_at.pop(msg_id, None)  # a duplicate id was not delivered

    def publish_presence(self, key: str, topic: str, diff: dict[str, Any]) -> None:
        """Send a presence diff to every node with subscribers of ``key``."""
        self.metrics.presence_events += 1
        self.broker.publish_presence(key, topic, diff)

    def deliver(self, env: Envelope) -> None:
        """An envelope from the broker: encode once, write to every local subscriber."""
        if env.kind == Envelope.BROADCAST:
            payload = {
                "type": "broadcast",
                "event": env.event,
                "payload": env.payload,
                "meta": {"id": env.id, "seq": env.seq},
            }
            out = Outbound(env.topic, "broadcast", payload)
            exclude = (
                self.channel_ids.get(env.exclude) if env.exclude and env.origin == self.node_id else None
            )
            metrics = self.metrics
            metrics.broadcasts += 1
            skip = self.broadcast_unread.get(env.key) if self.broadcast_unread else None
            if self.replayed and env.id is not None:
                by_id = self.replayed.get(env.key)
                replayed = by_id.get(env.id) if by_id else None
                if replayed:
                    skip = replayed if not skip else skip | replayed
            self.delivering_seq, self.delivering_id = env.seq, env.id
            sent = self.hub.fanout(env.key, out, exclude, skip)
            self.delivering_seq = self.delivering_id = None
            if sent:
                # Once per fan-out, never per recipient: count, size, busiest channels.
                metrics.sent_broadcast += sent
                metrics.bytes_out += self._fanout_bytes(env.key, out)
                cm = metrics.channel_messages
                cm[env.key] = cm.get(env.key, 0) + 1
            if env.origin == self.node_id and env.id is not None:
                t0 = metrics.published_at.pop(env.id, None)
                if t0 is not None:
                    metrics.delivery_latency.observe(time.perf_counter() - t0)
            waiting = self._next_broadcast.pop(env.key, None)
            if waiting:
                for callback in waiting:
                    callback()
        elif env.kind == Envelope.CHANGE:
            if self._on_change is not None:
                self._on_change(env.payload)
        elif env.kind == Envelope.PRESENCE:
            out = Outbound(env.topic, "presence_diff", env.payload)
            skip = self.presence_unread.get(env.key) if self.presence_unread else None
            sent = self.hub.fanout(env.key, out, None, skip)
            if sent:
                self.metrics.sent_presence += sent
                self.metrics.bytes_out += self._fanout_bytes(env.key, out)

    def _fanout_bytes(self, key: str, out: Outbound) -> int:
        """Bytes one fan-out wrote (frames are cached on ``out``: nothing is encoded here)."""
        group = self.hub.groups.get(key)
        if group is None:
            return 0
        v1 = out.frame_v1() if group.v1 else None
        return (len(out.frame_v2()) * len(group.v2) if group.v2 else 0) + (
            len(v1) * len(group.v1) if v1 is not None else 0
        )

    def deliver_change(self, matches: dict[Any, list[int]], data: dict[str, Any], change_id: str) -> None:
        """A Postgres change for local channels: ``matches`` maps each channel to its binding ids.

        Re-deliveries from the slot are dropped by Postgres Changes before they get here (one
        change may come in several calls, one per set of visible columns, under one id). ``data``
        is serialised once, and each distinct (topic, ids, serializer, ref) frame once. A channel
        resuming gets the change's position as the push's ref, and while its replay is read the
        frame is held (:meth:`hold_changes`).
        """
        self.note_commit_time(data.get("commit_timestamp"))
        data_json = orjson.dumps(data)
        frames: dict[tuple[str, tuple[int, ...], int, str | None], bytes] = {}
        sent = nbytes = 0
        refs, held, floors = self._position_refs, self._change_buffers, self._change_floors
        position = data.get("position") if refs else None
        channel: Subscriber
        for channel, ids in matches.items():
            if channel.closed:
                continue
            if floors and position is not None:
                floor = floors.get(channel)
                if floor is not None:
                    if position <= floor:
                        continue  # in its replay already
                    del floors[channel]  # changes come in order: none up to it any more
            session = channel.session
            ref = position if refs and channel in refs else None
            key = (channel.topic, tuple(ids), session.serializer, ref)
            frame = frames.get(key)
            if frame is None:
                frame = frames[key] = encode_change(session.serializer, channel.topic, ids, data_json, ref)
            if held:
                waiting = held.get(channel)
                if waiting is not None:
                    waiting.append((ref or "", frame))
                    continue
            session.write(frame)
            sent += 1
            nbytes += len(frame)
        self.metrics.count_changes(sent, nbytes)

    def note_commit_time(self, commit_timestamp: object) -> None:
        """Replication lag in seconds: now minus the commit time of the change being delivered."""
        if isinstance(commit_timestamp, str):
            try:
                committed = datetime.fromisoformat(commit_timestamp).timestamp()
            except ValueError:
                return
            self.metrics.set_replication(lag_seconds=max(0.0, time.time() - committed))

    async def refresh_replication_lag(self) -> None:
        """Read the slot's lag (bytes of WAL not yet confirmed) for metrics and logs."""
        if self.cdc is not None:
            lag = await self.cdc.slot_lag_bytes()
            self.replication_lag_bytes = lag
            self.metrics.set_replication(slot_bytes=lag)
            if lag is not None and lag > REPLICATION_LAG_WARNING:
                log.warning("replication slot is %d bytes behind the database", lag)

    def report_gap(self, key: str) -> None:
        """The broker lost messages of ``key`` it cannot recover: tell its subscribers.

        Each local channel gets ``phx_error``: both official clients rejoin it with backoff, and
        a rejoin asking for a replay is told whether recovery was complete. Never a silent gap.
        """
        group = self.hub.groups.get(key)
        if group is None:
            return
        log.warning("messages of %s were lost between nodes; closing its channels so clients recover", key)
        for member in list(group.members()):
            channel: Subscriber = member  # type: ignore[assignment]
            channel.messages_lost()

    def release(self, key: str) -> None:
        """Drop the broker subscription of ``key`` once nothing on this node needs it."""
        if key not in self.hub.groups and not self._holds.get(key):
            self.broker.unsubscribe(key)

    # -- waiting for broadcasts without a channel (HTTP long-polls: server/polls.py) ---------

    async def hold(self, key: str) -> None:
        """Keep ``key``'s broker subscription without a channel, until :meth:`let_go`; returns
        once it is live."""
        self._holds[key] += 1
        await self.broker.subscribe(key)

    def let_go(self, key: str) -> None:
        """Undo one :meth:`hold` (the subscription goes once nothing else needs it)."""
        self._holds[key] -= 1
        if self._holds[key] <= 0:
            del self._holds[key]
        self.release(key)

    def next_broadcast(self, key: str, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once, after the next broadcast of ``key`` was fanned out here."""
        self._next_broadcast.setdefault(key, []).append(callback)

    def forget_broadcast(self, key: str, callback: Callable[[], None]) -> None:
        """Withdraw a :meth:`next_broadcast` callback that was not called."""
        waiting = self._next_broadcast.get(key)
        if waiting is not None and callback in waiting:
            waiting.remove(callback)
            if not waiting:
                del self._next_broadcast[key]

    def waiting_for_broadcast(self) -> int:
        """:meth:`next_broadcast` callbacks not called yet."""
        return sum(len(w) for w in self._next_broadcast.values())
