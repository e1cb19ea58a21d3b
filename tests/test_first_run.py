"""First run and packaging (issue 15), each through the real command.

* A venv made with a plain ``pip install <checkout>`` (no extras) serves Postgres Changes end to end.
* Every start-up failure ends the process with a non-zero status and one line, no traceback.
* ``make run`` installs what serving needs and nothing of the test tooling; Ctrl-C ends it cleanly.
* The small things a first user meets: ``--version``, typed ``--help``, ``bench --list``.

The venvs are cached under the temp dir, keyed by what decides their content (``pyproject.toml``, and
the ``Makefile`` for ``make run``); the package itself is reinstalled from a copy of this checkout
each session, so the code under test is always the current one. pip reuses its own cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.phx import PhxClient
from tests.support.postgres import PostgresServer, postgres_fixture
from tests.support.server import ServerProcess, free_port
from tidings.auth.tokens import mint_token
from tidings.config import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "tidings-first-run"
PIP = ["-m", "pip", "install", "-q", "--disable-pip-version-check"]
TEST_TOOLING = ("pytest", "mypy", "ruff", "playwright", "matplotlib", "hypothesis", "realtime", "redis")
SETTING_ENVS = {s.env for s in SETTINGS} | {"TIDINGS_CONFIG"}

postgres = postgres_fixture(scope="module")


# -- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """An exclusive lock on a file of the cache (two test runs at once share one venv)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def key_of(*names: str) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()[:12]


def copy_checkout(dest: Path, *extra: str) -> None:
    """What ``pip install <checkout>`` reads: pyproject.toml, README.md, src/ (plus ``extra`` files).

    A copy, so pip's build never writes into the shared checkout. ``copy2`` keeps modification
    times (make compares them with its stamps)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md", *extra):
        shutil.copy2(ROOT / name, dest / name)
    shutil.rmtree(dest / "src", ignore_errors=True)
    # setuptools reuses build/lib when it looks newer than src/; with copied mtimes a file edited
    # just before an earlier build is then installed stale.
    shutil.rmtree(dest / "build", ignore_errors=True)
    shutil.copytree(
        ROOT / "src",
        dest / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        copy_function=shutil.copy2,
    )


def run(cmd: list[str], timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def clean_env(**env: str) -> dict[str, str]:
    """This process's environment without any Tidings setting (nor a PYTHONPATH into the checkout)."""
    base = {k: v for k, v in os.environ.items() if k not in SETTING_ENVS and k != "PYTHONPATH"}
    return base | env


def installed(python: Path, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` the interpreter can import."""
    code = f"import importlib.util as u; print(' '.join(m for m in {modules!r} if u.find_spec(m)))"
    return run([str(python), "-c", code], env=clean_env(), cwd=tempfile.gettempdir()).stdout.split()


def tidings(
    *args: str, python: str = sys.executable, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``tidings ARGS`` (as ``python -m tidings``) to its end."""
    return subprocess.run(
        [python, "-m", "tidings", *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=tempfile.gettempdir(),
    )


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], expected: str) -> str:
    """A non-zero status, no traceback, exactly one error line, which contains ``expected``."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output and 'File "' not in output, output
    errors = [line for line in output.splitlines() if " ERROR " in line or line.startswith("tidings: ")]
    assert len(errors) == 1, output
    assert expected in errors[0], output
    assert "Tidings listening" not in output, output  # said only once bound and started
    return errors[0]


def slots(server: PostgresServer) -> list[str]:
    return [row[0] for row in server.execute("SELECT slot_name FROM pg_replication_slots")]


# -- a plain `pip install` ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_venv() -> Path:
    """A venv made with ``pip install <checkout>`` alone: no extras, no test tooling."""
    base = CACHE / f"plain-{key_of('pyproject.toml')}"
    venv, checkout = base / "venv", base / "checkout"
    python = venv / "bin" / "python"
    with locked("plain"):
        copy_checkout(checkout)
        if not (venv / ".complete").exists():
            shutil.rmtree(venv, ignore_errors=True)
            run([sys.executable, "-m", "venv", str(venv)])
            run([str(python), *PIP, str(checkout)], env=clean_env())
            (venv / ".complete").touch()
        else:  # dependencies are there: this checkout's code only
            run([str(python), *PIP, "--no-deps", "--force-reinstall", str(checkout)], env=clean_env())
    return venv


@pytest.mark.postgres
@pytest.mark.timeout(400)
async def test_plain_pip_install_serves_postgres_changes(plain_venv: Path, postgres: PostgresServer) -> None:
    python = plain_venv / "bin" / "python"
    assert installed(python, TEST_TOOLING) == []  # redis included: it is an extra
    where = run([str(python), "-c", "import tidings; print(tidings.__file__)"], env=clean_env(), cwd="/")
    assert where.stdout.startswith(str(plain_venv))  # the installed copy, not this checkout
    dsn = postgres.create_database("plain")
    postgres.execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL); "
        "INSERT INTO orders VALUES (42, 'new')",
        dbname=dsn.rsplit("/", 1)[1],
    )
    env = {"DATABASE_URL": dsn, "DB_SLOT": "plain_slot", "DB_RESUME_GRACE": "0", "PYTHONPATH": ""}
    server = ServerProcess(env=env, python=str(python)).start(timeout=60)
    try:
        client = await PhxClient.open(server.http_url)
        binding = {"event": "UPDATE", "schema": "public", "table": "orders", "filter": "id=eq.42"}
        await client.join("realtime:order:42", {"postgres_changes": [binding]})
        system = await client.wait(lambda m: m[3] == "system", timeout=20)
        assert system[4]["status"] == "ok" and system[4]["extension"] == "postgres_changes"
        postgres.execute("UPDATE orders SET status = 'shipped' WHERE id = 42", dbname=dsn.rsplit("/", 1)[1])
        push = await client.wait(lambda m: m[3] == "postgres_changes", timeout=20)
        assert push[4]["data"]["type"] == "UPDATE"
        assert push[4]["data"]["record"] == {"id": 42, "status": "shipped"}
        await client.close()
    finally:
        server.stop()
        postgres.drop_inactive_slots()
    logs = server.logs()
    assert "ModuleNotFoundError" not in logs and "Traceback" not in logs, logs
    assert "Postgres Changes: on" in logs and "broker: memory" in logs, logs


@pytest.mark.postgres
@pytest.mark.timeout(400)
def test_plain_install_with_redis_url_fails_in_one_line_before_any_slot(
    plain_venv: Path, postgres: PostgresServer
) -> None:
    dsn = postgres.create_database("noredis")
    before = slots(postgres)
    proc = tidings(
        "serve",
        "--port",
        str(free_port()),
        python=str(plain_venv / "bin" / "python"),
        REDIS_URL="redis://127.0.0.1:1/0",
        DATABASE_URL=dsn,
        DB_SLOT="noredis_slot",
        PYTHONPATH="",
    )
    assert_one_line_failure(proc, "REDIS_URL needs the redis extra: pip install 'tidings[redis]'")
    assert proc.returncode == 1
    assert slots(postgres) == before  # nothing was created that keeps WAL


# -- start-up failures: one line each ---------------------------------------------------------


@pytest.mark.postgres
def test_busy_port_fails_in_one_line_before_any_slot(postgres: PostgresServer) -> None:
    dsn = postgres.create_database("busy")
    before = slots(postgres)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = tidings("serve", "--port", str(port), DATABASE_URL=dsn, DB_SLOT="busy_slot")
    line = assert_one_line_failure(proc, f"cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "set PORT" in line
    assert slots(postgres) == before


@pytest.mark.postgres
def test_database_refusal_is_one_line_without_the_uvicorn_traceback(postgres: PostgresServer) -> None:
    dsn = postgres.create_database("refuse")
    postgres.execute("DO $$ BEGIN CREATE ROLE norepl LOGIN; EXCEPTION WHEN duplicate_object THEN END $$")
    proc = tidings("serve", "--port", "0", DATABASE_URL=dsn.replace("postgres@", "norepl@"))
    assert_one_line_failure(proc, "DATABASE_URL: database role 'norepl' lacks the REPLICATION privilege")
    assert proc.returncode == 3
    assert "SystemExit" not in proc.stderr and "Application startup failed" not in proc.stderr


def test_unreachable_database_is_one_line() -> None:
    proc = tidings("serve", "--port", "0", DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    assert_one_line_failure(proc, "DATABASE_URL: PostgreSQL at 127.0.0.1:")
    assert proc.returncode == 3


def test_unreachable_redis_is_one_line() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc = tidings("serve", "--port", "0", REDIS_URL=url)
    assert_one_line_failure(proc, f"REDIS_URL: cannot reach Redis at {url}")
    assert proc.returncode == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PORT": "abc"}, "tidings: invalid PORT (environment): 'abc': expected a port number 0-65535"),
        (
            {"JWT_JWKS": "notjson"},
            "invalid JWT_JWKS (environment): 'notjson': expected a JSON Web Key Set ({\"keys\"",
        ),
        (
            {"DATABASE_URL": "mysql://x"},
            "invalid DATABASE_URL (environment): 'mysql://x': expected a PostgreSQL URL",
        ),
        ({"HEARTBEAT_INTERVAL": "30"}, "'30': a bare number is milliseconds, and 30 ms is implausible here"),
        ({"ALERT_P95_LATENCY": "0.5"}, "write 0.5s, or 0.5ms if you mean it"),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_bad_values_are_one_line_naming_the_setting(command: str, env: dict[str, str], expected: str) -> None:
    proc = tidings(command, **env)
    assert_one_line_failure(proc, expected)
    assert proc.returncode == 2
    assert "invalid literal" not in proc.stderr and "Expecting value" not in proc.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_unknown_toml_key_suggests_the_setting(tmp_path: Path, command: str) -> None:
    toml = tmp_path / "tidings.toml"
    toml.write_text('heartbeat_intervall = "30s"\n')
    proc = tidings(command, "--config", str(toml))
    assert_one_line_failure(
        proc, f"unknown setting 'heartbeat_intervall' in {toml} (did you mean 'heartbeat_interval'?)"
    )


def test_token_with_a_short_secret_warns_once_in_our_words() -> None:
    proc = tidings("token", "--secret", "super-secret")
    assert proc.returncode == 0
    assert proc.stderr.splitlines() == [
        "tidings: warning: the secret is 12 bytes; HS256 needs at least 32 (RFC 7518 3.2), or the tokens "
        "can be forged by guessing it: use a random secret, e.g. openssl rand -base64 32"
    ]
    assert proc.stdout.count(".") == 2  # the token
    assert tidings("token", "--secret", "x" * 32).stderr == ""


async def test_server_with_a_short_secret_warns_once_in_our_words() -> None:
    secret = "short-secret"
    with warnings.catch_warnings():  # PyJWT's own warning, in this process
        warnings.simplefilter("ignore")
        token = mint_token(secret, role="authenticated", sub="u1")
    with ServerProcess(env={"JWT_SECRET": secret}) as server:
        for _ in range(3):  # every token is verified with the short key
            client = await PhxClient.open(server.http_url, f"&apikey={token}")
            await client.join("realtime:room", {}, timeout=10)
            await client.close()
    logs = server.logs()
    assert "InsecureKeyLengthWarning" not in logs and "api_jws.py" not in logs, logs
    assert logs.count("JWT_SECRET is 12 bytes; HS256 needs at least 32") == 1, logs


# -- a clean start and stop --------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_drains_and_exits_zero(sig: signal.Signals) -> None:
    server = ServerProcess(env={"JWT_SECRET": "a" * 32}).start()
    assert server.stop(sig) == 0
    logs = server.logs()
    assert "Traceback" not in logs
    (line,) = [line for line in logs.splitlines() if "Tidings listening" in line]
    assert f"Tidings listening on ws://127.0.0.1:{server.port}/realtime/v1/websocket" in line
    assert "broker: memory" in line and "auth: JWT_SECRET" in line and "Postgres Changes: off" in line


# -- the CLI -----------------------------------------------------------------------------------


def test_version() -> None:
    from tidings import __version__

    proc = tidings("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"tidings {__version__}"


def test_help_shows_types_and_durations_with_units() -> None:
    text = tidings("serve", "--help").stdout
    assert re.search(r"--port INTEGER\s", text)
    assert re.search(r"--heartbeat-interval DURATION\s", text)
    assert re.search(r"--log-format \[plain\|json\]", text)
    flat = " ".join(text.split())
    assert "[env HEARTBEAT_INTERVAL; default 30s; e.g. 30s, 500ms, 2m (bare = ms)]" in flat
    assert "[env ALERT_P95_LATENCY; default 500ms;" in flat
    shown = {line.split()[0]: line.split()[1] for line in tidings("check-config").stdout.splitlines()}
    assert shown["HEARTBEAT_INTERVAL"] == "30s" and shown["ALERT_P95_LATENCY"] == "500ms"
    assert shown["HISTORY_TTL"] == "5m"


def test_bench_list_columns_line_up() -> None:
    proc = tidings("bench", "--list")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert len(rows) >= 10
    columns = {len(line) - len(line[2:].split(" ", 1)[1].lstrip()) for line in rows}
    assert len(columns) == 1, proc.stdout


# -- make run ----------------------------------------------------------------------------------


def wait_health(port: int, proc: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1) as r:
                return dict(json.loads(r.read()))
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"make run did not serve /api/health within {timeout}s")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_make_run_serves_health_from_a_venv_without_test_tooling(sig: signal.Signals) -> None:
    """``make run`` on a copy of the checkout with its own venv (the main one is never touched);
    Ctrl-C (SIGINT to the foreground process group) or SIGTERM ends it without make's ``***``."""
    base = CACHE / f"make-{key_of('pyproject.toml', 'Makefile')}"
    checkout, venv = base / "checkout", base / "venv"
    with locked("make"):
        copy_checkout(checkout, "Makefile")
        plan = run(["make", "-n", "run", f"VENV={venv}"], cwd=checkout).stdout
        assert "[dev]" not in plan  # `make run` never asks for the dev extra
        port = free_port()
        proc = subprocess.Popen(
            ["make", "run", f"VENV={venv}"],
            cwd=checkout,
            env=clean_env(PORT=str(port)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            assert wait_health(port, proc, timeout=300)["status"] == "ok"
            assert installed(venv / "bin" / "python", TEST_TOOLING) == []
            os.killpg(proc.pid, sig)  # SIGINT: what Ctrl-C in a terminal does
            output = proc.communicate(timeout=30)[0]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert "make: ***" not in output and "Interrupt" not in output, output  # make saw a clean exit
    assert "Traceback" not in output
    assert (venv / ".run-stamp").exists() and not (venv / ".dev-stamp").exists()


def test_make_test_installs_the_dev_extra() -> None:
    plan = run(["make", "-n", "test", "VENV=/nonexistent-venv"], cwd=ROOT).stdout
    assert "-e '.[dev]'" in plan and "/nonexistent-venv/.dev-stamp" in plan


# -- the README's and the guide's examples, and the reconnect rate -----------------------------


def code_block(path: Path, language: str, marker: str) -> str:
    """The first ```language block of ``path`` that contains ``marker``."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", path.read_text(), flags=re.S | re.M)
    (block,) = [b for b in blocks if marker in b][:1]
    return block


def metrics(server: ServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(server.http_url + "/api/metrics", timeout=5) as r:
        return dict(json.loads(r.read()))


def wait_metrics(
    server: ServerProcess, ready: Callable[[dict[str, Any]], bool], timeout: float = 15
) -> dict[str, Any]:
    """``/api/metrics`` once ``ready(snapshot)`` (the monitor samples once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = metrics(server)
        if ready(snap) or time.monotonic() > deadline:
            return snap
        time.sleep(0.2)


@pytest.mark.clients
@pytest.mark.timeout(300)
def test_the_examples_run_and_running_them_again_is_not_a_reconnect(tmp_path: Path) -> None:
    """README's supabase-js and realtime-py snippets and the SDK quickstart, as written, several
    times on localhost (one address for every client): they work, and none counts as a reconnect."""
    node_modules = ROOT / "tests" / "js" / "node_modules"
    assert (node_modules / "@supabase" / "supabase-js").is_dir(), "run make deps (tests/js npm install)"
    (tmp_path / "node_modules").symlink_to(node_modules)
    with ServerProcess() as server:
        here = f"127.0.0.1:{server.port}"
        scripts = {
            "example.mjs": code_block(ROOT / "README.md", "js", "createClient"),
            "example.py": code_block(ROOT / "README.md", "python", "AsyncRealtimeClient"),
            "quickstart.py": code_block(ROOT / "docs" / "client.md", "python", "RealtimeClient("),
        }
        for name, text in scripts.items():
            (tmp_path / name).write_text(text.replace("localhost:4000", here))
        runs = [["node", "example.mjs"]] * 5 + [[sys.executable, "example.py"]] * 5
        runs += [[sys.executable, "quickstart.py"]] * 2
        for cmd in runs:
            proc = subprocess.run(
                cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=clean_env()
            )
            assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr}"
            assert "shipped" in proc.stdout or "hello" in proc.stdout, proc.stdout
        snap = wait_metrics(server, lambda m: m["reconnects"]["connections"] >= len(runs))
    assert snap["reconnects"] == {"count": 0, "connections": len(runs)}, snap["reconnects"]
    assert snap["reconnectRate"] == 0.0
    assert [a for a in snap["alerts"] if a["name"] == "reconnect_rate"] == []


async def test_reconnect_rate_is_a_bounded_share_the_same_in_json_and_alert() -> None:
    """Connections that drop (no close frame) and come back are reconnects; with every connection
    gone the rate is still a share of the window's connections (never 100 %, 150 %, 2.0)."""
    with ServerProcess() as server:
        idle = metrics(server)
        assert (idle["reconnectRate"], idle["reconnects"]["count"]) == (0.0, 0)  # 0 connections: 0
        for _ in range(2):  # 12 connect, drop; 12 come back (reconnects), drop
            clients = [await PhxClient.open(server.http_url) for _ in range(12)]
            for c in clients:
                c.ws.transport.abort()
            await asyncio.sleep(0.3)
        snap = await asyncio.to_thread(wait_metrics, server, lambda m: m["reconnects"]["connections"] >= 24)
    assert snap["activeConnections"] == 0
    assert snap["reconnects"] == {"count": 12, "connections": 24}
    assert snap["reconnectRate"] == 0.5
    (alert,) = [a for a in snap["alerts"] if a["name"] == "reconnect_rate"]
    assert alert["value"] == snap["reconnectRate"]
    assert "50.0% of connections reconnected (12 of 24; > 10%)" in alert["message"]
