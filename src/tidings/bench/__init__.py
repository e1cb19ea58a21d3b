"""``tidings bench``: a load generator for Tidings and reference servers, with reports.

The load generator is lean on purpose (see ``docs`` in ``BENCHMARKS.md``): raw asyncio
protocols with minimal client-side WebSocket framing, spread over several processes and several
loopback source addresses, so that it is not the bottleneck of what it measures.
"""

from __future__ import annotations

__all__: list[str] = []
