"""What the bench reads from ``/proc``: a server's RSS and CPU time, and the machine."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

__all__ = ["cpu_seconds", "fd_count", "loadavg", "machine_info", "redis_info", "redis_pid", "rss_kb"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def rss_kb(pid: int) -> int:
    """``VmRSS`` of ``pid`` in KiB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """``utime + stime`` of ``pid`` (all its threads) in seconds, from ``/proc/PID/stat``."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return 0.0
    # The command name may contain spaces: fields start after the closing parenthesis.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def redis_info(url: str, section: str = "server", timeout: float = 2.0) -> dict[str, str]:
    """``INFO <section>`` of the Redis at ``url`` as a dict (``{}`` if it cannot be read)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    sec = section.encode()
    data = b""
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=timeout) as sock:
            if u.password:
                user = u.username or "default"
                auth = [b"AUTH", user.encode(), u.password.encode()]
                sock.sendall(b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in auth))
                sock.recv(1024)
            sock.sendall(b"*2\r\n$4\r\nINFO\r\n$%d\r\n%s\r\n" % (len(sec), sec))
            # A bulk string: "$<len>\r\n<len bytes>\r\n".
            while b"\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return {}
                data += chunk
            head, _, body = data.partition(b"\r\n")
            if not head.startswith(b"$"):
                return {}
            size = int(head[1:])
            while len(body) < size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
    except (OSError, ValueError):
        return {}
    out: dict[str, str] = {}
    for line in body[:size].decode(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            out[key] = value
    return out


def redis_pid(url: str) -> int | None:
    """``process_id`` of the Redis at ``url`` (``None`` if it cannot be read).

    Only meaningful for a Redis on this machine (its CPU is then read from ``/proc``).
    """
    raw = redis_info(url).get("process_id")
    return int(raw) if raw and raw.isdigit() else None


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, kernel, Python and open-files limit, for the report."""
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as fh:
            mem_kb = int(fh.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "nofile": [soft, hard],
    }
