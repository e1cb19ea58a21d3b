"""What the client hands to application callbacks, and its state enums."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

__all__ = [
    "Broadcast",
    "ChannelState",
    "ConnectionState",
    "PostgresChange",
    "PresenceEvent",
    "RecoveryGap",
    "SendReceipt",
    "SendStatus",
    "SystemMessage",
]


class ConnectionState(enum.StrEnum):
    """States of the connection manager."""

    DISCONNECTED = "disconnected"
    """Not started, or closed by the application."""
    CONNECTING = "connecting"
    """First connection attempt in progress."""
    CONNECTED = "connected"
    """The WebSocket is open."""
    RECONNECTING = "reconnecting"
    """The connection was lost; waiting for or making a reconnect attempt."""
    FAILED = "failed"
    """Every reconnect attempt failed; ``connect()`` starts over."""


class ChannelState(enum.StrEnum):
    """States of one channel."""

    CLOSED = "closed"
    JOINING = "joining"
    JOINED = "joined"
    LEAVING = "leaving"
    ERRORED = "errored"


class SendStatus(enum.StrEnum):
    """Outcome of ``send_broadcast``."""

    SENT = "sent"
    """Written to the socket (no acknowledgement asked for)."""
    OK = "ok"
    """Acknowledged by the server."""
    QUEUED = "queued"
    """Waiting in the send queue for a connection (or a retry)."""
    ERROR = "error"
    """Given up on after its one retry."""
    DROPPED = "dropped"
    """Dropped from the full send queue."""


@dataclasses.dataclass(frozen=True, slots=True)
class SendReceipt:
    """What ``send_broadcast`` returns."""

    id: str
    """The client message id carried by the broadcast (receivers deduplicate on it)."""
    status: SendStatus
    """The status when ``send_broadcast`` returned; a queued message settles later (see ``metrics``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Broadcast:
    """One broadcast delivered to an ``on_broadcast`` callback."""

    topic: str
    """``realtime:<name>``."""
    event: str
    """The user event name."""
    payload: Any
    """The user payload (``bytes`` for a raw-binary broadcast)."""
    meta: dict[str, Any]
    """Server metadata: ``id``, ``seq``, ``replayed`` (empty when the server sends none)."""
    source: str = "websocket"
    """``websocket`` or ``history`` (fetched over HTTP to fill a gap or while polling)."""

    @property
    def id(self) -> str | None:
        """The message id, when the server gave one."""
        value = self.meta.get("id")
        return value if isinstance(value, str) else None

    @property
    def seq(self) -> int | None:
        """The per-channel sequence number, when the server gave one."""
        value = self.meta.get("seq")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def replayed(self) -> bool:
        """True when the server replayed it after a rejoin."""
        return bool(self.meta.get("replayed"))


@dataclasses.dataclass(frozen=True, slots=True)
class PostgresChange:
    """One row change delivered to an ``on_postgres_changes`` callback."""

    topic: str
    schema: str
    table: str
    type: str
    """``INSERT``, ``UPDATE`` or ``DELETE``."""
    commit_timestamp: str | None
    record: dict[str, Any] | None
    old_record: dict[str, Any] | None
    columns: list[dict[str, Any]]
    errors: list[str] | None
    ids: list[int]
    """Subscription ids this change matched."""
    position: str | None = None
    """Where the change is in the stream (Tidings' ``data.position``); compares in stream order.
    The channel resumes after the greatest it delivered (``None`` from servers without it)."""
    source: str = "websocket"
    """``websocket``, or ``poll`` (fetched from ``GET /api/changes`` while the connection is poor)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A presence ``sync``, ``join`` or ``leave``.

    Metas are the tracked objects with ``presence_ref`` (the server's ``phx_ref``).
    """

    event: str
    """``sync``, ``join`` or ``leave``."""
    key: str | None = None
    """The presence key that joined or left (``None`` for ``sync``)."""
    current: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Metas of ``key`` before a join, or what remains after a leave."""
    changed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Metas that joined or left."""


@dataclasses.dataclass(frozen=True, slots=True)
class SystemMessage:
    """A ``system`` push (``Subscribed to PostgreSQL``, errors before a server-side close...)."""

    topic: str
    extension: str
    status: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class RecoveryGap:
    """Messages of a channel that could not be recovered: the application must know it has a gap.

    ``first_seq``/``last_seq`` bound the missing range when known (``last_seq`` is ``None`` when
    the server only said its replay was incomplete).
    """

    topic: str
    first_seq: int | None
    last_seq: int | None
    reason: str
    """``replay_incomplete``, ``history_incomplete``, ``history_unavailable`` or ``buffer_overflow``
    (broadcasts); ``changes_incomplete`` (Postgres Changes: the server could not prove it sent
    every change after :attr:`position`; refetch the rows)."""
    position: str | None = None
    """Postgres Changes: the position after which changes may be missing."""
    detail: str = ""
    """The server's reason, when it gave one."""
