"""The broker contract against the embedded memory broker."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from tidings.broker.base import Broker
from tidings.broker.memory import MemoryBroker

from .contract import CHECKS


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_memory_broker(check: Callable[..., Coroutine[Any, Any, None]]) -> None:
    brokers: list[Broker] = []

    async def make(history_size: int = 100) -> Broker:
        broker = MemoryBroker(history_size, 300.0)
        broker.bind(lambda env: None)
        await broker.start()
        brokers.append(broker)
        return broker

    try:
        await check(make)
    finally:
        for b in brokers:
            await b.stop()
