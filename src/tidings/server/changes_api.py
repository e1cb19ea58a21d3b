"""``GET /api/changes``: the change log of Postgres Changes, polled over HTTP.

For clients that cannot hold a WebSocket (a poor connection): the same log a rejoin resumes from,
authorized like a join (the token's claims pick the column privileges and the row level security
checks), one binding per request::

    GET /api/changes?schema=public&table=orders&filter=id=eq.42&since=<position>&timeout=20

Answers ``{"changes": [{"ids", "data"}], "position", "epoch", "recovered", "more"[, "reason"]}``:
the changes after ``since`` that the binding matches (oldest first, each ``data`` as a
``postgres_changes`` push has it), the position to ask from next, and whether the log proved it
held everything after ``since``. ``more``: the page ended at ``DB_REPLAY_MAX_CHANGES`` /
``DB_REPLAY_MAX_BYTES``; ask again from ``position`` at once. Without ``since`` the answer holds no
changes and gives the baseline ``position``. With ``timeout`` (seconds, at most 30) and nothing to
send, the request waits for the next matching change.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..auth.tokens import AuthError
from ..cdc.index import SubscriptionError
from ..protocol import errors as reasons
from ..protocol.positions import MAX_EPOCH_LENGTH, PositionError, ResumeRefused, parse_position
from .state import change_polls_of, node_of

__all__ = ["MAX_POLL_TIMEOUT", "changes"]

MAX_POLL_TIMEOUT = 30.0
_EVENTS = ("*", "INSERT", "UPDATE", "DELETE")


def _refused(field: str, message: str, status: int = 422) -> Response:
    return JSONResponse({"error": message, "errors": {field: [message]}}, status_code=status)


async def changes(request: Request) -> Response:
    """``GET /api/changes?schema=&table=&filter=&event=&select=&since=&epoch=&timeout=``."""
    node = node_of(request)
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    token = token or request.headers.get("apikey") or request.query_params.get("apikey")
    try:
        principal = node.verifier.verify(token)
    except AuthError:
        return JSONResponse({"message": reasons.HTTP_UNAUTHORIZED}, status_code=401)
    if not node.changes_enabled:
        return JSONResponse({"error": reasons.POSTGRES_CHANGES_UNAVAILABLE}, status_code=503)
    query = request.query_params
    binding: dict[str, Any] = {
        "event": (query.get("event") or "*").upper(),
        "schema": query.get("schema") or "public",
    }
    if binding["event"] not in _EVENTS:
        return _refused("event", "must be one of *, INSERT, UPDATE, DELETE")
    if query.get("table"):
        binding["table"] = query["table"]
    if query.get("filter"):
        binding["filter"] = query["filter"]
    if query.get("select"):
        binding["select"] = [c for c in query["select"].split(",") if c]
    since = query.get("since") or None
    try:
        since = None if since is None else parse_position(since)
    except PositionError as exc:
        return _refused("since", f"{reasons.RESUME_INVALID}: {exc}")
    epoch = query.get("epoch") or None
    if epoch is not None and len(epoch) > MAX_EPOCH_LENGTH:
        return _refused("epoch", f"must be at most {MAX_EPOCH_LENGTH} characters")
    try:
        timeout = min(max(0.0, float(query.get("timeout") or 0)), MAX_POLL_TIMEOUT)
    except ValueError:
        return _refused("timeout", "must be a number")
    if not node.join_bucket.take(time.monotonic()):  # a poll costs what a join does
        node.metrics.rate_limited += 1
        return JSONResponse({"message": "You have exceeded your rate limit"}, status_code=429)
    try:
        page = await node.poll_changes(
            binding, principal.claims, since, epoch, timeout, change_polls_of(request).stop
        )
    except SubscriptionError as exc:
        status = 503 if exc.transient else 422
        return _refused("filter" if "filter" in str(exc) else "table", str(exc), status)
    except ResumeRefused as exc:
        return _refused("since", exc.reason)
    body: dict[str, Any] = {
        "changes": [{"ids": ids, "data": data} for _, ids, data in page.items],
        "position": page.position,
        "epoch": page.epoch,
        "recovered": page.recovered,
        "more": page.truncated,
    }
    if page.reason:
        body["reason"] = page.reason
    return JSONResponse(body)
