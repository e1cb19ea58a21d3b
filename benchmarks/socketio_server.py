"""Reference: python-socketio (ASGI) under uvicorn, rooms as channels.

Events: ``join`` (room name; acked) and ``publish`` (``{"room", "payload"}``), which emits
``broadcast`` with the payload to the room, skipping the sender.

    python benchmarks/socketio_server.py --port 4102
"""

from __future__ import annotations

import argparse
import resource
from typing import Any

import socketio
import uvicorn

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*")
app = socketio.ASGIApp(sio)


@sio.event
async def join(sid: str, room: str) -> str:
    await sio.enter_room(sid, room)
    return "ok"


@sio.event
async def publish(sid: str, data: dict[str, Any]) -> None:
    await sio.emit("broadcast", data["payload"], to=data["room"], skip_sid=sid)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4102)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        backlog=4096,
    )
