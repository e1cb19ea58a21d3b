"""Process lifecycle and the composition root: build the node and the ASGI app, run uvicorn.

This is the one module that picks concrete parts (the broker through ``broker.make_broker``,
Postgres Changes and, in a cluster, its lease-holding leader) and wires them to the node; every
other module knows them by their interfaces. The lifespan hands requests and connections the
node, its monitor and its long-polls (``server/state.py``).

Start-up order (one process): the optional extras a setting needs, the listening socket, the
broker (Redis), Postgres Changes, then uvicorn on the bound socket. Whatever fails stops the process
with one logged line and a non-zero status (:class:`StartupError`), never a traceback, and the
replication slot is created last, once nothing else can fail (and dropped again if this start
created it and is cut short). A SIGINT/SIGTERM after start drains and exits with status 0.
Shutdown runs the other way: the node's background tasks are awaited (the change-feed leader
resigns its lease through the broker), then Postgres Changes stop, then the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import importlib.util
import json
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette

from ..auth.keys import quiet_pyjwt_key_length_warning, short_secret_warning
from ..broker import make_broker
from ..config import Config
from ..limits import raise_open_files_limit
from ..node import MessagesFeed, Node
from .edge import install_accept_error_filter
from .http_api import build_routes, cors_middleware, quiet_disconnects
from .http_protocol import DeadlineHttpProtocol
from .state import lifespan_state
from .websocket import WebSocketConnection

if TYPE_CHECKING:
    from ..cdc.service import PostgresChanges
    from ..db.broadcast import LeaseHolder

__all__ = [
    "StartupError",
    "app_from_env",
    "build_app",
    "check_extras",
    "run",
    "start_node",
    "stop_node",
    "uvicorn_config",
    "uvicorn_options",
]

CONFIG_ENV = "TIDINGS_CONFIG_JSON"

log = logging.getLogger("tidings.server")


class StartupError(Exception):
    """Start-up cannot go on: ``str()`` is the one line to log, ``code`` the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


#: Optional extras: the module a setting needs, and the extra that installs it.
EXTRAS = (("redis_url", "REDIS_URL", "redis", "redis"),)


def check_extras(config: Config) -> None:
    """Fail in one line when a configured feature's optional dependency is not installed."""
    for field, env, module, extra in EXTRAS:
        if getattr(config, field) and importlib.util.find_spec(module) is None:
            raise StartupError(f"{env} needs the {extra} extra: pip install 'tidings[{extra}]'")


def build_app(config: Config, node: Node | None = None) -> Starlette:
    """The ASGI app; its lifespan hands WebSocket connections the :class:`Node` they share.

    Given a started ``node``, the lifespan only hands it over (whoever started it stops it);
    without one (worker processes), the lifespan starts a node and stops it at shutdown.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        if node is not None:
            app.state.node = node
            yield lifespan_state(node)
            return
        try:
            own = await start_node(config)
        except StartupError as exc:
            log.error("%s", exc)
            raise
        app.state.node = own
        try:
            yield lifespan_state(own)
        finally:
            await stop_node(own)

    install_accept_error_filter()
    middleware = [cors_middleware(config.allowed_origins), quiet_disconnects()]
    return Starlette(routes=build_routes(), middleware=middleware, lifespan=lifespan)


async def start_node(config: Config) -> Node:
    """Build the node and connect its broker, then Postgres Changes (whose slot comes last).

    Raises:
        StartupError: Redis cannot be reached, or the database refuses (one line each).
    """
    try:
        broker = make_broker(config)
    except ValueError as exc:  # a REDIS_URL redis-py cannot parse
        raise StartupError(f"REDIS_URL: {exc}") from None
    node = Node(config, broker)
    try:
        await node.start()
    except RuntimeError as exc:  # the Redis broker cannot reach Redis (nothing started yet)
        raise StartupError(f"REDIS_URL: {exc}") from None
    if config.database_url:
        try:
            leader = await start_changes(node, config)
            await start_broadcasts(node, config, leader)
        except BaseException:  # a refusal, or a signal during the checks
            await stop_node(node, drop_new_slot=True)
            raise
    return node


async def stop_node(node: Node, *, drop_new_slot: bool = False) -> None:
    """Stop in dependency order: the node's tasks (awaited), Postgres Changes, then the broker.

    ``drop_new_slot`` drops a replication slot this start created.
    """
    await node.stop_tasks()
    cdc = _changes_of(node)
    if cdc is not None:
        await cdc.stop()
        if drop_new_slot and cdc.created_slot:
            await cdc.drop_slot()
    for part in (node.authorizer, node.message_archive):
        close = getattr(part, "close", None)  # the database parts (start_authorization)
        if close is not None:
            await close()
    await node.stop()


def _changes_of(node: Node) -> PostgresChanges | None:
    """The Postgres Changes service :func:`start_changes` attached to ``node``."""
    if node.cdc is None:
        return None
    from ..cdc.service import PostgresChanges

    return node.cdc if isinstance(node.cdc, PostgresChanges) else None


async def start_changes(node: Node, config: Config) -> LeaseHolder | None:
    """Connect Postgres Changes; a bad database set-up raises :class:`StartupError` (one line).

    Streaming starts ``DB_RESUME_GRACE`` later: changes committed while Tidings was down are
    replayed by the slot as soon as it streams, and only subscriptions made by then see them,
    so clients get that long to reconnect and rejoin first.
    """
    from ..cdc.changelog import ChangeLog, MemoryChangeLog
    from ..cdc.service import PostgresChanges, PostgresChangesError

    assert config.database_url is not None
    # The change log resumes read: in Redis for a cluster (the lease holder writes it), else here.
    change_log: ChangeLog
    log_bounds = (config.db_change_log_size, config.db_change_log_bytes, config.db_change_log_ttl)
    if node.broker.change_bus is not None:
        from ..cdc.cluster import BusChangeLog

        change_log = BusChangeLog(node.broker.change_bus, *log_bounds)
    else:
        change_log = MemoryChangeLog(*log_bounds)
    try:
        cdc = PostgresChanges(
            config.database_url,
            publication=config.db_publication,
            slot=config.db_slot,
            pool_size=config.db_pool_size,
            ssl=config.db_ssl,
            deliver=node.deliver_change,
            rls=config.db_rls,
            counters=node.metrics,
            change_log=change_log,
        )
    except PostgresChangesError as exc:
        raise StartupError(f"DATABASE_URL: {exc}", code=3) from None
    if config.db_rls and not (config.jwt_secret or config.jwt_jwks):
        log.warning(
            "DB_RLS is on but tokens are not verified (no JWT_SECRET or JWT_JWKS): any client can claim "
            "any role and sub, so row level security protects nothing"
        )
    node.cdc = cdc  # from here on stop_node() closes its connections
    try:
        await cdc.check()
    except PostgresChangesError as exc:
        raise StartupError(f"DATABASE_URL: {exc}", code=3) from None
    lag = await cdc.slot_lag_bytes()
    node.replication_lag_bytes = lag
    # A slot just created, or one with no WAL past its confirmed position, has nothing to replay:
    # streaming starts at once. Otherwise subscriptions are announced only once it streams.
    grace = 0.0 if cdc.created_slot or lag == 0 else config.db_resume_grace
    if grace:
        cdc.hold()
    log.info(
        "Postgres Changes: publication %r, slot %r, %s bytes of WAL to catch up; streaming in %.1f s",
        config.db_publication,
        config.db_slot,
        "?" if lag is None else lag,
        grace,
    )

    bus = node.broker.change_bus
    if bus is not None:
        from ..cdc.cluster import ChangeFeedLeader

        # A cluster: one node holds the lease and streams; every node delivers.
        leader = ChangeFeedLeader(cdc, bus, first_delay=grace)
        node.on_change(leader.received)
        node.background(leader.run())
        return leader

    async def stream_later() -> None:
        await asyncio.sleep(grace)
        try:
            await cdc.start()
        except PostgresChangesError as exc:
            log.error("Postgres Changes could not start streaming: %s", exc)
            return
        finally:
            cdc.release()
        log.info("Postgres Changes streaming")

    node.background(stream_later())
    return None


async def start_broadcasts(node: Node, config: Config, leader: LeaseHolder | None) -> None:
    """Broadcast from Database (docs/broadcast-from-database.md): the ``realtime`` schema is
    prepared, then ``realtime.messages`` streams to ``node.publish_broadcast`` (in a cluster while
    *leader* holds the change-feed lease). A refusal raises :class:`StartupError` (one line)."""
    from ..db.broadcast import BroadcastFromDatabaseError, start_broadcast_from_database
    from ..db.privileges import DatabaseSetupError

    try:
        stream = await start_broadcast_from_database(
            config, node.publish_broadcast, counters=node.metrics, leader=leader
        )
    except (BroadcastFromDatabaseError, DatabaseSetupError) as exc:
        raise StartupError(f"DATABASE_URL: {exc}", code=3) from None
    node.background(stream.stop_when_cancelled())  # stop_node drains it before the broker stops
    start_authorization(node, config, stream)


def start_authorization(node: Node, config: Config, stream: MessagesFeed) -> None:
    """Realtime Authorization with a database (docs/authorization.md): private channels are
    governed by the row level security policies of ``realtime.messages``, their replay reads it,
    and ``replication_ready`` joins follow *stream*. Nothing here starts a task: the partition
    maintenance is the one :func:`start_broadcasts` runs (a check that meets a missing partition
    only creates it once)."""
    from ..db.authorization import RlsAuthorizer
    from ..db.replay import DatabaseReplay

    assert config.database_url is not None
    node.authorizer = RlsAuthorizer(config.database_url, pool_size=config.db_pool_size, ssl=config.db_ssl)
    node.message_archive = DatabaseReplay(config.database_url, ssl=config.db_ssl)
    node.messages_feed = stream
    if not (config.jwt_secret or config.jwt_jwks):
        log.warning(
            "private channels are authorized by the row level security policies of realtime.messages, "
            "but tokens are not verified (no JWT_SECRET or JWT_JWKS): any client can claim any role"
        )


def app_from_env() -> Starlette:
    """App factory for worker processes: the parent passes the resolved config in the environment."""
    from ..logs import setup_logging

    config = Config(**json.loads(os.environ[CONFIG_ENV]))
    setup_logging(config.log_level, config.log_format)
    quiet_pyjwt_key_length_warning()  # the parent warned once about a short JWT_SECRET
    return build_app(config)


def uvicorn_options(config: Config) -> dict[str, Any]:
    """uvicorn settings: uvloop, httptools, our WebSocket class, a drain-aware shutdown timeout."""
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop = "asyncio"
    return {
        "host": config.host,
        "port": config.port,
        "loop": loop,
        "http": DeadlineHttpProtocol,
        "ws": WebSocketConnection,
        "lifespan": "on",
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": int(config.drain_window) + 5,
        "backlog": 4096,
        "server_header": False,
    }


def uvicorn_config(config: Config, node: Node | None = None) -> uvicorn.Config:
    """The uvicorn config serving :func:`build_app` with :func:`uvicorn_options`."""
    return uvicorn.Config(build_app(config, node), **uvicorn_options(config))


def listen(config: Config) -> socket.socket:
    """The listening socket, bound before anything else starts (a busy port fails first, alone)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        hint = " (another server is using it: stop it, or set PORT)" if exc.errno == errno.EADDRINUSE else ""
        raise StartupError(f"cannot listen on {config.host}:{config.port}: {reason}{hint}") from None
    sock.set_inheritable(True)
    return sock


def describe_start(config: Config, port: int) -> str:
    """The start line: where it listens, the broker, the auth mode, whether Postgres Changes are on."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    broker = f"redis ({config.redis_url})" if config.redis_url else "memory (this process only)"
    auth = []
    if config.jwt_secret:
        auth.append("JWT_SECRET (HS256/384/512)")
    if config.jwt_jwks:
        auth.append(f"JWT_JWKS ({len(config.jwt_jwks.get('keys') or [])} keys)")
    changes = (
        f"on (publication {config.db_publication!r}, slot {config.db_slot!r})"
        if config.database_url
        else "off (no DATABASE_URL)"
    )
    return (
        f"Tidings listening on ws://{host}:{port}/realtime/v1/websocket; broker: {broker}; "
        f"auth: {' + '.join(auth) or 'open (no JWT_SECRET or JWT_JWKS)'}; Postgres Changes: {changes}"
    )


class _StartSignals:
    """SIGINT/SIGTERM outside uvicorn's own handling.

    During start-up a signal cancels the start (whose clean-up drops a slot it just created).
    uvicorn handles signals while it serves, and re-raises the one that stopped it once it has
    drained: that one is ignored, so the process ends with status 0 (``make run`` then prints no
    ``*** Interrupt`` / ``*** Terminated``).
    """

    def __init__(self) -> None:
        self.starting: asyncio.Task[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.starting is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.starting.cancel)


def _loop_factory() -> Any:
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None


async def _serve(config: Config, sock: socket.socket, signals: _StartSignals) -> None:
    signals.loop = asyncio.get_running_loop()
    signals.starting = asyncio.current_task()
    try:
        node = await start_node(config)
    except asyncio.CancelledError:
        log.info("stopped during start-up")
        return
    finally:
        signals.starting = None
    server = uvicorn.Server(uvicorn_config(config, node))
    log.info("%s", describe_start(config, sock.getsockname()[1]))
    try:
        await server.serve(sockets=[sock])
    finally:
        await stop_node(node, drop_new_slot=not server.started)


def run(config: Config) -> None:
    """Serve until SIGINT/SIGTERM, then drain; a start-up failure exits with one logged line."""
    try:
        _run(config)
    except StartupError as exc:
        log.error("%s", exc)
        raise SystemExit(exc.code) from None


def _run(config: Config) -> None:
    check_extras(config)
    sock = listen(config)
    limit = raise_open_files_limit()
    log.info("open files limit: %d", limit)
    if not config.jwt_secret and not config.jwt_jwks:
        log.warning(
            "\n*** JWT_SECRET is not set: Tidings is running OPEN. Anyone can connect, join, "
            "broadcast and track presence. Set JWT_SECRET (or JWT_JWKS) in production. ***"
        )
        if config.host in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "open mode: listening on %s only (this machine); give --host or HOST to listen elsewhere",
                config.host,
            )
    short = short_secret_warning(config.jwt_secret)
    if short:
        log.warning("%s", short)
    quiet_pyjwt_key_length_warning()  # warned once above, not on every token
    if config.workers == 1:
        signals = _StartSignals()
        previous = {sig: signal.signal(sig, signals) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(_serve(config, sock, signals))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return
    # Worker processes: uvicorn binds the port again in this process and shares it. Check once
    # here that Redis and the database accept us, so a refusal is one line, not one per worker.
    port = sock.getsockname()[1]
    sock.close()
    asyncio.run(_preflight(config))
    log.info("%s (%d workers)", describe_start(config, port), config.workers)
    # Worker processes share the listening socket; each is a node of the Redis cluster.
    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
    uvicorn.run(
        "tidings.server.app:app_from_env", factory=True, workers=config.workers, **uvicorn_options(config)
    )


async def _preflight(config: Config) -> None:
    """Start a node and stop it again: Redis answers, the database accepts (slot kept)."""
    await stop_node(await start_node(config))
