"""Decoder for the pgoutput logical replication protocol, version 1, and the stream framing.

Two layers, both pure (bytes in, dataclasses out; no asyncio, no I/O):

* Stream framing (inside CopyData of a ``START_REPLICATION`` stream): :func:`parse_copy_data` reads
  the server's XLogData (``w``) and primary keepalive (``k``) messages; :func:`standby_status_update`
  builds the client's reply (``r``) that reports the written/flushed/applied positions.
* pgoutput messages (the XLogData payload): :func:`decode` returns :class:`Begin`, :class:`Commit`,
  :class:`Origin`, :class:`Relation`, :class:`Type`, :class:`Insert`, :class:`Update`,
  :class:`Delete`, :class:`Truncate` or :class:`Message`.

Tuple data is a tuple with one entry per column: ``None`` (SQL NULL), :data:`UNCHANGED` (an
unchanged TOASTed value that was not sent), ``str`` (text format; decoded as UTF-8, the replication
session's client encoding) or :class:`Binary` (binary format, only with the ``binary`` option).

Reference: PostgreSQL docs, "Streaming Replication Protocol" and "Logical Replication Message
Formats"; ``src/backend/replication/logical/proto.c``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = [
    "PG_EPOCH",
    "UNCHANGED",
    "Begin",
    "Binary",
    "Commit",
    "DecodeError",
    "Delete",
    "Insert",
    "Message",
    "Origin",
    "PgOutputMessage",
    "PrimaryKeepalive",
    "Relation",
    "RelationColumn",
    "Truncate",
    "TupleData",
    "Type",
    "Unchanged",
    "Update",
    "XLogData",
    "decode",
    "format_lsn",
    "parse_copy_data",
    "parse_lsn",
    "pg_time",
    "pg_timestamp",
    "standby_status_update",
]

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
"""PostgreSQL timestamps on the wire count microseconds from this instant."""

_I8 = struct.Struct("!b")
_U8 = struct.Struct("!B")
_I16 = struct.Struct("!h")
_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")
_U64 = struct.Struct("!Q")
_I64 = struct.Struct("!q")
_XLOGDATA = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!QqB")
_STATUS = struct.Struct("!cQQQqB")


class DecodeError(ValueError):
    """Bytes that are not a valid message of the supported protocol."""


class Unchanged:
    """Marks an unchanged TOASTed column whose value the server did not send (``u``)."""

    _instance: Unchanged | None = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()
"""The single :class:`Unchanged` marker."""


@dataclass(frozen=True, slots=True)
class Binary:
    """A column value sent in binary format (``b``)."""

    data: bytes


TupleData = tuple[None | Unchanged | str | Binary, ...]
"""One row: per column, ``None``, :data:`UNCHANGED`, text ``str`` or :class:`Binary`."""


# --------------------------------------------------------------------------------------------
# Time and LSN helpers
# --------------------------------------------------------------------------------------------


def pg_timestamp(micros: int) -> datetime:
    """A wire timestamp (microseconds since 2000-01-01 UTC) as an aware UTC datetime."""
    return PG_EPOCH + timedelta(microseconds=micros)


def pg_time(moment: datetime) -> int:
    """An aware datetime as a wire timestamp (microseconds since 2000-01-01 UTC)."""
    delta = moment - PG_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_lsn(lsn: int) -> str:
    """``0x16B3748`` -> ``"0/16B3748"`` (PostgreSQL's pg_lsn text form)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """``"0/16B3748"`` -> ``0x16B3748``."""
    hi, sep, lo = text.partition("/")
    if not sep:
        raise ValueError(f"invalid LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


# --------------------------------------------------------------------------------------------
# Stream framing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XLogData:
    """``w``: a chunk of the replication stream (here: one pgoutput message)."""

    data_start: int
    """WAL position of the data (for a Commit message, the commit's end position)."""
    wal_end: int
    """Current end of WAL on the server."""
    send_time: int
    """Server clock at send time (microseconds since 2000-01-01)."""
    payload: bytes
    """The pgoutput message."""


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """``k``: the server's keepalive; answer at once when :attr:`reply_requested`."""

    wal_end: int
    send_time: int
    reply_requested: bool


def parse_copy_data(frame: bytes) -> XLogData | PrimaryKeepalive:
    """Parse one CopyData payload received on a replication stream."""
    if not frame:
        raise DecodeError("empty replication frame")
    kind = frame[0]
    if kind == 0x77:  # 'w'
        if len(frame) < 1 + _XLOGDATA.size:
            raise DecodeError("truncated XLogData header")
        start, end, sent = _XLOGDATA.unpack_from(frame, 1)
        return XLogData(start, end, sent, bytes(frame[1 + _XLOGDATA.size :]))
    if kind == 0x6B:  # 'k'
        if len(frame) < 1 + _KEEPALIVE.size:
            raise DecodeError("truncated primary keepalive")
        end, sent, reply = _KEEPALIVE.unpack_from(frame, 1)
        return PrimaryKeepalive(end, sent, bool(reply))
    raise DecodeError(f"unknown replication frame type {chr(kind)!r}")


def standby_status_update(
    written: int, flushed: int, applied: int, client_time: int, reply_requested: bool = False
) -> bytes:
    """Build ``r``, the standby status update: the positions the client has written, flushed
    (the slot's confirmed position advances to this one) and applied, and its clock
    (microseconds since 2000-01-01; see :func:`pg_time`)."""
    return _STATUS.pack(b"r", written, flushed, applied, client_time, 1 if reply_requested else 0)


# --------------------------------------------------------------------------------------------
# pgoutput messages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    """``B``: a transaction starts. Every change until :class:`Commit` belongs to it."""

    final_lsn: int
    """Position of the transaction's commit record (unique per transaction)."""
    commit_time: int
    """Commit timestamp, microseconds since 2000-01-01 UTC (see :func:`pg_timestamp`)."""
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """``C``: the transaction ends."""

    flags: int
    commit_lsn: int
    """Position of the commit record (equals :attr:`Begin.final_lsn`)."""
    end_lsn: int
    """End of the commit record: confirming this position acknowledges the transaction."""
    commit_time: int


@dataclass(frozen=True, slots=True)
class Origin:
    """``O``: the transaction came from another node through replication origin *name*."""

    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    """One column of a :class:`Relation` (dropped and generated columns are not sent)."""

    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """Part of the replica identity (the primary key under REPLICA IDENTITY DEFAULT)."""
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """``R``: describes a table; sent before its first change in a session and after DDL."""

    relation_id: int
    namespace: str
    """Schema name (``""`` means ``pg_catalog``)."""
    name: str
    replica_identity: str
    """``d`` default (primary key), ``n`` nothing, ``f`` full, ``i`` index."""
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True, slots=True)
class Type:
    """``Y``: names a non-built-in type used by a following Relation."""

    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """``I``: a new row."""

    relation_id: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """``U``: a changed row. :attr:`old` is the key (``K``, key columns only, others NULL) or the
    full old row (``O``, REPLICA IDENTITY FULL), or ``None`` when the key did not change."""

    relation_id: int
    old_kind: str | None
    old: TupleData | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    """``D``: a deleted row: its key (``K``) or, under REPLICA IDENTITY FULL, the old row (``O``)."""

    relation_id: int
    old_kind: str
    old: TupleData


@dataclass(frozen=True, slots=True)
class Truncate:
    """``T``: tables emptied."""

    options: int
    relation_ids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & 2)


@dataclass(frozen=True, slots=True)
class Message:
    """``M``: a ``pg_logical_emit_message()`` (only with the ``messages`` option)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage = Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message
"""Any decoded pgoutput message."""


class _Reader:
    """Sequential reads from a message; every read checks bounds and raises DecodeError."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 1  # byte 0 is the message type

    def _unpack(self, st: struct.Struct) -> int:
        if self.pos + st.size > len(self.buf):
            raise DecodeError(f"truncated {chr(self.buf[0])!r} message")
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return int(value)

    def u8(self) -> int:
        return self._unpack(_U8)

    def i16(self) -> int:
        return self._unpack(_I16)

    def u32(self) -> int:
        return self._unpack(_U32)

    def i32(self) -> int:
        return self._unpack(_I32)

    def u64(self) -> int:
        return self._unpack(_U64)

    def i64(self) -> int:
        return self._unpack(_I64)

    def byte(self) -> str:
        return chr(self.u8())

    def string(self) -> str:
        end = self.buf.find(b"\x00", self.pos)
        if end < 0:
            raise DecodeError(f"unterminated string in {chr(self.buf[0])!r} message")
        text = self.buf[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return text

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise DecodeError(f"truncated {chr(self.buf[0])!r} message")
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def tuple_data(self) -> TupleData:
        count = self.i16()
        values: list[None | Unchanged | str | Binary] = []
        for _ in range(count):
            kind = self.u8()
            if kind == 0x74:  # 't'
                values.append(self.take(self.i32()).decode("utf-8", errors="replace"))
            elif kind == 0x6E:  # 'n'
                values.append(None)
            elif kind == 0x75:  # 'u'
                values.append(UNCHANGED)
            elif kind == 0x62:  # 'b'
                values.append(Binary(self.take(self.i32())))
            else:
                raise DecodeError(f"unknown tuple column kind {chr(kind)!r}")
        return tuple(values)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise DecodeError(f"{len(self.buf) - self.pos} trailing bytes in {chr(self.buf[0])!r} message")


def _begin(r: _Reader) -> Begin:
    return Begin(r.u64(), r.i64(), r.u32())


def _commit(r: _Reader) -> Commit:
    return Commit(r.u8(), r.u64(), r.u64(), r.i64())


def _origin(r: _Reader) -> Origin:
    return Origin(r.u64(), r.string())


def _relation(r: _Reader) -> Relation:
    rel_id = r.u32()
    namespace = r.string()
    name = r.string()
    identity = r.byte()
    ncols = r.i16()
    columns = tuple(RelationColumn(r.u8(), r.string(), r.u32(), r.i32()) for _ in range(ncols))
    return Relation(rel_id, namespace, name, identity, columns)


def _type(r: _Reader) -> Type:
    return Type(r.u32(), r.string(), r.string())


def _insert(r: _Reader) -> Insert:
    rel_id = r.u32()
    marker = r.byte()
    if marker != "N":
        raise DecodeError(f"Insert: expected 'N', got {marker!r}")
    return Insert(rel_id, r.tuple_data())


def _update(r: _Reader) -> Update:
    rel_id = r.u32()
    marker = r.byte()
    old_kind: str | None = None
    old: TupleData | None = None
    if marker in ("K", "O"):
        old_kind = marker
        old = r.tuple_data()
        marker = r.byte()
    if marker != "N":
        raise DecodeError(f"Update: expected 'N', got {marker!r}")
    return Update(rel_id, old_kind, old, r.tuple_data())


def _delete(r: _Reader) -> Delete:
    rel_id = r.u32()
    marker = r.byte()
    if marker not in ("K", "O"):
        raise DecodeError(f"Delete: expected 'K' or 'O', got {marker!r}")
    return Delete(rel_id, marker, r.tuple_data())


def _truncate(r: _Reader) -> Truncate:
    count = r.u32()
    options = r.u8()
    return Truncate(options, tuple(r.u32() for _ in range(count)))


def _message(r: _Reader) -> Message:
    flags = r.u8()
    lsn = r.u64()
    prefix = r.string()
    content = r.take(r.u32())
    return Message(bool(flags & 1), lsn, prefix, content)


_DECODERS: dict[int, Callable[[_Reader], PgOutputMessage]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
}


def decode(payload: bytes) -> PgOutputMessage:
    """Decode one pgoutput (protocol version 1) message.

    Raises:
        DecodeError: empty, truncated, trailing bytes, or a message type this version lacks
            (streaming and two-phase messages of versions 2 and 3 are not supported).
    """
    if not payload:
        raise DecodeError("empty pgoutput message")
    decoder = _DECODERS.get(payload[0])
    if decoder is None:
        raise DecodeError(f"unsupported pgoutput message type {chr(payload[0])!r}")
    reader = _Reader(bytes(payload))
    message = decoder(reader)
    reader.end()
    return message
