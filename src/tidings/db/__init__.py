"""The ``realtime`` schema in the database Tidings serves: Supabase's tenant schema, kept current.

When ``DATABASE_URL`` is set, Tidings creates and migrates the schema Supabase Realtime keeps in its
tenants' databases (``realtime.messages``, ``realtime.topic()``, ``realtime.send()``,
``realtime.send_binary()``, ``realtime.broadcast_changes()``) with Supabase's names and signatures:

* :mod:`tidings.db.privileges` - the preflight: what the database role lacks, as one line with the
  SQL that grants it.
* :mod:`tidings.db.migrations` - versioned, idempotent migrations under an advisory lock
  (:func:`~tidings.db.migrations.prepare_database` is what a node runs at start).
* :mod:`tidings.db.partitions` - the daily partitions of ``realtime.messages`` (yesterday to three
  days ahead; older than 72 hours dropped), pure SQL helpers and the maintenance job.
* :mod:`tidings.db.authorization` - Supabase's Realtime Authorization: the RLS probe of
  ``realtime.messages`` per (topic, claims), cached.
* :mod:`tidings.db.broadcast` - Broadcast from Database: INSERTs of ``realtime.messages`` streamed
  from a permanent slot to channels.
* :mod:`tidings.db.replay` - replay of a private channel's messages from ``realtime.messages``.

Everything that talks to PostgreSQL is blocking psycopg2 (the connection helpers of
:mod:`tidings.cdc.catalog`); the async entry points run it in worker threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "BroadcastFromDatabase",
    "DatabaseReplay",
    "DatabaseSetupError",
    "PartitionMaintenance",
    "PrivilegeError",
    "RlsAuthorizer",
    "SetupReport",
    "prepare_database",
    "start_broadcast_from_database",
]

if TYPE_CHECKING:
    from tidings.db.authorization import RlsAuthorizer
    from tidings.db.broadcast import BroadcastFromDatabase, start_broadcast_from_database
    from tidings.db.migrations import SetupReport, prepare_database
    from tidings.db.partitions import PartitionMaintenance
    from tidings.db.privileges import DatabaseSetupError, PrivilegeError
    from tidings.db.replay import DatabaseReplay

_HOMES = {
    "BroadcastFromDatabase": "tidings.db.broadcast",
    "DatabaseReplay": "tidings.db.replay",
    "start_broadcast_from_database": "tidings.db.broadcast",
    "DatabaseSetupError": "tidings.db.privileges",
    "SetupReport": "tidings.db.migrations",
    "prepare_database": "tidings.db.migrations",
    "PartitionMaintenance": "tidings.db.partitions",
    "PrivilegeError": "tidings.db.privileges",
    "RlsAuthorizer": "tidings.db.authorization",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(home), name)
