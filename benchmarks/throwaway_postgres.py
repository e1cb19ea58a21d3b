"""A throwaway PostgreSQL (wal_level=logical) for the ``--source postgres`` benches.

Prints its DSN on the first line, then keeps running until killed (SIGTERM/SIGINT), when it
stops the cluster and deletes its files. Uses ``tests/support/postgres.py`` (run from the repo root):

    .venv/bin/python benchmarks/throwaway_postgres.py > /tmp/pg.dsn &
    .venv/bin/tidings bench order-status --source postgres --database-url "$(head -1 /tmp/pg.dsn)"
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.postgres import PostgresServer


def main() -> None:
    # More connections than the test default: bench updaters + the server's pool and slot.
    server = PostgresServer({"max_connections": "200"}).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.execute("CREATE DATABASE bench")
        print(server.dsn("bench"), flush=True)
        stop.wait()
    finally:
        server.destroy()


if __name__ == "__main__":
    main()
