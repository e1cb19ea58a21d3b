"""Real nginx in front of Tidings nodes, configured from ``deploy/nginx.conf`` (the bench's launcher)."""

from __future__ import annotations

from tidings.bench.nginx import NginxFront

from .server import free_port

__all__ = ["Nginx"]


class Nginx(NginxFront):
    """nginx listening on a free 127.0.0.1 port, proxying to ``backends`` (``host:port`` strings)."""

    def __init__(self, backends: list[str]) -> None:
        super().__init__(backends, free_port(), clients=100, workers=1)

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"
