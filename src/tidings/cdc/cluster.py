"""Postgres Changes in a cluster: one node streams the slot, every node delivers.

The cluster's :class:`~tidings.broker.base.ChangeBus` (the Redis broker) carries both the lease
and the changes; this module knows that interface only. The node holding the lease streams the
replication slot and publishes each change to the ``cdc`` broker channel; every node (the leader
included) matches the changes it receives against its own subscriptions. The slot position is
confirmed only once Redis took every change of a transaction, so a leader that dies loses nothing:
the next leader (within about one lease time) streams again from the last confirmed position, and
nodes drop re-sent changes by their id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson

from ..broker.base import ChangeBus
from ..protocol.positions import format_position
from .changelog import (
    Candidates,
    LogState,
    MemoryChangeLog,
    TableRead,
    covered_after,
    new_epoch,
    position_before,
)
from .changes import Change
from .service import PostgresChanges, PostgresChangesError

__all__ = ["CHANGES_KEY", "LEASE", "BusChangeLog", "ChangeFeedLeader", "decode_change", "encode_change"]

log = logging.getLogger("tidings.cdc.cluster")

CHANGES_KEY = "cdc"
LEASE = "cdc:leader"  # the replication lease: whoever holds it streams the slot


def encode_change(change: Change) -> dict[str, Any]:
    """A change as JSON-ready data for the broker."""
    return {
        "id": change.id,
        "lsn": change.commit_lsn,
        "i": change.index,
        "schema": change.schema,
        "table": change.table,
        "type": change.type,
        "data": change.data,
        "row": change.row,
        "ft": change.filter_types,
        "pk": list(change.primary_key),
        "x": change.xid,
    }


def decode_change(raw: dict[str, Any]) -> Change:
    """Inverse of :func:`encode_change`."""
    return Change(
        id=raw["id"],
        commit_lsn=raw["lsn"],
        index=raw["i"],
        schema=raw["schema"],
        table=raw["table"],
        type=raw["type"],
        data=raw["data"],
        row=raw["row"],
        filter_types=raw["ft"],
        primary_key=tuple(raw["pk"]),
        xid=raw.get("x", 0),  # absent from a node of an older version
    )


def _table_name(schema: str, table: str) -> str:
    """One string per table, unambiguous whatever the names hold."""
    return f"{len(schema)}:{schema}.{table}"


class BusChangeLog:
    """The change log of a cluster, in Redis through the :class:`ChangeBus` (see
    :mod:`tidings.cdc.changelog` for its guarantees): the lease holder appends every change it
    streams, in the order of its publishes, and every node reads it, also after a restart.

    Every node also mirrors the log in memory from the changes it receives (:attr:`mirror`, fed by
    :meth:`ChangeFeedLeader.received`): a read the mirror covers (it holds everything after the
    position asked for, up to the head Redis reports) is answered from it, through its value
    indexes; any other read (after a restart of this node, a lost publish) goes to Redis.

    Args:
        bus: the cluster's change bus.
        size, max_bytes, ttl: the bounds per table (``DB_CHANGE_LOG_*``); ``size=0``: no log.
    """

    def __init__(self, bus: ChangeBus, size: int, max_bytes: int, ttl: float) -> None:
        self.bus = bus
        self.size = size
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.enabled = size > 0
        self._limits = (size, max_bytes, ttl)
        self._epoch = new_epoch()  # used only if Redis lost the log while this node streams
        self.mirror = MemoryChangeLog(size, max_bytes, ttl)
        """This node's copy of the log, from the changes it received."""
        self._head = ""  # Redis' head at the last state() (reads follow a state)
        self.mirror_reads = 0
        """Table reads answered from the mirror (the rest went to Redis)."""

    def begin(self, start_lsn: int) -> None:
        """See :class:`~tidings.cdc.changelog.ChangeLog` (queued on the bus)."""
        if self.enabled:
            self.bus.log_begin(f"{start_lsn:016X}", covered_after(start_lsn), new_epoch())

    def append(self, change: Change) -> None:
        """Queued on the bus before the change's publish."""
        if not self.enabled:
            return
        position = change.position
        entry = orjson.dumps(encode_change(change))
        table = _table_name(change.schema, change.table)
        self.bus.log_change(table, position, entry, self._limits, self._epoch, position_before(position))

    def transaction_end(self, end_lsn: int) -> None:
        """Queued on the bus after the transaction's changes."""
        if self.enabled:
            self.bus.log_through(f"{end_lsn:016X}")

    async def state(self) -> LogState:
        """Read from Redis (in order with this node's queued commands)."""
        meta = await self.bus.log_state()
        epoch = meta.get("epoch") or None
        self._head = meta.get("head", "")
        return LogState(epoch, meta.get("after") or format_position(0, 0), self._head)

    async def read(
        self, table: tuple[str, str], since: str, limit: int, candidates: Sequence[Candidates] | None
    ) -> TableRead:
        """The table's stream after *since*, in pages; *candidates* are not used (no value index).

        Complete only when nothing after *since* was trimmed (count, bytes: the table's trim mark;
        age: entries older than ``ttl`` count as trimmed) and the newest change logged for the
        table (``last:``) is among what was read (a stream evicted from Redis is not complete).
        """
        mirror = self.mirror
        if mirror.epoch is not None and since >= mirror.after and mirror.head >= self._head:
            self.mirror_reads += 1
            return mirror.read_now(table, since, limit, candidates)
        name = _table_name(*table)
        meta = await self.bus.log_state()
        trimmed, last = meta.get("trim:" + name, ""), meta.get("last:" + name, "")
        cutoff = time.time() - self.ttl
        changes: list[Change] = []
        after, newest = since, ""
        while len(changes) <= limit:
            page = await self.bus.log_read(name, after, min(500, limit + 1 - len(changes)))
            for position, logged_at, raw in page:
                newest = after = position
                if logged_at < cutoff:
                    trimmed = max(trimmed, position)
                    changes.clear()  # older than ttl: as good as trimmed, and so is all before it
                    continue
                changes.append(decode_change(orjson.loads(raw)))
            if not page or len(changes) > limit:
                break
        if len(changes) > limit:
            return TableRead(changes[:limit], False)
        complete = since >= trimmed and (last <= since or newest >= last)
        return TableRead(changes, complete)


class ChangeFeedLeader:
    """Runs on every node: competes for the lease, streams while holding it.

    Args:
        cdc: this node's Postgres Changes service (its subscriptions are this node's).
        broker: the cluster's change bus (the Redis broker).
        lease_ttl: seconds a lease lasts without renewal; a dead leader is replaced after it.
        first_delay: seconds before the first attempt (lets clients rejoin after a restart).
    """

    def __init__(
        self, cdc: PostgresChanges, broker: ChangeBus, lease_ttl: float = 6.0, first_delay: float = 0.0
    ) -> None:
        self.cdc = cdc
        self.broker = broker
        self.lease_ttl = lease_ttl
        self.first_delay = first_delay
        self.leader = False
        self._failed = False
        # The position after which this stream published everything (its start, then its last
        # change): sent with each change, so a node's mirror of the log sees a hole in it.
        self._prev: str | None = None
        cdc.forwarder = self

    # -- Forwarder ---------------------------------------------------------------------------

    def started(self, start_lsn: int) -> None:
        """This node streams from *start_lsn*: its first change follows the position just before."""
        self._prev = covered_after(start_lsn)

    def change(self, change: Change) -> None:
        """Publish one streamed change to every node (with the position it follows)."""
        raw = encode_change(change)
        raw["pv"] = self._prev
        position = change.position
        if self._prev is None or position > self._prev:
            self._prev = position
        self.broker.publish_change(CHANGES_KEY, raw, self._published)

    def end(self, end_lsn: int, confirm: Any) -> None:
        """Confirm ``end_lsn`` once Redis answered every publish queued before it."""

        def done(result: Any) -> None:
            if self._failed or isinstance(result, Exception):
                return  # not confirmed: the next stream starts before these changes again
            confirm(end_lsn)

        self.broker.after_queued(done)

    def received(self, raw: dict[str, Any]) -> None:
        """A change from the bus (``Node.on_change``): mirrored into this node's copy of the log,
        then matched against this node's subscriptions."""
        change = decode_change(raw)
        change_log = self.cdc.log
        if isinstance(change_log, BusChangeLog) and change_log.enabled:
            prev = raw.get("pv")
            change_log.mirror.follow(change, prev if isinstance(prev, str) else None)
        self.cdc.dispatch(change)

    def _published(self, result: Any) -> None:
        if isinstance(result, Exception) and not self._failed:
            log.error("a change could not be handed to Redis (%s); restarting the stream", result)
            self._failed = True

    # -- lease -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Hold or wait for the lease until cancelled."""
        await self.broker.subscribe(CHANGES_KEY)
        await asyncio.sleep(self.first_delay)
        interval = self.lease_ttl / 3
        try:
            while True:
                await self._step()
                self.cdc.release()  # changes flow now, through this node's stream or the leader's
                await asyncio.sleep(interval)
        finally:
            self.cdc.release()  # nobody waits for a stream that will not come
            if self.leader:
                await self._resign()

    async def _step(self) -> None:
        try:
            held = await self.broker.lease(LEASE, self.lease_ttl)
        except Exception as exc:  # Redis down: nobody can confirm changes anyway
            log.warning("cannot renew the replication lease (%s)", exc)
            held = False
        if held and self._failed:
            await self.cdc.stop_streaming()
            self._failed = False
        if held and not self.cdc.streaming:
            log.info("node %s holds the replication lease: streaming the slot", self.broker.node_id)
            try:
                await self.cdc.start()
            except PostgresChangesError as exc:
                log.error("cannot stream the slot: %s", exc)
                held = False
        elif not held and self.cdc.streaming:
            log.warning("node %s lost the replication lease: stopping the stream", self.broker.node_id)
            await self.cdc.stop_streaming()
        self.leader = held

    async def _resign(self) -> None:
        await self.cdc.stop_streaming()
        try:
            await self.broker.resign(LEASE)
        except Exception:
            pass
        self.leader = False
