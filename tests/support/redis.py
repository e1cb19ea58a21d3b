"""A throwaway redis-server on 127.0.0.1 for tests: start, stop, restart on the same port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .server import free_port

__all__ = ["RedisClusterServers", "RedisServer"]


class RedisServer:
    """``redis-server`` in a temporary directory.

    Args:
        persist: keep data across :meth:`restart` (an RDB snapshot written at shutdown).
    """

    def __init__(self, persist: bool = True) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RuntimeError(
                "redis-server is not installed: run `make deps` (scripts/install-system-deps.sh)"
            )
        self.binary = binary
        self.persist = persist
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tidings-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start and wait until it accepts connections."""
        save = ["--save", "3600 1"] if self.persist else ["--save", ""]
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            *save,
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port} (data in {self.dir})")

    def stop(self) -> None:
        """SIGTERM: Redis saves its snapshot (when persisting) and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self, down_for: float = 0.0) -> RedisServer:
        """Stop, wait ``down_for`` seconds, start again on the same port."""
        self.stop()
        time.sleep(down_for)
        return self.start()

    def cleanup(self) -> None:
        """Stop and delete the data directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterServers:
    """A throwaway Redis Cluster: ``masters`` redis-servers in cluster mode, no replicas.

    Slots are spread evenly by ``redis-cli --cluster create``; :attr:`url` names the first node
    (clients discover the others from it).
    """

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer(persist=False) for _ in range(masters)]
        self.cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT`` of the first node."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        """Start every node, join them into one cluster and wait until it reports ``ok``."""
        try:
            return self._start(timeout)
        except BaseException:
            self.cleanup()
            raise

    def _start(self, timeout: float) -> RedisClusterServers:
        for node in self.nodes:
            # The bus port defaults to port + 10000, which may not exist for a high free port.
            node.extra_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            node.extra_args += ["--cluster-port", str(free_port())]
            node.start()
        subprocess.run(
            [self.cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes]]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._state(n) == "ok" for n in self.nodes):
                return self
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not reach cluster_state:ok")

    def _state(self, node: RedisServer) -> str:
        out = subprocess.run(
            [self.cli, "-p", str(node.port), "cluster", "info"], capture_output=True, text=True, timeout=5
        ).stdout
        for line in out.splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return ""

    def cleanup(self) -> None:
        """Stop every node and delete their directories."""
        for node in self.nodes:
            node.cleanup()
