"""Conformance harness: the OFFICIAL clients driven against a real Tidings server.

* :class:`JsClient` runs ``tests/js/driver.mjs`` under node: realtime-js (or supabase-js) with a
  tapped ``ws`` transport. Commands go in as JSON lines; everything the client shows (subscribe
  statuses, broadcasts, presence, system events, heartbeat callbacks) and every WebSocket frame
  comes back as JSON lines, kept in :attr:`Recorder.events`.
* :class:`PyClient` wraps realtime-py's ``AsyncRealtimeClient`` in this event loop and records the
  same kinds of events, plus every raw frame and every frame realtime-py rejected (it logs and
  drops those; see spec section 9), from its debug log.

Every wait is bounded; a failed wait raises with the tail of the transcript.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import ServerProcess

JS_DIR = Path(__file__).resolve().parents[1] / "js"
DRIVER = JS_DIR / "driver.mjs"
Pred = Callable[[dict[str, Any]], bool]


# -- npm dependencies ----------------------------------------------------------------------------


def _js_deps_present() -> bool:
    return all(
        (JS_DIR / "node_modules" / name / "package.json").is_file()
        for name in ("@supabase/realtime-js", "@supabase/supabase-js", "ws")
    )


@pytest.fixture(scope="session")
def js_deps() -> Path:
    """``tests/js/node_modules``, installed from the lock file when missing (never skipped)."""
    if not _js_deps_present():
        npm = shutil.which("npm")
        assert npm, (
            "npm is needed for the client conformance tests (scripts/install-system-deps.sh installs it)"
        )
        cmd = [npm, "ci" if (JS_DIR / "package-lock.json").is_file() else "install"]
        subprocess.run(
            [*cmd, "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS_DIR, check=True, timeout=300
        )
    assert _js_deps_present(), "npm install did not provide the JS clients"
    return JS_DIR


# -- event recording -----------------------------------------------------------------------------


class Recorder:
    """A list of event dicts (each with a ``t`` type) that tests wait on."""

    name = "client"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def record(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._changed.set()

    def mark(self) -> int:
        """A position in :attr:`events`; pass it as ``since`` to look only at what follows."""
        return len(self.events)

    def find(self, t: str, pred: Pred | None = None, since: int = 0, **match: Any) -> list[dict[str, Any]]:
        """Events of type ``t`` (from ``since`` on) whose fields equal ``match`` and satisfy ``pred``."""
        return [
            e
            for e in self.events[since:]
            if e.get("t") == t and all(e.get(k) == v for k, v in match.items()) and (pred is None or pred(e))
        ]

    async def wait_for(
        self, t: str, pred: Pred | None = None, since: int = 0, timeout: float = 10.0, **match: Any
    ) -> dict[str, Any]:
        """The first matching event, waiting at most ``timeout`` seconds for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = self.find(t, pred, since, **match)
            if found:
                return found[0]
            left = deadline - loop.time()
            if left <= 0 or self.dead():
                raise AssertionError(
                    f"{self.name}: no {t!r} event matching {match or ''}{' + predicate' if pred else ''} "
                    f"within {timeout}s\n{self.transcript()}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def wait_count(
        self,
        t: str,
        count: int,
        pred: Pred | None = None,
        since: int = 0,
        timeout: float = 10.0,
        **match: Any,
    ) -> list[dict[str, Any]]:
        """Wait until at least ``count`` matching events were recorded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = self.find(t, pred, since, **match)
            if len(found) >= count:
                return found
            if loop.time() >= deadline or self.dead():
                raise AssertionError(
                    f"{self.name}: {len(found)}/{count} {t!r} events matching {match or ''} "
                    f"within {timeout}s\n{self.transcript()}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)

    def dead(self) -> bool:
        return False

    def transcript(self, last: int = 60) -> str:
        lines = [json.dumps(e)[:400] for e in self.events[-last:]]
        return f"--- last {len(lines)} events of {self.name} ---\n" + "\n".join(lines)


def broadcast_event(e: dict[str, Any]) -> str | None:
    """The user event name of a recorded ``broadcast`` event (JS and Python shapes)."""
    payload = e.get("payload") or {}
    return payload.get("event") if isinstance(payload, dict) else None


def broadcasts(rec: Recorder, ch: str, event: str | None = None, since: int = 0) -> list[dict[str, Any]]:
    """User payloads of the broadcasts ``rec`` received on channel ``ch``."""
    return [
        e["payload"]
        for e in rec.find("broadcast", since=since, ch=ch)
        if event is None or broadcast_event(e) == event
    ]


# -- realtime-js / supabase-js under node ---------------------------------------------------------


class DriverError(Exception):
    """A driver command failed on the JS side."""


class JsClient(Recorder):
    """One node process running ``tests/js/driver.mjs`` (one official JS client)."""

    _ids = itertools.count(1)

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        super().__init__()
        self.proc = proc
        self.name = name
        self.stderr: list[str] = []
        self._tasks = [asyncio.create_task(self._read_stdout()), asyncio.create_task(self._read_stderr())]

    @classmethod
    async def start(
        cls,
        url: str,
        *,
        lib: str = "realtime-js",
        vsn: str = "2.0.0",
        apikey: str = "anon-key",
        heartbeat_ms: int | None = None,
        timeout_ms: int | None = None,
        max_seconds: int = 150,
        name: str | None = None,
    ) -> JsClient:
        args = [
            "--url",
            url,
            "--lib",
            lib,
            "--vsn",
            vsn,
            "--apikey",
            apikey,
            "--max-seconds",
            str(max_seconds),
        ]
        if heartbeat_ms:
            args += ["--heartbeat-ms", str(heartbeat_ms)]
        if timeout_ms:
            args += ["--timeout-ms", str(timeout_ms)]
        node = shutil.which("node")
        assert node, "node is needed for the realtime-js conformance tests"
        proc = await asyncio.create_subprocess_exec(
            node,
            str(DRIVER),
            *args,
            cwd=JS_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=4 * 1024 * 1024,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
        client = cls(proc, name or f"{lib}[{vsn}]")
        await client.wait_for("ready", timeout=30)
        return client

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"t": "stdout", "text": line}
            self.record(event)
        self.record({"t": "exit"})

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip())

    def dead(self) -> bool:
        return any(e.get("t") in ("exit", "fatal") for e in self.events[-3:])

    def transcript(self, last: int = 60) -> str:
        text = super().transcript(last)
        if self.stderr:
            text += "\n--- stderr ---\n" + "\n".join(self.stderr[-20:])
        return text

    async def call(self, op: str, timeout: float = 20.0, **args: Any) -> Any:
        """Run one driver command and return its value (raises :class:`DriverError` on failure)."""
        cid = next(self._ids)
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"id": cid, "op": op, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        result = await self.wait_for("result", timeout=timeout, id=cid)
        if not result["ok"]:
            raise DriverError(f"{self.name} {op}: {result['error']}")
        return result["value"]

    async def subscribe(self, ch: str, timeout: float = 20.0, **args: Any) -> dict[str, Any]:
        """Create channel ``ch`` with listeners and subscribe; returns the first status."""
        result: dict[str, Any] = await self.call("subscribe", timeout=timeout, ch=ch, **args)
        return result

    async def subscribed(self, ch: str, **args: Any) -> None:
        """Subscribe and require ``SUBSCRIBED``."""
        result = await self.subscribe(ch, **args)
        assert result["status"] == "SUBSCRIBED", f"{self.name} {ch}: {result}\n{self.transcript()}"

    def frames(self, direction: str, since: int = 0) -> list[dict[str, Any]]:
        return self.find("frame", since=since, dir=direction)

    def text_frames(self, direction: str, since: int = 0) -> list[Any]:
        """Decoded JSON of the text frames in one direction."""
        out = []
        for f in self.frames(direction, since):
            if not f["binary"]:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(f["text"]))
        return out

    async def close(self) -> None:
        if os.environ.get("TIDINGS_CLIENT_TRANSCRIPT"):  # debugging aid: dump what the client saw
            print(self.transcript(1000))
        if self.proc.returncode is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"id":0,"op":"exit"}\n')
                await self.proc.stdin.drain()
                await asyncio.wait_for(self.proc.wait(), 5)
            except (TimeoutError, OSError, ConnectionError):
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), 5)
        for task in self._tasks:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 2)


JsFactory = Callable[..., Awaitable[JsClient]]


@pytest.fixture
async def js_client(js_deps: Path) -> AsyncIterator[JsFactory]:
    """``await js_client(url, lib=..., vsn=..., ...)`` starts a driver; all are stopped afterwards."""
    started: list[JsClient] = []

    async def make(url: str, **kwargs: Any) -> JsClient:
        client = await JsClient.start(url, **kwargs)
        started.append(client)
        return client

    yield make
    for client in started:
        await client.close()
    fatal = [e for c in started for e in c.find("fatal")]
    assert not fatal, f"a JS driver failed: {fatal}"


# -- realtime-py ------------------------------------------------------------------------------------


class _RealtimePyLog(logging.Handler):
    """Collects realtime-py's log records: raw frames received and frames it rejected."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def frames(self, direction: str) -> list[dict[str, Any]]:
        """Decoded frames realtime-py sent (``out``) or received (``in``), from its debug log."""
        prefix = "send: " if direction == "out" else "receive: "
        out = []
        for r in list(self.records):
            text = r.getMessage()
            if not text.startswith(prefix):
                continue
            raw = text[len(prefix) :]
            with contextlib.suppress(ValueError, SyntaxError):
                out.append(json.loads(raw if direction == "out" else ast.literal_eval(raw)))
        return out

    def rejected(self) -> list[str]:
        return [r.getMessage() for r in self.records if "Unrecognized message format" in r.getMessage()]

    def received(self) -> list[str]:
        return [
            r.getMessage()[len("receive: ") :] for r in self.records if r.getMessage().startswith("receive: ")
        ]


@pytest.fixture
def realtime_py_log() -> Iterator[_RealtimePyLog]:
    """Every log record of realtime-py during the test. Fails the test if it rejected any frame."""
    logger = logging.getLogger("realtime")
    handler = _RealtimePyLog()
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # its debug lines (every frame) stay out of pytest's log capture
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    rejected = handler.rejected()
    assert not rejected, "realtime-py dropped frames it could not validate:\n" + "\n".join(rejected)


class PyClient(Recorder):
    """realtime-py's AsyncRealtimeClient with every callback recorded as an event."""

    _barriers = itertools.count(1)

    def __init__(
        self, url: str, token: str | None, log: _RealtimePyLog, name: str = "realtime-py", **kwargs: Any
    ) -> None:
        from realtime import AsyncRealtimeClient

        super().__init__()
        self.name = name
        self.log = log
        self.client = AsyncRealtimeClient(url, token, **kwargs)
        self.channels: dict[str, Any] = {}

    async def barrier(self, timeout: float = 10.0) -> None:
        """A heartbeat with a unique ref through the client's own socket, and wait for its reply:
        everything the server sent this connection before has then been received and dispatched."""
        from realtime.message import Message

        ref = f"barrier-{next(self._barriers)}"
        await self.client.send(Message(topic="phoenix", event="heartbeat", payload={}, ref=ref))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(f.get("ref") == ref for f in self.log.frames("in")):
            assert loop.time() < deadline, f"{self.name}: no reply to heartbeat {ref}\n{self.transcript()}"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0)  # let the listener task dispatch what preceded the reply

    def channel(
        self,
        ch: str,
        config: dict[str, Any] | None = None,
        broadcast: tuple[str, ...] = ("*",),
        presence: bool = False,
        system: bool = True,
        postgres: tuple[dict[str, Any], ...] = (),
    ) -> Any:
        """A channel with recording listeners (not yet subscribed).

        ``postgres``: bindings ``{event, schema?, table?, filter?}``, one ``on_postgres_changes`` each.
        """
        cfg = {
            "broadcast": {"ack": False, "self": False},
            "presence": {"key": "", "enabled": False},
            "private": False,
        }
        cfg.update(config or {})
        channel = self.client.channel(ch, {"config": cfg})
        self.channels[ch] = channel
        for event in broadcast:
            channel.on_broadcast(
                event, lambda p, ch=ch: self.record({"t": "broadcast", "ch": ch, "payload": p})
            )
        if presence:
            channel.on_presence_sync(
                lambda ch=ch, c=channel: self.record(
                    {"t": "presence", "ch": ch, "event": "sync", "state": dict(c.presence_state())}
                )
            )
            channel.on_presence_join(
                lambda key, cur, new, ch=ch: self.record(
                    {"t": "presence", "ch": ch, "event": "join", "key": key, "presences": new}
                )
            )
            channel.on_presence_leave(
                lambda key, cur, left, ch=ch: self.record(
                    {"t": "presence", "ch": ch, "event": "leave", "key": key, "presences": left}
                )
            )
        if system:
            channel.on_system(
                lambda p, ch=ch: self.record({"t": "system", "ch": ch, "payload": p.model_dump()})
            )
        for index, binding in enumerate(postgres):
            channel.on_postgres_changes(
                binding["event"],
                lambda p, ch=ch, i=index: self.record(
                    {"t": "postgres", "ch": ch, "binding": i, "payload": p}
                ),
                table=binding.get("table"),
                schema=binding.get("schema"),
                filter=binding.get("filter"),
            )
        return channel

    async def subscribe(self, ch: str, timeout: float = 20.0, **kwargs: Any) -> dict[str, Any]:
        """Create ``ch`` and subscribe; returns the first status ``{status, error}``."""
        channel = self.channel(ch, **kwargs)
        since = self.mark()

        def on_status(status: Any, err: Exception | None, ch: str = ch) -> None:
            self.record(
                {"t": "status", "ch": ch, "status": str(status.value), "error": str(err) if err else None}
            )

        await asyncio.wait_for(channel.subscribe(on_status), timeout)
        first = await self.wait_for("status", since=since, ch=ch, timeout=timeout)
        return {"status": first["status"], "error": first["error"]}

    async def subscribed(self, ch: str, **kwargs: Any) -> Any:
        result = await self.subscribe(ch, **kwargs)
        assert result["status"] == "SUBSCRIBED", f"{self.name} {ch}: {result}\n{self.transcript()}"
        return self.channels[ch]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.close(), 5)


PyFactory = Callable[..., PyClient]


@pytest.fixture
async def py_client(realtime_py_log: _RealtimePyLog) -> AsyncIterator[PyFactory]:
    """``py_client(url, token, **AsyncRealtimeClient kwargs)``; all are closed afterwards."""
    made: list[PyClient] = []

    def make(url: str, token: str | None = None, **kwargs: Any) -> PyClient:
        client = PyClient(url, token, realtime_py_log, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


# -- servers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ServerProcess]:
    """An open server shared by the tests of one module (each test uses its own channel names)."""
    proc = ServerProcess().start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def channel_name(request: pytest.FixtureRequest) -> str:
    """A channel name unique to the test (tests share servers)."""
    base = request.node.name.replace("[", "-").replace("]", "").replace(".", "_")
    return f"{base}-{os.getpid()}"


# -- REST ---------------------------------------------------------------------------------------------


async def rest_post(
    base_url: str,
    path: str,
    body: Any,
    token: str | None = None,
    content_type: str = "application/json",
) -> Any:
    """POST to the server's REST API the way a backend would (httpx); returns the response."""
    import httpx

    headers = {"Content-Type": content_type}
    if token:
        headers["apikey"] = token
        headers["Authorization"] = f"Bearer {token}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(base_url + path, content=content, headers=headers)
