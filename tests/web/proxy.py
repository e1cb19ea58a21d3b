"""A loopback TCP proxy in a background thread that can cut the WebSocket path only.

HTTP requests pass through untouched; while :meth:`CuttingProxy.cut_websockets` is in force every
``Upgrade: websocket`` request is answered by closing the connection, and the upgraded connections
already open are reset: what a browser sees when a middlebox stops passing WebSockets.
``ws_delay`` (seconds) holds every chunk of an upgraded connection that long, in both directions:
a slow link for WebSockets only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["CuttingProxy"]

HEAD_LIMIT = 64 * 1024
T = TypeVar("T")


class CuttingProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.websockets_cut = False
        self.ws_delay = 0.0
        self.upgrades_refused = 0
        self._upgraded: set[asyncio.StreamWriter] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cutting-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CuttingProxy:
        """Listen on a free port."""
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._on_client, "127.0.0.1", 0, limit=HEAD_LIMIT))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Close everything and stop the thread."""

        async def close() -> None:
            for writer in list(self._open):  # long-polls too: the server need not wait for them
                writer.transport.abort()
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def cut_websockets(self) -> None:
        """Refuse WebSocket upgrades from now on and reset the upgraded connections."""

        async def cut() -> None:
            self.websockets_cut = True
            self._reset_upgraded()

        self._call(cut())

    def restore(self) -> None:
        """Pass WebSocket upgrades again."""
        self.websockets_cut = False

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _reset_upgraded(self) -> None:
        for writer in list(self._upgraded):
            writer.transport.abort()
        self._upgraded.clear()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        upgrade = b"upgrade: websocket" in head.lower()
        if upgrade and self.websockets_cut:
            self.upgrades_refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        if upgrade:
            self._upgraded.update((writer, up_writer))
        self._open.update((writer, up_writer))
        up_writer.write(head)
        delay = self.ws_delay if upgrade else 0.0
        try:
            await asyncio.gather(self._pipe(reader, up_writer, delay), self._pipe(up_reader, writer, delay))
        except asyncio.CancelledError:
            pass  # stop(): not an error of this connection
        for w in (writer, up_writer):
            self._upgraded.discard(w)
            self._open.discard(w)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float = 0.0) -> None:
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
