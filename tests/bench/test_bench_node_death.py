"""``tidings bench node-death``: two nodes on one Redis behind a real nginx, one SIGKILLed.

Accounting only (everyone rejoins, replays fill the gap, nothing is lost), never timing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.redis import RedisServer
from tidings.bench.nginx import deploy_conf, site_config
from tidings.bench.wire import PhoenixDialect, read_seq, read_t_n
from tidings.bench.worker import RECOVERY_NOT_ASKED, Worker, WorkerSpec

from .test_bench_runs import bench, sane_latency

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = RedisServer(persist=False).start()
    try:
        yield server.url
    finally:
        server.stop()


def test_join_asks_for_a_replay_since_a_seq() -> None:
    text = PhoenixDialect().join(3, "realtime:x", None, None, {"since_seq": 41, "limit": 25})
    broadcast = orjson.loads(text)[4]["config"]["broadcast"]
    assert broadcast == {"self": False, "ack": False, "replay": {"since_seq": 41, "limit": 25}}
    plain = orjson.loads(PhoenixDialect().join(3, "realtime:x", None))
    assert "replay" not in plain[4]["config"]["broadcast"]


def test_meta_seq_is_read_after_the_payload() -> None:
    live = orjson.dumps(
        [
            None,
            None,
            "realtime:x",
            "broadcast",
            {
                "type": "broadcast",
                "event": "bench",
                "payload": {"t": 5, "n": 6, "p": "xx"},
                "meta": {"id": "a-b", "seq": 17},
            },
        ]
    )
    assert read_t_n(live) == (5, 6) and read_seq(live) == 17
    replayed = live.replace(b'"seq":17}', b'"seq":18,"replayed":true}')
    assert read_seq(replayed) == 18
    assert read_seq(b'[null,null,"realtime:x","broadcast",{"payload":{"t":1,"n":2}}]') == -1


class _Conn:
    """The attributes of a ClientConn the worker reads."""

    def __init__(self, idx: int, response: Any = None, replay: dict[str, int] | None = None) -> None:
        self.idx = idx
        self.join_response = response
        self.replay = replay
        self.t_joined = 1
        self.t_start = 0


async def test_worker_follows_seq_and_counts_each_update_once() -> None:
    import multiprocessing

    parent, child = multiprocessing.Pipe()
    spec = WorkerSpec(0, "127.0.0.1", 1, "phoenix", "2.0.0", ["127.0.0.2"], None, 0, 10)
    w = Worker(spec, child)
    w.track_seq = True
    conn: Any = _Conn(7, {"seq": 40})
    w.on_joined(conn)
    assert w.last_seq[7] == 40 and w.join_log[7][0][1] == RECOVERY_NOT_ASKED
    w.on_seq(conn, 1, 1, 41, False)
    w.on_seq(conn, 1, 2, 42, False)
    # A rejoin that asked for a replay: the reply's seq does not move the baseline.
    again: Any = _Conn(7, {"seq": 45, "recovered": True}, {"since_seq": 42, "limit": 25})
    w.on_joined(again)
    assert w.last_seq[7] == 42 and w.join_log[7][-1][1:] == (1, 42, 45)
    w.on_seq(again, 1, 2, 42, True)  # replayed duplicate
    w.on_seq(again, 1, 3, 43, True)
    assert w.last_seq[7] == 43 and w.dups == 1 and w.replayed == 2
    assert sorted(w.first_rx[7]) == [1, 2, 3] and w.received == 3
    parent.close()
    child.close()


def test_site_config_keeps_deploy_conf_but_backends_and_listen() -> None:
    template = deploy_conf().read_text()
    site = site_config(template, ["127.0.0.1:5001", "127.0.0.1:5002"], 8123)
    assert "ip_hash;" in site and "proxy_set_header Upgrade $http_upgrade;" in site
    assert "10.0.0." not in site
    assert "server 127.0.0.1:5001 max_fails=3 fail_timeout=30s;" in site
    assert "server 127.0.0.1:5002 max_fails=3 fail_timeout=30s;" in site
    assert "listen 127.0.0.1:8123 reuseport;" in site


def test_node_death_everyone_recovers_and_nothing_is_lost(tmp_path: Path, redis_url: str) -> None:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.fail("nginx is needed: run `make deps` (scripts/install-system-deps.sh)")
    args = ["node-death", "-n", "200", "--rate", "50", "--channels", "10", "--backoff-ms", "300"]
    reports = bench(tmp_path, *args, "--redis-url", redis_url, timeout=180)
    assert set(reports) == {"tidings-nginx"}
    r = reports["tidings-nginx"]
    assert r["status"] == "ok", r
    m = r["metrics"]
    assert m["clients"] == 200 and m["connect_failed"] == 0
    # ip_hash sends every 127.0.0.x client to one node, the one that is killed.
    assert m["connections_before_kill"] == {"victim": 200, "survivor": 0}
    assert m["survivor_connections_after"] == 200
    assert m["rejoined"] == 200 and m["not_rejoined"] == 0
    assert m["rejoins_without_replay"] == 0 and m["replies_without_recovered_flag"] == 0
    assert m["recovered"] == 200 and m["not_recovered"] == 0 and m["all_recovered"]
    assert m["lost"] == 0 and m["missing_at_rejoin"] == 0 and m["ended_disconnected"] == 0
    # Updates flowed while the node was down and came back as replays.
    assert m["updates_accepted"] == m["updates_sent"] > 0
    assert m["updates_accepted_during_recovery"] > 0 and m["replayed_received"] > 0
    assert m["delivered"] == m["updates_accepted"] * 200 // 10  # 20 clients a channel, each once
    sane_latency(m["delivery_latency_ms"], m["delivered"])
    for key in ("rejoin_since_kill_s", "recovered_since_kill_s"):
        assert 0 <= m[key]["p50"] <= m[key]["p99"] <= m[key]["100%"]
    assert m["recovered_since_kill_s"]["100%"] >= m["rejoin_since_kill_s"]["p50"]
    assert m["recovered_after_backoff_ms"]["count"] == 200
    assert [t["met"] is not None for t in r["targets"]] == [True, True]
    assert r["params"]["replay_limit"] == 25
    assert m["redis_connections_opened_during_recovery"] >= 0
    assert all(v >= 0 for v in m["cpu_during_recovery_s"].values())


def test_node_death_is_only_for_the_nginx_target(tmp_path: Path) -> None:
    reports = bench(tmp_path, "node-death", "-n", "5", "--against", "tidings")
    assert reports["tidings"]["status"] == "n/a"
