"""The HTTP edge against hostile clients (issue 11, sections 2 and 3), in miniature.

Against a real server process over raw TCP: bodies and heads of any size (refused on their
``Content-Length`` and while they stream), keep-alive and slow-body slowloris, connections per
client address (HTTP and WebSocket, and behind a trusted proxy), anonymous connections per
address, and an open files limit that new connections run into. Limits are lowered so that
every attack stays small; every wait is bounded and the assertions are about outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

import httpx
import orjson
import pytest
from websockets.exceptions import InvalidStatus

from tests.server.test_bad_input import WAIT, heartbeat_ok, metric, open_ws, ws_url
from tests.support.server import ServerProcess, free_port
from tidings.auth.tokens import mint_token
from tidings.server.edge import AcceptErrorFilter, install_accept_error_filter

ServerFactory = Callable[..., ServerProcess]

SECRET = "http-limits-test-secret-that-is-long-enough-for-hs256"
OTHER_ADDRESS = "127.0.0.5"  # another loopback address: another client


# -- raw HTTP ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tcp(
    server: ServerProcess, source: str | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw TCP connection to ``server`` (from ``source``, a loopback address, if given)."""
    local = (source, 0) if source else None
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", server.port, local_addr=local), WAIT
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a ``Content-Length`` body: status, headers, body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), WAIT)
    return status, headers, body


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server still sends until it closes the connection (bounded wait)."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b""


def rss_kb(server: ServerProcess) -> int:
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def refused(text: str, reason: str) -> float:
    """``tidings_http_refused_total{reason=...}`` in a /metrics text."""
    prefix = f'tidings_http_refused_total{{reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"no {prefix} in /metrics")


async def metrics_text(server: ServerProcess, **headers: str) -> str:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as client:
        response = await client.get("/metrics", headers=headers)
        assert response.status_code == 200, response.text
        return response.text


def post_head(path: str, length: int | None, extra: str = "") -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}{extra}\r\n"
    ).encode()


BROADCAST_ROUTES = ("/api/broadcast", "/realtime/v1/api/broadcast", "/api/broadcast/room/events/e")


# -- bodies -----------------------------------------------------------------------------------------


async def test_a_huge_content_length_is_refused_before_a_byte_of_the_body(server: ServerProcess) -> None:
    before = rss_kb(server)
    for path in BROADCAST_ROUTES:
        async with tcp(server) as (reader, writer):
            writer.write(post_head(path, 1_500_000_000))  # the head only: the body never comes
            status, headers, body = await read_response(reader)
            assert status == 413, (path, status, body)
            assert headers["content-type"] == "application/json"
            assert "too large" in orjson.loads(body)["error"]
            assert await closed_by_server(reader) == b""
    assert rss_kb(server) - before < 20_000  # nothing of the claimed 1.5 GB was held
    assert refused(await metrics_text(server), "body_too_large") == len(BROADCAST_ROUTES)


async def test_a_chunked_body_is_refused_as_it_passes_the_limit(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"MAX_REQUEST_BODY": "70000", "MAX_PAYLOAD_SIZE_KB": "1"})
    chunk = b"x" * 10_000
    async with tcp(srv) as (reader, writer):
        writer.write(post_head("/api/broadcast", None))
        for _ in range(20):  # 200 KB in all, more than the limit; the server answers at 70 KB
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, _, body = await read_response(reader)
        assert status == 413, body
        assert await closed_by_server(reader) == b""
    assert refused(await metrics_text(srv), "body_too_large") == 1
    # An honest chunked broadcast under the limit still goes through.
    message = orjson.dumps({"messages": [{"topic": "room", "event": "e", "payload": {"n": 1}}]})
    async with tcp(srv) as (reader, writer):
        writer.write(post_head("/api/broadcast", None))
        half = len(message) // 2
        for part in (message[:half], message[half:]):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        writer.write(b"0\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 202, body


def test_the_body_limit_cannot_be_set_below_the_largest_rest_broadcast() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tidings", "check-config"],
        env={**os.environ, "MAX_REQUEST_BODY": "100000"},  # MAX_PAYLOAD_SIZE_KB is 1000 by default
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "MAX_REQUEST_BODY" in result.stderr and "MAX_PAYLOAD_SIZE_KB" in result.stderr


# -- heads ------------------------------------------------------------------------------------------


async def test_a_huge_header_gets_431_and_memory_does_not_grow(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"MAX_REQUEST_HEAD": "8192"})
    before = rss_kb(srv)
    piece = b"a" * 65_536
    async with tcp(srv) as (reader, writer):
        writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        answer = asyncio.ensure_future(read_response(reader))
        for _ in range(64):  # up to 4 MB of one header, until the server answers
            if answer.done():
                break
            writer.write(piece)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.sleep(0.01)
        status, _, body = await answer
        assert status == 431, body
    assert rss_kb(srv) - before < 20_000
    # A complete head over the limit, in one write, is refused as well; so is a WebSocket upgrade.
    for target in ("/api/health", "/realtime/v1/websocket?vsn=2.0.0"):
        async with tcp(srv) as (reader, writer):
            upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n" if "websocket" in target else ""
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: x\r\n{upgrade}X-Big: {'b' * 20_000}\r\n\r\n".encode()
            )
            status, _, body = await read_response(reader)
            assert status == 431, (target, body)
    text = await metrics_text(srv)
    assert refused(text, "head_too_large") == 3
    # An honest request is untouched.
    async with tcp(srv) as (reader, writer):
        writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"c" * 4000 + b"\r\n\r\n")
        assert (await read_response(reader))[0] == 200


async def test_a_long_url_gets_414(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"MAX_REQUEST_URL": "1024"})
    for target in ("/api/health?pad=" + "p" * 5000, "/realtime/v1/websocket?vsn=2.0.0&pad=" + "p" * 5000):
        async with tcp(srv) as (reader, writer):
            upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n".encode())
            status, _, body = await read_response(reader)
            assert status == 414, (target[:40], body)
    # A URL that is still arriving is refused too, once it passes the limit.
    async with tcp(srv) as (reader, writer):
        writer.write(b"GET /api/health?pad=" + b"q" * 3000)
        status, _, _ = await read_response(reader)
        assert status == 414
    assert refused(await metrics_text(srv), "url_too_long") == 3


# -- deadlines --------------------------------------------------------------------------------------


async def test_the_second_request_head_of_a_keep_alive_connection_has_a_deadline(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(env={"REQUEST_HEAD_TIMEOUT": "1s"})
    async with tcp(srv) as (reader, writer):
        writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200  # kept alive
        head = b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"d" * 200 + b"\r\n\r\n"
        eof = asyncio.ensure_future(closed_by_server(reader))
        sent = 0
        while sent < len(head) and not eof.done():  # one byte every 0.1 s: 25 s for the head
            writer.write(head[sent : sent + 1])
            sent += 1
            await asyncio.sleep(0.1)
        assert await eof == b""  # closed without an answer
        assert sent < len(head)
    assert refused(await metrics_text(srv), "head_timeout") == 1


async def test_a_slow_body_is_cut_at_its_deadline_without_a_traceback(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"JWT_SECRET": SECRET, "REQUEST_BODY_TIMEOUT": "1s"})
    anon = mint_token(SECRET, role="anon")
    for _ in range(3):
        async with tcp(srv) as (reader, writer):
            writer.write(post_head("/api/broadcast", 1_000_000, f"apikey: {anon}\r\n"))
            answer = asyncio.ensure_future(read_response(reader))
            sent = 0
            while not answer.done() and sent < 250:  # one byte every 0.1 s
                writer.write(b"{")
                sent += 1
                await asyncio.sleep(0.1)
            status, _, body = await answer
            assert status == 408, body
            assert await closed_by_server(reader) == b""
            assert sent < 250
    assert refused(await metrics_text(srv), "body_timeout") == 3
    logs = srv.logs()
    assert "Traceback" not in logs and "Exception in ASGI application" not in logs, logs[-3000:]
    lines = [line for line in logs.splitlines() if "408 Request body" in line]
    assert 1 <= len(lines) <= 2, lines  # one short line, throttled
    assert all(len(line) < 300 for line in lines)


async def test_a_request_answered_in_time_is_not_cut(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"REQUEST_HEAD_TIMEOUT": "1s", "REQUEST_BODY_TIMEOUT": "1s"})
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as client:
        for n in range(3):  # keep-alive: the same connection, each request in time
            body = {"messages": [{"topic": "room", "event": "e", "payload": {"n": n}}]}
            assert (await client.post("/api/broadcast", json=body)).status_code == 202
            await asyncio.sleep(0.6)  # less than the deadline between requests
        # A long-poll waits longer than the head deadline: the deadline waits for the answer.
        poll = await client.get("/api/channels/quiet/messages", params={"since_seq": 0, "timeout": 2})
        assert poll.status_code == 200


# -- connections per address ------------------------------------------------------------------------


async def test_connections_per_address_are_capped(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"MAX_CONNECTIONS_PER_IP": "5", "TRUSTED_PROXIES": ""})
    async with contextlib.AsyncExitStack() as stack:
        idle = [await stack.enter_async_context(tcp(srv)) for _ in range(3)]  # idle keep-alive sockets
        sockets = [await stack.enter_async_context(open_ws(ws_url(srv))) for _ in range(2)]
        # The sixth connection from 127.0.0.1 is refused, HTTP or WebSocket alike.
        async with tcp(srv) as (reader, writer):
            writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = await read_response(reader)
            assert status == 429 and orjson.loads(body) == {"error": "Too many connections from this address"}
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(ws_url(srv)):
                pass
        assert info.value.response.status_code == 429
        # Another address is not affected, and the open connections still work.
        async with tcp(srv, OTHER_ADDRESS) as (reader, writer):
            writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader))[0] == 200
        async with open_ws(ws_url(srv), local_addr=(OTHER_ADDRESS, 0)) as ws:
            await heartbeat_ok(ws)
        for ws in sockets:
            await heartbeat_ok(ws)
        # One closes: there is room again.
        _, writer = idle[0]
        writer.close()
        for _ in range(50):
            async with tcp(srv) as (reader, writer):
                writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
                if (await read_response(reader))[0] == 200:
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the address never got its connection back")
    text = await metrics_text(srv)
    assert refused(text, "per_ip") >= 2


async def test_behind_a_trusted_proxy_upgrades_count_for_the_forwarded_client(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(env={"MAX_CONNECTIONS_PER_IP": "2", "TRUSTED_PROXIES": "127.0.0.1"})
    client_a = {"X-Forwarded-For": "198.51.100.7, 203.0.113.7"}  # the proxy appended 203.0.113.7
    async with contextlib.AsyncExitStack() as stack:
        # The proxy's own connections are not capped.
        for _ in range(4):
            await stack.enter_async_context(tcp(srv))
        for _ in range(2):
            await stack.enter_async_context(open_ws(ws_url(srv), additional_headers=client_a))
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(ws_url(srv), additional_headers=client_a):
                pass
        assert info.value.response.status_code == 429
        client_b = {"X-Forwarded-For": "198.51.100.7, 203.0.113.8"}  # same spoofed part, other client
        async with open_ws(ws_url(srv), additional_headers=client_b) as ws:
            await heartbeat_ok(ws)
    assert refused(await metrics_text(srv), "per_ip") == 1


async def test_anonymous_connections_are_capped_per_address(server_factory: ServerFactory) -> None:
    srv = server_factory(
        env={"JWT_SECRET": SECRET, "MAX_ANONYMOUS_CONNECTIONS_PER_IP": "3", "TRUSTED_PROXIES": ""}
    )
    anon = mint_token(SECRET, role="anon")
    user = mint_token(SECRET, role="authenticated", sub="user-1")
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            await stack.enter_async_context(open_ws(ws_url(srv, apikey=anon)))
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(ws_url(srv, apikey=anon)):
                pass
        assert info.value.response.status_code == 429
        assert orjson.loads(info.value.response.body) == {
            "error": "Too many anonymous connections from this address"
        }
        # A token with a `sub` counts per user instead; another address has its own anonymous slots.
        async with open_ws(ws_url(srv, apikey=user)) as ws:
            await heartbeat_ok(ws)
        async with open_ws(ws_url(srv, apikey=anon), local_addr=(OTHER_ADDRESS, 0)) as ws:
            await heartbeat_ok(ws)
    # The slots are given back when the connections close.
    for _ in range(50):
        try:
            async with open_ws(ws_url(srv, apikey=anon)) as ws:
                await heartbeat_ok(ws)
                break
        except InvalidStatus:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the anonymous slots were not given back")
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as client:
        assert await metric(client, "tidings_connections_refused_total") >= 1
    assert refused(await metrics_text(srv), "anonymous_per_ip") == 1


# -- open files -------------------------------------------------------------------------------------


def _low_files_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))


async def test_running_out_of_open_files_is_logged_and_counted() -> None:
    port = free_port()
    log_path = f"/tmp/tidings-fd-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidings", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "LOG_LEVEL": "info", "DRAIN_WINDOW": "1s"},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_low_files_limit,
        )
    srv = ServerProcess(port=port)
    srv.proc = proc
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        held: list[socket.socket] = []
        try:
            for _ in range(200):  # more than the limit of 160: the last ones are dropped
                try:
                    held.append(socket.create_connection(("127.0.0.1", port), timeout=1))
                except OSError:
                    break
            for _ in range(100):  # until the server has accepted what it can
                with open(log_path, errors="replace") as fh:
                    if "near the open files limit" in fh.read():
                        break
                await asyncio.sleep(0.1)
        finally:
            for s in held:
                s.close()
        for _ in range(100):
            try:
                text = await metrics_text(srv)
                break
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the server did not recover")
        name = "tidings_connections_near_fd_limit_total "
        near = [line for line in text.splitlines() if line.startswith(name)]
        assert near and float(near[0].split()[1]) >= 1
        with open(log_path, errors="replace") as fh:
            logs = fh.read()
        lines = [line for line in logs.splitlines() if "near the open files limit" in line]
        assert 1 <= len(lines) <= 2, logs[-2000:]
    finally:
        proc.terminate()
        proc.wait(20)
        os.unlink(log_path)


def test_a_failed_accept_on_the_asyncio_loop_is_one_short_throttled_line() -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    install_accept_error_filter()
    install_accept_error_filter()  # once only
    loop = asyncio.new_event_loop()
    try:
        error = OSError(errno.EMFILE, "Too many open files")
        for _ in range(5):  # what asyncio's _accept_connection reports on EMFILE
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": error}
            )
    finally:
        loop.close()
        logger.removeHandler(handler)
        for f in [f for f in logger.filters if isinstance(f, AcceptErrorFilter)]:
            logger.removeFilter(f)
    assert len(records) == 1
    line = records[0].getMessage()
    assert "Too many open files" in line and "open files limit" in line and "\n" not in line
    assert records[0].exc_info is None and records[0].levelno == logging.WARNING
