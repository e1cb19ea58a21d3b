"""Real nginx in front of Tidings nodes, configured from ``deploy/nginx.conf``."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from .server import free_port

__all__ = ["Nginx"]

DEPLOY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"


class Nginx:
    """nginx listening on 127.0.0.1, proxying to ``backends`` (``host:port`` strings)."""

    def __init__(self, backends: list[str]) -> None:
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(self.binary).exists():
            raise RuntimeError("nginx is not installed: run `make deps` (scripts/install-system-deps.sh)")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tidings-nginx-"))
        site = DEPLOY_CONF.read_text()
        servers = "".join(f"    server {b} max_fails=1 fail_timeout=10s;\n" for b in backends)
        site = re.sub(r"(?m)^    server \S+:4000 .*\n", "", site)
        site = site.replace("    ip_hash;\n", "    ip_hash;\n" + servers, 1)
        site = site.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        (self.dir / "site.conf").write_text(site)
        (self.dir / "nginx.conf").write_text(
            f"""daemon off;
user root;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 4096; }}
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
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Nginx:
        """Start and wait until it proxies ``/api/health``."""
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited: " + (self.dir / "error.log").read_text(errors="replace"))
            try:
                with urllib.request.urlopen(self.http_url + "/api/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        """Stop nginx and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
