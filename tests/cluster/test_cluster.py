"""Several Tidings processes sharing one Redis: workers, nodes behind nginx, and their faults."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.support.nginx import Nginx
from tests.support.phx import PhxClient
from tests.support.redis import RedisClusterServers, RedisServer
from tests.support.server import ServerProcess

pytestmark = pytest.mark.redis


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """One redis-server, or a 3-primary Redis Cluster (sharded pub/sub): every test runs on both."""
    server = RedisServer() if request.param == "redis" else RedisClusterServers(masters=3)
    server.start()
    yield server.url
    server.cleanup()


def node(redis_url: str, **env: str) -> ServerProcess:
    return ServerProcess(env={"REDIS_URL": redis_url, "NODE_TIMEOUT": "3s", **env}).start()


async def rest_broadcast(http_url: str, topic: str, event: str, payload: dict[str, object]) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.post(
            f"{http_url}/api/broadcast",
            json={"messages": [{"topic": topic, "event": event, "payload": payload}]},
        )
        assert r.status_code == 202


async def test_broadcast_and_presence_cross_nodes(redis_url: str) -> None:
    a, b = node(redis_url), node(redis_url)
    try:
        ca, cb = await PhxClient.open(a.http_url), await PhxClient.open(b.http_url)
        for c, key in ((ca, "alice"), (cb, "bob")):
            await c.join("realtime:room", {"presence": {"key": key, "enabled": True}})
        await ca.push(
            "realtime:room", "presence", {"type": "presence", "event": "track", "payload": {"n": 1}}, "1"
        )
        await cb.push(
            "realtime:room", "presence", {"type": "presence", "event": "track", "payload": {"n": 2}}, "1"
        )
        for c in (ca, cb):
            for key in ("alice", "bob"):
                await c.wait(lambda m, k=key: m[3] == "presence_diff" and k in m[4]["joins"])
        # A third client joining on either node gets one consistent state.
        for http_url in (a.http_url, b.http_url):
            late = await PhxClient.open(http_url)
            await late.join("realtime:room", {"presence": {"enabled": True}})
            state = (await late.wait(lambda m: m[3] == "presence_state"))[4]
            assert set(state) == {"alice", "bob"}
            await late.close()
        await ca.push(
            "realtime:room", "broadcast", {"type": "broadcast", "event": "hi", "payload": {"from": "a"}}, "1"
        )
        got = await cb.wait(lambda m: m[3] == "broadcast")
        assert got[4]["payload"] == {"from": "a"} and isinstance(got[4]["meta"]["seq"], int)
        # A node that dies without a goodbye: its members leave everyone else's presence.
        a.kill()
        diff = await cb.wait(lambda m: m[3] == "presence_diff" and "alice" in m[4]["leaves"], timeout=15)
        assert diff[4]["joins"] == {}
        await cb.close()
    finally:
        a.stop()
        b.stop()


async def test_workers_share_the_port_and_the_channels(redis_url: str) -> None:
    # Two workers each prepare a node (on a Redis Cluster: a slot map per worker) before the
    # port answers; on a loaded machine that takes more than the default 20 s.
    server = ServerProcess(env={"REDIS_URL": redis_url}, args=["--workers", "2"]).start(timeout=60.0)
    try:
        assert server.proc is not None
        children = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == server.proc.pid]
        workers = [
            p for p in children if b"multiprocessing" in _cmdline(int(p)) or b"tidings" in _cmdline(int(p))
        ]
        assert len(workers) >= 2
        clients = [await PhxClient.open(server.http_url) for _ in range(16)]
        for c in clients:
            await c.join("realtime:shared")
        await rest_broadcast(server.http_url, "shared", "all", {"n": 1})
        for c in clients:
            await c.wait(lambda m: m[3] == "broadcast" and m[4]["event"] == "all")
        for c in clients:
            await c.close()
    finally:
        server.stop()


def test_workers_without_redis_fail_with_one_line() -> None:
    proc = ServerProcess(args=["--workers", "2"])
    with pytest.raises(RuntimeError) as err:
        proc.start(timeout=10)
    assert "WORKERS" in str(err.value) and "REDIS_URL" in str(err.value)


async def test_node_killed_behind_nginx_clients_recover_everything(redis_url: str) -> None:
    a, b = node(redis_url), node(redis_url)
    proxy = Nginx([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]).start()
    try:
        clients = [await PhxClient.open(proxy.http_url) for _ in range(5)]
        for c in clients:
            await c.join("realtime:orders")
        published = []
        for i in range(10):
            await rest_broadcast(b.http_url, "orders", "update", {"n": i})
            published.append(i)
        for c in clients:
            await c.wait(lambda m: m[3] == "broadcast" and m[4]["payload"]["n"] == 9)
        # ip_hash put every client on one node; kill whichever it is.
        victim, survivor = (a, b) if _has_connections(a) else (b, a)
        victim.kill()
        for c in clients:
            await asyncio.wait_for(c.closed, 10)
        # Published while the clients are away: they must get these on rejoin.
        for i in range(10, 20):
            await rest_broadcast(survivor.http_url, "orders", "update", {"n": i})
        for old in clients:
            last_seq = max(p["meta"]["seq"] for p in old.broadcasts("update"))
            new = await PhxClient.open(proxy.http_url)
            reply = await new.join(
                "realtime:orders", {"broadcast": {"replay": {"since_seq": last_seq, "limit": 100}}}
            )
            assert reply["response"]["recovered"] is True
            await rest_broadcast(survivor.http_url, "orders", "live", {"n": 99})
            await new.wait(lambda m: m[3] == "broadcast" and m[4]["event"] == "live")
            seen = [p["payload"]["n"] for p in old.broadcasts("update") + new.broadcasts("update")]
            assert sorted(set(seen)) == list(range(20)), seen
            await new.close()
    finally:
        proxy.stop()
        a.stop()
        b.stop()


async def test_redis_restart_nodes_continue() -> None:
    redis_server = RedisServer(persist=True).start()
    a, b = node(redis_server.url), node(redis_server.url)
    try:
        ca, cb = await PhxClient.open(a.http_url), await PhxClient.open(b.http_url)
        await ca.join("realtime:r")
        await cb.join("realtime:r")
        await rest_broadcast(a.http_url, "r", "before", {})
        await cb.wait(lambda m: m[3] == "broadcast" and m[4]["event"] == "before")
        redis_server.restart(down_for=0.5)
        async with asyncio.timeout(20):
            while True:
                try:
                    await rest_broadcast(a.http_url, "r", "after", {})
                    await cb.wait(lambda m: m[3] == "broadcast" and m[4]["event"] == "after", timeout=1)
                    break
                except (TimeoutError, AssertionError):
                    await asyncio.sleep(0.2)
        await ca.wait(lambda m: m[3] == "broadcast" and m[4]["event"] == "after")
        assert not [m for m in cb.inbox if m[3] == "phx_error"]  # nothing lost: no loss reported
    finally:
        a.stop()
        b.stop()
        redis_server.cleanup()


async def test_slow_subscriber_on_one_node_does_not_slow_the_others(redis_url: str) -> None:
    a = node(redis_url, MAX_UNSENT_BYTES="65536", MAX_MESSAGES_PER_SECOND="100000")
    b = node(redis_url)
    try:
        slow = await _slow_client(a.http_url)
        await slow.join("realtime:flood")
        slow._reader.cancel()  # stops reading: its small socket buffer fills up, then the server's
        fast_a, fast_b = await PhxClient.open(a.http_url), await PhxClient.open(b.http_url)
        await fast_a.join("realtime:flood")
        await fast_b.join("realtime:flood")
        blob = "x" * 10_000
        total = 1600  # 16 MB: more than the kernel buffers between server and slow client hold
        async with httpx.AsyncClient() as c:
            for i in range(0, total, 100):
                batch = [
                    {"topic": "flood", "event": "m", "payload": {"n": n, "blob": blob}}
                    for n in range(i, i + 100)
                ]
                r = await c.post(f"{a.http_url}/api/broadcast", json={"messages": batch})
                assert r.status_code == 202
        for c in (fast_a, fast_b):
            await c.wait(lambda m: m[3] == "broadcast" and m[4]["payload"]["n"] == total - 1, timeout=30)
            assert len(c.broadcasts("m")) == total
        assert await asyncio.wait_for(slow.closed, 10) in (1013, None)
        metrics = httpx.get(f"{a.http_url}/metrics").text
        assert "tidings_slow_consumer_closes_total 1" in metrics
    finally:
        a.stop()
        b.stop()


async def _slow_client(http_url: str) -> PhxClient:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(http_url.rsplit(":", 1)[1])))
    sock.setblocking(False)
    url = http_url.replace("http", "ws", 1) + "/realtime/v1/websocket?vsn=2.0.0"
    return PhxClient(await connect(url, sock=sock, max_queue=1, max_size=None))


def _has_connections(server: ServerProcess) -> bool:
    r = httpx.get(f"{server.http_url}/api/health")
    return bool(r.json()["connections"])


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""




async def test_history_endpoint_takes_topics_with_slashes(redis_url: str) -> None:
    server = node(redis_url)
    try:
        await rest_broadcast(server.http_url, "org/1/orders", "e", {"n": 1})
        async with httpx.AsyncClient() as c:
            async with asyncio.timeout(5):
                while True:
                    r = await c.get(f"{server.http_url}/api/channels/org%2F1%2Forders/messages")
                    assert r.status_code == 200
                    if r.json()["messages"]:
                        break
                    await asyncio.sleep(0.05)
        assert r.json()["messages"][0]["payload"] == {"n": 1}
    finally:
        server.stop()
