"""A synchronous standby that acknowledges WAL late, for tests: commits stream before they are visible.

With ``synchronous_standby_names`` naming this standby, a committing session flushes its commit
record, then waits for the standby's acknowledgement, and only then leaves the list of running
transactions. Logical decoding streams the commit as soon as it is flushed, so for the whole
acknowledgement delay the change has reached Tidings while other sessions' snapshots still see
the transaction as running: the window in which an RLS check on another connection does not see
the row. Production has the same window (shorter) without synchronous replication, and about as
wide with it.

::

    standby = SlowStandby(dsn, name="slow_standby", delay=0.01).start()
    ...
    standby.stop()
"""

from __future__ import annotations

import select
import threading
import time
from collections import deque
from typing import Any

import psycopg2
import psycopg2.extras

__all__ = ["SlowStandby"]


class SlowStandby:
    """A physical replication client (``application_name`` = *name*) that reports WAL as flushed
    *delay* seconds after it received it.

    Args:
        dsn: a libpq URL of the server (a user with REPLICATION; ``pg_hba.conf`` must allow it).
        name: the name ``synchronous_standby_names`` lists.
        delay: seconds between receiving WAL and acknowledging it.
    """

    def __init__(self, dsn: str, *, name: str, delay: float) -> None:
        self.dsn = dsn
        self.name = name
        self.delay = delay
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> SlowStandby:
        self._thread = threading.Thread(target=self._run, name="slow-standby", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"slow standby did not start: {self.error!r}")
        if self.error is not None:
            raise RuntimeError(f"slow standby failed: {self.error!r}")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        conn: Any = None
        try:
            conn = psycopg2.connect(
                self.dsn,
                connection_factory=psycopg2.extras.PhysicalReplicationConnection,
                application_name=self.name,
            )
            cur = conn.cursor()
            cur.execute("IDENTIFY_SYSTEM")
            _, _, xlogpos, _ = cur.fetchone()
            hi, lo = (int(part, 16) for part in xlogpos.split("/"))
            start = (hi << 32) + lo
            cur.start_replication(start_lsn=start)
            received: deque[tuple[float, int]] = deque()
            flushed = written = reported = start
            self._ready.set()
            while not self._stop.is_set():
                msg = cur.read_message()
                if msg is not None:
                    written = max(written, msg.data_start + len(msg.payload))
                    received.append((time.monotonic(), written))
                    continue
                now = time.monotonic()
                while received and received[0][0] <= now - self.delay:
                    flushed = received.popleft()[1]
                if flushed != reported:
                    # force: psycopg2 otherwise holds feedback back for its status interval (10 s)
                    cur.send_feedback(write_lsn=written, flush_lsn=flushed, apply_lsn=flushed, force=True)
                    reported = flushed
                select.select([conn], [], [], self.delay / 4)
        except BaseException as exc:  # reported by start(), or visible in a hung test
            self.error = exc
            self._ready.set()
        finally:
            if conn is not None:
                conn.close()
