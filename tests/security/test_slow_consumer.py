"""The slow-consumer cap and a join's catch-up (issue 11, section 5).

Measured: MAX_UNSENT_BYTES equals the largest message (1 MB), so a well-behaved client on a
20 Mbit/s link was closed 1013 right after a replay of 25 x 900 KB. Now what a join writes for
itself (replay, presence_state, messages buffered during the join) is counted apart: live
messages may queue MAX_UNSENT_BYTES on top of what is left of it, and a client that reads none
of it for SLOW_CONSUMER_TIMEOUT is still closed 1013.

In miniature: MAX_UNSENT_BYTES 64 KB, a replay of 20 x 200 KB (4 MB), clients with a 4 KB
receive buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from tests.server.test_bad_input import (
    WAIT,
    closed_with,
    heartbeat_ok,
    metric,
    open_ws,
    recv_json,
    small_buffer_socket,
    ws_url,
)
from tests.support.server import ServerProcess

ServerFactory = Callable[..., ServerProcess]

MESSAGES = 20
BLOB = "r" * 200_000
ENV = {
    "MAX_UNSENT_BYTES": "65536",
    "SLOW_CONSUMER_TIMEOUT": "3s",
    "MAX_PAYLOAD_SIZE_KB": "300",
    "REPLAY_MAX": "25",
}


async def publish_history(http: httpx.AsyncClient) -> None:
    for n in range(MESSAGES):
        r = await http.post("/api/broadcast/big/events/blob", json={"n": n, "blob": BLOB})
        assert r.status_code == 202, r.text


def join_with_replay() -> str:
    replay = {"since": 0, "limit": MESSAGES}
    payload = {"config": {"broadcast": {"replay": replay}}}
    return orjson.dumps(["1", "1", "realtime:big", "phx_join", payload]).decode()


async def test_a_slow_but_steady_reader_gets_a_big_replay_and_stays(server_factory: ServerFactory) -> None:
    srv = server_factory(env=ENV)
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        await publish_history(http)
        async with open_ws(ws_url(srv), sock=small_buffer_socket(srv.port), max_queue=1) as slow:
            await slow.send(join_with_replay())
            reply = await recv_json(slow)
            assert reply[4]["status"] == "ok", reply
            got: list[Any] = []
            # Reads steadily at about 1 MB/s (a message each 0.2 s): slower than loopback by far,
            # and 4 MB is 60 times MAX_UNSENT_BYTES.
            while len(got) < MESSAGES:
                msg = await recv_json(slow)
                got.append(msg[4]["payload"]["n"])
                await asyncio.sleep(0.2)
            assert got == list(range(MESSAGES))
            assert await metric(http, "tidings_catchup_allowances_total") == 1  # it was over the mark
            # Live messages still arrive afterwards, and the connection is not closed.
            r = await http.post("/api/broadcast/big/events/live", json={"n": "live"})
            assert r.status_code == 202
            assert (await recv_json(slow))[4]["payload"] == {"n": "live"}
            await heartbeat_ok(slow)
        assert await metric(http, "tidings_slow_consumer_closes_total") == 0


async def test_a_client_that_never_reads_its_replay_is_closed_1013(server_factory: ServerFactory) -> None:
    srv = server_factory(env=ENV)
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        await publish_history(http)
        async with open_ws(ws_url(srv), sock=small_buffer_socket(srv.port), max_queue=1) as stalled:
            await stalled.send(join_with_replay())
            # It reads nothing: within SLOW_CONSUMER_TIMEOUT (3 s) and a sweep, it is closed.
            deadline = asyncio.get_running_loop().time() + 20
            while await metric(http, "tidings_slow_consumer_closes_total") < 1:
                assert asyncio.get_running_loop().time() < deadline, "never closed as a slow consumer"
                await asyncio.sleep(0.2)
            assert await closed_with(stalled) == (1013, "slow consumer")
        assert await metric(http, "tidings_catchup_allowances_total") == 1


async def test_live_messages_beyond_the_mark_on_top_of_a_catchup_still_close(
    server_factory: ServerFactory,
) -> None:
    # The catch-up is counted apart, not forgiven: MAX_UNSENT_BYTES of live messages on top of
    # what is left of it closes the connection at once, as before.
    srv = server_factory(env={**ENV, "SLOW_CONSUMER_TIMEOUT": "60s"})
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        await publish_history(http)
        async with open_ws(ws_url(srv), sock=small_buffer_socket(srv.port), max_queue=1) as stalled:
            await stalled.send(join_with_replay())
            deadline = asyncio.get_running_loop().time() + WAIT
            while await metric(http, "tidings_catchup_allowances_total") < 1:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
            for n in range(3):  # 3 x 200 KB > 64 KB on top
                r = await http.post("/api/broadcast/big/events/live", json={"n": n, "blob": BLOB})
                assert r.status_code == 202
            assert await closed_with(stalled) == (1013, "slow consumer")
        assert await metric(http, "tidings_slow_consumer_closes_total") == 1
