"""Client wire format, presence merging, URLs and settings: pure, no sockets."""

from __future__ import annotations

import orjson
import pytest

import tidings.client as client_pkg
from tidings.client import ClientSettings, PresenceView, build_socket_url, derive_http_base
from tidings.client.wire import decode_frame, decode_user_broadcast, encode_broadcast_push, encode_message
from tidings.protocol.codec import MalformedMessage, Outbound, Serializer, decode_binary, decode_text

from .fake_server import kind4, strip_ws_header


def test_encode_message_both_serializers_round_trip_through_the_server_codec() -> None:
    for serializer in (Serializer.V1, Serializer.V2):
        text = encode_message(serializer, "1", "2", "realtime:room", "phx_join", {"config": {}})
        msg = decode_text(text, serializer)
        assert (msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload) == (
            "1",
            "2",
            "realtime:room",
            "phx_join",
            {"config": {}},
        )
    assert orjson.loads(encode_message(Serializer.V2, None, "3", "phoenix", "heartbeat", {})) == [
        None,
        "3",
        "phoenix",
        "heartbeat",
        {},
    ]


def test_kind3_matches_the_captured_realtime_js_frame() -> None:
    frame = encode_broadcast_push("6", "7", "realtime:room1", "hello", {"msg": "héllo"})
    expected = bytes([3, 1, 1, 14, 5, 0, 1]) + b"67realtime:room1hello" + '{"msg":"héllo"}'.encode()
    assert frame == expected


def test_kind3_with_id_metadata_and_raw_bytes_decodes_on_the_server() -> None:
    frame = encode_broadcast_push("1", "9", "realtime:r", "ev", {"a": 1}, {"id": "abc"})
    msg = decode_binary(frame)
    assert msg.ref == "9" and msg.join_ref == "1" and msg.payload["payload"] == {"a": 1}
    assert frame[5] == len(b'{"id":"abc"}')
    raw = decode_binary(encode_broadcast_push("1", "2", "realtime:r", "bin", b"\x00\x01"))
    assert raw.payload["payload"] == b"\x00\x01"
    with pytest.raises(ValueError):
        encode_broadcast_push("1", "2", "realtime:" + "x" * 300, "e", {})


def test_kind4_decoding_json_binary_and_meta() -> None:
    msg = decode_user_broadcast(kind4("realtime:r", "ev", {"x": 1}, {"id": "i", "seq": 4}))
    assert msg.event == "broadcast" and msg.topic == "realtime:r" and msg.ref is None
    assert msg.payload == {
        "type": "broadcast",
        "event": "ev",
        "payload": {"x": 1},
        "meta": {"id": "i", "seq": 4},
    }
    # The real server codec's kind-4 frame (raw binary payload).
    server_frame = strip_ws_header(
        Outbound("realtime:r", "broadcast", {"event": "b", "payload": b"\xff", "meta": {"seq": 2}}).frame_v2()
    )
    raw = decode_frame(server_frame, Serializer.V2)
    assert raw.payload["payload"] == b"\xff" and raw.payload["meta"] == {"seq": 2}


@pytest.mark.parametrize(
    "data",
    [b"\x04\x01", b"\x03" + bytes(10), bytes([4, 50, 1, 0, 1]) + b"x", bytes([4, 1, 1, 0, 7]) + b"te"],
)
def test_kind4_rejects_malformed(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_user_broadcast(data)


def test_socket_url_forms() -> None:
    assert (
        build_socket_url("ws://h:4000/realtime/v1", "k", "2.0.0")
        == "ws://h:4000/realtime/v1/websocket?apikey=k&vsn=2.0.0"
    )
    assert (
        build_socket_url("https://x.supabase.co/realtime/v1/", "k", "1.0.0", {"log_level": "info"})
        == "wss://x.supabase.co/realtime/v1/websocket?log_level=info&apikey=k&vsn=1.0.0"
    )
    assert (
        build_socket_url("ws://h/socket/websocket?vsn=9", "k", "2.0.0")
        == "ws://h/socket/websocket?apikey=k&vsn=2.0.0"
    )
    with pytest.raises(ValueError):
        build_socket_url("ftp://h", "k", "2.0.0")


def test_http_base_forms() -> None:
    assert derive_http_base("ws://h:4000/realtime/v1") == "http://h:4000/realtime/v1"
    assert derive_http_base("wss://h/realtime/v1/websocket?apikey=k") == "https://h/realtime/v1"
    assert derive_http_base("ws://h/socket/websocket") == "http://h"


def test_settings_validation_and_unknown_names() -> None:
    s = ClientSettings()
    assert (s.max_reconnect_attempts, s.reconnect_base_delay, s.reconnect_max_delay, s.reconnect_jitter) == (
        10,
        1.0,
        30.0,
        0.25,
    )
    assert (s.connect_timeout, s.heartbeat_interval, s.send_queue_size, s.quality_window, s.dedup_size) == (
        10.0,
        30.0,
        100,
        20,
        1000,
    )
    with pytest.raises(TypeError, match="nope"):
        s.replace(nope=1)
    with pytest.raises(ValueError, match="send_queue_size"):
        s.replace(send_queue_size=0)
    with pytest.raises(ValueError, match="vsn"):
        s.replace(vsn="3.0.0")


def test_public_names_are_exported() -> None:
    assert sorted(client_pkg.__all__) == sorted(set(client_pkg.__all__))
    for name in client_pkg.__all__:
        assert hasattr(client_pkg, name), name


def test_presence_view_buffers_diffs_until_state() -> None:
    view = PresenceView()
    early = {"joins": {"u2": {"metas": [{"phx_ref": "r2", "n": 2}]}}, "leaves": {}}
    assert view.apply_diff(early) == []
    events = view.apply_state({"u1": {"metas": [{"phx_ref": "r1", "n": 1}]}})
    assert [(e.event, e.key) for e in events] == [("join", "u1"), ("join", "u2"), ("sync", None)]
    assert view.state() == {"u1": [{"n": 1, "presence_ref": "r1"}], "u2": [{"n": 2, "presence_ref": "r2"}]}


def test_presence_view_update_is_leave_plus_join_and_state_resync() -> None:
    view = PresenceView()
    view.apply_state({"u1": {"metas": [{"phx_ref": "a", "v": 1}]}})
    update = {
        "joins": {"u1": {"metas": [{"phx_ref": "b", "phx_ref_prev": "a", "v": 2}]}},
        "leaves": {"u1": {"metas": [{"phx_ref": "a", "v": 1}]}},
    }
    events = view.apply_diff(update)
    assert [(e.event, e.key) for e in events] == [("join", "u1"), ("leave", "u1"), ("sync", None)]
    assert events[1].changed == [{"v": 1, "presence_ref": "a"}]
    assert view.state() == {"u1": [{"v": 2, "presence_ref": "b"}]}
    # A new state without u1 and with u3: u1 leaves, u3 joins.
    events = view.apply_state({"u3": {"metas": [{"phx_ref": "c"}]}})
    assert [(e.event, e.key) for e in events] == [("join", "u3"), ("leave", "u1"), ("sync", None)]
    assert list(view.state()) == ["u3"]
    view.reset()
    assert not view.synced and view.state() == {}


def test_the_sdk_imports_no_server_side_module() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tidings.client\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in (['tidings', 'server'], ['tidings', 'hub'],"
        " ['tidings', 'broker'], ['tidings', 'cdc'], ['tidings', 'session'], ['tidings', 'node'])]\n"
        "print(bad)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
