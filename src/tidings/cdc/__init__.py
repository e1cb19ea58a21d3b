"""Postgres Changes: INSERT/UPDATE/DELETE of published tables, streamed from a logical slot.

Pure modules (no asyncio, no I/O), testable without a database:

* :mod:`tidings.cdc.pgoutput` - pgoutput v1 decoder and replication stream framing.
* :mod:`tidings.cdc.values` - text values rendered as ``to_jsonb`` does.
* :mod:`tidings.cdc.changes` - decoded messages -> change payloads with stable ids.
* :mod:`tidings.cdc.index` - subscription params and the per-table / per-value matching index.

I/O modules: :mod:`tidings.cdc.catalog` (blocking SQL), :mod:`tidings.cdc.replication` (the reader
thread) and :mod:`tidings.cdc.service` (:class:`PostgresChanges`, what the server uses).
:mod:`tidings.cdc.rls` is the ordered pipeline of the row level security option (asyncio; its
queries are injected by the service).

``PostgresChanges``, ``PostgresChangesError`` and ``SubscriptionError`` are importable from here;
they load the driver on first use, so importing a pure module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["PostgresChanges", "PostgresChangesError", "SubscriptionError"]

if TYPE_CHECKING:
    from tidings.cdc.service import PostgresChanges, PostgresChangesError, SubscriptionError


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tidings.cdc import service

        return getattr(service, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
