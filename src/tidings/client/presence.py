"""Client-side presence: merges ``presence_state`` and ``presence_diff`` the way realtime-js does.

Diffs that arrive before the first ``presence_state`` of the current join are held back and
applied right after it, so a late state can never erase a newer join (spec 5.3).
"""

from __future__ import annotations

from typing import Any

from .events import PresenceEvent

__all__ = ["PresenceView"]

Metas = list[dict[str, Any]]


def _metas(entry: object) -> Metas:
    if isinstance(entry, dict):
        metas = entry.get("metas")
        if isinstance(metas, list):
            return [m for m in metas if isinstance(m, dict)]
    return []


def _user(meta: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in meta.items() if k not in ("phx_ref", "phx_ref_prev")}
    out["presence_ref"] = meta.get("phx_ref")
    return out


class PresenceView:
    """Presence of one channel as this client sees it."""

    def __init__(self) -> None:
        self._state: dict[str, Metas] = {}
        self._pending: list[dict[str, Any]] = []
        self._synced = False

    def reset(self) -> None:
        """Forget everything (a new join starts from its own ``presence_state``)."""
        self._state.clear()
        self._pending.clear()
        self._synced = False

    @property
    def synced(self) -> bool:
        """True once a ``presence_state`` arrived for the current join."""
        return self._synced

    def state(self) -> dict[str, list[dict[str, Any]]]:
        """``{key: [meta, ...]}`` with ``presence_ref`` in each meta."""
        return {key: [_user(m) for m in metas] for key, metas in self._state.items()}

    def apply_state(self, new_state: dict[str, Any]) -> list[PresenceEvent]:
        """Apply a full ``presence_state``; returns the join/leave events and a final ``sync``."""
        joins: dict[str, Metas] = {}
        leaves: dict[str, Metas] = {}
        incoming = {key: _metas(entry) for key, entry in new_state.items()}
        for key, metas in self._state.items():
            if key not in incoming:
                leaves[key] = metas
        for key, metas in incoming.items():
            current = self._state.get(key)
            if current is None:
                joins[key] = metas
                continue
            new_refs = {m.get("phx_ref") for m in metas}
            cur_refs = {m.get("phx_ref") for m in current}
            joined = [m for m in metas if m.get("phx_ref") not in cur_refs]
            left = [m for m in current if m.get("phx_ref") not in new_refs]
            if joined:
                joins[key] = joined
            if left:
                leaves[key] = left
        events = self._merge(joins, leaves)
        self._synced = True
        pending, self._pending = self._pending, []
        for diff in pending:
            events += self._merge_diff(diff)
        events.append(PresenceEvent("sync"))
        return events

    def apply_diff(self, diff: dict[str, Any]) -> list[PresenceEvent]:
        """Apply a ``presence_diff`` (held back until the first state); returns the events."""
        if not self._synced:
            self._pending.append(diff)
            return []
        events = self._merge_diff(diff)
        events.append(PresenceEvent("sync"))
        return events

    def _merge_diff(self, diff: dict[str, Any]) -> list[PresenceEvent]:
        joins = diff.get("joins")
        leaves = diff.get("leaves")
        return self._merge(
            {k: _metas(v) for k, v in joins.items()} if isinstance(joins, dict) else {},
            {k: _metas(v) for k, v in leaves.items()} if isinstance(leaves, dict) else {},
        )

    def _merge(self, joins: dict[str, Metas], leaves: dict[str, Metas]) -> list[PresenceEvent]:
        events: list[PresenceEvent] = []
        for key, metas in joins.items():
            current = self._state.get(key, [])
            joined_refs = {m.get("phx_ref") for m in metas}
            kept = [m for m in current if m.get("phx_ref") not in joined_refs]
            self._state[key] = kept + list(metas)
            events.append(PresenceEvent("join", key, [_user(m) for m in current], [_user(m) for m in metas]))
        for key, metas in leaves.items():
            present = self._state.get(key)
            if present is None:
                continue
            current = present
            refs = {m.get("phx_ref") for m in metas}
            remaining = [m for m in current if m.get("phx_ref") not in refs]
            events.append(
                PresenceEvent("leave", key, [_user(m) for m in remaining], [_user(m) for m in metas])
            )
            if remaining:
                self._state[key] = remaining
            else:
                del self._state[key]
        return events
