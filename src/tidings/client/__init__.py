"""Tidings' Python client SDK for the Supabase Realtime protocol (Tidings or Supabase itself).

Quick start::

    from tidings.client import RealtimeClient

    async with RealtimeClient("ws://localhost:4000/realtime/v1", api_key) as client:
        room = client.channel("room1").on_broadcast("chat", lambda m: print(m.payload))
        await room.subscribe()
        await room.send_broadcast("chat", {"text": "hello"})

Imports only :mod:`tidings.protocol`, the standard library, orjson and ``websockets.asyncio.client``.

The socket underneath is pluggable, as in httpx: ``RealtimeClient(url, key, transport=...)`` takes
any :class:`Transport`; :class:`MemoryTransport` runs the client against an in-process peer in tests.
"""

from __future__ import annotations

from .backoff import Backoff
from .callbacks import Callbacks
from .channel import RealtimeChannel
from .client import EVENTS, RealtimeClient
from .connection import Connection
from .dedup import LRUSet
from .errors import (
    ChannelError,
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
    ConnectionState,
    PostgresChange,
    PresenceEvent,
    RecoveryGap,
    SendReceipt,
    SendStatus,
    SystemMessage,
)
from .http import HistoryClient, HistoryPage, build_socket_url, derive_http_base
from .metrics import Alert, AlertMonitor, Metrics, MetricsReporter, MetricsSnapshot, check_alerts
from .ordering import OrderBuffer
from .presence import PresenceView
from .quality import Quality, QualityMonitor
from .sendqueue import OutboundMessage, SendQueue
from .settings import AlertThresholds, ClientSettings
from .transport import MemoryPeer, MemoryTransport, Transport, TransportSocket, WebSocketTransport

__all__ = [
    "EVENTS",
    "Alert",
    "AlertMonitor",
    "AlertThresholds",
    "Backoff",
    "Broadcast",
    "Callbacks",
    "ChannelError",
    "ChannelState",
    "ClientClosed",
    "ClientSettings",
    "Connection",
    "ConnectionState",
    "HistoryClient",
    "HistoryError",
    "HistoryPage",
    "JoinRejected",
    "LRUSet",
    "MemoryPeer",
    "MemoryTransport",
    "Metrics",
    "MetricsReporter",
    "MetricsSnapshot",
    "NotConnected",
    "OrderBuffer",
    "OutboundMessage",
    "PostgresChange",
    "PresenceEvent",
    "PresenceView",
    "PushRejected",
    "PushTimeout",
    "Quality",
    "QualityMonitor",
    "RealtimeChannel",
    "RealtimeClient",
    "RealtimeError",
    "RecoveryGap",
    "SendQueue",
    "SendReceipt",
    "SendStatus",
    "SystemMessage",
    "Transport",
    "TransportSocket",
    "WebSocketTransport",
    "build_socket_url",
    "check_alerts",
    "derive_http_base",
]
