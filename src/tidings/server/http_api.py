"""HTTP routes: REST broadcast, health and metrics, under ``/api`` and ``/realtime/v1/api``.

Not the hot path: Starlette under uvicorn, on the same port as the WebSocket endpoint.
"""

from __future__ import annotations

import base64
import time
from typing import Any
from urllib.parse import unquote

import orjson
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..auth.policy import AuthorizationUnavailable, Permissions
from ..auth.tokens import AuthError, Principal
from ..broker.base import sender_scope
from ..history import HistoryRecord, ReplayResult
from ..node import READ, WRITE, Node, group_key
from ..protocol import errors as reasons
from ..protocol.join import name_too_long
from .changes_api import changes
from .edge import origin_policy
from .metrics_http import render_prometheus
from .state import monitor_of, node_of, polls_of
from .web import metrics_refusal, web_routes

__all__ = ["QuietDisconnects", "build_routes", "cors_middleware", "quiet_disconnects"]

PREFIXES = ("/api", "/realtime/v1/api")
MAX_BATCH = 1000


def _authenticate(request: Request) -> Principal | Response:
    node = node_of(request)
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    token = token or request.headers.get("apikey") or request.query_params.get("apikey")
    try:  # open mode too: a token over MAX_TOKEN_BYTES is refused there as well
        return node.verifier.verify(token)
    except AuthError:
        return JSONResponse({"message": reasons.HTTP_UNAUTHORIZED}, status_code=401)


def _sender(request: Request, principal: Principal) -> str:
    """Who a REST publisher is, for de-duplication and history accounting (``sender_scope``)."""
    host = "" if principal.sub or request.client is None else request.client.host
    return sender_scope(principal.role, principal.sub, host)


async def _permissions(
    node: Node, request: Request, principal: Principal, sub_topic: str, kind: str
) -> Permissions:
    """What the caller may read or write on the private channel ``sub_topic``: the same checks as
    a WebSocket join, with the request's claims and every header (as Supabase's REST API).

    Raises:
        AuthorizationUnavailable: the database could not evaluate them.
    """
    context = node.access_context(principal, sub_topic, request.headers.items())
    presence = kind == WRITE  # a write check looks at both extensions, as Supabase's
    found = node.permissions_now(context, kind, presence=presence)
    if found is None:
        try:
            found = await node.permissions(context, kind, presence=presence)
        except AuthorizationUnavailable:
            node.metrics.authz_unavailable += 1
            raise
    return found


def _unavailable(exc: AuthorizationUnavailable) -> Response:
    return JSONResponse({"message": exc.reason}, status_code=503)


def _rate_limited(node: Node, count: int) -> Response | None:
    if not node.message_bucket.take(time.monotonic(), count):
        node.metrics.rate_limited += 1
        return JSONResponse({"message": "You have exceeded your rate limit"}, status_code=429)
    return None


def _name_errors(node: Node, topic: object, event: object, prefix: str = "") -> dict[str, list[str]]:
    """``{field: [message]}`` for a topic over ``MAX_TOPIC_LENGTH`` or an event over
    ``MAX_EVENT_LENGTH`` (what joins and WebSocket broadcasts are held to)."""
    found: dict[str, list[str]] = {}
    config = node.config
    for field, value, limit in (
        ("topic", topic, config.max_topic_length),
        ("event", event, config.max_event_length),
    ):
        if isinstance(value, str) and name_too_long(value, limit):
            node.metrics.names_too_long += 1
            found[prefix + field] = [f"should be at most {limit} byte(s)"]
    return found


async def broadcast_batch(request: Request) -> Response:
    """``POST /api/broadcast`` with ``{"messages": [{topic, event, payload, private?, id?}]}``."""
    node = node_of(request)
    principal = _authenticate(request)
    if isinstance(principal, Response):
        return principal
    body = await request.body()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return JSONResponse({"errors": {"body": ["is not valid JSON"]}}, status_code=422)
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        return JSONResponse({"errors": {"messages": ["can't be blank"]}}, status_code=422)
    if len(messages) > MAX_BATCH:
        return JSONResponse(
            {"message": "Too many messages to broadcast, please reduce the batch size"}, status_code=429
        )
    errors: dict[str, list[str]] = {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            errors[f"messages[{i}]"] = ["must be an object"]
            continue
        if not isinstance(m.get("topic"), str) or not m["topic"]:
            errors.setdefault(f"messages[{i}].topic", []).append("can't be blank")
        if not isinstance(m.get("event"), str) or not m["event"]:
            errors.setdefault(f"messages[{i}].event", []).append("can't be blank")
        for field, found in _name_errors(node, m.get("topic"), m.get("event"), f"messages[{i}].").items():
            errors.setdefault(field, []).extend(found)
        if not isinstance(m.get("payload"), dict):
            errors.setdefault(f"messages[{i}].payload", []).append("must be an object")
        if "id" in m and m["id"] is not None and not isinstance(m["id"], str):
            errors.setdefault(f"messages[{i}].id", []).append("must be a string")
        elif len(orjson.dumps(m.get("payload"))) > node.max_payload_bytes:
            errors.setdefault(f"messages[{i}].payload", []).append("Payload size exceeds tenant limit")
    if errors:
        return JSONResponse({"errors": errors}, status_code=422)
    limited = _rate_limited(node, len(messages))
    if limited is not None:
        return limited
    sender = _sender(request, principal)
    writable: dict[str, bool] = {}  # one check per private topic of the batch
    for m in messages:
        private = m.get("private") is True or str(m.get("private")).lower() == "true"
        if private:
            topic = m["topic"]
            allowed = writable.get(topic)
            if allowed is None:
                try:
                    allowed = (
                        await _permissions(node, request, principal, topic, WRITE)
                    ).broadcast_write is True
                except AuthorizationUnavailable:
                    allowed = False
                if not allowed:
                    node.metrics.authz_denied_writes += 1
                writable[topic] = allowed
            if not allowed:
                continue  # unauthorised topics are skipped silently (still 202), as Supabase does
        node.publish_broadcast(
            private, m["topic"], m["event"], m["payload"], m.get("id") or None, sender=sender
        )
    return Response(status_code=202)


async def broadcast_single(request: Request) -> Response:
    """``POST /api/broadcast/{subtopic}/events/{event}`` with the raw payload as the body."""
    node = node_of(request)
    principal = _authenticate(request)
    if isinstance(principal, Response):
        return principal
    sub_topic, event = request.path_params["subtopic"], request.path_params["event"]
    raw_path: bytes = request.scope.get("raw_path") or b""
    if b"%2f" in raw_path.lower():
        # Clients URL-encode each segment ('/' as %2F); split the raw path, then decode the segments.
        segments = raw_path.decode("latin-1").split("/broadcast/", 1)[-1].split("/")
        if len(segments) == 3 and segments[1] == "events":
            sub_topic, event = unquote(segments[0]), unquote(segments[2])
    too_long = _name_errors(node, sub_topic, event)
    if too_long:
        return JSONResponse({"errors": too_long}, status_code=422)
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    body = await request.body()
    if len(body) > node.max_payload_bytes:
        return JSONResponse({"errors": {"payload": ["Payload size exceeds tenant limit"]}}, status_code=422)
    payload: Any
    if content_type == "application/octet-stream":
        payload = body
        if len(f"realtime:{sub_topic}".encode()) > 255 or len(event.encode()) > 255:
            # A raw-binary broadcast goes out as a kind-4 frame: topic and event fit in 255 bytes.
            reason = "binary broadcasts need a topic and an event of at most 255 bytes"
            return JSONResponse({"errors": {"payload": [reason]}}, status_code=422)
    elif content_type == "application/json":
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return JSONResponse({"message": "Body is not valid JSON"}, status_code=422)
        if payload is None:
            return JSONResponse({"message": "Payload can't be null"}, status_code=422)
    else:
        return JSONResponse({"message": f"Unsupported content type {content_type}"}, status_code=415)
    private = request.query_params.get("private", "false").lower() == "true"
    if private:
        try:
            found = await _permissions(node, request, principal, sub_topic, WRITE)
        except AuthorizationUnavailable as exc:
            return _unavailable(exc)
        if found.broadcast_write is not True:
            node.metrics.authz_denied_writes += 1
            return JSONResponse({"message": reasons.HTTP_UNAUTHORIZED}, status_code=403)
    limited = _rate_limited(node, 1)
    if limited is not None:
        return limited
    node.publish_broadcast(private, sub_topic, event, payload, sender=_sender(request, principal))
    return Response(status_code=202)


MAX_POLL_TIMEOUT = 30.0


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(name) from None


def _history_json(records: list[HistoryRecord]) -> list[dict[str, Any]]:
    out = []
    for r in records:
        item: dict[str, Any] = {"event": r.event, "meta": {"id": r.id, "seq": r.seq}}
        if isinstance(r.payload, bytes):
            item["payload_base64"] = base64.b64encode(r.payload).decode()
        else:
            item["payload"] = r.payload
        out.append(item)
    return out


async def channel_messages(request: Request) -> Response:
    """``GET /api/channels/{subtopic}/messages?since_seq=N&epoch=E&limit=M&timeout=S[&private=true]``.

    Channel history for polling clients, authorized like a join. With ``timeout`` and nothing
    newer than ``since_seq``, waits up to ``timeout`` seconds (max 30) for the next message.
    ``complete`` is true only when history provably holds every message after ``since_seq``: of
    the channel's current ``epoch`` (returned; pass it back as ``epoch``), nothing trimmed.
    """
    node = node_of(request)
    principal = _authenticate(request)
    if isinstance(principal, Response):
        return principal
    sub_topic = request.path_params["subtopic"]
    private = request.query_params.get("private", "false").lower() == "true"
    if private:
        try:
            found = await _permissions(node, request, principal, sub_topic, READ)
        except AuthorizationUnavailable as exc:
            return _unavailable(exc)
        if found.broadcast_read is not True:
            node.metrics.authz_denied_reads += 1
            return JSONResponse({"message": reasons.unauthorized_read_reason(sub_topic)}, status_code=403)
    try:
        since_seq = _int_param(request, "since_seq")
        since_ms = _int_param(request, "since")
        limit = _int_param(request, "limit") or node.config.replay_max
        timeout = float(request.query_params.get("timeout") or 0)
    except ValueError as exc:
        return JSONResponse({"errors": {str(exc): ["must be a number"]}}, status_code=422)
    limit = max(1, min(limit, node.config.replay_max))
    timeout = max(0.0, min(timeout, MAX_POLL_TIMEOUT))
    key = group_key(private, sub_topic)
    if since_seq is None and since_ms is None:
        since_seq = 0
    epoch = request.query_params.get("epoch") or None

    async def read() -> ReplayResult:
        since_time = None if since_ms is None else since_ms / 1000.0
        return await node.broker.replay(key, since_seq, since_time, limit, epoch)

    result = await read()
    if not result.records and timeout > 0:
        await polls_of(request).wait(key, timeout)
        result = await read()
    last = result.records[-1].seq if result.records else since_seq
    return JSONResponse(
        {
            "messages": _history_json(result.records),
            "complete": result.complete,
            "last_seq": last,
            "epoch": result.epoch,
        }
    )


async def health(request: Request) -> Response:
    """``GET /api/health``: liveness plus a few gauges."""
    node = node_of(request)
    return JSONResponse(
        {
            "status": "draining" if node.draining else "ok",
            "connections": len(node.sessions),
            "channels": len(node.hub.groups),
            "uptime_seconds": round(time.time() - node.started_at, 1),
        },
        status_code=503 if node.draining else 200,
    )


async def metrics(request: Request) -> Response:
    """``GET /metrics`` in the Prometheus text format (behind ``METRICS_JWT_SECRET`` when set)."""
    refusal = metrics_refusal(request)
    if refusal is not None:
        return refusal
    text = render_prometheus(node_of(request), monitor_of(request))
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def build_routes() -> list[Route]:
    """Every HTTP route, under both prefixes the clients derive."""
    routes = [Route("/metrics", metrics, methods=["GET"])]
    for prefix in PREFIXES:
        routes += [
            Route(f"{prefix}/broadcast", broadcast_batch, methods=["POST"]),
            Route(
                f"{prefix}/broadcast/{{subtopic:path}}/events/{{event:path}}",
                broadcast_single,
                methods=["POST"],
            ),
            Route(f"{prefix}/health", health, methods=["GET"]),
            Route(f"{prefix}/channels/{{subtopic:path}}/messages", channel_messages, methods=["GET"]),
            Route(f"{prefix}/changes", changes, methods=["GET"]),
        ]
    return routes + web_routes(PREFIXES)  # dashboard, demo, /api/metrics, /api/config


def cors_middleware(allowed_origins: str = "*") -> Middleware:
    """CORS as Supabase answers it (the clients' headers) for ``ALLOWED_ORIGINS`` (default any).

    A request from another origin gets no CORS headers (the browser keeps the answer from the
    page); a preflight from one gets 400.
    """
    policy = origin_policy(allowed_origins)
    return Middleware(
        CORSMiddleware,
        allow_origins=["*"] if policy.any else sorted(policy.exact),
        allow_origin_regex=None if policy.any else policy.regex,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["apikey", "authorization", "content-type", "x-client-info", "x-api-key"],
    )


class QuietDisconnects:
    """A client that went away (or was cut at a limit or deadline) while its body was read is
    no error: nothing can be answered, and uvicorn would log a traceback for each."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            return


def quiet_disconnects() -> Middleware:
    """:class:`QuietDisconnects` for ``Starlette(middleware=[...])``."""
    return Middleware(QuietDisconnects)
