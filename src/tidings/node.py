"""One Tidings node: hub, history, auth, limits and the shared timers of every connection.

Connections (``session.Session``) call into the node; the node never blocks. A single periodic
sweeper checks heartbeat deadlines and token expiry for all connections (no timer per connection).
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import logging
import math
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from .auth.tokens import Verifier
from .broker.base import Broker, Envelope, PublishDone
from .broker.memory import MemoryBroker
from .config import Config
from .hub import Hub
from .limits import TokenBucket
from .logs import flush_suppressed, redact, secrets_of, set_log_rate_limit
from .metrics import Monitor, NodeMetrics
from .protocol.codec import Outbound, encode_change
from .protocol.join import TOPIC_PREFIX

if TYPE_CHECKING:
    from .cdc.service import PostgresChanges
    from .session import Channel, Session

__all__ = ["Node", "group_key"]

RECENT_CHANGES = 10_000  # change ids remembered to drop re-deliveries from the slot
REPLICATION_LAG_WARNING = 64 * 1024 * 1024  # bytes of unconfirmed WAL worth a log line

log = logging.getLogger("tidings.node")

SWEEP_INTERVAL = 1.0
JOIN_WINDOW = 10.0  # joins/s are averaged over this window (Supabase averages over 60 s)


def group_key(private: bool, sub_topic: str) -> str:
    """Fan-out group of a channel: public and private channels of one name are separate."""
    return ("x:" if private else "p:") + sub_topic


class Node:
    """State shared by every connection of this process."""

    def __init__(self, config: Config, broker: Broker | None = None) -> None:
        self.config = config
        self.verifier = Verifier(
            config.jwt_secret,
            config.jwt_jwks,
            config.jwt_claim_validators,
            max_token_bytes=config.max_token_bytes,
            cache_bytes=config.token_cache_bytes,
        )
        self.hub = Hub()
        self.broker = broker or MemoryBroker(
            config.history_size, config.history_ttl, config.history_max_channels, config.history_max_bytes
        )
        self.broker.bind(self.deliver, self.report_gap)
        self.node_id = self.broker.node_id
        self.metrics = NodeMetrics()
        # Channel instances by id, so a broadcast coming back from the broker can skip its sender.
        self.channel_ids: dict[int, Channel] = {}
        self._next_cid = 0
        # The sequence number of the envelope being fanned out (read by joins still buffering).
        self.delivering_seq: int | None = None
        # Long-poll HTTP history requests waiting for the next message of a channel, and how
        # many polls hold each channel's broker subscription.
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.poll_refs: Counter[str] = Counter()
        self.polls_closed = False
        # Postgres Changes, when DATABASE_URL is set (attached by the app before start()).
        self.cdc: PostgresChanges | None = None
        self._recent_changes: OrderedDict[str, None] = OrderedDict()
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
        self.sessions: set[Session] = set()
        self.users: Counter[str] = Counter()
        # Connections the sweeper calls each tick (Session.watch): an unfinished fragmented
        # message, a join's catch-up beyond MAX_UNSENT_BYTES. A set, not a slot or timer each.
        self.watched: set[Session] = set()
        # Connections still holding a join's catch-up beyond MAX_UNSENT_BYTES: the least unsent
        # bytes seen and the tick they were seen (server.websocket, end_catchup).
        self.catchups: dict[Session, tuple[int, int]] = {}
        self.fragment_bytes = 0  # bytes of unfinished fragmented messages, all connections
        # Join error replies waiting out CHANNEL_ERROR_BACKOFF_MS, per connection that has any.
        self.pending_join_errors: Counter[Session] = Counter()
        self.tick = 0
        self.draining = False
        self.started_at = time.time()
        self._expiry: list[tuple[float, int, Channel]] = []
        self._expiry_seq = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_payload_bytes = config.max_payload_size_kb * 1024
        # Silent for more than 2 heartbeat intervals -> closed; counted in sweeper ticks.
        self.idle_ticks = max(2, math.ceil(2 * config.heartbeat_interval / SWEEP_INTERVAL))
        # Once a second from the sweeper: RTT pings, samples for /api/metrics, alerts.
        self.monitor = Monitor(self)
        # Logs never carry these (the log handler's Redactor masks them).
        redact(
            *secrets_of(config.jwt_secret, config.alert_webhook_url, config.database_url, config.redis_url)
        )
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

    async def stop(self) -> None:
        """Stop the sweeper (connections are closed by the drain)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        for task in list(self._background):
            task.cancel()
        await self.broker.stop()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.sweep()
            except Exception:
                log.exception("sweeper failed")

    def sweep(self, now: float | None = None) -> None:
        """One pass: idle connections, expired channel tokens, old history.

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
            if isinstance(self.broker, MemoryBroker):
                self.broker.sweep(now)
            if self.cdc is not None:
                self.loop.create_task(self.refresh_replication_lag())
        self.monitor.tick()

    def schedule_expiry(self, channel: Channel, exp: float) -> None:
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
        self.wake_polls()
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
        """Run a node-lifetime task; it is cancelled by :meth:`stop`."""
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- connections -------------------------------------------------------------------------

    def register(self, session: Session, user: str | None) -> None:
        """Count an accepted connection."""
        self.sessions.add(session)
        if user is not None:
            self.users[user] += 1
        self.metrics.connections_total += 1
        self.metrics.connection_opened(session, user)

    def unregister(self, session: Session, user: str | None) -> None:
        """Forget a closed connection."""
        self.sessions.discard(session)
        self.metrics.connection_closed(session, user)
        if user is not None:
            left = self.users[user] - 1
            if left > 0:
                self.users[user] = left
            else:
                del self.users[user]

    # -- channels ----------------------------------------------------------------------------

    def new_channel_id(self) -> int:
        """A node-unique id for a channel instance."""
        self._next_cid += 1
        return self._next_cid

    # -- broadcast ---------------------------------------------------------------------------

    def publish_broadcast(
        self,
        private: bool,
        sub_topic: str,
        event: str,
        payload: Any,
        msg_id: str | None = None,
        exclude: Channel | None = None,
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
            self.delivering_seq = env.seq
            sent = self.hub.fanout(env.key, out, exclude)
            self.delivering_seq = None
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
            waiters = self.waiters.pop(env.key, None)
            if waiters:
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(None)
        elif env.kind == Envelope.CHANGE:
            if self.cdc is not None:
                from .cdc.cluster import decode_change

                self.cdc.dispatch(decode_change(env.payload))
        elif env.kind == Envelope.PRESENCE:
            out = Outbound(env.topic, "presence_diff", env.payload)
            sent = self.hub.fanout(env.key, out)
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

        The slot delivers at least once; a change id seen recently is dropped. ``data`` is
        serialised once, and each distinct (topic, ids, serializer) frame once.
        """
        recent = self._recent_changes
        if change_id in recent:
            return
        recent[change_id] = None
        if len(recent) > RECENT_CHANGES:
            recent.popitem(last=False)
        self.note_commit_time(data.get("commit_timestamp"))
        data_json = orjson.dumps(data)
        frames: dict[tuple[str, tuple[int, ...], int], bytes] = {}
        sent = nbytes = 0
        for channel, ids in matches.items():
            if channel.closed:
                continue
            session = channel.session
            key = (channel.topic, tuple(ids), session.serializer)
            frame = frames.get(key)
            if frame is None:
                frame = frames[key] = encode_change(session.serializer, channel.topic, ids, data_json)
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
            channel: Channel = member  # type: ignore[assignment]
            channel.session.error_channel(channel)

    def release(self, key: str) -> None:
        """Drop the broker subscription of ``key`` once nothing on this node needs it."""
        if key not in self.hub.groups and not self.poll_refs.get(key):
            self.broker.unsubscribe(key)

    def wake_polls(self) -> None:
        """Shutting down: answer every waiting long-poll now (each returns what it has)."""
        self.polls_closed = True
        for waiters in list(self.waiters.values()):
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def wait_for_message(self, key: str, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for the next broadcast on ``key`` (HTTP long-poll)."""
        if self.polls_closed:
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        self.waiters.setdefault(key, []).append(fut)
        self.poll_refs[key] += 1
        try:
            await self.broker.subscribe(key)
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            waiters = self.waiters.get(key)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self.waiters[key]
            self.poll_refs[key] -= 1
            if self.poll_refs[key] <= 0:
                del self.poll_refs[key]
            self.release(key)
