"""``phx_join`` payload -> typed :class:`JoinConfig`, or a :class:`JoinError` with the exact reason.

Validation is lenient as Supabase's is: a field of the wrong type is logged by the caller (see
``JoinConfig.warnings``) and its default is used; only what makes the join meaningless is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import errors
from .positions import ChangesResume, PositionError

__all__ = [
    "MAX_NAME_BYTES",
    "TOPIC_PREFIX",
    "JoinConfig",
    "JoinError",
    "Replay",
    "name_too_long",
    "parse_bool",
    "parse_join",
]

TOPIC_PREFIX = "realtime:"
MAX_NAME_BYTES = 255  # default MAX_TOPIC_LENGTH and MAX_EVENT_LENGTH; binary frames allow no more


class JoinError(Exception):
    """A join refused with ``reason`` (``"<Code>: <message>"``); ``too_long``: for a name's size."""

    def __init__(self, reason: str, too_long: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_long = too_long


@dataclasses.dataclass(frozen=True, slots=True)
class Replay:
    """Messages asked for at join: by time (``since`` ms epoch) and/or sequence (``since_seq``).

    ``epoch`` is the channel epoch the client got with ``since_seq`` (Tidings' join reply and
    history answers carry it); a replay from another epoch is never ``recovered``. ``limit`` is
    at least 1, or None when not given; the session clamps it (the ``REPLAY_MAX`` setting for
    ``since_seq``, 25 for ``since``, as Supabase).
    """

    since: int | None
    since_seq: int | None
    limit: int | None
    epoch: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class JoinConfig:
    """A validated ``phx_join``."""

    topic: str
    sub_topic: str
    private: bool = False
    broadcast_self: bool = False
    broadcast_ack: bool = False
    presence_key: str = ""
    presence_enabled: bool = False
    postgres_changes: tuple[dict[str, Any], ...] = ()
    access_token: str | None = None
    replay: Replay | None = None
    #: ``postgres_changes_options.wait``: hold the join reply until the subscription is live.
    changes_wait: bool = False
    changes_wait_timeout: float = 15.0
    #: ``postgres_changes_options.resume`` (Tidings): resume Postgres Changes after a position.
    changes_resume: ChangesResume | None = None
    #: ``broadcast.replication_ready``: push ``system`` once Broadcast from Database is live.
    replication_ready: bool = False
    warnings: tuple[str, ...] = ()


def parse_bool(value: object, default: bool = False) -> bool | None:
    """JSON booleans or the strings ``"true"``/``"false"`` (any case); ``None`` when neither."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "true":
            return True
        if low == "false":
            return False
    return None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text.startswith("-") else text
        if digits.isascii() and digits.isdigit():
            return int(text)
    return None


def name_too_long(name: str, limit: int) -> bool:
    """True when ``name`` takes more than ``limit`` bytes in UTF-8 (no encoding for ASCII names)."""
    if len(name) > limit:
        return True
    return not name.isascii() and len(name.encode("utf-8", "surrogatepass")) > limit


def parse_join(
    topic: str,
    payload: dict[str, Any],
    max_topic_bytes: int = MAX_NAME_BYTES,
    max_key_bytes: int = MAX_NAME_BYTES,
) -> JoinConfig:
    """Validate a join request; raises :class:`JoinError` when it must be refused.

    ``max_topic_bytes`` caps the channel name (the topic after ``realtime:``, ``MAX_TOPIC_LENGTH``)
    and ``max_key_bytes`` the presence key (``MAX_EVENT_LENGTH``): both are kept for as long as
    the channel lives and sent to every member, so a client may not make them any size.
    """
    if not topic.startswith(TOPIC_PREFIX):
        raise JoinError(errors.UNMATCHED_TOPIC)
    sub_topic = topic[len(TOPIC_PREFIX) :]
    if not sub_topic:
        raise JoinError(errors.TOPIC_NAME_REQUIRED)
    if name_too_long(sub_topic, max_topic_bytes):
        raise JoinError(errors.topic_name_too_long(max_topic_bytes), too_long=True)
    warnings: list[str] = []

    def flag(container: dict[str, Any], key: str, where: str) -> bool:
        got = parse_bool(container.get(key))
        if got is None:
            warnings.append(f"{where}.{key} is not a boolean; using false")
            return False
        return got

    config = payload.get("config")
    if not isinstance(config, dict):
        if config is not None:
            warnings.append("config is not an object; using defaults")
        config = {}
    broadcast = config.get("broadcast")
    if not isinstance(broadcast, dict):
        broadcast = {}
    presence = config.get("presence")
    if not isinstance(presence, dict):
        presence = {}

    key = presence.get("key", "")
    presence_key = "" if key is None else key if isinstance(key, str) else str(key)
    if name_too_long(presence_key, max_key_bytes):
        raise JoinError(errors.presence_key_too_long(max_key_bytes), too_long=True)

    pg = config.get("postgres_changes") or []
    if not isinstance(pg, list):
        warnings.append("postgres_changes is not a list; ignoring it")
        pg = []
    bindings = tuple(b for b in pg if b is not None)
    for b in bindings:
        if not isinstance(b, dict):
            raise JoinError(
                "Unable to subscribe to changes with given parameters: each entry must be an object"
            )

    replay = None
    raw_replay = broadcast.get("replay")
    if raw_replay is not None:
        if not isinstance(raw_replay, dict):
            raise JoinError(errors.REPLAY_PARAMS_INVALID)
        since, since_seq = raw_replay.get("since"), raw_replay.get("since_seq")
        since_i, since_seq_i = _int(since), _int(since_seq)
        if (since is not None and since_i is None) or (since_seq is not None and since_seq_i is None):
            raise JoinError(errors.REPLAY_PARAMS_INVALID)
        if since_i is None and since_seq_i is None:
            raise JoinError(errors.REPLAY_PARAMS_INVALID)
        limit_raw = raw_replay.get("limit")
        limit = None if limit_raw is None else _int(limit_raw)
        if limit_raw is not None and limit is None:
            raise JoinError(errors.REPLAY_PARAMS_INVALID)
        epoch = raw_replay.get("epoch")
        if epoch is not None and not isinstance(epoch, str):
            raise JoinError(errors.REPLAY_PARAMS_INVALID)
        replay = Replay(
            since=since_i, since_seq=since_seq_i, limit=None if limit is None else max(1, limit), epoch=epoch
        )

    options = config.get("postgres_changes_options")
    changes_wait, changes_wait_timeout = False, 15.0
    changes_resume = None
    if isinstance(options, dict) and options.get("resume") is not None:
        try:
            changes_resume = ChangesResume.parse(options["resume"])
        except PositionError as exc:
            raise JoinError(f"{errors.RESUME_INVALID}: {exc}") from None
    if isinstance(options, dict):
        changes_wait = parse_bool(options.get("wait")) is True
        timeout_ms = _int(options.get("timeout"))
        if timeout_ms is not None and timeout_ms > 0:
            changes_wait_timeout = min(timeout_ms, 20_000) / 1000.0

    token = payload.get("access_token", payload.get("user_token"))
    if token is not None and not isinstance(token, str):
        warnings.append("access_token is not a string; ignoring it")
        token = None

    return JoinConfig(
        topic=topic,
        sub_topic=sub_topic,
        private=flag(config, "private", "config"),
        broadcast_self=flag(broadcast, "self", "broadcast"),
        broadcast_ack=flag(broadcast, "ack", "broadcast"),
        presence_key=presence_key,
        presence_enabled=flag(presence, "enabled", "presence"),
        postgres_changes=bindings,
        access_token=token,
        replay=replay,
        changes_wait=changes_wait,
        changes_wait_timeout=changes_wait_timeout,
        changes_resume=changes_resume,
        replication_ready=flag(broadcast, "replication_ready", "broadcast"),
        warnings=tuple(warnings),
    )
