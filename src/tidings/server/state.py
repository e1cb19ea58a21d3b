"""What every request and connection of one app finds in its lifespan state.

The lifespan (``server/app.py``) yields :func:`lifespan_state`; Starlette copies it into each
request's ``request.state``, uvicorn hands it to the WebSocket protocol as ``app_state``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from ..node import Node
from .monitor import Monitor
from .polls import ChangePolls, HistoryPolls

__all__ = ["change_polls_of", "lifespan_state", "monitor_of", "node_of", "polls_of"]


def lifespan_state(node: Node) -> dict[str, Any]:
    """The node, its once-a-second :class:`Monitor`, its :class:`HistoryPolls` and
    :class:`ChangePolls`, created here."""
    return {
        "node": node,
        "monitor": Monitor(node),
        "polls": HistoryPolls(node),
        "change_polls": ChangePolls(node),
    }


def change_polls_of(request: Request) -> ChangePolls:
    """The node's waiting change-log long-polls."""
    polls: ChangePolls = request.state.change_polls
    return polls


def node_of(request: Request) -> Node:
    """The request's node."""
    node: Node = request.state.node
    return node


def monitor_of(request: Request) -> Monitor:
    """The node's monitor (``/metrics``, ``/api/metrics``)."""
    monitor: Monitor = request.state.monitor
    return monitor


def polls_of(request: Request) -> HistoryPolls:
    """The node's waiting history long-polls."""
    polls: HistoryPolls = request.state.polls
    return polls
