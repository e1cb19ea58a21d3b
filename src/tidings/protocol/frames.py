"""Server-side WebSocket frame encoding for pre-encoded fan-out.

Parsing and the handshake are done by the ``websockets`` sans-I/O protocol. This module only
builds complete, unmasked server frames so a broadcast is turned into ``bytes`` once and the same
object is written to every subscriber (see ``docs/architecture.md``).
"""

from __future__ import annotations

import struct

__all__ = ["OP_BINARY", "OP_CLOSE", "OP_TEXT", "close_frame", "encode_frame"]

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8

_PACK_H = struct.Struct("!BBH").pack
_PACK_Q = struct.Struct("!BBQ").pack


def encode_frame(opcode: int, data: bytes) -> bytes:
    """Return one final, unmasked WebSocket frame carrying ``data``."""
    n = len(data)
    first = 0x80 | opcode
    if n < 126:
        return bytes((first, n)) + data
    if n < 65536:
        return _PACK_H(first, 126, n) + data
    return _PACK_Q(first, 127, n) + data


def close_frame(code: int, reason: str = "") -> bytes:
    """Return a close frame with ``code`` and a UTF-8 ``reason`` (truncated to fit 125 bytes)."""
    # Cut to 123 bytes without splitting a character: peers fail on a reason that is not UTF-8.
    body = struct.pack("!H", code) + reason.encode()[:123].decode(errors="ignore").encode()
    return encode_frame(OP_CLOSE, body)
