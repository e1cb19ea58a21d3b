"""The order-tracking demo at ``/demo/orders`` (supabase-js in headless Chromium)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import psycopg2
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.support.postgres import PostgresServer
from tests.support.proxy import ThreadedProxy
from tests.support.server import ServerProcess

from .conftest import screenshot

WAIT_MS = 15_000


def set_status(http_url: str, order: str, status: str) -> None:
    """Change an order's status the way the demo's buttons do: a REST broadcast."""
    message = {"topic": f"order:{order}", "event": "status", "payload": {"order_id": order, "status": status}}
    r = httpx.post(f"{http_url}/api/broadcast", json={"messages": [message]}, timeout=10)
    assert r.status_code == 202, r.text


def open_order(browser: BrowserContext, base_url: str, order: str) -> Page:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{base_url}/demo/orders?order={order}")
    expect(page.get_by_test_id("transport")).to_have_attribute("data-mode", "websocket", timeout=WAIT_MS)
    assert not errors, errors
    return page


def test_an_order_change_shows_within_a_second(
    tidings: Callable[..., ServerProcess], browser: BrowserContext
) -> None:
    srv = tidings()
    watcher = open_order(browser, srv.http_url, "A1")
    status = watcher.get_by_test_id("status")
    set_status(srv.http_url, "A1", "shipped")
    expect(status).to_have_text("shipped", timeout=1_000)
    expect(watcher.locator("#log li").first).to_have_attribute("data-source", "websocket")
    # The page's own control, from a second window: the first one follows.
    clicker = open_order(browser, srv.http_url, "A1")
    expect(clicker.get_by_test_id("status")).to_have_text("shipped")  # current status from history
    clicker.locator("#controls button[data-status=delivered]").click()
    expect(status).to_have_text("delivered", timeout=1_000)
    expect(watcher.get_by_test_id("quality")).to_have_attribute(
        "data-quality", "excellent", timeout=WAIT_MS
    )  # loopback heartbeats are well under 100 ms
    screenshot(watcher, "orders-live")


@pytest.fixture
def proxied(tidings: Callable[..., ServerProcess]) -> Iterator[tuple[ServerProcess, ThreadedProxy]]:
    srv = tidings()
    proxy = ThreadedProxy(srv.port).start()
    try:
        yield srv, proxy
    finally:
        proxy.stop()


def test_cutting_the_websocket_falls_back_to_polling_and_recovers(
    proxied: tuple[ServerProcess, ThreadedProxy], browser: BrowserContext
) -> None:
    srv, proxy = proxied
    page = open_order(browser, proxy.http_url, "B2")
    transport = page.get_by_test_id("transport")
    status = page.get_by_test_id("status")
    set_status(srv.http_url, "B2", "confirmed")
    expect(status).to_have_text("confirmed", timeout=WAIT_MS)

    proxy.cut_websockets()
    expect(transport).to_have_attribute("data-mode", "polling", timeout=WAIT_MS)
    expect(page.get_by_test_id("banner")).to_be_visible()
    set_status(srv.http_url, "B2", "preparing")
    expect(status).to_have_text("preparing", timeout=WAIT_MS)
    expect(page.locator("#log li").first).to_have_attribute("data-source", "polling")
    screenshot(page, "orders-polling")
    waited_ms = 0
    while proxy.upgrades_refused < 1:  # supabase-js keeps trying the WebSocket meanwhile
        assert waited_ms < WAIT_MS, "supabase-js never retried the WebSocket"
        page.wait_for_timeout(200)
        waited_ms += 200
    expect(transport).to_have_attribute("data-mode", "polling")

    proxy.restore()
    expect(transport).to_have_attribute("data-mode", "websocket", timeout=30_000)
    expect(page.get_by_test_id("banner")).to_be_hidden()
    set_status(srv.http_url, "B2", "shipped")
    expect(status).to_have_text("shipped", timeout=WAIT_MS)
    expect(page.locator("#log li").first).to_have_attribute("data-source", "websocket")
    # Each status was shown once, in order: nothing lost or repeated across the switches.
    shown = page.locator("#log li").all_inner_texts()
    assert [line.split("status: ")[1].split()[0] for line in reversed(shown)] == [
        "confirmed",
        "preparing",
        "shipped",
    ]


def test_a_poor_connection_polls_as_well_and_applies_each_update_once(
    proxied: tuple[ServerProcess, ThreadedProxy], browser: BrowserContext
) -> None:
    srv, proxy = proxied
    proxy.ws_delay = 0.2  # each way: heartbeat round trips of 400 ms and more
    page = open_order(browser, proxy.http_url, "C3")
    quality = page.get_by_test_id("quality")
    expect(quality).to_have_attribute("data-quality", "poor", timeout=WAIT_MS)  # first heartbeat: 5 s
    expect(page.get_by_test_id("transport")).to_have_attribute("data-mode", "websocket+polling")
    expect(page.get_by_test_id("banner")).to_contain_text("degraded")
    set_status(srv.http_url, "C3", "confirmed")
    expect(page.get_by_test_id("status")).to_have_text("confirmed", timeout=WAIT_MS)
    page.wait_for_timeout(1_000)  # the slower path delivers too, and is ignored
    assert page.locator("#log li").count() == 1
    screenshot(page, "orders-poor")


@pytest.mark.postgres
def test_postgres_changes_drive_the_page_when_the_server_has_a_database(
    tidings: Callable[..., ServerProcess], browser: BrowserContext, postgres: PostgresServer
) -> None:
    dsn = postgres.create_database()
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL)")
        cur.execute("INSERT INTO orders VALUES (3003, 'pending')")
    srv = tidings(DATABASE_URL=dsn, DB_SLOT="tidings_web_test", DB_RESUME_GRACE="0")
    assert httpx.get(f"{srv.http_url}/api/config").json()["postgresChanges"] is True
    page = open_order(browser, srv.http_url, "3003")
    expect(page.get_by_test_id("transport")).to_contain_text("Postgres Changes")
    status = page.get_by_test_id("status")
    deadline_ms = WAIT_MS
    # The subscription goes live once the stream runs: update until the page has seen it.
    conn = psycopg2.connect(dsn)
    conn.autocommit = True  # outside `with conn`, which would wrap every UPDATE in one transaction
    try:
        with conn.cursor() as cur:
            while True:
                cur.execute("UPDATE orders SET status = 'shipped' WHERE id = 3003")
                try:
                    expect(status).to_have_text("shipped", timeout=1_000)
                    break
                except AssertionError:
                    deadline_ms -= 1_000
                    state = page.evaluate("JSON.stringify(window.tidingsDemo.state)")
                    assert deadline_ms > 0, f"no Postgres change reached the page: {state}\n{srv.logs()}"
    finally:
        conn.close()
    expect(page.locator("#log li").first).to_have_attribute("data-source", "postgres")
    screenshot(page, "orders-postgres")


@pytest.mark.postgres
def test_postgres_changes_recover_after_a_cut(
    tidings: Callable[..., ServerProcess], browser: BrowserContext, postgres: PostgresServer
) -> None:
    """The page is cut off (WebSocket and HTTP) while the order's row is updated twice. When the
    network is back, supabase-js rejoins with the position the page kept in the channel config
    (``postgres_changes_options.resume``): the page shows both updates once, in order, and says
    "recovered"."""
    dsn = postgres.create_database()
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL)")
        cur.execute("INSERT INTO orders VALUES (4004, 'pending')")
    srv = tidings(DATABASE_URL=dsn, DB_SLOT="tidings_web_recovery", DB_RESUME_GRACE="0")
    proxy = ThreadedProxy(srv.port).start()
    conn = psycopg2.connect(dsn)
    conn.autocommit = True

    def update(status: str) -> None:
        with conn.cursor() as cur:
            cur.execute("UPDATE orders SET status = %s WHERE id = 4004", (status,))

    try:
        page = open_order(browser, proxy.http_url, "4004")
        expect(page.get_by_test_id("transport")).to_contain_text("Postgres Changes")
        # The first join's baseline (its position) is in the config the rejoin sends.
        page.wait_for_function("window.tidingsDemo.resume.since", timeout=WAIT_MS)
        status = page.get_by_test_id("status")
        update("confirmed")
        expect(status).to_have_text("confirmed", timeout=WAIT_MS)
        proxy.go_offline()
        expect(page.get_by_test_id("transport")).to_have_attribute("data-mode", "polling", timeout=WAIT_MS)
        update("preparing")
        update("shipped")
        proxy.go_online()
        expect(status).to_have_text("shipped", timeout=30_000)
        expect(page.get_by_test_id("transport")).to_have_attribute("data-mode", "websocket", timeout=30_000)
        recovery = page.get_by_test_id("recovery")
        expect(recovery).to_have_attribute("data-recovery", "recovered", timeout=WAIT_MS)
        expect(recovery).to_contain_text("recovered")
        update("delivered")
        expect(status).to_have_text("delivered", timeout=WAIT_MS)
        shown = page.locator("#log li").all_inner_texts()
        statuses = [line.split("status: ")[1].split()[0] for line in reversed(shown) if "status: " in line]
        assert statuses == ["confirmed", "preparing", "shipped", "delivered"], shown
        screenshot(page, "orders-recovered")
    finally:
        conn.close()
        proxy.stop()
