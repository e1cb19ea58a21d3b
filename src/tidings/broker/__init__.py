"""Between nodes: the :class:`~tidings.broker.base.Broker` interface, memory and Redis."""

from .base import Broker, Envelope
from .memory import MemoryBroker

__all__ = ["Broker", "Envelope", "MemoryBroker"]
