"""What the server shows and to whom (issue 11, section 5): metrics, origins, open mode.

* ``/metrics``, ``/api/metrics`` and the dashboard behind ``METRICS_JWT_SECRET``; without it,
  ``/api/metrics`` never names a private channel.
* ``ALLOWED_ORIGINS``: a WebSocket upgrade from another origin gets 403, REST CORS answers only
  the allowed ones.
* Open mode (no JWT secret) listens on 127.0.0.1 unless a host is given, and says so.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import orjson
import pytest
from websockets.exceptions import InvalidStatus

from tests.server.test_bad_input import WAIT, heartbeat_ok, member, open_ws, ws_url
from tests.support.server import ServerProcess, free_port

ServerFactory = Callable[..., ServerProcess]

METRICS_SECRET = "metrics-secret-that-is-long-enough-for-hs256-tokens"
PRIVATE_TOPIC = "realtime:payroll-private-4711"
#: Open servers (no JWT secret: every client is anon) on which anon may join the private channel.
PAYROLL_POLICY = '[{"topic": "payroll-*", "roles": ["anon"]}]'


async def top_channels(client: httpx.AsyncClient, **headers: str) -> list[dict[str, Any]]:
    """``topChannels`` of /api/metrics once the private channel shows (bounded wait)."""
    deadline = time.monotonic() + WAIT
    while True:
        response = await client.get("/api/metrics", headers=headers)
        assert response.status_code == 200, response.text
        rows: list[dict[str, Any]] = response.json()["topChannels"]
        if any(r["private"] for r in rows) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)


# -- metrics ----------------------------------------------------------------------------------------


async def test_without_a_metrics_secret_private_channel_names_are_never_shown(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(env={"CHANNEL_POLICY": PAYROLL_POLICY})
    async with member(server, PRIVATE_TOPIC, private=True), member(server, "realtime:lobby"):
        async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as client:
            rows = await top_channels(client)
            raw = (await client.get("/api/metrics")).text
    assert "payroll" not in raw
    assert {"channel": "lobby", "private": False, "subscribers": 1, "messagesPerSecond": 0.0} in rows
    hidden = [r for r in rows if r["private"]]
    assert hidden == [
        {
            "channel": "1 private channel",
            "private": True,
            "hidden": True,
            "subscribers": 1,
            "messagesPerSecond": 0.0,
        }
    ]


async def test_metrics_need_the_token_when_a_secret_is_set(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"METRICS_JWT_SECRET": METRICS_SECRET, "CHANNEL_POLICY": PAYROLL_POLICY})
    token = jwt.encode({"role": "metrics"}, METRICS_SECRET, algorithm="HS256")
    forged = jwt.encode(
        {"role": "metrics"}, "another-secret-that-is-long-enough-for-hs256", algorithm="HS256"
    )
    bearer = {"Authorization": f"Bearer {token}"}
    async with member(srv, PRIVATE_TOPIC, private=True):
        async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as client:
            for path in ("/metrics", "/api/metrics", "/realtime/v1/api/metrics", "/", "/dashboard"):
                response = await client.get(path)
                assert response.status_code == 401, path
                assert "payroll" not in response.text
                assert (
                    await client.get(path, headers={"Authorization": f"Bearer {forged}"})
                ).status_code == 401
                assert (await client.get(path, headers=bearer)).status_code == 200, path
            assert (await client.get("/api/metrics")).json()["error"].startswith("Unauthorized")
            # The dashboard is opened with ?token=, which its script passes on to /api/metrics.
            assert (await client.get("/", params={"token": token})).status_code == 200
            assert (await client.get("/api/metrics", params={"token": token})).status_code == 200
            # The token holder sees the private channel by name.
            rows = await top_channels(client, **bearer)
            assert any(r["channel"] == "payroll-private-4711" and r["private"] for r in rows), rows
            text = (await client.get("/metrics", headers=bearer)).text
            assert 'tidings_http_refused_total{reason="metrics_token"} 11' in text
            # What a browser needs to start stays open: health, config, the demo, the assets.
            for path in ("/api/health", "/api/config", "/demo/orders", "/static/dashboard.js"):
                assert (await client.get(path)).status_code == 200, path


# -- origins ----------------------------------------------------------------------------------------


async def test_upgrades_from_other_origins_get_403(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"ALLOWED_ORIGINS": "https://app.example.com,https://*.tidings.test"})
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(ws_url(srv), origin="https://evil.example.net"):
            pass
    assert info.value.response.status_code == 403
    assert orjson.loads(info.value.response.body) == {"error": "Origin not allowed"}
    for origin in ("https://app.example.com", "https://eu.dash.tidings.test", None):
        async with open_ws(ws_url(srv), origin=origin) as ws:  # no Origin: not a browser
            await heartbeat_ok(ws)
    for origin in ("https://app.example.com.evil.net", "http://app.example.com", "https://tidings.test"):
        with pytest.raises(InvalidStatus):
            async with open_ws(ws_url(srv), origin=origin):
                pass
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as client:
        text = (await client.get("/metrics")).text
    assert 'tidings_http_refused_total{reason="origin"} 4' in text


async def test_rest_cors_answers_only_allowed_origins(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"ALLOWED_ORIGINS": "https://app.example.com"})
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as client:
        ok = await client.get("/api/health", headers={"Origin": "https://app.example.com"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
        other = await client.get("/api/health", headers={"Origin": "https://evil.example.net"})
        assert "access-control-allow-origin" not in other.headers
        preflight = {"Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"}
        assert (await client.options("/api/broadcast", headers=preflight)).status_code == 400
        preflight["Origin"] = "https://app.example.com"
        assert (await client.options("/api/broadcast", headers=preflight)).status_code == 200


async def test_by_default_any_origin_is_allowed(server: ServerProcess) -> None:
    async with open_ws(ws_url(server), origin="https://anywhere.example") as ws:
        await heartbeat_ok(ws)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as client:
        response = await client.get("/api/health", headers={"Origin": "https://anywhere.example"})
    assert response.headers["access-control-allow-origin"] == "*"


# -- open mode --------------------------------------------------------------------------------------


def check_config(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("HOST", "JWT_SECRET", "JWT_JWKS")}
    result = subprocess.run(
        [sys.executable, "-m", "tidings", "check-config"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("HOST "))


def test_open_mode_listens_on_loopback_unless_a_host_is_given() -> None:
    assert check_config() == "127.0.0.1"
    assert check_config(JWT_SECRET="x" * 40) == "0.0.0.0"
    assert check_config(HOST="0.0.0.0") == "0.0.0.0"


def start_without_host(log: Any) -> tuple[subprocess.Popen[bytes], int]:
    """``tidings serve`` in open mode without ``--host``, once it listens (a new port if its was taken)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "JWT_SECRET", "JWT_JWKS")}
    for _ in range(3):
        port = free_port()
        log.seek(0)
        log.truncate()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidings", "serve", "--port", str(port)],  # no --host
            env={**env, "DRAIN_WINDOW": "1s"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            with open(log.name, errors="replace") as fh:
                if "Application startup complete" in fh.read():
                    return proc, port
            time.sleep(0.05)
        proc.kill()
        proc.wait(10)
    raise AssertionError("the server did not start")


async def test_an_open_server_started_without_a_host_is_reachable_only_on_127_0_0_1() -> None:
    with tempfile.NamedTemporaryFile(prefix="tidings-open-", suffix=".log") as log:
        proc, port = start_without_host(log)
        try:
            async with httpx.AsyncClient(timeout=WAIT) as client:
                assert (await client.get(f"http://127.0.0.1:{port}/api/health")).status_code == 200
            assert proc.poll() is None  # ours answered: nobody else holds the port
            with pytest.raises(OSError):  # another local address: nothing listens there
                socket.create_connection(("127.0.0.5", port), timeout=1).close()
        finally:
            proc.terminate()
            proc.wait(20)
        with open(log.name, errors="replace") as fh:
            output = fh.read()
    assert "open mode: listening on 127.0.0.1 only" in output, output
