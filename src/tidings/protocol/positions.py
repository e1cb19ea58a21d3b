"""Positions in the Postgres Changes stream, and what a rejoin asks to resume from.

A change's position is its commit LSN and its index in the transaction, written as fixed-width
upper-case hex: ``"0000000016B3A2F8/00000003"``. Positions compare as strings in stream order,
so clients keep the greatest they saw without parsing it. Every ``postgres_changes`` push carries
one in ``data.position``; channels that asked to resume also get it as the push's ``ref``, which
realtime-js (supabase-js) passes to the callback as its second argument (docs/postgres-changes.md).

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

__all__ = [
    "MAX_EPOCH_LENGTH",
    "ChangesReplay",
    "ChangesResume",
    "PositionError",
    "ResumeRefused",
    "format_position",
    "parse_position",
    "position_of",
]

MAX_EPOCH_LENGTH = 64
_POSITION = re.compile(r"\A[0-9A-Fa-f]{16}/[0-9A-Fa-f]{8}\Z")


class PositionError(ValueError):
    """Not a position: ``str(exc)`` says what a position looks like."""


def format_position(commit_lsn: int, index: int) -> str:
    """``(0x16B3A2F8, 3)`` -> ``"0000000016B3A2F8/00000003"``."""
    return f"{commit_lsn:016X}/{index:08X}"


def parse_position(text: object) -> str:
    """The canonical (upper-case) form of a position string.

    Raises:
        PositionError: *text* is not ``<16 hex digits>/<8 hex digits>``.
    """
    if not isinstance(text, str) or not _POSITION.match(text):
        raise PositionError(
            "a position is 16 hex digits, '/', 8 hex digits (e.g. 0000000016B3A2F8/00000003), "
            "as in data.position of a postgres_changes push"
        )
    return text.upper()


def position_of(position: str) -> tuple[int, int]:
    """``"0000000016B3A2F8/00000003"`` -> ``(commit LSN, index)`` (the position must be canonical)."""
    lsn, index = position.split("/")
    return int(lsn, 16), int(index, 16)


@dataclasses.dataclass(frozen=True, slots=True)
class ChangesResume:
    """``config.postgres_changes_options.resume`` of a join: ``{since?, epoch?}``.

    ``since`` is the last position the client received (``None``: it asks only for a baseline,
    the join reply's ``position``), ``epoch`` the change log epoch it got with it.
    """

    since: str | None = None
    epoch: str | None = None

    @staticmethod
    def parse(raw: Any) -> ChangesResume:
        """``true`` or ``{since, epoch}``.

        Raises:
            PositionError: anything else, with the reason for the join error reply.
        """
        if raw is True:
            return ChangesResume()
        if not isinstance(raw, dict):
            raise PositionError("postgres_changes_options.resume must be an object {since, epoch}")
        since = raw.get("since")
        epoch = raw.get("epoch")
        if epoch is not None and (not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_EPOCH_LENGTH):
            raise PositionError(f"resume.epoch must be a string of at most {MAX_EPOCH_LENGTH} characters")
        return ChangesResume(None if since is None else parse_position(since), epoch)


class ResumeRefused(Exception):
    """A resume that cannot be answered (a position the stream has not reached): the join is refused
    with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class ChangesReplay:
    """What a resume gets: the changes after ``since`` that match the channel now, and whether that
    is provably everything.

    ``items`` are ``(position, binding ids, data)``, oldest first. ``position`` is the baseline the
    client now holds (every later change reaches it live), ``epoch`` the log's. ``recovered`` is
    True only when the log proves it held every change after ``since`` (then ``reason`` is "").
    """

    items: list[tuple[str, list[int], dict[str, Any]]]
    recovered: bool
    position: str
    epoch: str
    reason: str = ""
    truncated: bool = False
    """A page (``GET /api/changes``) that ended at the limits: ``position`` is its last change,
    and the next page starts after it."""
