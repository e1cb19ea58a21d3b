"""A tiny Phoenix / Tidings server for the client's protocol tests.

Speaks both serializers, replies to heartbeats (or not, on demand), joins with replay by
``since_seq``, broadcasts with ``meta: {id, seq}``, presence, postgres_changes pushes, and the HTTP
history endpoint, all on one loopback port. Parsing reuses :mod:`tidings.protocol`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import itertools
import urllib.parse
import uuid
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tidings.protocol.codec import Outbound, Serializer, decode_binary, decode_text, parse_vsn
from tidings.protocol.join import JoinError, parse_join
from tidings.protocol.presence import PresenceState, RefMaker


def strip_ws_header(frame: bytes) -> bytes:
    """Payload of one unmasked server WebSocket frame built by tidings.protocol.frames."""
    n = frame[1] & 0x7F
    return frame[2 + {126: 2, 127: 8}.get(n, 0) :]


def kind4(topic: str, event: str, payload: Any, meta: dict[str, Any] | None) -> bytes:
    """A kind-4 user broadcast with a JSON payload (encoding 1)."""
    t, e = topic.encode(), event.encode()
    m = orjson.dumps(meta) if meta else b""
    return bytes((4, len(t), len(e), len(m), 1)) + t + e + m + orjson.dumps(payload)


def kind3_metadata(data: bytes) -> dict[str, Any]:
    """The metadata object of a kind-3 frame (the server codec keeps only ``persist`` of it)."""
    start = 7 + sum(data[1:5])
    raw = data[start : start + data[5]]
    meta = orjson.loads(raw) if raw else {}
    return meta if isinstance(meta, dict) else {}


@dataclasses.dataclass
class Sub:
    conn: Conn
    join_ref: str | None
    topic: str
    self_: bool
    ack: bool


class Conn:
    def __init__(self, server: FakeServer, ws: ServerConnection, serializer: Serializer) -> None:
        self.server = server
        self.ws = ws
        self.serializer = serializer
        self.joined: dict[str, Sub] = {}
        self.heartbeats = 0

    async def send_msg(
        self, join_ref: str | None, ref: str | None, topic: str, event: str, payload: Any
    ) -> None:
        if self.serializer is Serializer.V2:
            data = orjson.dumps([join_ref, ref, topic, event, payload]).decode()
        else:
            data = orjson.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref}).decode()
        try:
            await self.ws.send(data)
        except ConnectionClosed:
            pass

    async def reply(
        self, join_ref: str | None, ref: str | None, topic: str, status: str, response: Any
    ) -> None:
        await self.send_msg(join_ref, ref, topic, "phx_reply", {"status": status, "response": response})

    async def send_broadcast(self, sub: Sub, payload: dict[str, Any], binary: bool) -> None:
        if self.serializer is Serializer.V2 and isinstance(payload.get("payload"), bytes):
            data: str | bytes = strip_ws_header(Outbound(sub.topic, "broadcast", payload).frame_v2())
        elif self.serializer is Serializer.V2 and binary:
            data = kind4(sub.topic, payload["event"], payload["payload"], payload.get("meta"))
        elif isinstance(payload.get("payload"), bytes):
            return  # not representable in v1
        elif self.serializer is Serializer.V2:
            data = orjson.dumps([None, None, sub.topic, "broadcast", payload]).decode()
        else:
            data = orjson.dumps(
                {"topic": sub.topic, "event": "broadcast", "payload": payload, "ref": None}
            ).decode()
        try:
            await self.ws.send(data)
        except ConnectionClosed:
            pass


class FakeServer:
    """Run with ``async with FakeServer() as server:``; ``server.url`` is the realtime URL."""

    def __init__(self) -> None:
        self.port = 0
        self._server: Server | None = None
        self.conns: list[Conn] = []
        self.joins: list[tuple[str, dict[str, Any]]] = []
        self.received: list[tuple[str, str, dict[str, Any], bool]] = []  # topic, event, payload, binary
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.seqs: dict[str, int] = {}
        self.history_requests: list[tuple[str, dict[str, str], Headers]] = []
        self.presence: dict[str, PresenceState] = {}
        self.refs = RefMaker(b"fake")
        self.connects = 0
        # Behaviour knobs
        self.reply_heartbeats = True
        self.heartbeat_delay = 0.0
        self.accept_websocket = True
        self.serve_history = True
        self.history_floor = 0  # messages with seq <= floor are "expired"
        self.recovered: bool | None = None  # force the join reply's "recovered"
        self.ack_status = "ok"
        self.join_error: str | None = None
        self.skip_fanout_seqs: set[int] = set()
        self.binary_broadcasts = False
        self.pg_ids = itertools.count(1000)
        self._presence_keys: dict[tuple[int, str], str] = {}

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/realtime/v1"

    async def start(self) -> None:
        self._server = await serve(
            self._handler, "127.0.0.1", self.port, process_request=self._process_request
        )
        self.port = self._server.sockets[0].getsockname()[1]  # type: ignore[index]

    async def stop(self) -> None:
        """Stop listening and drop every connection (no close handshake wait)."""
        if self._server is not None:
            self._server.close(close_connections=False)
            for conn in list(self.conns):
                conn.ws.transport.abort()
            await self._server.wait_closed()
            self._server = None
        self.conns.clear()

    async def close_all(self, code: int = 1012) -> None:
        for conn in list(self.conns):
            await conn.ws.close(code, "restart")

    async def __aenter__(self) -> FakeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -------------------------------------------------------------- HTTP

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parsed = urllib.parse.urlsplit(request.path)
        path = parsed.path.removeprefix("/realtime/v1")
        if path.startswith("/api/channels/") and path.endswith("/messages"):
            sub = urllib.parse.unquote(path[len("/api/channels/") : -len("/messages")])
            query = dict(urllib.parse.parse_qsl(parsed.query))
            self.history_requests.append((sub, query, request.headers))
            if not self.serve_history:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "down\n")
            since = int(query.get("since_seq", "0"))
            limit = int(query.get("limit", "100"))
            kept = [m for m in self.history.get(sub, []) if m["meta"]["seq"] > self.history_floor]
            messages = [m for m in kept if m["meta"]["seq"] > since][:limit]
            complete = since >= self.history_floor
            body = orjson.dumps({"messages": messages, "complete": complete}).decode()
            response = connection.respond(http.HTTPStatus.OK, body)
            response.headers["Content-Type"] = "application/json"
            return response
        if not self.accept_websocket:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "unavailable\n")
        return None

    # -------------------------------------------------------------- WebSocket

    async def _handler(self, ws: ServerConnection) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(ws.request.path).query))  # type: ignore[union-attr]
        serializer = parse_vsn(query.get("vsn"))
        assert serializer is not None
        conn = Conn(self, ws, serializer)
        self.conns.append(conn)
        self.connects += 1
        try:
            async for data in ws:
                if isinstance(data, bytes):
                    msg = decode_binary(data)
                    binary = True
                    meta = kind3_metadata(data)
                    if "id" in meta:
                        msg.payload["id"] = meta["id"]  # what Tidings echoes back in meta
                else:
                    msg = decode_text(data, serializer)
                    binary = False
                await self._on_message(conn, msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload, binary)
        except ConnectionClosed:
            pass
        finally:
            if conn in self.conns:
                self.conns.remove(conn)
            for topic in list(conn.joined):
                await self._leave(conn, topic)

    async def _on_message(
        self,
        conn: Conn,
        join_ref: str | None,
        ref: str | None,
        topic: str,
        event: str,
        payload: dict[str, Any],
        binary: bool,
    ) -> None:
        self.received.append((topic, event, payload, binary))
        if topic == "phoenix" and event == "heartbeat":
            conn.heartbeats += 1
            if self.reply_heartbeats:
                if self.heartbeat_delay:
                    await asyncio.sleep(self.heartbeat_delay)
                await conn.reply(None, ref, "phoenix", "ok", {})
            return
        if event == "phx_join":
            await self._join(conn, join_ref, ref, topic, payload)
            return
        sub = conn.joined.get(topic)
        if sub is None:
            await conn.reply(join_ref, ref, topic, "error", {"reason": "unmatched topic"})
            return
        if event == "broadcast":
            sub_topic = topic.removeprefix("realtime:")
            meta_id = payload.get("id")
            await self.publish(
                sub_topic, payload["event"], payload["payload"], message_id=meta_id, sender=conn
            )
            if sub.ack:
                response = {} if self.ack_status == "ok" else {"reason": "nope"}
                await conn.reply(join_ref, ref, topic, self.ack_status, response)
        elif event == "presence":
            state = self.presence.setdefault(topic, PresenceState(self.refs))
            kind = str(payload.get("event", "")).lower()
            key = self._presence_keys.get((id(conn), topic), "anon")
            diff = (
                state.track(id(conn), key, payload.get("payload") or {})
                if kind == "track"
                else state.untrack(id(conn))
            )
            await conn.reply(join_ref, ref, topic, "ok", {})
            if diff is not None:
                await self.push_all(topic, "presence_diff", diff)
        elif event == "phx_leave":
            await conn.reply(join_ref, ref, topic, "ok", {})
            await conn.send_msg(join_ref, join_ref, topic, "phx_close", {})
            await self._leave(conn, topic)

    async def _join(
        self, conn: Conn, join_ref: str | None, ref: str | None, topic: str, payload: dict[str, Any]
    ) -> None:
        self.joins.append((topic, payload))
        if self.join_error is not None:
            await conn.reply(join_ref, ref, topic, "error", {"reason": self.join_error})
            return
        try:
            config = parse_join(topic, payload)
        except JoinError as exc:
            await conn.reply(join_ref, ref, topic, "error", {"reason": exc.reason})
            return
        conn.joined[topic] = Sub(conn, join_ref, topic, config.broadcast_self, config.broadcast_ack)
        self._presence_keys[(id(conn), topic)] = config.presence_key or str(uuid.uuid4())
        response: dict[str, Any] = {
            "postgres_changes": [dict(b, id=next(self.pg_ids)) for b in config.postgres_changes]
        }
        replay: list[dict[str, Any]] = []
        if config.replay is not None and config.replay.since_seq is not None:
            since = config.replay.since_seq
            kept = [
                m for m in self.history.get(config.sub_topic, []) if m["meta"]["seq"] > self.history_floor
            ]
            replay = [m for m in kept if m["meta"]["seq"] > since][: config.replay.limit]
            response["recovered"] = since >= self.history_floor if self.recovered is None else self.recovered
        await conn.reply(join_ref, ref, topic, "ok", response)
        for m in replay:
            body = {
                "type": "broadcast",
                "event": m["event"],
                "payload": m["payload"],
                "meta": dict(m["meta"], replayed=True),
            }
            await conn.send_msg(join_ref, None, topic, "broadcast", body)
        if config.presence_enabled:
            state = self.presence.setdefault(topic, PresenceState(self.refs))
            await conn.send_msg(join_ref, None, topic, "presence_state", state.state())

    async def _leave(self, conn: Conn, topic: str) -> None:
        conn.joined.pop(topic, None)
        state = self.presence.get(topic)
        if state is not None:
            diff = state.untrack(id(conn))
            if diff is not None:
                await self.push_all(topic, "presence_diff", diff)

    # -------------------------------------------------------------- server-side actions

    async def publish(
        self,
        sub_topic: str,
        event: str,
        payload: Any,
        *,
        message_id: str | None = None,
        sender: Conn | None = None,
    ) -> dict[str, Any]:
        """Assign the next seq, keep it in history and fan it out; returns the meta."""
        seq = self.seqs.get(sub_topic, 0) + 1
        self.seqs[sub_topic] = seq
        meta = {"id": message_id or str(uuid.uuid4()), "seq": seq}
        if not isinstance(payload, bytes):
            self.history.setdefault(sub_topic, []).append({"event": event, "payload": payload, "meta": meta})
        if seq in self.skip_fanout_seqs:
            return meta
        topic = f"realtime:{sub_topic}"
        body = {"type": "broadcast", "event": event, "payload": payload, "meta": meta}
        for conn in list(self.conns):
            sub = conn.joined.get(topic)
            if sub is None or (conn is sender and not sub.self_):
                continue
            await conn.send_broadcast(sub, body, self.binary_broadcasts)
        return meta

    async def push_all(self, topic: str, event: str, payload: dict[str, Any]) -> None:
        for conn in list(self.conns):
            if topic in conn.joined:
                await conn.send_msg(None, None, topic, event, payload)

    async def send_raw(self, data: str | bytes) -> None:
        for conn in list(self.conns):
            await conn.ws.send(data)

    def events(self, event: str) -> list[tuple[str, str, dict[str, Any], bool]]:
        return [r for r in self.received if r[1] == event]
