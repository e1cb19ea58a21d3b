"""The dashboard (``/``), the order-tracking demo (``/demo/orders``), their static assets, and the
JSON they read: ``/api/metrics`` (the guide's metrics and the dashboard's series) and
``/api/config`` (what the server offers a browser, e.g. whether Postgres Changes are available).

With ``METRICS_JWT_SECRET`` set, the dashboard page and ``/api/metrics`` (like ``/metrics``) need
a JWT signed with it, as ``Authorization: Bearer <jwt>`` or ``?token=<jwt>``; the page passes its
own ``?token=`` on to ``/api/metrics``. Without the secret they are open, and ``/api/metrics``
never names a private channel: private channels are summed up in one row.

Assets are package data under ``server/static/``; nothing is fetched from a CDN. The demo's
bundle (``orders.bundle.js``, supabase-js inside) is built from ``web/`` by ``make web`` and
committed, so a fresh clone serves it without npm.
"""

from __future__ import annotations

import mimetypes
from importlib import metadata
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..protocol import errors
from .edge import bearer_token, metrics_token_valid
from .state import monitor_of, node_of

__all__ = ["STATIC_DIR", "api_config", "api_metrics", "metrics_refusal", "static_file", "web_routes"]

STATIC_DIR = Path(__file__).parent / "static"
PAGES = {"/": "dashboard.html", "/dashboard": "dashboard.html", "/demo/orders": "orders.html"}
_NO_STORE = {"Cache-Control": "no-store"}

mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("application/json", ".map")


def _assets() -> frozenset[str]:
    """The files that may be served (read once: no path from a request ever reaches the disk)."""
    if not STATIC_DIR.is_dir():
        return frozenset()
    return frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file() and not p.name.startswith("."))


_ASSETS = _assets()


def _version() -> str:
    try:
        return metadata.version("tidings")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


_TOKEN_PAGE = (
    "<!doctype html><title>Tidings dashboard</title><p>This server requires a metrics token: open "
    "this page with <code>?token=&lt;JWT signed with METRICS_JWT_SECRET&gt;</code>.</p>"
)


def metrics_refusal(request: Request, html: bool = False) -> Response | None:
    """``None`` when the caller may read the metrics, else the 401 to answer.

    Anyone may while ``METRICS_JWT_SECRET`` is unset; then only a JWT signed with it, sent as
    ``Authorization: Bearer <jwt>`` or ``?token=<jwt>``.
    """
    node = node_of(request)
    secret = node.config.metrics_jwt_secret
    if not secret:
        return None
    token = bearer_token(request.headers.get("authorization")) or request.query_params.get("token")
    if metrics_token_valid(secret, token):
        return None
    node.metrics.http_refused_metrics_token += 1
    headers = {"WWW-Authenticate": "Bearer", **_NO_STORE}
    if html:
        return Response(_TOKEN_PAGE, status_code=401, media_type="text/html", headers=headers)
    return JSONResponse({"error": errors.METRICS_TOKEN_REQUIRED}, status_code=401, headers=headers)


def _hide_private(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The busiest channels without the names of private ones: those are summed up in one row."""
    hidden = [r for r in rows if r.get("private")]
    if not hidden:
        return rows
    shown = [r for r in rows if not r.get("private")]
    rate = sum(float(r.get("messagesPerSecond") or 0) for r in hidden)
    shown.append(
        {
            "channel": f"{len(hidden)} private channel{'s' if len(hidden) > 1 else ''}",
            "private": True,
            "hidden": True,
            "subscribers": sum(int(r.get("subscribers") or 0) for r in hidden),
            "messagesPerSecond": round(rate, 2),
        }
    )
    return shown


async def page(request: Request) -> Response:
    """An HTML page (``no-cache``, so an upgrade shows at once); the dashboard may need a token."""
    name = PAGES[request.url.path.rstrip("/") or "/"]
    if name == "dashboard.html":
        refusal = metrics_refusal(request, html=True)
        if refusal is not None:
            return refusal
    return FileResponse(STATIC_DIR / name, media_type="text/html", headers={"Cache-Control": "no-cache"})


async def static_file(request: Request) -> Response:
    """``GET /static/{name}``: one of the packaged assets, or 404."""
    name = request.path_params["name"]
    if name not in _ASSETS:
        return JSONResponse({"message": "Not Found"}, status_code=404)
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"})


async def api_metrics(request: Request) -> Response:
    """``GET /api/metrics[?history=N]``: the guide's metrics as JSON, plus the dashboard's series.

    Private channel names are shown only to the holder of a metrics token.
    """
    refusal = metrics_refusal(request)
    if refusal is not None:
        return refusal
    try:
        points = int(request.query_params.get("history", "60"))
    except ValueError:
        return JSONResponse({"errors": {"history": ["must be a number"]}}, status_code=422)
    node = node_of(request)
    snapshot = monitor_of(request).snapshot(history=max(0, min(points, 600)))
    if not node.config.metrics_jwt_secret:
        snapshot["topChannels"] = _hide_private(snapshot["topChannels"])
    return JSONResponse(snapshot, headers=_NO_STORE)


async def api_config(request: Request) -> Response:
    """``GET /api/config``: what a browser page needs to know to pick its transport."""
    node = node_of(request)
    return JSONResponse(
        {
            "version": _version(),
            "node": node.node_id,
            # Postgres Changes are offered when DATABASE_URL is set and the service is attached.
            "postgresChanges": node.changes_enabled,
            "authRequired": node.verifier.enabled,
            "heartbeatIntervalMs": int(node.config.heartbeat_interval * 1000),
            "historySize": node.config.history_size,
        },
        headers=_NO_STORE,
    )


def web_routes(prefixes: tuple[str, ...] = ("/api", "/realtime/v1/api")) -> list[Route]:
    """Pages, assets and the JSON endpoints (the latter under every API prefix)."""
    routes = [Route(path, page, methods=["GET"]) for path in PAGES]
    routes.append(Route("/static/{name}", static_file, methods=["GET"]))
    for prefix in prefixes:
        routes += [
            Route(f"{prefix}/metrics", api_metrics, methods=["GET"]),
            Route(f"{prefix}/config", api_config, methods=["GET"]),
        ]
    return routes
