"""The Redis broker: nodes share channels, history and presence through one Redis.

* **Publish** is one Lua script: de-duplicate by (sender, message id), take the channel's next
  sequence number, append to the channel's stream (bounded by ``MAXLEN`` and an expiry) and
  ``PUBLISH`` the envelope. Every node, the publisher included, delivers from its subscription
  connection, so each node sees a channel's messages in sequence order. An id that another
  sender holds is published under ``<id>~<tag>`` (the tag travels in the head: ``seq~tag|``).
* **Epochs**: a channel's counter (``seq``) has an epoch key (``seq:…:start``,
  ``"<base>-<node>"``) created with it. Both live ``SEQ_TTL`` after the last publish or join; a
  counter or epoch lost to expiry, eviction or a Redis data loss comes back with another epoch,
  and a replay is complete only for a ``since_seq`` of the current epoch.
* **Subscriptions** follow local subscribers: a node subscribes to a channel when its first local
  subscriber joins and unsubscribes when the last leaves. After a reconnect every channel is
  resubscribed in one command and what was missed is read back from the streams; what the
  streams no longer hold is reported through the gap callback (clients are told, never silent).
* **Health check**: the node publishes a probe to itself every ``health_interval``; a subscription
  connection that stops delivering it is torn down and rebuilt.
* **Presence** lives in one hash per channel, each entry owned by a node. Nodes heartbeat in a
  sorted set; entries of a node that stopped heartbeating are removed by the survivors, who
  publish the matching leave diffs.
* Commands are queued and sent in order, many per round trip (one pipeline per loop turn).
* **Redis Cluster** is detected at start (``INFO cluster``). Every key and the pub/sub channel of
  one Tidings channel share a hash tag, so they live on one slot: the publish script stays atomic
  and uses ``SPUBLISH``; the node keeps one subscription connection per primary and subscribes
  with ``SSUBSCRIBE`` there. A shard connection that fails, a slot that moves (Redis answers
  ``sunsubscribe``) or a channel whose slot no known primary serves rebuilds every subscription
  connection from a fresh slot map and fills the gaps from the streams.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
    RedisClusterException,
    RedisError,
    TimeoutError as RedisTimeoutError,
)

from ..history import HistoryRecord, ReplayResult
from .base import DUPLICATE, FAILED, Broker, ChangeBus, Envelope, PublishDone

__all__ = ["RedisBroker"]

log = logging.getLogger("tidings.broker.redis")

#: Seconds a channel's counter and epoch outlive its last publish or join: a rejoin after that
#: is told recovered: false (its numbering is gone), and an idle channel leaves nothing behind.
SEQ_TTL = 7 * 24 * 3600

# KEYS: seq, stream, id-marker, epoch, scoped id-marker.
# ARGV: 1 msg_id, 2 event, 3 payload, 4 is_binary, 5 now_us, 6 maxlen, 7 ttl, 8 channel,
# 9 envelope-json, 10 now_ms, 11 origin node, 12 excluded channel id, 13 PUBLISH or SPUBLISH,
# 14 sender, 15 scoped-id tag, 16 counter ttl.
# Returns {seq, 1 when published under the scoped id <msg_id>~<tag>}, or 0 for a re-send.
# An id marker holds the sender that used the id: only that sender's re-send is a duplicate.
PUBLISH_LUA = """
local id, scoped = ARGV[1], 0
if id ~= '' then
  local holder = redis.call('GET', KEYS[3])
  if not holder then
    redis.call('SET', KEYS[3], ARGV[14], 'EX', ARGV[7])
  elseif holder == ARGV[14] then
    return 0
  else
    if not redis.call('SET', KEYS[5], ARGV[14], 'NX', 'EX', ARGV[7]) then return 0 end
    id, scoped = id .. '~' .. ARGV[15], 1
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  -- A new numbering (first message, or the counter was lost): a new epoch.
  redis.call('SET', KEYS[1], ARGV[5])
  redis.call('SET', KEYS[4], ARGV[5] .. '-' .. ARGV[11])
elseif redis.call('EXISTS', KEYS[4]) == 0 then
  -- The epoch alone was lost: a new one, based on the current number.
  redis.call('SET', KEYS[4], redis.call('GET', KEYS[1]) .. '-' .. ARGV[11])
end
local seq = redis.call('INCR', KEYS[1])
-- Lua 5.1 prints large numbers in exponent form: format the integer explicitly.
local s = string.format('%.0f', seq)
redis.call('EXPIRE', KEYS[1], ARGV[16])
redis.call('EXPIRE', KEYS[4], ARGV[16])
if tonumber(ARGV[6]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], s .. '-0',
             'i', id, 'e', ARGV[2], 'p', ARGV[3], 'b', ARGV[4], 't', ARGV[10],
             'o', ARGV[11], 'x', ARGV[12])
  redis.call('EXPIRE', KEYS[2], ARGV[7])
end
local head = s
if scoped == 1 then head = s .. '~' .. ARGV[15] end
redis.call(ARGV[13], ARGV[8], head .. '|' .. ARGV[9])
return {seq, scoped}
"""

# KEYS: seq, epoch. ARGV: now_us, node id, counter ttl. Returns {seq, epoch}: a join's baseline,
# starting the channel's numbering when it has none, and keeping it alive while joins come.
POSITION_LUA = """
local seq = redis.call('GET', KEYS[1])
if not seq then
  seq = ARGV[1]
  redis.call('SET', KEYS[1], seq, 'EX', ARGV[3])
  redis.call('SET', KEYS[2], seq .. '-' .. ARGV[2], 'EX', ARGV[3])
else
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  if redis.call('EXPIRE', KEYS[2], ARGV[3]) == 0 then
    redis.call('SET', KEYS[2], seq .. '-' .. ARGV[2], 'EX', ARGV[3])
  end
end
return {seq, redis.call('GET', KEYS[2])}
"""

# KEYS: lease. ARGV: node id, ttl ms. 1 when this node holds the lease afterwards.
LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

RESIGN_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

# The change log of Postgres Changes (ChangeBus.log_*): a stream per table and one meta hash, all
# under the hash tag of the change feed's channel ({cdc}), so on a Redis Cluster they live on its
# shard and a change is logged there before it is published (one connection, in order).
# Meta fields: epoch, after (coverage starts after it), head (newest position logged), logged (the
# newest transaction end fully logged, 16 hex digits), and per table last:/trim:/bytes:<table>.
# Positions are fixed-width hex strings: Lua compares them as strings.

# KEYS: meta. ARGV: 1 start (16 hex), 2 after position, 3 new epoch, 4 stream key prefix.
# Continues when the stream starts at or before what was logged; else starts a new epoch.
LOG_BEGIN_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local logged = redis.call('HGET', KEYS[1], 'logged')
if epoch and logged and ARGV[1] <= logged then return epoch end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 5) == 'last:' then redis.call('DEL', ARGV[4] .. string.sub(f, 6)) end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'after', ARGV[2], 'logged', ARGV[1], 'head', '')
return ARGV[3]
"""

# KEYS: meta, the table's stream. ARGV: 1 table, 2 position, 3 stream id, 4 change JSON, 5 size,
# 6 now ms, 7 max count, 8 max bytes, 9 ttl ms, 10 epoch if the log was lost, 11 the position
# just before this one. Returns 1 when logged, 0 for a position already logged.
LOG_CHANGE_LUA = """
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then
  -- The meta was lost (eviction, a flush): a new epoch, covering from this change on.
  redis.call('HSET', KEYS[1], 'epoch', ARGV[10], 'after', ARGV[11], 'logged', '', 'head', '')
end
local head = redis.call('HGET', KEYS[1], 'head') or ''
if ARGV[2] <= head then return 0 end
redis.call('XADD', KEYS[2], ARGV[3], 'p', ARGV[2], 't', ARGV[6], 's', ARGV[5], 'c', ARGV[4])
redis.call('HSET', KEYS[1], 'head', ARGV[2], 'last:' .. ARGV[1], ARGV[2])
local bytes = redis.call('HINCRBY', KEYS[1], 'bytes:' .. ARGV[1], ARGV[5])
local n = redis.call('XLEN', KEYS[2])
local cutoff = tonumber(ARGV[6]) - tonumber(ARGV[9])
local trimmed = false
while n > 0 do
  local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  local f = oldest[2]
  if not (n > tonumber(ARGV[7]) or (bytes > tonumber(ARGV[8]) and n > 1) or tonumber(f[4]) < cutoff) then
    break
  end
  redis.call('XDEL', KEYS[2], oldest[1])
  bytes = bytes - tonumber(f[6])
  n = n - 1
  trimmed = f[2]
end
if trimmed then
  redis.call('HSET', KEYS[1], 'trim:' .. ARGV[1], trimmed, 'bytes:' .. ARGV[1], bytes)
end
return 1
"""

# KEYS: meta. ARGV: 1 transaction end (16 hex). Every change before it was logged.
LOG_THROUGH_LUA = """
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then return 0 end
local logged = redis.call('HGET', KEYS[1], 'logged') or ''
if ARGV[1] > logged then redis.call('HSET', KEYS[1], 'logged', ARGV[1]) end
return 1
"""


def _epoch_base(epoch: str) -> int | None:
    """The number an epoch's numbering started after (``"<base>-<node>"``)."""
    try:
        return int(epoch.split("-", 1)[0])
    except ValueError:
        return None


def _encode_payload(payload: Any) -> tuple[bytes, str]:
    if isinstance(payload, bytes | bytearray):
        return base64.b64encode(payload), "1"
    return orjson.dumps(payload), "0"


def _decode_payload(raw: bytes, binary: bool) -> Any:
    return base64.b64decode(raw) if binary else orjson.loads(raw)


def _hash_tag(key: str) -> str:
    """``{tag}`` for a channel key: every name of one channel hashes to one cluster slot.

    Redis hashes what lies between the first ``{`` and the next ``}``; a key holding braces (or
    an empty one) is replaced by a digest, and the full key follows the tag to keep names unique.
    """
    if key and "{" not in key and "}" not in key:
        return "{" + key + "}"
    return "{" + hashlib.sha1(key.encode()).hexdigest()[:16] + "}:" + key


class _Shard:
    """One subscription connection: the whole Redis, or one primary of a cluster."""

    __slots__ = ("name", "client", "pubsub", "control", "probe_seen")

    def __init__(self, name: str, client: Any, control: str) -> None:
        self.name = name
        self.client = client
        self.pubsub: Any = client.pubsub()
        self.control = control
        self.probe_seen = time.monotonic()

    async def close(self) -> None:
        try:
            await self.pubsub.aclose()
        except (RedisError, OSError):
            pass
        await self.client.aclose()


class RedisBroker(Broker):
    """Broker for ``--redis-url``; also the cluster's :class:`~tidings.broker.base.ChangeBus`.

    Args:
        url: ``redis://host:port/db``.
        history_size: messages kept per channel stream.
        history_ttl: seconds a channel's history lives after its last message.
        prefix: key and channel prefix, so several clusters can share one Redis (no braces).
        node_timeout: seconds without a heartbeat after which a node's presence is removed.
        health_interval: seconds between subscription health probes.
    """

    synchronous = False

    def __init__(
        self,
        url: str,
        history_size: int = 100,
        history_ttl: float = 300.0,
        prefix: str = "tidings",
        node_timeout: float = 10.0,
        health_interval: float = 2.0,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"redis prefix must not contain braces: {prefix!r}")
        self.url = url
        self.node_id = uuid.uuid4().hex[:12]
        self.history_size = history_size
        self.history_ttl = max(1, int(history_ttl))
        self.prefix = prefix
        self.node_timeout = node_timeout
        self.health_interval = health_interval
        # Pooled connections die with a Redis restart: retry commands on a fresh connection.
        self.redis: Any = aioredis.from_url(
            url,
            socket_connect_timeout=3,
            socket_keepalive=True,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self.cluster = False  # set by start() when Redis runs as a cluster
        self._publish_cmd = "PUBLISH"
        self._shards: list[_Shard] = []
        self._rebuild = asyncio.Event()
        self._keys_by_channel: dict[bytes, str] = {}
        self._unsubscribing: set[bytes] = set()
        self._ops: deque[tuple[Callable[[Any], Any], Callable[[Any], None] | None]] = deque()
        self._wake = asyncio.Event()
        self._subscribed: dict[str, asyncio.Future[None]] = {}
        self._last_seq: dict[str, int] = {}
        # A channel's sequence number when this node subscribed: where gap filling starts if no
        # message arrived before a reconnect. Kept apart from _last_seq, which also de-duplicates.
        self._baseline: dict[str, int] = {}
        self._replays: dict[tuple[str, int, int, str | None], asyncio.Future[ReplayResult]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self.connected = asyncio.Event()
        self.reconnects = 0
        #: Messages published under a scoped id because another sender held their id.
        self.scoped_ids = 0
        # Keys the scoped-id tags; shared by the nodes through Redis (set at start).
        self._salt = os.urandom(16)

    # -- names -------------------------------------------------------------------------------

    def _name(self, kind: str, key: str) -> str:
        """The Redis name of one of a channel's keys (``seq``, ``hist``, ``id``, ``presence``, ``ch``)."""
        return f"{self.prefix}:{kind}:{_hash_tag(key)}"

    def _channel(self, key: str) -> str:
        return self._name("ch", key)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Check Redis answers, then start the writer, reader and heartbeat tasks."""
        try:
            await self.redis.ping()
            self.cluster = (await self.redis.info("cluster")).get("cluster_enabled") == 1
            if self.cluster:
                await self.redis.aclose()
                self.redis = RedisCluster.from_url(
                    self.url,
                    socket_connect_timeout=3,
                    socket_keepalive=True,
                    retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
                )
                await self.redis.initialize()
                self._publish_cmd = "SPUBLISH"
                log.info("redis at %s runs as a cluster: sharded pub/sub", self.url)
            # One salt for every node: a re-send through another node gets the same scoped id.
            salt_key = f"{self.prefix}:salt"
            await self.redis.set(salt_key, self._salt.hex(), nx=True)
            self._salt = (await self.redis.get(salt_key)) or self._salt
        except (RedisError, RedisClusterException, OSError) as exc:
            raise RuntimeError(f"cannot reach Redis at {self.url}: {exc}") from None
        self._running = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._writer(), name="redis-writer"),
            loop.create_task(self._reader(), name="redis-reader"),
            loop.create_task(self._heartbeat(), name="redis-heartbeat"),
        ]
        await asyncio.wait_for(self.connected.wait(), 10)

    async def stop(self) -> None:
        """Remove this node's presence, stop the tasks and close the connections."""
        self._running = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            # Bounded: a Redis that is down must not hold up a shutdown (its entries expire anyway).
            async with asyncio.timeout(5):
                await self._reap_node(self.node_id)
                await self.redis.zrem(f"{self.prefix}:nodes", self.node_id)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            log.warning("could not remove this node's presence from Redis (%s)", exc)
        await self._close_shards()
        await self.redis.aclose()

    @property
    def change_bus(self) -> ChangeBus:
        """This broker: Postgres Changes travel between nodes through the same Redis."""
        return self

    def pending(self) -> int:
        """Commands queued for the next pipeline round trip."""
        return len(self._ops)

    # -- command queue -----------------------------------------------------------------------

    def _enqueue(self, op: Callable[[Any], Any], done: Callable[[Any], None] | None = None) -> None:
        self._ops.append((op, done))
        self._wake.set()

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops:
                batch = list(self._ops)
                self._ops.clear()
                try:
                    await self._send_batch(batch)
                except Exception as exc:
                    log.exception("redis writer failed on a batch of %d commands", len(batch))
                    for _, done in batch:  # nobody waits forever on a reply
                        if done is not None:
                            try:
                                done(exc)
                            except Exception:
                                log.exception("redis callback failed")

    def _query(self, op: Callable[[Any], Any]) -> asyncio.Future[Any]:
        """Queue a read with the other commands; its future gets the reply of the last command queued.

        Reads share the writer's pipeline: thousands of rejoining clients' replays cost a few
        round trips on one connection, not one pooled connection each.
        """
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(result: Any) -> None:
            if fut.done():
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        self._enqueue(op, done)
        return fut

    async def _send_batch(
        self, batch: list[tuple[Callable[[Any], Any], Callable[[Any], None] | None]]
    ) -> None:
        for attempt in (1, 2):
            try:
                pipe = self.redis.pipeline(transaction=False)
                ends = []  # an op may queue several commands; its result is its last one's
                for op, _ in batch:
                    op(pipe)
                    ends.append(len(pipe) - 1)
                results = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                if attempt == 1:
                    # Retrying is safe: publishes are de-duplicated by message id.
                    log.warning("redis command batch failed (%s); retrying once", exc)
                    await asyncio.sleep(0.2)
                    continue
                log.error("redis command batch failed twice (%s); %d commands lost", exc, len(batch))
                for _, done in batch:
                    if done is not None:
                        done(exc)
                return
            for (_, done), end in zip(batch, ends, strict=True):
                if done is not None:
                    try:
                        done(results[end])
                    except Exception:
                        log.exception("publish callback failed")
            return

    # -- publish -----------------------------------------------------------------------------

    def sender_tag(self, sender: str) -> str:
        """The tag of ``sender``'s scoped ids: a keyed hash, so no other client can compute it."""
        return hashlib.blake2b(sender.encode(), key=self._salt[:64], digest_size=6).hexdigest()

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
        """Queue the publish script; ``done(seq | DUPLICATE | FAILED)`` when Redis answered."""
        raw, binary = _encode_payload(payload)
        envelope = orjson.dumps(
            {
                "k": "b",
                "o": self.node_id,
                "x": exclude,
                "t": topic,
                "e": event,
                "i": msg_id,
                "p": raw.decode(),
                "b": binary,
            }
        )
        now = time.time()
        seq_key = self._name("seq", key)
        tag = self.sender_tag(sender)
        marker = f"{self._name('id', key)}:{msg_id}"
        keys = [seq_key, self._name("hist", key), marker, seq_key + ":start", f"{marker}~{tag}"]
        args = [
            msg_id,
            event,
            raw,
            binary,
            int(now * 1_000_000),
            self.history_size,
            self.history_ttl,
            self._channel(key),
            envelope,
            int(now * 1000),
            self.node_id,
            "" if exclude is None else exclude,
            self._publish_cmd,
            sender,
            tag,
            SEQ_TTL,
        ]

        def op(pipe: Any) -> None:
            # EVAL (not EVALSHA): nothing to reload after a Redis restart empties the script cache.
            pipe.eval(PUBLISH_LUA, len(keys), *keys, *args)

        def finished(result: Any) -> None:
            if done is None:
                return
            if isinstance(result, Exception):
                log.warning("publish to %s failed: %s", key, result)
                done(FAILED)
            elif isinstance(result, list):
                if result[1]:
                    self.scoped_ids += 1
                done(int(result[0]))
            else:
                done(DUPLICATE)

        self._enqueue(op, finished)

    def _presence_envelope(self, topic: str, diff: dict[str, Any]) -> bytes:
        return b"0|" + orjson.dumps({"k": "p", "o": self.node_id, "t": topic, "d": diff})

    def _pipe_publish(self, pipe: Any, channel: str, message: bytes) -> None:
        if self.cluster:
            pipe.spublish(channel, message)
        else:
            pipe.publish(channel, message)

    def publish_presence(self, key: str, topic: str, diff: dict[str, Any]) -> None:
        envelope = self._presence_envelope(topic, diff)
        channel = self._channel(key)
        self._enqueue(lambda pipe: self._pipe_publish(pipe, channel, envelope))

    def publish_change(self, key: str, change: dict[str, Any], done: Callable[[Any], None]) -> None:
        """Send a Postgres change to every node subscribed to ``key``; ``done(result)`` after."""
        envelope = b"0|" + orjson.dumps({"k": "c", "o": self.node_id, "c": change})
        channel = self._channel(key)
        self._enqueue(lambda pipe: self._pipe_publish(pipe, channel, envelope), done)

    def after_queued(self, done: Callable[[Any], None]) -> None:
        """Call ``done(result)`` once every command queued before it was answered (in order)."""
        # A keyed command: a cluster pipeline refuses keyless ones such as ECHO.
        marker = f"{self.prefix}:nodes"
        self._enqueue(lambda pipe: pipe.exists(marker), done)

    # -- the change log (ChangeBus) ----------------------------------------------------------

    def _log_key(self, name: str) -> str:
        """A key of the change log: ``meta``, or ``t:<table>`` (the hash tag of the change feed)."""
        return f"{self.prefix}:cdclog:{_hash_tag('cdc')}:{name}"

    def log_begin(self, start: str, after: str, epoch: str) -> None:
        """A stream starts at ``start`` (16 hex digits): the log continues, or starts over (queued)."""
        meta, prefix = self._log_key("meta"), self._log_key("t:")
        self._enqueue(lambda pipe: pipe.eval(LOG_BEGIN_LUA, 1, meta, start, after, epoch, prefix))

    def log_change(
        self,
        table: str,
        position: str,
        entry: bytes,
        limits: tuple[int, int, float],
        epoch: str,
        before: str,
    ) -> None:
        """Append a change (its JSON ``entry``) to ``table``'s stream, trimmed to ``limits`` (count,
        bytes, ttl seconds); queued, so it lands before a publish queued after it."""
        lsn, index = position.split("/")
        stream_id = f"{int(lsn, 16)}-{int(index, 16)}"
        keys = [self._log_key("meta"), self._log_key("t:" + table)]
        count, max_bytes, ttl = limits
        args = [table, position, stream_id, entry, len(entry), int(time.time() * 1000), count, max_bytes]
        args += [int(ttl * 1000), epoch, before]
        self._enqueue(lambda pipe: pipe.eval(LOG_CHANGE_LUA, 2, *keys, *args))

    def log_through(self, end: str) -> None:
        """Every change of the transaction ending at ``end`` (16 hex digits) was logged (queued)."""
        meta = self._log_key("meta")
        self._enqueue(lambda pipe: pipe.eval(LOG_THROUGH_LUA, 1, meta, end))

    async def log_state(self) -> dict[str, str]:
        """The log's meta fields (``epoch``, ``after``, ``head``, ``last:<table>``, ...), read in order
        with the queued commands."""
        meta = self._log_key("meta")
        raw = await self._query(lambda pipe: pipe.hgetall(meta))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def log_read(self, table: str, after: str, count: int) -> list[tuple[str, float, bytes]]:
        """``(position, logged at (s), change JSON)`` of ``table`` after ``after``, oldest first."""
        lsn, index = after.split("/")
        start = f"({int(lsn, 16)}-{int(index, 16)}"
        stream = self._log_key("t:" + table)
        entries = await self._query(lambda pipe: pipe.xrange(stream, min=start, max="+", count=count))
        return [(f[b"p"].decode(), int(f[b"t"]) / 1000.0, f[b"c"]) for _, f in entries]

    # -- subscriptions -----------------------------------------------------------------------

    async def subscribe(self, key: str) -> None:
        """Subscribe to ``key`` (once per node); returns when Redis confirmed the subscription."""
        fut = self._subscribed.get(key)
        if fut is None:
            fut = self._subscribed[key] = asyncio.get_running_loop().create_future()
            channel = self._channel(key)
            self._keys_by_channel[channel.encode()] = key
            if self.connected.is_set():
                shard = self._shard_of(channel)
                if shard is None:
                    self._rebuild.set()  # a primary this node has no connection to
                else:
                    try:
                        await self._subscribe_on(shard, [channel])
                    except (RedisError, OSError):
                        pass  # the reader's reconnect resubscribes every key, this one included
        if not fut.done():  # the common case on a busy node: already subscribed
            await asyncio.wait_for(asyncio.shield(fut), 10)
        if key not in self._baseline:
            self._baseline[key] = int(await self._query(lambda pipe: pipe.get(self._name("seq", key))) or 0)

    def unsubscribe(self, key: str) -> None:
        """Stop receiving ``key`` on this node."""
        fut = self._subscribed.pop(key, None)
        self._last_seq.pop(key, None)
        self._baseline.pop(key, None)
        if fut is not None and not fut.done():
            fut.cancel()
        channel = self._channel(key)
        self._keys_by_channel.pop(channel.encode(), None)
        shard = self._shard_of(channel) if self.connected.is_set() else None
        if shard is not None:
            pubsub = shard.pubsub
            if self.cluster:
                self._unsubscribing.add(channel.encode())

            async def unsubscribe() -> None:
                try:
                    if self.cluster:
                        await pubsub.sunsubscribe(channel)
                    else:
                        await pubsub.unsubscribe(channel)
                except (RedisError, OSError):
                    pass

            asyncio.get_running_loop().create_task(unsubscribe())

    def _shard_of(self, channel: str) -> _Shard | None:
        """The subscription connection serving ``channel`` (by the current slot map)."""
        if not self.cluster:
            return self._shards[0] if self._shards else None
        try:
            name = self.redis.get_node_from_key(channel).name
        except RedisError:
            return None
        return next((s for s in self._shards if s.name == name), None)

    async def _subscribe_on(self, shard: _Shard, channels: list[str]) -> None:
        if not self.cluster:
            await shard.pubsub.subscribe(*channels)
            return
        # SSUBSCRIBE takes the channels of one slot per command.
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(self.redis.keyslot(channel), []).append(channel)
        for group in by_slot.values():
            await shard.pubsub.ssubscribe(*group)

    async def _open_shards(self) -> list[_Shard]:
        """One subscription connection per primary (or for the whole Redis), each with a probe channel."""
        # Subscription connections fail loudly: a silent automatic resubscribe would hide the
        # window in which messages were missed.
        options = {"socket_connect_timeout": 3, "socket_keepalive": True, "retry": Retry(NoBackoff(), 0)}
        if not self.cluster:
            client = aioredis.from_url(self.url, **options)
            return [_Shard(self.url, client, f"{self.prefix}:ctl:{self.node_id}")]
        await self.redis.nodes_manager.initialize()  # the slot map may have changed since the last build
        base = parse_url(self.url)
        shards = []
        for node in self.redis.get_primaries():
            client = aioredis.Redis(**{**base, **options, "host": node.host, "port": node.port})
            shards.append(_Shard(node.name, client, self._control_for(node.name)))
        return shards

    def _control_for(self, node_name: str) -> str:
        """A probe channel of this node that hashes to a slot served by primary ``node_name``."""
        for i in range(100_000):
            channel = f"{self.prefix}:ctl:{self.node_id}:{{{i}}}"
            if self.redis.get_node_from_key(channel).name == node_name:
                return channel
        raise RuntimeError(f"no slot of redis primary {node_name} found")

    async def _close_shards(self) -> None:
        shards, self._shards = self._shards, []
        for shard in shards:
            await shard.close()

    async def _reader(self) -> None:
        delay = 0.1
        first = True
        while self._running:
            try:
                await self._consume(first)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                self.connected.clear()
                log.warning("redis subscription lost (%s); reconnecting in %.1f s", exc, delay)
            except Exception:
                self.connected.clear()
                log.exception("redis subscription reader failed; reconnecting in %.1f s", delay)
            first = False
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _consume(self, first: bool) -> None:
        """(Re)build every subscription connection, then read them until one fails."""
        await self._close_shards()
        self._rebuild.clear()
        self._unsubscribing.clear()
        self._shards = await self._open_shards()
        loop = asyncio.get_running_loop()
        for key, fut in self._subscribed.items():
            # Connected again only once Redis confirmed every channel anew: the gap fills must
            # read the streams after the live subscriptions are in place, on every shard.
            if fut.done():
                self._subscribed[key] = loop.create_future()
        by_shard: dict[str, list[str]] = {s.name: [] for s in self._shards}
        for key in self._subscribed:
            channel = self._channel(key)
            shard = self._shard_of(channel)
            if shard is None:
                raise RedisConnectionError(f"no redis primary serves the slot of {channel}")
            by_shard[shard.name].append(channel)
        for shard in self._shards:
            shard.probe_seen = time.monotonic()
            # One round trip per shard resubscribes everything: the reconnect storm stays cheap.
            if self.cluster:
                await shard.pubsub.ssubscribe(shard.control)
                await self._subscribe_on(shard, by_shard[shard.name])
            else:
                await shard.pubsub.subscribe(shard.control, *by_shard[shard.name])
        readers = [asyncio.ensure_future(self._read(shard, first)) for shard in self._shards]
        rebuild = asyncio.ensure_future(self._rebuild.wait())
        try:
            done, _ = await asyncio.wait([*readers, rebuild], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*readers, rebuild):
                task.cancel()
            await asyncio.gather(*readers, rebuild, return_exceptions=True)
        for task in done:
            if task is not rebuild:
                task.result()  # raises what ended this reader
        raise RedisConnectionError("redis cluster topology changed")

    async def _read(self, shard: _Shard, first: bool) -> None:
        pubsub, control = shard.pubsub, shard.control.encode()
        while True:
            msg = await pubsub.get_message(timeout=1.0)
            if msg is None:
                if not self.connected.is_set() and self._confirmed_all():
                    await self._recovered(first)
                if time.monotonic() - shard.probe_seen > 3 * self.health_interval + 1:
                    raise TimeoutError(f"subscription to {shard.name} stopped delivering health probes")
                continue
            kind = msg["type"]
            if kind == "message" or kind == "smessage":
                channel = msg["channel"]
                if channel == control:
                    shard.probe_seen = time.monotonic()
                else:
                    self._on_message(channel, msg["data"])
            elif kind == "subscribe" or kind == "ssubscribe":
                key = self._keys_by_channel.get(msg["channel"])
                fut = self._subscribed.get(key) if key is not None else None
                if fut is not None and not fut.done():
                    fut.set_result(None)
                if not self.connected.is_set() and self._confirmed_all():
                    await self._recovered(first)
            elif kind == "sunsubscribe":
                channel = msg["channel"]
                if channel in self._unsubscribing:
                    self._unsubscribing.discard(channel)
                elif channel in self._keys_by_channel or channel == control:
                    # Not asked for: the slot moved to another primary.
                    raise RedisConnectionError(f"redis moved the slot of {channel.decode()}")

    def _confirmed_all(self) -> bool:
        return all(f.done() for f in self._subscribed.values())

    async def _recovered(self, first: bool) -> None:
        self.connected.set()
        if not first:
            log.info(
                "redis subscription restored (%d channels); filling gaps from history", len(self._subscribed)
            )
            for key in self._subscribed:
                if key not in self._last_seq and key in self._baseline:
                    self._last_seq[key] = self._baseline[key]
            await self._fill_gaps(list(self._subscribed))

    def _on_message(self, channel: bytes, data: bytes) -> None:
        key = self._keys_by_channel.get(channel)
        if key is None or key not in self._subscribed:
            return
        head, _, body = data.partition(b"|")
        env = orjson.loads(body)
        if env["k"] == "c":
            self._deliver(Envelope(Envelope.CHANGE, key, "", "", env["c"], origin=env["o"]))
            return
        if env["k"] == "p":
            self._deliver(
                Envelope(Envelope.PRESENCE, key, env["t"], "presence_diff", env["d"], origin=env["o"])
            )
            return
        head, scoped, tag = head.partition(b"~")
        seq = int(head)
        last = self._last_seq.get(key)
        if last is not None and seq <= last:
            return  # already delivered (a gap fill got there first)
        if last is not None and seq > last + 1:
            asyncio.get_running_loop().create_task(self._fill_gap(key, since=last, until=seq))
        self._last_seq[key] = seq if last is None or seq > last else last
        payload = _decode_payload(env["p"].encode(), env["b"] == "1")
        msg_id = env["i"] + "~" + tag.decode() if scoped else env["i"]
        self._deliver(
            Envelope(Envelope.BROADCAST, key, env["t"], env["e"], payload, msg_id, seq, env["o"], env["x"])
        )

    async def _fill_gap(self, key: str, since: int, until: int) -> None:
        """Deliver from the stream the messages between ``since`` and ``until`` (both excluded).

        A live message skipped ahead: this fill owns the range between; any of it that the
        stream no longer holds is reported as a gap.
        """
        try:
            entries = await self._query(
                lambda pipe: pipe.xrange(self._name("hist", key), min=f"{since + 1}-0", max=f"{until - 1}-0")
            )
        except (RedisError, OSError) as exc:
            log.warning("cannot read history of %s (%s)", key, exc)
            self._gap(key)
            return
        self._apply_history(key, entries, since, until - 1)

    async def _fill_gaps(self, keys: list[str], chunk: int = 500) -> None:
        """After a reconnect: deliver what each channel missed, reading many streams per round trip."""
        for i in range(0, len(keys), chunk):
            since = {k: self._last_seq[k] for k in keys[i : i + chunk] if k in self._last_seq}
            try:
                pipe = self.redis.pipeline(transaction=False)
                for key, last in since.items():
                    pipe.get(self._name("seq", key))  # the counter first: see replay()
                    pipe.xrange(self._name("hist", key), min=f"{last + 1}-0", max="+")
                results = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                log.warning("cannot read history of %d channels (%s)", len(since), exc)
                results = [exc] * (2 * len(since))
            for (key, last), current, entries in zip(since.items(), results[::2], results[1::2], strict=True):
                if key not in self._subscribed:
                    continue
                if isinstance(entries, Exception) or isinstance(current, Exception):
                    self._gap(key)
                    continue
                # Live messages that arrived meanwhile (on another shard's reader) were delivered
                # already, or are being filled by their own gap fill: start after them.
                start = max(last, self._last_seq.get(key, last))
                self._apply_history(key, entries, start, int(current or 0))

    def _apply_history(self, key: str, entries: list[Any], last: int, top: int) -> None:
        """Deliver the stream entries that follow ``last`` without a hole; report a gap below ``top``."""
        expected = last + 1
        topic = "realtime:" + key[2:]
        for entry_id, fields in entries:
            seq = int(entry_id.split(b"-")[0])
            if seq < expected:
                continue
            if seq != expected:
                break
            rec = self._record((entry_id, fields))
            # Origin and excluded channel travel with the record: a sender without `self` must
            # not get its own message back from a gap fill either.
            origin = fields.get(b"o", b"").decode() or None
            exclude = int(fields[b"x"]) if fields.get(b"x") else None
            self._deliver(
                Envelope(Envelope.BROADCAST, key, topic, rec.event, rec.payload, rec.id, seq, origin, exclude)
            )
            expected = seq + 1
        if expected <= top:
            self._gap(key)
        if self._last_seq.get(key, 0) < expected - 1:
            self._last_seq[key] = expected - 1

    # -- history -----------------------------------------------------------------------------

    async def replay(
        self,
        key: str,
        since_seq: int | None,
        since_time: float | None,
        limit: int,
        epoch: str | None = None,
    ) -> ReplayResult:
        """Read a channel's stream: after ``since_seq``, or the newest ``limit`` since a time.

        Identical sequence replays share one read while it is still queued: after a node dies,
        the clients of a channel rejoin asking from the same last ``seq``. A read already sent is
        never shared: a joiner's live buffer must start before its replay's read, or a message
        published in between would be in neither.
        """
        if since_seq is None:
            return await self._replay(key, None, since_time, limit)
        flight = (key, since_seq, limit, epoch)
        task = self._replays.get(flight)
        if task is None:

            def sent() -> None:
                if self._replays.get(flight) is task:
                    del self._replays[flight]

            task = asyncio.ensure_future(self._replay(key, since_seq, None, limit, sent, epoch))
            self._replays[flight] = task
            task.add_done_callback(lambda _: sent())
        return await asyncio.shield(task)

    async def _replay(
        self,
        key: str,
        since_seq: int | None,
        since_time: float | None,
        limit: int,
        sent: Callable[[], None] | None = None,
        epoch: str | None = None,
    ) -> ReplayResult:
        stream = self._name("hist", key)
        cutoff_ms = (time.time() - self.history_ttl) * 1000
        seq_key = self._name("seq", key)

        # The counter before the stream: a publish landing in between adds to the records,
        # never to a number the records cannot reach (which would read as a false gap).
        def read_counter(pipe: Any) -> None:
            if sent is not None:
                sent()  # the writer is building the pipeline: too late to share this read
            pipe.get(seq_key)

        current_reply = self._query(read_counter)
        epoch_reply = self._query(lambda pipe: pipe.get(seq_key + ":start"))
        if since_seq is not None:
            # A client's number may be anything: keep the stream id valid (then it proves nothing).
            start = min(max(since_seq, 0), 2**63 - 2) + 1
            entries = await self._query(
                lambda pipe: pipe.xrange(stream, min=f"{start}-0", max="+", count=limit + 1)
            )
        else:
            entries = await self._query(
                lambda pipe: pipe.xrevrange(stream, max="+", min="-", count=limit + 1)
            )
            entries.reverse()
        current_raw, epoch_raw = await current_reply, await epoch_reply
        current_epoch = epoch_raw.decode() if epoch_raw is not None else None
        base = None if current_epoch is None else _epoch_base(current_epoch)
        records = [self._record(e) for e in entries]
        # No counter or no epoch: the numbering was lost (expiry, a Redis data loss), nothing is proven.
        known = current_raw is not None and base is not None
        current = int(current_raw or 0)
        if since_seq is not None:
            kept = [r for r in records if r.ts * 1000 >= cutoff_ms]
            first = kept[0].seq if kept else current + 1
            complete = (
                known
                and (epoch is None or epoch == current_epoch)
                and base is not None
                and base <= since_seq <= current
                and first == since_seq + 1
                and len(kept) <= limit
            )
            return ReplayResult(kept[:limit], complete, current_epoch)
        since_ms = (since_time or 0) * 1000
        newer = [r for r in records if r.ts * 1000 >= max(since_ms, cutoff_ms)]
        complete = False
        if known and base is not None and (base + 1) / 1000 <= since_ms and len(newer) <= limit:
            # Complete when the stream reaches back past `since` (or to the epoch's first
            # message) and no entry after `since` already expired.
            oldest = records[0] if records else None
            reaches = current == base or (
                oldest is not None
                and (oldest.ts * 1000 < since_ms or (oldest.seq == base + 1 and len(records) <= limit))
            )
            expired = any(since_ms <= r.ts * 1000 < cutoff_ms for r in records)
            complete = reaches and not expired
        return ReplayResult(newer[-limit:], complete, current_epoch)

    async def last_seq(self, key: str) -> int | None:
        """The channel's current sequence number in Redis."""
        raw = await self._query(lambda pipe: pipe.get(self._name("seq", key)))
        return None if raw is None else int(raw)

    async def position(self, key: str, owner: str = "") -> tuple[int, str]:
        """The channel's number and epoch, starting them (for ``SEQ_TTL``) when it has none."""
        seq_key = self._name("seq", key)
        keys = [seq_key, seq_key + ":start"]
        args = [int(time.time() * 1_000_000), self.node_id, SEQ_TTL]
        seq, epoch = await self._query(lambda pipe: pipe.eval(POSITION_LUA, len(keys), *keys, *args))
        return int(seq), epoch.decode()

    @staticmethod
    def _record(entry: tuple[bytes, dict[bytes, bytes]]) -> HistoryRecord:
        entry_id, f = entry
        return HistoryRecord(
            seq=int(entry_id.split(b"-")[0]),
            id=f[b"i"].decode(),
            ts=int(f[b"t"]) / 1000.0,
            event=f[b"e"].decode(),
            payload=_decode_payload(f[b"p"], f[b"b"] == b"1"),
        )

    # -- presence ----------------------------------------------------------------------------

    def track(self, key: str, owner: int, presence_key: str, meta: dict[str, Any]) -> None:
        field = f"{self.node_id}:{owner}"
        value = orjson.dumps([presence_key, meta])
        pkey, nkey = self._name("presence", key), f"{self.prefix}:node-keys:{self.node_id}"

        def op(pipe: Any) -> None:
            pipe.hset(pkey, field, value)
            pipe.sadd(nkey, key)

        self._enqueue(op)

    def untrack(self, key: str, owner: int) -> None:
        field, pkey = f"{self.node_id}:{owner}", self._name("presence", key)
        self._enqueue(lambda pipe: pipe.hdel(pkey, field))

    async def presence_state(self, key: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """Merge every live node's entries for ``key``."""
        pkey, nodes = self._name("presence", key), f"{self.prefix}:nodes"
        since = time.time() - self.node_timeout
        entries_reply = self._query(lambda pipe: pipe.hgetall(pkey))
        alive = {n.decode() for n in await self._query(lambda pipe: pipe.zrangebyscore(nodes, since, "+inf"))}
        entries = await entries_reply
        state: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for field, value in entries.items():
            node = field.decode().split(":", 1)[0]
            if node not in alive and node != self.node_id:
                continue
            presence_key, meta = orjson.loads(value)
            state.setdefault(presence_key, {"metas": []})["metas"].append(meta)
        return state

    async def _heartbeat(self) -> None:
        nodes = f"{self.prefix}:nodes"
        while True:
            try:
                now = time.time()
                await self.redis.zadd(nodes, {self.node_id: now})
                for shard in list(self._shards):
                    await self._publish_now(shard.control, b"probe")
                dead = await self.redis.zrangebyscore(nodes, "-inf", now - self.node_timeout)
                for node in dead:
                    await self._reap_node(node.decode())
            except (RedisError, OSError) as exc:
                log.debug("redis heartbeat failed: %s", exc)
            await asyncio.sleep(self.health_interval)

    async def _publish_now(self, channel: str, message: bytes) -> None:
        if self.cluster:
            await self.redis.spublish(channel, message)
        else:
            await self.redis.publish(channel, message)

    async def _reap_node(self, node: str) -> None:
        """Remove a (dead or stopping) node's presence entries and publish their leaves."""
        if node != self.node_id:
            got = await self.redis.set(f"{self.prefix}:reap:{node}", self.node_id, nx=True, ex=30)
            if not got:
                return
            log.warning("node %s stopped heartbeating; removing its presence", node)
        nkey = f"{self.prefix}:node-keys:{node}"
        for raw_key in await self.redis.smembers(nkey):
            key = raw_key.decode()
            pkey = self._name("presence", key)
            entries = await self.redis.hgetall(pkey)
            leaves: dict[str, dict[str, list[dict[str, Any]]]] = {}
            for field, value in entries.items():
                if field.decode().split(":", 1)[0] != node:
                    continue
                if await self.redis.hdel(pkey, field):
                    presence_key, meta = orjson.loads(value)
                    leaves.setdefault(presence_key, {"metas": []})["metas"].append(meta)
            if leaves and node != self.node_id:
                envelope = self._presence_envelope("realtime:" + key[2:], {"joins": {}, "leaves": leaves})
                await self._publish_now(self._channel(key), envelope)
        await self.redis.delete(nkey)
        await self.redis.zrem(f"{self.prefix}:nodes", node)

    # -- leases (ChangeBus) ------------------------------------------------------------------

    def _lease_key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    async def lease(self, name: str, ttl: float) -> bool:
        """Take or renew the lease ``name`` (a key holding the node id, expiring after ``ttl``)."""
        held = await self.redis.eval(LEASE_LUA, 1, self._lease_key(name), self.node_id, int(ttl * 1000))
        return bool(held)

    async def resign(self, name: str) -> None:
        """Delete the lease ``name`` if this node holds it."""
        await self.redis.eval(RESIGN_LUA, 1, self._lease_key(name), self.node_id)

    # -- for tests ---------------------------------------------------------------------------

    async def call(self, fn: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
        """Run ``fn(redis)`` (tests reach Redis directly through it)."""
        return await fn(self.redis)
