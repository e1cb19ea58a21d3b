"""Bad and hostile input against a real server process, over raw WebSocket and HTTP connections.

Every wait is bounded; the assertions are about outcomes (what was received, which close code),
never about how long something took.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode

from tests.support.server import ServerProcess
from tidings.auth.tokens import mint_token

ServerFactory = Callable[..., ServerProcess]

SECRET = "bad-input-test-secret-that-is-long-enough-for-hs256"
ROOM = "realtime:room"
WAIT = 10.0  # upper bound of every single wait


def ws_url(
    server: ServerProcess, vsn: str | None = "2.0.0", path: str = "/realtime/v1/websocket", **params: str
) -> str:
    query = dict(params)
    if vsn is not None:
        query["vsn"] = vsn
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return f"ws://127.0.0.1:{server.port}{path}" + (f"?{qs}" if qs else "")


def open_ws(url: str, **kwargs: Any) -> Any:
    """A raw client: no pings (they would count as activity), no compression, no proxy."""
    options: dict[str, Any] = {
        "ping_interval": None,
        "compression": None,
        "proxy": None,
        "max_size": None,
        "open_timeout": WAIT,
        "close_timeout": 2,
    }
    return connect(url, **(options | kwargs))


async def recv_json(ws: ClientConnection, timeout: float = WAIT) -> Any:
    data = await asyncio.wait_for(ws.recv(), timeout)
    return orjson.loads(data)


async def closed_with(ws: ClientConnection, timeout: float = WAIT) -> tuple[int | None, str | None]:
    """Read (and drop) until the server closes; the close code and reason it sent."""

    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()

    await asyncio.wait_for(drain(), timeout)
    rcvd = ws.protocol.close_rcvd
    return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)


async def heartbeat_ok(ws: ClientConnection, ref: str = "hb") -> None:
    """The connection still works: the next message is the reply to a heartbeat."""
    await ws.send(orjson.dumps([None, ref, "phoenix", "heartbeat", {}]).decode())
    assert await recv_json(ws) == [None, ref, "phoenix", "phx_reply", {"status": "ok", "response": {}}]


async def join(ws: ClientConnection, topic: str = ROOM, ref: str = "1", **payload: Any) -> Any:
    body = {"config": payload.pop("config", {}), **payload}
    await ws.send(orjson.dumps([ref, ref, topic, "phx_join", body]).decode())
    reply = await recv_json(ws)
    assert reply[1] == ref and reply[3] == "phx_reply", reply
    return reply[4]


@contextlib.asynccontextmanager
async def member(server: ServerProcess, topic: str = ROOM, **config: Any) -> AsyncIterator[ClientConnection]:
    """A v2 connection joined to ``topic``."""
    async with open_ws(ws_url(server)) as ws:
        reply = await join(ws, topic, config=config)
        assert reply["status"] == "ok", reply
        yield ws


async def refused(url: str, **kwargs: Any) -> tuple[int, Any]:
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(url, **kwargs):
            pass
    response = info.value.response
    return response.status_code, orjson.loads(response.body) if response.body else None


def bcast(ref: str, event: str, payload: Any, join_ref: str = "1", topic: str = ROOM) -> str:
    return orjson.dumps(
        [join_ref, ref, topic, "broadcast", {"type": "broadcast", "event": event, "payload": payload}]
    ).decode()


# -- malformed and unknown input ----------------------------------------------------------------------


MALFORMED_V2 = [
    "not json",
    "{",
    "",
    "[]",
    "[1,2,3]",
    '{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"x"}',
    '[null,"1","phoenix","heartbeat",[]]',
    '[null,"1",5,"heartbeat",{}]',
    '[null,"1","phoenix",null,{}]',
    '[null,true,"phoenix","heartbeat",{}]',
    '"just a string"',
    "null",
    "[" * 5000 + "]" * 5000,
]


async def test_malformed_json_and_wrong_shapes_are_dropped(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await join(ws)
        for text in MALFORMED_V2:
            await ws.send(text)
        await ws.send(
            orjson.dumps(["1", "2", ROOM, "broadcast", {"type": "broadcast", "payload": {}}]).decode()
        )
        await heartbeat_ok(ws)


async def test_malformed_v1_messages_are_dropped(server: ServerProcess) -> None:
    async with open_ws(ws_url(server, vsn="1.0.0")) as ws:
        for text in [
            '[null,null,"phoenix","heartbeat",{}]',
            '{"topic":"phoenix"}',
            '{"event":"heartbeat"}',
            "1",
        ]:
            await ws.send(text)
        await ws.send('{"event":"heartbeat","payload":{},"topic":"phoenix","ref":null,"join_ref":null}')
        assert await recv_json(ws) == {
            "topic": "phoenix",
            "event": "phx_reply",
            "payload": {"status": "ok", "response": {}},
            "ref": None,
        }


async def test_unknown_events_are_ignored(server: ServerProcess) -> None:
    async with member(server) as ws:
        await ws.send(orjson.dumps(["1", "5", ROOM, "postgres_changes", {"data": {}}]).decode())
        await ws.send(orjson.dumps(["1", "6", ROOM, "no_such_event", {}]).decode())
        await ws.send(orjson.dumps([None, "7", "phoenix", "no_such_event", {}]).decode())
        await heartbeat_ok(ws)


async def test_message_over_max_frame_size_closes_with_1009(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"MAX_FRAME_SIZE": "1024"})
    async with open_ws(ws_url(srv)) as ws:
        hb = orjson.dumps([None, "ok", "phoenix", "heartbeat", {}])
        await ws.send((hb + b" " * (1024 - len(hb))).decode())  # exactly the limit: fine
        assert (await recv_json(ws))[1] == "ok"
        await ws.send("x" * 1025)
        assert (await closed_with(ws))[0] == 1009


async def test_fragmented_message_over_max_frame_size_closes_with_1009(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"MAX_FRAME_SIZE": "1024"})
    async with open_ws(ws_url(srv)) as ws:
        await ws.send(["a" * 600, "b" * 600])
        assert (await closed_with(ws))[0] == 1009


async def test_fragmented_messages_are_assembled(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        text = orjson.dumps([None, "frag", "phoenix", "heartbeat", {}]).decode()
        await ws.send([text[:10], text[10:20], text[20:]])
        assert (await recv_json(ws))[1] == "frag"


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await heartbeat_ok(ws)
        await ws.send(b'[null,"1","phoenix","heartbeat",{"x":"\xff\xfe"}]', text=True)
        assert (await closed_with(ws))[0] == 1007


async def test_unknown_binary_kinds_are_dropped(server: ServerProcess) -> None:
    async with member(server) as ws:
        for kind in (0, 1, 2, 4, 5, 255):
            await ws.send(bytes([kind, 1, 1, 1, 1, 0, 1]) + b"1" + b"2" + b"t" + b"e" + b"{}")
        await ws.send(b"")
        await ws.send(b"\x03\x01")
        await heartbeat_ok(ws)


async def test_binary_frames_on_vsn1_are_dropped(server: ServerProcess) -> None:
    async with open_ws(ws_url(server, vsn="1.0.0")) as ws:
        await ws.send(bytes([3, 1, 1, 4, 1, 0, 1]) + b"12roome{}")
        await ws.send('{"event":"heartbeat","payload":{},"topic":"phoenix","ref":"h"}')
        assert (await recv_json(ws))["ref"] == "h"


# -- join errors, unmatched topics --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("realtime:", {"config": {}}, "TopicNameRequired: You must provide a topic name"),
        (
            ROOM,
            {"config": {"broadcast": {"replay": {"since": "x"}}}},
            "UnableToReplayMessages: Replay params are not valid",
        ),
        (
            ROOM,
            {"config": {"broadcast": {"replay": "all"}}},
            "UnableToReplayMessages: Replay params are not valid",
        ),
        ("elsewhere", {"config": {}}, "unmatched topic"),
    ],
)
async def test_invalid_join_configs_get_the_documented_error(
    server: ServerProcess, topic: str, payload: dict[str, Any], reason: str
) -> None:
    async with open_ws(ws_url(server)) as ws:
        assert await join(ws, topic, **payload) == {"status": "error", "response": {"reason": reason}}
        await heartbeat_ok(ws)


async def test_lenient_join_config_is_accepted(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        config = {"broadcast": {"self": "TRUE", "ack": 7}, "presence": "x", "private": "false"}
        reply = await join(ws, config=config)
        assert reply["status"] == "ok" and reply["response"]["postgres_changes"] == []
        assert set(reply["response"]) == {"postgres_changes", "seq", "epoch"}  # seq, epoch: Tidings'


#: Private channel ``room`` readable and writable by the authenticated role (CHANNEL_POLICY).
ROOM_POLICY = '[{"topic": "room", "read": true, "write": true}]'


async def test_join_token_errors(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"JWT_SECRET": SECRET, "CHANNEL_POLICY": ROOM_POLICY})
    apikey = mint_token(SECRET, role="anon", ttl=3600)
    async with open_ws(ws_url(srv, apikey=apikey)) as ws:
        expired = mint_token(SECRET, role="authenticated", ttl=-30)
        reply = await join(ws, ref="1", access_token=expired)
        assert reply["status"] == "error"
        assert reply["response"]["reason"] in (
            "InvalidJWTToken: Token has expired 30 seconds ago",
            "InvalidJWTToken: Token has expired 31 seconds ago",
        )
        reply = await join(ws, ref="2", access_token="garbage")
        assert reply["response"] == {"reason": "MalformedJWT: The token provided is not a valid JWT"}
        reply = await join(ws, ref="3", config={"private": True})
        assert reply["response"] == {
            "reason": "Unauthorized: You do not have permissions to read from this Channel topic: room"
        }
        user = mint_token(SECRET, role="authenticated", ttl=3600)
        assert (await join(ws, ref="4", config={"private": True}, access_token=user))["status"] == "ok"


async def test_pushes_to_topics_not_joined(server: ServerProcess) -> None:
    async with open_ws(ws_url(server)) as ws:
        await ws.send(bcast("5", "e", {}, join_ref="9", topic="realtime:nope"))
        assert await recv_json(ws) == [
            "9",
            "5",
            "realtime:nope",
            "phx_reply",
            {"status": "error", "response": {"reason": "unmatched topic"}},
        ]
        await ws.send(orjson.dumps(["9", "6", "realtime:nope", "phx_leave", {}]).decode())
        assert await recv_json(ws) == [
            "9",
            "6",
            "realtime:nope",
            "phx_reply",
            {"status": "ok", "response": {}},
        ]


# -- floods, slow consumers, silence --------------------------------------------------------------------


async def test_flood_is_rate_limited_and_others_are_still_served(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"MAX_MESSAGES_PER_SECOND": "5"})
    async with member(srv) as flooder, member(srv) as bystander:
        for i in range(30):
            await flooder.send(bcast(str(i + 10), "flood", {"i": i}))
        seen: list[Any] = []
        while True:
            msg = await recv_json(flooder)
            seen.append(msg)
            if msg[3] == "phx_close":
                break
        system = [m for m in seen if m[3] == "system"]
        assert system == [
            [
                "1",
                None,
                ROOM,
                "system",
                {
                    "extension": "system",
                    "status": "error",
                    "message": "Too many messages per second",
                    "channel": "room",
                },
            ]
        ]
        assert seen[-1] == ["1", "1", ROOM, "phx_close", {}]
        # The bystander got the flooder's allowed messages, then is served as usual.
        got: list[Any] = []
        while len(got) < 5:
            got.append(await recv_json(bystander))
        assert all(m[3] == "broadcast" for m in got)
        await heartbeat_ok(bystander)
        await bystander.send(bcast("50", "after", {"ok": True}))
        async with member(srv) as third:
            await bystander.send(bcast("51", "after", {"ok": True}))
            assert (await recv_json(third))[4]["event"] == "after"
        # The flooder's connection stays: what it sent after the shutdown is answered as unmatched.
        await flooder.send(orjson.dumps([None, "still-open", "phoenix", "heartbeat", {}]).decode())
        while (msg := await recv_json(flooder))[1] != "still-open":
            assert msg[3:] == ["phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}]


def small_buffer_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def metric(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


async def test_slow_consumer_is_closed_with_1013_and_others_keep_receiving(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(
        env={
            "MAX_UNSENT_BYTES": "65536",
            "MAX_MESSAGES_PER_SECOND": "1000000",
            "MAX_NODE_MESSAGES_PER_SECOND": "1000000",
        }
    )
    blob = "x" * 32_000
    async with (
        httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http,
        open_ws(ws_url(srv), sock=small_buffer_socket(srv.port), max_queue=1) as slow,
        member(srv) as fast,
        member(srv) as publisher,
    ):
        assert (await join(slow))["status"] == "ok"
        before = await metric(http, "tidings_slow_consumer_closes_total")
        sent = 0
        closed = False
        while sent < 600 and not closed:
            for _ in range(10):
                sent += 1
                await publisher.send(bcast(str(sent + 1), "blob", {"n": sent, "blob": blob}))
                msg = await recv_json(fast)  # lock-step: the fast reader never falls behind
                assert msg[4]["payload"]["n"] == sent
            closed = await metric(http, "tidings_slow_consumer_closes_total") > before
        assert closed, f"no slow-consumer close after {sent} messages of 32 KB"
        code, reason = await closed_with(slow)
        assert (code, reason) == (1013, "slow consumer")
        # Everyone else goes on.
        await publisher.send(bcast("after", "after", {"n": -1}))
        assert (await recv_json(fast))[4]["payload"] == {"n": -1}
        await heartbeat_ok(publisher)


async def test_silent_client_is_closed_after_two_heartbeat_intervals(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"HEARTBEAT_INTERVAL": "1s"})
    async with open_ws(ws_url(srv)) as silent, open_ws(ws_url(srv)) as talker:
        await join(silent)
        stop = asyncio.Event()

        async def keep_talking() -> int:
            n = 0
            while not stop.is_set():
                n += 1
                await heartbeat_ok(talker, str(n))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.4)
            return n

        task = asyncio.create_task(keep_talking())
        try:
            assert await closed_with(silent, timeout=20) == (1000, "heartbeat timeout")
        finally:
            stop.set()
            beats = await task
        assert beats >= 2
        await heartbeat_ok(talker, "last")


# -- connection limits, drain -------------------------------------------------------------------------


async def test_max_connections_refuses_with_503(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"MAX_CONNECTIONS": "2"})
    async with open_ws(ws_url(srv)), open_ws(ws_url(srv)) as second:
        assert await refused(ws_url(srv)) == (503, {"error": "Too many connections"})
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
            assert await metric(http, "tidings_connections_refused_total") == 1
        await second.close()
        deadline = time.monotonic() + WAIT
        while True:  # the slot frees once the server has seen the close
            try:
                async with open_ws(ws_url(srv)) as again:
                    await heartbeat_ok(again)
                break
            except InvalidStatus:
                assert time.monotonic() < deadline, "the freed slot was never reusable"
                await asyncio.sleep(0.05)


async def test_max_connections_per_user_refuses_with_429(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"JWT_SECRET": SECRET, "MAX_CONNECTIONS_PER_USER": "1"})
    key = mint_token(SECRET, role="authenticated", sub="user-1", ttl=3600)
    async with open_ws(ws_url(srv, apikey=key)):
        assert await refused(ws_url(srv, apikey=key)) == (429, {"error": "Too many connected users"})
        other = mint_token(SECRET, role="authenticated", sub="user-2", ttl=3600)
        async with open_ws(ws_url(srv, apikey=other)) as ws:
            await heartbeat_ok(ws)


async def test_sigterm_drains_with_1012_over_the_drain_window(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"DRAIN_WINDOW": "1s"})
    n = 20
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(open_ws(ws_url(srv))) for _ in range(n)]
        for ws in clients:
            await join(ws)
        arrived: list[float] = []

        async def watch(ws: ClientConnection) -> tuple[int | None, str | None]:
            result = await closed_with(ws, timeout=20)
            arrived.append(time.monotonic())
            return result

        watchers = [asyncio.create_task(watch(ws)) for ws in clients]
        await asyncio.sleep(0)
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*watchers)
    assert results == [(1012, "server restarting")] * n
    # Spread over the window, not all at once (a lower bound: a slow machine only spreads more).
    assert max(arrived) - min(arrived) >= 0.3
    assert srv.proc.wait(WAIT) in (0, -signal.SIGTERM)
    assert f"draining {n} connections over 1.0 s" in srv.logs()


# -- handshake refusals ------------------------------------------------------------------------------


async def test_bad_tokens_are_refused_with_401_and_the_spec_body(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"JWT_SECRET": SECRET})
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        None: "API key is missing",
        mint_token(SECRET, role="anon", ttl=-10): "Token has expired",
        jwt.encode(
            {"exp": time.time() + 60}, SECRET, algorithm="HS256"
        ): "Fields `role` and `exp` are required in JWT",
        "not-a-jwt": "The token provided is not a valid JWT",
        mint_token(
            "a-different-secret-also-long-enough-for-hs256!!", ttl=60
        ): "Failed to validate JWT signature",
        jwt.encode({"role": "anon", "exp": time.time() + 60}, rsa_key, "RS256"): (
            "Failed to generate JWT signer, check your JWT secret or JWKS configuration"
        ),
    }
    for token, message in cases.items():
        params = {} if token is None else {"apikey": token}
        assert await refused(ws_url(srv, **params)) == (401, {"error": message}), message
    good = mint_token(SECRET, role="anon", ttl=60)
    async with open_ws(ws_url(srv, apikey=good)) as ws:
        await heartbeat_ok(ws)
    # x-api-key takes precedence over the query parameter.
    async with open_ws(ws_url(srv, apikey="not-a-jwt"), additional_headers={"x-api-key": good}) as ws:
        await heartbeat_ok(ws)


@pytest.mark.parametrize("path", ["/", "/realtime/v1", "/realtime/v1/socket", "/api/health", "/websocketx"])
async def test_wrong_path_is_404(server: ServerProcess, path: str) -> None:
    status, body = await refused(ws_url(server, path=path))
    assert (status, body) == (404, {"error": "Not Found"})


@pytest.mark.parametrize("path", ["/realtime/v1/websocket", "/socket/websocket", "/realtime/v1/websocket/"])
async def test_both_websocket_paths(server: ServerProcess, path: str) -> None:
    async with open_ws(ws_url(server, path=path, apikey="anything", log_level="info")) as ws:
        await heartbeat_ok(ws)


@pytest.mark.parametrize("vsn", ["3.0.0", "0.1", "abc"])
async def test_unknown_vsn_is_refused(server: ServerProcess, vsn: str) -> None:
    status, body = await refused(ws_url(server, vsn=vsn))
    assert status == 400 and body == {"error": "Unsupported protocol version"}


async def test_missing_vsn_means_1_0_0(server: ServerProcess) -> None:
    async with open_ws(ws_url(server, vsn=None)) as ws:
        await ws.send('{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}')
        assert (await recv_json(ws)) == {
            "topic": "phoenix",
            "event": "phx_reply",
            "payload": {"status": "ok", "response": {}},
            "ref": "1",
        }


# -- REST ------------------------------------------------------------------------------------------


async def test_rest_batch_broadcast_202_and_delivered(server: ServerProcess) -> None:
    async with member(server) as ws, httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
        body = {"messages": [{"topic": "room", "event": "hello", "payload": {"x": 1}, "id": "rest-1"}]}
        r = await http.post("/realtime/v1/api/broadcast?apikey=k&vsn=2.0.0", json=body)
        assert (r.status_code, r.content) == (202, b"")
        msg = await recv_json(ws)
        assert msg[:4] == [None, None, ROOM, "broadcast"]
        assert msg[4]["event"] == "hello" and msg[4]["payload"] == {"x": 1}
        assert msg[4]["meta"]["id"] == "rest-1"
        r = await http.post(
            "/api/broadcast", json={"messages": [{"topic": "room", "event": "e2", "payload": {}}]}
        )
        assert r.status_code == 202
        assert (await recv_json(ws))[4]["event"] == "e2"


async def test_rest_single_broadcast_json_and_binary(server: ServerProcess) -> None:
    async with member(server) as ws, httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
        r = await http.post("/realtime/v1/api/broadcast/room/events/hi", json={"a": [1, 2]})
        assert r.status_code == 202
        msg = await recv_json(ws)
        assert msg[4]["event"] == "hi" and msg[4]["payload"] == {"a": [1, 2]}
        r = await http.post(
            "/api/broadcast/room/events/bin",
            content=b"\x00\x01\x02",
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 202
        frame = await asyncio.wait_for(ws.recv(), WAIT)
        assert isinstance(frame, bytes)
        assert frame[:5] == bytes([4, len(ROOM), 3, frame[3], 0])
        assert frame.endswith(b"\x00\x01\x02")


async def test_rest_errors(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"JWT_SECRET": SECRET, "MAX_PAYLOAD_SIZE_KB": "1"})
    good = mint_token(SECRET, role="service_role", ttl=600)
    ok_body = {"messages": [{"topic": "room", "event": "e", "payload": {}}]}
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        for headers in ({}, {"apikey": "garbage"}, {"authorization": "Bearer garbage", "apikey": good}):
            r = await http.post("/api/broadcast", json=ok_body, headers=headers)
            assert (r.status_code, r.json()) == (401, {"message": "Unauthorized"}), headers
        r = await http.post(
            "/api/broadcast/room/events/e", json={}, headers={"apikey": mint_token(SECRET, ttl=-5)}
        )
        assert (r.status_code, r.json()) == (401, {"message": "Unauthorized"})
        auth = {"authorization": f"Bearer {good}", "apikey": "garbage"}  # Bearer takes precedence
        assert (await http.post("/api/broadcast", json=ok_body, headers=auth)).status_code == 202

        r = await http.post(
            "/api/broadcast/room/events/e", content=b"hello", headers=auth | {"content-type": "text/plain"}
        )
        assert r.status_code == 415
        assert "message" in r.json()

        bad = {"messages": [{"topic": "room", "event": "e", "payload": "not an object"}]}
        r = await http.post("/api/broadcast", json=bad, headers=auth)
        assert r.status_code == 422
        assert set(r.json()) == {"errors"} and r.json()["errors"]
        for body in ({}, {"messages": "x"}, [1]):
            r = await http.post("/api/broadcast", json=body, headers=auth)
            assert r.status_code == 422 and "errors" in r.json(), body
        r = await http.post(
            "/api/broadcast", content=b"{not json", headers=auth | {"content-type": "application/json"}
        )
        assert r.status_code == 422 and "errors" in r.json()

        big = {"messages": [{"topic": "room", "event": "e", "payload": {"x": "y" * 2000}}]}
        r = await http.post("/api/broadcast", json=big, headers=auth)
        assert r.status_code == 422
        assert "Payload size exceeds tenant limit" in orjson.dumps(r.json()).decode()
        r = await http.post("/api/broadcast/room/events/e", json={"x": "y" * 2000}, headers=auth)
        assert r.status_code == 422
        assert "Payload size exceeds tenant limit" in orjson.dumps(r.json()).decode()

        r = await http.post(
            "/api/broadcast/room/events/e",
            content=b"null",
            headers=auth | {"content-type": "application/json"},
        )
        assert r.status_code == 422


async def test_rest_unauthorised_private_messages_are_skipped_with_202(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"JWT_SECRET": SECRET, "CHANNEL_POLICY": ROOM_POLICY})
    user = mint_token(SECRET, role="authenticated", ttl=600)
    anon = mint_token(SECRET, role="anon", ttl=600)
    async with (
        open_ws(ws_url(srv, apikey=user)) as ws,
        httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http,
    ):
        assert (await join(ws, config={"private": True}))["status"] == "ok"
        msgs = {"messages": [{"topic": "room", "event": "secret", "payload": {}, "private": True}]}
        r = await http.post("/api/broadcast", json=msgs, headers={"apikey": anon})
        assert r.status_code == 202
        r = await http.post(
            "/api/broadcast",
            json=msgs | {"messages": [msgs["messages"][0] | {"event": "allowed"}]},
            headers={"apikey": user},
        )
        assert r.status_code == 202
        assert (await recv_json(ws))[4]["event"] == "allowed", "the anon message was skipped"


async def test_cors(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
        r = await http.options(
            "/realtime/v1/api/broadcast",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "apikey, authorization, content-type, x-client-info",
            },
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "*"
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {"apikey", "authorization", "content-type", "x-client-info"} <= allowed
        assert "POST" in r.headers["access-control-allow-methods"]
        r = await http.post(
            "/api/broadcast",
            json={"messages": [{"topic": "room", "event": "e", "payload": {}}]},
            headers={"origin": "https://app.example"},
        )
        assert r.status_code == 202
        assert r.headers["access-control-allow-origin"] == "*"


BINARY = {"content-type": "application/octet-stream"}


async def test_rest_binary_broadcast_with_an_event_too_long_for_kind4_is_422(server: ServerProcess) -> None:
    # Kind-4 frames carry the topic and the event in at most 255 bytes each.
    event = "e" * 256
    async with member(server) as ws, httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
        r = await http.post(f"/api/broadcast/room/events/{event}", content=b"\x01", headers=BINARY)
        assert r.status_code == 422 and "errors" in r.json()
        r = await http.post("/api/broadcast/room/events/fine", content=b"\x02", headers=BINARY)
        assert r.status_code == 202
        frame = await asyncio.wait_for(ws.recv(), WAIT)
        assert isinstance(frame, bytes) and frame[:3] == bytes([4, len(ROOM), 4]) and frame.endswith(b"\x02")
        # JSON broadcasts go out as text frames; their event is held to MAX_EVENT_LENGTH (255).
        r = await http.post(f"/api/broadcast/room/events/{event}", json={"long": True})
        assert (r.status_code, r.json()) == (422, {"errors": {"event": ["should be at most 255 byte(s)"]}})
        r = await http.post(f"/api/broadcast/room/events/{event[:255]}", json={"long": True})
        assert r.status_code == 202
        assert (await recv_json(ws))[4]["event"] == event[:255]


async def test_rest_binary_broadcast_with_a_topic_too_long_for_kind4_is_422(server: ServerProcess) -> None:
    topic = "r" * 250
    async with member(server, f"realtime:{topic}") as ws, httpx.AsyncClient(base_url=server.http_url) as http:
        r = await http.post(f"/api/broadcast/{topic}/events/e", content=b"\x01", headers=BINARY)
        assert r.status_code == 422 and "errors" in r.json()
        r = await http.post(f"/api/broadcast/{topic}/events/e", json={"n": 1})
        assert r.status_code == 202
        assert (await recv_json(ws))[4]["payload"] == {"n": 1}


async def test_rest_rate_limits_answer_429(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"MAX_NODE_MESSAGES_PER_SECOND": "3"})
    one = {"topic": "room", "event": "e", "payload": {}}
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        r = await http.post("/api/broadcast", json={"messages": [one] * 1001})
        assert (r.status_code, r.json()) == (
            429,
            {"message": "Too many messages to broadcast, please reduce the batch size"},
        )
        r = await http.post("/api/broadcast", json={"messages": [one] * 4})
        assert (r.status_code, r.json()) == (429, {"message": "You have exceeded your rate limit"})
        assert (await http.post("/api/broadcast", json={"messages": [one] * 3})).status_code == 202
        statuses = []
        for _ in range(20):  # 3 per second: a quick run of requests runs out
            r = await http.post("/api/broadcast/room/events/e", json={})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.json() == {"message": "You have exceeded your rate limit"}
                break
        assert statuses[-1] == 429, statuses


async def test_frames_sent_while_a_refusal_is_delayed_are_ignored(server_factory: ServerFactory) -> None:
    # A hostile client does not wait for the 101: its frames arrive while the server holds the
    # 401 for CONNECT_ERROR_BACKOFF_MS. They must not be handled as if the upgrade was accepted.
    srv = server_factory(env={"JWT_SECRET": SECRET, "CONNECT_ERROR_BACKOFF_MS": "500ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(
            b"GET /realtime/v1/websocket?vsn=2.0.0&apikey=not-a-jwt HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.1)  # the request is being refused, slowly
        for text in (
            '{"topic":"realtime:room","event":"phx_join","payload":{"config":{}},"ref":"1","join_ref":"1"}',
            '{"topic":"realtime:room","event":"broadcast","payload":{"event":"e","payload":{}},"ref":"2"}',
            '["1","3","realtime:room","phx_join",{"config":{}}]',
        ):
            writer.write(Frame(Opcode.TEXT, text.encode()).serialize(mask=True))
        writer.write(Frame(Opcode.PING, b"ping").serialize(mask=True))  # no pong before the 101
        writer.write(Frame(Opcode.CLOSE, b"\x03\xe8").serialize(mask=True))
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert orjson.loads(body) == {"error": "The token provided is not a valid JWT"}
    logs = srv.logs()
    assert "Traceback" not in logs
    assert "MalformedWebSocketMessage" not in logs, "frames of a refused upgrade were decoded"
