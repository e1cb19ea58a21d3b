"""Reason strings the official clients understand (spec sections 1.3, 3.4, 8)."""

from __future__ import annotations

__all__ = [
    "CHANNEL_RATE_LIMIT",
    "CLIENT_JOIN_RATE_LIMIT",
    "CONNECTION_RATE_LIMIT",
    "DATABASE_UNAVAILABLE",
    "DATABASE_UNAVAILABLE_MESSAGE",
    "HTTP_API_KEY_MISSING",
    "HTTP_TOO_MANY_CONNECTED",
    "HTTP_TOO_MANY_JOINS",
    "HTTP_UNAUTHORIZED",
    "METRICS_TOKEN_REQUIRED",
    "MISSING_PARTITION",
    "PAYLOAD_TOO_LARGE",
    "POSTGRES_CHANGES_UNAVAILABLE",
    "PRESENCE_PAYLOAD_NOT_MAP",
    "PRESENCE_RATE_LIMIT",
    "REALTIME_RESTARTING",
    "REPLAY_FAILED",
    "REPLAY_PARAMS_INVALID",
    "RESUME_INVALID",
    "REPLICATION_NOT_READY",
    "REPLICATION_READY_MESSAGE",
    "TOO_MANY_MESSAGES",
    "TOPIC_NAME_REQUIRED",
    "TRACK_SIZE_EXCEEDED",
    "UNMATCHED_TOPIC",
    "UNKNOWN_ERROR",
    "presence_key_too_long",
    "read_permission_revoked_message",
    "token_expired_message",
    "token_too_large_message",
    "topic_name_too_long",
    "unauthorized_read_reason",
]

TOPIC_NAME_REQUIRED = "TopicNameRequired: You must provide a topic name"
CHANNEL_RATE_LIMIT = "ChannelRateLimitReached: Too many channels"
CONNECTION_RATE_LIMIT = "ConnectionRateLimitReached: Too many connected users"
CLIENT_JOIN_RATE_LIMIT = "ClientJoinRateLimitReached: Too many joins per second"
REALTIME_RESTARTING = "RealtimeRestarting: Realtime is restarting, please standby"
UNKNOWN_ERROR = "Unknown Error on Channel"
POSTGRES_CHANGES_UNAVAILABLE = (
    "RealtimeDisabledForConfiguration: Postgres Changes need a database; start Tidings with --database-url"
)
UNMATCHED_TOPIC = "unmatched topic"
PAYLOAD_TOO_LARGE = "payload_size_exceeded"
PRESENCE_PAYLOAD_NOT_MAP = "Presence track payload must be a map"

# In-channel shutdown messages (system error + phx_close).
TOO_MANY_MESSAGES = "Too many messages per second"
PRESENCE_RATE_LIMIT = "Client presence rate limit exceeded"
TRACK_SIZE_EXCEEDED = "Track message size exceeded"

# HTTP bodies for refused upgrades.
HTTP_API_KEY_MISSING = "API key is missing"
HTTP_TOO_MANY_CONNECTED = "Too many connected users"
HTTP_TOO_MANY_JOINS = "Too many joins per second"
HTTP_UNAUTHORIZED = "Unauthorized"
"""REST API: a token that does not verify (401), a private channel the token may not write (403)."""
METRICS_TOKEN_REQUIRED = "Unauthorized: a bearer token signed with METRICS_JWT_SECRET is required"

# Realtime Authorization (private channels; lib/realtime_web/channels/realtime_channel.ex).
DATABASE_UNAVAILABLE = "UnableToConnectToProject: Realtime was unable to connect to the project database"
DATABASE_UNAVAILABLE_MESSAGE = "Realtime was unable to connect to the project database"
"""In-channel shutdown message when permissions cannot be evaluated again (``access_token``)."""
MISSING_PARTITION = "MissingPartition: Realtime was unable to find the expected messages partition"

# Broadcast from Database and replay from realtime.messages (realtime_channel.ex).
RESUME_INVALID = "PostgresChangesResumeInvalid"
"""The code of the join error for a ``postgres_changes_options.resume`` that is not
``{since: <position>, epoch}`` (the reason goes on after a colon)."""
REPLAY_PARAMS_INVALID = "UnableToReplayMessages: Replay params are not valid"
"""The join error for a ``config.broadcast.replay`` that is not ``{since: <ms epoch>, limit}``."""
REPLAY_FAILED = "UnableToReplayMessages: Realtime was unable to replay messages"
"""The join error when the replay query failed (the database is unreachable, ...)."""
REPLICATION_READY_MESSAGE = "Replication connection established"
"""The ``system`` push of a ``replication_ready`` join once Broadcast from Database is live."""
REPLICATION_NOT_READY = "Replication connection was not established in time"
"""The shutdown message of a ``replication_ready`` join when the stream was not live in time."""


def unauthorized_read_reason(sub_topic: str) -> str:
    """The join error when a private channel's policies allow neither broadcast nor presence read."""
    return f"Unauthorized: You do not have permissions to read from this Channel topic: {sub_topic}"


def read_permission_revoked_message(sub_topic: str) -> str:
    """The shutdown message when a new ``access_token`` turns a read permission from allowed to denied."""
    return f"You no longer have permission to read from this Channel topic: {sub_topic}"


def topic_name_too_long(limit: int) -> str:
    """The join error for a channel name over ``MAX_TOPIC_LENGTH`` (Supabase has no such limit;
    the code follows its ``TopicNameRequired``)."""
    return f"TopicNameTooLong: Topic names are limited to {limit} bytes"


def presence_key_too_long(limit: int) -> str:
    """The join error for a ``config.presence.key`` over ``MAX_EVENT_LENGTH``."""
    return f"InvalidJoinPayload: Presence keys are limited to {limit} bytes"


def token_too_large_message(limit: int) -> str:
    """The message for a token over ``MAX_TOKEN_BYTES`` (HTTP body, join error, system push)."""
    return f"Token is larger than {limit} bytes"


def token_expired_message(seconds_ago: int) -> str:
    """The message Supabase sends when a channel's token expired ``seconds_ago`` seconds ago."""
    return f"Token has expired {seconds_ago} seconds ago"
