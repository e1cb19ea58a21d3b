"""What every request and connection of one app finds in its lifespan state.

The lifespan (``server/app.py``) yields :func:`lifespan_state`; Starlette copies it into each
request's ``request.state``, uvicorn hands it to the WebSocket protocol as ``app_state``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from ..node import Node
from .monitor import Monitor
from .polls import HistoryPolls

__all__ = ["lifespan_state", "monitor_of", "node_of", "polls_of"]


def lifespan_state(node: Node) -> dict[str, Any]:
    """The node, its once-a-second :class:`Monitor` and its :class:`HistoryPolls`, created here."""
    return {"node": node, "monitor": Monitor(node), "polls": HistoryPolls(node)}


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
