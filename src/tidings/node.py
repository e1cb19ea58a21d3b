"""One Tidings node: hub, history, auth, limits and the shared timers of every connection.

Connections (``session.Session``) call into the node; the node never blocks. A single periodic
sweeper checks heartbeat deadlines and token expiry for all connections (no timer per connection).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from .auth.tokens import Verifier
from .config import Config
from .history import MemoryHistory
from .hub import Hub
from .limits import TokenBucket
from .metrics import NodeMetrics
from .protocol.codec import Outbound
from .protocol.join import TOPIC_PREFIX

if TYPE_CHECKING:
    from .session import Channel, Session

__all__ = ["Node", "group_key"]

log = logging.getLogger("tidings.node")

SWEEP_INTERVAL = 1.0
JOIN_WINDOW = 10.0  # joins/s are averaged over this window (Supabase averages over 60 s)


def group_key(private: bool, sub_topic: str) -> str:
    """Fan-out group of a channel: public and private channels of one name are separate."""
    return ("x:" if private else "p:") + sub_topic


class Node:
    """State shared by every connection of this process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.verifier = Verifier(config.jwt_secret, config.jwt_jwks, config.jwt_claim_validators)
        self.hub = Hub()
        self.history = MemoryHistory(config.history_size, config.history_ttl)
        self.metrics = NodeMetrics()
        now = time.monotonic()
        self.join_bucket = TokenBucket(
            config.max_joins_per_second, config.max_joins_per_second * JOIN_WINDOW, now
        )
        self.message_bucket = TokenBucket(
            config.max_node_messages_per_second, config.max_node_messages_per_second, now
        )
        self.sessions: set[Session] = set()
        self.users: Counter[str] = Counter()
        self.tick = 0
        self.draining = False
        self.started_at = time.time()
        self._expiry: list[tuple[float, int, Channel]] = []
        self._expiry_seq = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_payload_bytes = config.max_payload_size_kb * 1024
        # Silent for more than 2 heartbeat intervals -> closed; counted in sweeper ticks.
        self.idle_ticks = max(2, math.ceil(2 * config.heartbeat_interval / SWEEP_INTERVAL))

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the node runs on."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the shared sweeper."""
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.create_task(self._sweep_forever(), name="tidings-sweeper")

    async def stop(self) -> None:
        """Stop the sweeper (connections are closed by the drain)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self.sweep()
            except Exception:
                log.exception("sweeper failed")

    def sweep(self) -> None:
        """One pass: idle connections, expired channel tokens, old history."""
        self.tick += 1
        limit = self.tick - self.idle_ticks
        for session in [s for s in self.sessions if s.last_seen < limit]:
            self.metrics.heartbeat_timeouts += 1
            session.close(1000, "heartbeat timeout")
        now = time.time()
        heap = self._expiry
        while heap and heap[0][0] <= now:
            exp, _, channel = heapq.heappop(heap)
            channel.token_expired(exp, now)
        if self.tick % 10 == 0:
            self.history.sweep(now)

    def schedule_expiry(self, channel: Channel, exp: float) -> None:
        """Check ``channel``'s token at ``exp`` (stale entries are ignored by the channel)."""
        self._expiry_seq += 1
        heapq.heappush(self._expiry, (exp, self._expiry_seq, channel))

    def drain(self, window: float | None = None) -> None:
        """Close every connection with 1012, in batches spread over ``window`` seconds."""
        if self.draining:
            return
        self.draining = True
        window = self.config.drain_window if window is None else window
        pending = list(self.sessions)
        log.info("draining %d connections over %.1f s", len(pending), window)
        step = 0.1
        batches = max(1, int(window / step))
        size = max(1, math.ceil(len(pending) / batches))

        def close_batch(start: int) -> None:
            for session in pending[start : start + size]:
                session.close(1012, "server restarting")
            if start + size < len(pending):
                self.loop.call_later(step, close_batch, start + size)

        if pending:
            close_batch(0)

    # -- connections -------------------------------------------------------------------------

    def register(self, session: Session, user: str | None) -> None:
        """Count an accepted connection."""
        self.sessions.add(session)
        if user is not None:
            self.users[user] += 1
        self.metrics.connections_total += 1

    def unregister(self, session: Session, user: str | None) -> None:
        """Forget a closed connection."""
        self.sessions.discard(session)
        if user is not None:
            left = self.users[user] - 1
            if left > 0:
                self.users[user] = left
            else:
                del self.users[user]

    # -- broadcast ---------------------------------------------------------------------------

    def publish_broadcast(
        self,
        private: bool,
        sub_topic: str,
        event: str,
        payload: Any,
        msg_id: str | None = None,
        exclude: Hashable | None = None,
    ) -> int | None:
        """Number, store and fan out one broadcast; returns its sequence number.

        Returns ``None`` (and delivers nothing) when ``msg_id`` was already published on the
        channel: a client re-sending a message after a reconnect gets it delivered once.
        """
        key = group_key(private, sub_topic)
        history = self.history
        if msg_id is None:
            msg_id = str(uuid.uuid4())
        elif history.seen(key, msg_id):
            return None
        store = payload if not isinstance(payload, bytes | bytearray) else bytes(payload)
        seq = history.append(key, msg_id, event, store)
        out = Outbound(
            TOPIC_PREFIX + sub_topic,
            "broadcast",
            {"type": "broadcast", "event": event, "payload": payload, "meta": {"id": msg_id, "seq": seq}},
        )
        self.metrics.broadcasts += 1
        self.metrics.deliveries += self.hub.fanout(key, out, exclude)
        return seq

    def fanout(self, key: str, out: Outbound, exclude: Hashable | None = None) -> int:
        """Fan out an already built message (presence diffs) and count the deliveries."""
        sent = self.hub.fanout(key, out, exclude)
        self.metrics.deliveries += sent
        return sent
