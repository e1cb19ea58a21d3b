"""Names of any size, and logs a client can flood or forge (issue 11, section 2).

Attacks in miniature: topics and event names over a lowered cap, a flood of refused joins with
huge topics from one connection (the log must stay small, the delayed replies must not hold the
topics), a topic carrying CR/LF and a forged log line. Pure parts (the line limiter, clipping,
join validation) are unit-tested here too.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest

from tests.server.test_bad_input import WAIT, heartbeat_ok, join, member, metric, open_ws, recv_json, ws_url
from tests.support.server import ServerProcess
from tidings.logs import CLIP_CHARS, LineLimiter, clip_text, redact, setup_logging
from tidings.protocol.join import JoinError, name_too_long, parse_join

ServerFactory = Callable[..., ServerProcess]


# -- pure parts -------------------------------------------------------------------------------------


def test_name_too_long_counts_utf8_bytes() -> None:
    assert not name_too_long("a" * 255, 255)
    assert name_too_long("a" * 256, 255)
    assert not name_too_long("é" * 127, 255)  # 254 bytes
    assert name_too_long("é" * 128, 255)  # 256 bytes in 128 characters


def test_parse_join_refuses_a_topic_over_the_cap_and_accepts_one_at_it() -> None:
    assert parse_join("realtime:" + "t" * 32, {}, max_topic_bytes=32).sub_topic == "t" * 32
    with pytest.raises(JoinError) as info:
        parse_join("realtime:" + "t" * 33, {}, max_topic_bytes=32)
    assert info.value.reason == "TopicNameTooLong: Topic names are limited to 32 bytes"
    assert info.value.too_long
    assert "t" * 33 not in info.value.reason  # the reason never echoes the name


def test_parse_join_refuses_a_presence_key_over_the_cap() -> None:
    payload = {"config": {"presence": {"key": "k" * 20}}}
    assert parse_join("realtime:r", payload, max_key_bytes=20).presence_key == "k" * 20
    with pytest.raises(JoinError) as info:
        parse_join("realtime:r", {"config": {"presence": {"key": "k" * 21}}}, max_key_bytes=20)
    assert info.value.reason == "InvalidJoinPayload: Presence keys are limited to 20 bytes"


def test_clip_text_cuts_escapes_and_says_how_much_was_left_out() -> None:
    assert clip_text("room") == "room"
    clipped = clip_text("x" * 1000)
    assert clipped == "x" * CLIP_CHARS + f"…(+{1000 - CLIP_CHARS} bytes)"
    assert clip_text("a\r\nb\x00c\x85d\u2028e\tf") == "a\\x0d\\x0ab\\x00c\\x85d\\u2028e\tf"
    assert clip_text("é" * 3, limit=1) == "é…(+4 bytes)"


def test_clip_text_redacts_before_cutting() -> None:
    secret = "clip-test-secret-0123456789"
    redact(secret)
    text = clip_text("y" * (CLIP_CHARS - 5) + secret)
    assert text.startswith("y" * (CLIP_CHARS - 5) + "[reda…")  # the marker is cut, not the secret
    assert "clip-" not in text


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, list[str], LineLimiter, FakeClock]]:
    clock = FakeClock()
    limiter = LineLimiter(per_window=3, window=10.0, clock=clock)
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect()
    handler.addFilter(limiter)
    logger = logging.getLogger("tests.security.limiter")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logger, lines, limiter, clock
    finally:
        logger.handlers[:] = []
        logger.propagate = True


def test_line_limiter_writes_n_lines_of_a_kind_per_window_then_one_summary(
    captured: tuple[logging.Logger, list[str], LineLimiter, FakeClock],
) -> None:
    logger, lines, limiter, clock = captured
    for i in range(50):
        logger.info("join %s refused: %s", f"realtime:{i}", "reason")
    logger.info("another kind of line")  # a different template is not limited by the first
    assert lines == [f"join realtime:{i} refused: reason" for i in range(3)] + ["another kind of line"]
    assert limiter.suppressed_total == 47
    clock.now += 10.0
    logger.info("join %s refused: %s", "realtime:next", "reason")
    assert lines[4:] == [
        "suppressed 47 similar lines in the last 10 s: join %s refused: %s",
        "join realtime:next refused: reason",
    ]


def test_line_limiter_flush_reports_a_flood_that_stopped(
    captured: tuple[logging.Logger, list[str], LineLimiter, FakeClock],
) -> None:
    logger, lines, limiter, clock = captured
    for _ in range(10):
        logger.warning("closing slow consumer")
    limiter.flush()  # the window is not over: nothing to report yet
    assert len(lines) == 3
    clock.now += 11.0
    limiter.flush()
    assert lines[3:] == ["suppressed 7 similar lines in the last 10 s: closing slow consumer"]
    limiter.flush()
    assert len(lines) == 4  # reported once


def test_line_limiter_off_with_zero(
    captured: tuple[logging.Logger, list[str], LineLimiter, FakeClock],
) -> None:
    logger, lines, limiter, _ = captured
    limiter.per_window = 0
    for _ in range(30):
        logger.info("same line")
    assert len(lines) == 30


@pytest.fixture
def root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_control_characters_never_start_a_line(root_logger: None, fmt: str) -> None:
    stream = io.StringIO()
    setup_logging("info", fmt, stream=stream)
    forged = "2099-01-01 00:00:00,000 ERROR tidings.node: FORGED"
    logging.getLogger("tidings.test").info("join %s refused", f"realtime:x\r\n{forged}")
    logging.getLogger("tidings.test").info("fields", extra={"fields": {"topic": f"a\n{forged}"}})
    text = stream.getvalue()
    assert len(text.splitlines()) == 2
    assert not any(line.startswith("2099") for line in text.splitlines())


# -- against a real server ---------------------------------------------------------------------------


async def test_topic_over_the_cap_gets_the_join_error_and_one_at_the_cap_joins(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(env={"MAX_TOPIC_LENGTH": "32"})
    async with open_ws(ws_url(srv)) as ws, httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        assert (await join(ws, "realtime:" + "a" * 32))["status"] == "ok"
        long_topic = "realtime:" + "b" * 33
        await ws.send(orjson.dumps(["2", "2", long_topic, "phx_join", {"config": {}}]).decode())
        reply = await recv_json(ws)
        assert reply == [
            "2",
            "2",
            long_topic,  # echoed: the clients match the reply by topic and ref
            "phx_reply",
            {
                "status": "error",
                "response": {"reason": "TopicNameTooLong: Topic names are limited to 32 bytes"},
            },
        ]
        assert await metric(http, "tidings_names_too_long_total") == 1
        await heartbeat_ok(ws)


async def test_broadcast_event_over_the_cap_is_dropped_and_counted(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"MAX_EVENT_LENGTH": "16"})
    async with (
        member(srv) as sender,
        member(srv, broadcast={"self": False}) as receiver,
        httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http,
    ):
        malformed = await metric(http, 'tidings_messages_dropped_total{reason="malformed"}')
        for event, n in (("e" * 17, 1), ("e" * 16, 2)):
            body = {"type": "broadcast", "event": event, "payload": {"n": n}}
            await sender.send(orjson.dumps(["1", str(n), "realtime:room", "broadcast", body]).decode())
        got = await recv_json(receiver)
        assert (got[3], got[4]["event"], got[4]["payload"]) == ("broadcast", "e" * 16, {"n": 2})
        assert await metric(http, "tidings_names_too_long_total") == 1
        assert await metric(http, 'tidings_messages_dropped_total{reason="malformed"}') == malformed + 1


async def test_a_flood_of_refused_huge_topics_writes_a_bounded_log(server_factory: ServerFactory) -> None:
    # 400 KB topics in refused joins wrote 1.1 GB of log in 10 s from one connection. Here: 150
    # refused joins with 100 KB topics (15 MB of topics) from one connection.
    srv = server_factory(env={"LOG_RATE_LIMIT": "10"})
    before = len(srv.logs().encode())
    topic = "realtime:" + "z" * 100_000
    joins = 150
    async with open_ws(ws_url(srv)) as ws, httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        for i in range(joins):
            await ws.send(orjson.dumps([str(i), str(i), topic, "phx_join", {"config": {}}]).decode())
            reply = await recv_json(ws)  # lock-step: each join is answered (not dropped as a flood)
            assert reply[4]["response"]["reason"].startswith("TopicNameTooLong"), reply[4]
        assert await metric(http, "tidings_joins_refused_total") == joins
        assert await metric(http, "tidings_log_lines_suppressed_total") >= joins - 10
        await heartbeat_ok(ws)
    written = len(srv.logs().encode()) - before
    # At most 10 lines of ~200 characters of topic each, plus the start-up lines of the test's
    # last requests: far below one topic.
    assert written < 16_000, written


async def test_refused_joins_hold_only_small_replies_for_the_backoff(server_factory: ServerFactory) -> None:
    # The delayed join errors held 655 MB of topics. A reply too big to hold is sent at once,
    # and a connection may have at most MAX_PENDING_JOIN_ERRORS replies waiting.
    srv = server_factory(env={"CHANNEL_ERROR_BACKOFF_MS": "2s", "MAX_PENDING_JOIN_ERRORS": "3"})
    async with open_ws(ws_url(srv)) as ws, httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        huge = "realtime:" + "h" * 20_000
        await ws.send(orjson.dumps(["h", "h", huge, "phx_join", {"config": {}}]).decode())
        for ref in ("1", "2", "3", "4", "5"):  # small replies: topic "realtime:" is refused
            await ws.send(orjson.dumps([ref, ref, "realtime:", "phx_join", {}]).decode())
        refs = [(await recv_json(ws))[1] for _ in range(6)]
        # Not held: the huge one and the two beyond the budget; then the three held ones.
        assert refs[:3] == ["h", "4", "5"], refs
        assert sorted(refs[3:]) == ["1", "2", "3"], refs
        assert await metric(http, "tidings_join_errors_undelayed_total") == 3
        await heartbeat_ok(ws)


async def test_crlf_in_a_topic_forges_no_log_line(server: ServerProcess) -> None:
    forged = "2099-01-01 00:00:00,000 ERROR tidings.node: FORGED everything is on fire"
    topic = f"realtime:x\r\n{forged}\n{forged}"
    async with open_ws(ws_url(server)) as ws:
        # An invalid replay: refused, and the refusal logs the topic.
        payload = {"config": {"broadcast": {"replay": "bad"}}}
        await ws.send(orjson.dumps(["1", "1", topic, "phx_join", payload]).decode())
        assert (await recv_json(ws))[4]["status"] == "error"
    deadline = asyncio.get_running_loop().time() + WAIT
    while "refused" not in server.logs():
        assert asyncio.get_running_loop().time() < deadline, server.logs()
        await asyncio.sleep(0.05)
    lines = server.logs().splitlines()
    assert not [line for line in lines if line.startswith("2099")]
    assert all("refused" in line for line in lines if "FORGED" in line)  # only inside the real line
    refused = [line for line in lines if "refused" in line]
    assert len(refused) == 1 and "x\\x0d\\x0a2099-01-01" in refused[0], refused


async def test_rest_broadcasts_with_names_over_the_caps_get_422(server_factory: ServerFactory) -> None:
    srv = server_factory(env={"MAX_TOPIC_LENGTH": "32", "MAX_EVENT_LENGTH": "16"})
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        ok = {"topic": "t" * 32, "event": "e" * 16, "payload": {}}
        assert (await http.post("/api/broadcast", json={"messages": [ok]})).status_code == 202
        long_topic = {**ok, "topic": "t" * 33}
        long_event = {**ok, "event": "e" * 17}
        r = await http.post("/api/broadcast", json={"messages": [ok, long_topic, long_event]})
        assert (r.status_code, r.json()) == (
            422,
            {
                "errors": {
                    "messages[1].topic": ["should be at most 32 byte(s)"],
                    "messages[2].event": ["should be at most 16 byte(s)"],
                }
            },
        )
        r = await http.post(f"/api/broadcast/{'t' * 33}/events/e", json={})
        assert (r.status_code, r.json()) == (422, {"errors": {"topic": ["should be at most 32 byte(s)"]}})
        r = await http.post(f"/api/broadcast/t/events/{'e' * 17}", json={})
        assert (r.status_code, r.json()) == (422, {"errors": {"event": ["should be at most 16 byte(s)"]}})
        assert (await http.post(f"/api/broadcast/{'t' * 32}/events/{'e' * 16}", json={})).status_code == 202
        assert await metric(http, "tidings_names_too_long_total") == 4
