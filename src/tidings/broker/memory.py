"""The embedded broker: one process, everything in memory, every call synchronous."""

from __future__ import annotations

import time
import uuid
from typing import Any

from ..history import MemoryHistory, ReplayResult
from .base import DUPLICATE, Broker, Envelope, JoinRead, PublishDone, ReplayQuery

__all__ = ["MemoryBroker"]


class MemoryBroker(Broker):
    """In-process fan-out, history and presence (the default without ``--redis-url``)."""

    synchronous = True

    def __init__(
        self,
        history_size: int,
        history_ttl: float,
        max_channels: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.node_id = uuid.uuid4().hex[:12]
        self.history = MemoryHistory(history_size, history_ttl, max_channels, max_bytes)
        self._presence: dict[str, dict[int, tuple[str, dict[str, Any]]]] = {}

    def publish(
        self,
        key: str,
        topic: str,
        event: str,
        payload: Any,
        msg_id: str,
        exclude: int | None = None,
        done: PublishDone | None = None,
        sender: str = "",
    ) -> None:
        history = self.history
        stored_id = history.admit(key, msg_id, sender)
        if stored_id is None:
            if done is not None:
                done(DUPLICATE)
            return
        seq = history.append(key, stored_id, event, payload, sender=sender)
        self._deliver(
            Envelope(Envelope.BROADCAST, key, topic, event, payload, stored_id, seq, self.node_id, exclude)
        )
        if done is not None:
            done(seq)

    def publish_presence(self, key: str, topic: str, diff: dict[str, Any]) -> None:
        self._deliver(Envelope(Envelope.PRESENCE, key, topic, "presence_diff", diff, origin=self.node_id))

    async def subscribe(self, key: str) -> None:
        self.history.pin(key)

    def unsubscribe(self, key: str) -> None:
        self.history.unpin(key)

    def replay_now(
        self,
        key: str,
        since_seq: int | None,
        since_time: float | None,
        limit: int,
        epoch: str | None = None,
    ) -> ReplayResult:
        """:meth:`replay` without awaiting (this broker is synchronous)."""
        if since_seq is not None:
            return self.history.since_seq(key, since_seq, limit, epoch=epoch)
        return self.history.since_time(key, since_time or 0.0, limit)

    async def replay(
        self,
        key: str,
        since_seq: int | None,
        since_time: float | None,
        limit: int,
        epoch: str | None = None,
    ) -> ReplayResult:
        return self.replay_now(key, since_seq, since_time, limit, epoch)

    async def last_seq(self, key: str) -> int | None:
        return self.history.last_seq(key)

    def position_now(self, key: str, owner: str = "") -> tuple[int, str]:
        """:meth:`position` without awaiting; the ring is pinned (a join is subscribing)."""
        self.history.pin(key)
        return self.history.position(key, owner)

    async def position(self, key: str, owner: str = "") -> tuple[int, str]:
        return self.position_now(key, owner)

    def join_now(self, key: str, replay: ReplayQuery | None, presence: bool, owner: str = "") -> JoinRead:
        """Every join is answered at once; the ring is created (and pinned) when it has none."""
        result = self.replay_now(key, *replay) if replay is not None else None
        state = self.presence_state_now(key) if presence else None
        return JoinRead(result, state, self.position_now(key, owner))

    async def join(self, key: str, replay: ReplayQuery | None, presence: bool, owner: str = "") -> JoinRead:
        return self.join_now(key, replay, presence, owner)

    def track(self, key: str, owner: int, presence_key: str, meta: dict[str, Any]) -> None:
        self._presence.setdefault(key, {})[owner] = (presence_key, meta)

    def untrack(self, key: str, owner: int) -> None:
        owners = self._presence.get(key)
        if owners is not None:
            owners.pop(owner, None)
            if not owners:
                del self._presence[key]

    def presence_state_now(self, key: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """:meth:`presence_state` without awaiting."""
        state: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for presence_key, meta in self._presence.get(key, {}).values():
            state.setdefault(presence_key, {"metas": []})["metas"].append(meta)
        return state

    async def presence_state(self, key: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
        return self.presence_state_now(key)

    def history_stats(self) -> dict[str, int]:
        h = self.history
        return {
            "scoped_ids": h.scoped_ids,
            "bytes": h.bytes,
            "channels": len(h),
            "evicted": h.evicted,
            "expired": h.expired,
        }

    def sweep(self, now: float | None = None) -> None:
        """Expire old history (``now``: wall-clock seconds, the current time by default)."""
        self.history.sweep(time.time() if now is None else now)
