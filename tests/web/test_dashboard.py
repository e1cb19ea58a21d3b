"""The dashboard at ``/``: it renders, its charts move under load, and it shows alerts."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.support.server import ServerProcess

from .conftest import screenshot
from .load import Load, ws_connect

WAIT_MS = 15_000


def chart_max(page: Page, chart: str) -> float:
    return float(page.get_by_test_id(f"chart-{chart}").get_attribute("data-max") or 0)


def wait_chart_above(page: Page, chart: str, value: float) -> None:
    page.wait_for_function(
        "([id, v]) => Number(document.getElementById(id).dataset.max) > v",
        arg=[f"chart-{chart}", value],
        timeout=WAIT_MS,
    )


def test_dashboard_renders_and_its_charts_move_under_load(
    tidings: Callable[..., ServerProcess], browser: BrowserContext
) -> None:
    srv = tidings()
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(srv.http_url + "/")
    expect(page).to_have_title("Tidings dashboard")
    expect(page.get_by_test_id("feed")).to_have_text("live", timeout=WAIT_MS)
    expect(page.get_by_test_id("stat-connections")).to_have_text("0")
    for chart in ("connections", "rates", "rtt", "delivery"):
        expect(page.locator(f"#chart-{chart} svg path.series").first).to_be_attached()
    idle_path = page.locator("#chart-rates path[data-key=messagesOut]").get_attribute("d")

    with Load(srv, "load:room", clients=5, rate=10) as load:
        expect(page.get_by_test_id("stat-connections")).to_have_text("5", timeout=WAIT_MS)
        wait_chart_above(page, "connections", 4)
        wait_chart_above(page, "rates", 0)
        wait_chart_above(page, "delivery", 0)
        wait_chart_above(page, "rtt", 0)  # pings to the heartbeating clients came back
        expect(page.get_by_test_id("channels")).to_contain_text("load:room", timeout=WAIT_MS)
        moving = page.locator("#chart-rates path[data-key=messagesOut]").get_attribute("d")
        assert moving and moving != idle_path
        # It keeps moving: a later frame draws a different line.
        page.wait_for_function(
            "d => document.querySelector('#chart-rates path[data-key=messagesOut]').getAttribute('d') !== d",
            arg=moving,
            timeout=WAIT_MS,
        )
        screenshot(page, "dashboard-under-load")
        assert load.received > 0
    assert not load.errors, load.errors
    # The load is gone: connections fall back to 0 on the card.
    expect(page.get_by_test_id("stat-connections")).to_have_text("0", timeout=WAIT_MS)
    assert not errors, errors


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A local HTTP endpoint collecting the JSON bodies POSTed to it."""
    received: list[dict[str, Any]] = []
    handler = type("Hook", (_Hook,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook?token=s3cr3t", received
    finally:
        server.shutdown()
        server.server_close()


def test_dashboard_shows_a_firing_alert_and_the_webhook_gets_it(
    tidings: Callable[..., ServerProcess],
    browser: BrowserContext,
    webhook: tuple[str, list[dict[str, Any]]],
) -> None:
    url, received = webhook
    srv = tidings(ALERT_FAILURE_RATE="1%", ALERT_WEBHOOK_URL=url)
    page = browser.new_page()
    page.goto(srv.http_url + "/")
    expect(page.get_by_test_id("alerts")).to_contain_text("No active alerts", timeout=WAIT_MS)
    with ws_connect(srv) as ws:
        for _ in range(30):
            ws.send("this is not a Phoenix message")  # malformed: dropped and counted as failed
        alert = page.locator("#alerts li[data-alert=failure_rate]")
        expect(alert).to_be_visible(timeout=WAIT_MS)
        expect(alert).to_contain_text("of messages failed")
    screenshot(page, "dashboard-alert")
    page.wait_for_function("() => true")  # let the webhook thread finish its POST
    deadline_ms = WAIT_MS
    while not received and deadline_ms > 0:
        page.wait_for_timeout(100)
        deadline_ms -= 100
    assert received, "the webhook got nothing"
    fired = received[0]["alerts"][0]
    assert (fired["name"], fired["state"]) == ("failure_rate", "firing")
    assert fired["value"] > fired["threshold"] == 0.01
    assert url not in srv.logs()  # the webhook URL carries a token: never logged


def test_reconnect_card_is_a_bounded_share_matching_the_json_and_the_alert(
    tidings: Callable[..., ServerProcess], browser: BrowserContext
) -> None:
    srv = tidings()
    page = browser.new_page()
    page.goto(srv.http_url + "/")
    expect(page.get_by_test_id("feed")).to_have_text("live", timeout=WAIT_MS)
    expect(page.get_by_test_id("stat-reconnect")).to_have_text("0 % · 0/0")  # 0 connections: 0
    for _ in range(2):  # 12 clients drop (no close frame), come back (reconnects), drop again
        clients = [ws_connect(srv) for _ in range(12)]
        for ws in clients:
            ws.socket.shutdown(socket.SHUT_RDWR)
            ws.socket.close()
        page.wait_for_timeout(300)
    card = page.get_by_test_id("stat-reconnect")
    expect(card).to_have_text("50 % · 12/24", timeout=WAIT_MS)  # with 0 connections left
    alert = page.locator("#alerts li[data-alert=reconnect_rate]")
    expect(alert).to_contain_text("50.0% of connections reconnected (12 of 24; > 10%)", timeout=WAIT_MS)
    with urllib.request.urlopen(srv.http_url + "/api/metrics", timeout=5) as r:
        snap = json.loads(r.read())
    assert snap["activeConnections"] == 0 and snap["reconnectRate"] == 0.5
    assert [a["value"] for a in snap["alerts"] if a["name"] == "reconnect_rate"] == [0.5]
    screenshot(page, "dashboard-reconnects")


def test_dashboard_behind_a_metrics_token_works_when_opened_with_it(
    tidings: Callable[..., ServerProcess], browser: BrowserContext
) -> None:
    secret = "dashboard-metrics-secret-long-enough-for-hs256"
    srv = tidings(METRICS_JWT_SECRET=secret)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    response = page.goto(srv.http_url + "/")
    assert response is not None and response.status == 401
    expect(page.locator("body")).to_contain_text("requires a metrics token")
    token = jwt.encode({"role": "metrics"}, secret, algorithm="HS256")
    page.goto(f"{srv.http_url}/?token={token}")
    expect(page).to_have_title("Tidings dashboard")
    expect(page.get_by_test_id("feed")).to_have_text("live", timeout=WAIT_MS)  # /api/metrics answered
    with ws_connect(srv):
        expect(page.get_by_test_id("stat-connections")).to_have_text("1", timeout=WAIT_MS)
    assert not errors, errors
