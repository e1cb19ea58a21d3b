"""A throwaway redis-server for the scale-out benches: prints its URL, runs until killed.

.venv/bin/python benchmarks/throwaway_redis.py > /tmp/redis.url &
.venv/bin/python benchmarks/throwaway_redis.py --cluster 3 > /tmp/redis.url &   # a 3-primary Redis Cluster
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.redis import RedisClusterServers, RedisServer


def main() -> None:
    masters = int(sys.argv[2]) if sys.argv[1:2] == ["--cluster"] else 0
    server: RedisServer | RedisClusterServers = (
        RedisClusterServers(masters).start() if masters else RedisServer(persist=False).start()
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(server.url, flush=True)
        stop.wait()
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
