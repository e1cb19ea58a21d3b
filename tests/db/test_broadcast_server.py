"""Broadcast from Database end to end: a real server on a PostgreSQL prepared like Supabase's image
(empty realtime schema), a raw WebSocket client, and ``select realtime.send(...)``."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.support.phx import PhxClient
from tests.support.postgres import PostgresServer
from tests.support.server import ServerProcess
from tests.support.supabase_db import SupabaseDatabase, create_supabase_database

from .test_broadcast_from_database import drop_slots

pytestmark = pytest.mark.postgres

_slots = itertools.count(1)


@pytest.fixture
def empty_db(postgres: PostgresServer) -> Iterator[SupabaseDatabase]:
    db = create_supabase_database(postgres)
    yield db
    drop_slots(postgres, db.name)


def server_env(db: SupabaseDatabase, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": db.dsn,
        "DB_SLOT": f"tidings_bfd_srv_{os.getpid()}_{next(_slots)}",
        "DB_RESUME_GRACE": "0",
        **extra,
    }


def row_id(db: SupabaseDatabase, event: str) -> str:
    ((value,),) = db.execute("SELECT id::text FROM realtime.messages WHERE event = %s", (event,))
    return str(value)


async def metric(server: ServerProcess, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server.http_url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_realtime_send_reaches_a_websocket_client(empty_db: SupabaseDatabase) -> None:
    db = empty_db
    with ServerProcess(env=server_env(db)).start() as server:
        client = await PhxClient.open(server.http_url)
        try:
            await client.join("realtime:room-1")
            db.execute("SELECT realtime.send('{\"body\": \"hello\"}', 'greeting', 'room-1', false)")
            push = await client.wait(lambda m: m[3] == "broadcast", timeout=30)
        finally:
            await client.close()
        assert push[2] == "realtime:room-1"
        message = push[4]
        sent_id = row_id(db, "greeting")
        assert message["type"] == "broadcast" and message["event"] == "greeting"
        assert message["payload"] == {"body": "hello", "id": sent_id}
        assert message["meta"]["id"] == sent_id
        assert await metric(server, "tidings_db_broadcasts_total") == 1
        assert await metric(server, "tidings_db_broadcasts_too_large_total") == 0
    logs = server.logs()
    assert "Traceback" not in logs, logs
    assert "created publication supabase_realtime_messages_publication" in logs, logs


async def test_send_binary_is_a_binary_frame_on_vsn_2(empty_db: SupabaseDatabase) -> None:
    db = empty_db
    with ServerProcess(env=server_env(db)).start() as server:
        url = server.http_url.replace("http", "ws", 1) + "/realtime/v1/websocket?vsn=2.0.0"
        async with connect(url, open_timeout=10) as ws:
            await ws.send(json.dumps(["1", "1", "realtime:bin", "phx_join", {"config": {}}]))
            while json.loads(await ws.recv())[3] != "phx_reply":
                pass
            db.execute("SELECT realtime.send_binary('\\x00ff10'::bytea, 'blob', 'bin', false)")
            async with asyncio.timeout(30):
                while not isinstance(frame := await ws.recv(), bytes):
                    pass
    kind, topic_len, event_len, meta_len, encoding = frame[:5]
    assert (kind, encoding) == (4, 0)
    body = frame[5:]
    assert body[:topic_len] == b"realtime:bin"
    assert body[topic_len : topic_len + event_len] == b"blob"
    meta: dict[str, Any] = json.loads(body[topic_len + event_len : topic_len + event_len + meta_len])
    assert meta["id"] == row_id(db, "blob")
    assert body[topic_len + event_len + meta_len :] == b"\x00\xff\x10"


async def test_rows_sent_while_the_server_was_down_arrive_after_its_restart(
    empty_db: SupabaseDatabase,
) -> None:
    db = empty_db
    # The slot exists on the second start: streaming waits DB_RESUME_GRACE so clients rejoin first.
    server = ServerProcess(env=server_env(db, DB_RESUME_GRACE="5s")).start()
    try:
        client = await PhxClient.open(server.http_url)
        await client.join("realtime:r")
        db.execute("SELECT realtime.send('{\"n\": 1}', 'before', 'r', false)")
        await client.wait(lambda m: m[3] == "broadcast", timeout=30)
        await client.close()
        server.stop()
        for n in (2, 3):
            db.execute("SELECT realtime.send(jsonb_build_object('n', %s), 'while-down', 'r', false)", (n,))
        server.start()
        client = await PhxClient.open(server.http_url)
        await client.join("realtime:r")
        db.execute("SELECT realtime.send('{\"n\": 4}', 'after', 'r', false)")
        await client.wait(lambda m: m[3] == "broadcast" and m[4]["event"] == "after", timeout=40)
        await client.close()
        assert [(b["event"], b["payload"]["n"]) for b in client.broadcasts()] == [
            ("while-down", 2),
            ("while-down", 3),
            ("after", 4),
        ]
    finally:
        server.stop()
