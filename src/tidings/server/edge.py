"""Policy of the HTTP edge, shared by the HTTP protocol, the WebSocket handshake and the routes.

* **Client addresses.** A connection's client is its peer, unless the peer is one of
  ``TRUSTED_PROXIES``: then the peer's own connections are not capped, and a WebSocket upgrade
  counts for the client its ``X-Forwarded-For`` names (the rightmost address that is not itself a
  trusted proxy: every proxy appends the address it saw, so what a client wrote stays to the left).
* **Connections per address.** :data:`CONNECTIONS_PER_ADDRESS` counts this process's open TCP
  connections by client address (HTTP and WebSocket alike), for ``MAX_CONNECTIONS_PER_IP``.
* **Origins.** ``ALLOWED_ORIGINS`` for WebSocket upgrades and REST CORS.
* **Metrics tokens.** ``METRICS_JWT_SECRET``: a bearer JWT for ``/metrics``, ``/api/metrics``
  and the dashboard.
* **Throttled lines.** A refusal that a client can repeat at will logs at most one line per kind
  every :data:`THROTTLE_WINDOW` seconds.
* **Open files.** A warning when the open connections come near ``RLIMIT_NOFILE``: beyond it,
  libuv accepts and drops new connections without telling anyone. On the plain asyncio loop,
  whose failed ``accept()`` logs a traceback each time, :class:`AcceptErrorFilter` makes that one
  throttled line.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import resource
import time
from typing import TYPE_CHECKING

import jwt

if TYPE_CHECKING:
    from ..metrics import NodeMetrics

__all__ = [
    "ANONYMOUS_KEY_PREFIX",
    "AcceptErrorFilter",
    "CONNECTIONS_PER_ADDRESS",
    "OPEN_FILES",
    "THROTTLE_WINDOW",
    "ConnectionsPerAddress",
    "OpenFiles",
    "OriginPolicy",
    "Throttle",
    "TrustedProxies",
    "bearer_token",
    "install_accept_error_filter",
    "metrics_token_valid",
    "origin_policy",
    "trusted_proxies",
]

#: ``node.users`` key of the anonymous (no ``sub``) WebSocket connections of one client address.
#: A NUL cannot start a JWT ``sub`` that a client sends in good faith.
ANONYMOUS_KEY_PREFIX = "\0anon "
THROTTLE_WINDOW = 10.0

_METRICS_ALGORITHMS = ["HS256", "HS384", "HS512"]
_MAX_ADDRESS = 64  # longest text taken for an address (an IPv6 address with a zone fits)


class ConnectionsPerAddress:
    """Open connections by client address; an address leaves the map with its last connection."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def count(self, address: str) -> int:
        """Connections of ``address`` now."""
        return self._counts.get(address, 0)

    def add(self, address: str) -> None:
        """One more connection of ``address``."""
        self._counts[address] = self._counts.get(address, 0) + 1

    def release(self, address: str) -> None:
        """One connection of ``address`` closed."""
        left = self._counts.get(address, 0) - 1
        if left > 0:
            self._counts[address] = left
        else:
            self._counts.pop(address, None)

    def __len__(self) -> int:
        return len(self._counts)


#: This process's connections by client address (every node of a process shares its file limit).
CONNECTIONS_PER_ADDRESS = ConnectionsPerAddress()


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class TrustedProxies:
    """The peers whose ``X-Forwarded-For`` is believed (``TRUSTED_PROXIES``)."""

    __slots__ = ("_networks", "_trusts")

    def __init__(self, spec: str) -> None:
        self._networks = [ipaddress.ip_network(item, strict=False) for item in spec.split(",") if item]
        self._trusts = functools.lru_cache(maxsize=1024)(self._compute)

    def _compute(self, host: str) -> bool:
        ip = _ip(host)
        return ip is not None and any(ip in net for net in self._networks)

    def __contains__(self, host: str | None) -> bool:
        if not host or not self._networks or len(host) > _MAX_ADDRESS:
            return False
        return bool(self._trusts(host))

    def forwarded_client(self, forwarded_for: str) -> str | None:
        """The client named by ``X-Forwarded-For`` (all its values joined by commas), or ``None``."""
        for item in reversed(forwarded_for.split(",")):
            item = item.strip()
            if not item:
                continue
            ip = _ip(item) if len(item) <= _MAX_ADDRESS else None
            if ip is None:
                return None  # not an address: nothing to count by
            host = str(ip)
            if host not in self:
                return host
        return None  # every hop is a trusted proxy: no client to count


@functools.lru_cache(maxsize=8)
def trusted_proxies(spec: str) -> TrustedProxies:
    """The parsed ``TRUSTED_PROXIES`` value (parsed once per distinct value)."""
    return TrustedProxies(spec)


class OriginPolicy:
    """``ALLOWED_ORIGINS``: ``*``, exact origins, and ``scheme://*.domain`` patterns."""

    __slots__ = ("any", "exact", "regex", "_pattern")

    def __init__(self, spec: str) -> None:
        items = [item for item in spec.split(",") if item]
        self.any = "*" in items or not items
        self.exact = frozenset(item for item in items if "*" not in item)
        patterns = [re.escape(item).replace(r"\*", r"[^/.:]+(?:\.[^/.:]+)*") for item in items if "*" in item]
        #: One regular expression for the wildcard entries (Starlette's ``allow_origin_regex``).
        self.regex: str | None = "|".join(f"(?:{p})" for p in patterns) or None
        self._pattern = re.compile(self.regex) if self.regex else None

    def allows(self, origin: str) -> bool:
        """Whether a browser page of ``origin`` may connect."""
        if self.any:
            return True
        origin = origin.strip().rstrip("/").lower()
        if origin in self.exact:
            return True
        return self._pattern is not None and self._pattern.fullmatch(origin) is not None


@functools.lru_cache(maxsize=8)
def origin_policy(spec: str) -> OriginPolicy:
    """The parsed ``ALLOWED_ORIGINS`` value."""
    return OriginPolicy(spec)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def metrics_token_valid(secret: str, token: str | None) -> bool:
    """Whether ``token`` is a JWT signed with ``METRICS_JWT_SECRET`` (and not expired)."""
    if not token or len(token) > 8192:
        return False
    try:
        jwt.decode(token, secret, algorithms=_METRICS_ALGORITHMS, options={"verify_aud": False})
    except jwt.PyJWTError:
        return False
    return True


class Throttle:
    """At most one line per kind every ``window`` seconds; the next line says how many were left out."""

    __slots__ = ("_kinds", "window")

    def __init__(self, window: float = THROTTLE_WINDOW) -> None:
        self.window = window
        #: kind -> [time of the last written line, lines left out since]
        self._kinds: dict[str, list[float]] = {}

    def log(self, logger: logging.Logger, level: int, kind: str, msg: str, *args: object) -> None:
        """``logger.log(level, msg, *args)`` unless a line of ``kind`` was written within the window."""
        if not logger.isEnabledFor(level):
            return
        now = time.monotonic()
        state = self._kinds.get(kind)
        if state is not None and now - state[0] < self.window:
            state[1] += 1
            return
        left_out = int(state[1]) if state is not None else 0
        self._kinds[kind] = [now, 0]
        if left_out:
            logger.log(level, msg + " (%d more like it in the last %g s)", *args, left_out, self.window)
        else:
            logger.log(level, msg, *args)


class OpenFiles:
    """Warns (throttled) when open connections come within a reserve of ``RLIMIT_NOFILE``."""

    __slots__ = ("_threshold", "throttle")

    def __init__(self) -> None:
        self._threshold: int | None = None
        self.throttle = Throttle()

    def threshold(self) -> int:
        """Open connections at which the warning starts (measured at the first connection)."""
        if self._threshold is None:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft == resource.RLIM_INFINITY:
                soft = 1 << 30
            try:
                baseline = len(os.listdir("/proc/self/fd"))
            except OSError:  # pragma: no cover - not Linux
                baseline = 32
            # Room for what else opens files later (Redis and database pools, log rotation).
            self._threshold = max(1, soft - baseline - min(64, soft // 8))
        return self._threshold

    def check(self, open_connections: int, metrics: NodeMetrics, logger: logging.Logger) -> None:
        """Called for each new connection with the number of open ones."""
        threshold = self._threshold if self._threshold is not None else self.threshold()
        if open_connections < threshold:
            return
        metrics.connections_near_fd_limit += 1
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.throttle.log(
            logger,
            logging.WARNING,
            "fd",
            "%d connections open, near the open files limit (%d): beyond it new connections are "
            "dropped as they are accepted; raise the limit (ulimit -n) or lower MAX_CONNECTIONS_PER_IP",
            open_connections,
            soft,
        )


OPEN_FILES = OpenFiles()


class AcceptErrorFilter(logging.Filter):
    """asyncio's ``socket.accept() out of system resource`` (EMFILE and the like), with its
    traceback, becomes one throttled line (the loop retries the accept a second later)."""

    _PREFIX = "socket.accept() out of system resource"

    def __init__(self) -> None:
        super().__init__()
        self._last = 0.0
        self._left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self._PREFIX)):
            return True
        now = time.monotonic()
        if now - self._last < THROTTLE_WINDOW:
            self._left_out += 1
            return False
        exc = record.exc_info[1] if record.exc_info else None
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        record.msg = "accept() failed (%s); new connections wait (open files limit %d)%s"
        more = f" ({self._left_out} more in the last {THROTTLE_WINDOW:g} s)" if self._left_out else ""
        record.args = (exc or "out of resources", soft, more)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._last, self._left_out = now, 0
        return True


def install_accept_error_filter() -> None:
    """Put :class:`AcceptErrorFilter` on the ``asyncio`` logger (once)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, AcceptErrorFilter) for f in logger.filters):
        logger.addFilter(AcceptErrorFilter())
