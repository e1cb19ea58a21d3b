"""A PostgresChanges consumer that dies abruptly inside its N-th delivery (for the crash test).

Usage: python -m tests.cdc.crash_consumer DSN SLOT TABLE CRASH_AT [CLAIMS_JSON]

With CLAIMS_JSON the consumer subscribes with those claims and RLS checks on (``rls=True``).

Prints one JSON line per delivery (change id, row id) and flushes it, then ``os._exit(3)`` inside
the CRASH_AT-th delivery: no cleanup, no last status update, like a killed process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Hashable
from typing import Any

from tidings.cdc.service import PostgresChanges


async def main(dsn: str, slot: str, table: str, crash_at: int, claims: dict[str, Any] | None) -> None:
    count = 0

    def deliver(matches: dict[Hashable, list[int]], data: dict[str, Any], change_id: str) -> None:
        nonlocal count
        count += 1
        print(json.dumps({"id": change_id, "row": data["record"]["id"], "data": data}), flush=True)
        if count == crash_at:
            os._exit(3)

    pc = PostgresChanges(dsn, slot=slot, deliver=deliver, rls=claims is not None)
    await pc.subscribe("crash", [(1, {"event": "*", "schema": "public", "table": table})], claims)
    await pc.start()
    await asyncio.sleep(60)  # the test kills us long before
    sys.exit(4)


if __name__ == "__main__":
    claims = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), claims))
