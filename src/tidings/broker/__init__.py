"""Between nodes: the :class:`~tidings.broker.base.Broker` interface, memory and Redis.

Outside this package only the composition root (``server/app.py``) picks a concrete broker, through
:func:`make_broker`; everything else knows the interface of :mod:`tidings.broker.base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Broker, ChangeBus, Envelope
from .memory import MemoryBroker

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["Broker", "ChangeBus", "Envelope", "MemoryBroker", "make_broker"]


def make_broker(config: Config) -> Broker:
    """The broker ``config`` asks for: Redis with ``REDIS_URL``, else the embedded memory broker.

    Raises:
        ValueError: a ``REDIS_URL`` redis-py cannot parse.
    """
    if not config.redis_url:
        return MemoryBroker(
            config.history_size, config.history_ttl, config.history_max_channels, config.history_max_bytes
        )
    from .redis import RedisBroker  # redis is an extra: imported only when configured

    return RedisBroker(
        config.redis_url,
        config.history_size,
        config.history_ttl,
        node_timeout=config.node_timeout,
        health_interval=min(2.0, config.node_timeout / 4),
    )
