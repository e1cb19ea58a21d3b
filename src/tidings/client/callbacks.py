"""``Callbacks``: the application callbacks of a client, by event name.

The client and its channels report through the same object (``client.callbacks``), so a channel
never needs the client's internals to say that it closed, failed to rejoin or lost messages.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = ["Callbacks"]

logger = logging.getLogger("tidings.client")


class Callbacks:
    """Callbacks registered per event name; running one never raises into the caller.

    A callback may be a plain function or return an awaitable (a coroutine function): the
    awaitable runs as a task, which :meth:`cancel` stops. Exceptions are logged.

    Args:
        events: the event names callbacks may be registered for.
    """

    __slots__ = ("_handlers", "_spawned")

    def __init__(self, events: Iterable[str]) -> None:
        self._handlers: dict[str, list[Callable[..., object]]] = {name: [] for name in events}
        self._spawned: set[asyncio.Future[Any]] = set()

    @property
    def events(self) -> tuple[str, ...]:
        """The event names accepted."""
        return tuple(self._handlers)

    def add(self, event: str, callback: Callable[..., object]) -> None:
        """Register ``callback`` for ``event``.

        Raises:
            ValueError: an unknown event name.
        """
        if event not in self._handlers:
            raise ValueError(f"unknown event {event!r}; one of {', '.join(self._handlers)}")
        self._handlers[event].append(callback)

    def emit(self, event: str, *args: Any) -> None:
        """Call every callback of ``event`` with ``args``, in registration order."""
        for callback in list(self._handlers.get(event, ())):
            try:
                result = callback(*args)
                if inspect.isawaitable(result):
                    self.spawn(result)
            except Exception:
                logger.exception("%s callback failed", event)

    def spawn(self, awaitable: Awaitable[Any]) -> None:
        """Run a callback's awaitable as a task; its exception is logged."""
        future = asyncio.ensure_future(awaitable)
        self._spawned.add(future)

        def done(f: asyncio.Future[Any]) -> None:
            self._spawned.discard(f)
            if not f.cancelled() and f.exception() is not None:
                logger.error("callback task failed", exc_info=f.exception())

        future.add_done_callback(done)

    def cancel(self) -> None:
        """Cancel the callback tasks still running."""
        for future in list(self._spawned):
            future.cancel()
