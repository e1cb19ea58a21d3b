"""Process lifecycle: build the node and the ASGI app, run uvicorn with the lean WebSocket class."""

from __future__ import annotations

import contextlib
import logging
import resource
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette

from ..config import Config
from ..node import Node
from .http_api import build_routes, cors_middleware
from .websocket import WebSocketConnection

__all__ = ["build_app", "raise_open_files_limit", "run", "uvicorn_config"]

log = logging.getLogger("tidings.server")


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def build_app(config: Config) -> Starlette:
    """The ASGI app; its lifespan creates the :class:`Node` that WebSocket connections share."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        node = Node(config)
        await node.start()
        app.state.node = node
        try:
            yield {"node": node}
        finally:
            await node.stop()

    return Starlette(routes=build_routes(), middleware=[cors_middleware()], lifespan=lifespan)


def uvicorn_config(config: Config) -> uvicorn.Config:
    """uvicorn settings: uvloop, httptools, our WebSocket class, a drain-aware shutdown timeout."""
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop = "asyncio"
    return uvicorn.Config(
        build_app(config),
        host=config.host,
        port=config.port,
        loop=loop,
        http="httptools",
        ws=WebSocketConnection,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(config.drain_window) + 5,
        backlog=4096,
        server_header=False,
    )


def run(config: Config) -> None:
    """Serve until SIGINT/SIGTERM, then drain."""
    limit = raise_open_files_limit()
    log.info("open files limit: %d", limit)
    if not config.jwt_secret and not config.jwt_jwks:
        log.warning(
            "\n*** JWT_SECRET is not set: Tidings is running OPEN. Anyone can connect, join, "
            "broadcast and track presence. Set JWT_SECRET (or JWT_JWKS) in production. ***"
        )
    log.info("Tidings listening on ws://%s:%d/realtime/v1/websocket", config.host, config.port)
    uvicorn.Server(uvicorn_config(config)).run()
