"""@supabase/supabase-js (createClient(url, key).channel(...)) against a real Tidings server.

supabase-js derives ``<url>/realtime/v1`` itself, passes the key as ``apikey`` and, through its
``accessToken`` callback, as the channels' ``access_token``; its REST calls go to
``<url>/realtime/v1/api/...``. The server runs with JWT_SECRET and the key is a real anon JWT.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.server import ServerProcess
from tidings.auth.tokens import mint_token

from .conftest import DriverError, JsFactory, broadcasts, rest_post

pytestmark = pytest.mark.clients

SECRET = "conformance-secret-at-least-32-bytes-long"


@pytest.fixture(scope="module")
def auth_server() -> Any:
    proc = ServerProcess(env={"JWT_SECRET": SECRET}).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def anon_key() -> str:
    return mint_token(SECRET, role="anon")


async def test_subscribe_and_broadcast(
    auth_server: ServerProcess, js_client: JsFactory, channel_name: str, anon_key: str
) -> None:
    a = await js_client(auth_server.ws_url, lib="supabase-js", apikey=anon_key, name="A")
    b = await js_client(auth_server.ws_url, lib="supabase-js", apikey=anon_key, name="B")
    await a.subscribed(channel_name, config={"broadcast": {"self": True, "ack": True}})
    await b.subscribed(channel_name)

    # The socket URL carries the key (vsn 2.0.0 by default). With no session, supabase-js resolves
    # the key as access token asynchronously on open, so the first join may go out without
    # `access_token` (the server then uses the socket's apikey) or with the key itself.
    connecting = a.find("socket", event="connecting")[0]["url"]
    assert connecting.startswith(f"{auth_server.ws_url}/websocket?apikey={anon_key}")
    assert connecting.endswith("vsn=2.0.0")
    join = next(m for m in a.text_frames("out") if m[3] == "phx_join")
    assert join[4].get("access_token", anon_key) == anon_key

    assert await a.call("send", ch=channel_name, event="hello", payload={"msg": "héllo"}) == "ok"
    mine = await a.wait_for("broadcast", ch=channel_name)
    theirs = await b.wait_for("broadcast", ch=channel_name)
    assert mine["payload"]["payload"] == theirs["payload"]["payload"] == {"msg": "héllo"}
    assert any(f["binary"] and f.get("kind") == 3 for f in a.frames("out"))

    # B has no `self`: its own broadcast reaches A only.
    assert await b.call("send", ch=channel_name, event="from-b", payload={}) == "ok"
    await a.wait_for("broadcast", ch=channel_name, pred=lambda e: e["payload"]["event"] == "from-b")
    assert await b.call("heartbeat") == "ok"
    assert [p["event"] for p in broadcasts(b, channel_name)] == ["hello"]


async def test_presence(
    auth_server: ServerProcess, js_client: JsFactory, channel_name: str, anon_key: str
) -> None:
    a = await js_client(auth_server.ws_url, lib="supabase-js", apikey=anon_key, name="A")
    b = await js_client(auth_server.ws_url, lib="supabase-js", apikey=anon_key, name="B")
    await a.subscribed(channel_name, config={"presence": {"key": "alice"}}, presence=True)
    await b.subscribed(channel_name, config={"presence": {"key": "bob"}}, presence=True)
    assert await a.call("track", ch=channel_name, payload={"name": "Alice"}) == "ok"
    assert await b.call("track", ch=channel_name, payload={"name": "Bob"}) == "ok"
    for client in (a, b):
        await client.wait_for(
            "presence", ch=channel_name, event="sync", pred=lambda e: set(e["state"]) == {"alice", "bob"}
        )
    mark = a.mark()
    assert await b.call("removeChannel", ch=channel_name) == "ok"
    await a.wait_for("presence", since=mark, ch=channel_name, event="leave", key="bob")


async def test_rest_paths(
    auth_server: ServerProcess, js_client: JsFactory, channel_name: str, anon_key: str
) -> None:
    a = await js_client(auth_server.ws_url, lib="supabase-js", apikey=anon_key, name="A")
    await a.subscribed(channel_name)
    sender = await js_client(auth_server.ws_url, lib="supabase-js", apikey=anon_key, name="sender")
    await sender.call("channel", ch=channel_name)
    # httpSend -> POST <url>/realtime/v1/api/broadcast/<sub>/events/<event> (202).
    assert await sender.call("httpSend", ch=channel_name, event="via-http", payload={"k": 1}) == {
        "success": True
    }
    # send() on a channel that is not joined falls back to POST <url>/realtime/v1/api/broadcast.
    assert await sender.call("send", ch=channel_name, event="via-fallback", payload={"k": 2}) == "ok"
    got = await a.wait_count("broadcast", 2, ch=channel_name)
    assert sorted(e["payload"]["event"] for e in got) == ["via-fallback", "via-http"]
    # A backend's REST broadcast with the key reaches the supabase-js subscriber too; without it: 401.
    body = {"messages": [{"topic": channel_name, "event": "backend", "payload": {"k": 3}}]}
    r = await rest_post(auth_server.http_url, "/realtime/v1/api/broadcast", body, token=anon_key)
    assert r.status_code == 202
    await a.wait_for("broadcast", ch=channel_name, pred=lambda e: e["payload"]["event"] == "backend")
    r = await rest_post(auth_server.http_url, "/realtime/v1/api/broadcast", body)
    assert r.status_code == 401 and r.json() == {"message": "Unauthorized"}


async def test_bad_key_refused(auth_server: ServerProcess, js_client: JsFactory, channel_name: str) -> None:
    bad_key = mint_token("another-secret-that-is-also-32-bytes!!", role="anon")
    a = await js_client(auth_server.ws_url, lib="supabase-js", apikey=bad_key, name="A")
    result = await a.subscribe(channel_name)
    assert result == {"status": "CHANNEL_ERROR", "error": "channel error: transport failure"}
    err = await a.wait_for("socket", event="error")
    assert err["message"] == "Unexpected server response: 401"
    # httpSend with the bad key is refused: the promise rejects with the server's message.
    with pytest.raises(DriverError, match="httpSend: Unauthorized$"):
        await a.call("httpSend", ch=channel_name, event="e", payload={})


async def test_opaque_publishable_key_on_open_server(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str
) -> None:
    """New-style `sb_publishable_...` keys are not JWTs; an open server (no JWT_SECRET) takes them, and
    an `access_token` starting with `sb_` means "the socket's apikey identity" (spec 7.1)."""
    key = "sb_publishable_conformance_test_key"
    a = await js_client(shared_server.ws_url, lib="supabase-js", apikey=key, name="A")
    b = await js_client(shared_server.ws_url, lib="supabase-js", apikey=key, name="B")
    await a.subscribed(channel_name, config={"broadcast": {"ack": True}})
    await b.subscribed(channel_name)
    assert await a.call("send", ch=channel_name, event="hello", payload={"k": 1}) == "ok"
    await b.wait_for("broadcast", ch=channel_name)
    assert await a.call("httpSend", ch=channel_name, event="rest", payload={"k": 2}) == {"success": True}
    await b.wait_for("broadcast", ch=channel_name, pred=lambda e: e["payload"]["event"] == "rest")
