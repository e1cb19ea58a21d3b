"""The one loopback TCP proxy of the tests: pass, delay, cut, blackhole, or cut WebSockets only.

:class:`TcpProxy` forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>`` on the running loop
(async tests); :class:`ThreadedProxy` runs one on a loop thread of its own (synchronous tests: the
browser tests). The proxy reads each connection's HTTP request head first, so it knows which
connections are WebSocket upgrades:

* ``delay`` (seconds) holds every chunk that long, both ways; ``ws_delay`` only those of upgraded
  connections (a slow link for WebSockets alone);
* :meth:`TcpProxy.cut` resets every open connection (RST, as a crashed middlebox would);
  ``accepting = False`` refuses new ones the same way;
* :meth:`TcpProxy.blackhole` drops every further byte of the open connections, both ways, without
  closing them (half-open: no FIN, no RST);
* :meth:`TcpProxy.cut_websockets` refuses upgrades (closing the connection) and resets the
  upgraded ones, while plain HTTP passes: what a browser sees when a middlebox stops passing
  WebSockets; :meth:`TcpProxy.restore` passes them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["TcpProxy", "ThreadedProxy"]

HEAD_LIMIT = 64 * 1024
T = TypeVar("T")


class _Link:
    """One proxied connection: the client's side and the upstream side."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter, upgrade: bool) -> None:
        self.client = client
        self.upstream = upstream
        self.upgrade = upgrade
        self.blackholed = False

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` (a free port by default) to ``127.0.0.1:<target_port>``."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.port = port
        self.delay = 0.0
        self.ws_delay = 0.0
        self.accepting = True
        self.websockets_cut = False
        self.upgrades_refused = 0
        self.links: list[_Link] = []
        self._server: asyncio.Server | None = None

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", self.port, limit=HEAD_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Reset every connection (long-polls too: the server need not wait for them), stop listening."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def cut(self) -> None:
        """Reset every open connection."""
        for link in list(self.links):
            link.abort()
        self.links.clear()

    def blackhole(self) -> None:
        """Silently drop all further bytes of the open connections, both ways, without closing them."""
        for link in self.links:
            link.blackholed = True

    def cut_websockets(self) -> None:
        """Refuse WebSocket upgrades from now on and reset the upgraded connections."""
        self.websockets_cut = True
        for link in [link for link in self.links if link.upgrade]:
            link.abort()
            self.links.remove(link)

    def restore(self) -> None:
        """Pass WebSocket upgrades again."""
        self.websockets_cut = False

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.transport.abort()
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
        link = _Link(writer, up_writer, upgrade)
        self.links.append(link)
        up_writer.write(head)
        try:
            await asyncio.gather(self._pump(link, reader, up_writer), self._pump(link, up_reader, writer))
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()
            if link in self.links:
                self.links.remove(link)

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            # Ends at EOF or when the link is aborted.
            while data := await reader.read(65536):
                if link.blackholed:
                    continue
                delay = self.delay + (self.ws_delay if link.upgrade else 0.0)
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
            if not link.blackholed:
                writer.write_eof()


class ThreadedProxy:
    """A :class:`TcpProxy` on an event loop thread of its own, driven from synchronous code."""

    def __init__(self, target_port: int) -> None:
        self.proxy = TcpProxy(target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def http_url(self) -> str:
        return self.proxy.http_url

    @property
    def upgrades_refused(self) -> int:
        return self.proxy.upgrades_refused

    @property
    def ws_delay(self) -> float:
        return self.proxy.ws_delay

    @ws_delay.setter
    def ws_delay(self, seconds: float) -> None:
        self._loop.call_soon_threadsafe(setattr, self.proxy, "ws_delay", seconds)

    def start(self) -> ThreadedProxy:
        """Listen on a free port."""
        self._thread.start()
        self._call(self.proxy.start())
        return self

    def stop(self) -> None:
        """Close everything and stop the thread."""

        async def close() -> None:
            await self.proxy.stop()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def cut_websockets(self) -> None:
        """See :meth:`TcpProxy.cut_websockets`."""
        self._call(_run(self.proxy.cut_websockets))

    def restore(self) -> None:
        """See :meth:`TcpProxy.restore`."""
        self._call(_run(self.proxy.restore))

    def go_offline(self) -> None:
        """Refuse new connections and reset the open ones (HTTP and WebSocket alike)."""

        def offline() -> None:
            self.proxy.accepting = False
            self.proxy.cut()

        self._call(_run(offline))

    def go_online(self) -> None:
        """Accept connections again."""
        self._call(_run(lambda: setattr(self.proxy, "accepting", True)))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)


async def _run(fn: Any) -> None:
    fn()
