"""Presence state of one channel group, its diffs and the refs that identify each meta.

Pure: the caller says who tracks what; this module answers with the ``presence_diff`` payloads
to fan out and the ``presence_state`` payload to push on join.
"""

from __future__ import annotations

import base64
import itertools
import os
from collections.abc import Hashable
from typing import Any

__all__ = ["PresenceDiff", "PresenceState", "RefMaker"]

PresenceDiff = dict[str, dict[str, dict[str, list[dict[str, Any]]]]]


class RefMaker:
    """Opaque, unique ``phx_ref`` strings: a per-process prefix and a counter."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self, prefix: bytes | None = None) -> None:
        self._prefix = base64.urlsafe_b64encode(prefix or os.urandom(6)).decode().rstrip("=")
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        n = next(self._counter)
        digits = n.to_bytes(8, "big").lstrip(b"\0") or b"\0"
        return self._prefix + base64.urlsafe_b64encode(digits).decode().rstrip("=")


class PresenceState:
    """Who is present on one channel group: ``key -> {owner: meta}``.

    An *owner* is one joined channel instance (a connection's join); it holds at most one meta.
    Several owners may share a key (several tabs of one user).
    """

    __slots__ = ("_by_key", "_by_owner", "_refs")

    def __init__(self, refs: RefMaker) -> None:
        self._refs = refs
        self._by_key: dict[str, dict[Hashable, dict[str, Any]]] = {}
        self._by_owner: dict[Hashable, tuple[str, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._by_owner)

    def __bool__(self) -> bool:
        return bool(self._by_owner)

    def state(self) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """The ``presence_state`` payload."""
        return {key: {"metas": list(owners.values())} for key, owners in self._by_key.items()}

    def meta_of(self, owner: Hashable) -> dict[str, Any] | None:
        """The meta ``owner`` tracks, if any."""
        entry = self._by_owner.get(owner)
        return None if entry is None else entry[1]

    def track(self, owner: Hashable, key: str, user_state: dict[str, Any]) -> PresenceDiff | None:
        """Track or update ``owner`` under ``key``; ``None`` when nothing changed."""
        previous = self._by_owner.get(owner)
        if previous is not None:
            old_key, old_meta = previous
            if old_key == key and {
                k: v for k, v in old_meta.items() if k not in ("phx_ref", "phx_ref_prev")
            } == (user_state):
                return None
        meta = dict(user_state)
        meta.pop("phx_ref_prev", None)
        meta["phx_ref"] = self._refs()
        leaves: dict[str, dict[str, list[dict[str, Any]]]] = {}
        if previous is not None:
            old_key, old_meta = previous
            meta["phx_ref_prev"] = old_meta["phx_ref"]
            self._remove(owner, old_key)
            leaves[old_key] = {"metas": [old_meta]}
        self._by_key.setdefault(key, {})[owner] = meta
        self._by_owner[owner] = (key, meta)
        return {"joins": {key: {"metas": [meta]}}, "leaves": leaves}

    def untrack(self, owner: Hashable) -> PresenceDiff | None:
        """Remove ``owner``'s meta; ``None`` when it tracked nothing."""
        entry = self._by_owner.pop(owner, None)
        if entry is None:
            return None
        key, meta = entry
        owners = self._by_key[key]
        del owners[owner]
        if not owners:
            del self._by_key[key]
        return {"joins": {}, "leaves": {key: {"metas": [meta]}}}

    def _remove(self, owner: Hashable, key: str) -> None:
        del self._by_owner[owner]
        owners = self._by_key[key]
        del owners[owner]
        if not owners:
            del self._by_key[key]
