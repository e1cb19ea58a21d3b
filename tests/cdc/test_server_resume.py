"""Recovery for Postgres Changes through the real server: positions, resume on rejoin, the change log.

The order page of the guide: a client follows ``orders`` with ``id=eq.<id>``, loses its connection
while updates commit, and rejoins with the position of the last change it got
(``postgres_changes_options.resume``). It must get exactly what it missed, then live changes,
never a change twice, and be told ``recovered: false`` whenever that cannot be proven. Memory
broker, one Redis and a Redis Cluster; a restart of Tidings in between.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.phx import PhxClient
from tests.support.redis import RedisClusterServers, RedisServer
from tests.support.server import ServerProcess
from tidings.auth.tokens import mint_token

from .conftest import Database, ensure_role, unique_slot
from .test_cluster_changes import wait_for_leader
from .test_rls import SCHEMA
from .test_server_changes import ORDERS

pytestmark = pytest.mark.postgres

POSITION = re.compile(r"\A[0-9A-F]{16}/[0-9A-F]{8}\Z")
ORDER_42 = {"event": "UPDATE", "schema": "public", "table": "orders", "filter": "id=eq.42"}


@pytest.fixture
def orders_db(db: Database) -> Database:
    db.execute(ORDERS)
    return db


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def broker(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The settings of the broker under test (a fresh Redis or Redis Cluster when not memory)."""
    if request.param == "memory":
        yield {}
        return
    redis = RedisServer() if request.param == "redis" else RedisClusterServers(masters=3)
    redis.start()
    try:
        yield {"REDIS_URL": redis.url, "NODE_TIMEOUT": "3s"}
    finally:
        redis.cleanup()


@pytest.fixture
def tidings(orders_db: Database) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []
    slot = unique_slot()

    def start(**env: str) -> ServerProcess:
        env = {"DATABASE_URL": orders_db.dsn, "DB_SLOT": slot, "DB_RESUME_GRACE": "0", **env}
        proc = ServerProcess(env=env).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def pushes(client: PhxClient, topic: str) -> list[list[Any]]:
    return [m for m in client.inbox if m[3] == "postgres_changes" and m[2] == topic]


def totals(client: PhxClient, topic: str) -> list[Any]:
    return [m[4]["data"]["record"]["total"] for m in pushes(client, topic)]


async def resume_join(
    client: PhxClient,
    topic: str,
    binding: dict[str, Any],
    resume: Any,
    *,
    expect_ok: bool = True,
) -> dict[str, Any]:
    """Join with ``postgres_changes_options.resume``; returns the reply's ``response`` (ok) or the
    whole reply payload (error), and for an ok one waits for the ``system`` announcement."""
    config = {"postgres_changes": [binding], "postgres_changes_options": {"resume": resume}}
    ref = await client.push(topic, "phx_join", {"config": config}, join_ref="j" + topic)
    reply = await client.wait(lambda m: m[3] == "phx_reply" and m[1] == ref, timeout=30)
    if not expect_ok:
        assert reply[4]["status"] == "error", reply
        return dict(reply[4])
    assert reply[4]["status"] == "ok", reply
    await client.wait(lambda m: m[3] == "system" and m[2] == topic, timeout=30)
    return dict(reply[4]["response"])


def announcement(client: PhxClient, topic: str) -> dict[str, Any]:
    (system,) = [m[4] for m in client.inbox if m[3] == "system" and m[2] == topic]
    return dict(system)


async def observer(server: ServerProcess, order: int = 42) -> PhxClient:
    """A client that stays connected: once it saw a change, the server had logged it (changes are
    logged before they are delivered), so a rejoin after that finds it in the log."""
    client = await PhxClient.open(server.http_url)
    binding = {**ORDER_42, "filter": f"id=eq.{order}"}
    await client.push("realtime:observer", "phx_join", {"config": {"postgres_changes": [binding]}}, "o")
    await client.wait(lambda m: m[3] == "system" and m[2] == "realtime:observer", timeout=30)
    return client


async def seen_total(client: PhxClient, total: Any, topic: str = "realtime:observer") -> None:
    async with asyncio.timeout(30):
        while total not in totals(client, topic):
            await asyncio.sleep(0.02)


async def wait_totals(client: PhxClient, topic: str, n: int, timeout: float = 30) -> list[Any]:
    async with asyncio.timeout(timeout):
        while len(pushes(client, topic)) < n:
            await asyncio.sleep(0.02)
    return totals(client, topic)


async def test_every_push_carries_its_position_and_resumers_get_it_as_ref(
    orders_db: Database, tidings: Callable[..., ServerProcess]
) -> None:
    server = tidings()
    plain, resumer = await PhxClient.open(server.http_url), await PhxClient.open(server.http_url)
    await resume_join(resumer, "realtime:r", ORDER_42, True)
    ref = await plain.push("realtime:p", "phx_join", {"config": {"postgres_changes": [ORDER_42]}}, "p")
    await plain.wait(lambda m: m[3] == "system" and m[2] == "realtime:p")
    assert ref
    orders_db.execute("UPDATE orders SET total = 1 WHERE id = 42")
    orders_db.execute("UPDATE orders SET total = 2 WHERE id = 42")
    await wait_totals(plain, "realtime:p", 2)
    await wait_totals(resumer, "realtime:r", 2)
    first, second = (m[4]["data"]["position"] for m in pushes(plain, "realtime:p"))
    assert POSITION.match(first) and POSITION.match(second) and first < second
    # Only a channel that asked to resume gets the position as the ref (realtime-py rejects a ref).
    assert [m[1] for m in pushes(plain, "realtime:p")] == [None, None]
    assert [m[1] for m in pushes(resumer, "realtime:r")] == [first, second]
    assert [m[4]["data"]["position"] for m in pushes(resumer, "realtime:r")] == [first, second]


async def test_a_client_away_while_updates_commit_gets_exactly_those_on_rejoin(
    orders_db: Database, tidings: Callable[..., ServerProcess], broker: dict[str, str]
) -> None:
    server = tidings(**broker)
    watcher = await observer(server)
    client = await PhxClient.open(server.http_url)
    first = await resume_join(client, "realtime:order:42", ORDER_42, True)
    assert POSITION.match(first["postgres_changes_resume"]["position"])
    orders_db.execute("UPDATE orders SET total = 0 WHERE id = 42")
    await wait_totals(client, "realtime:order:42", 1)
    last = pushes(client, "realtime:order:42")[-1][4]["data"]["position"]
    epoch = first["postgres_changes_resume"]["epoch"]
    await client.close()

    for i in range(1, 6):  # N = 5 updates of order 42 while away, among updates of other orders
        orders_db.execute("UPDATE orders SET total = %s WHERE id = 42", (i,))
        orders_db.execute("UPDATE orders SET total = %s WHERE id = 7", (i,))
    await seen_total(watcher, 5)
    client = await PhxClient.open(server.http_url)
    response = await resume_join(client, "realtime:order:42", ORDER_42, {"since": last, "epoch": epoch})
    resume = response["postgres_changes_resume"]
    assert resume["recovered"] is True and resume["replayed"] == 5 and resume["epoch"] == epoch
    assert totals(client, "realtime:order:42") == [1, 2, 3, 4, 5]
    positions = [m[4]["data"]["position"] for m in pushes(client, "realtime:order:42")]
    assert positions == sorted(positions) and positions[0] > last
    assert resume["position"] >= positions[-1]
    system = announcement(client, "realtime:order:42")
    assert system["message"] == "Subscribed to PostgreSQL" and system["recovered"] is True
    # The replay comes right after the reply and before the announcement; live changes follow.
    kinds = [m[3] for m in client.inbox if m[2] == "realtime:order:42"]
    assert kinds == ["phx_reply"] + ["postgres_changes"] * 5 + ["system"]
    orders_db.execute("UPDATE orders SET total = 6 WHERE id = 42")
    assert await wait_totals(client, "realtime:order:42", 6) == [1, 2, 3, 4, 5, 6]


async def test_no_change_twice_or_missed_across_rejoins_while_updates_keep_committing(
    orders_db: Database, tidings: Callable[..., ServerProcess], broker: dict[str, str]
) -> None:
    """A writer commits updates 1..K without pause; the client drops and resumes three times.
    What it received over its four connections is 1..K, in order, each once: the seam between
    replay and live neither loses nor repeats a change."""
    server = tidings(**broker)
    topic, total = "realtime:order:42", 120
    stop = threading.Event()

    def write() -> None:
        conn = orders_db.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            for i in range(1, total + 1):
                cur.execute("UPDATE orders SET total = %s WHERE id = 42", (i,))
                cur.execute("UPDATE orders SET total = %s WHERE id = 7", (i,))
                if stop.wait(0.005):
                    break
        conn.close()

    client = await PhxClient.open(server.http_url)
    reply = await resume_join(client, topic, ORDER_42, True)
    since, epoch = reply["postgres_changes_resume"]["position"], reply["postgres_changes_resume"]["epoch"]
    writer = threading.Thread(target=write)
    writer.start()
    seen: list[Any] = []
    try:
        for _ in range(3):
            async with asyncio.timeout(30):
                while len(pushes(client, topic)) < 5:
                    await asyncio.sleep(0.01)
            await client.close()
            got = pushes(client, topic)
            seen += [m[4]["data"]["record"]["total"] for m in got]
            since = max([since] + [m[4]["data"]["position"] for m in got])
            await asyncio.sleep(0.1)  # updates commit while the client is away
            client = await PhxClient.open(server.http_url)
            reply = await resume_join(client, topic, ORDER_42, {"since": since, "epoch": epoch})
            assert reply["postgres_changes_resume"]["recovered"] is True, reply
        writer.join(60)
        async with asyncio.timeout(30):
            while (seen + totals(client, topic))[-1:] != [total]:
                await asyncio.sleep(0.02)
        seen += totals(client, topic)
    finally:
        stop.set()
        writer.join(10)
    assert seen == list(range(1, total + 1))


async def test_the_log_too_short_says_recovered_false(
    orders_db: Database, tidings: Callable[..., ServerProcess], broker: dict[str, str]
) -> None:
    server = tidings(DB_CHANGE_LOG_SIZE="3", **broker)
    watcher = await observer(server)
    client = await PhxClient.open(server.http_url)
    await resume_join(client, "realtime:o", ORDER_42, True)
    orders_db.execute("UPDATE orders SET total = 0 WHERE id = 42")
    await wait_totals(client, "realtime:o", 1)
    last = pushes(client, "realtime:o")[-1][4]["data"]["position"]
    await client.close()
    for i in range(1, 6):  # 5 changes of orders: more than the 3 the log keeps
        orders_db.execute("UPDATE orders SET total = %s WHERE id = 42", (i,))
    await seen_total(watcher, 5)
    client = await PhxClient.open(server.http_url)
    response = await resume_join(client, "realtime:o", ORDER_42, {"since": last})
    resume = response["postgres_changes_resume"]
    assert resume["recovered"] is False and "trimmed" in resume["reason"]
    # What the log still holds is sent all the same: the newest three.
    assert totals(client, "realtime:o") == [3, 4, 5]
    assert announcement(client, "realtime:o")["recovered"] is False


async def test_a_replay_over_its_limit_says_recovered_false(
    orders_db: Database, tidings: Callable[..., ServerProcess]
) -> None:
    server = tidings(DB_REPLAY_MAX_CHANGES="2")
    watcher = await observer(server)
    client = await PhxClient.open(server.http_url)
    reply = await resume_join(client, "realtime:o", ORDER_42, True)
    since = reply["postgres_changes_resume"]["position"]
    await client.close()
    for i in range(1, 5):
        orders_db.execute("UPDATE orders SET total = %s WHERE id = 42", (i,))
    await seen_total(watcher, 4)
    client = await PhxClient.open(server.http_url)
    resume = (await resume_join(client, "realtime:o", ORDER_42, {"since": since}))["postgres_changes_resume"]
    assert resume["recovered"] is False and "limits" in resume["reason"]
    assert totals(client, "realtime:o") == [1, 2]  # the first two; the client knows it has a gap


async def test_bad_and_future_positions_get_a_join_error(tidings: Callable[..., ServerProcess]) -> None:
    server = tidings()
    client = await PhxClient.open(server.http_url)
    for resume in ({"since": "not-a-position"}, {"since": 42}, "yes", {"since": None, "epoch": 7}):
        reply = await resume_join(client, "realtime:bad", ORDER_42, resume, expect_ok=False)
        assert reply["response"]["reason"].startswith("PostgresChangesResumeInvalid: "), reply
    future = "7FFFFFFFFFFFFFFF/00000000"
    reply = await resume_join(client, "realtime:future", ORDER_42, {"since": future}, expect_ok=False)
    reason = reply["response"]["reason"]
    assert reason.startswith(f"PostgresChangesResumeInvalid: position {future} is ahead"), reason
    # The connection goes on: a good resume still works.
    await resume_join(client, "realtime:good", ORDER_42, True)


async def test_a_restart_of_tidings_in_between(
    orders_db: Database, tidings: Callable[..., ServerProcess], broker: dict[str, str]
) -> None:
    """With Redis the log outlives the restart: served from it. The memory log does not:
    ``recovered: false``, with what the new log holds (the changes the slot replayed)."""
    server = tidings(**broker)
    watcher = await observer(server)
    client = await PhxClient.open(server.http_url)
    reply = await resume_join(client, "realtime:o", ORDER_42, True)
    epoch = reply["postgres_changes_resume"]["epoch"]
    orders_db.execute("UPDATE orders SET total = 0 WHERE id = 42")
    await wait_totals(client, "realtime:o", 1)
    last = pushes(client, "realtime:o")[-1][4]["data"]["position"]
    await client.close()
    orders_db.execute("UPDATE orders SET total = 1 WHERE id = 42")  # while Tidings still runs
    await seen_total(watcher, 1)
    await asyncio.sleep(0.5)  # so that the slot confirms it: the restart does not stream it again
    server.stop(signal.SIGKILL)
    orders_db.execute("UPDATE orders SET total = 2 WHERE id = 42")  # while it is down
    server.start()
    client = await PhxClient.open(server.http_url)
    resume = (await resume_join(client, "realtime:o", ORDER_42, {"since": last, "epoch": epoch}))[
        "postgres_changes_resume"
    ]
    if broker:
        assert resume["recovered"] is True and resume["epoch"] == epoch, resume
        async with asyncio.timeout(30):  # replayed, or streamed by the new leader once it leads
            while 2 not in totals(client, "realtime:o"):
                await asyncio.sleep(0.05)
        assert totals(client, "realtime:o") == [1, 2]
    else:
        assert resume["recovered"] is False and resume["epoch"] != epoch, resume
        # The update committed while down was streamed (and logged) by the new process.
        async with asyncio.timeout(30):
            while 2 not in totals(client, "realtime:o"):
                await asyncio.sleep(0.05)
        assert 0 not in totals(client, "realtime:o")
    orders_db.execute("UPDATE orders SET total = 3 WHERE id = 42")
    async with asyncio.timeout(30):
        while 3 not in totals(client, "realtime:o"):
            await asyncio.sleep(0.05)
    assert len(totals(client, "realtime:o")) == len(set(totals(client, "realtime:o")))


def get_changes(server: ServerProcess, token: str | None = None, **params: Any) -> tuple[int, dict[str, Any]]:
    """``GET /api/changes`` (a blocking call: run it in a thread)."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    request = urllib.request.Request(f"{server.http_url}/api/changes?{query}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


async def poll(server: ServerProcess, token: str | None = None, **params: Any) -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(get_changes, server, token, **params)


ORDER_42_QUERY = {"schema": "public", "table": "orders", "filter": "id=eq.42", "event": "UPDATE"}


async def test_polling_the_log_pages_without_gaps_or_duplicates(
    orders_db: Database, tidings: Callable[..., ServerProcess], broker: dict[str, str]
) -> None:
    server = tidings(DB_REPLAY_MAX_CHANGES="2", **broker)
    watcher = await observer(server)
    status, first = await poll(server, **ORDER_42_QUERY)
    assert status == 200 and first["changes"] == [] and POSITION.match(first["position"]), first
    for i in range(1, 6):
        orders_db.execute("UPDATE orders SET total = %s WHERE id = 42", (i,))
        orders_db.execute("UPDATE orders SET total = %s WHERE id = 7", (i,))
    await seen_total(watcher, 5)
    got: list[Any] = []
    since, pages = first["position"], 0
    while True:  # pages of at most DB_REPLAY_MAX_CHANGES, each from where the last ended
        status, page = await poll(server, **ORDER_42_QUERY, since=since, epoch=first["epoch"])
        assert status == 200 and page["recovered"] is True, page
        got += [c["data"]["record"]["total"] for c in page["changes"]]
        assert all(c["data"]["position"] > since for c in page["changes"])
        since, pages = page["position"], pages + 1
        if not page["more"]:
            break
    assert got == [1, 2, 3, 4, 5] and pages == 3
    # A long-poll: nothing newer yet, so it waits for the next matching change.
    waiting = asyncio.ensure_future(poll(server, **ORDER_42_QUERY, since=since, timeout=20))
    await asyncio.sleep(0.3)
    orders_db.execute("UPDATE orders SET total = 99 WHERE id = 7")  # not for it: it keeps waiting
    orders_db.execute("UPDATE orders SET total = 6 WHERE id = 42")
    status, page = await asyncio.wait_for(waiting, 30)
    assert status == 200 and [c["data"]["record"]["total"] for c in page["changes"]] == [6]


async def test_polling_refuses_bad_input(tidings: Callable[..., ServerProcess]) -> None:
    server = tidings()
    status, body = await poll(server, **ORDER_42_QUERY, since="nope")
    assert status == 422 and body["error"].startswith("PostgresChangesResumeInvalid: ")
    status, body = await poll(server, **ORDER_42_QUERY, since="7FFFFFFFFFFFFFFF/00000000")
    assert status == 422 and "is ahead of the database" in body["error"]
    status, body = await poll(server, schema="public", table="orders", filter="ghost=eq.1")
    assert status == 422 and "ghost" in body["error"]
    status, body = await poll(server, schema="public", table="nope")
    assert status == 422 and "Unable to subscribe" in body["error"]
    status, body = await poll(server, **ORDER_42_QUERY, timeout="soon")
    assert status == 422 and body["errors"] == {"timeout": ["must be a number"]}


SECRET = "resume-test-secret-resume-test-32"


def notes_of(client: PhxClient, topic: str) -> list[int]:
    return [m[4]["data"]["record"]["id"] for m in pushes(client, topic)]


async def test_rls_applies_to_the_replay_and_to_polls(
    db: Database, tidings: Callable[..., ServerProcess]
) -> None:
    """A replay never holds a row the live stream would not deliver: alice and bob resume the same
    binding on the notes table (row level security, own notes only) and get their own rows."""
    ensure_role(db, "authenticated")
    db.execute(SCHEMA)
    server = tidings(JWT_SECRET=SECRET)
    apikey = mint_token(SECRET, role="anon")
    binding = {"event": "INSERT", "schema": "public", "table": "notes"}
    tokens = {sub: mint_token(SECRET, role="authenticated", sub=sub) for sub in ("alice", "bob")}
    baseline: dict[str, dict[str, Any]] = {}
    for sub, token in tokens.items():
        client = await PhxClient.open(server.http_url, "&apikey=" + apikey)
        config = {"postgres_changes": [binding], "postgres_changes_options": {"resume": True}}
        ref = await client.push("realtime:notes", "phx_join", {"config": config, "access_token": token}, "j")
        reply = await client.wait(lambda m, ref=ref: m[3] == "phx_reply" and m[1] == ref)
        assert reply[4]["status"] == "ok", reply
        baseline[sub] = reply[4]["response"]["postgres_changes_resume"]
        await client.close()
    watcher = await PhxClient.open(server.http_url, "&apikey=" + apikey)
    await watcher.push(
        "realtime:w", "phx_join", {"config": {"postgres_changes": [{**binding, "table": "plain"}]}}, "w"
    )
    await watcher.wait(lambda m: m[3] == "system" and m[2] == "realtime:w", timeout=30)
    db.execute("INSERT INTO notes VALUES (1, 'alice', 'a'), (2, 'bob', 'b'), (3, 'alice', 'c')")
    db.execute("INSERT INTO plain VALUES (10, 'anyone')")
    await watcher.wait(lambda m: m[3] == "postgres_changes", timeout=30)  # the notes are logged too
    for sub, want in (("alice", [1, 3]), ("bob", [2])):
        client = await PhxClient.open(server.http_url, "&apikey=" + apikey)
        resume = {"since": baseline[sub]["position"], "epoch": baseline[sub]["epoch"]}
        config = {"postgres_changes": [binding], "postgres_changes_options": {"resume": resume}}
        ref = await client.push(
            "realtime:notes", "phx_join", {"config": config, "access_token": tokens[sub]}, "j2"
        )
        reply = await client.wait(lambda m, ref=ref: m[3] == "phx_reply" and m[1] == ref)
        assert reply[4]["response"]["postgres_changes_resume"]["recovered"] is True, reply
        await client.wait(lambda m: m[3] == "system" and m[2] == "realtime:notes", timeout=30)
        assert notes_of(client, "realtime:notes") == want, sub
        status, page = await poll(
            server, tokens[sub], schema="public", table="notes", since=baseline[sub]["position"]
        )
        assert status == 200 and [c["data"]["record"]["id"] for c in page["changes"]] == want, page
    status, _ = await poll(server, None, schema="public", table="notes")
    assert status == 401  # no token: as a join without one


@pytest.mark.redis
@pytest.mark.parametrize("redis_kind", ["redis", "redis-cluster"])
async def test_a_client_resumes_on_another_node_after_the_leader_died(
    orders_db: Database, redis_kind: str
) -> None:
    """Two nodes: the client follows its order on the lease holder, which dies while updates
    commit; the client resumes on the other node, which took the lease over. It gets exactly what
    it missed: the log lives in Redis, and the survivor's own mirror of it started over at the hole."""
    redis = RedisServer() if redis_kind == "redis" else RedisClusterServers(masters=3)
    redis.start()
    slot = unique_slot()
    env = {"DATABASE_URL": orders_db.dsn, "DB_SLOT": slot, "DB_RESUME_GRACE": "0"}
    env |= {"REDIS_URL": redis.url, "NODE_TIMEOUT": "3s"}
    nodes = [ServerProcess(env=dict(env)).start() for _ in range(2)]
    try:
        leader = await wait_for_leader(nodes)
        survivor = nodes[1] if leader is nodes[0] else nodes[0]
        watcher = await observer(survivor)
        client = await PhxClient.open(leader.http_url)
        reply = await resume_join(client, "realtime:o", ORDER_42, True)
        epoch = reply["postgres_changes_resume"]["epoch"]
        orders_db.execute("UPDATE orders SET total = 0 WHERE id = 42")
        await wait_totals(client, "realtime:o", 1)
        last = pushes(client, "realtime:o")[-1][4]["data"]["position"]
        await client.close()
        for i in range(1, 4):  # while the client is away, with the leader still up
            orders_db.execute("UPDATE orders SET total = %s WHERE id = 42", (i,))
        await seen_total(watcher, 3)
        leader.kill()
        for i in range(4, 6):  # and once it died: the survivor streams them when it leads
            orders_db.execute("UPDATE orders SET total = %s WHERE id = 42", (i,))
        await seen_total(watcher, 5)
        client = await PhxClient.open(survivor.http_url)
        resume = (await resume_join(client, "realtime:o", ORDER_42, {"since": last, "epoch": epoch}))[
            "postgres_changes_resume"
        ]
        assert resume["recovered"] is True and resume["epoch"] == epoch, resume
        assert totals(client, "realtime:o") == [1, 2, 3, 4, 5]
    finally:
        for node in nodes:
            node.stop()
        redis.cleanup()
