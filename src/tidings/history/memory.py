"""In-process channel history: a ring per channel, bounded in count, age, bytes and number of channels.

**Numbering and epochs.** A ring's sequence numbers start from the wall clock (microseconds) when
the ring is created, and the ring has an *epoch*: ``"<base>-<instance>"``, where ``base`` is the
sequence number the ring started after and ``instance`` is random per process. A ring that is
dropped (expired, evicted) or lost with a restart comes back with another epoch, so a rejoin
holding a sequence number of an older ring is told its recovery is incomplete, never given a
silent gap. A ring is created by the first publish *or the first join* of a channel: the join
reply then carries a real baseline (``seq`` and ``epoch``) even before any message.

**Bounds.** ``size`` records and ``ttl`` seconds per ring; ``max_channels`` rings and
``max_bytes`` (estimated) bytes per process. A ring with local subscribers is *pinned*
(:meth:`MemoryHistory.pin`); a ring that is not pinned and holds nothing for ``ttl`` is dropped.

**Fair eviction.** Every ring is charged to its *owner*, the sender (JWT ``sub``, else role and
address) that created it. When a bound is exceeded by a sender holding more than
:data:`SENDER_SHARE` of it, that sender's own least recently active rings go; otherwise the least
recently active unpinned ring of anyone goes. So one sender's junk channels evict its own history
first, and never a pinned ring of another sender.

**De-duplication** is per sender: a message id already held by another sender is stored under a
scoped id (``<id>~<tag>``, ``tag`` a keyed hash of the sender) instead of being dropped, so no one
can suppress another sender's message by publishing its id first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import uuid
from collections import OrderedDict, deque
from itertools import islice
from typing import Any

import orjson

__all__ = ["SENDER_SHARE", "HistoryRecord", "MemoryHistory", "ReplayResult", "payload_size"]

#: Share of ``max_channels`` (or ``max_bytes``) above which a sender pays for its own overflow.
SENDER_SHARE = 0.1
# Estimated bytes of bookkeeping besides the key (ring) or the id, event and payload (record).
_RING_BYTES = 400
_RECORD_BYTES = 240
# Rings looked at when preferring an unpinned one among a sender's oldest.
_EVICTION_SCAN = 64


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One stored broadcast (``size``: its estimated bytes in memory, 0 when not measured)."""

    seq: int
    id: str
    ts: float
    event: str
    payload: Any
    size: int = dataclasses.field(default=0, compare=False, repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a rejoin gets: the records (oldest first), whether nothing is missing, and the epoch
    of the numbering they belong to (``None`` when the channel has none)."""

    records: list[HistoryRecord]
    complete: bool
    epoch: str | None = dataclasses.field(default=None, compare=False)


def payload_size(payload: Any) -> int:
    """Estimated bytes of a payload: its length for bytes and text, else its JSON length."""
    if isinstance(payload, bytes | bytearray | str):
        return len(payload)
    try:
        return len(orjson.dumps(payload))
    except TypeError:
        return 1024  # not JSON-serialisable (never from a client): a flat guess


class _Owner:
    """A sender's rings, least recently active first, and the bytes charged to it."""

    __slots__ = ("bytes", "name", "rings")

    def __init__(self, name: str) -> None:
        self.name = name
        self.bytes = 0
        self.rings: OrderedDict[str, _Ring] = OrderedDict()


class _Ring:
    __slots__ = ("base", "bytes", "dropped_ts", "ids", "key", "last_seq", "owner", "records", "touched")

    def __init__(self, key: str, base: int, owner: _Owner, now: float) -> None:
        self.key = key
        self.base = base  # the ring numbers from base + 1
        self.last_seq = base
        self.owner = owner
        self.records: deque[HistoryRecord] | None = None  # created with the first record
        self.ids: dict[str, str] | None = None  # message id -> the sender that published it
        self.bytes = _RING_BYTES + len(key)
        self.dropped_ts = 0.0  # newest ts of a record trimmed away (0: none ever)
        self.touched = now  # last publish, join or unpin


class MemoryHistory:
    """History for the embedded (single-process) broker.

    Args:
        size: records kept per channel (0 keeps none but still numbers messages).
        ttl: seconds a record is kept; an unpinned ring idle this long with nothing kept is dropped.
        max_channels: rings kept (see the module doc for who is evicted beyond it).
        max_bytes: estimated bytes of rings and records kept.
    """

    def __init__(
        self, size: int, ttl: float, max_channels: int = 100_000, max_bytes: int = 64 * 1024 * 1024
    ) -> None:
        self.size = size
        self.ttl = ttl
        self.max_channels = max_channels
        self.max_bytes = max_bytes
        #: Estimated bytes held, rings dropped over a bound, rings dropped once expired,
        #: messages stored under a scoped id because another sender held theirs.
        self.bytes = 0
        self.evicted = 0
        self.expired = 0
        self.scoped_ids = 0
        self.instance = uuid.uuid4().hex[:6]
        self._salt = os.urandom(16)
        self._rings: dict[str, _Ring] = {}
        self._idle: OrderedDict[str, _Ring] = OrderedDict()  # unpinned rings, least recent first
        self._owners: dict[str, _Owner] = {}
        self._pinned: set[str] = set()
        self._last_base = 0

    def __len__(self) -> int:
        return len(self._rings)

    # -- rings -------------------------------------------------------------------------------

    def _epoch(self, ring: _Ring) -> str:
        return f"{ring.base}-{self.instance}"

    def _create(self, key: str, owner_name: str, now: float) -> _Ring:
        owner = self._owners.get(owner_name)
        if owner is None:
            owner = self._owners[owner_name] = _Owner(owner_name)
        # From the clock, and never the same base twice in this process: epochs stay unique.
        base = max(int(now * 1_000_000) - 1, self._last_base + 1)
        self._last_base = base
        ring = self._rings[key] = _Ring(key, base, owner, now)
        owner.rings[key] = ring
        owner.bytes += ring.bytes
        self.bytes += ring.bytes
        if key not in self._pinned:
            self._idle[key] = ring
        return ring

    def _touch(self, ring: _Ring, now: float) -> None:
        ring.touched = now
        ring.owner.rings.move_to_end(ring.key)
        if ring.key in self._idle:
            self._idle.move_to_end(ring.key)

    def _drop(self, ring: _Ring) -> None:
        key, owner = ring.key, ring.owner
        del self._rings[key]
        self._idle.pop(key, None)
        del owner.rings[key]
        owner.bytes -= ring.bytes
        self.bytes -= ring.bytes
        if not owner.rings:
            del self._owners[owner.name]

    def _charge(self, ring: _Ring, nbytes: int) -> None:
        ring.bytes += nbytes
        ring.owner.bytes += nbytes
        self.bytes += nbytes

    def position(self, key: str, owner: str = "", now: float | None = None) -> tuple[int, str]:
        """``(newest seq, epoch)`` of ``key``, creating its ring (charged to ``owner``) if none.

        A join's baseline: the client can later prove it missed nothing after it.
        """
        now = time.time() if now is None else now
        ring = self._rings.get(key)
        if ring is None:
            ring = self._create(key, owner, now)
            self._enforce(ring)
        else:
            self._touch(ring, now)
        return ring.last_seq, self._epoch(ring)

    def pin(self, key: str) -> None:
        """``key`` has local subscribers: its ring is neither expired nor evicted for others."""
        self._pinned.add(key)
        self._idle.pop(key, None)

    def unpin(self, key: str, now: float | None = None) -> None:
        """``key`` has no local subscriber any more; its ring may expire ``ttl`` from now."""
        self._pinned.discard(key)
        ring = self._rings.get(key)
        if ring is not None:
            ring.touched = time.time() if now is None else now
            self._idle[key] = ring
            self._idle.move_to_end(key)

    def last_seq(self, key: str) -> int | None:
        """The newest sequence number given on ``key``, if it has a ring."""
        ring = self._rings.get(key)
        return None if ring is None else ring.last_seq

    def epoch(self, key: str) -> str | None:
        """The epoch of ``key``'s ring, if it has one."""
        ring = self._rings.get(key)
        return None if ring is None else self._epoch(ring)

    # -- publishing --------------------------------------------------------------------------

    def seen(self, key: str, msg_id: str) -> bool:
        """True when a record with ``msg_id`` is still retained on ``key`` (whoever sent it)."""
        ring = self._rings.get(key)
        return ring is not None and ring.ids is not None and msg_id in ring.ids

    def admit(self, key: str, msg_id: str, sender: str = "") -> str | None:
        """The id to store ``sender``'s ``msg_id`` under, or ``None`` for a re-send to drop.

        A re-send is an id this sender published and history still holds. An id another sender
        holds is not a re-send: the message gets a scoped id instead.
        """
        ring = self._rings.get(key)
        ids = None if ring is None else ring.ids
        if not ids:
            return msg_id
        holder = ids.get(msg_id)
        if holder is None:
            return msg_id
        if holder == sender:
            return None
        scoped = f"{msg_id}~{self.sender_tag(sender)}"
        holder = ids.get(scoped)
        if holder == sender:
            return None  # a re-send of a message that was already scoped
        self.scoped_ids += 1
        return scoped if holder is None else str(uuid.uuid4())

    def sender_tag(self, sender: str) -> str:
        """A short tag of ``sender`` no one else can compute (keyed with this process's salt)."""
        return hashlib.blake2b(sender.encode(), key=self._salt, digest_size=6).hexdigest()

    def append(
        self, key: str, msg_id: str, event: str, payload: Any, now: float | None = None, sender: str = ""
    ) -> int:
        """Store a broadcast from ``sender`` and return its sequence number."""
        now = time.time() if now is None else now
        ring = self._rings.get(key)
        if ring is None:
            ring = self._create(key, sender, now)
        else:
            self._touch(ring, now)
        ring.last_seq += 1
        seq = ring.last_seq
        if self.size:
            size = _RECORD_BYTES + len(msg_id) + len(event) + payload_size(payload)
            if ring.records is None or ring.ids is None:
                ring.records, ring.ids = deque(), {}
            ring.records.append(HistoryRecord(seq, msg_id, now, event, payload, size))
            ring.ids[msg_id] = sender
            self._charge(ring, size)
            self._trim(ring, now)
        else:
            ring.dropped_ts = now  # numbered, not kept: a time replay cannot vouch for it
        self._enforce(ring)
        return seq

    def _trim(self, ring: _Ring, now: float) -> None:
        records, ids = ring.records, ring.ids
        if not records or ids is None:
            return
        cutoff = now - self.ttl
        while records and (len(records) > self.size or records[0].ts < cutoff):
            self._pop_oldest(ring, records, ids)

    def _pop_oldest(self, ring: _Ring, records: deque[HistoryRecord], ids: dict[str, str]) -> None:
        old = records.popleft()
        ids.pop(old.id, None)
        ring.dropped_ts = old.ts
        self._charge(ring, -old.size)

    # -- bounds ------------------------------------------------------------------------------

    def _enforce(self, ring: _Ring) -> None:
        """Bring the process back under ``max_channels`` and ``max_bytes`` after ``ring`` grew."""
        while len(self._rings) > self.max_channels or self.bytes > self.max_bytes:
            over_count = len(self._rings) > self.max_channels
            owner = ring.owner
            if over_count:
                heavy = len(owner.rings) > self.max_channels * SENDER_SHARE
            else:
                heavy = owner.bytes > self.max_bytes * SENDER_SHARE
                records = ring.records
                if ring.bytes > self.max_bytes * SENDER_SHARE and records and len(records) > 1:
                    # One channel holds too much: it gives up its own oldest records first.
                    assert ring.ids is not None
                    self._pop_oldest(ring, records, ring.ids)
                    continue
            victim = None if heavy else self._oldest_idle(ring)
            if victim is None:
                victim = self._oldest_of(owner, ring)
            if victim is None:
                records = ring.records
                if not over_count and records and len(records) > 1:
                    assert ring.ids is not None
                    self._pop_oldest(ring, records, ring.ids)
                    continue
                return  # only pinned rings of others, or this ring's newest record, are left
            self._drop(victim)
            self.evicted += 1

    def _oldest_idle(self, spare: _Ring) -> _Ring | None:
        for ring in self._idle.values():
            if ring is not spare:
                return ring
        return None

    def _oldest_of(self, owner: _Owner, spare: _Ring) -> _Ring | None:
        """``owner``'s least recently active ring but ``spare``, preferring one not pinned."""
        first = None
        for ring in islice(owner.rings.values(), _EVICTION_SCAN):
            if ring is spare:
                continue
            if ring.key not in self._pinned:
                return ring
            first = first or ring
        return first

    def sweep(self, now: float | None = None) -> None:
        """Drop expired records, and the rings left with nothing that nobody here subscribes to.

        A dropped ring's numbering is gone with it: the next ring of that channel has another
        epoch, so a rejoin holding the old numbers is told it may have missed messages.
        """
        now = time.time() if now is None else now
        idle_before = now - self.ttl
        for ring in list(self._rings.values()):
            self._trim(ring, now)
            if not ring.records:
                ring.records = ring.ids = None
                if ring.touched < idle_before and ring.key not in self._pinned:
                    self._drop(ring)
                    self.expired += 1

    # -- replay ------------------------------------------------------------------------------

    def since_seq(
        self, key: str, since_seq: int, limit: int, now: float | None = None, epoch: str | None = None
    ) -> ReplayResult:
        """Records after ``since_seq``, oldest first, at most ``limit``.

        Complete only when this ring provably holds everything after ``since_seq``: the number
        was given by this ring (``epoch`` matches when given, and ``since_seq`` lies within the
        ring's numbering) and nothing after it was trimmed or cut by ``limit``.
        """
        now = time.time() if now is None else now
        ring = self._rings.get(key)
        if ring is None:
            return ReplayResult([], complete=False)
        self._trim(ring, now)
        records = ring.records or ()
        current = self._epoch(ring)
        if epoch is not None and epoch != current:
            # Another ring's numbering: everything this ring holds is news to the client.
            return ReplayResult(list(islice(records, limit)), False, current)
        newer = [r for r in records if r.seq > since_seq]
        if not ring.base <= since_seq <= ring.last_seq:
            # Older than this ring (a restart, an eviction) or beyond what it numbered.
            return ReplayResult(newer[:limit], False, current)
        first_available = newer[0].seq if newer else ring.last_seq + 1
        complete = first_available == since_seq + 1 and len(newer) <= limit
        return ReplayResult(newer[:limit], complete, current)

    def since_time(self, key: str, since: float, limit: int, now: float | None = None) -> ReplayResult:
        """The newest ``limit`` records stored at or after ``since`` (seconds), oldest first.

        Complete only when the ring existed at ``since``, nothing stored after ``since`` was
        trimmed, and ``limit`` cut nothing.
        """
        now = time.time() if now is None else now
        ring = self._rings.get(key)
        if ring is None:
            return ReplayResult([], complete=False)
        self._trim(ring, now)
        newer = [r for r in ring.records or () if r.ts >= since]
        complete = (ring.base + 1) / 1_000_000 <= since and ring.dropped_ts < since and len(newer) <= limit
        return ReplayResult(newer[-limit:], complete, self._epoch(ring))
