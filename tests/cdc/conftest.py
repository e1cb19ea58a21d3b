"""Fixtures for the Postgres Changes tests: a session-wide throwaway PostgreSQL, a fresh database per
test, and a collector for what ``PostgresChanges`` delivers."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.cdc.slow_standby import SlowStandby
from tests.support.postgres import PostgresServer, postgres_fixture
from tidings.cdc.service import PostgresChanges

postgres = postgres_fixture()
"""The session's throwaway PostgreSQL (wal_level=logical)."""

_slots = itertools.count(1)


@dataclass
class Database:
    """A fresh database on the session server."""

    server: PostgresServer
    name: str
    dsn: str

    def execute(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.server.execute(sql, params, dbname=self.name)

    def connect(self) -> Any:
        return self.server.connect(self.name)

    def current_lsn(self) -> int:
        ((lsn,),) = self.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        return int(lsn)

    def confirmed_lsn(self, slot: str) -> int:
        rows = self.execute(
            "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0


@pytest.fixture
def db(postgres: PostgresServer) -> Iterator[Database]:
    dsn = postgres.create_database()
    name = dsn.rsplit("/", 1)[1]
    yield Database(postgres, name, dsn)
    # Inactive slots pin WAL for the rest of the session: drop this test's.
    postgres.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE database = %s AND NOT active",
        (name,),
    )


@dataclass
class Delivery:
    matches: dict[Hashable, list[int]]
    data: dict[str, Any]
    change_id: str


@dataclass
class Collector:
    """A ``deliver`` callback that records every call and lets tests wait for them."""

    items: list[Delivery] = field(default_factory=list)
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, matches: dict[Hashable, list[int]], data: dict[str, Any], change_id: str) -> None:
        self.items.append(Delivery({k: list(v) for k, v in matches.items()}, data, change_id))
        self._event.set()

    def for_owner(self, owner: Hashable) -> list[Delivery]:
        return [d for d in self.items if owner in d.matches]

    async def wait_for(self, predicate: Callable[[Collector], bool], timeout: float = 30.0) -> None:
        """Wait until *predicate* holds (the timeout only stops a hung test; no speed is asserted)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"condition not reached; got {len(self.items)} deliveries: "
                    f"{[(d.change_id, d.data.get('type'), d.matches) for d in self.items]}"
                )
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass

    async def wait_count(self, n: int, owner: Hashable | None = None, timeout: float = 30.0) -> None:
        if owner is None:
            await self.wait_for(lambda c: len(c.items) >= n, timeout)
        else:
            await self.wait_for(lambda c: len(c.for_owner(owner)) >= n, timeout)


def ensure_role(db: Database, name: str, options: str = "NOLOGIN") -> None:
    """Create role *name* unless it exists (roles are shared by every database of the server)."""
    db.execute(f"DO $$ BEGIN CREATE ROLE {name} {options}; EXCEPTION WHEN duplicate_object THEN NULL; END $$")


def unique_slot() -> str:
    """A slot name no other test uses (slots are cluster-wide)."""
    return f"tidings_test_{next(_slots)}"


@pytest.fixture
async def make_changes(db: Database) -> AsyncIterator[Callable[..., PostgresChanges]]:
    """Build PostgresChanges on the test's database; all are stopped at the end of the test."""
    made: list[PostgresChanges] = []
    slot = unique_slot()

    def make(deliver: Any, **kwargs: Any) -> PostgresChanges:
        kwargs.setdefault("slot", slot)
        pc = PostgresChanges(db.dsn, deliver=deliver, **kwargs)
        made.append(pc)
        return pc

    yield make
    for pc in made:
        await pc.stop()


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll *predicate* until true (the timeout only stops a hung test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


STANDBY = "slow_standby"


@pytest.fixture(scope="session")
def sync_postgres() -> Iterator[PostgresServer]:
    """A server whose commits wait for a synchronous standby that acknowledges 10 ms late.

    Each commit is streamed as soon as its WAL is flushed, then stays invisible to other sessions
    for those 10 ms: the window in which a check on another connection ran too early (it exists
    without synchronous replication too, only much shorter).
    """
    server = PostgresServer({"synchronous_standby_names": f"'{STANDBY}'"})
    standby: SlowStandby | None = None
    try:
        server.start()
        standby = SlowStandby(server.dsn(), name=STANDBY, delay=0.01).start()
        yield server
    finally:
        server.destroy()  # immediate stop first: nothing waits for the standby any more
        if standby is not None:
            standby.stop()
