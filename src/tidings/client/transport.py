"""The transport seam: how a :class:`~tidings.client.RealtimeClient` opens, uses and drops its socket.

In the spirit of httpx's ``BaseTransport`` / ``MockTransport``: ``RealtimeClient(url, key,
transport=...)`` takes any :class:`Transport`, an object whose ``connect(url, settings)`` returns a
:class:`TransportSocket` (send, recv, close, abort). Everything above it (refs, replies, acks, the
send queue, heartbeats, reconnects, channels) is the same whatever the transport is.

* :class:`WebSocketTransport`, the default, dials with ``websockets.asyncio.client``.
* :class:`MemoryTransport` connects to an in-process :class:`MemoryPeer` that a test plays the
  server with: no port, no server, no proxy. Closing or aborting the peer is a lost connection,
  a peer that stops answering is a half-open one, and ``refusing`` makes every dial fail::

      transport = MemoryTransport()
      client = RealtimeClient("ws://node/realtime/v1", key, transport=transport)
      client.start()
      peer = await transport.accept()
      heartbeat = await peer.recv_message()
      await peer.reply(heartbeat)

A socket reports a closed connection by raising :class:`~tidings.client.NotConnected` from ``send``
and ``recv``.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import TYPE_CHECKING, Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tidings.protocol.codec import Message, Serializer, decode_binary, decode_text

from .errors import NotConnected
from .wire import encode_message, serializer_for

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from .settings import ClientSettings

__all__ = ["MemoryPeer", "MemoryTransport", "Transport", "TransportSocket", "WebSocketTransport"]

logger = logging.getLogger("tidings.client")


class TransportSocket(Protocol):
    """One open connection as the client uses it: whole WebSocket messages, text or binary."""

    async def send(self, data: str | bytes) -> None:
        """Send one message (``str``: a text frame, ``bytes``: a binary frame).

        Raises:
            NotConnected: the connection is closed.
        """
        ...

    async def recv(self) -> str | bytes:
        """The next message from the server.

        Raises:
            NotConnected: the connection is closed (by either side, or lost).
        """
        ...

    async def close(self) -> None:
        """Close with a close handshake, bounded by ``close_timeout``."""
        ...

    def abort(self) -> None:
        """Drop the connection at once, without a handshake (a half-open peer would never answer)."""
        ...


class Transport(Protocol):
    """What opens connections for a :class:`~tidings.client.RealtimeClient`."""

    async def connect(self, url: str, settings: ClientSettings) -> TransportSocket:
        """Open one connection to ``url`` (the full socket URL, with ``apikey`` and ``vsn``).

        ``settings`` carries the limits to honour (``connect_timeout``, ``close_timeout``,
        ``max_message_size``); the client also bounds the call by ``connect_timeout``. Any
        exception is a failed attempt, retried with backoff.
        """
        ...


# ---------------------------------------------------------------------- websockets


class WebSocketTransport:
    """The default transport: a real WebSocket through ``websockets.asyncio.client``.

    No permessage-deflate (the server shares frames between connections) and no WebSocket pings:
    liveness is the Phoenix heartbeat's job, which is also what the server watches.
    """

    async def connect(self, url: str, settings: ClientSettings) -> TransportSocket:
        """Dial ``url``; see :meth:`Transport.connect`."""
        ws = await connect(
            url,
            open_timeout=settings.connect_timeout,
            close_timeout=settings.close_timeout,
            ping_interval=None,
            max_size=settings.max_message_size,
            compression=None,
        )
        return _WebSocket(ws)


class _WebSocket:
    __slots__ = ("_ws",)

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    async def send(self, data: str | bytes) -> None:
        try:
            await self._ws.send(data)
        except ConnectionClosed as exc:
            raise NotConnected(f"connection closed: {exc}") from exc

    async def recv(self) -> str | bytes:
        try:
            return await self._ws.recv()
        except ConnectionClosed as exc:
            raise NotConnected(f"connection closed: {exc}") from exc

    async def close(self) -> None:
        await self._ws.close()

    def abort(self) -> None:
        self._ws.transport.abort()


# ---------------------------------------------------------------------- in memory


class _Pipe:
    """Both directions of one in-memory connection, and how it ended."""

    __slots__ = ("close_reason", "to_client", "to_peer")

    def __init__(self) -> None:
        self.to_client: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.to_peer: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.close_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    def end(self, reason: str) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        for queue in (self.to_client, self.to_peer):
            queue.put_nowait(None)  # end of stream, behind what was sent before

    def put(self, queue: asyncio.Queue[str | bytes | None], data: str | bytes) -> None:
        if self.close_reason is not None:
            raise NotConnected(f"connection closed: {self.close_reason}")
        queue.put_nowait(data)

    async def get(self, queue: asyncio.Queue[str | bytes | None], timeout: float | None) -> str | bytes:
        async with asyncio.timeout(timeout):
            item = await queue.get()
        if item is None:
            queue.put_nowait(None)  # every later recv sees the end too
            raise NotConnected(f"connection closed: {self.close_reason}")
        return item


class _MemorySocket:
    """The client's end of a :class:`_Pipe`."""

    __slots__ = ("_pipe",)

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    async def send(self, data: str | bytes) -> None:
        self._pipe.put(self._pipe.to_peer, data)

    async def recv(self) -> str | bytes:
        return await self._pipe.get(self._pipe.to_client, None)

    async def close(self) -> None:
        self._pipe.end("client closed")

    def abort(self) -> None:
        self._pipe.end("client aborted")


class MemoryPeer:
    """The server end of one :class:`MemoryTransport` connection; a test drives it.

    Messages are whole WebSocket messages (``str`` or ``bytes``). The ``*_message`` helpers speak
    the Phoenix serializer the client asked for in its URL (``vsn``).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        """The socket URL the client dialled."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        self.serializer: Serializer = serializer_for(query.get("vsn", ["1.0.0"])[0])
        """The serializer of the client's ``vsn``."""
        self._pipe = _Pipe()
        self.socket: TransportSocket = _MemorySocket(self._pipe)
        """The client's end, as :meth:`MemoryTransport.connect` returned it."""

    def __repr__(self) -> str:
        return f"<MemoryPeer {self.url} {'closed: ' + str(self.close_reason) if self.closed else 'open'}>"

    @property
    def closed(self) -> bool:
        """True once either side closed or dropped the connection."""
        return self._pipe.closed

    @property
    def close_reason(self) -> str | None:
        """Who ended it: ``"client closed"``, ``"client aborted"`` or the peer's reason."""
        return self._pipe.close_reason

    @property
    def aborted(self) -> bool:
        """True when the client dropped the connection without a close handshake."""
        return self._pipe.close_reason == "client aborted"

    async def send(self, data: str | bytes) -> None:
        """Deliver one message to the client.

        Raises:
            NotConnected: the connection is closed.
        """
        self._pipe.put(self._pipe.to_client, data)

    async def recv(self, timeout: float | None = None) -> str | bytes:
        """The next message the client sent.

        Raises:
            NotConnected: the connection is closed and everything sent before was read.
            TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        return await self._pipe.get(self._pipe.to_peer, timeout)

    async def recv_message(self, timeout: float | None = None) -> Message:
        """The next client message, decoded (text in the client's serializer, or a kind-3 broadcast).

        A kind-3 broadcast's client message id is in ``payload["id"]``.

        Raises:
            NotConnected: the connection is closed.
            TimeoutError: nothing arrived within ``timeout`` seconds.
            MalformedMessage: the client sent something that is not a Phoenix message.
        """
        data = await self.recv(timeout)
        return decode_text(data, self.serializer) if isinstance(data, str) else decode_binary(data)

    async def send_message(
        self, join_ref: str | None, ref: str | None, topic: str, event: str, payload: dict[str, Any]
    ) -> None:
        """Send one Phoenix message to the client as text in its serializer."""
        await self.send(encode_message(self.serializer, join_ref, ref, topic, event, payload))

    async def reply(
        self, message: Message, status: str = "ok", response: dict[str, Any] | None = None
    ) -> None:
        """Answer ``message`` with a ``phx_reply`` carrying its ref and join ref."""
        await self.send_message(
            message.join_ref,
            message.ref,
            message.topic,
            "phx_reply",
            {"status": status, "response": {} if response is None else response},
        )

    def close(self, reason: str = "closed by the peer") -> None:
        """End the connection from the server side: the client's ``recv`` raises ``NotConnected``."""
        self._pipe.end(reason)


class MemoryTransport:
    """An in-process :class:`Transport` for tests: every ``connect`` creates a :class:`MemoryPeer`.

    Args:
        handler: optional ``async handler(peer)``, started as a task for each new connection (a
            tiny server); without one, take connections with :meth:`accept`.
    """

    def __init__(self, handler: Callable[[MemoryPeer], Coroutine[Any, Any, None]] | None = None) -> None:
        self.handler = handler
        self.peers: list[MemoryPeer] = []
        """Every connection made, oldest first."""
        self.refusing = False
        """While True, ``connect`` raises ``ConnectionRefusedError`` (a node that is down)."""
        self._accepted: asyncio.Queue[MemoryPeer] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self, url: str, settings: ClientSettings) -> TransportSocket:
        """Connect to a new :class:`MemoryPeer` (``settings`` is not needed in memory).

        Raises:
            ConnectionRefusedError: while :attr:`refusing` is set.
        """
        if self.refusing:
            raise ConnectionRefusedError("MemoryTransport is refusing connections")
        peer = MemoryPeer(url)
        self.peers.append(peer)
        self._accepted.put_nowait(peer)
        if self.handler is not None:
            task = asyncio.get_running_loop().create_task(self.handler(peer), name="memory-peer")
            self._tasks.add(task)
            task.add_done_callback(self._handler_done)
        return peer.socket

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("MemoryTransport handler failed", exc_info=task.exception())

    async def accept(self, timeout: float | None = None) -> MemoryPeer:
        """The next connection not yet accepted, waiting for the client to dial it.

        Raises:
            TimeoutError: no connection within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            return await self._accepted.get()
