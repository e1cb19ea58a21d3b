"""Process lifecycle: build the node and the ASGI app, run uvicorn with the lean WebSocket class."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import resource
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette

from ..broker.base import Broker
from ..config import Config
from ..node import Node
from .http_api import build_routes, cors_middleware
from .http_protocol import DeadlineHttpProtocol
from .websocket import WebSocketConnection

__all__ = ["app_from_env", "build_app", "make_broker", "raise_open_files_limit", "run", "uvicorn_config"]

CONFIG_ENV = "TIDINGS_CONFIG_JSON"

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
        node = Node(config, make_broker(config))
        await node.start()
        if config.database_url:
            await start_changes(node, config)
        app.state.node = node
        try:
            yield {"node": node}
        finally:
            await node.stop()
            if node.cdc is not None:
                await node.cdc.stop()

    return Starlette(routes=build_routes(), middleware=[cors_middleware()], lifespan=lifespan)


async def start_changes(node: Node, config: Config) -> None:
    """Connect Postgres Changes; a bad database set-up stops the server with one line.

    Streaming starts ``DB_RESUME_GRACE`` later: changes committed while Tidings was down are
    replayed by the slot as soon as it streams, and only subscriptions made by then see them,
    so clients get that long to reconnect and rejoin first.
    """
    from ..cdc.service import PostgresChanges, PostgresChangesError

    assert config.database_url is not None
    cdc = PostgresChanges(
        config.database_url,
        publication=config.db_publication,
        slot=config.db_slot,
        pool_size=config.db_pool_size,
        ssl=config.db_ssl,
        deliver=node.deliver_change,
        rls=config.db_rls,
    )
    if config.db_rls and not (config.jwt_secret or config.jwt_jwks):
        log.warning(
            "DB_RLS is on but tokens are not verified (no JWT_SECRET or JWT_JWKS): any client can claim "
            "any role and sub, so row level security protects nothing"
        )
    try:
        await cdc.check()
    except PostgresChangesError as exc:
        log.error("DATABASE_URL: %s", exc)
        raise SystemExit(3) from None
    node.cdc = cdc
    lag = await cdc.slot_lag_bytes()
    node.replication_lag_bytes = lag
    log.info(
        "Postgres Changes: publication %r, slot %r, %s bytes of WAL to catch up; streaming in %.1f s",
        config.db_publication,
        config.db_slot,
        "?" if lag is None else lag,
        config.db_resume_grace,
    )

    from ..broker.redis import RedisBroker

    if isinstance(node.broker, RedisBroker):
        # A cluster: one node holds the lease and streams; every node delivers.
        from ..cdc.cluster import ChangeFeedLeader

        node.background(ChangeFeedLeader(cdc, node.broker, first_delay=config.db_resume_grace).run())
        return

    async def stream_later() -> None:
        await asyncio.sleep(config.db_resume_grace)
        try:
            await cdc.start()
        except PostgresChangesError as exc:
            log.error("Postgres Changes could not start streaming: %s", exc)
            return
        log.info("Postgres Changes streaming")

    node.background(stream_later())


def make_broker(config: Config) -> Broker | None:
    """The Redis broker when ``REDIS_URL`` is set; ``None`` selects the embedded memory broker."""
    if not config.redis_url:
        return None
    from ..broker.redis import RedisBroker

    return RedisBroker(
        config.redis_url,
        config.history_size,
        config.history_ttl,
        node_timeout=config.node_timeout,
        health_interval=min(2.0, config.node_timeout / 4),
    )


def app_from_env() -> Starlette:
    """App factory for worker processes: the parent passes the resolved config in the environment."""
    from ..logs import setup_logging

    config = Config(**json.loads(os.environ[CONFIG_ENV]))
    setup_logging(config.log_level, config.log_format)
    return build_app(config)


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
        http=DeadlineHttpProtocol,
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
    if config.workers > 1:
        # Worker processes share the listening socket; each is a node of the Redis cluster.
        os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
        base = uvicorn_config(config)
        uvicorn.run(
            "tidings.server.app:app_from_env",
            factory=True,
            workers=config.workers,
            host=config.host,
            port=config.port,
            loop=base.loop,
            http=DeadlineHttpProtocol,
            ws=WebSocketConnection,
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=base.timeout_graceful_shutdown,
            backlog=4096,
            server_header=False,
        )
        return
    uvicorn.Server(uvicorn_config(config)).run()
