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
from typing import Any

from ..broker.base import ChangeBus
from .changes import Change
from .service import PostgresChanges, PostgresChangesError

__all__ = ["CHANGES_KEY", "LEASE", "ChangeFeedLeader", "decode_change", "encode_change"]

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
        cdc.forwarder = self

    # -- Forwarder ---------------------------------------------------------------------------

    def change(self, change: Change) -> None:
        """Publish one streamed change to every node."""
        self.broker.publish_change(CHANGES_KEY, encode_change(change), self._published)

    def end(self, end_lsn: int, confirm: Any) -> None:
        """Confirm ``end_lsn`` once Redis answered every publish queued before it."""

        def done(result: Any) -> None:
            if self._failed or isinstance(result, Exception):
                return  # not confirmed: the next stream starts before these changes again
            confirm(end_lsn)

        self.broker.after_queued(done)

    def received(self, raw: dict[str, Any]) -> None:
        """A change from the bus (``Node.on_change``): match it against this node's subscriptions."""
        self.cdc.dispatch(decode_change(raw))

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
