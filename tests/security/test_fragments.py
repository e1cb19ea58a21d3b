"""Fragmented WebSocket messages that never end (issue 11, section 2).

Measured: 1 KB every 2 s kept a message open forever; 300 such connections held 300 MB. Now a
fragmented message must end within FRAGMENT_TIMEOUT (checked by the node's sweeper), and all
unfinished ones together may buffer MAX_FRAGMENT_BUFFER_BYTES in the process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import httpx
import orjson
from websockets.exceptions import ConnectionClosed

from tests.server.test_bad_input import WAIT, closed_with, heartbeat_ok, metric, open_ws, recv_json, ws_url
from tests.support.server import ServerProcess

ServerFactory = Callable[..., ServerProcess]

HEARTBEAT = orjson.dumps([None, "frag", "phoenix", "heartbeat", {}]).decode()


async def dribble(first: str, every: float, count: int) -> AsyncIterator[str]:
    """A fragmented text message: ``first``, then a space every ``every`` s, ``count`` times."""
    yield first
    for _ in range(count):
        await asyncio.sleep(every)
        yield " "


async def wait_for_metric(http: httpx.AsyncClient, name: str, value: float, timeout: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await metric(http, name)) != value:
        assert asyncio.get_running_loop().time() < deadline, f"{name} = {got}, expected {value}"
        await asyncio.sleep(0.1)


async def test_a_fragmented_message_that_never_ends_is_closed_with_1008(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(env={"FRAGMENT_TIMEOUT": "2s"})
    async with (
        open_ws(ws_url(srv)) as attacker,
        open_ws(ws_url(srv)) as honest,
        httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http,
    ):
        # At most 15 s of dribbling (a fragment each 0.3 s): the server must cut it off long before.
        sending = asyncio.create_task(attacker.send(dribble(HEARTBEAT[:10], 0.3, 50)))
        code, reason = await closed_with(attacker, timeout=20)
        assert (code, reason) == (1008, "fragmented message timeout")
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(sending, WAIT)
        assert await metric(http, "tidings_fragment_timeouts_total") == 1
        await wait_for_metric(http, "tidings_fragment_buffer_bytes", 0)
        # A fragmented message that ends in time is still assembled, on another connection.
        await honest.send(dribble(HEARTBEAT, 0.2, 3))
        assert (await recv_json(honest))[1] == "frag"
        await heartbeat_ok(honest)


async def test_fragments_beyond_the_process_buffer_close_the_connection_that_overflows(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(env={"MAX_FRAGMENT_BUFFER_BYTES": "65536", "FRAGMENT_TIMEOUT": "60s"})
    release = asyncio.Event()

    async def held(first: str) -> AsyncIterator[str]:
        yield first
        await release.wait()
        yield " "

    async with (
        open_ws(ws_url(srv)) as holder,
        open_ws(ws_url(srv)) as overflow,
        open_ws(ws_url(srv)) as later,
        httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http,
    ):
        holding = asyncio.create_task(holder.send(held(HEARTBEAT + " " * 40_000)))
        await wait_for_metric(http, "tidings_fragment_buffer_bytes", len(HEARTBEAT) + 40_000)
        # 40 KB buffered: 30 KB more would pass 64 KB. That connection, not the holder, is closed.
        overflowing = asyncio.create_task(overflow.send(held(HEARTBEAT + " " * 30_000)))
        assert await closed_with(overflow) == (1009, "fragment buffer full")
        overflowing.cancel()
        assert await metric(http, "tidings_fragment_buffer_full_total") == 1
        release.set()
        await asyncio.wait_for(holding, WAIT)
        assert (await recv_json(holder))[1] == "frag"  # the holder's message went through
        await wait_for_metric(http, "tidings_fragment_buffer_bytes", 0)
        # The buffer is free again: the same 30 KB fragmented message now fits.
        release.clear()
        later_sending = asyncio.create_task(later.send(held(HEARTBEAT + " " * 30_000)))
        await wait_for_metric(http, "tidings_fragment_buffer_bytes", len(HEARTBEAT) + 30_000)
        release.set()
        await asyncio.wait_for(later_sending, WAIT)
        assert (await recv_json(later))[1] == "frag"


async def test_fragment_bytes_of_a_dropped_connection_are_released(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"FRAGMENT_TIMEOUT": "60s"})
    forever = asyncio.Event()

    async def unfinished() -> AsyncIterator[str]:
        yield HEARTBEAT + " " * 10_000
        await forever.wait()
        yield ""

    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        async with open_ws(ws_url(srv)) as ws:
            sending = asyncio.create_task(ws.send(unfinished()))
            await wait_for_metric(http, "tidings_fragment_buffer_bytes", len(HEARTBEAT) + 10_000)
            ws.transport.abort()  # gone mid-message, without a close frame
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await sending
        await wait_for_metric(http, "tidings_fragment_buffer_bytes", 0)
