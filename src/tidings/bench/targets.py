"""The servers a bench runs against: Tidings and the references, launched as subprocesses.

Each :class:`Target` says how to start its server on a loopback port, which dialect its clients
speak, and which scenarios make sense for it. :class:`ServerHandle` starts, pins, restarts and
stops one server and exposes its PID for ``/proc`` measurements.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .nginx import NginxFront

__all__ = [
    "ALL_SCENARIOS",
    "TARGETS",
    "TIDINGS_BENCH_ENV",
    "ServerHandle",
    "Target",
    "benchmarks_dir",
    "free_port",
]

ALL_SCENARIOS = frozenset({"connect", "memory", "fanout", "order-status", "reconnect-storm", "presence"})
# Two nodes on one Redis behind a real nginx: one node is SIGKILLed (``tidings-nginx`` only).
NGINX_SCENARIOS = frozenset({"connect", "node-death"})
# The references have no REST API: their reconnect-storm runs without updates (no loss figures).
REFERENCE_SCENARIOS = frozenset({"connect", "memory", "fanout", "reconnect-storm"})

# Redis targets: what measures delivery (a node restart of a cluster is not modelled).
CLUSTER_SCENARIOS = frozenset({"connect", "memory", "fanout", "order-status"})

# Limits out of the way: the bench measures the server, not its rate limiter.
TIDINGS_BENCH_ENV = {
    "MAX_CONNECTIONS": "20000",
    "MAX_CONNECTIONS_PER_USER": "0",
    # Thousands of connections per source address (127.0.0.2...): per-address caps off.
    "MAX_CONNECTIONS_PER_IP": "0",
    "MAX_ANONYMOUS_CONNECTIONS_PER_IP": "0",
    "MAX_JOINS_PER_SECOND": "100000",
    "MAX_MESSAGES_PER_SECOND": "100000",
    "MAX_NODE_MESSAGES_PER_SECOND": "10000000",
    "CHANNEL_ERROR_BACKOFF_MS": "0",
    "CONNECT_ERROR_BACKOFF_MS": "0",
    "HEARTBEAT_INTERVAL": "60s",
    "DRAIN_WINDOW": "1s",
    "LOG_LEVEL": "warning",
}


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source tree (override with ``TIDINGS_BENCHMARKS_DIR``)."""
    env = os.environ.get("TIDINGS_BENCHMARKS_DIR")
    if env:
        return Path(env)
    for base in [Path.cwd(), *Path(__file__).resolve().parents]:
        cand = base / "benchmarks"
        if (cand / "ceiling_server.py").is_file():
            return cand
    return Path.cwd() / "benchmarks"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Target:
    """One server kind."""

    def __init__(
        self,
        name: str,
        dialect: str,
        scenarios: frozenset[str],
        doc: str,
        redis: bool = False,
        nodes: int = 1,
        nginx: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.rest = name.startswith("tidings")  # has POST /api/broadcast
        self.tidings = name.startswith("tidings")
        self.redis = redis  # needs --redis-url (REDIS_URL of every node)
        self.nodes = nodes  # 2: subscribers on the first node, updates sent to the second
        self.nginx = nginx  # clients connect through nginx (deploy/nginx.conf) in front of the nodes
        self.extra_env = extra_env or {}
        self.name = name
        self.dialect = dialect
        self.scenarios = scenarios
        self.doc = doc

    def command(self, host: str, port: int, bench: Path) -> list[str]:
        """The argv that starts the server."""
        py = sys.executable
        if self.tidings:
            return [py, "-m", "tidings", "serve", "--host", host, "--port", str(port)]
        if self.name == "node-ws":
            return ["node", str(bench / "node" / "ws_server.mjs"), "--host", host, "--port", str(port)]
        script = {
            "ceiling": "ceiling_server.py",
            "websockets": "websockets_server.py",
            "socketio": "socketio_server.py",
        }
        return [py, str(bench / script[self.name]), "--host", host, "--port", str(port)]

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        """Environment of the server process."""
        env = dict(os.environ)
        if self.tidings:
            env.update(TIDINGS_BENCH_ENV)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def unavailable(self, bench: Path) -> str | None:
        """Why this target cannot run here (``None`` when it can)."""
        if self.nginx:
            from .nginx import NginxUnavailable, deploy_conf, nginx_binary

            try:
                nginx_binary()
                deploy_conf()
            except NginxUnavailable as exc:
                return str(exc)
        if self.tidings:
            return None
        if not (bench / "ceiling_server.py").is_file():
            return f"benchmarks/ not found at {bench} (set TIDINGS_BENCHMARKS_DIR)"
        if self.name == "socketio":
            try:
                import socketio  # noqa: F401
            except ImportError:
                return "python-socketio is not installed (run `tidings bench --setup`)"
        if self.name == "node-ws":
            if shutil.which("node") is None:
                return "node is not installed"
            if not (bench / "node" / "node_modules" / "ws").is_dir():
                return "npm package ws is not installed (run `tidings bench --setup`)"
        return None


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("tidings", "phoenix", ALL_SCENARIOS, "Tidings (`tidings serve`)"),
        Target("ceiling", "phoenix", REFERENCE_SCENARIOS, "bare uvloop asyncio.Protocol, pre-encoded frames"),
        Target("websockets", "phoenix", REFERENCE_SCENARIOS, "`websockets` asyncio server with broadcast()"),
        Target(
            "socketio",
            "socketio",
            REFERENCE_SCENARIOS - {"reconnect-storm"},
            "python-socketio ASGI app under uvicorn",
        ),
        Target("node-ws", "phoenix", REFERENCE_SCENARIOS, "Node.js `ws` package"),
        Target(
            "tidings-redis",
            "phoenix",
            CLUSTER_SCENARIOS,
            "Tidings, one node on the Redis broker (`--redis-url`)",
            redis=True,
        ),
        Target(
            "tidings-cluster",
            "phoenix",
            CLUSTER_SCENARIOS,
            "Tidings, two nodes on one Redis: clients on node A, updates sent to node B",
            redis=True,
            nodes=2,
        ),
        Target(
            "tidings-nginx",
            "phoenix",
            NGINX_SCENARIOS,
            "Tidings, two nodes on one Redis behind nginx (deploy/nginx.conf, ip_hash): clients connect "
            "through nginx, updates go straight to the node that survives",
            redis=True,
            nodes=2,
            nginx=True,
            # Enough history per channel for everything published while a node is down.
            extra_env={"HISTORY_SIZE": "1000"},
        ),
    )
}


class ServerHandle:
    """A running server of ``target`` on ``host:port``."""

    def __init__(
        self,
        target: Target,
        host: str,
        port: int,
        env: dict[str, str],
        cpus: set[int] | None,
        bench: Path,
    ) -> None:
        self.target = target
        self.host = host
        self.port = port
        self.extra_env = env
        self.cpus = cpus
        self.bench = bench
        self.proc: subprocess.Popen[bytes] | None = None
        # A second node (cluster targets): started and stopped with this one, receives the updates.
        self.peer: ServerHandle | None = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{target.name}-", suffix=".log", delete=False)
        # nginx targets: the proxy, and which node it sends the bench's clients to (``routed``).
        self.front: NginxFront | None = None
        self.front_clients = 10000
        self.routed: ServerHandle | None = None

    @property
    def client_port(self) -> int:
        """Port the bench's clients connect to: nginx's, if there is one."""
        return self.front.port if self.front is not None else self.port

    @property
    def other(self) -> ServerHandle | None:
        """With nginx: the node the clients are not routed to (it receives the updates)."""
        if self.front is None or self.routed is None:
            return None
        return self.peer if self.routed is self else self

    @property
    def measured_pid(self) -> int:
        """The process whose CPU and memory a scenario reports: the node the clients are on."""
        return self.routed.pid if self.routed is not None else self.pid

    @property
    def pub_port(self) -> int:
        """Port that publishers and update sources use: the node without the clients, if there is one."""
        other = self.other
        if other is not None:
            return other.port
        return self.peer.port if self.peer is not None else self.port

    @property
    def pid(self) -> int:
        """PID of the server process."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> float:
        """Start (peer first), pin, wait until the port accepts; returns the wall time it was ready."""
        if self.peer is not None:
            self.peer.start(timeout)
        ready = self._start(timeout)
        if self.target.nginx and self.peer is not None:
            ready = self._start_front(timeout)
        return ready

    def _start_front(self, timeout: float) -> float:
        """Start nginx in front of this node and its peer; find the node it routes clients to."""
        from .nginx import NginxFront

        assert self.peer is not None
        nodes = [self, self.peer]
        self.front = NginxFront(
            [f"{n.host}:{n.port}" for n in nodes], free_port(self.host), self.front_clients
        )
        self.front.start(timeout)
        probe = self.front.open_probe()
        try:
            deadline = time.monotonic() + timeout
            while self.routed is None and time.monotonic() < deadline:
                held = [n for n in nodes if n.health().get("connections", 0) > 0]
                if len(held) == 1:
                    self.routed = held[0]
                else:
                    time.sleep(0.05)
        finally:
            probe.close()
        if self.routed is None:
            raise RuntimeError("could not tell which node nginx routes 127.0.0.x clients to")
        return time.time()

    def health(self) -> dict[str, Any]:
        """``GET /api/health`` of this node, straight (not through nginx); ``{}`` if it fails."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/api/health", timeout=2) as r:
                data = json.loads(r.read())
                return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Signal this node only (not its peer) and wait for it to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def _start(self, timeout: float) -> float:
        cmd = self.target.command(self.host, self.port, self.bench)
        self.proc = subprocess.Popen(
            cmd, env=self.target.env(self.extra_env), stdout=self.log, stderr=subprocess.STDOUT
        )
        if self.cpus:
            try:
                os.sched_setaffinity(self.proc.pid, self.cpus)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.target.name} exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return time.time()
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.target.name} did not listen within {timeout}s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Signal the server (and its peer) and wait for it to exit (SIGKILL after ``timeout``)."""
        if self.front is not None:
            self.front.stop()
        if self.peer is not None:
            self.peer.stop(sig, timeout)
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def logs(self) -> str:
        """What the server printed."""
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace")[-4000:]
        if self.peer is not None:
            text += "\n-- peer node --\n" + self.peer.logs()
        if self.front is not None:
            text += "\n-- nginx error log --\n" + self.front.errors()
        return text
