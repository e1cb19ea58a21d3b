"""The Phoenix codec (spec 1.4): decode what the clients send, encode every shape they expect."""

from __future__ import annotations

import struct
from typing import Any

import orjson
import pytest
from hypothesis import given, settings, strategies as st
from websockets.frames import Close, Opcode

from tests.support.session_pair import binary_push, parse_frames
from tidings.protocol.codec import (
    KIND_USER_BROADCAST,
    MalformedMessage,
    Message,
    Outbound,
    Serializer,
    decode_binary,
    decode_text,
    encode_change,
    encode_close,
    encode_push,
    encode_reply,
    parse_vsn,
)
from tidings.protocol.frames import OP_BINARY, OP_CLOSE, OP_TEXT, close_frame, encode_frame

V1, V2 = Serializer.V1, Serializer.V2


def one_frame(data: bytes) -> tuple[Opcode, bytes]:
    frames = parse_frames(data)
    assert len(frames) == 1
    assert frames[0].fin
    return frames[0].opcode, bytes(frames[0].data)


def text_json(data: bytes) -> Any:
    opcode, body = one_frame(data)
    assert opcode is Opcode.TEXT
    return orjson.loads(body)


# -- vsn ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vsn", "expected"),
    [
        (None, V1),
        ("", V1),
        ("1.0.0", V1),
        ("~> 1.0.0", V1),
        ("2.0.0", V2),
        ("~> 2.0.0", V2),
        ("2.1.3", V2),
        ("3.0.0", None),
        ("0.9", None),
        ("banana", None),
    ],
)
def test_parse_vsn(vsn: str | None, expected: Serializer | None) -> None:
    assert parse_vsn(vsn) is expected


# -- decode text --------------------------------------------------------------------------------


def test_decode_v1_realtime_py_join() -> None:
    # Spec 10: realtime-py's key order, join_ref == ref.
    raw = (
        b'{"event":"phx_join","payload":{"config":{"broadcast":{"self":true,"ack":false}},'
        b'"access_token":"anon-key"},"topic":"realtime:room1","ref":"1","join_ref":"1"}'
    )
    msg = decode_text(raw, V1)
    assert msg == Message(
        "1",
        "1",
        "realtime:room1",
        "phx_join",
        {"config": {"broadcast": {"self": True, "ack": False}}, "access_token": "anon-key"},
    )


def test_decode_v1_heartbeat_with_null_ref_and_no_join_ref() -> None:
    msg = decode_text(b'{"topic":"phoenix","event":"heartbeat","payload":{}}', V1)
    assert (msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload) == (
        None,
        None,
        "phoenix",
        "heartbeat",
        {},
    )
    msg = decode_text('{"event":"heartbeat","payload":{},"topic":"phoenix","ref":null,"join_ref":null}', V1)
    assert msg.ref is None and msg.join_ref is None


def test_decode_v2_array() -> None:
    msg = decode_text(b'["6","9","realtime:room1","access_token",{"access_token":"user-jwt-2"}]', V2)
    assert msg == Message("6", "9", "realtime:room1", "access_token", {"access_token": "user-jwt-2"})
    hb = decode_text(b'[null,"10","phoenix","heartbeat",{}]', V2)
    assert hb == Message(None, "10", "phoenix", "heartbeat", {})


def test_integer_refs_become_strings() -> None:
    assert decode_text(b'[1,2,"t","e",{}]', V2) == Message("1", "2", "t", "e", {})


@pytest.mark.parametrize(
    ("raw", "serializer"),
    [
        (b"", V1),
        (b"not json", V1),
        (b'{"topic":"t","event":"e"', V1),
        (b"[]", V1),
        (b'"a string"', V1),
        (b'{"event":"e","payload":{}}', V1),
        (b'{"topic":"t","payload":{}}', V1),
        (b'{"topic":"t","event":"e"}', V1),
        (b'{"topic":1,"event":"e","payload":{}}', V1),
        (b'{"topic":"t","event":null,"payload":{}}', V1),
        (b'{"topic":"t","event":"e","payload":[]}', V1),
        (b'{"topic":"t","event":"e","payload":"x"}', V1),
        (b'{"topic":"t","event":"e","payload":{},"ref":true}', V1),
        (b'{"topic":"t","event":"e","payload":{},"join_ref":1.5}', V1),
        (b'{"topic":"t","event":"e","payload":{}}', V2),
        (b'[null,"1","t","e"]', V2),
        (b'[null,"1","t","e",{},6]', V2),
        (b'[null,"1",null,"e",{}]', V2),
        (b'[null,"1","t","e",null]', V2),
        (b'[{},"1","t","e",{}]', V2),
        (b'[null,["1"],"t","e",{}]', V2),
        (b"\xff\xfe", V2),
    ],
)
def test_malformed_text(raw: bytes, serializer: Serializer) -> None:
    with pytest.raises(MalformedMessage):
        decode_text(raw, serializer)


# -- encode: v1 --------------------------------------------------------------------------------


def test_v1_reply_has_ref_and_never_join_ref() -> None:
    obj = text_json(encode_reply(V1, "1", "2", "realtime:room1", "ok", {"postgres_changes": []}))
    assert obj == {
        "topic": "realtime:room1",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {"postgres_changes": []}},
        "ref": "2",
    }


def test_v1_heartbeat_reply_echoes_null_ref() -> None:
    obj = text_json(encode_reply(V1, None, None, "phoenix", "ok", {}))
    assert obj == {
        "topic": "phoenix",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": None,
    }


def test_v1_push_has_null_ref_and_no_join_ref() -> None:
    payload = {"extension": "system", "status": "error", "message": "m", "channel": "room1"}
    obj = text_json(encode_push(V1, "1", "realtime:room1", "system", payload))
    assert obj == {"topic": "realtime:room1", "event": "system", "payload": payload, "ref": None}
    assert set(obj) == {"topic", "event", "payload", "ref"}


def test_v1_close_ref_is_the_join_ref() -> None:
    obj = text_json(encode_close(V1, "3", "realtime:room1"))
    assert obj == {"topic": "realtime:room1", "event": "phx_close", "payload": {}, "ref": "3"}


def test_v1_phx_error() -> None:
    obj = text_json(encode_close(V1, "3", "realtime:room1", "phx_error"))
    assert obj == {
        "topic": "realtime:room1",
        "event": "phx_error",
        "payload": {"reason": "channel_crash"},
        "ref": "3",
    }


def test_v1_fanout_has_null_ref_and_no_join_ref() -> None:
    out = Outbound("realtime:room1", "broadcast", {"type": "broadcast", "event": "hi", "payload": {"x": 1}})
    frame = out.frame_v1()
    assert frame is not None
    obj = text_json(frame)
    assert obj == {
        "topic": "realtime:room1",
        "event": "broadcast",
        "payload": {"type": "broadcast", "event": "hi", "payload": {"x": 1}},
        "ref": None,
    }
    assert "join_ref" not in obj


# -- encode: v2 --------------------------------------------------------------------------------


def test_v2_reply_echoes_join_ref_and_ref() -> None:
    obj = text_json(encode_reply(V2, "6", "7", "realtime:room1", "error", {"reason": "unmatched topic"}))
    assert obj == [
        "6",
        "7",
        "realtime:room1",
        "phx_reply",
        {"status": "error", "response": {"reason": "unmatched topic"}},
    ]


def test_v2_heartbeat_reply() -> None:
    obj = text_json(encode_reply(V2, None, "10", "phoenix", "ok", {}))
    assert obj == [None, "10", "phoenix", "phx_reply", {"status": "ok", "response": {}}]


def test_v2_channel_push_carries_join_ref_and_null_ref() -> None:
    obj = text_json(encode_push(V2, "6", "realtime:room1", "presence_state", {}))
    assert obj == ["6", None, "realtime:room1", "presence_state", {}]


def test_v2_close_ref_equals_join_ref() -> None:
    assert text_json(encode_close(V2, "6", "realtime:room1")) == ["6", "6", "realtime:room1", "phx_close", {}]
    assert text_json(encode_close(V2, "6", "realtime:room1", "phx_error")) == [
        "6",
        "6",
        "realtime:room1",
        "phx_error",
        {"reason": "channel_crash"},
    ]


@pytest.mark.parametrize("event", ["broadcast", "presence_diff", "postgres_changes"])
def test_v2_fanout_is_null_null(event: str) -> None:
    payload: dict[str, Any] = {"joins": {}, "leaves": {}}
    obj = text_json(Outbound("realtime:room1", event, payload).frame_v2())
    assert obj == [None, None, "realtime:room1", event, payload]


def test_outbound_encodes_once_per_serializer() -> None:
    out = Outbound("realtime:r", "broadcast", {"type": "broadcast", "event": "e", "payload": {}})
    assert out.frame_v2() is out.frame_v2()
    assert out.frame_v1() is out.frame_v1()
    assert out.frame_for(V1) is out.frame_v1()
    assert out.frame_for(V2) is out.frame_v2()


# -- binary ------------------------------------------------------------------------------------

CAPTURED = (
    bytes([0x03, 0x01, 0x01, 0x0E, 0x05, 0x00, 0x01])
    + b"6"
    + b"7"
    + b"realtime:room1"
    + b"hello"
    + b""
    + '{"msg":"héllo"}'.encode()
)


def test_decode_captured_kind3_example() -> None:
    # Spec 1.4: send({type:'broadcast', event:'hello', payload:{msg:'héllo'}}), join_ref "6", ref "7".
    msg = decode_binary(CAPTURED)
    assert msg == Message(
        "6",
        "7",
        "realtime:room1",
        "broadcast",
        {"type": "broadcast", "event": "hello", "payload": {"msg": "héllo"}},
    )


def test_decode_kind3_raw_binary() -> None:
    msg = decode_binary(binary_push("1", "2", "realtime:r", "blob", b"\x00\xff\x10", encoding=0))
    assert msg.payload == {"type": "broadcast", "event": "blob", "payload": b"\x00\xff\x10"}


def test_decode_kind3_empty_json_body_is_empty_object() -> None:
    assert decode_binary(binary_push("1", "2", "realtime:r", "e", b"")).payload["payload"] == {}


def test_decode_kind3_persist_metadata() -> None:
    msg = decode_binary(binary_push("1", "2", "realtime:r", "e", b"{}", metadata=b'{"persist":{"ttl":60}}'))
    assert msg.payload["persist"] == {"ttl": 60}
    msg = decode_binary(binary_push("1", "2", "realtime:r", "e", b"{}", metadata=b'{"other":1}'))
    assert "persist" not in msg.payload


def test_decode_kind3_empty_refs_are_null() -> None:
    msg = decode_binary(binary_push("", "", "realtime:r", "e", b"{}"))
    assert msg.join_ref is None and msg.ref is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x03\x00\x00\x00\x00\x00",
        bytes([4, 1, 1, 1, 1, 1, 1]) + b"abcd{}",  # kind 4 is server -> client only
        bytes([0, 0, 0, 0, 0, 0, 1]),
        bytes([1, 0, 0, 0, 0, 0, 1]),
        bytes([2, 0, 0, 0, 0, 0, 1]),
        bytes([3, 1, 1, 50, 1, 0, 1]) + b"12short",
        binary_push("1", "2", "realtime:r", "e", b"{}", encoding=2),
        binary_push("1", "2", "realtime:r", "e", b"{not json"),
        binary_push("1", "2", "realtime:r", "e", b"{}", metadata=b"{bad"),
        bytes([3, 1, 1, 1, 1, 0, 1]) + b"1\xff" + b"te" + b"{}",
    ],
)
def test_malformed_binary(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_binary(data)


def binary_outbound(meta: dict[str, Any] | None) -> Outbound:
    payload: dict[str, Any] = {"type": "broadcast", "event": "cursor", "payload": b"\x01\x02\x03"}
    if meta is not None:
        payload["meta"] = meta
    return Outbound("realtime:room1", "broadcast", payload)


def test_kind4_encode_with_metadata() -> None:
    out = binary_outbound({"id": "abc", "seq": 7})
    opcode, body = one_frame(out.frame_v2())
    assert opcode is Opcode.BINARY
    meta = orjson.dumps({"id": "abc", "seq": 7})
    assert body[:5] == bytes([KIND_USER_BROADCAST, 14, 6, len(meta), 0])
    assert body[5:] == b"realtime:room1" + b"cursor" + meta + b"\x01\x02\x03"


def test_kind4_encode_without_metadata() -> None:
    opcode, body = one_frame(binary_outbound(None).frame_v2())
    assert opcode is Opcode.BINARY
    assert body == bytes([KIND_USER_BROADCAST, 14, 6, 0, 0]) + b"realtime:room1cursor\x01\x02\x03"


def test_v1_drops_raw_binary() -> None:
    out = binary_outbound({"id": "x"})
    assert out.is_binary
    assert out.frame_v1() is None
    assert out.frame_for(V1) is None
    assert out.frame_for(V2) is not None


def test_json_broadcasts_stay_text_for_v2() -> None:
    out = Outbound("realtime:r", "broadcast", {"type": "broadcast", "event": "e", "payload": {"a": 1}})
    assert not out.is_binary
    assert one_frame(out.frame_v2())[0] is Opcode.TEXT


def test_kind4_strings_over_255_bytes_are_refused() -> None:
    out = Outbound("realtime:" + "x" * 300, "broadcast", {"type": "broadcast", "event": "e", "payload": b""})
    with pytest.raises(ValueError):
        out.frame_v2()


# -- frames ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "header"), [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_encode_frame_lengths(size: int, header: int, opcode: int) -> None:
    data = bytes(i % 251 for i in range(size))
    raw = encode_frame(opcode, data)
    assert len(raw) == header + size
    frames = parse_frames(raw)
    assert len(frames) == 1
    frame = frames[0]
    assert frame.opcode is Opcode(opcode)
    assert frame.fin
    assert bytes(frame.data) == data


def test_frames_concatenate() -> None:
    raw = (
        encode_frame(OP_TEXT, b"a" * 126) + encode_frame(OP_BINARY, b"") + encode_frame(OP_TEXT, b"b" * 70000)
    )
    assert [(f.opcode, len(f.data)) for f in parse_frames(raw)] == [
        (Opcode.TEXT, 126),
        (Opcode.BINARY, 0),
        (Opcode.TEXT, 70000),
    ]


def test_close_frame() -> None:
    frames = parse_frames(close_frame(1013, "slow consumer"))
    assert frames[0].opcode is Opcode.CLOSE
    close = Close.parse(bytes(frames[0].data))
    assert (close.code, close.reason) == (1013, "slow consumer")


def test_close_frame_reason_is_truncated_to_fit_a_control_frame() -> None:
    raw = close_frame(1000, "x" * 500)
    frame = parse_frames(raw)[0]
    assert frame.opcode is Opcode.CLOSE and len(frame.data) == 125
    assert struct.unpack("!H", bytes(frame.data[:2]))[0] == 1000
    assert raw[0] == 0x80 | OP_CLOSE


# -- properties --------------------------------------------------------------------------------

SAFE_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | SAFE_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(SAFE_TEXT, children, max_size=4),
    max_leaves=12,
)
OBJECT = st.dictionaries(SAFE_TEXT, JSON, max_size=5)
REF = st.none() | SAFE_TEXT


@given(join_ref=REF, ref=REF, topic=SAFE_TEXT, event=SAFE_TEXT, payload=OBJECT)
def test_property_v2_text_round_trip(
    join_ref: str | None, ref: str | None, topic: str, event: str, payload: dict[str, Any]
) -> None:
    raw = orjson.dumps([join_ref, ref, topic, event, payload])
    assert decode_text(raw, V2) == Message(join_ref, ref, topic, event, payload)


@given(join_ref=REF, ref=REF, topic=SAFE_TEXT, event=SAFE_TEXT, payload=OBJECT)
def test_property_v1_text_round_trip(
    join_ref: str | None, ref: str | None, topic: str, event: str, payload: dict[str, Any]
) -> None:
    raw = orjson.dumps({"payload": payload, "ref": ref, "event": event, "join_ref": join_ref, "topic": topic})
    assert decode_text(raw, V1) == Message(join_ref, ref, topic, event, payload)


@given(
    serializer=st.sampled_from([V1, V2]),
    join_ref=REF,
    ref=REF,
    topic=SAFE_TEXT,
    status=st.sampled_from(["ok", "error"]),
    response=OBJECT,
)
def test_property_reply_round_trip(
    serializer: Serializer,
    join_ref: str | None,
    ref: str | None,
    topic: str,
    status: str,
    response: dict[str, Any],
) -> None:
    obj = text_json(encode_reply(serializer, join_ref, ref, topic, status, response))
    payload = {"status": status, "response": response}
    if serializer is V2:
        assert obj == [join_ref, ref, topic, "phx_reply", payload]
    else:
        assert obj == {"topic": topic, "event": "phx_reply", "payload": payload, "ref": ref}


SHORT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40).filter(
    lambda s: len(s.encode()) <= 255
)


@given(join_ref=SHORT, ref=SHORT, topic=SHORT, event=SHORT, payload=JSON)
def test_property_kind3_json_round_trip(
    join_ref: str, ref: str, topic: str, event: str, payload: Any
) -> None:
    msg = decode_binary(binary_push(join_ref, ref, topic, event, orjson.dumps(payload)))
    assert msg == Message(
        join_ref or None,
        ref or None,
        topic,
        "broadcast",
        {"type": "broadcast", "event": event, "payload": payload},
    )


@given(topic=SHORT, event=SHORT, data=st.binary(max_size=300), meta=st.none() | OBJECT.filter(bool))
def test_property_kind4_round_trip(topic: str, event: str, data: bytes, meta: dict[str, Any] | None) -> None:
    payload: dict[str, Any] = {"type": "broadcast", "event": event, "payload": data}
    if meta is not None:
        payload["meta"] = meta
    meta_b = orjson.dumps(meta) if meta else b""
    if len(meta_b) > 255:
        return
    opcode, body = one_frame(Outbound(topic, "broadcast", payload).frame_v2())
    assert opcode is Opcode.BINARY
    tb, eb = topic.encode(), event.encode()
    assert body == bytes([KIND_USER_BROADCAST, len(tb), len(eb), len(meta_b), 0]) + tb + eb + meta_b + data


@settings(max_examples=300)
@given(data=st.binary(max_size=200), serializer=st.sampled_from([V1, V2]))
def test_property_decode_text_arbitrary_bytes(data: bytes, serializer: Serializer) -> None:
    try:
        decode_text(data, serializer)
    except MalformedMessage:
        pass


@settings(max_examples=300)
@given(
    value=JSON
    | st.lists(JSON, min_size=5, max_size=5)
    | st.fixed_dictionaries(
        {"topic": JSON, "event": JSON, "payload": JSON}, optional={"ref": JSON, "join_ref": JSON}
    ),
    serializer=st.sampled_from([V1, V2]),
)
def test_property_decode_text_arbitrary_json(value: Any, serializer: Serializer) -> None:
    try:
        decode_text(orjson.dumps(value), serializer)
    except MalformedMessage:
        pass


@settings(max_examples=300)
@given(
    data=st.binary(max_size=200)
    | st.tuples(st.binary(min_size=6, max_size=6), st.binary(max_size=120)).map(
        lambda t: b"\x03" + t[0] + t[1]
    )
)
def test_property_decode_binary_arbitrary_bytes(data: bytes) -> None:
    try:
        decode_binary(data)
    except MalformedMessage:
        pass


def test_close_frame_truncation_keeps_the_reason_valid_utf8() -> None:
    frame = parse_frames(close_frame(1001, "é" * 100))[0]
    assert len(frame.data) <= 125
    close = Close.parse(bytes(frame.data))  # raises on a reason cut inside a character
    assert close.code == 1001 and set(close.reason) == {"é"}


@pytest.mark.parametrize("ref", [None, "0000000016B3A2F8/00000003"])
def test_postgres_changes_push_with_and_without_the_position_as_ref(ref: str | None) -> None:
    data = {"type": "UPDATE", "position": "0000000016B3A2F8/00000003", "record": {"id": 1}}
    data_json = orjson.dumps(data)
    v2 = text_json(encode_change(V2, "realtime:o", [7, 9], data_json, ref))
    assert v2 == [None, ref, "realtime:o", "postgres_changes", {"ids": [7, 9], "data": data}]
    v1 = text_json(encode_change(V1, "realtime:o", [7], data_json, ref))
    assert v1 == {
        "topic": "realtime:o",
        "event": "postgres_changes",
        "payload": {"ids": [7], "data": data},
        "ref": ref,
    }
