"""A real nginx in front of Tidings nodes for the bench, configured from ``deploy/nginx.conf``.

The site (upstream with ``ip_hash``, WebSocket upgrade headers, timeouts, ``proxy_buffering off``)
is the shipped ``deploy/nginx.conf`` with only its ``server`` addresses replaced by the bench's
loopback nodes (keeping their ``max_fails``/``fail_timeout``) and ``listen`` moved to a free
loopback port. The main config around it is sized for tens of thousands of connections: each
proxied WebSocket holds two connections in nginx (client and upstream), so a worker gets
``worker_connections`` of at least twice its share of clients and an open-files limit to match.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Self

__all__ = ["NginxFront", "NginxUnavailable", "deploy_conf", "nginx_binary", "pids_of_tree", "site_config"]


class NginxUnavailable(RuntimeError):
    """nginx or ``deploy/nginx.conf`` cannot be found."""


def nginx_binary() -> str:
    """Path of the nginx executable; raises :class:`NginxUnavailable` with what to do."""
    found = shutil.which("nginx") or next(
        (
            p
            for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
            if Path(p).exists()
        ),
        None,
    )
    if found is None:
        raise NginxUnavailable(
            "nginx is not installed (the node-death bench runs a real nginx): "
            "`apt-get install nginx-light` or `make deps` (scripts/install-system-deps.sh)"
        )
    return found


def deploy_conf() -> Path:
    """``deploy/nginx.conf`` of the source tree (override with ``TIDINGS_NGINX_CONF``)."""
    env = os.environ.get("TIDINGS_NGINX_CONF")
    candidates = [Path(env)] if env else []
    candidates += [base / "deploy" / "nginx.conf" for base in [Path.cwd(), *Path(__file__).resolve().parents]]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise NginxUnavailable("deploy/nginx.conf not found (run from the source tree or set TIDINGS_NGINX_CONF)")


_SERVER_LINE = re.compile(r"(?m)^(\s*)server\s+\S+:\d+(\s[^;]*)?;\n")


def site_config(template: str, backends: list[str], port: int) -> str:
    """``deploy/nginx.conf`` with the upstream's servers replaced by ``backends`` and ``listen`` moved.

    Each backend keeps the parameters (``max_fails=… fail_timeout=…``) of the template's first
    ``server`` line.
    """
    first = _SERVER_LINE.search(template)
    if first is None or "ip_hash;" not in template or "listen 80;" not in template:
        raise NginxUnavailable("deploy/nginx.conf does not have the expected upstream/listen lines")
    indent, params = first.group(1), (first.group(2) or "")
    site = _SERVER_LINE.sub("", template)
    servers = "".join(f"{indent}server {b}{params};\n" for b in backends)
    site = site.replace("    ip_hash;\n", "    ip_hash;\n" + servers, 1)
    # reuseport: one listening socket per worker, so the kernel spreads clients evenly over them.
    return site.replace("listen 80;", f"listen 127.0.0.1:{port} reuseport;")


def pids_of_tree(pid: int) -> list[int]:
    """``pid`` and its direct children (nginx's master and workers)."""
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return out


class NginxFront:
    """nginx on ``127.0.0.1:port`` proxying to ``backends`` (``host:port``), for ``clients`` clients."""

    def __init__(self, backends: list[str], port: int, clients: int, workers: int = 2) -> None:
        self.binary = nginx_binary()
        template = deploy_conf().read_text()
        self.port = port
        self.backends = backends
        self.workers = workers
        # Two connections per client (client side + upstream) plus headroom, per worker, so one
        # worker could hold every client; but never past the open-files limit nginx inherits (a
        # non-privileged or capability-less root nginx cannot raise it), minus a few for logs.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
        self.rlimit = min(2 * clients + 600, limit)
        self.worker_connections = max(1024, min(2 * clients + 500, self.rlimit - 100))
        self.dir = Path(tempfile.mkdtemp(prefix="tidings-bench-nginx-"))
        (self.dir / "site.conf").write_text(site_config(template, backends, port))
        user = "user root;\n" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(
            f"""daemon off;
{user}worker_processes {workers};
worker_rlimit_nofile {self.rlimit};
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections {self.worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    include {self.dir}/site.conf;
}}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """PID of the nginx master."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> Self:
        """Start and wait until it proxies ``/api/health``; raises ``RuntimeError`` with its log."""
        test = subprocess.run(
            [self.binary, "-t", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if test.returncode != 0:
            raise RuntimeError(f"nginx rejected its configuration:\n{test.stderr}")
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.errors()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not proxy /api/health within {timeout}s:\n{self.errors()}")

    def open_probe(self, timeout: float = 5.0) -> socket.socket:
        """A WebSocket upgraded through nginx from 127.0.0.1 (same /24 as the bench's clients).

        ``ip_hash`` hashes the first three octets of an IPv4 client address, so this lands on
        the node every bench client lands on. The caller finds which node holds it, then closes it.
        """
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.sendall(
            b"GET /realtime/v1/websocket?apikey=bench&vsn=2.0.0 HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in head and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            sock.close()
            raise RuntimeError(f"probe upgrade through nginx failed: {head[:200]!r}")
        return sock

    def errors(self) -> str:
        """The tail of nginx's error log."""
        try:
            return (self.dir / "error.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def error_counts(self) -> dict[str, int]:
        """Error-log lines by level (``warn``, ``error``, ``crit``, ``alert``, ``emerg``)."""
        counts: dict[str, int] = {}
        for m in re.finditer(r"\[(warn|error|crit|alert|emerg)\]", self.errors_full()):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        return counts

    def error_samples(self, limit: int = 5) -> list[str]:
        """The first distinct error messages (without time and connection numbers)."""
        seen: list[str] = []
        for line in self.errors_full().splitlines():
            if "[warn]" in line and "upstream server temporarily disabled" not in line:
                continue
            text = re.sub(r"^\S+ \S+ \[(\w+)\] \d+#\d+: (\*\d+ )?", r"[\1] ", line)
            text = re.sub(r", client: .*", "", text)
            if text not in seen:
                seen.append(text)
            if len(seen) >= limit:
                break
        return seen

    def errors_full(self) -> str:
        """The whole error log."""
        try:
            return (self.dir / "error.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop nginx (SIGQUIT would wait for the WebSockets: SIGTERM) and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
