"""A minimal replication-protocol client over a raw socket (trust auth only), for tests.

psycopg2 strips the stream framing (XLogData ``w``, keepalive ``k``) before Python sees it; this
client hands back the raw CopyData payloads so the framing parser and the standby status update
builder can be checked against a real server, and fixtures can be captured byte for byte.
"""

from __future__ import annotations

import socket
import struct

__all__ = ["RawReplication", "ReplicationProtocolError"]


class ReplicationProtocolError(RuntimeError):
    """The server answered with an ErrorResponse or something unexpected."""


class RawReplication:
    """A logical replication connection (``replication=database``) speaking protocol 3.0."""

    def __init__(self, host: str, port: int, user: str, dbname: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        params = {"user": user, "database": dbname, "replication": "database", "application_name": "rawrepl"}
        body = struct.pack("!i", 196608) + b"".join(
            k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()
        )
        body += b"\0"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        while True:
            kind, payload = self._read()
            if kind == b"R":
                (code,) = struct.unpack_from("!i", payload)
                if code != 0:
                    raise ReplicationProtocolError(f"authentication method {code} not supported (use trust)")
            elif kind == b"Z":
                return
            elif kind == b"E":
                raise ReplicationProtocolError(_error_text(payload))

    def _recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(n)
            if not chunk:
                raise ReplicationProtocolError("connection closed by server")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _read(self) -> tuple[bytes, bytes]:
        header = self._recv_exact(5)
        (length,) = struct.unpack_from("!i", header, 1)
        return header[:1], self._recv_exact(length - 4)

    def _send(self, kind: bytes, payload: bytes) -> None:
        self.sock.sendall(kind + struct.pack("!i", len(payload) + 4) + payload)

    def start_replication(
        self, slot: str, publication: str, start_lsn: str = "0/0", messages: bool = False
    ) -> None:
        """Send START_REPLICATION and wait for CopyBothResponse."""
        opts = f"proto_version '1', publication_names '{publication}'"
        if messages:
            opts += ", messages 'true'"
        self._send(b"Q", f"START_REPLICATION SLOT {slot} LOGICAL {start_lsn} ({opts})".encode() + b"\0")
        while True:
            kind, payload = self._read()
            if kind == b"W":
                return
            if kind == b"E":
                raise ReplicationProtocolError(_error_text(payload))

    def read_copy_data(self) -> bytes:
        """The next CopyData payload (a ``w`` or ``k`` frame)."""
        while True:
            kind, payload = self._read()
            if kind == b"d":
                return payload
            if kind == b"E":
                raise ReplicationProtocolError(_error_text(payload))
            if kind == b"c":
                raise ReplicationProtocolError("server ended the copy stream")

    def send_copy_data(self, data: bytes) -> None:
        """Send one CopyData message (a standby status update)."""
        self._send(b"d", data)

    def close(self) -> None:
        try:
            self._send(b"X", b"")
        except OSError:
            pass
        self.sock.close()


def _error_text(payload: bytes) -> str:
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[part[:1]] = part[1:].decode(errors="replace")
    return fields.get(b"M", "unknown error")
