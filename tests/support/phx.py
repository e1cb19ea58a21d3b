"""A minimal Phoenix (vsn 2.0.0) client for server-level tests: join, push, collect what arrives."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

__all__ = ["PhxClient"]


class PhxClient:
    """One WebSocket connection speaking vsn 2.0.0 JSON arrays."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.refs = itertools.count(1)
        self.inbox: list[list[Any]] = []
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, http_url: str, params: str = "") -> PhxClient:
        """Connect to ``http_url``'s WebSocket endpoint."""
        url = http_url.replace("http", "ws", 1) + "/realtime/v1/websocket?vsn=2.0.0" + params
        return cls(await connect(url, open_timeout=10, max_size=None))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                if isinstance(raw, str):
                    self.inbox.append(json.loads(raw))
        except Exception:
            pass
        finally:
            if not self.closed.done():
                self.closed.set_result(self.ws.close_code)

    async def push(self, topic: str, event: str, payload: dict[str, Any], join_ref: str | None = None) -> str:
        """Send one message; returns its ref."""
        ref = str(next(self.refs))
        await self.ws.send(json.dumps([join_ref, ref, topic, event, payload]))
        return ref

    async def join(
        self, topic: str, config: dict[str, Any] | None = None, timeout: float = 10
    ) -> dict[str, Any]:
        """Join and return the reply payload (raises on an error reply)."""
        ref = str(next(self.refs))
        await self.ws.send(json.dumps([ref, ref, topic, "phx_join", {"config": config or {}}]))
        reply = await self.wait(lambda m: m[3] == "phx_reply" and m[1] == ref, timeout)
        payload: dict[str, Any] = reply[4]
        if payload["status"] != "ok":
            raise RuntimeError(f"join refused: {payload}")
        return payload

    async def wait(self, match: Any, timeout: float = 10) -> list[Any]:
        """The first message (already received or coming) for which ``match(msg)`` is true."""
        async with asyncio.timeout(timeout):
            while True:
                for msg in self.inbox:
                    if match(msg):
                        return msg
                if self.closed.done():
                    raise ConnectionError(f"closed ({self.closed.result()}) while waiting")
                await asyncio.sleep(0.01)

    def broadcasts(self, event: str | None = None) -> list[dict[str, Any]]:
        """Broadcast payloads received so far."""
        return [m[4] for m in self.inbox if m[3] == "broadcast" and (event is None or m[4]["event"] == event)]

    async def close(self) -> None:
        """Close the connection."""
        await self.ws.close()
        self._reader.cancel()
