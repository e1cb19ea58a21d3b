"""Issue 5 item 9: realtime-js on one side and the Tidings Python SDK on the other, one channel."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.server import ServerProcess
from tidings.client import Broadcast, RealtimeClient

from .conftest import JsFactory

pytestmark = pytest.mark.clients


@pytest.mark.parametrize("sdk_vsn", ["2.0.0", "1.0.0"])
async def test_realtime_js_and_the_sdk_share_a_channel(
    shared_server: ServerProcess, js_client: JsFactory, channel_name: str, sdk_vsn: str
) -> None:
    js = await js_client(shared_server.ws_url, vsn="2.0.0", name="js")
    got: list[Broadcast] = []
    async with RealtimeClient(shared_server.ws_url, "anon-key", vsn=sdk_vsn) as sdk:
        channel = sdk.channel(channel_name, presence_key="sdk")
        channel.on_broadcast("*", got.append)
        await channel.subscribe()
        await js.subscribed(channel_name, config={"presence": {"key": "js"}}, presence=True)

        # JS -> SDK: a kind-3 binary push from realtime-js arrives with meta {id, seq}.
        assert await js.call("send", ch=channel_name, event="from-js", payload={"n": 1}) == "ok"
        async with asyncio.timeout(10):
            while not got:
                await asyncio.sleep(0.02)
        assert got[0].event == "from-js" and got[0].payload == {"n": 1}
        assert isinstance(got[0].seq, int)

        # SDK -> JS.
        receipt = await channel.send_broadcast("from-sdk", {"ok": True})
        event = await js.wait_for("broadcast", ch=channel_name)
        payload: dict[str, Any] = event["payload"]
        assert payload["event"] == "from-sdk" and payload["payload"] == {"ok": True}
        assert payload["meta"]["id"] == receipt.id  # the SDK's message id is what the server echoes

        # Presence both ways.
        await channel.track({"lang": "python"})
        assert await js.call("track", ch=channel_name, payload={"lang": "js"}) == "ok"
        await js.wait_for(
            "presence", ch=channel_name, event="sync", pred=lambda e: set(e["state"]) == {"sdk", "js"}
        )
        async with asyncio.timeout(10):
            while set(channel.presence_state()) != {"sdk", "js"}:
                await asyncio.sleep(0.02)
        assert channel.presence_state()["js"][0]["lang"] == "js"
