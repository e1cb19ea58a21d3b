"""The live progress line: phase, connections, messages, elapsed time.

On a terminal it is redrawn in place a few times a second; otherwise (CI logs, pipes) a plain line
is printed every few seconds so the log stays short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["Progress"]


class Progress:
    """Writes status lines to stderr for one run."""

    def __init__(self, label: str, quiet: bool = False) -> None:
        self.label = label
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.phase = "starting"
        self.t0 = time.monotonic()
        self._last = 0.0
        self.extra: Callable[[], str] | None = None
        self.counters: Callable[[], dict[str, int]] | None = None

    def set_phase(self, phase: str) -> None:
        """Switch phase (printed at once)."""
        self.phase = phase
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Redraw if it is time to."""
        if self.quiet:
            return
        now = time.monotonic()
        if not force and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        c = self.counters() if self.counters is not None else {}
        parts = [f"[{self.label}] {self.phase:<14}", f"{now - self.t0:6.1f}s"]
        if c:
            joined, failed, recv = c.get("joined", 0), c.get("failed", 0), c.get("received", 0)
            parts.append(f"joined {joined:>6,} failed {failed:>5,} recv {recv:>9,}")
        if self.extra is not None:
            parts.append(self.extra())
        line = "  ".join(parts)
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self, message: str) -> None:
        """End the live line with a final message."""
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r\x1b[2K")
        sys.stderr.write(f"[{self.label}] {message}\n")
        sys.stderr.flush()

    def note(self, message: str) -> None:
        """A line of its own (keeps the live line below it)."""
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r\x1b[2K")
        sys.stderr.write(f"[{self.label}] {message}\n")
        sys.stderr.flush()
