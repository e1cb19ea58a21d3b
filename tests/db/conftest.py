"""Fixtures for the realtime schema tests: one throwaway PostgreSQL for the session, and a fresh
database prepared like Supabase's image (empty ``realtime`` schema) per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresServer, postgres_fixture
from tests.support.supabase_db import SupabaseDatabase, create_supabase_database
from tidings.db.migrations import prepare

postgres = postgres_fixture()
"""The session's throwaway PostgreSQL."""


@pytest.fixture
def supabase_db(postgres: PostgresServer) -> SupabaseDatabase:
    """A new database prepared like Supabase's image; its ``realtime`` schema is empty."""
    return create_supabase_database(postgres)


@pytest.fixture
def migrated(supabase_db: SupabaseDatabase) -> Iterator[SupabaseDatabase]:
    """:func:`supabase_db` after Tidings' migrations and partition maintenance (as postgres)."""
    conn = supabase_db.connect()
    try:
        prepare(conn)
    finally:
        conn.close()
    yield supabase_db
