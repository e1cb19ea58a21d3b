"""The HTTP API in-process: the real ASGI app and its lifespan (a real node, memory broker) driven
by Starlette's ``TestClient``, no socket. Upgrades, deadlines and body limits live in the HTTP
protocol class and are tested against a real server (``test_bad_input``, ``tests/security``)."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

with warnings.catch_warnings():  # Starlette would rather have httpx2; the httpx it has works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from tidings.auth.policy import parse_channel_policy
from tidings.auth.tokens import mint_token
from tidings.config import Config
from tidings.protocol import errors
from tidings.server.app import build_app

SECRET = "http-api-test-secret-that-is-long-enough-for-hs256"
# Minted at collection: a day outlives any run of the suite (600 s did not).
SERVICE = mint_token(SECRET, role="service_role", ttl=86_400)
USER = mint_token(SECRET, role="authenticated", sub="u1", ttl=86_400)
OTHER_USER = mint_token(SECRET, role="authenticated", sub="u2", ttl=86_400)
ANON = mint_token(SECRET, role="anon", ttl=86_400)
WAIT = 5.0


def api(config: Config | None = None) -> TestClient:
    return TestClient(build_app(config or Config(jwt_secret=SECRET)))


@pytest.fixture
def client() -> Iterator[TestClient]:
    with api() as client:
        yield client


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def messages(client: TestClient, topic: str, token: str = SERVICE, **params: Any) -> Any:
    r = client.get(f"/api/channels/{topic}/messages", params=params, headers=auth(token))
    assert r.status_code == 200, r.text
    return r.json()


def test_health_reports_the_running_node(client: TestClient) -> None:
    for prefix in ("/api", "/realtime/v1/api"):
        r = client.get(f"{prefix}/health")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ok" and body["connections"] == 0 and body["channels"] == 0
        assert body["uptime_seconds"] >= 0


def test_rest_broadcasts_are_numbered_and_kept_in_history(client: TestClient) -> None:
    batch = {
        "messages": [
            {"topic": "orders", "event": "created", "payload": {"n": 1}, "id": "order-1"},
            {"topic": "orders", "event": "created", "payload": {"n": 2}},
        ]
    }
    assert client.post("/api/broadcast", json=batch, headers=auth(SERVICE)).status_code == 202
    r = client.post(
        "/realtime/v1/api/broadcast/orders/events/raw",
        content=b"\x00\xff",
        headers=auth(SERVICE) | {"content-type": "application/octet-stream"},
    )
    assert r.status_code == 202
    got = messages(client, "orders", since_seq=0)
    assert [m["event"] for m in got["messages"]] == ["created", "created", "raw"]
    assert got["messages"][0]["payload"] == {"n": 1} and got["messages"][0]["meta"]["id"] == "order-1"
    assert got["messages"][2]["payload_base64"] == "AP8="  # raw bytes are not JSON
    seqs = [m["meta"]["seq"] for m in got["messages"]]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and got["last_seq"] == seqs[-1]
    assert not got["complete"]  # since_seq 0 predates the channel's numbering: nothing is proven
    # From a number of the current epoch the history proves it holds everything after it.
    tail = messages(client, "orders", since_seq=seqs[0], epoch=got["epoch"])
    assert [m["meta"]["seq"] for m in tail["messages"]] == seqs[1:] and tail["complete"]
    # The same sender re-sending an id is stored once.
    again = {"messages": [{"topic": "orders", "event": "created", "payload": {"n": 1}, "id": "order-1"}]}
    assert client.post("/api/broadcast", json=again, headers=auth(SERVICE)).status_code == 202
    assert messages(client, "orders", since_seq=seqs[-1])["messages"] == []


def test_tokens_and_private_channels_are_checked_through_the_node() -> None:
    policy = parse_channel_policy('[{"topic": "vault-{sub}", "read": true, "write": true}]')
    with api(Config(jwt_secret=SECRET, channel_policy=policy)) as client:
        body = {"messages": [{"topic": "vault-u1", "event": "e", "payload": {}, "private": True}]}
        assert client.post("/api/broadcast", json=body).status_code == 401
        r = client.post("/api/broadcast", json=body, headers=auth("not-a-token"))
        assert (r.status_code, r.json()) == (401, {"message": errors.HTTP_UNAUTHORIZED})
        # Only the policy's owner may write the private channel: skipped in a batch, 403 alone.
        for other in (ANON, OTHER_USER):
            assert client.post("/api/broadcast", json=body, headers=auth(other)).status_code == 202
            r = client.post("/api/broadcast/vault-u1/events/e?private=true", json={}, headers=auth(other))
            assert (r.status_code, r.json()) == (403, {"message": errors.HTTP_UNAUTHORIZED})
        assert client.post("/api/broadcast", json=body, headers=auth(USER)).status_code == 202
        # Reading it back: the join's rule, the join's reason.
        for other in (ANON, OTHER_USER):
            r = client.get("/api/channels/vault-u1/messages", params={"private": "true"}, headers=auth(other))
            reason = errors.unauthorized_read_reason("vault-u1")
            assert (r.status_code, r.json()) == (403, {"message": reason})
        got = messages(client, "vault-u1", USER, private="true", since_seq=0)
        assert len(got["messages"]) == 1  # only the owner's message was stored
        assert messages(client, "vault-u1", SERVICE, private="true", since_seq=0) == got  # service_role
        # Public and private channels of one name are separate.
        assert messages(client, "vault-u1", since_seq=0)["messages"] == []


def test_private_channels_without_a_policy_are_denied_to_all_but_service_role(client: TestClient) -> None:
    body = {"messages": [{"topic": "vault", "event": "e", "payload": {}, "private": True}]}
    for token in (ANON, USER):
        assert client.post("/api/broadcast", json=body, headers=auth(token)).status_code == 202
        r = client.get("/api/channels/vault/messages", params={"private": "true"}, headers=auth(token))
        assert r.status_code == 403
    assert messages(client, "vault", SERVICE, private="true", since_seq=0)["messages"] == []
    assert client.post("/api/broadcast", json=body, headers=auth(SERVICE)).status_code == 202
    assert len(messages(client, "vault", SERVICE, private="true", since_seq=0)["messages"]) == 1


def test_bad_requests_are_answered_with_their_field(client: TestClient) -> None:
    r = client.post("/api/broadcast", json={"messages": [{"topic": "", "event": "e"}]}, headers=auth(SERVICE))
    assert r.status_code == 422
    assert set(r.json()["errors"]) == {"messages[0].topic", "messages[0].payload"}
    r = client.get("/api/channels/x/messages", params={"since_seq": "one"}, headers=auth(SERVICE))
    assert (r.status_code, r.json()) == (422, {"errors": {"since_seq": ["must be a number"]}})
    r = client.post(
        "/api/broadcast/x/events/e", content=b"hi", headers=auth(SERVICE) | {"content-type": "text/x"}
    )
    assert r.status_code == 415


def test_a_long_poll_answers_with_the_next_broadcast(client: TestClient) -> None:
    last = messages(client, "feed", since_seq=0)["last_seq"]
    answer: list[Any] = []

    def poll() -> None:
        answer.append(messages(client, "feed", since_seq=last, timeout=WAIT))

    poller = threading.Thread(target=poll)
    poller.start()
    deadline = time.monotonic() + WAIT
    while waiting(client) == 0 and poller.is_alive():  # the poll holds the channel, nobody joined
        assert time.monotonic() < deadline, "the long-poll never started waiting"
        time.sleep(0.01)
    body = {"messages": [{"topic": "feed", "event": "tick", "payload": {"n": 7}}]}
    assert client.post("/api/broadcast", json=body, headers=auth(SERVICE)).status_code == 202
    poller.join(WAIT)
    assert not poller.is_alive()
    [got] = answer
    assert [(m["event"], m["payload"]) for m in got["messages"]] == [("tick", {"n": 7})]
    assert waiting(client) == 0


def test_a_long_poll_with_nothing_new_ends_at_its_timeout(client: TestClient) -> None:
    got = messages(client, "quiet", since_seq=0, timeout=0.2)
    assert got["messages"] == [] and waiting(client) == 0


def waiting(client: TestClient) -> int:
    count: int = client.get("/api/metrics").json()["queues"]["pollWaiters"]
    return count


def test_metrics_and_config_come_from_the_running_node(client: TestClient) -> None:
    client.post("/api/broadcast", json={"messages": [{"topic": "m", "event": "e", "payload": {}}]})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = r.text.splitlines()
    assert "tidings_internal_errors_total 0" in lines
    assert "tidings_connections 0" in lines
    snapshot = client.get("/api/metrics").json()
    assert snapshot["activeConnections"] == 0 and snapshot["node"]
    config = client.get("/api/config").json()
    assert config["node"] == snapshot["node"] and config["authRequired"] is True
    assert config["postgresChanges"] is False


def test_metrics_behind_a_token_refuse_with_the_documented_error() -> None:
    with api(Config(jwt_secret=SECRET, metrics_jwt_secret="metrics-secret-long-enough-for-hs256!")) as client:
        for path in ("/metrics", "/api/metrics"):
            r = client.get(path)
            assert (r.status_code, r.json()) == (401, {"error": errors.METRICS_TOKEN_REQUIRED}), path
        token = mint_token("metrics-secret-long-enough-for-hs256!", ttl=60)
        assert client.get("/metrics", headers=auth(token)).status_code == 200
