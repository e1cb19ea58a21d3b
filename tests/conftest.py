"""Shared fixtures: a real Tidings server in a subprocess."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.server import ServerProcess


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with given settings; all are stopped at the end of the test."""
    started: list[ServerProcess] = []

    def make(env: dict[str, str] | None = None, args: list[str] | None = None) -> ServerProcess:
        proc = ServerProcess(env=env, args=args).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """An open (no JWT secret) server with test-friendly backoffs."""
    return server_factory()
