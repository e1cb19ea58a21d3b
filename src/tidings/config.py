"""Every knob once: environment variable, CLI flag, TOML key, default and a line of doc.

Precedence: CLI flag > environment variable > TOML file (``--config`` / ``TIDINGS_CONFIG``) > default.
A bad value fails at start with one line naming the setting (:class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from tidings.auth.policy import ChannelPolicy

__all__ = [
    "SECRET_PASSWORD",
    "SECRET_VALUE",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "format_duration",
    "load_config",
]


class ConfigError(ValueError):
    """A setting with a bad value; ``str()`` is the one line to print."""


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration_and_unit(value: str) -> tuple[float, str | None]:
    """Seconds from ``"30s"``, ``"250ms"``, ``"2m"``, and the unit written (``None`` when bare)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 250ms, or milliseconds)")
    return float(m.group(1)) * _UNITS[m.group(2) or "ms"], m.group(2)


def _duration(value: str) -> float:
    """Seconds from ``"30s"``, ``"250ms"``, ``"2m"``; a bare number is milliseconds (the guide's unit)."""
    return _duration_and_unit(value)[0]


def format_duration(seconds: float) -> str:
    """``30.0`` -> ``"30s"``, ``0.5`` -> ``"500ms"``, ``300.0`` -> ``"5m"``: how durations are shown."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{round(seconds, 3):g}s"


@dataclasses.dataclass(frozen=True, slots=True)
class _Duration:
    """Parser of a duration setting.

    A bare number is milliseconds (the guide's ``HEARTBEAT_INTERVAL: 30000``). A bare number that
    is not 0 and below ``bare_min`` seconds is refused: ``HEARTBEAT_INTERVAL=30`` almost surely
    means 30 s, not 30 ms. Written with a unit, any value is taken as meant.
    """

    allow_zero: bool
    bare_min: float = 0.0

    def __call__(self, value: str) -> float:
        seconds, unit = _duration_and_unit(value)
        if seconds < 0 or (seconds == 0 and not self.allow_zero):
            raise ValueError("must be > 0" if not self.allow_zero else "must be >= 0")
        if unit is None and 0 < seconds < self.bare_min:
            number = value.strip()
            raise ValueError(
                f"a bare number is milliseconds, and {number} ms is implausible here (under "
                f"{format_duration(self.bare_min)}): write {number}s, or {number}ms if you mean it"
            )
        return seconds


def _int(value: str) -> int:
    try:
        return int(value.replace("_", ""))
    except ValueError:
        raise ValueError("expected an integer") from None


def _non_negative_int(value: str) -> int:
    n = _int(value)
    if n < 0:
        raise ValueError("must be >= 0")
    return n


def _positive_int(value: str) -> int:
    n = _int(value)
    if n <= 0:
        raise ValueError("must be > 0")
    return n


_positive_duration = _Duration(allow_zero=False)
_non_negative_duration = _Duration(allow_zero=True)


def _port(value: str) -> int:
    try:
        n = _int(value)
    except ValueError:
        raise ValueError("expected a port number 0-65535") from None
    if not 0 <= n <= 65535:
        raise ValueError("must be a port number 0-65535")
    return n


def _bool(value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _str(value: str) -> str:
    return value


def _fraction(value: str) -> float:
    """A rate: ``0.05`` or ``5%``."""
    text = value.strip()
    try:
        f = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError("expected a fraction such as 0.1 or 10%") from None
    if not 0.0 <= f <= 1.0:
        raise ValueError("must be between 0 and 1 (or 0% and 100%)")
    return f


def _optional_str(value: str) -> str | None:
    return value or None


@dataclasses.dataclass(frozen=True, slots=True)
class _Choice:
    """Parser of a setting with a fixed set of (lower-case) values."""

    options: tuple[str, ...]

    def __call__(self, value: str) -> str:
        low = value.strip().lower()
        if low not in self.options:
            raise ValueError(f"must be one of {', '.join(self.options)}")
        return low


def _choice(*options: str) -> Callable[[str], str]:
    return _Choice(options)


def _json_object(value: str, what: str = "a JSON object") -> dict[str, Any] | None:
    if not value:
        return None
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"expected {what} as JSON text, got invalid JSON (at character {exc.pos + 1})"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected {what}, got JSON {type(obj).__name__}")
    return obj


def _channel_policy(value: str) -> ChannelPolicy | None:
    """The declarative policy of private channels (:func:`tidings.auth.policy.parse_channel_policy`)."""
    from tidings.auth.policy import parse_channel_policy

    if not value.strip():
        return None
    return parse_channel_policy(value)


def _database_url(value: str) -> str | None:
    """A PostgreSQL URL (``postgresql://`` or ``postgres://``) or a libpq ``key=value`` string."""
    text = value.strip()
    if not text:
        return None
    scheme = text.split("://", 1)[0].lower() if "://" in text else None
    if scheme in ("postgresql", "postgres") or (scheme is None and re.match(r"\w+\s*=", text)):
        return text
    raise ValueError("expected a PostgreSQL URL: postgresql://user:password@host:5432/database")


def _address_list(value: str) -> str:
    """Comma-separated IP addresses and networks (``10.0.0.0/8``), normalised; empty is none."""
    import ipaddress

    items = [item.strip() for item in value.split(",") if item.strip()]
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"not an IP address or network: {item!r}") from None
    return ",".join(items)


def _origin_list(value: str) -> str:
    """``*`` or comma-separated origins (``https://app.example.com``, ``https://*.example.com``)."""
    items = [item.strip().rstrip("/").lower() for item in value.split(",") if item.strip()]
    if not items:
        raise ValueError("must be * or a list of origins")
    for item in items:
        if item != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", item):
            raise ValueError(f"not an origin (scheme://host[:port]): {item!r}")
    return "*" if "*" in items else ",".join(items)


def _jwks(value: str) -> dict[str, Any] | None:
    obj = _json_object(value, 'a JSON Web Key Set ({"keys": [...]})')
    if obj is not None:
        import jwt

        try:  # a set PyJWT cannot use must fail here, not as a traceback at startup
            jwt.PyJWKSet.from_dict(obj)
        except jwt.exceptions.PyJWTError as exc:
            raise ValueError(f"not a usable JSON Web Key Set: {exc}") from None
    return obj


#: :attr:`Setting.secret` kinds: the whole value is secret / the password of a URL is.
SECRET_VALUE = "value"
SECRET_PASSWORD = "password"


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One knob: its field name, env var, parser and doc line."""

    field: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    doc: str
    #: :data:`SECRET_VALUE` (the value is a secret) or :data:`SECRET_PASSWORD` (a URL whose
    #: password is): never logged, masked by ``check-config``. "" for the rest.
    secret: str = ""

    @property
    def flag(self) -> str:
        """The CLI flag, e.g. ``--max-connections``."""
        return "--" + self.field.replace("_", "-")

    @property
    def toml_key(self) -> str:
        """The key in the TOML file (top level or under ``[tidings]``)."""
        return self.field

    @property
    def is_duration(self) -> bool:
        """True for durations: values in seconds, written with units (``30s``), bare = milliseconds."""
        return isinstance(self.parse, _Duration)

    @property
    def metavar(self) -> str:
        """What the value is, for ``--help``: ``INTEGER``, ``DURATION``, ``[plain|json]``, ..."""
        if isinstance(self.parse, _Duration):
            return "DURATION"
        if isinstance(self.parse, _Choice):
            return "[" + "|".join(self.parse.options) + "]"
        known = _METAVARS.get(self.parse)
        if known:
            return known
        if self.field.endswith("_url"):
            return "URL"
        if isinstance(self.default, bool):
            return "BOOLEAN"
        if isinstance(self.default, int):
            return "INTEGER"
        if isinstance(self.default, float):
            return "NUMBER"
        return "TEXT"

    def show(self, value: Any) -> str:
        """``value`` as the docs, ``--help`` and ``check-config`` show it (durations with their unit)."""
        if value is None:
            return "(unset)"
        if self.is_duration:
            return format_duration(float(value))
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, dict):
            return json.dumps(value)
        return str(value)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "host",
        "HOST",
        _str,
        "0.0.0.0",
        "Address to listen on. In open mode (no JWT_SECRET or JWT_JWKS) 127.0.0.1 unless set.",
    ),
    Setting("port", "PORT", _port, 4000, "TCP port for WebSocket and HTTP."),
    Setting(
        "max_connections",
        "MAX_CONNECTIONS",
        _positive_int,
        10_000,
        "WebSocket connections per process; beyond it the upgrade is refused with 503.",
    ),
    Setting(
        "max_connections_per_user",
        "MAX_CONNECTIONS_PER_USER",
        _non_negative_int,
        100,
        "Connections per JWT `sub` (0 = unlimited); beyond it the upgrade gets 429.",
    ),
    Setting(
        "max_connections_per_ip",
        "MAX_CONNECTIONS_PER_IP",
        _non_negative_int,
        1_000,
        "Open TCP connections (HTTP and WebSocket) per client address (0 = unlimited); beyond it 429.",
    ),
    Setting(
        "max_anonymous_connections_per_ip",
        "MAX_ANONYMOUS_CONNECTIONS_PER_IP",
        _non_negative_int,
        100,
        "WebSocket connections per client address whose token has no `sub` (anon key; 0 = unlimited); "
        "beyond it the upgrade gets 429.",
    ),
    Setting(
        "trusted_proxies",
        "TRUSTED_PROXIES",
        _address_list,
        "127.0.0.1,::1",
        "Proxies (IPs or networks, comma-separated) whose X-Forwarded-For names the client: their own "
        "connections are not capped per address, their WebSocket upgrades count for the forwarded client.",
    ),
    Setting(
        "max_channels_per_client",
        "MAX_CHANNELS_PER_CLIENT",
        _positive_int,
        100,
        "Channels one connection may join (join error ChannelRateLimitReached).",
    ),
    Setting(
        "max_joins_per_second",
        "MAX_JOINS_PER_SECOND",
        _positive_int,
        1_000,
        "Joins per second on this node, averaged over 10 s (join error ClientJoinRateLimitReached).",
    ),
    Setting(
        "max_messages_per_second",
        "MAX_MESSAGES_PER_SECOND",
        _positive_int,
        100,
        "Broadcasts per second one client may send (one second of burst); other messages: 10x.",
    ),
    Setting(
        "max_node_messages_per_second",
        "MAX_NODE_MESSAGES_PER_SECOND",
        _positive_int,
        50_000,
        "Client messages per second on this node, all clients together.",
    ),
    Setting(
        "max_payload_size_kb",
        "MAX_PAYLOAD_SIZE_KB",
        _positive_int,
        1_000,
        "Largest broadcast/presence payload in KB (broadcast dropped, REST 422).",
    ),
    Setting(
        "max_topic_length",
        "MAX_TOPIC_LENGTH",
        _positive_int,
        255,
        "Longest channel name (topic after `realtime:`) in bytes; a longer join gets the join error "
        "TopicNameTooLong.",
    ),
    Setting(
        "max_event_length",
        "MAX_EVENT_LENGTH",
        _positive_int,
        255,
        "Longest broadcast event name in bytes; a broadcast with a longer one is dropped as malformed.",
    ),
    Setting(
        "max_frame_size",
        "MAX_FRAME_SIZE",
        _positive_int,
        1_048_576,
        "Largest WebSocket message in bytes; a bigger one closes the connection with 1009.",
    ),
    Setting(
        "fragment_timeout",
        "FRAGMENT_TIMEOUT",
        _positive_duration,
        10.0,
        "A fragmented WebSocket message must end within this time, or the connection is closed (1008).",
    ),
    Setting(
        "max_fragment_buffer_bytes",
        "MAX_FRAGMENT_BUFFER_BYTES",
        _positive_int,
        67_108_864,
        "Bytes of unfinished fragmented messages buffered by the whole process; the connection whose "
        "fragment would exceed it is closed (1009).",
    ),
    Setting(
        "max_unsent_bytes",
        "MAX_UNSENT_BYTES",
        _positive_int,
        1_048_576,
        "Unsent bytes per connection before it is closed as a slow consumer (1013).",
    ),
    Setting(
        "max_request_head",
        "MAX_REQUEST_HEAD",
        _positive_int,
        32_768,
        "Largest HTTP request head in bytes (request line and headers, also of WebSocket upgrades); "
        "beyond it 431.",
    ),
    Setting(
        "max_request_url",
        "MAX_REQUEST_URL",
        _positive_int,
        8_192,
        "Longest request URL (path and query) in bytes; beyond it 414.",
    ),
    Setting(
        "max_request_body",
        "MAX_REQUEST_BODY",
        _positive_int,
        2_097_152,
        "Largest HTTP request body in bytes (Content-Length or chunked); beyond it 413. At least "
        "MAX_PAYLOAD_SIZE_KB + 64 KB, so that the largest REST broadcast fits.",
    ),
    Setting(
        "request_head_timeout",
        "REQUEST_HEAD_TIMEOUT",
        _positive_duration,
        10.0,
        "Time a client has for each request head (every request of a keep-alive connection, and the "
        "WebSocket upgrade) once the server waits for it; then the connection is closed.",
    ),
    Setting(
        "request_body_timeout",
        "REQUEST_BODY_TIMEOUT",
        _positive_duration,
        30.0,
        "Time from the end of a request head to the end of its body; then 408 and the connection is closed.",
    ),
    Setting(
        "slow_consumer_timeout",
        "SLOW_CONSUMER_TIMEOUT",
        _positive_duration,
        15.0,
        "A connection still holding a join's catch-up (replay, presence_state) beyond MAX_UNSENT_BYTES "
        "that reads none of it for this long is closed (1013).",
    ),
    Setting(
        "heartbeat_interval",
        "HEARTBEAT_INTERVAL",
        _Duration(allow_zero=False, bare_min=1.0),
        30.0,
        "Expected client heartbeat interval; a connection silent for 2x this is closed. "
        "Bare numbers are milliseconds (30000), or use units (30s).",
    ),
    Setting(
        "connect_error_backoff",
        "CONNECT_ERROR_BACKOFF_MS",
        _non_negative_duration,
        2.0,
        "Delay before a refused WebSocket upgrade is answered (slows retry storms).",
    ),
    Setting(
        "channel_error_backoff",
        "CHANNEL_ERROR_BACKOFF_MS",
        _non_negative_duration,
        5.0,
        "Delay before a join error reply is sent (both clients retry joins).",
    ),
    Setting(
        "max_pending_join_errors",
        "MAX_PENDING_JOIN_ERRORS",
        _non_negative_int,
        16,
        "Join error replies one connection may have waiting out CHANNEL_ERROR_BACKOFF_MS; "
        "further ones are sent at once.",
    ),
    Setting(
        "drain_window",
        "DRAIN_WINDOW",
        _Duration(allow_zero=True, bare_min=0.1),
        10.0,
        "On SIGTERM, connections are closed (1012) in batches spread over this window.",
    ),
    Setting(
        "jwt_secret",
        "JWT_SECRET",
        _optional_str,
        None,
        "HS256/384/512 secret. Unset (and no JWKS): the server is open to everyone.",
        secret=SECRET_VALUE,
    ),
    Setting(
        "jwt_jwks",
        "JWT_JWKS",
        _jwks,
        None,
        "JSON Web Key Set (JSON text) for RS/ES/PS/EdDSA tokens, matched by `kid`.",
    ),
    Setting(
        "jwt_claim_validators",
        "JWT_CLAIM_VALIDATORS",
        _json_object,
        None,
        'Claims that must match, as JSON, e.g. {"iss":"supabase"}.',
    ),
    Setting(
        "channel_policy",
        "CHANNEL_POLICY",
        _channel_policy,
        None,
        "Without DATABASE_URL: who may join private channels, as JSON rules of topic patterns bound to "
        'claims, e.g. [{"topic":"user:{sub}","read":true,"write":true}] (docs/authorization.md). '
        "Unset: private channels are denied to every role but service_role.",
    ),
    Setting(
        "allowed_origins",
        "ALLOWED_ORIGINS",
        _origin_list,
        "*",
        "Browser origins allowed for WebSocket upgrades (others get 403) and REST CORS: * or a comma "
        "list such as https://app.example.com,https://*.example.com.",
    ),
    Setting(
        "metrics_jwt_secret",
        "METRICS_JWT_SECRET",
        _optional_str,
        None,
        "When set, /metrics, /api/metrics and the dashboard need a bearer JWT signed with it (HS256); "
        "unset, they are open but never name private channels.",
        secret=SECRET_VALUE,
    ),
    Setting(
        "max_token_bytes",
        "MAX_TOKEN_BYTES",
        _positive_int,
        16_384,
        "Longest accepted JWT (apikey, access_token) in bytes; longer ones are refused (401, join error).",
    ),
    Setting(
        "token_cache_bytes",
        "TOKEN_CACHE_BYTES",
        _non_negative_int,
        8_388_608,
        "Bytes of verified tokens and their claims remembered to skip repeated signature checks.",
    ),
    Setting(
        "history_size",
        "HISTORY_SIZE",
        _non_negative_int,
        100,
        "Broadcasts kept per channel for recovery on rejoin (0 = no history).",
    ),
    Setting(
        "history_ttl",
        "HISTORY_TTL",
        _Duration(allow_zero=False, bare_min=1.0),
        300.0,
        "How long broadcasts stay in a channel's history.",
    ),
    Setting(
        "history_max_channels",
        "HISTORY_MAX_CHANNELS",
        _positive_int,
        100_000,
        "Channels with history in one process (memory broker). Beyond it, a sender holding over a "
        "tenth of them loses its own least recently active ones, else the least recently active "
        "channel without subscribers goes; its rejoins then get recovered: false.",
    ),
    Setting(
        "history_max_bytes",
        "HISTORY_MAX_BYTES",
        _positive_int,
        67_108_864,
        "Estimated bytes of channel history in one process (memory broker), evicted like "
        "HISTORY_MAX_CHANNELS (a channel holding over a tenth of it first trims its own oldest).",
    ),
    Setting(
        "replay_max",
        "REPLAY_MAX",
        _positive_int,
        100,
        "Most messages a rejoin may replay (Supabase uses 25).",
    ),
    Setting(
        "database_url",
        "DATABASE_URL",
        _database_url,
        None,
        "PostgreSQL for Postgres Changes (postgresql://user:pass@host/db); needs wal_level=logical.",
        secret=SECRET_PASSWORD,
    ),
    Setting(
        "db_pool_size",
        "DB_POOL_SIZE",
        _positive_int,
        5,
        "Connections for catalog queries of Postgres Changes, and (a pool of its own) for the "
        "permission checks of private channels (Realtime Authorization).",
    ),
    Setting(
        "db_ssl", "DB_SSL", _bool, False, "Require TLS to PostgreSQL (unless DATABASE_URL sets sslmode)."
    ),
    Setting(
        "db_publication",
        "DB_PUBLICATION",
        _str,
        "supabase_realtime",
        "Publication streamed (created FOR ALL TABLES when missing).",
    ),
    Setting(
        "db_slot",
        "DB_SLOT",
        _str,
        "tidings_slot",
        "Permanent logical replication slot (pgoutput); drop it when retiring Tidings.",
    ),
    Setting(
        "db_messages_slot",
        "DB_MESSAGES_SLOT",
        _optional_str,
        None,
        "Permanent slot of Broadcast from Database (INSERTs of realtime.messages); unset: "
        "`<DB_SLOT>_messages`. Drop it when retiring Tidings.",
    ),
    Setting(
        "db_broadcast_rate",
        "DB_BROADCAST_RATE",
        _positive_int,
        10_000,
        "Broadcast from Database: rows delivered per second at most (one second of burst); beyond "
        "it the stream waits and PostgreSQL keeps the rows in the slot.",
    ),
    Setting(
        "replication_ready_timeout",
        "REPLICATION_READY_TIMEOUT",
        _Duration(allow_zero=False, bare_min=1.0),
        60.0,
        "A join with broadcast.replication_ready waits this long for Broadcast from Database to be "
        "live, then its channel is closed with 'Replication connection was not established in time'.",
    ),
    Setting(
        "db_resume_grace",
        "DB_RESUME_GRACE",
        _Duration(allow_zero=True, bare_min=0.1),
        5.0,
        "After a start, clients get this long to rejoin before the slot replays what they missed "
        "(no wait for a new slot, or one with nothing to replay); 'Subscribed to PostgreSQL' comes "
        "when it ends.",
    ),
    Setting(
        "db_rls",
        "DB_RLS",
        _bool,
        True,
        "Postgres Changes of tables with row level security go only to subscribers whose JWT role and "
        "claims may SELECT the row (a query per run of changes and distinct claims), and a DELETE "
        "keeps only the key, as Supabase does. false sends every row to everyone who binds to the "
        "table: unsafe for tables with row level security.",
    ),
    Setting(
        "db_change_log_size",
        "DB_CHANGE_LOG_SIZE",
        _non_negative_int,
        10_000,
        "Postgres Changes kept per table so rejoining clients resume where they left off (memory, "
        "or a Redis stream with REDIS_URL); 0 = no log (every resume is recovered: false).",
    ),
    Setting(
        "db_change_log_bytes",
        "DB_CHANGE_LOG_BYTES",
        _positive_int,
        16_777_216,
        "Estimated bytes of the change log per table (the JSON of the changes); the oldest go first.",
    ),
    Setting(
        "db_change_log_ttl",
        "DB_CHANGE_LOG_TTL",
        _Duration(allow_zero=False, bare_min=1.0),
        600.0,
        "How long a change stays in the change log: a client away longer resumes with recovered: false.",
    ),
    Setting(
        "db_replay_max_changes",
        "DB_REPLAY_MAX_CHANGES",
        _positive_int,
        1_000,
        "Most changes one resume (or one GET /api/changes page) sends; beyond it the resume says "
        "recovered: false (the page ends there).",
    ),
    Setting(
        "db_replay_max_bytes",
        "DB_REPLAY_MAX_BYTES",
        _positive_int,
        4_194_304,
        "Most bytes of changes one resume (or one GET /api/changes page) sends, as DB_REPLAY_MAX_CHANGES.",
    ),
    Setting(
        "redis_url",
        "REDIS_URL",
        _optional_str,
        None,
        "Redis for scale-out (redis://host:port/db): nodes share channels, history and presence. "
        "A Redis Cluster node is detected and used with sharded pub/sub.",
        secret=SECRET_PASSWORD,
    ),
    Setting(
        "node_timeout",
        "NODE_TIMEOUT",
        _Duration(allow_zero=False, bare_min=1.0),
        10.0,
        "With REDIS_URL: a node silent this long is dead and its presence is removed (e.g. 10s).",
    ),
    Setting(
        "workers",
        "WORKERS",
        _positive_int,
        1,
        "Worker processes sharing the port (more than 1 needs REDIS_URL).",
    ),
    Setting(
        "alert_p95_latency",
        "ALERT_P95_LATENCY",
        _Duration(allow_zero=False, bare_min=0.001),
        0.5,
        "Alert when p95 heartbeat RTT or delivery latency exceeds this (bare numbers are ms).",
    ),
    Setting(
        "alert_reconnect_rate",
        "ALERT_RECONNECT_RATE",
        _fraction,
        0.1,
        "Alert when more than this share of connections reconnected within ALERT_WINDOW (0.1 or 10%).",
    ),
    Setting(
        "alert_failure_rate",
        "ALERT_FAILURE_RATE",
        _fraction,
        0.05,
        "Alert when more than this share of messages failed (malformed, rate-limited, too large).",
    ),
    Setting(
        "alert_queue_size",
        "ALERT_QUEUE_SIZE",
        _non_negative_int,
        50,
        "Alert when more messages than this wait inside the server (broker backlog).",
    ),
    Setting(
        "alert_window",
        "ALERT_WINDOW",
        _Duration(allow_zero=False, bare_min=1.0),
        60.0,
        "Sliding window of the alert figures and of /api/metrics percentiles and rates.",
    ),
    Setting(
        "alert_webhook_url",
        "ALERT_WEBHOOK_URL",
        _optional_str,
        None,
        "POST alert transitions (firing/resolved) as JSON to this URL.",
        secret=SECRET_VALUE,
    ),
    Setting("log_level", "LOG_LEVEL", _choice("debug", "info", "warning", "error"), "info", "Log level."),
    Setting("log_format", "LOG_FORMAT", _choice("plain", "json"), "plain", "Log line format."),
    Setting(
        "log_rate_limit",
        "LOG_RATE_LIMIT",
        _non_negative_int,
        20,
        "Lines of one kind (logger, level and message template) written per 10 s (0 = unlimited); "
        "the rest are counted and summarised in one line.",
    ),
)

_BY_FIELD = {s.field: s for s in SETTINGS}
_BY_ENV = {s.env: s for s in SETTINGS}
_METAVARS: dict[Callable[[str], Any], str] = {
    _int: "INTEGER",
    _non_negative_int: "INTEGER",
    _positive_int: "INTEGER",
    _port: "INTEGER",
    _bool: "BOOLEAN",
    _fraction: "FRACTION",
    _json_object: "JSON",
    _channel_policy: "JSON",
    _jwks: "JSON",
    _database_url: "URL",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The effective settings (see :data:`SETTINGS` for their docs)."""

    host: str = "0.0.0.0"
    port: int = 4000
    max_connections: int = 10_000
    max_connections_per_user: int = 100
    max_connections_per_ip: int = 1_000
    max_anonymous_connections_per_ip: int = 100
    trusted_proxies: str = "127.0.0.1,::1"
    max_channels_per_client: int = 100
    max_joins_per_second: int = 1_000
    max_messages_per_second: int = 100
    max_node_messages_per_second: int = 50_000
    max_payload_size_kb: int = 1_000
    max_topic_length: int = 255
    max_event_length: int = 255
    max_frame_size: int = 1_048_576
    fragment_timeout: float = 10.0
    max_fragment_buffer_bytes: int = 67_108_864
    max_unsent_bytes: int = 1_048_576
    max_request_head: int = 32_768
    max_request_url: int = 8_192
    max_request_body: int = 2_097_152
    request_head_timeout: float = 10.0
    request_body_timeout: float = 30.0
    slow_consumer_timeout: float = 15.0
    heartbeat_interval: float = 30.0
    connect_error_backoff: float = 2.0
    channel_error_backoff: float = 5.0
    max_pending_join_errors: int = 16
    drain_window: float = 10.0
    jwt_secret: str | None = None
    jwt_jwks: dict[str, Any] | None = None
    jwt_claim_validators: dict[str, Any] | None = None
    channel_policy: ChannelPolicy | None = None
    allowed_origins: str = "*"
    metrics_jwt_secret: str | None = None
    max_token_bytes: int = 16_384
    token_cache_bytes: int = 8_388_608
    history_size: int = 100
    history_ttl: float = 300.0
    history_max_channels: int = 100_000
    history_max_bytes: int = 67_108_864
    replay_max: int = 100
    database_url: str | None = None
    db_pool_size: int = 5
    db_ssl: bool = False
    db_publication: str = "supabase_realtime"
    db_slot: str = "tidings_slot"
    db_messages_slot: str | None = None
    db_broadcast_rate: int = 10_000
    replication_ready_timeout: float = 60.0
    db_resume_grace: float = 5.0
    db_rls: bool = True
    db_change_log_size: int = 10_000
    db_change_log_bytes: int = 16_777_216
    db_change_log_ttl: float = 600.0
    db_replay_max_changes: int = 1_000
    db_replay_max_bytes: int = 4_194_304
    redis_url: str | None = None
    node_timeout: float = 10.0
    workers: int = 1
    alert_p95_latency: float = 0.5
    alert_reconnect_rate: float = 0.1
    alert_failure_rate: float = 0.05
    alert_queue_size: int = 50
    alert_window: float = 60.0
    alert_webhook_url: str | None = None
    log_level: str = "info"
    log_format: str = "plain"
    log_rate_limit: int = 20

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (already-typed values)."""
        return dataclasses.replace(self, **changes)

    def secret_values(self) -> list[str | None]:
        """The values of the secret settings (:attr:`Setting.secret`), for the log redactor."""
        return [getattr(self, s.field) for s in SETTINGS if s.secret]

    def describe(self) -> list[tuple[str, str, str]]:
        """``(ENV_VAR, value, doc)`` rows; secrets are masked."""
        rows = []
        for s in SETTINGS:
            value = getattr(self, s.field)
            if s.secret == SECRET_VALUE and value:
                shown = "(set)"
            elif s.secret == SECRET_PASSWORD and value:
                shown = _mask_password(str(value))
            else:
                shown = s.show(value)
            rows.append((s.env, shown, s.doc))
        return rows


def _mask_password(url: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host`` (and ``password=...`` in DSNs)."""
    url = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(password=)\S+", r"\1***", url)


def _parse(setting: Setting, raw: Any, source: str) -> Any:
    if raw is None:
        return None
    text = (
        json.dumps(raw)
        if isinstance(raw, dict | list)
        else str(raw).lower()
        if isinstance(raw, bool)
        else str(raw)
    )
    try:
        return setting.parse(text)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"invalid {setting.env} ({source}): {raw!r}: {exc}") from None


def _did_you_mean(key: str) -> str:
    """`` (did you mean 'max_connections'?)`` for a TOML key that is close to a setting's, else ``""``."""
    by_env = _BY_ENV.get(key.upper())
    if by_env is not None:  # the environment variable's name used as a key
        return f" (did you mean {by_env.toml_key!r}?)"
    close = difflib.get_close_matches(key.lower().replace("-", "_"), list(_BY_FIELD), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    toml_path: str | None = None,
) -> Config:
    """Resolve every setting from CLI values, the environment and an optional TOML file."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    toml_path = toml_path or environ.get("TIDINGS_CONFIG")
    if toml_path:
        try:
            with open(toml_path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"invalid TIDINGS_CONFIG ({toml_path}): {exc}") from None
        table = data.get("tidings", data)
        for key, raw in table.items():
            setting = _BY_FIELD.get(key)
            if setting is None:
                raise ConfigError(f"unknown setting {key!r} in {toml_path}{_did_you_mean(key)}")
            values[key] = _parse(setting, raw, toml_path)
    for s in SETTINGS:
        if s.env in environ:
            values[s.field] = _parse(s, environ[s.env], "environment")
    for key, raw in (cli or {}).items():
        if raw is not None:
            values[key] = _parse(_BY_FIELD[key], raw, _BY_FIELD[key].flag)
    if "host" not in values and not values.get("jwt_secret") and not values.get("jwt_jwks"):
        values["host"] = "127.0.0.1"  # open mode: only this machine, unless a host is given
    config = Config(**values)
    body_floor = config.max_payload_size_kb * 1024 + 65_536
    if config.max_request_body < body_floor:
        raise ConfigError(
            f"invalid MAX_REQUEST_BODY: {config.max_request_body} is below MAX_PAYLOAD_SIZE_KB + 64 KB "
            f"({body_floor}); the largest REST broadcast would not fit"
        )
    if config.workers > 1 and not config.redis_url:
        raise ConfigError(f"invalid WORKERS: {config.workers} workers need REDIS_URL to share channels")
    if config.redis_url and not _redis_url_ok(config.redis_url):
        raise ConfigError(
            f"invalid REDIS_URL: {_mask_password(config.redis_url)!r} (use redis://host:port/db)"
        )
    return config


def _redis_url_ok(url: str) -> bool:
    """``redis://``, ``rediss://`` or ``unix://``, with a numeric port and database when given."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return True
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        return False
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    db = parts.path.strip("/")
    return not db or db.isdigit()
