"""``RealtimeClient``: the connection manager.

One background task owns the connection: it connects (with a timeout), runs the session (reader,
heartbeat, rejoin and queue flush) until the connection is lost, then waits a jittered exponential
delay and tries again, at most ``max_reconnect_attempts`` times before turning ``failed``::

    disconnected -> connecting -> connected -> reconnecting -> connected ...
                                                     \\-> failed (max_reconnect_attempts_reached)

The heartbeat measures its round trip; a missing reply (a half-open connection) or a connection
the quality monitor calls hopeless ends the session, which starts a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tidings.protocol.codec import MalformedMessage, Message

from .backoff import Backoff
from .callbacks import Callbacks
from .channel import RealtimeChannel
from .connection import Connection
from .dedup import LRUSet
from .errors import ClientClosed, HistoryError, NotConnected, PushTimeout
from .events import ConnectionState
from .http import HistoryClient, build_socket_url, derive_http_base
from .metrics import Alert, AlertMonitor, Metrics, MetricsReporter, MetricsSnapshot
from .quality import Quality, QualityMonitor
from .settings import ClientSettings
from .transport import Transport, TransportSocket
from .wire import decode_frame, serializer_for

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["EVENTS", "RealtimeClient"]

logger = logging.getLogger("tidings.client")

EVENTS = (
    "state_change",
    "max_reconnect_attempts_reached",
    "recovery_incomplete",
    "alert",
    "quality_change",
    "fallback_change",
    "latency_warning",
    "message_dropped",
    "channel_error",
    "channel_closed",
)
"""Names accepted by :meth:`RealtimeClient.on`."""


class RealtimeClient:
    """A resilient Supabase Realtime / Tidings client.

    Args:
        url: the realtime URL, e.g. ``ws://localhost:4000/realtime/v1`` (``http(s)`` is accepted;
            ``/websocket?apikey=...&vsn=...`` is appended).
        token: the API key (a JWT with ``role`` and ``exp`` for Tidings and Supabase).
        settings: a base :class:`ClientSettings`.
        transport: what opens the connection (default: a :class:`WebSocketTransport`; tests can
            pass a :class:`MemoryTransport`).
        **overrides: any :class:`ClientSettings` field, e.g. ``vsn="1.0.0"``, ``heartbeat_interval=15``.

    Raises:
        TypeError: an unknown setting.
        ValueError: a bad setting value or URL.

    Use it as an async context manager (``async with RealtimeClient(...) as client:``), or call
    :meth:`connect` and :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        settings: ClientSettings | None = None,
        transport: Transport | None = None,
        **overrides: Any,
    ) -> None:
        base = settings or ClientSettings()
        self.settings = base.replace(**overrides) if overrides else base
        self.settings.validate()
        self.url = url
        self.apikey = token
        self.access_token = self.settings.access_token or token
        """Token sent in joins (``set_auth()`` changes it)."""
        self.serializer = serializer_for(self.settings.vsn)
        self.socket_url = build_socket_url(url, token, self.settings.vsn, self.settings.params)
        """The WebSocket URL actually dialled."""
        self.http_base = self.settings.http_base or derive_http_base(url)
        """Base of the HTTP API (history endpoint)."""
        self.history = HistoryClient(self.http_base, token, self.settings.http_timeout)
        if self.settings.access_token:
            self.history.access_token = self.settings.access_token
        self.rng = self.settings.rng
        s = self.settings
        self.backoff = Backoff(s.reconnect_base_delay, s.reconnect_max_delay, s.reconnect_jitter, s.rng)
        self.quality = QualityMonitor(
            s.quality_window, s.excellent_ms, s.good_ms, s.slow_ms, s.slow_count, s.slow_window
        )
        self.metrics = Metrics(s.latency_window, s.health_window)
        self.state = ConnectionState.DISCONNECTED
        self.callbacks = Callbacks(EVENTS)
        """The application callbacks (:meth:`on` adds to them; channels report through them too)."""
        self._alerts = AlertMonitor(s.alert_thresholds, lambda alert: self.callbacks.emit("alert", alert))
        self.dedup = LRUSet(s.dedup_size)
        """``(topic, message id)`` of the broadcasts delivered, so a second copy is dropped."""
        self.connection: Connection[RealtimeChannel] = Connection(
            self.settings,
            self.metrics,
            self.callbacks,
            transport=transport,
            on_queue_change=self._check_alerts,
            on_channel_removed=self._update_fallback,
        )
        """The outbound pipeline shared with the channels: the channels, refs, replies, the send queue."""
        self._run_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._drop = asyncio.Event()
        self._state_waiters: list[tuple[frozenset[ConnectionState], asyncio.Future[ConnectionState]]] = []
        self._fallback_task: asyncio.Task[None] | None = None
        self._last_quality = Quality.DISCONNECTED
        self._reporter: MetricsReporter | None = None
        if s.metrics_report_url:
            self._reporter = MetricsReporter(
                s.metrics_report_url,
                self.metrics_snapshot,
                s.metrics_report_interval,
                {"apikey": token},
                s.http_timeout,
            )

    def __repr__(self) -> str:
        return f"<RealtimeClient {self.url} {self.state}>"

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True while the WebSocket is open."""
        return self.connection.connected and self.state is ConnectionState.CONNECTED

    @property
    def connection_quality(self) -> Quality:
        """``excellent``, ``good``, ``poor`` or ``disconnected`` (from heartbeat round trips)."""
        return self.quality.quality

    @property
    def fallback_active(self) -> bool:
        """True while channels are polled over HTTP."""
        return self._fallback_task is not None and not self._fallback_task.done()

    @property
    def channels(self) -> list[RealtimeChannel]:
        """The channels created and not removed."""
        return self.connection.channels

    @property
    def queue_size(self) -> int:
        """Broadcasts waiting in the send queue."""
        return len(self.connection.queue)

    def channel(
        self,
        name: str,
        *,
        private: bool = False,
        presence_key: str = "",
        broadcast_self: bool = False,
        broadcast_ack: bool = False,
    ) -> RealtimeChannel:
        """The channel ``name`` (``realtime:`` is prepended); the same object for the same name.

        Args:
            name: sub-topic, e.g. ``room1``.
            private: a private channel (RLS-authorized on Supabase).
            presence_key: this client's presence key (``""``: the server generates one).
            broadcast_self: also deliver this client's own broadcasts to it.
            broadcast_ack: ask the server to acknowledge each broadcast (measured, retried once).
        """
        name = name.removeprefix("realtime:")
        topic = f"realtime:{name}"
        existing = self.connection.get(topic)
        if existing is not None:
            return existing
        channel = RealtimeChannel(
            self,
            name,
            private=private,
            presence_key=presence_key,
            broadcast_self=broadcast_self,
            broadcast_ack=broadcast_ack,
        )
        self.connection.add(channel)
        return channel

    async def remove_channel(self, channel: RealtimeChannel) -> None:
        """Unsubscribe ``channel`` and forget it."""
        await channel.unsubscribe()

    async def connect(self, timeout: float | None = None) -> None:
        """Start the connection manager and wait until connected.

        Args:
            timeout: seconds to wait (``None``: until connected or ``failed``). On timeout the
                manager keeps trying in the background.

        Raises:
            ClientClosed: every attempt failed, or :meth:`close` was called meanwhile.
            TimeoutError: ``timeout`` expired first.
        """
        self.start()
        state = await self.wait_for_state(
            ConnectionState.CONNECTED, ConnectionState.FAILED, ConnectionState.DISCONNECTED, timeout=timeout
        )
        if state is not ConnectionState.CONNECTED:
            raise ClientClosed(f"could not connect to {self.url} (state {state})")

    async def close(self) -> None:
        """Close the connection and stop every background task; :meth:`connect` may start again."""
        self._stop.set()
        self._drop.set()
        await self._stop_fallback()
        if self._reporter is not None:
            await self._reporter.stop()
        for channel in self.connection.channels:
            channel.cancel_tasks()
        task, self._run_task = self._run_task, None
        if task is not None:
            try:
                async with asyncio.timeout(self.settings.close_timeout + 1):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.connection.stop_flush()
        self.callbacks.cancel()
        self._set_state(ConnectionState.DISCONNECTED)
        for channel in self.connection.channels:
            channel.connection_lost()
            channel.fail_waiters(ClientClosed("the client was closed"))

    async def __aenter__(self) -> RealtimeClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def reconnect(self) -> None:
        """Drop the current connection and reconnect (also restarts a ``failed`` client)."""
        if self.state is ConnectionState.FAILED or self._run_task is None or self._run_task.done():
            self.start()
        else:
            self._drop.set()

    async def set_auth(self, token: str | None) -> None:
        """Use ``token`` (a user JWT) for channel authorization from now on.

        Joined channels get an ``access_token`` push; rejoins and history requests use the new
        token. ``None`` goes back to the API key.
        """
        self.access_token = token or self.apikey
        self.history.access_token = token
        for channel in self.connection.channels:
            if channel.joined:
                try:
                    await self.connection.send_message(
                        channel.topic,
                        "access_token",
                        {"access_token": self.access_token},
                        join_ref=channel.join_ref,
                    )
                except NotConnected:
                    return  # the rejoin will carry the token

    async def heartbeat(self, timeout: float | None = None) -> float:
        """Send one heartbeat now and return its round trip in milliseconds.

        Raises:
            NotConnected: no connection.
            PushTimeout: no reply within ``timeout`` (default: ``heartbeat_timeout``).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = timeout or self.settings.heartbeat_timeout or self.settings.heartbeat_interval
        status, _ = await self.connection.push("phoenix", "heartbeat", {}, join_ref=None, timeout=timeout)
        rtt = (loop.time() - started) * 1000.0
        if status != "ok":
            logger.warning("heartbeat answered with status %r", status)
        return rtt

    async def wait_for_state(self, *states: ConnectionState, timeout: float | None = None) -> ConnectionState:
        """Wait until the client is in one of ``states``; returns that state.

        Raises:
            TimeoutError: ``timeout`` expired first.
        """
        if self.state in states:
            return self.state
        future: asyncio.Future[ConnectionState] = asyncio.get_running_loop().create_future()
        entry = (frozenset(states), future)
        self._state_waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            if entry in self._state_waiters:
                self._state_waiters.remove(entry)

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Current metrics (counters, latency percentiles, rates, queue size, state)."""
        return self.metrics.snapshot(
            self.state, self.connection_quality, len(self.connection.queue), self.fallback_active
        )

    # Callback registration -------------------------------------------------------------

    def on(self, event: str, callback: Callable[..., object]) -> RealtimeClient:
        """Register ``callback`` for a client event (see :data:`EVENTS`); returns the client.

        Callbacks may be plain functions or coroutines (run as tasks); exceptions are logged.

        Raises:
            ValueError: an unknown event name.
        """
        if event not in self.callbacks.events:
            raise ValueError(f"unknown client event {event!r}; one of {', '.join(EVENTS)}")
        self.callbacks.add(event, callback)
        return self

    def on_state_change(
        self, callback: Callable[[ConnectionState, ConnectionState], object]
    ) -> RealtimeClient:
        """``callback(old, new)`` on every connection state change."""
        return self.on("state_change", callback)

    def on_max_reconnect_attempts_reached(self, callback: Callable[[], object]) -> RealtimeClient:
        """``callback()`` when the client gives up reconnecting (state ``failed``)."""
        return self.on("max_reconnect_attempts_reached", callback)

    def on_recovery_incomplete(self, callback: Callable[..., object]) -> RealtimeClient:
        """``callback(RecoveryGap)`` when any channel has messages that could not be recovered."""
        return self.on("recovery_incomplete", callback)

    def on_alert(self, callback: Callable[[Alert], object]) -> RealtimeClient:
        """``callback(Alert)`` when a metrics threshold is crossed."""
        return self.on("alert", callback)

    def on_quality_change(self, callback: Callable[[Quality], object]) -> RealtimeClient:
        """``callback(Quality)`` when the connection quality level changes."""
        return self.on("quality_change", callback)

    def on_fallback_change(self, callback: Callable[[bool], object]) -> RealtimeClient:
        """``callback(active)`` when HTTP polling starts (``True``) or stops (``False``)."""
        return self.on("fallback_change", callback)

    # ------------------------------------------------------------------ connection manager

    def start(self) -> None:
        """Start the connection manager in the background and return at once.

        :meth:`connect` is ``start()`` plus waiting; a channel subscribed meanwhile joins once
        connected. Nothing happens while the manager already runs.
        """
        if self._run_task is not None and not self._run_task.done():
            return
        self._stop = asyncio.Event()
        self._drop = asyncio.Event()
        self._run_task = asyncio.get_running_loop().create_task(self._run(), name="tidings-client")
        # Leave "disconnected"/"failed" now, so a waiter started right after sees the new attempt.
        self._set_state(ConnectionState.CONNECTING)
        if self._reporter is not None:
            self._reporter.start()

    async def _run(self) -> None:
        attempt = 0
        first = True
        settings = self.settings
        # Each turn is one connection attempt; attempts are bounded and reset only by a success.
        while not self._stop.is_set():
            if attempt:
                if attempt > settings.max_reconnect_attempts:
                    logger.error("giving up after %d reconnect attempts", settings.max_reconnect_attempts)
                    self._set_state(ConnectionState.FAILED)
                    self.callbacks.emit("max_reconnect_attempts_reached")
                    return
                self._set_state(ConnectionState.RECONNECTING)
                delay = self.backoff.delay(attempt)
                logger.info("reconnect attempt %d in %.2f s", attempt, delay)
                if await self._wait_stop(delay):
                    return
                self.metrics.record_reconnect_attempt()
            else:
                self._set_state(ConnectionState.CONNECTING if first else ConnectionState.RECONNECTING)
            try:
                socket = await self.connection.open(self.socket_url)
            except Exception as exc:
                logger.warning("connection to %s failed: %s", self.url, exc or type(exc).__name__)
                attempt += 1
                continue
            first = False
            attempt = 0
            await self._session(socket)
            if self._stop.is_set():
                return
            self.metrics.record_reconnect()
            self._check_alerts()
            attempt = 1

    async def _wait_stop(self, delay: float) -> bool:
        try:
            async with asyncio.timeout(delay):
                await self._stop.wait()
        except TimeoutError:
            return False
        return True

    async def _session(self, socket: TransportSocket) -> None:
        self.connection.attach(socket)
        self._drop = asyncio.Event()
        self._set_state(ConnectionState.CONNECTED)
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read_loop(socket), name="tidings-reader")
        heart = loop.create_task(self._heartbeat_loop(), name="tidings-heartbeat")
        dropper = loop.create_task(self._drop.wait(), name="tidings-drop")
        stopper = loop.create_task(self._stop.wait(), name="tidings-stop")
        rejoin = loop.create_task(self._rejoin_all(), name="tidings-rejoin")
        try:
            await asyncio.wait({reader, heart, dropper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.connection.detach()
            for task in (heart, dropper, stopper, rejoin):
                task.cancel()
            graceful = self._stop.is_set()
            if graceful:
                try:
                    await socket.close()
                except Exception:
                    logger.debug("close handshake failed", exc_info=True)
            else:
                # A connection we give up on may be half-open: don't wait for a close handshake.
                socket.abort()
            reader.cancel()
            await asyncio.gather(reader, heart, dropper, stopper, rejoin, return_exceptions=True)
            self._connection_lost()

    def _connection_lost(self) -> None:
        self.connection.fail_pending(NotConnected("connection lost"))
        for channel in self.connection.channels:
            channel.connection_lost()
        self.quality.reset()
        self._quality_changed()

    async def _read_loop(self, socket: TransportSocket) -> None:
        try:
            while True:
                data = await socket.recv()
                try:
                    message = decode_frame(data, self.serializer)
                except MalformedMessage as exc:
                    logger.warning("dropping a malformed server frame: %s", exc)
                    continue
                await self._dispatch(message)
        except NotConnected as exc:
            logger.info("%s", exc)

    async def _dispatch(self, message: Message) -> None:
        if message.event == "phx_reply":
            self.connection.reply_received(message)
            return
        channel = self.connection.get(message.topic)
        if channel is None:
            return
        if (
            message.join_ref is not None
            and channel.join_ref is not None
            and message.join_ref != channel.join_ref
        ):
            return  # a message for an earlier instance of the channel
        await channel.message_received(message)

    async def _heartbeat_loop(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        timeout = settings.heartbeat_timeout or settings.heartbeat_interval
        # Runs for the life of one connection; it returns to end the session.
        while True:
            started = loop.time()
            try:
                rtt = await self.heartbeat(timeout)
            except PushTimeout:
                logger.warning(
                    "no heartbeat reply within %.1f s: the connection is dead, reconnecting", timeout
                )
                return
            except NotConnected:
                return
            self._record_heartbeat(rtt)
            if settings.reconnect_on_poor_quality and self.quality.should_reconnect:
                logger.warning(
                    "connection quality is hopeless (%s): reconnecting", self.quality.latencies[-5:]
                )
                return
            await asyncio.sleep(max(0.0, settings.heartbeat_interval - (loop.time() - started)))

    def _record_heartbeat(self, rtt: float) -> None:
        self.quality.record(rtt)
        self.metrics.record_latency(rtt)
        self.metrics.record_heartbeat_ok()
        if rtt > self.settings.latency_warning_ms:
            logger.warning("high realtime latency: heartbeat round trip %.0f ms", rtt)
            self.callbacks.emit("latency_warning", rtt)
        self._quality_changed()
        self._check_alerts()

    def _quality_changed(self) -> None:
        quality = self.quality.quality
        if quality is not self._last_quality:
            self._last_quality = quality
            self.callbacks.emit("quality_change", quality)
        self._update_fallback()

    async def _rejoin_all(self) -> None:
        joins = [join for channel in self.connection.channels if (join := channel.rejoin()) is not None]
        await asyncio.gather(*joins, return_exceptions=True)
        self.connection.schedule_flush()

    # ------------------------------------------------------------------ state and events

    def _set_state(self, state: ConnectionState) -> None:
        if state is self.state:
            return
        old, self.state = self.state, state
        logger.info("realtime client %s -> %s", old, state)
        self.callbacks.emit("state_change", old, state)
        for states, future in list(self._state_waiters):
            if state in states and not future.done():
                future.set_result(state)
        if state is ConnectionState.FAILED:
            for channel in self.connection.channels:
                channel.fail_waiters(ClientClosed("the client gave up reconnecting"))
        self._update_fallback()

    def _check_alerts(self) -> None:
        self._alerts.evaluate(self.metrics_snapshot(), self.metrics.health_samples)

    # ------------------------------------------------------------------ fallback polling

    def _update_fallback(self) -> None:
        want = (
            self.settings.fallback_enabled
            and self.settings.recovery
            and self._run_task is not None
            and not self._stop.is_set()
            and any(c.wanted for c in self.connection.channels)
            and self._degraded()
        )
        if want and not self.fallback_active:
            logger.warning("realtime connection %s: polling history over HTTP", self.quality.quality)
            self._fallback_task = asyncio.get_running_loop().create_task(
                self._fallback_loop(), name="tidings-poll"
            )
            self.callbacks.emit("fallback_change", True)
        elif not want and self.fallback_active:
            assert self._fallback_task is not None
            self._fallback_task.cancel()
            self._fallback_task = None
            logger.info("realtime connection %s again: polling stopped", self.quality.quality)
            self.callbacks.emit("fallback_change", False)

    def _degraded(self) -> bool:
        quality = self.quality.quality
        # A fresh connection has no sample yet; its first heartbeat (sent at once) decides.
        return quality is Quality.POOR or (quality is Quality.DISCONNECTED and not self.connected)

    async def _stop_fallback(self) -> None:
        task, self._fallback_task = self._fallback_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.callbacks.emit("fallback_change", False)

    async def _fallback_loop(self) -> None:
        # Cancelled by _update_fallback when the WebSocket is good again, or by close().
        while True:
            await asyncio.sleep(self.settings.fallback_poll_interval)
            for channel in self.connection.channels:
                try:
                    await channel.poll_history()
                except HistoryError as exc:
                    logger.info("history poll of %s failed: %s", channel.topic, exc)

    # ------------------------------------------------------------------ clock

    def loop_time(self) -> float:
        """The event loop's clock (seconds), used for round trips."""
        return asyncio.get_running_loop().time()
