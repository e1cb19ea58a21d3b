"""Browser tests: Debian's Chromium driven by Playwright (never `playwright install`).

Each test gets a fresh browser profile (user-data-dir) and a real Tidings server subprocess.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, sync_playwright

from tests.support.postgres import postgres_fixture
from tests.support.server import ServerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Screenshots of the pages under test land here (look at them after a run).
SHOTS = Path(tempfile.gettempdir()) / "tidings-web-shots"

postgres = postgres_fixture()


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    """One Playwright driver for the session."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run scripts/install-system-deps.sh (apt chromium)")
    with sync_playwright() as p:
        yield p


@pytest.fixture
def browser(playwright: Playwright) -> Iterator[BrowserContext]:
    """Chromium with a fresh user-data-dir, closed after the test."""
    profile = tempfile.mkdtemp(prefix="tidings-chromium-")
    context = playwright.chromium.launch_persistent_context(
        profile,
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS,
        headless=True,
        viewport={"width": 1280, "height": 900},
    )
    context.set_default_timeout(15_000)
    try:
        yield context
    finally:
        context.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def tidings() -> Iterator[Callable[..., ServerProcess]]:
    """Start Tidings servers with given settings; stopped after the test."""
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        proc = ServerProcess(env=env).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def screenshot(page: Page, name: str) -> Path:
    """Save a full-page PNG under :data:`SHOTS`; returns its path."""
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
