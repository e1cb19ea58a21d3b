"""Load for the dashboard tests: a few WebSocket clients that join and heartbeat, and REST broadcasts."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.support.server import ServerProcess

__all__ = ["Load", "ws_connect"]


def ws_connect(srv: ServerProcess) -> ClientConnection:
    """A vsn 1.0.0 WebSocket to ``srv`` (websockets answers the server's pings by itself)."""
    return connect(f"{srv.ws_url}/websocket?vsn=1.0.0", open_timeout=10)


class Load:
    """``clients`` WebSocket clients joined to ``topic`` (heartbeat every 0.25 s, reading all they get)
    and one REST publisher sending ``rate`` broadcasts a second to the same topic."""

    def __init__(self, srv: ServerProcess, topic: str, clients: int = 5, rate: float = 10.0) -> None:
        self.srv = srv
        self.topic = topic
        self.clients = clients
        self.rate = rate
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.received = 0
        self.errors: list[BaseException] = []

    def __enter__(self) -> Load:
        for i in range(self.clients):
            self.threads.append(threading.Thread(target=self._client, args=(i,), daemon=True))
        self.threads.append(threading.Thread(target=self._publisher, daemon=True))
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(10)

    def _client(self, n: int) -> None:
        try:
            with ws_connect(self.srv) as ws:
                join = {"config": {"broadcast": {"self": False}}}
                ws.send(
                    json.dumps(
                        {"topic": f"realtime:{self.topic}", "event": "phx_join", "payload": join, "ref": "1"}
                    )
                )
                ref = 1
                next_beat = time.monotonic()
                while not self.stop_event.is_set():
                    now = time.monotonic()
                    if now >= next_beat:
                        ref += 1
                        beat = {"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": str(ref)}
                        ws.send(json.dumps(beat))
                        next_beat = now + 0.25
                    with contextlib.suppress(TimeoutError):
                        ws.recv(timeout=max(0.01, next_beat - time.monotonic()))
                        self.received += 1
        except ConnectionClosed:
            pass
        except BaseException as exc:  # surfaced by the test through .errors
            self.errors.append(exc)

    def _publisher(self) -> None:
        try:
            with httpx.Client(base_url=self.srv.http_url, timeout=10) as http:
                n = 0
                while not self.stop_event.wait(1.0 / self.rate):
                    n += 1
                    message = {"topic": self.topic, "event": "tick", "payload": {"n": n}}
                    http.post("/api/broadcast", json={"messages": [message]}).raise_for_status()
        except BaseException as exc:
            self.errors.append(exc)
