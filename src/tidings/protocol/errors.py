"""Reason strings the official clients understand (spec sections 1.3, 3.4, 8)."""

from __future__ import annotations

__all__ = [
    "CHANNEL_RATE_LIMIT",
    "CLIENT_JOIN_RATE_LIMIT",
    "CONNECTION_RATE_LIMIT",
    "HTTP_API_KEY_MISSING",
    "HTTP_TOO_MANY_CONNECTED",
    "HTTP_TOO_MANY_JOINS",
    "PAYLOAD_TOO_LARGE",
    "POSTGRES_CHANGES_UNAVAILABLE",
    "PRESENCE_PAYLOAD_NOT_MAP",
    "PRESENCE_RATE_LIMIT",
    "REALTIME_RESTARTING",
    "TOO_MANY_MESSAGES",
    "TOPIC_NAME_REQUIRED",
    "TRACK_SIZE_EXCEEDED",
    "UNMATCHED_TOPIC",
    "UNKNOWN_ERROR",
    "token_expired_message",
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


def token_expired_message(seconds_ago: int) -> str:
    """The message Supabase sends when a channel's token expired ``seconds_ago`` seconds ago."""
    return f"Token has expired {seconds_ago} seconds ago"
