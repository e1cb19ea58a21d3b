"""``RealtimeChannel``: one ``realtime:<name>`` topic on a :class:`~tidings.client.RealtimeClient`.

Inbound broadcasts go through one pipeline whatever carried them (the WebSocket, a replay after a
rejoin, a history fetch to fill a gap, fallback polling): sequence ordering, then deduplication by
message id, then the callbacks. That is what makes the switches between WebSocket and polling
invisible to the application: one ordered stream without gaps (or with a reported gap) or
duplicates.

Postgres Changes get the same guarantees from Tidings' change log: the channel remembers the
position of the last change it delivered (``data.position``, which compares in stream order) and
asks to resume after it on every rejoin (``postgres_changes_options.resume``); while the
connection is poor it polls ``GET /api/changes`` from there. A change at or before the position
delivered last is a repeat and dropped; a resume or poll the server cannot prove complete is
reported as a :class:`RecoveryGap` (``changes_incomplete``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import random
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from tidings.protocol.codec import Message, Serializer

from .backoff import Backoff
from .errors import (
    ClientClosed,
    HistoryError,
    JoinRejected,
    NotConnected,
    PushRejected,
    PushTimeout,
    RealtimeError,
)
from .events import (
    Broadcast,
    ChannelState,
    PostgresChange,
    PresenceEvent,
    RecoveryGap,
    SendReceipt,
    SystemMessage,
)
from .ordering import OrderBuffer
from .presence import PresenceView
from .sendqueue import OutboundMessage

if TYPE_CHECKING:
    from types import TracebackType

    from .callbacks import Callbacks
    from .connection import Connection
    from .dedup import LRUSet
    from .http import HistoryClient
    from .metrics import Metrics
    from .settings import ClientSettings

__all__ = ["ChannelHost", "RealtimeChannel"]

logger = logging.getLogger("tidings.client")

BroadcastCallback = Callable[[Broadcast], object]
PostgresCallback = Callable[[PostgresChange], object]
PresenceCallback = Callable[[PresenceEvent], object]
SystemCallback = Callable[[SystemMessage], object]
GapCallback = Callable[[RecoveryGap], object]

PRESENCE_EVENTS = ("sync", "join", "leave")


class ChannelHost(Protocol):
    """What a channel uses of its client (:class:`~tidings.client.RealtimeClient` is the one);
    named here so this module needs no import of the client's."""

    settings: ClientSettings
    connection: Connection[RealtimeChannel]
    callbacks: Callbacks
    access_token: str
    history: HistoryClient
    metrics: Metrics
    dedup: LRUSet
    rng: random.Random | None

    @property
    def serializer(self) -> Serializer:
        """The wire format of the connection."""

    @property
    def connected(self) -> bool:
        """True while the WebSocket is open."""

    def start(self) -> None:
        """Start the connection manager in the background."""


POSTGRES_EVENTS = ("*", "INSERT", "UPDATE", "DELETE")


@dataclasses.dataclass(slots=True)
class _PgBinding:
    event: str
    schema: str
    table: str | None
    filter: str | None
    callback: PostgresCallback
    id: int | None = None

    def request(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"event": self.event, "schema": self.schema}
        if self.table is not None:
            entry["table"] = self.table
        if self.filter is not None:
            entry["filter"] = self.filter
        return entry


async def _call(callback: Callable[..., object], *args: Any) -> None:
    """Run an application callback; an awaitable result is awaited so delivery stays in order."""
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("realtime callback %r failed", callback)


class RealtimeChannel:
    """A channel; get one with :meth:`RealtimeClient.channel`.

    Register callbacks first (each ``on_*`` returns the channel, so calls chain), then
    :meth:`subscribe` (or ``async with channel:``, which subscribes and unsubscribes).

    It sends through ``client.connection`` (a :class:`Connection`) and reports through
    ``client.callbacks``; the client's connection manager drives it with :meth:`rejoin`,
    :meth:`message_received`, :meth:`connection_lost`, :meth:`poll_history`, :meth:`cancel_tasks`
    and :meth:`fail_waiters`.
    """

    def __init__(
        self,
        client: ChannelHost,
        name: str,
        *,
        private: bool = False,
        presence_key: str = "",
        broadcast_self: bool = False,
        broadcast_ack: bool = False,
    ) -> None:
        self.client = client
        self.name = name
        """The sub-topic (``room1``)."""
        self.topic = f"realtime:{name}"
        """The wire topic (``realtime:room1``)."""
        self.private = private
        self.presence_key = presence_key
        self.broadcast_self = broadcast_self
        self.broadcast_ack = broadcast_ack
        self.state = ChannelState.CLOSED
        self.join_ref: str | None = None
        """Ref of the ``phx_join`` of the current channel instance."""
        self.presence = PresenceView()
        """Presence as merged from ``presence_state`` / ``presence_diff``."""
        self.last_join_response: dict[str, Any] | None = None
        """The ``response`` of the last ok join reply."""
        settings = client.settings
        self._order: OrderBuffer[Broadcast] = OrderBuffer(
            settings.order_gap_timeout, settings.order_max_buffered, settings.clock
        )
        self._lock = asyncio.Lock()
        self._wanted = False
        self._ever_joined = False
        self._broadcast_handlers: list[tuple[str, BroadcastCallback]] = []
        self._presence_handlers: list[tuple[str, PresenceCallback]] = []
        self._system_handlers: list[SystemCallback] = []
        self._gap_handlers: list[GapCallback] = []
        self._pg_bindings: list[_PgBinding] = []
        self._tracked: dict[str, Any] | None = None
        self._join_waiters: list[asyncio.Future[None]] = []
        self._join_task: asyncio.Task[None] | None = None
        self._rejoin_task: asyncio.Task[None] | None = None
        self._gap_task: asyncio.Task[None] | None = None
        self._rejoin_backoff = Backoff(
            settings.reconnect_base_delay, settings.reconnect_max_delay, settings.reconnect_jitter, client.rng
        )
        self._rejoin_attempts = 0
        self._incomplete_reported_at: int | None = None
        self._rebase = False
        # The channel epoch our sequence numbers belong to (the join reply's), passed back on
        # rejoin and history fetches so the server can tell a lost history from a current one.
        self._epoch: str | None = None
        self._join_ws: object = None
        # Postgres Changes: the greatest position delivered (or vouched for by the server), the
        # change log epoch it belongs to, and the join reply's baseline (applied once its replay
        # was delivered: the announcement after it).
        self._pg_position: str | None = None
        self._pg_epoch: str | None = None
        self._pg_baseline: str | None = None

    def __repr__(self) -> str:
        return f"<RealtimeChannel {self.topic} {self.state}>"

    # ------------------------------------------------------------------ registration

    def on_broadcast(self, event: str, callback: BroadcastCallback) -> RealtimeChannel:
        """Call ``callback(Broadcast)`` for broadcasts of ``event`` (case-insensitive; ``"*"``: all).

        Callbacks run in delivery order; one that returns an awaitable is awaited before the next
        message is delivered, so keep them short.
        """
        self._broadcast_handlers.append((event, callback))
        return self

    def on_postgres_changes(
        self,
        event: str,
        schema: str = "public",
        table: str | None = None,
        filter: str | None = None,
        callback: PostgresCallback | None = None,
    ) -> RealtimeChannel:
        """Subscribe to row changes; ``callback(PostgresChange)`` for each match.

        Args:
            event: ``*``, ``INSERT``, ``UPDATE`` or ``DELETE``.
            schema: schema name or ``*``.
            table: table name, ``*`` or ``None`` (all tables of the schema).
            filter: a filter such as ``id=eq.5`` (spec 6.2), or ``None``.
            callback: the callback.

        Raises:
            ValueError: for an unknown event, a missing callback, or after subscribing.
        """
        if callback is None:
            raise ValueError("on_postgres_changes needs a callback")
        if event.upper() not in POSTGRES_EVENTS:
            raise ValueError(f"postgres_changes event must be one of {POSTGRES_EVENTS}")
        if self._wanted:
            raise ValueError("register postgres_changes callbacks before subscribe()")
        self._pg_bindings.append(_PgBinding(event, schema, table, filter, callback))
        return self

    def on_presence(self, event: str, callback: PresenceCallback) -> RealtimeChannel:
        """Call ``callback(PresenceEvent)`` on presence ``sync``, ``join`` or ``leave``.

        Raises:
            ValueError: for another event name.
        """
        if event not in PRESENCE_EVENTS:
            raise ValueError(f"presence event must be one of {PRESENCE_EVENTS}")
        self._presence_handlers.append((event, callback))
        return self

    def on_system(self, callback: SystemCallback) -> RealtimeChannel:
        """Call ``callback(SystemMessage)`` for ``system`` pushes."""
        self._system_handlers.append(callback)
        return self

    def on_recovery_incomplete(self, callback: GapCallback) -> RealtimeChannel:
        """Call ``callback(RecoveryGap)`` when messages of this channel could not be recovered."""
        self._gap_handlers.append(callback)
        return self

    # ------------------------------------------------------------------ lifecycle

    @property
    def joined(self) -> bool:
        """True while the channel is joined on a live connection."""
        return self.state is ChannelState.JOINED and self.client.connected

    @property
    def wanted(self) -> bool:
        """True from :meth:`subscribe` until :meth:`unsubscribe`: the client keeps (re)joining it.

        It turns False early when the server refuses the first join or closes the channel, or
        when rejoins give up.
        """
        return self._wanted

    @property
    def last_seq(self) -> int | None:
        """The sequence number of the last broadcast delivered in order (``None`` before any)."""
        return self._order.last_released

    @property
    def last_position(self) -> str | None:
        """The position in the change stream this channel resumes after (``None``: none known)."""
        return self._pg_position

    async def subscribe(self, timeout: float | None = None) -> RealtimeChannel:
        """Join the channel, connecting the client first if needed.

        Args:
            timeout: seconds to wait for the join (``None``: until it succeeds or the client gives up).

        Returns:
            The channel.

        Raises:
            JoinRejected: the server refused the join.
            PushTimeout: no reply within ``push_timeout``, or ``timeout`` expired.
            ClientClosed: the client was closed or gave up reconnecting meanwhile.
        """
        if self.joined:
            return self
        self._wanted = True
        self._rejoin_attempts = 0
        self.client.connection.add(self)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._join_waiters.append(waiter)
        self.client.start()
        if self.client.connected and self.state is not ChannelState.JOINING:
            self._start_join()
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise PushTimeout(f"{self.topic}: not joined within {timeout} s") from None
        finally:
            if waiter in self._join_waiters:
                self._join_waiters.remove(waiter)
        return self

    async def unsubscribe(self) -> None:
        """Leave the channel and forget it; queued broadcasts for it are given up on."""
        self._wanted = False
        for task in (self._rejoin_task, self._gap_task, self._join_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self.joined:
            self.state = ChannelState.LEAVING
            try:
                await self.client.connection.push(self.topic, "phx_leave", {}, join_ref=self.join_ref)
            except RealtimeError as exc:
                logger.info("leave of %s not confirmed: %s", self.topic, exc)
        self.state = ChannelState.CLOSED
        self._resolve_waiters(ClientClosed(f"{self.topic} was unsubscribed"))
        self.client.connection.remove(self)

    async def __aenter__(self) -> RealtimeChannel:
        return await self.subscribe()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.unsubscribe()

    # ------------------------------------------------------------------ sending

    async def send_broadcast(self, event: str, payload: Any, *, message_id: str | None = None) -> SendReceipt:
        """Broadcast ``payload`` under ``event`` to the channel's subscribers.

        Sent at once when joined, else queued (at most ``send_queue_size``, oldest dropped) and
        flushed in order after the next (re)join. The broadcast carries a message id so receivers
        can drop the copy a retry may produce. With ``broadcast_ack`` the server's acknowledgement
        is awaited; a refused or unanswered message is retried once, then given up.

        Args:
            event: user event name.
            payload: a JSON value, or ``bytes`` (vsn 2.0.0 only: a raw-binary kind-3 frame).
            message_id: the id to use (default: a new UUID).

        Returns:
            The id and the status at return.

        Raises:
            ValueError: ``bytes`` on a vsn 1.0.0 connection.
        """
        if (
            isinstance(payload, bytes | bytearray | memoryview)
            and self.client.serializer is not Serializer.V2
        ):
            raise ValueError("raw-binary broadcasts need vsn 2.0.0")
        message = OutboundMessage(
            id=message_id or str(uuid.uuid4()),
            topic=self.topic,
            event=event,
            payload=payload,
            queued_at=self.client.settings.clock(),
        )
        status = await self.client.connection.send_broadcast(self, message)
        return SendReceipt(message.id, status)

    async def track(self, state: dict[str, Any]) -> None:
        """Publish this client's presence ``state``; it is tracked again after every rejoin.

        Raises:
            PushRejected: the server refused it.
            PushTimeout: no reply in time.
        """
        self._tracked = dict(state)
        if self.joined:
            await self._push_presence("track", self._tracked)

    async def untrack(self) -> None:
        """Stop publishing presence.

        Raises:
            PushRejected: the server refused it.
            PushTimeout: no reply in time.
        """
        self._tracked = None
        if self.joined:
            await self._push_presence("untrack", {})

    def presence_state(self) -> dict[str, list[dict[str, Any]]]:
        """Everyone present: ``{key: [meta, ...]}``."""
        return self.presence.state()

    # ------------------------------------------------------------------ internals: join

    def _join_payload(self, since_seq: int | None) -> dict[str, Any]:
        settings = self.client.settings
        broadcast: dict[str, Any] = {
            # With recovery on, the channel always asks for its own echoes: without them its
            # sequence stream would have a hole at every message it sent itself.
            "self": self.broadcast_self or settings.recovery,
            "ack": self.broadcast_ack,
        }
        if since_seq is not None:
            broadcast["replay"] = {"since_seq": since_seq, "limit": settings.replay_limit}
            if self._epoch is not None:
                broadcast["replay"]["epoch"] = self._epoch
        presence_enabled = (
            bool(self._presence_handlers) or self._tracked is not None or bool(self.presence_key)
        )
        config: dict[str, Any] = {
            "broadcast": broadcast,
            "presence": {"key": self.presence_key, "enabled": presence_enabled},
            "postgres_changes": [b.request() for b in self._pg_bindings],
            "private": self.private,
        }
        if self._pg_bindings and settings.recovery:
            # Tidings resumes after the last position (a server without the extension ignores it).
            resume: Any = True
            if self._pg_position is not None:
                resume = {"since": self._pg_position}
                if self._pg_epoch is not None:
                    resume["epoch"] = self._pg_epoch
            config["postgres_changes_options"] = {"resume": resume}
        return {"config": config, "access_token": self.client.access_token}

    def _start_join(self) -> None:
        task = self._join_task
        if task is not None and not task.done():
            if self._join_ws is self.client.connection.socket:
                return  # already joining on this connection
            task.cancel()  # a join left over from a lost connection
        self._join_ws = self.client.connection.socket
        self._join_task = asyncio.get_running_loop().create_task(self._join(), name=f"join {self.topic}")

    async def _join(self) -> None:
        client = self.client
        if not client.connected or not self._wanted:
            return
        ref = client.connection.next_ref()
        self.join_ref = ref
        self.state = ChannelState.JOINING
        since = self._order.last_released if client.settings.recovery and self._ever_joined else None
        payload = self._join_payload(since)

        def on_reply(status: str, response: dict[str, Any]) -> None:
            # Runs in the reader, before the replayed broadcasts that follow the reply are read.
            if status == "ok":
                self._on_join_ok(response, since)

        try:
            status, response = await client.connection.push(
                self.topic, "phx_join", payload, join_ref=ref, ref=ref, on_reply=on_reply
            )
        except NotConnected:
            if self._wanted:
                self.state = ChannelState.ERRORED
            return  # the next connection rejoins
        except PushTimeout as exc:
            self.state = ChannelState.ERRORED
            self._resolve_waiters(exc)
            self._schedule_rejoin()
            return
        if status == "ok" and self.state is ChannelState.JOINED:
            self._rejoin_attempts = 0
            self._resolve_waiters(None)
            if self._tracked is not None:
                try:
                    await self._push_presence("track", self._tracked)
                except RealtimeError as exc:
                    logger.warning("re-tracking presence on %s failed: %s", self.topic, exc)
            client.connection.schedule_flush()
            return
        error = JoinRejected(self.topic, response if status != "ok" else {"reason": self._mismatch})
        if not self._ever_joined:
            # A refused first subscribe is the caller's answer; no retry behind its back.
            self._wanted = False
            self.state = ChannelState.CLOSED
            self._resolve_waiters(error)
            client.connection.remove(self)
            return
        logger.warning("rejoin of %s refused: %s", self.topic, error.reason)
        self.state = ChannelState.ERRORED
        client.callbacks.emit("channel_error", self, error)
        self._schedule_rejoin()

    _mismatch = "mismatch between server and client bindings for postgres changes"

    def _on_join_ok(self, response: dict[str, Any], since: int | None) -> None:
        self.last_join_response = response
        entries = response.get("postgres_changes")
        entries = entries if isinstance(entries, list) else []
        if len(entries) != len(self._pg_bindings) or not all(
            isinstance(e, dict) and self._binding_matches(b, e)
            for b, e in zip(self._pg_bindings, entries, strict=False)
        ):
            logger.error("%s: %s", self.topic, self._mismatch)
            self.state = ChannelState.ERRORED
            return
        for binding, entry in zip(self._pg_bindings, entries, strict=True):
            value = entry.get("id")
            binding.id = value if isinstance(value, int) else None
        self.state = ChannelState.JOINED
        self._ever_joined = True
        self.presence.reset()
        epoch = response.get("epoch")
        self._epoch = epoch if isinstance(epoch, str) else None
        self._on_resume_reply(response.get("postgres_changes_resume"))
        if not self.client.settings.recovery:
            return
        if since is not None and response.get("recovered") is False:
            self._report_gap(RecoveryGap(self.topic, since + 1, None, "replay_incomplete"))
            # The server said it cannot give everything: start again from what it sends next.
            # Done by the next _ingest, under the lock, so nothing is released out of turn.
            self._rebase = True
        baseline = response.get("seq")
        if self._order.expected is None and isinstance(baseline, int) and not isinstance(baseline, bool):
            self._order.reset(baseline + 1)

    def _on_resume_reply(self, resume: object) -> None:
        """The join reply's ``postgres_changes_resume``: the epoch, the baseline, and whether the
        replay that follows holds everything after the position the join asked from."""
        self._pg_baseline = None
        if not isinstance(resume, dict):
            return
        epoch, position = resume.get("epoch"), resume.get("position")
        if isinstance(epoch, str) and epoch:
            self._pg_epoch = epoch
        if isinstance(position, str):
            self._pg_baseline = position
        if resume.get("recovered") is False:
            reason = resume.get("reason")
            self._report_gap(
                RecoveryGap(
                    self.topic,
                    None,
                    None,
                    "changes_incomplete",
                    self._pg_position,
                    reason if isinstance(reason, str) else "",
                )
            )

    def _advance(self, position: str | None) -> None:
        if position is not None and (self._pg_position is None or position > self._pg_position):
            self._pg_position = position

    @staticmethod
    def _binding_matches(binding: _PgBinding, entry: dict[str, Any]) -> bool:
        return (
            entry.get("event") == binding.event
            and entry.get("schema") == binding.schema
            and entry.get("table") == binding.table
            and entry.get("filter") == binding.filter
        )

    def _schedule_rejoin(self) -> None:
        if not self._wanted or (self._rejoin_task is not None and not self._rejoin_task.done()):
            return
        self._rejoin_attempts += 1
        if self._rejoin_attempts > self.client.settings.max_rejoin_attempts:
            logger.error("giving up on %s after %d rejoin attempts", self.topic, self._rejoin_attempts - 1)
            self._wanted = False
            self.state = ChannelState.CLOSED
            self._resolve_waiters(ClientClosed(f"{self.topic}: gave up rejoining"))
            self.client.callbacks.emit("channel_closed", self)
            return
        delay = self._rejoin_backoff.delay(self._rejoin_attempts)
        self._rejoin_task = asyncio.get_running_loop().create_task(self._rejoin_later(delay))

    async def _rejoin_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._wanted and self.state is ChannelState.ERRORED and self.client.connected:
            self._start_join()

    def _resolve_waiters(self, error: BaseException | None) -> None:
        waiters, self._join_waiters = self._join_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    # ------------------------------------------------------------------ driven by the client

    def rejoin(self) -> asyncio.Task[None] | None:
        """(Re)join on the current connection if :attr:`wanted`; returns the join task, if any.

        The client calls it after every (re)connect and awaits the tasks before flushing the queue.
        """
        if not self._wanted:
            return None
        self._start_join()
        return self._join_task

    def connection_lost(self) -> None:
        """The client lost its connection: a joined channel is ``errored`` (rejoined later) or ``closed``."""
        if self.state in (ChannelState.JOINED, ChannelState.JOINING, ChannelState.LEAVING):
            self.state = ChannelState.ERRORED if self._wanted else ChannelState.CLOSED

    def cancel_tasks(self) -> None:
        """Stop the join, the rejoin timer and the gap filling (the client is closing)."""
        for task in (self._rejoin_task, self._gap_task, self._join_task):
            if task is not None:
                task.cancel()

    def fail_waiters(self, error: BaseException) -> None:
        """Make every :meth:`subscribe` still waiting raise ``error`` (the client closed or gave up)."""
        self._resolve_waiters(error)

    async def poll_history(self) -> None:
        """One fallback poll: fetch what this channel may have missed since its last message, and
        the Postgres Changes after its last position."""
        if not self._wanted:
            return
        if self._pg_bindings and self.client.settings.recovery and self._pg_position is not None:
            await self._poll_changes()
        since = self._order.last_released
        if since is None:
            return
        await self._fetch_history(since)

    async def _poll_changes(self) -> None:
        """Fetch the changes after the last position, one request per binding, and deliver, in
        order, those that every answer covers (up to the smallest position answered); a change
        several bindings match is delivered once, to each of them. Pages go on while the server
        says there is more (bounded by ``history_max_pages``)."""
        history, settings = self.client.history, self.client.settings
        for _ in range(settings.history_max_pages):
            since = self._pg_position
            if since is None:
                return
            pages = [
                (binding, await history.fetch_changes(binding.request(), since, self._pg_epoch))
                for binding in self._pg_bindings
            ]
            through = min(page.position for _, page in pages)
            merged: dict[str, tuple[list[_PgBinding], dict[str, Any]]] = {}
            for binding, page in pages:
                if not page.recovered:
                    gap = RecoveryGap(self.topic, None, None, "changes_incomplete", since, page.reason)
                    self._report_gap(gap)
                if page.epoch is not None:
                    self._pg_epoch = page.epoch
                for entry in page.changes:
                    position = entry["data"].get("position")
                    if isinstance(position, str) and since < position <= through:
                        merged.setdefault(position, ([], entry["data"]))[0].append(binding)
            async with self._lock:
                for position in sorted(merged):
                    bindings, data = merged[position]
                    await self._dispatch_change(data, [b.id for b in bindings if b.id is not None], bindings)
                self._advance(through)
            if not any(page.more for _, page in pages) or through <= since:
                return

    # ------------------------------------------------------------------ internals: sending

    async def _push_presence(self, event: str, payload: dict[str, Any]) -> None:
        wire: dict[str, Any] = {"type": "presence", "event": event, "payload": payload}
        status, response = await self.client.connection.push(
            self.topic, "presence", wire, join_ref=self.join_ref
        )
        if status != "ok":
            raise PushRejected(self.topic, response)

    # ------------------------------------------------------------------ internals: receiving

    async def message_received(self, message: Message) -> None:
        """Handle one server message for this channel's topic (the client's reader calls it)."""
        event, payload = message.event, message.payload
        if event == "broadcast":
            await self._ingest(payload, "websocket")
        elif event == "presence_state":
            for presence_event in self.presence.apply_state(payload):
                await self._dispatch_presence(presence_event)
        elif event == "presence_diff":
            for presence_event in self.presence.apply_diff(payload):
                await self._dispatch_presence(presence_event)
        elif event == "postgres_changes":
            await self._dispatch_postgres(payload)
        elif event == "system":
            if payload.get("extension") == "postgres_changes" and "recovered" in payload:
                # After a resume's replay: everything up to the join's baseline was delivered.
                self._advance(self._pg_baseline)
                self._pg_baseline = None
            system = SystemMessage(
                self.topic,
                str(payload.get("extension", "")),
                str(payload.get("status", "")),
                str(payload.get("message", "")),
            )
            if system.status == "error":
                logger.warning("%s: system error: %s", self.topic, system.message)
            for callback in list(self._system_handlers):
                await _call(callback, system)
        elif event == "phx_error":
            logger.warning("%s: channel crashed on the server; rejoining", self.topic)
            self.state = ChannelState.ERRORED
            self._schedule_rejoin()
        elif event == "phx_close":
            if self.state is not ChannelState.LEAVING:
                logger.warning("%s: closed by the server", self.topic)
                self._wanted = False
                self.state = ChannelState.CLOSED
                self._resolve_waiters(ClientClosed(f"{self.topic} was closed by the server"))
                self.client.connection.remove(self)
                self.client.callbacks.emit("channel_closed", self)

    async def _dispatch_presence(self, presence_event: PresenceEvent) -> None:
        for name, callback in list(self._presence_handlers):
            if name == presence_event.event:
                await _call(callback, presence_event)

    async def _dispatch_postgres(self, payload: dict[str, Any]) -> None:
        data = payload.get("data")
        ids = payload.get("ids")
        if not isinstance(data, dict) or not isinstance(ids, list):
            return
        async with self._lock:
            await self._dispatch_change(data, [i for i in ids if isinstance(i, int)], None)

    async def _dispatch_change(
        self, data: dict[str, Any], ids: list[int], bindings: list[_PgBinding] | None
    ) -> None:
        """Deliver one change to its bindings (by ``ids``, or the polled ``bindings``), unless its
        position shows it was delivered already (under the channel's lock)."""
        position = data.get("position")
        position = position if isinstance(position, str) else None
        if position is not None and self._pg_position is not None and position <= self._pg_position:
            self.client.metrics.record_duplicate()
            return
        self._advance(position)
        kind = str(data.get("type", ""))
        record, old = data.get("record"), data.get("old_record")
        columns, errors = data.get("columns"), data.get("errors")
        change = PostgresChange(
            topic=self.topic,
            schema=str(data.get("schema", "")),
            table=str(data.get("table", "")),
            type=kind,
            commit_timestamp=data.get("commit_timestamp")
            if isinstance(data.get("commit_timestamp"), str)
            else None,
            record=record if isinstance(record, dict) else None,
            old_record=old if isinstance(old, dict) else None,
            columns=columns if isinstance(columns, list) else [],
            errors=errors if isinstance(errors, list) else None,
            ids=ids,
            position=position,
            source="websocket" if bindings is None else "poll",
        )
        targets = list(self._pg_bindings) if bindings is None else bindings
        for binding in targets:
            if (bindings is not None or binding.id in ids) and binding.event.upper() in ("*", kind.upper()):
                await _call(binding.callback, change)

    async def _ingest(self, payload: dict[str, Any], source: str) -> None:
        meta = payload.get("meta")
        broadcast = Broadcast(
            topic=self.topic,
            event=str(payload.get("event", "")),
            payload=payload.get("payload"),
            meta=dict(meta) if isinstance(meta, dict) else {},
            source=source,
        )
        seq = broadcast.seq
        async with self._lock:
            if seq is None or not self.client.settings.recovery:
                await self._deliver(broadcast)
                return
            ready: list[Broadcast] = []
            if self._rebase:
                self._rebase = False
                gap = self._order.gap()
                ready += self._order.reset(seq if gap is None else min(seq, gap[1] + 1))
            ready += self._order.offer(seq, broadcast)
            if self._order.overflowing:
                gap = self._order.gap()
                if gap is not None:
                    self._report_gap(RecoveryGap(self.topic, gap[0], gap[1], "buffer_overflow"))
                ready += self._order.skip_gap()
            for item in ready:
                await self._deliver(item)
        self._ensure_gap_task()

    async def _deliver(self, broadcast: Broadcast) -> None:
        client = self.client
        message_id = broadcast.id
        if message_id is not None:
            own = message_id in client.connection.sent_ids
            if client.dedup.seen((self.topic, message_id)):
                client.metrics.record_duplicate()
                return
            if own and client.settings.recovery and not self.broadcast_self:
                return  # the echo asked for only to keep the sequence whole
        client.metrics.record_received()
        for name, callback in list(self._broadcast_handlers):
            if name == "*" or name.lower() == broadcast.event.lower():
                await _call(callback, broadcast)

    # ------------------------------------------------------------------ internals: recovery

    def _report_gap(self, gap: RecoveryGap) -> None:
        logger.warning(
            "%s: messages %s..%s could not be recovered (%s)",
            self.topic,
            gap.first_seq,
            "?" if gap.last_seq is None else gap.last_seq,
            gap.reason,
        )
        for callback in list(self._gap_handlers):
            try:
                result = callback(gap)
                if inspect.isawaitable(result):
                    self.client.callbacks.spawn(result)
            except Exception:
                logger.exception("recovery_incomplete callback failed")
        self.client.callbacks.emit("recovery_incomplete", gap)

    def _ensure_gap_task(self) -> None:
        if self._order.gap() is None or (self._gap_task is not None and not self._gap_task.done()):
            return
        self._gap_task = asyncio.get_running_loop().create_task(
            self._resolve_gaps(), name=f"gaps {self.topic}"
        )

    async def _resolve_gaps(self) -> None:
        clock = self.client.settings.clock
        # Each turn closes one gap (fills or skips it), and the buffer is bounded.
        for _ in range(self.client.settings.order_max_buffered + 1):
            deadline = self._order.gap_deadline()
            if deadline is None:
                return
            wait = deadline - clock()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            gap = self._order.gap()
            if gap is None:
                return
            reason = "history_incomplete"
            try:
                await self._fetch_history(gap[0] - 1, until=gap[1])
            except HistoryError as exc:
                logger.warning("%s: history fetch for gap %d..%d failed: %s", self.topic, gap[0], gap[1], exc)
                reason = "history_unavailable"
            async with self._lock:
                still = self._order.gap()
                if still is None or still[0] != gap[0]:
                    continue
                self._report_gap(RecoveryGap(self.topic, still[0], still[1], reason))
                for item in self._order.skip_gap():
                    await self._deliver(item)

    async def _fetch_history(self, since_seq: int, until: int | None = None) -> bool:
        """Fetch and ingest messages after ``since_seq``; returns the endpoint's ``complete`` flag.

        Raises:
            HistoryError: when the endpoint fails.
        """
        settings = self.client.settings
        history = self.client.history
        complete = True
        for _ in range(settings.history_max_pages):
            page = await history.fetch(
                self.name, since_seq, settings.history_page_limit, self.private, self._epoch
            )
            complete = complete and page.complete
            seqs: list[int] = []
            if not page.complete:
                seqs = [s for s in (self._seq_of(m) for m in page.messages) if s is not None]
                await self._handle_incomplete_page(min(seqs) if seqs else None)
            if page.epoch is not None:
                self._epoch = page.epoch  # a new epoch's messages are what the stream goes on with
            before = since_seq
            for entry in page.messages:
                meta = entry.get("meta")
                await self._ingest(
                    {
                        "type": "broadcast",
                        "event": entry.get("event", ""),
                        "payload": entry.get("payload"),
                        "meta": meta if isinstance(meta, dict) else {},
                    },
                    "history",
                )
                seq = self._seq_of(entry)
                if seq is not None:
                    since_seq = max(since_seq, seq)
            # The server may clamp the page size: only an empty (or non-advancing) page means the end.
            if since_seq <= before or (until is not None and since_seq >= until):
                break
        return complete

    @staticmethod
    def _seq_of(entry: dict[str, Any]) -> int | None:
        meta = entry.get("meta")
        seq = meta.get("seq") if isinstance(meta, dict) else None
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    async def _handle_incomplete_page(self, first_available: int | None) -> None:
        async with self._lock:
            expected = self._order.expected
            if expected is None or (first_available is not None and first_available <= expected):
                return
            if self._incomplete_reported_at == expected:
                return  # already told the application about this very gap
            self._incomplete_reported_at = expected
            last = None if first_available is None else first_available - 1
            self._report_gap(RecoveryGap(self.topic, expected, last, "history_incomplete"))
            if first_available is not None:
                # Nothing older exists any more: continue from the oldest message history still has.
                for item in self._order.reset(first_available):
                    await self._deliver(item)
