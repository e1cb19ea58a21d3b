"""A real Tidings server in a subprocess, for tests: start, stop, kill, restart on the same port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

__all__ = ["ServerProcess", "free_port"]

DEFAULT_ENV = {
    "CHANNEL_ERROR_BACKOFF_MS": "0",
    "CONNECT_ERROR_BACKOFF_MS": "0",
    "DRAIN_WINDOW": "1s",
    "LOG_LEVEL": "info",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m tidings serve`` on 127.0.0.1.

    Args:
        env: settings as environment variables (added to :data:`DEFAULT_ENV`).
        args: extra CLI arguments.
        port: fixed port; a free one by default. Kept across :meth:`restart`.
        python: the interpreter to run it with (another venv's); this one by default.
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        port: int | None = None,
        python: str | None = None,
    ):
        self.env = {**DEFAULT_ENV, **(env or {})}
        self.args = list(args or [])
        self.port = port or free_port()
        self.python = python or sys.executable
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tidings-server-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """The realtime URL clients are given: ``ws://127.0.0.1:PORT/realtime/v1``."""
        return f"ws://127.0.0.1:{self.port}/realtime/v1"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        """Start and wait until ``/api/health`` answers."""
        env = {**os.environ, **self.env}
        cmd = [
            self.python,
            "-m",
            "tidings",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tidings exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.http_url + "/api/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"tidings did not start within {timeout}s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send ``sig`` and wait for the process to exit; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM) -> ServerProcess:
        """Stop, then start again on the same port."""
        self.stop(sig)
        return self.start()

    def logs(self) -> str:
        """Everything the server printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> ServerProcess:
        # ``with ServerProcess(...).start() as server`` is started already: a second process on
        # the same port (SO_REUSEPORT) would never be stopped.
        if self.proc is not None and self.proc.poll() is None:
            return self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
