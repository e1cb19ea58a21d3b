"""``Connection``: the SDK's one door to the node.

One object, shared by a :class:`~tidings.client.RealtimeClient` and its channels, owns everything
that goes out:

* the channels open on it, by topic;
* refs, and the replies awaited by ref (each fails with ``NotConnected`` when the link is lost);
* encoding in the client's serializer and sending on the current :class:`TransportSocket`;
* broadcasts: sent at once, or queued in the bounded :class:`SendQueue` and flushed in order after
  the next (re)join, acknowledgements awaited, a failure retried once and then given up.

The socket comes from a :class:`Transport` (``WebSocketTransport`` by default; ``MemoryTransport``
in tests). The client's connection manager opens and attaches it, reads from it and detaches it;
the channels only call :meth:`Connection.push`, :meth:`Connection.send_broadcast` and friends.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from tidings.protocol.codec import Message, Serializer

from .dedup import LRUSet
from .errors import NotConnected, PushTimeout
from .events import SendStatus
from .sendqueue import OutboundMessage, SendQueue
from .transport import Transport, TransportSocket, WebSocketTransport
from .wire import encode_broadcast_push, encode_message, serializer_for

if TYPE_CHECKING:
    from .callbacks import Callbacks
    from .metrics import Metrics
    from .settings import ClientSettings

__all__ = ["Connection", "Endpoint", "Reply"]

logger = logging.getLogger("tidings.client")

Reply = tuple[str, dict[str, Any]]
"""A push's answer: ``(status, response)``."""


class Endpoint(Protocol):
    """What the connection needs of a channel to send its broadcasts (a ``RealtimeChannel`` is one)."""

    @property
    def topic(self) -> str:
        """``realtime:<name>``."""
        ...

    @property
    def join_ref(self) -> str | None:
        """The ref of the current join."""
        ...

    @property
    def broadcast_ack(self) -> bool:
        """True when the server acknowledges each broadcast."""
        ...

    @property
    def joined(self) -> bool:
        """True while joined on a live connection."""
        ...


ChannelT = TypeVar("ChannelT", bound=Endpoint)


class _Pending:
    __slots__ = ("future", "on_reply")

    def __init__(
        self, future: asyncio.Future[Reply], on_reply: Callable[[str, dict[str, Any]], None] | None
    ) -> None:
        self.future = future
        self.on_reply = on_reply


def _nothing() -> None:
    return None


class Connection(Generic[ChannelT]):
    """The outbound pipeline of one client (see the module docs).

    Args:
        settings: the client's settings (``vsn``, ``push_timeout``, ``send_queue_size``...).
        metrics: where sends, latencies, drops and failures are counted.
        callbacks: where ``message_dropped`` is reported.
        transport: what opens sockets (default: a :class:`WebSocketTransport`).
        on_queue_change: called after the send queue grew, a flush ended or a message gave up.
        on_channel_removed: called after :meth:`remove`.
    """

    def __init__(
        self,
        settings: ClientSettings,
        metrics: Metrics,
        callbacks: Callbacks,
        *,
        transport: Transport | None = None,
        on_queue_change: Callable[[], None] | None = None,
        on_channel_removed: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.serializer: Serializer = serializer_for(settings.vsn)
        self.transport: Transport = transport if transport is not None else WebSocketTransport()
        self.metrics = metrics
        self.callbacks = callbacks
        self.queue = SendQueue(settings.send_queue_size, self._on_queue_drop)
        """Broadcasts waiting for their channel to be joined."""
        self.sent_ids = LRUSet(settings.dedup_size)
        """Ids of the broadcasts sent from here, so their echoes are recognised."""
        self.socket: TransportSocket | None = None
        """The attached socket (``None`` between connections)."""
        self._on_queue_change = on_queue_change or _nothing
        self._on_channel_removed = on_channel_removed or _nothing
        self._channels: dict[str, ChannelT] = {}
        self._pending: dict[str, _Pending] = {}
        self._refs = itertools.count(1)
        self._flush_lock = asyncio.Lock()
        self._flushing = False
        self._flush_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Connection {'attached' if self.connected else 'detached'}, {len(self._channels)} channels>"

    # ------------------------------------------------------------------ channels

    @property
    def channels(self) -> list[ChannelT]:
        """The channels open on this connection, in the order they were added."""
        return list(self._channels.values())

    def get(self, topic: str) -> ChannelT | None:
        """The channel of ``topic``, if any."""
        return self._channels.get(topic)

    def add(self, channel: ChannelT) -> None:
        """Register ``channel`` under its topic (a channel already there for it stays)."""
        self._channels.setdefault(channel.topic, channel)

    def remove(self, channel: ChannelT) -> None:
        """Forget ``channel``; its queued broadcasts are given up on (``failed_messages``)."""
        if self._channels.get(channel.topic) is channel:
            del self._channels[channel.topic]
        for message in self.queue.take(lambda m: m.topic == channel.topic):
            self.metrics.record_failed()
            message.finish(SendStatus.ERROR)
        self._on_channel_removed()

    # ------------------------------------------------------------------ the socket

    @property
    def connected(self) -> bool:
        """True while a socket is attached."""
        return self.socket is not None

    async def open(self, url: str) -> TransportSocket:
        """Dial ``url`` through the transport, within ``connect_timeout`` (not attached yet).

        Raises:
            TimeoutError: the transport did not connect in time; any transport error.
        """
        async with asyncio.timeout(self.settings.connect_timeout):
            return await self.transport.connect(url, self.settings)

    def attach(self, socket: TransportSocket) -> None:
        """Send on ``socket`` from now on."""
        self.socket = socket

    def detach(self) -> None:
        """Stop sending: every send raises ``NotConnected`` until the next :meth:`attach`."""
        self.socket = None

    def fail_pending(self, error: BaseException) -> None:
        """Fail every push still waiting for its reply with ``error`` (the connection was lost)."""
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(error)
                entry.future.exception()  # mark retrieved: a dropped waiter must not warn

    # ------------------------------------------------------------------ refs, sends and replies

    def next_ref(self) -> str:
        """A fresh message ref."""
        return str(next(self._refs))

    async def send(self, data: str | bytes) -> None:
        """Send one encoded message on the attached socket.

        Raises:
            NotConnected: no socket, or it is closed.
        """
        socket = self.socket
        if socket is None:
            raise NotConnected("not connected")
        await socket.send(data)

    async def send_message(
        self, topic: str, event: str, payload: dict[str, Any], *, join_ref: str | None, ref: str | None = None
    ) -> str:
        """Encode and send one message without waiting for a reply; returns its ref.

        Raises:
            NotConnected: nothing was sent.
        """
        ref = ref or self.next_ref()
        await self.send(encode_message(self.serializer, join_ref, ref, topic, event, payload))
        return ref

    def expect_reply(
        self, ref: str, on_reply: Callable[[str, dict[str, Any]], None] | None = None
    ) -> asyncio.Future[Reply]:
        """A future for the reply to ``ref``; ``on_reply(status, response)`` runs in the reader first."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[ref] = _Pending(future, on_reply)
        return future

    def forget_reply(self, ref: str) -> None:
        """Stop waiting for the reply to ``ref``."""
        self._pending.pop(ref, None)

    def reply_received(self, message: Message) -> None:
        """Settle the push a ``phx_reply`` answers (by its ref); an unknown ref is ignored."""
        entry = self._pending.pop(message.ref, None) if message.ref is not None else None
        if entry is None:
            return
        status = message.payload.get("status")
        response = message.payload.get("response")
        reply: Reply = (
            status if isinstance(status, str) else "error",
            response if isinstance(response, dict) else {},
        )
        if entry.on_reply is not None:
            try:
                entry.on_reply(*reply)
            except Exception:
                logger.exception("reply handler failed")
        if not entry.future.done():
            entry.future.set_result(reply)

    async def push(
        self,
        topic: str,
        event: str,
        payload: dict[str, Any],
        *,
        join_ref: str | None,
        ref: str | None = None,
        timeout: float | None = None,
        on_reply: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> Reply:
        """Send a message and wait for its reply.

        Args:
            topic: ``realtime:<name>`` or ``phoenix``.
            event: ``phx_join``, ``heartbeat``, ``presence``...
            payload: a JSON object.
            join_ref: the channel's join ref (``None`` for heartbeats).
            ref: the ref to use (default: a fresh one).
            timeout: seconds to wait (default: ``push_timeout``).
            on_reply: called with ``(status, response)`` in the reader, before later messages.

        Raises:
            NotConnected: not connected, or the connection was lost first.
            PushTimeout: no reply in time.
        """
        ref = ref or self.next_ref()
        future = self.expect_reply(ref, on_reply)
        try:
            await self.send_message(topic, event, payload, join_ref=join_ref, ref=ref)
            async with asyncio.timeout(timeout or self.settings.push_timeout):
                return await future
        except TimeoutError:
            raise PushTimeout(f"no reply to {event} on {topic}") from None
        finally:
            self._pending.pop(ref, None)

    # ------------------------------------------------------------------ broadcasts

    async def send_broadcast(self, channel: ChannelT, message: OutboundMessage) -> SendStatus:
        """Send ``message`` on ``channel`` now, or queue it behind older ones / until it is joined.

        Returns:
            ``SENT``, ``OK`` (acknowledged), ``QUEUED`` (waiting, or its one retry) or ``ERROR``.
        """
        self.metrics.record_sent()
        self.sent_ids.seen(message.id)
        if channel.joined and not self._queue_blocks(channel.topic):
            return await self._send_now(channel, message)
        self.enqueue(message)
        return SendStatus.QUEUED

    def enqueue(self, message: OutboundMessage) -> None:
        """Queue ``message`` (the oldest is dropped when full) and flush if connected."""
        self.queue.put(message)
        self._on_queue_change()
        self.schedule_flush()

    def schedule_flush(self) -> None:
        """Start a flush of the send queue, unless one is running or there is nothing to do."""
        if not self.connected or not len(self.queue):
            return
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self.flush(), name="tidings-flush")

    def stop_flush(self) -> None:
        """Cancel a running flush (the client is closing)."""
        if self._flush_task is not None:
            self._flush_task.cancel()

    async def flush(self) -> None:
        """Send queued broadcasts of joined channels, in order; acks are awaited together."""
        async with self._flush_lock:
            self._flushing = True
            try:
                # Each round empties what can go; failures come back at most once each.
                for _ in range(2 * self.settings.send_queue_size + 2):
                    batch = self.queue.take(
                        lambda m: (c := self._channels.get(m.topic)) is not None and c.joined
                    )
                    if not batch:
                        return
                    acks = []
                    for index, message in enumerate(batch):
                        channel = self._channels[message.topic]
                        started = self._now()
                        try:
                            pending = await self._write_broadcast(channel, message)
                        except NotConnected:
                            self.queue.push_front(batch[index:])
                            break
                        if pending is None:
                            message.finish(SendStatus.SENT)
                        else:
                            acks.append(self._await_ack(message, pending, started))
                    if acks:
                        await asyncio.gather(*acks)
                    if not self.connected:
                        return
            finally:
                self._flushing = False
                self._on_queue_change()

    def _queue_blocks(self, topic: str) -> bool:
        # A message must not overtake older queued ones for the same channel.
        return self._flushing or self.queue.has_topic(topic)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def _write_broadcast(
        self, channel: ChannelT, message: OutboundMessage
    ) -> tuple[str, asyncio.Future[Reply]] | None:
        """Write ``message``; returns ``(ref, ack future)`` when an acknowledgement is expected.

        Raises:
            NotConnected: nothing was written.
        """
        ref = self.next_ref()
        if self.serializer is Serializer.V2:
            data: str | bytes = encode_broadcast_push(
                channel.join_ref, ref, channel.topic, message.event, message.payload, {"id": message.id}
            )
        else:
            data = encode_message(
                self.serializer,
                channel.join_ref,
                ref,
                channel.topic,
                "broadcast",
                {"type": "broadcast", "event": message.event, "payload": message.payload, "id": message.id},
            )
        future = self.expect_reply(ref) if channel.broadcast_ack else None
        try:
            await self.send(data)
        except NotConnected:
            self.forget_reply(ref)
            raise
        message.attempts += 1
        return None if future is None else (ref, future)

    async def _send_now(self, channel: ChannelT, message: OutboundMessage) -> SendStatus:
        started = self._now()
        try:
            pending = await self._write_broadcast(channel, message)
        except NotConnected:
            self.enqueue(message)
            return SendStatus.QUEUED
        if pending is None:
            message.finish(SendStatus.SENT)
            return SendStatus.SENT
        return await self._await_ack(message, pending, started)

    async def _await_ack(
        self, message: OutboundMessage, pending: tuple[str, asyncio.Future[Reply]], started: float
    ) -> SendStatus:
        ref, future = pending
        try:
            async with asyncio.timeout(self.settings.push_timeout):
                status, response = await future
        except TimeoutError:
            self.forget_reply(ref)
            return self._settle_failure(message, "no acknowledgement")
        except NotConnected:
            return self._settle_failure(message, "connection lost before the acknowledgement")
        if status == "ok":
            self.metrics.record_latency((self._now() - started) * 1000.0)
            message.finish(SendStatus.OK)
            return SendStatus.OK
        return self._settle_failure(message, f"refused: {response}")

    def _settle_failure(self, message: OutboundMessage, why: str) -> SendStatus:
        if self.queue.requeue(message):
            logger.info("broadcast %s failed (%s); queued for its one retry", message.id, why)
            self.schedule_flush()
            return SendStatus.QUEUED
        logger.warning("broadcast %s failed twice (%s); giving up", message.id, why)
        self.metrics.record_failed()
        message.finish(SendStatus.ERROR)
        self._on_queue_change()
        return SendStatus.ERROR

    def _on_queue_drop(self, message: OutboundMessage) -> None:
        self.metrics.record_dropped()
        self.callbacks.emit("message_dropped", message)
