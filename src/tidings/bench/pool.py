"""The coordinator's side of the worker processes: start, command, aggregate progress, stop."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .worker import WorkerSpec, worker_main

__all__ = ["Pool", "WorkerError", "split_addresses"]


class WorkerError(RuntimeError):
    """A worker failed a command."""


def split_addresses(addrs: list[str], workers: int) -> list[list[str]]:
    """Give each worker its own source addresses (shared round-robin when there are fewer)."""
    out = [[a for j, a in enumerate(addrs) if j % workers == i] for i in range(workers)]
    return [o or [addrs[i % len(addrs)]] for i, o in enumerate(out)]


class Pool:
    """``workers`` load-generator processes driven over pipes."""

    def __init__(
        self,
        workers: int,
        host: str,
        port: int,
        dialect: str,
        vsn: str,
        source_addrs: list[str],
        cpus: set[int] | None,
        heartbeat: float = 25.0,
        connect_timeout: float = 10.0,
    ) -> None:
        addrs = split_addresses(source_addrs, workers)
        self.specs = [
            WorkerSpec(i, host, port, dialect, vsn, addrs[i], cpus, heartbeat, connect_timeout)
            for i in range(workers)
        ]
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []
        self.progress: list[dict[str, int]] = [{} for _ in range(workers)]
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self.on_progress: Callable[[], None] | None = None

    @property
    def size(self) -> int:
        """Number of workers."""
        return len(self.specs)

    async def start(self) -> None:
        """Spawn the workers (spawn, not fork: the coordinator already runs an event loop)."""
        ctx = multiprocessing.get_context("spawn")
        loop = asyncio.get_running_loop()
        for spec in self.specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(spec, child), daemon=True, name=f"bench-w{spec.index}"
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)
            loop.add_reader(parent.fileno(), self._on_readable, spec.index)
            # uvloop makes polled fds non-blocking; recv() of a large result must wait for all of it.
            os.set_blocking(parent.fileno(), True)

    def _on_readable(self, i: int) -> None:
        pipe = self.pipes[i]
        try:
            while pipe.poll():
                msg = pipe.recv()
                if "progress" in msg:
                    self.progress[i] = msg["progress"]
                    if self.on_progress is not None:
                        self.on_progress()
                    continue
                fut = self._futures.pop(msg["id"], None)
                if fut is None or fut.done():
                    continue
                if "error" in msg:
                    fut.set_exception(WorkerError(f"worker {i}: {msg['error']}"))
                else:
                    fut.set_result(msg["result"])
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(pipe.fileno())
            for fut in list(self._futures.values()):
                if not fut.done():
                    fut.set_exception(WorkerError(f"worker {i} died"))

    async def call(self, cmd: str, args: list[dict[str, Any]] | dict[str, Any] | None = None) -> list[Any]:
        """Run ``cmd`` on every worker (``args`` per worker, or the same for all); all results."""
        loop = asyncio.get_running_loop()
        per = args if isinstance(args, list) else [args or {} for _ in self.specs]
        futs = []
        for pipe, a in zip(self.pipes, per, strict=True):
            self._next_id += 1
            fut: asyncio.Future[Any] = loop.create_future()
            self._futures[self._next_id] = fut
            pipe.send({"id": self._next_id, "cmd": cmd, "args": a})
            futs.append(fut)
        return list(await asyncio.gather(*futs))

    def totals(self) -> dict[str, int]:
        """Latest counters summed over the workers."""
        out: dict[str, int] = {}
        for p in self.progress:
            for k, v in p.items():
                out[k] = out.get(k, 0) + v
        return out

    async def stop(self) -> None:
        """Ask the workers to exit; kill those that do not."""
        try:
            await asyncio.wait_for(self.call("exit"), 5)
        except (TimeoutError, WorkerError, OSError):
            pass
        loop = asyncio.get_running_loop()
        for pipe in self.pipes:
            try:
                loop.remove_reader(pipe.fileno())
            except (ValueError, OSError):
                pass
        for proc in self.procs:
            await loop.run_in_executor(None, proc.join, 5)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for pipe in self.pipes:
            pipe.close()
