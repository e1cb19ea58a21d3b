"""URLs and the small amount of HTTP the client needs (history polling, metrics reports).

Requests go through the standard library (``urllib``) in a worker thread, so the SDK needs no
HTTP dependency.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.client
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import orjson

from .errors import HistoryError

__all__ = [
    "ChangesPage",
    "HistoryClient",
    "HistoryPage",
    "build_socket_url",
    "derive_http_base",
    "request_json",
]


def _ws_scheme(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"realtime URL must be ws://, wss://, http:// or https://, not {url!r}")
    return parts._replace(scheme=scheme)


def build_socket_url(url: str, apikey: str | None, vsn: str, params: Mapping[str, str] | None = None) -> str:
    """The WebSocket URL for ``url``, Supabase style.

    ``ws://host:4000/realtime/v1`` becomes ``ws://host:4000/realtime/v1/websocket?apikey=...&vsn=2.0.0``;
    ``http(s)`` is turned into ``ws(s)``; a URL already ending in ``/websocket`` keeps its path.

    Args:
        url: the realtime URL.
        apikey: API key sent as the ``apikey`` query parameter (omitted when ``None``).
        vsn: serializer version.
        params: extra query parameters, placed first.
    """
    parts = _ws_scheme(url)
    path = parts.path.rstrip("/")
    if not path.endswith("/websocket"):
        path += "/websocket"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query += list((params or {}).items())
    query = [(k, v) for k, v in query if k not in ("apikey", "vsn")]
    if apikey is not None:
        query.append(("apikey", apikey))
    query.append(("vsn", vsn))
    return urllib.parse.urlunsplit(parts._replace(path=path, query=urllib.parse.urlencode(query)))


def derive_http_base(url: str) -> str:
    """The HTTP API base of a realtime URL: ``ws`` -> ``http``, query and ``/websocket`` dropped.

    ``ws://h:4000/realtime/v1`` -> ``http://h:4000/realtime/v1``; ``wss://h/socket/websocket`` -> ``https://h``.
    """
    parts = _ws_scheme(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    path = parts.path.rstrip("/").removesuffix("/websocket").removesuffix("/socket").rstrip("/")
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def _blocking_request(
    method: str, url: str, headers: Mapping[str, str], data: bytes | None, timeout: float
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read() or b"")


async def request_json(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: Any = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """One HTTP request with an optional JSON body; returns the status and the decoded JSON (or ``None``).

    Raises:
        OSError: when the server cannot be reached (``urllib.error.URLError`` is one).
    """
    all_headers = {"Accept": "application/json", **(headers or {})}
    data = None
    if body is not None:
        data = orjson.dumps(body)
        all_headers["Content-Type"] = "application/json"
    try:
        status, raw = await asyncio.to_thread(_blocking_request, method, url, all_headers, data, timeout)
    except http.client.HTTPException as exc:
        # A malformed or cut response is as much a network failure as a refused connection.
        raise OSError(f"bad HTTP response: {exc!r}") from exc
    try:
        decoded = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        decoded = None
    return status, decoded


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryPage:
    """One answer of the history endpoint."""

    messages: list[dict[str, Any]]
    """``{"event", "payload", "meta": {"id", "seq"}}`` entries, oldest first."""
    complete: bool
    """False when history cannot prove it holds everything after ``since_seq``."""
    epoch: str | None = None
    """The channel's current epoch (Tidings servers; ``None`` when the server sends none)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChangesPage:
    """One answer of ``GET /api/changes`` (Tidings' change log of Postgres Changes)."""

    changes: list[dict[str, Any]]
    """``{"ids", "data"}`` entries, oldest first (``data`` as in a ``postgres_changes`` push)."""
    position: str
    """Where the next page starts: every change up to it that matches was in this one."""
    epoch: str | None
    recovered: bool
    """False when the log could not prove it held every change after ``since``."""
    more: bool
    """The page ended at the server's limits: ask again from :attr:`position` at once."""
    reason: str = ""


class HistoryClient:
    """``GET {base}/api/channels/{sub_topic}/messages?since_seq=N&limit=M``.

    Args:
        base: HTTP API base (see :func:`derive_http_base`).
        apikey: sent as the ``apikey`` header.
        timeout: request timeout.
    """

    def __init__(self, base: str, apikey: str, timeout: float = 10.0) -> None:
        self.base = base.rstrip("/")
        self.apikey = apikey
        self.access_token: str | None = None
        """Bearer token (the user JWT); the API key when ``None``."""
        self.timeout = timeout

    def url(
        self, sub_topic: str, since_seq: int, limit: int, private: bool = False, epoch: str | None = None
    ) -> str:
        """The request URL."""
        topic = urllib.parse.quote(sub_topic, safe="")
        params: dict[str, Any] = {"since_seq": since_seq, "limit": limit}
        if epoch is not None:
            params["epoch"] = epoch
        if private:
            params["private"] = "true"
        return f"{self.base}/api/channels/{topic}/messages?{urllib.parse.urlencode(params)}"

    async def fetch(
        self, sub_topic: str, since_seq: int, limit: int, private: bool = False, epoch: str | None = None
    ) -> HistoryPage:
        """Messages with ``seq > since_seq``, at most ``limit`` (the server may clamp it).

        ``epoch``: the channel epoch ``since_seq`` belongs to (from the join reply), so the server
        can tell a ``since_seq`` of a lost history from a current one.

        A raw-binary message (``payload_base64``) comes back with ``bytes`` as its ``payload``.

        Raises:
            HistoryError: when the endpoint is unreachable or answers anything but a valid page.
        """
        headers = {"apikey": self.apikey, "Authorization": f"Bearer {self.access_token or self.apikey}"}
        try:
            status, body = await request_json(
                "GET",
                self.url(sub_topic, since_seq, limit, private, epoch),
                headers=headers,
                timeout=self.timeout,
            )
        except OSError as exc:
            raise HistoryError(f"history request failed: {exc}") from exc
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise HistoryError(f"history endpoint answered HTTP {status}")
        messages = []
        for entry in body["messages"]:
            if not isinstance(entry, dict):
                continue
            encoded = entry.get("payload_base64")
            if isinstance(encoded, str) and "payload" not in entry:
                try:
                    entry = dict(entry, payload=base64.b64decode(encoded))
                except ValueError:
                    continue
            messages.append(entry)
        epoch = body.get("epoch")
        return HistoryPage(
            messages=messages,
            complete=bool(body.get("complete", True)),
            epoch=epoch if isinstance(epoch, str) else None,
        )

    def changes_url(self, binding: Mapping[str, Any], since: str | None, epoch: str | None = None) -> str:
        """The ``GET /api/changes`` URL for one binding (``event``, ``schema``, ``table``, ``filter``)."""
        params: dict[str, Any] = {k: v for k, v in binding.items() if isinstance(v, str)}
        if since is not None:
            params["since"] = since
        if epoch is not None:
            params["epoch"] = epoch
        return f"{self.base}/api/changes?{urllib.parse.urlencode(params)}"

    async def fetch_changes(
        self, binding: Mapping[str, Any], since: str | None, epoch: str | None = None
    ) -> ChangesPage:
        """The changes after ``since`` that ``binding`` matches, from the server's change log.

        Raises:
            HistoryError: when the endpoint is unreachable or answers anything but a valid page.
        """
        headers = {"apikey": self.apikey, "Authorization": f"Bearer {self.access_token or self.apikey}"}
        try:
            status, body = await request_json(
                "GET", self.changes_url(binding, since, epoch), headers=headers, timeout=self.timeout
            )
        except OSError as exc:
            raise HistoryError(f"changes request failed: {exc}") from exc
        if (
            status != 200
            or not isinstance(body, dict)
            or not isinstance(body.get("changes"), list)
            or not isinstance(body.get("position"), str)
        ):
            raise HistoryError(f"changes endpoint answered HTTP {status}")
        changes = [c for c in body["changes"] if isinstance(c, dict) and isinstance(c.get("data"), dict)]
        epoch = body.get("epoch")
        reason = body.get("reason")
        return ChangesPage(
            changes=changes,
            position=body["position"],
            epoch=epoch if isinstance(epoch, str) and epoch else None,
            recovered=body.get("recovered") is True,
            more=body.get("more") is True,
            reason=reason if isinstance(reason, str) else "",
        )
