"""HTTP long-polls of channel history: requests waiting for a channel's next broadcast.

A ``GET /api/channels/{topic}/messages?timeout=S`` with nothing newer than ``since_seq`` waits here
(at most ``S`` seconds) for the next broadcast of the channel to be fanned out on this node. While
it waits it holds the channel's broker subscription (:meth:`tidings.node.Node.hold`), so a poll
hears a channel nobody on this node has joined. When the node drains or uvicorn shuts down,
every waiting poll answers at once with what it has.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["ChangePolls", "HistoryPolls"]


class HistoryPolls:
    """The waiting long-polls of one node; closes itself when the node drains."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.closed = False
        self._waiting: set[asyncio.Future[None]] = set()
        node.on_drain(self.close)

    def __len__(self) -> int:
        return len(self._waiting)

    async def wait(self, key: str, timeout: float) -> None:
        """Return after the next broadcast on channel group ``key``, or after ``timeout`` s."""
        if self.closed:
            return
        node = self.node
        fut: asyncio.Future[None] = node.loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        self._waiting.add(fut)
        node.next_broadcast(key, wake)
        try:
            await node.hold(key)
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            self._waiting.discard(fut)
            node.forget_broadcast(key, wake)
            node.let_go(key)

    def close(self) -> None:
        """Shutting down: every waiting poll answers now (each returns what it has), new ones at once."""
        self.closed = True
        for fut in list(self._waiting):
            if not fut.done():
                fut.set_result(None)


class ChangePolls:
    """The long-polls of the change log (``GET /api/changes?timeout=S``) of one node: each waits for
    a change of its table, at most ``S`` seconds; all answer at once when the node drains."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._stop: asyncio.Future[None] | None = None
        node.on_drain(self.close)

    @property
    def stop(self) -> asyncio.Future[None]:
        """Done once the node drains: a poll waiting on it answers with what it has."""
        if self._stop is None:
            self._stop = self.node.loop.create_future()
            if self.node.draining:
                self._stop.set_result(None)
        return self._stop

    def close(self) -> None:
        """Shutting down: every waiting poll answers now."""
        if not self.stop.done():
            self.stop.set_result(None)
