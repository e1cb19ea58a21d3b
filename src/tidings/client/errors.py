"""Exceptions of the client SDK.

::

    RealtimeError
    ├── ClientClosed          the client was closed, or gave up reconnecting (``failed``)
    ├── NotConnected          an operation needs a live connection and there is none
    ├── PushTimeout           no reply to a push within ``push_timeout``
    ├── ChannelError          a channel-level refusal from the server
    │   ├── JoinRejected      ``phx_join`` answered with ``status: "error"``
    │   └── PushRejected      another push answered with ``status: "error"``
    └── HistoryError          the HTTP history endpoint failed or answered nonsense
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ChannelError",
    "ClientClosed",
    "HistoryError",
    "JoinRejected",
    "NotConnected",
    "PushRejected",
    "PushTimeout",
    "RealtimeError",
]


class RealtimeError(Exception):
    """Base class of every error raised by :mod:`tidings.client`."""


class ClientClosed(RealtimeError):
    """The client is closed or ``failed``; nothing more will be sent."""


class NotConnected(RealtimeError):
    """The operation needs a live WebSocket connection."""


class PushTimeout(RealtimeError):
    """The server did not reply in time."""


class ChannelError(RealtimeError):
    """The server refused something on a channel.

    Attributes:
        topic: the channel topic (``realtime:<name>``).
        response: the reply's ``response`` object.
    """

    def __init__(self, topic: str, response: dict[str, Any]) -> None:
        self.topic = topic
        self.response = response
        reason = response.get("reason")
        super().__init__(f"{topic}: {reason if isinstance(reason, str) else response}")

    @property
    def reason(self) -> str:
        """The ``reason`` string (``"<Code>: <message>"``), or ``""``."""
        reason = self.response.get("reason")
        return reason if isinstance(reason, str) else ""


class JoinRejected(ChannelError):
    """The join was refused (see :attr:`ChannelError.reason`)."""


class PushRejected(ChannelError):
    """A push (presence, acknowledged broadcast) was refused."""


class HistoryError(RealtimeError):
    """The HTTP history endpoint could not be used."""
