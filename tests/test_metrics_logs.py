"""Logs: JSON or plain lines with structured fields, the level from config, and no secret ever logged."""

from __future__ import annotations

import io
import json
import logging
import secrets
import time
from collections.abc import Iterator

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.support.server import ServerProcess
from tidings.logs import REDACTED, redact, secrets_of, setup_logging


@pytest.fixture
def root_logger() -> Iterator[None]:
    """setup_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def token(secret: str, **claims: object) -> str:
    body = {"role": "authenticated", "sub": "user-1", "exp": int(time.time()) + 600, **claims}
    return jwt.encode(body, secret, algorithm="HS256")


def test_json_lines_carry_fields_and_redact_tokens_and_registered_secrets(root_logger: None) -> None:
    stream = io.StringIO()
    setup_logging("debug", "json", stream=stream)
    secret = "registered-" + secrets.token_hex(8)
    redact(secret)
    jwt_text = token("whatever-" + "x" * 32)
    log = logging.getLogger("tidings.test")
    log.info("token %s and secret %s", jwt_text, secret, extra={"fields": {"who": jwt_text, "n": 3}})
    try:
        raise ValueError(f"bad {jwt_text} / {secret}")
    except ValueError:
        log.exception("failed")
    log.debug("debug is on")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["level"] for e in lines] == ["info", "error", "debug"]
    first = lines[0]
    assert first["logger"] == "tidings.test"
    assert first["msg"] == f"token {REDACTED} and secret {REDACTED}"
    assert (first["who"], first["n"]) == (REDACTED, 3)
    assert "ValueError" in lines[1]["exc"] and REDACTED in lines[1]["exc"]
    text = stream.getvalue()
    assert jwt_text not in text and secret not in text


def test_plain_lines_append_fields_and_honour_the_level(root_logger: None) -> None:
    stream = io.StringIO()
    setup_logging("warning", "plain", stream=stream)
    log = logging.getLogger("tidings.test")
    log.info("hidden")
    log.warning("alert firing", extra={"fields": {"alert": "queue_backlog", "value": 51}})
    [line] = stream.getvalue().splitlines()
    assert line.endswith("WARNING tidings.test: alert firing alert=queue_backlog value=51")


def test_secrets_of_settings() -> None:
    assert secrets_of(None, "", "plain-secret") == ["plain-secret"]
    assert secrets_of("postgresql://app:pa55word@db/app?sslmode=require") == ["pa55word"]
    hook = "https://hooks.example/services/T000/B000/XYZ?token=abcdefgh"
    assert hook in secrets_of(hook) and "token=abcdefgh" in secrets_of(hook)


def test_no_secret_or_token_is_ever_logged_by_the_server() -> None:
    secret = "jwt-secret-" + secrets.token_hex(16)
    hook_token = "hooktoken" + secrets.token_hex(8)
    good = token(secret)
    other = token(secret, sub="user-2")
    forged = token("not-the-secret-" + "y" * 32)
    expired = token(secret, exp=int(time.time()) - 60)
    srv = ServerProcess(
        env={
            "JWT_SECRET": secret,
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "json",
            "ALERT_FAILURE_RATE": "1%",
            "ALERT_WEBHOOK_URL": f"http://127.0.0.1:1/hooks/{hook_token}",
            "DRAIN_WINDOW": "0",
        }
    ).start()
    try:
        base = f"{srv.ws_url}/websocket?vsn=1.0.0&apikey="
        for bad in (forged, expired, "not-a-jwt"):
            with pytest.raises(InvalidStatus):
                connect(base + bad, open_timeout=10).close()
        with connect(base + good, open_timeout=10) as ws:

            def push(topic: str, event: str, payload: dict[str, object], ref: str) -> None:
                ws.send(json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref}))

            push("realtime:room", "phx_join", {"config": {}, "access_token": other}, "1")
            push("realtime:forged", "phx_join", {"config": {}, "access_token": forged}, "2")
            push(f"realtime:leak-{good}", "phx_join", {"config": {}}, "3")
            push(f"realtime:leak-{good}", f"odd-{good}", {}, "4")  # logged at debug: "ignoring event"
            push("realtime:room", "access_token", {"access_token": forged}, "5")
            for _ in range(25):
                ws.send(f"not json {good}")  # malformed: logged, counted, alert fires, webhook fails
            with httpx.Client(base_url=srv.http_url, timeout=10) as http:
                message = {"messages": [{"topic": "room", "event": "e", "payload": {}}]}
                for key, status in ((good, 202), (forged, 401)):
                    r = http.post("/api/broadcast", json=message, headers={"apikey": key})
                    assert r.status_code == status
                bearer = {"Authorization": f"Bearer {forged}"}
                assert http.get("/api/channels/room/messages", headers=bearer).status_code == 401
            deadline = time.monotonic() + 15
            while "alert webhook failed" not in srv.logs():
                assert time.monotonic() < deadline, srv.logs()
                time.sleep(0.1)
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(timeout=5)
                    if srv.proc is not None and srv.proc.poll() is None:
                        srv.stop()  # SIGTERM: the drain closes us (1012) and logs it
    finally:
        srv.stop()
    logs = srv.logs()
    for needle in (secret, good, other, forged, expired, hook_token):
        assert needle not in logs, f"leaked {needle[:12]}...:\n{logs}"
    entries = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    messages = "\n".join(e["msg"] for e in entries)
    # The paths that could leak did run (and were redacted), at debug level too.
    assert "refusing WebSocket upgrade" in messages
    assert "join realtime:forged refused" in messages
    assert "MalformedWebSocketMessage" in messages
    assert f"ignoring event '{REDACTED}'" in messages or f"odd-{REDACTED}" in messages
    assert "alert firing: failure_rate" in messages
    assert {e["level"] for e in entries} >= {"debug", "info", "warning"}
