"""Prometheus text rendering (exposition format 0.0.4) of a node's counters, gauges and histograms.

Names follow Prometheus conventions: ``tidings_`` prefix, base units (seconds, bytes), counters end
in ``_total``, one name per measure with labels for its kinds. The list with explanations is in
``docs/observability.md``.
"""

from __future__ import annotations

from ..alerts import ALERT_NAMES
from ..logs import suppressed_lines
from ..metrics import RECEIVED_KINDS, Histogram
from ..node import Node
from .monitor import Monitor

__all__ = ["render_prometheus"]

# (name, help, attribute of NodeMetrics)
_COUNTERS = (
    ("tidings_connections_total", "WebSocket connections accepted.", "connections_total"),
    ("tidings_connections_closed_total", "WebSocket connections closed.", "connections_closed"),
    ("tidings_connections_refused_total", "WebSocket upgrades refused.", "connections_refused"),
    (
        "tidings_reconnects_total",
        "Connections from an identity (JWT sub, else peer address) that closed one in the last 60 s.",
        "reconnects",
    ),
    ("tidings_joins_total", "Channel joins accepted.", "joins"),
    ("tidings_joins_refused_total", "Channel joins refused.", "joins_refused"),
    (
        "tidings_broadcasts_published_total",
        "Broadcasts published through this node (WebSocket and REST).",
        "published",
    ),
    (
        "tidings_broadcasts_fanned_out_total",
        "Broadcasts this node received from the broker for local fan-out.",
        "broadcasts",
    ),
    ("tidings_presence_events_total", "Presence diffs published.", "presence_events"),
    ("tidings_received_bytes_total", "Bytes of client messages received.", "bytes_in"),
    ("tidings_sent_bytes_total", "Bytes written by fan-out (broadcast, presence, changes).", "bytes_out"),
    ("tidings_rate_limited_total", "Messages and requests refused by rate limits.", "rate_limited"),
    (
        "tidings_internal_errors_total",
        "Client messages whose handling raised (a bug): the connection was closed with 1011.",
        "internal_errors",
    ),
    (
        "tidings_slow_consumer_closes_total",
        "Connections closed as slow consumers (1013).",
        "slow_consumer_closes",
    ),
    (
        "tidings_heartbeat_timeouts_total",
        "Connections closed for missing heartbeats.",
        "heartbeat_timeouts",
    ),
    (
        "tidings_connections_near_fd_limit_total",
        "Connections accepted while the open connections were near the open files limit.",
        "connections_near_fd_limit",
    ),
    (
        "tidings_names_too_long_total",
        "Joins and broadcasts (WebSocket, REST) refused for a topic, event or presence key over its cap.",
        "names_too_long",
    ),
    (
        "tidings_join_errors_undelayed_total",
        "Join error replies sent without CHANNEL_ERROR_BACKOFF_MS (too big, or too many waiting).",
        "join_errors_undelayed",
    ),
    (
        "tidings_fragment_timeouts_total",
        "Connections closed because a fragmented message did not end within FRAGMENT_TIMEOUT (1008).",
        "fragment_timeouts",
    ),
    (
        "tidings_fragment_buffer_full_total",
        "Connections closed because fragments would pass MAX_FRAGMENT_BUFFER_BYTES (1009).",
        "fragment_buffer_full",
    ),
    (
        "tidings_catchup_allowances_total",
        "Joins whose catch-up (replay, presence_state) left more than MAX_UNSENT_BYTES unsent.",
        "catchup_allowances",
    ),
    (
        "tidings_postgres_changes_rls_hidden_total",
        "Postgres Changes withheld by row level security (DB_RLS): one per change and subscriber.",
        "changes_rls_hidden",
    ),
    (
        "tidings_postgres_changes_resumes_total",
        "Postgres Changes resumes (a rejoin with a position) answered recovered: true.",
        "changes_resumes_complete",
    ),
    (
        "tidings_postgres_changes_resumes_incomplete_total",
        "Postgres Changes resumes answered recovered: false (log too short, limits, another epoch).",
        "changes_resumes_incomplete",
    ),
    (
        "tidings_postgres_changes_resumes_refused_total",
        "Postgres Changes resumes and polls refused: a malformed position or one ahead of the database.",
        "changes_resumes_refused",
    ),
    (
        "tidings_postgres_changes_replayed_total",
        "Postgres Changes sent in resume replays (after the join reply, before live changes).",
        "changes_replayed",
    ),
    (
        "tidings_postgres_changes_polls_total",
        "Answers of GET /api/changes (the change log polled over HTTP).",
        "changes_polls",
    ),
    (
        "tidings_postgres_changes_rls_rechecks_total",
        "RLS checks run again because their snapshot did not see the streamed commit yet.",
        "changes_rls_rechecks",
    ),
    (
        "tidings_db_broadcasts_total",
        "Rows of realtime.messages published as broadcasts (Broadcast from Database).",
        "db_broadcasts",
    ),
    (
        "tidings_db_broadcasts_too_large_total",
        "Rows of realtime.messages dropped: payload over MAX_PAYLOAD_SIZE_KB.",
        "db_broadcasts_too_large",
    ),
    (
        "tidings_db_broadcasts_names_too_long_total",
        "Rows of realtime.messages dropped: topic or event over MAX_TOPIC_LENGTH / MAX_EVENT_LENGTH.",
        "db_broadcasts_names_too_long",
    ),
    (
        "tidings_db_broadcasts_malformed_total",
        "Rows of realtime.messages dropped: no event, no private flag, or no valid payload.",
        "db_broadcasts_malformed",
    ),
    (
        "tidings_db_broadcasts_throttled_total",
        "Times Broadcast from Database waited for DB_BROADCAST_RATE (rows stay in the slot).",
        "db_broadcasts_throttled",
    ),
)

_SENT = (
    ("broadcast", "sent_broadcast"),
    ("presence", "sent_presence"),
    ("postgres_changes", "sent_postgres_changes"),
    ("reply", "sent_reply"),
)
_DROPPED = (("malformed", "malformed"), ("payload_too_large", "dropped_payload_too_large"))
#: ``reason`` label of tidings_http_refused_total -> attribute ``http_refused_<reason>``.
_HTTP_REFUSED = (
    "head_too_large",
    "url_too_long",
    "body_too_large",
    "head_timeout",
    "body_timeout",
    "per_ip",
    "anonymous_per_ip",
    "origin",
    "metrics_token",
)


def _metric(lines: list[str], name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
    lines.append(f"# HELP {name} {doc}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        lines.append(f"{name}{labels} {_num(value)}")


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _histogram(lines: list[str], name: str, doc: str, hist: Histogram) -> None:
    lines.append(f"# HELP {name} {doc}")
    lines.append(f"# TYPE {name} histogram")
    cumulative = 0
    for bound, count in zip(hist.bounds, hist.counts, strict=False):
        cumulative += count
        lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
    cumulative += hist.counts[-1]
    lines.append(f'{name}_bucket{{le="+Inf"}} {cumulative}')
    lines.append(f"{name}_sum {_num(hist.sum)}")
    lines.append(f"{name}_count {cumulative}")


def _history(lines: list[str], stats: dict[str, int]) -> None:
    """Channel history: scoped message ids (every broker); rings and bytes (memory broker)."""
    _metric(
        lines,
        "tidings_broadcast_ids_scoped_total",
        "counter",
        "Broadcasts published under a scoped id (<id>~<tag>) because another sender held their id.",
        [("", stats.get("scoped_ids", 0))],
    )
    if "bytes" not in stats:
        return
    _metric(
        lines,
        "tidings_history_dropped_total",
        "counter",
        "Channel history rings dropped: evicted (HISTORY_MAX_CHANNELS, HISTORY_MAX_BYTES) or "
        "expired (nothing kept, no subscriber, idle for HISTORY_TTL).",
        [('{reason="evicted"}', stats["evicted"]), ('{reason="expired"}', stats["expired"])],
    )
    _metric(
        lines,
        "tidings_history_bytes",
        "gauge",
        "Estimated bytes of channel history held (cap HISTORY_MAX_BYTES).",
        [("", stats["bytes"])],
    )
    _metric(
        lines,
        "tidings_history_channels",
        "gauge",
        "Channels with a history ring (cap HISTORY_MAX_CHANNELS).",
        [("", stats["channels"])],
    )


def _authorization(lines: list[str], node: Node) -> None:
    """Realtime Authorization of private channels (docs/authorization.md)."""
    m = node.metrics
    _metric(
        lines,
        "tidings_authorization_denied_total",
        "counter",
        "Private-channel requests refused by policy: read (joins, history, refreshes that lost read), "
        "write (broadcasts dropped, tracks refused, REST messages skipped or 403).",
        [('{access="read"}', m.authz_denied_reads), ('{access="write"}', m.authz_denied_writes)],
    )
    _metric(
        lines,
        "tidings_authorization_unavailable_total",
        "counter",
        "Permission checks the database could not evaluate (unreachable, timeout, missing partition).",
        [("", m.authz_unavailable)],
    )
    _metric(
        lines,
        "tidings_authorization_writes_dropped_total",
        "counter",
        "Messages dropped while their channel's first write check ran: over MAX_MESSAGES_PER_SECOND waiting.",
        [("", m.authz_writes_dropped)],
    )
    authorizer = node.authorizer
    _metric(
        lines,
        "tidings_authorization_queries_total",
        "counter",
        "Permission checks run in the database (DATABASE_URL; cache misses).",
        [("", getattr(authorizer, "queries", 0))],
    )
    _metric(
        lines,
        "tidings_authorization_cache_hits_total",
        "counter",
        "Permission checks answered from the cache of results per (topic, claims, headers).",
        [("", getattr(authorizer, "cache_hits", 0))],
    )


def render_prometheus(node: Node, monitor: Monitor) -> str:
    """Every metric of ``node`` (and its ``monitor``) as Prometheus exposition text."""
    m = node.metrics
    lines: list[str] = []
    for name, doc, attr in _COUNTERS:
        _metric(lines, name, "counter", doc, [("", getattr(m, attr))])
    _metric(
        lines,
        "tidings_messages_received_total",
        "counter",
        "Client messages received over WebSocket, by kind.",
        [(f'{{kind="{k}"}}', v) for k, v in zip(RECEIVED_KINDS, m.received, strict=True)],
    )
    _metric(
        lines,
        "tidings_messages_sent_total",
        "counter",
        "Frames sent to clients, by kind (fan-out deliveries; replies to heartbeats, joins, leaves).",
        [(f'{{kind="{k}"}}', getattr(m, attr)) for k, attr in _SENT],
    )
    _metric(
        lines,
        "tidings_messages_dropped_total",
        "counter",
        "Client messages dropped, by reason.",
        [(f'{{reason="{k}"}}', getattr(m, attr)) for k, attr in _DROPPED],
    )
    _metric(
        lines,
        "tidings_http_refused_total",
        "counter",
        "HTTP requests, connections and WebSocket upgrades refused at the HTTP edge, by reason.",
        [(f'{{reason="{k}"}}', getattr(m, f"http_refused_{k}")) for k in _HTTP_REFUSED],
    )
    _metric(
        lines,
        "tidings_alerts_fired_total",
        "counter",
        "Alerts that started firing.",
        [("", monitor.alerts.fired_total)],
    )
    _metric(
        lines,
        "tidings_tokens_too_large_total",
        "counter",
        "Tokens refused for MAX_TOKEN_BYTES.",
        [("", node.verifier.too_large)],
    )
    _metric(
        lines,
        "tidings_log_lines_suppressed_total",
        "counter",
        "Log lines dropped by LOG_RATE_LIMIT (each kind's summary line says how many).",
        [("", suppressed_lines())],
    )
    _history(lines, node.broker.history_stats())
    _authorization(lines, node)
    gauges: list[tuple[str, str, float]] = [
        ("tidings_connections", "Open WebSocket connections.", len(node.sessions)),
        (
            "tidings_fragment_buffer_bytes",
            "Bytes of unfinished fragmented WebSocket messages (cap MAX_FRAGMENT_BUFFER_BYTES).",
            node.fragment_bytes,
        ),
        (
            "tidings_token_cache_bytes",
            "Estimated bytes of remembered tokens and claims (cap TOKEN_CACHE_BYTES).",
            node.verifier.cached_bytes,
        ),
        ("tidings_channels", "Channel groups with subscribers on this node.", len(node.hub.groups)),
        ("tidings_draining", "1 while the node drains connections.", int(node.draining)),
        ("tidings_start_time_seconds", "Start time of the node (Unix seconds).", node.started_at),
        (
            "tidings_queued_messages",
            "Messages waiting inside the server (published here, not yet fanned out; broker backlog).",
            monitor.queue_size(),
        ),
        (
            "tidings_broker_lag_seconds",
            "Age of the oldest message published here still waiting for its fan-out (0: none).",
            monitor.broker_lag(),
        ),
    ]
    for name, doc, value in gauges:
        _metric(lines, name, "gauge", doc, [("", value)])
    # Postgres Changes gauges: absent until the replication side has measured them.
    lag_bytes = node.replication_lag_bytes
    optional = (
        ("tidings_replication_lag_bytes", "WAL bytes the replication slot has not confirmed yet.", lag_bytes),
        (
            "tidings_replication_lag_seconds",
            "Seconds the change stream is behind.",
            m.replication_lag_seconds,
        ),
        ("tidings_replication_slot_bytes", "WAL bytes retained by the slot.", m.replication_slot_bytes),
    )
    for name, doc, maybe in optional:
        if maybe is not None:
            _metric(lines, name, "gauge", doc, [("", maybe)])
    _metric(
        lines,
        "tidings_alert_firing",
        "gauge",
        "1 while the alert fires.",
        [(f'{{alert="{name}"}}', int(name in monitor.alerts.active)) for name in ALERT_NAMES],
    )
    _histogram(
        lines,
        "tidings_heartbeat_rtt_seconds",
        "WebSocket ping/pong round trip of sampled active connections.",
        m.heartbeat_rtt,
    )
    _histogram(
        lines,
        "tidings_delivery_latency_seconds",
        "From handing a broadcast to the broker to the end of its local fan-out.",
        m.delivery_latency,
    )
    return "\n".join(lines) + "\n"
