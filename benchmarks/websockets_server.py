"""Reference: the ``websockets`` library's asyncio server, fan-out through ``broadcast()``.

Speaks the same Phoenix subset as ``ceiling_server.py`` (join reply, heartbeat, broadcast fan-out).
This is the library as its docs suggest using it: a coroutine per connection.

    python benchmarks/websockets_server.py --port 4101
"""

from __future__ import annotations

import argparse
import resource
from typing import Any

import orjson
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

channels: dict[str, tuple[set[ServerConnection], set[ServerConnection]]] = {}  # topic -> (v1, v2)


def reply(v2: bool, join_ref: Any, ref: Any, topic: str, response: dict[str, Any]) -> str:
    body: Any = {"status": "ok", "response": response}
    msg = (
        [join_ref, ref, topic, "phx_reply", body]
        if v2
        else {"topic": topic, "event": "phx_reply", "payload": body, "ref": ref}
    )
    return orjson.dumps(msg).decode()


async def handler(ws: ServerConnection) -> None:
    v2 = "vsn=2" in ws.request.path if ws.request is not None else False
    topics: list[str] = []
    try:
        async for data in ws:
            try:
                msg = orjson.loads(data)
                if v2:
                    join_ref, ref, topic, event, payload = msg
                else:
                    join_ref, ref = msg.get("join_ref"), msg.get("ref")
                    topic, event, payload = msg["topic"], msg["event"], msg["payload"]
            except (ValueError, KeyError, TypeError):
                continue
            if event == "heartbeat":
                await ws.send(reply(v2, None, ref, topic, {}))
            elif event == "phx_join":
                channels.setdefault(topic, (set(), set()))[1 if v2 else 0].add(ws)
                topics.append(topic)
                await ws.send(reply(v2, join_ref, ref, topic, {"postgres_changes": []}))
            elif event == "broadcast" and topic in channels:
                body = {"type": "broadcast", "event": payload.get("event"), "payload": payload.get("payload")}
                s1, s2 = channels[topic]
                if s2:
                    text = orjson.dumps([None, None, topic, "broadcast", body]).decode()
                    broadcast([c for c in s2 if c is not ws], text)
                if s1:
                    text = orjson.dumps(
                        {"topic": topic, "event": "broadcast", "payload": body, "ref": None}
                    ).decode()
                    broadcast([c for c in s1 if c is not ws], text)
    finally:
        for topic in topics:
            s1, s2 = channels.get(topic, (set(), set()))
            s1.discard(ws)
            s2.discard(ws)


async def main(host: str, port: int) -> None:
    async with serve(handler, host, port, compression=None, max_size=1 << 20, backlog=4096) as server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4101)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        uvloop.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass
