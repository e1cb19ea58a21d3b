"""The lean WebSocket upgrade (issue 14): recognised from the request head with one parse.

Against a real server over raw TCP:

* every upgrade request, well-formed or not, gets the answer the previous path gave (websockets'
  ``Request``/``Headers``/``ServerProtocol.accept`` behind uvicorn's httptools protocol). The
  expected answers below were recorded from that path (commit e052691) with
  ``python tests/server/test_lean_upgrade.py record``;
* every split of an upgrade request head, and of the frames that follow it in the same
  segments, gives the same answer (hypothesis chooses the splits);
* requests that are not upgrades still reach the ASGI app, also when their head is split.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from websockets.datastructures import Headers
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from tests.support.server import ServerProcess
from tidings.auth.tokens import mint_token
from tidings.server.http_protocol import UpgradeHead, parse_upgrade_head
from tidings.server.websocket import open_server_protocol, query_values, switching_protocols

SECRET = "lean-upgrade-test-secret-that-is-long-enough-for-hs256"
ALLOWED = "https://ok.example"
WAIT = 10.0
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(
    hashlib.sha1((KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
).decode()
TOKEN = mint_token(SECRET, role="authenticated", sub="lean-user", exp_in=3600)
WS = "/realtime/v1/websocket?vsn=2.0.0&apikey=" + TOKEN
ENV = {
    "JWT_SECRET": SECRET,
    "ALLOWED_ORIGINS": ALLOWED,
    "CONNECT_ERROR_BACKOFF_MS": "0",
    "REQUEST_HEAD_TIMEOUT": "2s",
    "MAX_REQUEST_HEAD": "4096",
    "MAX_REQUEST_URL": "2048",
    "MAX_CONNECTIONS_PER_IP": "0",
    "LOG_LEVEL": "warning",
}

GOOD = [
    "Host: 127.0.0.1",
    "Upgrade: websocket",
    "Connection: Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
]


def head(target: str = WS, lines: list[str] | None = None, request_line: str | None = None) -> bytes:
    """A request head: ``GET target HTTP/1.1`` and ``lines`` (the good upgrade headers by default)."""
    first = request_line if request_line is not None else f"GET {target} HTTP/1.1"
    return ("\r\n".join([first, *(GOOD if lines is None else lines)]) + "\r\n\r\n").encode()


def without(name: str, *extra: str) -> list[str]:
    """The good headers less ``name``, plus ``extra``."""
    return [line for line in GOOD if not line.lower().startswith(name.lower() + ":")] + list(extra)


#: name -> the raw request. Well-formed, malformed and borderline upgrade requests.
CASES: dict[str, bytes] = {
    "good": head(),
    "good_lowercase_names": head(
        lines=[line.split(":")[0].lower() + ":" + line.split(":", 1)[1] for line in GOOD]
    ),
    "good_no_space_after_colon": head(lines=[line.replace(": ", ":") for line in GOOD]),
    "good_trailing_whitespace": head(lines=[line + " \t" for line in GOOD]),
    "good_upgrade_mixed_case": head(lines=without("Upgrade", "Upgrade: WebSocket")),
    "good_connection_list": head(lines=without("Connection", "Connection: keep-alive, Upgrade")),
    "good_extensions_ignored": head(
        lines=[*GOOD, "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]
    ),
    "good_subprotocol_ignored": head(lines=[*GOOD, "Sec-WebSocket-Protocol: chat, superchat"]),
    "good_allowed_origin": head(lines=[*GOOD, f"Origin: {ALLOWED}"]),
    "good_x_api_key": head("/realtime/v1/websocket?vsn=1.0.0", lines=[*GOOD, f"x-api-key: {TOKEN}"]),
    "good_socket_path": head("/socket/websocket?vsn=2.0.0&apikey=" + TOKEN),
    "good_short_path": head("/websocket?apikey=" + TOKEN),
    "good_trailing_slash": head("/realtime/v1/websocket/?vsn=2.0.0&apikey=" + TOKEN),
    "good_no_host": head(lines=without("Host")),
    "good_forwarded_for_untrusted": head(
        lines=[*GOOD, "X-Forwarded-For: 10.1.2.3", "X-Forwarded-For: 10.1.2.4"]
    ),
    "good_many_headers": head(lines=[*GOOD, *(f"X-Filler-{i}: {i}" for i in range(30))]),
    "bad_origin": head(lines=[*GOOD, "Origin: https://evil.example"]),
    "two_origins": head(lines=[*GOOD, f"Origin: {ALLOWED}", f"Origin: {ALLOWED}"]),
    "no_token": head("/realtime/v1/websocket?vsn=2.0.0"),
    "bad_token": head("/realtime/v1/websocket?vsn=2.0.0&apikey=not-a-jwt"),
    "two_x_api_keys": head(
        "/realtime/v1/websocket", lines=[*GOOD, f"x-api-key: {TOKEN}", f"x-api-key: {TOKEN}"]
    ),
    "bad_vsn": head("/realtime/v1/websocket?vsn=3.0.0&apikey=" + TOKEN),
    "wrong_path": head("/realtime/v1/elsewhere?apikey=" + TOKEN),
    "post": head(request_line=f"POST {WS} HTTP/1.1"),
    "http_1_0": head(request_line=f"GET {WS} HTTP/1.0"),
    "no_key": head(lines=without("Sec-WebSocket-Key")),
    "key_not_base64": head(lines=without("Sec-WebSocket-Key", "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==")),
    "key_15_bytes": head(
        lines=without("Sec-WebSocket-Key", "Sec-WebSocket-Key: " + base64.b64encode(b"x" * 15).decode())
    ),
    "key_17_bytes": head(
        lines=without("Sec-WebSocket-Key", "Sec-WebSocket-Key: " + base64.b64encode(b"x" * 17).decode())
    ),
    "key_no_padding": head(lines=without("Sec-WebSocket-Key", "Sec-WebSocket-Key: " + KEY.rstrip("="))),
    "two_keys": head(lines=[*GOOD, f"Sec-WebSocket-Key: {KEY}"]),
    "no_version": head(lines=without("Sec-WebSocket-Version")),
    "version_8": head(lines=without("Sec-WebSocket-Version", "Sec-WebSocket-Version: 8")),
    "two_versions": head(lines=[*GOOD, "Sec-WebSocket-Version: 13"]),
    "upgrade_h2c": head(lines=without("Upgrade", "Upgrade: h2c")),
    "upgrade_two_protocols": head(lines=without("Upgrade", "Upgrade: websocket, h2c")),
    "upgrade_twice": head(lines=[*GOOD, "Upgrade: websocket"]),
    "no_upgrade_header": head(lines=without("Upgrade")),
    "connection_keep_alive_only": head(lines=without("Connection", "Connection: keep-alive")),
    "no_connection_header": head(lines=without("Connection")),
    "two_connection_headers": head(
        lines=without("Connection", "Connection: keep-alive", "Connection: Upgrade")
    ),
    "bad_subprotocol_syntax": head(lines=[*GOOD, "Sec-WebSocket-Protocol: a b"]),
    "content_length_body": head(lines=[*GOOD, "Content-Length: 4"]) + b"abcd",
    "chunked_body": head(lines=[*GOOD, "Transfer-Encoding: chunked"]) + b"0\r\n\r\n",
    "space_before_colon": head(lines=[*GOOD, "X-Odd : 1"]),
    "obs_fold": head(lines=[*GOOD, "X-Folded: a", " b"]),
    "absolute_form_target": head("http://127.0.0.1" + WS),
    "fragment_in_target": head(WS + "#frag"),
    "header_too_large": head(lines=[*GOOD, "X-Big: " + "b" * 5000]),
    "url_too_long": head(WS + "&pad=" + "u" * 2100),
    "not_http": b"HELLO THERE\r\n\r\n",
}


def answer(port: int, raw: bytes | list[bytes], linger: float = 3.0) -> dict[str, Any]:
    """Send ``raw`` (in pieces, each written and flushed apart) and read the answer.

    The answer: status, headers without ``Date`` (names lowercased, in order), body (for a
    ``Content-Length``) and, for a 101, the first server frame after an immediate ``phx_join``
    is not asked for. ``None`` status: the server closed without answering.
    """
    pieces = [raw] if isinstance(raw, bytes) else raw
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            sock.sendall(piece)
            if len(pieces) > 1:
                time.sleep(0.002)  # a segment of its own (usually): the splits are what is tested
        data = b""
        deadline = time.monotonic() + linger
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
        if b"\r\n\r\n" not in data:
            return {"status": None, "received": data.decode("latin-1")}
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = [
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:])
            if name.strip().lower() != "date"
        ]
        status = int(lines[0].split(" ")[1])
        length = int(dict(headers).get("content-length", "0"))
        while len(rest) < length and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return {"status": status, "headers": sorted(headers), "body": rest[:length].decode("latin-1")}


def _normalized(result: dict[str, Any]) -> dict[str, Any]:
    """Header order and the headers the lean 101 leaves out (``Date``) do not matter."""
    if "headers" not in result:
        return result
    return {**result, "headers": sorted((str(name), str(value)) for name, value in result["headers"])}


# -- the expected answers (recorded from the previous path) ---------------------------------------

EXPECTED_PATH = __file__.rsplit(".", 1)[0] + "_answers.json"


def expected() -> dict[str, Any]:
    with open(EXPECTED_PATH) as f:
        return dict(json.load(f))


@pytest.fixture(scope="module")
def lean_server() -> Iterator[ServerProcess]:
    with ServerProcess(env=ENV) as server:
        yield server


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_upgrade_request_gets_the_answer_it_got_before(lean_server: ServerProcess, name: str) -> None:
    assert _normalized(answer(lean_server.port, CASES[name])) == _normalized(expected()[name])


#: The accepted upgrades that the lean path answers; the other 101s come from websockets.
LEAN = {name for name in CASES if name.startswith("good")} - {
    "good_trailing_whitespace",
    "good_subprotocol_ignored",
}


@pytest.mark.parametrize("name", sorted(n for n, a in expected().items() if a["status"] == 101))
def test_plain_upgrades_take_the_lean_path(lean_server: ServerProcess, name: str) -> None:
    # The lean 101 is the template (no Date); requests left to websockets get its own, with Date.
    with socket.create_connection(("127.0.0.1", lean_server.port), timeout=WAIT) as sock:
        sock.sendall(CASES[name])
        head = read_until(sock, b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert (b"\r\ndate:" not in head.lower()) == (name in LEAN), head


# -- every split of the head (and of frames after it) gives the same answer ----------------------

SPLIT_CASES = ["good", "good_allowed_origin", "bad_origin", "no_key", "wrong_path", "header_too_large"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(SPLIT_CASES), cuts=st.lists(st.integers(min_value=1, max_value=6000), max_size=6))
def test_every_split_of_an_upgrade_head_gets_the_same_answer(
    lean_server: ServerProcess, name: str, cuts: list[int]
) -> None:
    raw = CASES[name]
    points = sorted({c for c in cuts if c < len(raw)})
    pieces = [raw[i:j] for i, j in zip([0, *points], [*points, len(raw)], strict=True)]
    assert _normalized(answer(lean_server.port, pieces)) == _normalized(expected()[name])


def masked_text(data: bytes) -> bytes:
    return Frame(Opcode.TEXT, data).serialize(mask=True)


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    deadline = time.monotonic() + WAIT
    while marker not in data and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=2000), max_size=5))
def test_a_join_in_the_same_segments_as_the_head_is_answered(
    lean_server: ServerProcess, cuts: list[int]
) -> None:
    join = masked_text(orjson.dumps(["1", "1", "realtime:lean", "phx_join", {"config": {}}]))
    raw = CASES["good"] + join
    points = sorted({c for c in cuts if c < len(raw)})
    with socket.create_connection(("127.0.0.1", lean_server.port), timeout=WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, j in zip([0, *points], [*points, len(raw)], strict=True):
            sock.sendall(raw[i:j])
            time.sleep(0.002)
        data = read_until(sock, b'"status":"ok"')
    assert data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert f"Sec-WebSocket-Accept: {ACCEPT}".encode() in data
    assert b'"phx_reply"' in data and b'"status":"ok"' in data


# -- head deadlines on the lean path ---------------------------------------------------------------


def test_an_unfinished_upgrade_head_is_cut_at_its_deadline_and_others_are_not(
    lean_server: ServerProcess,
) -> None:
    raw = CASES["good"]
    before = head_timeouts(lean_server)
    with (
        socket.create_connection(("127.0.0.1", lean_server.port), timeout=WAIT) as stalled,
        socket.create_connection(("127.0.0.1", lean_server.port), timeout=WAIT) as idle,
        socket.create_connection(("127.0.0.1", lean_server.port), timeout=WAIT) as honest,
    ):
        stalled.sendall(raw[:60])  # a head begun, never finished
        time.sleep(1.0)  # within REQUEST_HEAD_TIMEOUT (2 s) of its connect: the honest one is in time
        honest.sendall(raw)
        assert read_until(honest, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
        for sock in (stalled, idle):
            assert read_until(sock, b"never") == b""  # closed by the server, unanswered
        time.sleep(2.5)  # past the deadline the honest connection would have had
        honest.sendall(masked_text(orjson.dumps(["1", "2", "phoenix", "heartbeat", {}])))
        assert b'"status":"ok"' in read_until(honest, b'"status":"ok"')
    assert head_timeouts(lean_server) >= before + 2


def head_timeouts(server: ServerProcess) -> float:
    import urllib.request

    with urllib.request.urlopen(server.http_url + "/metrics", timeout=WAIT) as response:
        text = response.read().decode()
    prefix = 'tidings_http_refused_total{reason="head_timeout"} '
    return next(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


# -- requests that are not upgrades reach the ASGI app ---------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=60), max_size=4))
def test_requests_that_are_not_upgrades_reach_the_app(lean_server: ServerProcess, cuts: list[int]) -> None:
    raw = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
    points = sorted({c for c in cuts if c < len(raw)})
    result = answer(
        lean_server.port, [raw[i:j] for i, j in zip([0, *points], [*points, len(raw)], strict=True)]
    )
    assert result["status"] == 200
    assert orjson.loads(result["body"])["status"] == "ok"


def test_keep_alive_and_pipelined_requests_reach_the_app(lean_server: ServerProcess) -> None:
    health = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", lean_server.port), timeout=WAIT) as sock:
        sock.sendall(health + health)  # two requests in one segment
        data = read_until(sock, b"}")
        while data.count(b"HTTP/1.1 200") < 2:
            more = read_until(sock, b"}")
            if not more:
                break
            data += more
        assert data.count(b"HTTP/1.1 200") == 2
        sock.sendall(b"POST /api/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 401")  # the app, asking for a key


# -- pure parts: what the lean path accepts, websockets accepts the same way -----------------------

_name = st.sampled_from(
    [
        "Host",
        "Upgrade",
        "Connection",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Origin",
        "x-api-key",
        "X-Forwarded-For",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Protocol",
        "Content-Length",
        "X-Other",
        "upgrade",
        "CONNECTION",
        "sec-websocket-key",
    ]
)
_value = st.sampled_from(
    [
        "websocket",
        "WebSocket",
        "Upgrade",
        "keep-alive, Upgrade",
        "upgrade,keep-alive",
        ",Upgrade",
        "Upgrade,",
        "13",
        "8",
        KEY,
        KEY.rstrip("="),
        "x" * 24,
        "https://ok.example",
        "a b",
        "",
        " websocket",
        "websocket ",
        "h2c",
        "websocket, h2c",
        "permessage-deflate",
        "10.0.0.1",
        "4",
    ]
)


def _headers_as_uvicorn_reads_them(lines: list[tuple[str, str]]) -> Headers:
    headers = Headers()
    for name, value in lines:
        headers[name] = value.strip(" \t")
    return headers


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(_name, _value), max_size=9), st.sampled_from(["", " ", "\t"]))
def test_the_lean_parser_accepts_only_what_websockets_accepts(
    lines: list[tuple[str, str]], space: str
) -> None:
    head = (
        "GET /realtime/v1/websocket?vsn=2.0.0 HTTP/1.1\r\n"
        + "".join(f"{name}:{space}{value}\r\n" for name, value in lines)
    ).encode()
    parsed = parse_upgrade_head(head)
    if parsed is None:
        return
    request = Request("/realtime/v1/websocket?vsn=2.0.0", _headers_as_uvicorn_reads_them(lines))
    response = ServerProtocol().accept(request)
    assert response.status_code == 101, response.body
    assert (
        response.headers["Sec-WebSocket-Accept"]
        == switching_protocols(parsed.key).split(b": ")[-1].strip().decode()
    )
    assert (
        "Sec-WebSocket-Extensions" not in response.headers
        and "Sec-WebSocket-Protocol" not in response.headers
    )
    headers = request.headers
    assert parsed.origin == headers.get("Origin") and parsed.api_key == headers.get("x-api-key")
    assert parsed.forwarded_for == headers.get_all("X-Forwarded-For")


def test_the_lean_parser_reads_a_browser_upgrade() -> None:
    head = (
        "GET /realtime/v1/websocket?apikey=k&vsn=2.0.0 HTTP/1.1\r\nHost: 127.0.0.1:4000\r\n"
        "Connection: Upgrade\r\nPragma: no-cache\r\nUser-Agent: Mozilla/5.0 (X11) Chrome/120\r\n"
        "Upgrade: websocket\r\nOrigin: http://localhost:3000\r\nSec-WebSocket-Version: 13\r\n"
        "Accept-Language: en-US,en;q=0.9\r\nSec-WebSocket-Key: " + KEY + "\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    ).encode()
    parsed = parse_upgrade_head(head)
    assert parsed == UpgradeHead(
        "/realtime/v1/websocket?apikey=k&vsn=2.0.0", KEY, "http://localhost:3000", None, []
    )


_query_part = st.sampled_from(
    [
        "vsn=2.0.0",
        "vsn=1.0.0",
        "vsn=",
        "vsn",
        "apikey=abc",
        "apikey=a%2Bb",
        "apikey=a+b",
        "apikey=",
        "ap%69key=x",
        "vsn=%32.0.0",
        "x=1",
        "",
        "apikey=second",
        "vsn=3",
        "v+sn=1",
        "apikey=%zz",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_query_part, max_size=6))
def test_query_values_read_the_query_as_parse_qs_does(parts: list[str]) -> None:
    query = "&".join(parts)
    parsed = parse_qs(query)
    assert query_values(query) == (parsed.get("vsn", [None])[0], parsed.get("apikey", [None])[0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=300), max_size=12))
def test_a_copied_open_protocol_frames_as_a_constructed_one(sizes: list[int]) -> None:
    data = b"".join(
        Frame(
            Opcode.TEXT if i % 3 else Opcode.PING, bytes([65 + i % 26]) * (n if i % 3 else n % 126)
        ).serialize(mask=True)
        for i, n in enumerate(sizes)
    ) + Frame(Opcode.CLOSE, Close(1000, "bye").serialize()).serialize(mask=True)
    copied, made = open_server_protocol(1 << 20), ServerProtocol(max_size=1 << 20, state=OPEN)
    for ws in (copied, made):
        ws.receive_data(data)
    assert [(e.opcode, e.data) for e in copied.events_received()] == [
        (e.opcode, e.data) for e in made.events_received()
    ]
    assert copied.data_to_send() == made.data_to_send()  # pongs and the close reply
    assert copied.state is made.state and copied.close_rcvd == made.close_rcvd
    assert open_server_protocol(1 << 20).state is OPEN  # the template itself is untouched


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    with ServerProcess(env=ENV) as recorder:
        recorded = {name: answer(recorder.port, raw) for name, raw in CASES.items()}
    with open(EXPECTED_PATH, "w") as out:
        json.dump(recorded, out, indent=1, sort_keys=True)
        out.write("\n")
    print(json.dumps({k: v.get("status") for k, v in recorded.items()}, indent=0))
