"""A bug met while handling a client message never escapes the session: the connection is closed
with 1011, the error is counted and logged once with its traceback, the node goes on."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.support.session_pair import SessionPair
from tidings.protocol.codec import Serializer
from tidings.server.metrics_http import render_prometheus


def test_a_bug_in_a_handler_closes_the_connection_with_1011_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pair = SessionPair()
    victim, bystander = pair.connect(Serializer.V2), pair.connect(Serializer.V1)
    for c in (victim, bystander):
        c.join("realtime:room")
        assert c.one().status == "ok"

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in the node")

    # Fault injection: this node's publish verb is broken (a bug), the rest is the real thing.
    pair.node.publish_broadcast = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="tidings.session"):
        victim.broadcast("realtime:room", "e", {"n": 1})
    assert (victim.session.close_code, victim.session.close_reason) == (1011, "internal error")
    assert pair.node.metrics.internal_errors == 1
    [record] = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert record.exc_info is not None and "a bug in the node" in str(record.exc_info[1])
    assert victim.session not in pair.node.sessions  # torn down like any closed connection
    assert "tidings_internal_errors_total 1" in render_prometheus(pair.node, pair.monitor).splitlines()
    # Everyone else is unaffected.
    bystander.heartbeat()
    assert bystander.one().status == "ok"
    assert not bystander.closed
