"""One client connection's Phoenix state: joined channels, limits, last activity.

:class:`Session` holds no socket. It receives decoded text/binary messages and writes complete
WebSocket frames through :meth:`Session.write`; the I/O subclass (``server.websocket``) supplies
``write`` and ``close``. Peer input never raises out of here: bad messages are logged and dropped,
or answered with the documented error reply; a bug met while handling one closes the connection
with 1011 and is counted (``tidings_internal_errors_total``).

Everything shared (channels, presence, publishing, authorization, Postgres Changes) goes through
the verbs of :class:`~tidings.node.Node`; a session never reaches the node's hub or broker.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .auth.policy import (
    ALLOW_ALL,
    UNCHECKED,
    AuthorizationContext,
    AuthorizationUnavailable,
    Permissions,
)
from .auth.tokens import AuthError, Principal
from .broker.base import FAILED, ReplayQuery, sender_scope
from .cdc.index import SubscriptionError
from .history import ReplayResult
from .limits import TokenBucket
from .logs import Clipped
from .node import READ, WRITE, ArchivedMessage, MessagesFeed, Node, group_key
from .protocol import errors
from .protocol.codec import (
    MalformedMessage,
    Message,
    Outbound,
    Serializer,
    decode_binary,
    decode_text,
    encode_change,
    encode_close,
    encode_push,
    encode_reply,
)
from .protocol.join import JoinConfig, JoinError, name_too_long, parse_join
from .protocol.positions import ChangesReplay, ChangesResume, ResumeRefused

__all__ = ["Channel", "Session", "discard", "resume_reply"]

log = logging.getLogger("tidings.session")

CHANGES_ATTEMPTS = 3
CHANGES_RETRY_DELAY = 5.0  # seconds between subscription attempts while the database is down
PRESENCE_MAX_CALLS = 5
PRESENCE_WINDOW = 30.0
# A join error reply bigger than this (a long ref, a reason echoing client text) is sent at once
# rather than held for CHANNEL_ERROR_BACKOFF_MS: a delayed reply keeps only small frames alive.
DELAYED_REPLY_MAX_BYTES = 4096
ARCHIVE_REPLAY_MAX = 25  # Supabase's replay (``since``) returns 1..25 messages, default 25
BROADCAST, PRESENCE = "broadcast", "presence"  # the extensions a permission is about
_OK: dict[str, Any] = {}


def discard(frame: bytes) -> None:
    """The writer of a session with no open transport (before the handshake, after the close)."""


def resume_reply(resumed: ChangesReplay, asked: ChangesResume) -> dict[str, Any]:
    """``postgres_changes_resume`` of the ok join reply: the baseline ``position`` and ``epoch`` to
    resume from next time; after a ``since``, ``recovered`` (and ``reason`` when false)."""
    out: dict[str, Any] = {"position": resumed.position, "epoch": resumed.epoch}
    if asked.since is not None:
        out["recovered"] = resumed.recovered
        out["replayed"] = len(resumed.items)
        if resumed.reason:
            out["reason"] = resumed.reason
    return out


class Channel:
    """One joined channel instance of a session."""

    __slots__ = (
        "ack",
        "broadcast_self",
        "cid",
        "closed",
        "join_ref",
        "key",
        "permissions",
        "presence_bucket",
        "presence_enabled",
        "presence_key",
        "principal",
        "changes",
        "private",
        "session",
        "sub_topic",
        "topic",
    )

    def __init__(self, session: Session, cfg: JoinConfig, join_ref: str | None, principal: Principal) -> None:
        self.session = session
        self.cid = session.node.new_channel_id()
        # Interned: every channel of a group shares one copy of these strings.
        self.topic = sys.intern(cfg.topic)
        self.sub_topic = cfg.sub_topic
        self.private = cfg.private
        self.key = sys.intern(group_key(cfg.private, cfg.sub_topic))
        self.join_ref = join_ref
        self.broadcast_self = cfg.broadcast_self
        self.ack = cfg.broadcast_ack
        self.presence_key = cfg.presence_key  # "" -> a generated key at the first track
        self.presence_enabled = cfg.presence_enabled
        self.principal = principal
        # What the token may read and write here (private channels; public ones allow all).
        self.permissions: Permissions = UNCHECKED if cfg.private else ALLOW_ALL
        self.presence_bucket: TokenBucket | None = None
        # Postgres Changes bindings as (id, params the client sent), empty when none.
        self.changes: tuple[tuple[int, dict[str, Any]], ...] = ()
        self.closed = False

    def token_expired(self, exp: float, now: float) -> None:
        """Called by the node's sweeper when a scheduled expiry is due."""
        if self.closed or self.principal.exp != exp:
            return
        self.session.shutdown_channel(self, errors.token_expired_message(int(now - exp)))

    def messages_lost(self) -> None:
        """The broker lost messages of this channel it cannot replay: ``phx_error`` (clients rejoin)."""
        self.session.error_channel(self)


class Session:
    """Phoenix protocol state of one connection (no I/O)."""

    __slots__ = (
        "channels",
        "closed",
        "last_seen",
        "msg_bucket",
        "node",
        "principal",
        "serializer",
        "user",
        "window_count",
        "window_tick",
        "write",
    )

    def __init__(self, node: Node) -> None:
        self.node = node
        self.serializer = Serializer.V1
        self.principal: Principal | None = None
        self.user: str | None = None
        self.channels: dict[str, Channel] = {}
        self.last_seen = node.tick
        self.msg_bucket: TokenBucket | None = None
        self.window_tick = 0
        self.window_count = 0
        self.closed = False
        # Writes one complete WebSocket frame. The I/O layer sets it to ``transport.write`` so
        # replies and fan-out cost one call; it is reset to a no-op once the connection closes.
        self.write: Callable[[bytes], object] = discard

    # -- provided by the I/O layer -----------------------------------------------------------

    def close(self, code: int, reason: str = "") -> None:
        """Close the connection with a WebSocket close code."""
        raise NotImplementedError

    def reply(self, msg: Message, status: str, response: dict[str, Any], topic: str | None = None) -> None:
        """``phx_reply`` to ``msg`` (on its own topic unless ``topic`` is given)."""
        self.node.metrics.sent_reply += 1
        self.write(encode_reply(self.serializer, msg.join_ref, msg.ref, topic or msg.topic, status, response))

    def watch(self, tick: int) -> bool:
        """Called by the node's sweeper each tick while in ``node.watched``; False stops it."""
        return False

    def said_goodbye(self) -> bool:
        """The client closed the connection itself, on purpose (the I/O layer knows; see metrics)."""
        return False

    def begin_catchup(self) -> None:
        """A join's own replies (replay, presence_state, buffered messages) are about to be written."""

    def end_catchup(self) -> None:
        """The join's replies are written: what they queued does not count as a slow consumer."""

    # -- inbound -----------------------------------------------------------------------------

    def receive_text(self, data: bytes) -> None:
        """A complete text message arrived."""
        try:
            msg = decode_text(data, self.serializer)
        except MalformedMessage as exc:
            self.malformed(exc)
            return
        self.dispatch(msg, len(data))

    def receive_binary(self, data: bytes) -> None:
        """A complete binary message arrived (vsn 2.0.0 user broadcast push)."""
        try:
            if self.serializer is not Serializer.V2:
                raise MalformedMessage("binary messages need vsn 2.0.0")
            msg = decode_binary(data)
        except MalformedMessage as exc:
            self.malformed(exc)
            return
        self.dispatch(msg, len(data))

    def malformed(self, exc: Exception) -> None:
        """Drop a malformed message: counted, rate-limited like any message, logged sparingly."""
        node = self.node
        node.metrics.malformed += 1
        self.over_control_rate()
        # A flood of garbage must not flood the log: a few lines a second for the whole node.
        if node.log_bucket.take(time.monotonic()):
            log.info("MalformedWebSocketMessage: %s", Clipped(exc))
        else:
            log.debug("MalformedWebSocketMessage: %s", Clipped(exc))

    def dispatch(self, msg: Message, size: int) -> None:
        """Route one decoded message; a bug on the way closes the connection with 1011."""
        try:
            node = self.node
            node.metrics.receive(msg.event, size)
            topic, event = msg.topic, msg.event
            if event != "broadcast" and self.over_control_rate():
                log.debug("dropping %s on %s: control message flood", Clipped(event), Clipped(topic))
                return
            if topic == "phoenix":
                if event == "heartbeat":
                    self.reply(msg, "ok", _OK)
                return
            if event == "phx_join":
                self.join(msg)
                return
            channel = self.channels.get(topic)
            if channel is None:
                status = "ok" if event == "phx_leave" else "error"
                response = _OK if event == "phx_leave" else {"reason": errors.UNMATCHED_TOPIC}
                self.reply(msg, status, response, topic)
                return
            if event == "broadcast":
                self.broadcast(channel, msg, size)
            elif event == "presence":
                self.presence(channel, msg, size)
            elif event == "phx_leave":
                # Reply and phx_close in one write: realtime-py re-joins as soon as it handles the
                # reply, and a phx_close read after that would close the new join (no join_ref check).
                self.node.metrics.sent_reply += 1
                reply = encode_reply(self.serializer, msg.join_ref, msg.ref, topic, "ok", _OK)
                self.write(reply + encode_close(self.serializer, channel.join_ref, topic))
                self.leave(channel)
            elif event == "access_token":
                self.access_token(channel, msg)
            else:
                log.debug("ignoring event %r on %s", Clipped(event), Clipped(topic))
        except Exception:
            self.internal_error(msg)

    def internal_error(self, msg: Message) -> None:
        """Handling ``msg`` raised: a bug, never the client's fault. Counted, logged with its
        traceback (rate-limited like every line), and the connection is closed with 1011 (as
        websockets does when its handler fails): its state may be inconsistent."""
        self.node.metrics.internal_errors += 1
        log.exception(
            "internal error handling %s on %s; closing the connection", Clipped(msg.event), Clipped(msg.topic)
        )
        self.close(1011, "internal error")

    # -- join / leave ------------------------------------------------------------------------

    def join(self, msg: Message) -> None:
        """Handle ``phx_join`` in the order of spec section 3.3."""
        node = self.node
        limits = node.config
        try:
            cfg = parse_join(msg.topic, msg.payload, limits.max_topic_length, limits.max_event_length)
        except JoinError as exc:
            if exc.too_long:
                node.metrics.names_too_long += 1
            self.refuse_join(msg, exc.reason)
            return
        for warning in cfg.warnings:
            log.info("join %s: %s", Clipped(msg.topic), warning)
        old = self.channels.get(cfg.topic)
        if old is not None:
            # A duplicate join replaces the old instance; no phx_close (friendlier to realtime-py).
            self.leave(old)
        if node.draining:
            self.refuse_join(msg, errors.REALTIME_RESTARTING)
            return
        now = time.monotonic()
        if not node.join_bucket.take(now):
            self.refuse_join(msg, errors.CLIENT_JOIN_RATE_LIMIT, close_after=True)
            return
        if len(self.channels) >= node.config.max_channels_per_client:
            self.refuse_join(msg, errors.CHANNEL_RATE_LIMIT)
            return
        try:
            principal = self.channel_principal(cfg.access_token)
        except AuthError as exc:
            self.refuse_join(msg, exc.reason)
            return
        permissions: Permissions | None = ALLOW_ALL
        context = None
        if cfg.private:
            # The declarative policy, service_role and cached results answer at once; a database
            # check makes this join finish in a task (authorize_join).
            context = node.access_context(principal, cfg.sub_topic)
            permissions = node.permissions_now(context, READ, presence=cfg.presence_enabled)
            if permissions is not None and not permissions.readable:
                node.metrics.authz_denied_reads += 1
                self.refuse_join(msg, errors.unauthorized_read_reason(cfg.sub_topic))
                return
        bindings: tuple[tuple[int, dict[str, Any]], ...] = ()
        if cfg.postgres_changes:
            if not node.changes_enabled:
                self.refuse_join(msg, errors.POSTGRES_CHANGES_UNAVAILABLE)
                return
            bindings = tuple((node.change_binding_id(b), b) for b in cfg.postgres_changes)
        # Each binding echoed verbatim plus its id: the clients compare them field by field.
        response: dict[str, Any] = {"postgres_changes": [{**b, "id": bid} for bid, b in bindings]}
        channel = Channel(self, cfg, msg.join_ref, principal)
        channel.changes = bindings
        self.channels[channel.topic] = channel
        if permissions is None or self.replays_from_archive(cfg):
            # Registered (a duplicate join or a leave finds it), joined once checked.
            if permissions is not None:
                channel.permissions = permissions
            assert context is not None
            node.loop.create_task(self.authorize_join(channel, msg, cfg, response, context))
            return
        channel.permissions = permissions
        if self.replay_refused(channel, msg, cfg):
            return
        self.start_join(channel, msg, cfg, response)

    def replay_refused(self, channel: Channel, msg: Message, cfg: JoinConfig) -> bool:
        """A replay of a private channel needs broadcast read (Supabase's ``can_replay?``): a
        member that may read only presence is refused, not handed the broadcasts it asked for."""
        if cfg.replay is None or channel.permissions.broadcast_read is True:
            return False
        self.node.metrics.authz_denied_reads += 1
        self.leave(channel)
        self.refuse_join(msg, errors.unauthorized_read_reason(channel.sub_topic))
        return True

    def start_join(
        self,
        channel: Channel,
        msg: Message,
        cfg: JoinConfig,
        response: dict[str, Any],
        archived: Sequence[ArchivedMessage] = (),
        early: Sequence[tuple[int | None, bytes]] = (),
    ) -> None:
        """Join ``channel``, allowed to read: at once with an in-process broker, else in a task.

        ``archived``: messages replayed from the database, pushed right after the join reply;
        ``early``: frames that fanned out to the channel while they were read.
        """
        node = self.node
        bindings = channel.changes
        node.open_channel(channel)
        if channel.private:
            node.set_reads(channel, channel.permissions)
        replay = self.replay_request(cfg)
        presence = channel.presence_enabled and channel.permissions.presence_read is True
        # An in-process broker answers at once: the join completes in this call, no task. The
        # channel's numbering is started if it has none: a baseline to recover from.
        read = (
            None
            if bindings and (cfg.changes_wait or cfg.changes_resume is not None)
            else node.join_now(channel, self.write, replay, presence, self.sender(channel.principal))
        )
        if read is not None:
            catchup = read.replay is not None or read.presence is not None or bool(archived or early)
            if catchup:
                self.begin_catchup()
            self.complete_join(channel, msg, response, read.replay, read.presence, read.position, archived)
            for _, frame in early:
                self.write(frame)
            if catchup:
                self.end_catchup()
            self.joined(channel, cfg)
            if bindings:
                node.loop.create_task(self.subscribe_changes(channel))
        else:
            # Buffer what fans out while the broker subscription, replay and presence state are
            # fetched, so the client sees: join reply, replayed messages, presence_state, live.
            pending: list[tuple[int | None, bytes]] = list(early)

            def buffer(frame: bytes) -> None:
                pending.append((node.delivering_seq, frame))

            node.attach(channel, buffer)
            node.loop.create_task(self.join_async(channel, msg, cfg, response, pending, archived))

    def replays_from_archive(self, cfg: JoinConfig) -> bool:
        """The join asks for Supabase's replay (``since``) of a private channel, and the database
        keeps its messages (``realtime.messages``)."""
        replay = cfg.replay
        return (
            cfg.private
            and replay is not None
            and replay.since_seq is None
            and self.node.message_archive is not None
        )

    async def authorize_join(
        self,
        channel: Channel,
        msg: Message,
        cfg: JoinConfig,
        response: dict[str, Any],
        context: AuthorizationContext,
    ) -> None:
        """Finish a private join that needs the database: the read check (Supabase's probe rows)
        unless known, then a replay from ``realtime.messages`` when asked for."""
        node = self.node
        if not channel.permissions.read_checked:
            try:
                permissions = await node.permissions(context, READ, presence=cfg.presence_enabled)
            except AuthorizationUnavailable as exc:
                node.metrics.authz_unavailable += 1
                log.warning("join %s: permissions unavailable: %s", Clipped(channel.topic), Clipped(exc))
                if not channel.closed:
                    self.leave(channel)
                    self.refuse_join(msg, exc.reason)
                return
            if channel.closed or self.closed:
                return
            if not permissions.readable:
                node.metrics.authz_denied_reads += 1
                self.leave(channel)
                self.refuse_join(msg, errors.unauthorized_read_reason(channel.sub_topic))
                return
            channel.permissions = permissions
        archive = node.message_archive
        if self.replay_refused(channel, msg, cfg):
            return
        if not self.replays_from_archive(cfg) or archive is None:
            self.start_join(channel, msg, cfg, response)
            return
        replay = cfg.replay
        assert replay is not None
        # What fans out while the replay is read is kept, minus the messages replayed.
        key = channel.key
        early: list[tuple[int | None, str | None, bytes]] = []

        def buffer(frame: bytes) -> None:
            early.append((node.delivering_seq, node.delivering_id, frame))

        await node.hold(key)
        try:
            if channel.closed or self.closed:
                return
            node.set_reads(channel, channel.permissions)
            node.attach(channel, buffer)
            try:
                rows = await archive.replay(
                    channel.sub_topic, replay.since or 0, replay.limit or ARCHIVE_REPLAY_MAX
                )
            except Exception as exc:
                reason = getattr(exc, "reason", None)
                if not isinstance(reason, str):
                    log.exception("join %s: the replay failed", channel.topic)
                    reason = errors.REPLAY_FAILED
                else:
                    log.info("join %s: replay refused: %s", Clipped(channel.topic), Clipped(exc))
                if not channel.closed:
                    self.leave(channel)
                    self.refuse_join(msg, reason)
                return
            if self.gone(channel):
                return
            ids = [row.id for row in rows]
            node.skip_replayed(channel, ids)
            replayed = set(ids)
            self.start_join(
                channel,
                msg,
                cfg,
                response,
                rows,
                [(seq, frame) for seq, msg_id, frame in early if msg_id not in replayed],
            )
        finally:
            node.let_go(key)

    def gone(self, channel: Channel) -> bool:
        """The channel was left or the connection closed (while a task awaited)."""
        return channel.closed or self.closed

    def joined(self, channel: Channel, cfg: JoinConfig) -> None:
        """The ok join reply (and catch-up) is written: what the join asked for beyond it."""
        if not cfg.replication_ready or channel.closed:
            return
        feed = self.node.messages_feed
        if feed is None:
            self.shutdown_channel(channel, errors.REPLICATION_NOT_READY)
        elif feed.ready:
            self.system_push(channel, "ok", errors.REPLICATION_READY_MESSAGE)
        else:
            self.node.loop.create_task(self.await_replication(channel, feed))

    async def await_replication(self, channel: Channel, feed: MessagesFeed) -> None:
        """``replication_ready``: announce Broadcast from Database once live, or close the channel."""
        ready = await feed.wait_ready(self.node.config.replication_ready_timeout)
        if ready:
            self.system_push(channel, "ok", errors.REPLICATION_READY_MESSAGE)
        else:
            self.shutdown_channel(channel, errors.REPLICATION_NOT_READY)

    def system_push(self, channel: Channel, status: str, message: str) -> None:
        """The ``system`` push of the channel's own extension (``extension: "system"``)."""
        if channel.closed or self.closed:
            return
        payload = {"extension": "system", "status": status, "message": message, "channel": channel.sub_topic}
        self.write(encode_push(self.serializer, channel.join_ref, channel.topic, "system", payload))

    async def join_async(
        self,
        channel: Channel,
        msg: Message,
        cfg: JoinConfig,
        response: dict[str, Any],
        pending: list[tuple[int | None, bytes]],
        archived: Sequence[ArchivedMessage] = (),
    ) -> None:
        """Finish a join that needs I/O: the broker's, or a Postgres subscription to wait for."""
        node = self.node
        resumed: ChangesReplay | None = None
        if channel.changes and (cfg.changes_wait or cfg.changes_resume is not None):
            # postgres_changes_options.wait: answer the join only once changes are live; .resume:
            # and with what was missed, read once the subscription is live (its changes held).
            if cfg.changes_resume is not None:
                node.hold_changes(channel)
            try:
                await asyncio.wait_for(
                    self.subscribe_changes(channel, announce=False), cfg.changes_wait_timeout
                )
                error = None
                if cfg.changes_resume is not None and not channel.closed:
                    resumed = await node.resume_changes(channel, cfg.changes_resume)
            except TimeoutError:
                error = "PostgresChangesSubscribeTimeout: the subscription was not ready in time"
            except SubscriptionError as exc:
                error = str(exc)
            except ResumeRefused as exc:
                error = exc.reason
            except Exception:  # the change log could not be read (Redis down, ...)
                log.exception("join %s: reading the change log failed", channel.topic)
                error = errors.UNKNOWN_ERROR
            if error is not None:
                if not channel.closed:
                    self.leave(channel)
                    self.refuse_join(msg, error)
                return
            if resumed is not None:
                assert cfg.changes_resume is not None
                response["postgres_changes_resume"] = resume_reply(resumed, cfg.changes_resume)
        try:
            read = await node.join_read(
                channel,
                self.replay_request(cfg),
                channel.presence_enabled and channel.permissions.presence_read is True,
                self.sender(channel.principal),
            )
        except Exception:
            log.exception("join %s failed in the broker", channel.topic)
            if not channel.closed:
                self.leave(channel)
                self.refuse_join(msg, errors.UNKNOWN_ERROR)
            return
        if channel.closed or self.closed:
            return
        catchup = (
            read.replay is not None
            or read.presence is not None
            or bool(pending or archived)
            or resumed is not None
        )
        if catchup:
            self.begin_catchup()
        last = self.complete_join(channel, msg, response, read.replay, read.presence, read.position, archived)
        for seq, frame in pending:
            if seq is None or seq > last:
                self.write(frame)
        if resumed is not None:
            self.write_replayed_changes(channel, resumed)
        if catchup:
            self.end_catchup()
        node.attach(channel, self.write)
        self.joined(channel, cfg)
        if channel.changes and not cfg.changes_wait and resumed is None:
            await self.subscribe_changes(channel)
        elif channel.changes:
            self.changes_status(channel, "ok", "Subscribed to PostgreSQL", resumed)

    async def subscribe_changes(self, channel: Channel, announce: bool = True) -> None:
        """Register the channel's Postgres bindings; tell the client with a ``system`` push.

        Transient failures (database unreachable) are retried; bad parameters are not.
        With ``announce=False`` a failure raises :class:`SubscriptionError` instead.
        """
        node = self.node
        for attempt in range(CHANGES_ATTEMPTS):
            try:
                await node.subscribe_changes(channel, channel.changes, channel.principal.claims)
            except SubscriptionError as exc:
                if exc.transient and attempt + 1 < CHANGES_ATTEMPTS and not channel.closed:
                    await asyncio.sleep(CHANGES_RETRY_DELAY)
                    continue
                if not announce:
                    raise
                self.changes_status(channel, "error", str(exc))
                return
            if channel.closed:
                node.unsubscribe_changes(channel)
            elif announce:
                self.changes_status(channel, "ok", "Subscribed to PostgreSQL")
            return

    async def resubscribe_changes(self, channel: Channel) -> None:
        """Re-create the bindings with a refreshed token's claims; only failures are announced."""
        try:
            await self.subscribe_changes(channel, announce=False)
        except SubscriptionError as exc:
            self.changes_status(channel, "error", str(exc))

    def changes_status(
        self, channel: Channel, status: str, message: str, resumed: ChangesReplay | None = None
    ) -> None:
        """The ``system`` push of the postgres_changes extension; after a resume it also carries
        ``recovered``, ``position`` and ``epoch`` (supabase-js hands system pushes to the app
        whole, and its join reply never)."""
        if channel.closed or self.closed:
            return
        payload: dict[str, Any] = {
            "extension": "postgres_changes",
            "status": status,
            "message": message,
            "channel": channel.sub_topic,
        }
        if resumed is not None:
            payload.update(recovered=resumed.recovered, position=resumed.position, epoch=resumed.epoch)
            payload["replayed"] = len(resumed.items)
        self.write(encode_push(self.serializer, channel.join_ref, channel.topic, "system", payload))

    def write_replayed_changes(self, channel: Channel, resumed: ChangesReplay) -> None:
        """A resume's replay, then the live changes held while it was read that it does not hold.

        Every change up to ``resumed.position`` was in the log the replay read: a held live change
        at or before it is either replayed or not for this channel. Later ones follow in order.
        """
        node = self.node
        serializer, topic = self.serializer, channel.topic
        for position, ids, data in resumed.items:
            self.write(encode_change(serializer, topic, ids, orjson.dumps(data), position))
        for frame in node.release_changes(channel, resumed.position):
            self.write(frame)

    def replay_request(self, cfg: JoinConfig) -> ReplayQuery | None:
        """What the join asks the broker's history to replay, or ``None``.

        ``since_seq`` (Tidings' recovery) returns up to ``REPLAY_MAX`` messages; ``since``
        (Supabase's replay) up to 25, and on a private channel with a database it is read from
        ``realtime.messages`` instead (:meth:`authorize_join`).
        """
        replay = cfg.replay
        if replay is None:
            return None
        if replay.since_seq is not None:
            replay_max = self.node.config.replay_max
            limit = replay_max if replay.limit is None else min(replay.limit, replay_max)
            return ReplayQuery(replay.since_seq, None, limit, replay.epoch)
        if self.replays_from_archive(cfg):
            return None
        limit = ARCHIVE_REPLAY_MAX if replay.limit is None else min(replay.limit, ARCHIVE_REPLAY_MAX)
        return ReplayQuery(None, (replay.since or 0) / 1000.0, limit, None)

    def complete_join(
        self,
        channel: Channel,
        msg: Message,
        response: dict[str, Any],
        replay: ReplayResult | None,
        state: dict[str, Any] | None,
        position: tuple[int, str] | None = None,
        archived: Sequence[ArchivedMessage] = (),
    ) -> int:
        """Write the ok reply, replayed broadcasts and ``presence_state``; returns the last replayed seq.

        ``archived``: messages replayed from the database (``meta: {replayed: true, id}``), binary
        ones as binary broadcasts on vsn 2.0.0 and left out on vsn 1.0.0, as Supabase does.

        ``position`` (the channel's newest sequence number and its epoch) goes in the reply as
        ``seq`` and ``epoch``: a client that then loses its connection, even before any message,
        can ask for everything after ``seq`` and have the server prove it is all there.
        """
        if position is not None:
            response["seq"], response["epoch"] = position
        last = 0
        replayed: list[dict[str, Any]] = []
        if replay is not None:
            for r in replay.records:
                if isinstance(r.payload, bytes):
                    continue  # raw binary is not representable in a text push
                meta = {"id": r.id, "seq": r.seq, "replayed": True}
                replayed.append({"type": "broadcast", "event": r.event, "payload": r.payload, "meta": meta})
                last = max(last, r.seq)
            response["recovered"] = replay.complete and len(replayed) == len(replay.records)
        self.reply(msg, "ok", response)
        for payload in replayed:
            self.write(encode_push(self.serializer, channel.join_ref, channel.topic, "broadcast", payload))
        for row in archived:
            push = {"type": "broadcast", "event": row.event, "payload": row.payload}
            push["meta"] = {"replayed": True, "id": row.id}
            if not row.binary:
                self.write(encode_push(self.serializer, channel.join_ref, channel.topic, "broadcast", push))
            elif self.serializer is Serializer.V2:
                self.write(Outbound(channel.topic, "broadcast", push).frame_v2())
        if state is not None:
            self.write(encode_push(self.serializer, channel.join_ref, channel.topic, "presence_state", state))
        return last

    def sender(self, principal: Principal) -> str:
        """Who this connection publishes as (``broker.base.sender_scope``)."""
        sub = principal.sub
        return sender_scope(principal.role, sub, "" if sub else self.peer_host())

    def peer_host(self) -> str:
        """The client's address: the one the I/O layer counted, else the socket's peer ("" without one)."""
        address = getattr(self, "_address", None)
        if isinstance(address, str):
            return address
        transport = getattr(self, "transport", None)
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""

    def refuse_join(self, msg: Message, reason: str, close_after: bool = False) -> None:
        """Send a join error reply after the configured backoff (both clients retry joins).

        Only the encoded reply waits, and only a small one: a reply over
        :data:`DELAYED_REPLY_MAX_BYTES`, or beyond ``MAX_PENDING_JOIN_ERRORS`` waiting for this
        connection, is sent at once. It echoes the topic whole: the clients match a reply by
        topic and ref, and a topic too long to join is refused before anything is kept of it.
        """
        node = self.node
        node.metrics.joins_refused += 1
        log.info("join %s refused: %s", Clipped(msg.topic), Clipped(reason))
        frame = encode_reply(self.serializer, msg.join_ref, msg.ref, msg.topic, "error", {"reason": reason})
        delay = node.config.channel_error_backoff
        if delay > 0:
            pending = node.pending_join_errors
            if len(frame) <= DELAYED_REPLY_MAX_BYTES and pending[self] < node.config.max_pending_join_errors:
                pending[self] += 1
                node.loop.call_later(delay, self.send_join_error, frame, close_after, True)
                return
            node.metrics.join_errors_undelayed += 1
        self.send_join_error(frame, close_after, False)

    def send_join_error(self, frame: bytes, close_after: bool, delayed: bool) -> None:
        """Write a join error reply (``close_after``: then close the connection, 1001)."""
        if delayed:
            pending = self.node.pending_join_errors
            left = pending[self] - 1
            if left > 0:
                pending[self] = left
            else:
                pending.pop(self, None)
        if self.closed:
            return
        self.node.metrics.sent_reply += 1
        self.write(frame)
        if close_after:
            self.close(1001, "too many joins")

    def leave(self, channel: Channel) -> None:
        """Tear a channel down: unsubscribe and announce its presence leave."""
        if channel.closed:
            return
        channel.closed = True
        node = self.node
        if self.channels.get(channel.topic) is channel:
            del self.channels[channel.topic]
        if channel.changes:
            node.unsubscribe_changes(channel)
        node.leave(channel)

    def leave_all(self) -> None:
        """Tear every channel down (the connection is gone)."""
        for channel in list(self.channels.values()):
            self.leave(channel)

    def shutdown_channel(self, channel: Channel, message: str) -> None:
        """Close a channel from the server side: ``system`` error, then ``phx_close``."""
        if channel.closed or self.closed:
            return
        payload = {"extension": "system", "status": "error", "message": message, "channel": channel.sub_topic}
        self.write(encode_push(self.serializer, channel.join_ref, channel.topic, "system", payload))
        self.write(encode_close(self.serializer, channel.join_ref, channel.topic))
        self.leave(channel)

    def error_channel(self, channel: Channel) -> None:
        """``phx_error`` for a channel: both official clients rejoin it with backoff."""
        if channel.closed or self.closed:
            return
        self.write(encode_close(self.serializer, channel.join_ref, channel.topic, "phx_error"))
        self.leave(channel)

    # -- auth --------------------------------------------------------------------------------

    def channel_principal(self, token: str | None) -> Principal:
        """The identity a join runs as: its ``access_token``, else the socket's apikey."""
        assert self.principal is not None
        if token is None or token.startswith("sb_") or token == self.principal.token:
            if self.principal.exp is not None and self.principal.exp <= time.time():
                # The socket's token expired since connect: verify again for the right message.
                return self.node.verifier.verify(self.principal.token)
            return self.principal
        return self.node.verifier.verify(token)

    def access_token(self, channel: Channel, msg: Message) -> None:
        """Token refresh on a joined channel; never replied to (spec 7.3)."""
        token = msg.payload.get("access_token")
        if not isinstance(token, str) or token.startswith("sb_") or token == channel.principal.token:
            return
        node = self.node
        try:
            principal = node.verifier.verify(token)
        except AuthError as exc:
            self.shutdown_channel(channel, exc.message)
            return
        if channel.private:
            # Permissions are evaluated again with the new token (Supabase: the policies, fresh).
            context = node.access_context(principal, channel.sub_topic)
            presence = channel.presence_enabled or channel.permissions.presence_read is not None
            found = node.permissions_now(context, READ, presence=presence, refresh=True)
            if found is None:
                node.refreshes[channel] = principal
                node.loop.create_task(self.refresh_permissions(channel, principal, context, presence))
                return
            if not self.reads_kept(channel, found):
                return
        self.adopt_token(channel, principal)

    async def refresh_permissions(
        self, channel: Channel, principal: Principal, context: AuthorizationContext, presence: bool
    ) -> None:
        """The database check of a refreshed token; a newer refresh supersedes it."""
        node = self.node
        try:
            found = await node.permissions(context, READ, presence=presence, refresh=True)
        except AuthorizationUnavailable as exc:
            if node.refreshes.get(channel) is principal:
                del node.refreshes[channel]
                node.metrics.authz_unavailable += 1
                self.shutdown_channel(channel, exc.message)
            return
        if node.refreshes.get(channel) is not principal:
            return
        del node.refreshes[channel]
        if channel.closed or self.closed:
            return
        if self.reads_kept(channel, found):
            self.adopt_token(channel, principal)

    def reads_kept(self, channel: Channel, found: Permissions) -> bool:
        """Take the read permissions of a refreshed token; a read allowed before and denied now
        closes the channel (delivery stops at once). Write permissions are evaluated again at the
        next broadcast or track."""
        if channel.permissions.read_revoked(found) or not found.readable:
            self.node.metrics.authz_denied_reads += 1
            self.shutdown_channel(channel, errors.read_permission_revoked_message(channel.sub_topic))
            return False
        channel.permissions = found
        self.node.set_reads(channel, found)
        return True

    def adopt_token(self, channel: Channel, principal: Principal) -> None:
        """The channel runs as ``principal`` from now on."""
        channel.principal = principal
        if principal.exp is not None:
            self.node.schedule_expiry(channel, principal.exp)
        if channel.changes and self.node.changes_enabled:
            # Column privileges follow the role of the newest token.
            self.node.loop.create_task(self.resubscribe_changes(channel))

    # -- broadcast / presence ----------------------------------------------------------------

    def over_control_rate(self) -> bool:
        """Count a non-broadcast message (heartbeat, join, push, garbage) in this second's window.

        Floods of them are dropped beyond ``node.control_limit`` a second. Two ints per
        connection, reset by the sweeper's tick: no per-connection object.
        """
        tick = self.node.tick
        if self.window_tick != tick:
            self.window_tick = tick
            self.window_count = 0
        self.window_count += 1
        if self.window_count > self.node.control_limit:
            self.node.metrics.rate_limited += 1
            return True
        return False

    def over_message_rate(self) -> bool:
        """Count one client message against the per-client and per-node limits."""
        node = self.node
        now = time.monotonic()
        bucket = self.msg_bucket
        if bucket is None:
            rate = node.config.max_messages_per_second
            bucket = self.msg_bucket = TokenBucket(rate, rate, now)
        if bucket.take(now) and node.message_bucket.take(now):
            return False
        node.metrics.rate_limited += 1
        return True

    def broadcast(self, channel: Channel, msg: Message, size: int) -> None:
        """A client broadcast: limits, then number, store and fan out; ``ack`` reply if asked."""
        node = self.node
        payload = msg.payload
        event = payload.get("event")
        if not isinstance(event, str):
            node.metrics.malformed += 1
            log.info(
                "MalformedWebSocketMessage: broadcast without a string event on %s", Clipped(channel.topic)
            )
            return
        if name_too_long(event, node.config.max_event_length):
            node.metrics.names_too_long += 1
            self.malformed(
                MalformedMessage(f"broadcast event longer than {node.config.max_event_length} bytes")
            )
            return
        if self.over_message_rate():
            self.shutdown_channel(channel, errors.TOO_MANY_MESSAGES)
            return
        if channel.private and channel.permissions.broadcast_write is not True:
            if not self.may_write(channel, msg, size, BROADCAST):
                return  # not allowed (dropped silently, as Supabase does), or waiting for its check
        self.send_broadcast(channel, msg, size)

    def send_broadcast(self, channel: Channel, msg: Message, size: int) -> None:
        """Publish a client broadcast the channel may write."""
        node = self.node
        payload = msg.payload
        if size > node.max_payload_bytes:
            node.metrics.dropped_payload_too_large += 1
            if channel.ack:
                self.reply(msg, "error", {"reason": errors.PAYLOAD_TOO_LARGE}, channel.topic)
            return
        msg_id = payload.get("id")
        done = None
        if channel.ack:
            serializer, join_ref, ref, topic = self.serializer, msg.join_ref, msg.ref, channel.topic

            def done(seq: int) -> None:
                if self.closed:
                    return
                if seq == FAILED:
                    self.write(
                        encode_reply(
                            serializer, join_ref, ref, topic, "error", {"reason": errors.UNKNOWN_ERROR}
                        )
                    )
                else:
                    self.write(encode_reply(serializer, join_ref, ref, topic, "ok", _OK))

        node.publish_broadcast(
            channel.private,
            channel.sub_topic,
            payload["event"],
            payload.get("payload"),
            msg_id if isinstance(msg_id, str) and msg_id else None,
            None if channel.broadcast_self else channel,
            done,
            self.sender(channel.principal),
        )

    def presence(self, channel: Channel, msg: Message, size: int) -> None:
        """``presence`` track/untrack (``type`` not required: realtime-py omits it)."""
        node = self.node
        payload = msg.payload
        event = payload.get("event")
        kind = event.lower() if isinstance(event, str) else ""
        if kind not in ("track", "untrack"):
            self.reply(msg, "error", {"reason": "unknown presence event"}, channel.topic)
            return
        now = time.monotonic()
        bucket = channel.presence_bucket
        if bucket is None:
            bucket = channel.presence_bucket = TokenBucket(
                PRESENCE_MAX_CALLS / PRESENCE_WINDOW, PRESENCE_MAX_CALLS, now
            )
        if not bucket.take(now):
            node.metrics.rate_limited += 1
            self.shutdown_channel(channel, errors.PRESENCE_RATE_LIMIT)
            return
        if kind == "track":
            state = payload.get("payload", {})
            if not isinstance(state, dict):
                self.reply(msg, "error", {"reason": errors.PRESENCE_PAYLOAD_NOT_MAP}, channel.topic)
                return
            if size > node.max_payload_bytes:
                self.shutdown_channel(channel, errors.TRACK_SIZE_EXCEEDED)
                return
            perms = channel.permissions
            if channel.private and (perms.presence_write is not True or perms.presence_read is None):
                if not self.may_write(channel, msg, size, PRESENCE):
                    return  # refused (error reply), or waiting for its check
        self.track_or_untrack(channel, msg, kind == "track")

    def track_or_untrack(self, channel: Channel, msg: Message, track: bool) -> None:
        """Track (the channel may write presence) or untrack; reply, and publish the diff."""
        node = self.node
        try:
            diff = node.track(channel, msg.payload.get("payload", {})) if track else node.untrack(channel)
        except LookupError:  # no group while joined: cannot happen; keep the invariant loud in logs
            log.error("presence on %s without a group", channel.topic)
            return
        self.reply(msg, "ok", _OK, channel.topic)
        if diff is not None:
            node.publish_presence(channel.key, channel.topic, diff)

    # -- write permissions of private channels -----------------------------------------------

    def may_write(self, channel: Channel, msg: Message, size: int, extension: str) -> bool:
        """Whether ``msg`` (a broadcast, or a track) may go out now on the private ``channel``.

        Write permissions are evaluated at the first broadcast or track (and again after a token
        refresh): at once from the declarative policy or a cached result, else by a database
        check that this message and the channel's next ones wait for, in order (at most
        ``MAX_MESSAGES_PER_SECOND`` of them: beyond, dropped and counted). A track also evaluates
        presence read when the join did not (presence was off), so its diffs reach the channel.
        """
        node = self.node
        waiting = node.write_checks.get(channel)
        if waiting is not None:
            if len(waiting) >= node.config.max_messages_per_second:
                node.metrics.authz_writes_dropped += 1
                if extension == PRESENCE:
                    self.reply(msg, "error", _OK, channel.topic)
                return False
            waiting.append((extension, msg, size))
            return False
        perms = channel.permissions
        if (perms.broadcast_write if extension == BROADCAST else perms.presence_write) is False:
            return self.write_refused(channel, msg, extension)
        read_presence = extension == PRESENCE and perms.presence_read is None
        context = node.access_context(channel.principal, channel.sub_topic)
        found = node.permissions_now(context, WRITE, presence=True)
        read = node.permissions_now(context, READ, presence=True) if read_presence else None
        if found is None or (read_presence and read is None):
            node.write_checks[channel] = [(extension, msg, size)]
            node.loop.create_task(self.check_writes(channel, context, read_presence))
            return False
        self.take_permissions(channel, found, read)
        if channel.permissions.can_write(extension):
            return True
        return self.write_refused(channel, msg, extension)

    def write_refused(self, channel: Channel, msg: Message, extension: str) -> bool:
        """A broadcast without write permission is dropped silently; a track gets an error reply."""
        self.node.metrics.authz_denied_writes += 1
        if extension == PRESENCE:
            self.reply(msg, "error", _OK, channel.topic)
        return False

    def take_permissions(self, channel: Channel, write: Permissions, read: Permissions | None) -> None:
        """Merge newly evaluated permissions into the channel's."""
        perms = channel.permissions.merged(write)
        if read is not None:
            perms = perms.merged(read)
        channel.permissions = perms
        if read is not None:
            self.node.set_reads(channel, perms)

    async def check_writes(
        self, channel: Channel, context: AuthorizationContext, read_presence: bool
    ) -> None:
        """The database write check of ``channel``; then the messages that waited for it, in order."""
        node = self.node
        principal = channel.principal
        read: Permissions | None = None
        try:
            found: Permissions | None = await node.permissions(context, WRITE, presence=True)
            if read_presence:
                read = await node.permissions(context, READ, presence=True)
        except AuthorizationUnavailable as exc:
            node.metrics.authz_unavailable += 1
            log.warning("write check of %s unavailable: %s", Clipped(channel.topic), Clipped(exc))
            found = None
        waiting = node.write_checks.pop(channel, [])
        if channel.closed or self.closed:
            return
        if found is None:
            # Not evaluated: as Supabase, the broadcasts are dropped and the tracks refused; the
            # next message tries again.
            for extension, msg, _ in waiting:
                if extension == PRESENCE:
                    self.reply(msg, "error", _OK, channel.topic)
            return
        fresh = channel.principal is principal
        if fresh:
            self.take_permissions(channel, found, read)
        for extension, msg, size in waiting:
            if self.gone(channel):
                return
            # A token refreshed meanwhile: the messages wait for a check with the new one.
            if fresh and not channel.permissions.can_write(extension):
                self.write_refused(channel, msg, extension)
            elif fresh or self.may_write(channel, msg, size, extension):
                if extension == BROADCAST:
                    self.send_broadcast(channel, msg, size)
                else:
                    self.track_or_untrack(channel, msg, True)
