"""A database prepared like Supabase's PostgreSQL image, for Realtime Authorization and Broadcast
from Database tests (and the official clients' tests that need one).

What the issue's compatibility suite sets up, on a :class:`~tests.support.postgres.PostgresServer`:

* roles ``anon``, ``authenticated``, ``service_role`` (``BYPASSRLS``) and ``authenticator``
  (``LOGIN NOINHERIT``, member of the three), created once per cluster (roles are cluster-wide);
* in the database: Supabase's default privileges on schema ``public`` (tables, functions and
  sequences made there are granted to the three API roles);
* schema ``auth`` with ``auth.users`` and Supabase's ``auth.uid()``, ``auth.role()``, ``auth.jwt()``;
* the empty publication ``supabase_realtime``;
* an **empty** schema ``realtime`` (nothing in it: Tidings migrates it).

Usage::

    postgres = postgres_fixture()                       # conftest.py

    def test_x(postgres: PostgresServer) -> None:
        db = create_supabase_database(postgres)
        db.execute("SELECT auth.uid()")
        with db.as_role("authenticated", {"sub": USER_ID, "role": "authenticated"}) as cur:
            cur.execute("INSERT INTO public.notes ...")
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests.support.postgres import PostgresServer

__all__ = [
    "API_ROLES",
    "SupabaseDatabase",
    "create_supabase_database",
    "ensure_supabase_roles",
]

API_ROLES = ("anon", "authenticated", "service_role")

_ROLES_SQL = """
DO $do$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN
    CREATE ROLE anon NOLOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
    CREATE ROLE authenticated NOLOGIN NOINHERIT;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'service_role') THEN
    CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticator') THEN
    CREATE ROLE authenticator LOGIN NOINHERIT;
  END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
  NULL;
END
$do$;
GRANT anon, authenticated, service_role TO authenticator;
"""

# Supabase's image: what postgres makes in public is usable by the API roles (RLS decides rows).
_DATABASE_SQL = """
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;

CREATE SCHEMA auth;
CREATE TABLE auth.users (
  instance_id uuid,
  id uuid NOT NULL PRIMARY KEY,
  aud varchar(255),
  role varchar(255),
  email varchar(255) UNIQUE,
  raw_app_meta_data jsonb,
  raw_user_meta_data jsonb,
  created_at timestamptz DEFAULT now(),
  updated_at timestamptz DEFAULT now()
);
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
  select
  coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;
CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
  select
  coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;
CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
  select
    coalesce(
        nullif(current_setting('request.jwt.claim', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')
    )::jsonb
$$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
GRANT SELECT ON auth.users TO service_role;

CREATE PUBLICATION supabase_realtime;

CREATE SCHEMA realtime;
"""


def ensure_supabase_roles(server: PostgresServer) -> None:
    """Create Supabase's roles on *server* unless they exist (idempotent, concurrency-safe)."""
    server.execute(_ROLES_SQL)


@dataclass
class SupabaseDatabase:
    """A database of *server* prepared like Supabase's image (see the module doc)."""

    server: PostgresServer
    name: str
    dsn: str

    def execute(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run *sql* as ``postgres`` in its own connection; the rows (empty for commands)."""
        return self.server.execute(sql, params, dbname=self.name)

    def connect(self, user: str = "postgres") -> Any:
        """An autocommit psycopg2 connection as *user*."""
        return self.server.connect(self.name, user)

    def dsn_for(self, user: str) -> str:
        """A libpq URL for this database as *user*."""
        return self.server.dsn(self.name, user)

    def add_user(self, email: str | None = None) -> str:
        """A row in ``auth.users``; returns its id (a uuid string, the JWT ``sub``)."""
        user_id = str(uuid.uuid4())
        self.execute(
            "INSERT INTO auth.users (id, aud, role, email) VALUES (%s, 'authenticated', 'authenticated', %s)",
            (user_id, email or f"{user_id}@example.com"),
        )
        return user_id

    @contextmanager
    def as_role(self, role: str, claims: Mapping[str, Any] | None = None) -> Iterator[Any]:
        """A cursor in a transaction running as *role* with these JWT claims, the way PostgREST
        runs an API request (``SET LOCAL ROLE`` and the ``request.jwt.*`` settings). Committed
        when the block ends normally, rolled back when it raises. ``cursor.connection.notices``
        holds the WARNINGs raised meanwhile."""
        claims = dict(claims or {"role": role})
        conn = self.connect()
        conn.autocommit = False
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT set_config('role', %s, true), set_config('request.jwt.claims', %s, true), "
                    "set_config('request.jwt.claim.sub', %s, true), "
                    "set_config('request.jwt.claim.role', %s, true)",
                    (role, json.dumps(claims), str(claims.get("sub") or ""), role),
                )
                yield cur
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()


def create_supabase_database(server: PostgresServer, prefix: str = "sb") -> SupabaseDatabase:
    """A new database on *server* prepared like Supabase's image, with an empty ``realtime`` schema."""
    ensure_supabase_roles(server)
    dsn = server.create_database(prefix)
    name = dsn.rsplit("/", 1)[1]
    server.execute(_DATABASE_SQL, dbname=name)
    return SupabaseDatabase(server, name, dsn)
