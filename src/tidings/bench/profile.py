"""Optional sampling profile of the server during a run (``--profile``), with py-spy.

py-spy (``pip install py-spy``) samples the server process from outside without slowing it much
(``--nonblocking``: under load its stacks can be torn, a callee shown under a function that never
calls it). ``native`` instead pauses the process for each sample and records C frames too (uvloop,
the system calls, the garbage collector): exact stacks, a slower server (``--profile-native``).
Its "raw" output (collapsed stacks) is kept next to the report and summarised as the functions
with the most samples, on their own and including callees.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["Profiler", "summarize_collapsed"]


class Profiler:
    """``py-spy record`` attached to ``pid`` until :meth:`stop`."""

    def __init__(self, pid: int, out: Path, rate: int = 250, native: bool = False) -> None:
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [
                exe,
                "record",
                "-p",
                str(pid),
                "-r",
                str(rate),
                "--format",
                "raw",
                "--native" if native else "--nonblocking",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @staticmethod
    def available() -> bool:
        """Whether py-spy is installed."""
        return bool(shutil.which("py-spy") or Path(sys.executable).with_name("py-spy").exists())

    def stop(self) -> Path | None:
        """Stop sampling (py-spy writes its file on SIGINT); the file, if written."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc = None
        return self.out if self.out.is_file() else None


def summarize_collapsed(path: Path, top: int = 20) -> dict[str, list[tuple[str, float]]]:
    """The ``top`` frames by own samples and by inclusive samples, as percentages."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return {"self": [], "inclusive": []}
    return {
        "self": [(f, round(c * 100 / total, 1)) for f, c in own.most_common(top)],
        "inclusive": [(f, round(c * 100 / total, 1)) for f, c in incl.most_common(top * 2)],
        "samples": [("total", float(total))],
    }
