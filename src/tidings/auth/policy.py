"""Channel authorization: who may read and write the broadcast and presence of a private channel.

Every path asks the same question (join, broadcast, track, REST broadcast, history, replay): may
this token read or write this extension of this sub-topic (the topic without ``realtime:``)? The
answer is a :class:`Permissions`. Two models produce it, behind one :class:`Authorizer` interface:

* **With a database** (``DATABASE_URL``): Supabase's Realtime Authorization, row level security
  policies on ``realtime.messages`` (:class:`tidings.db.authorization.RlsAuthorizer`).
* **Without a database**: a declarative :class:`ChannelPolicy` from the ``CHANNEL_POLICY`` setting,
  topic patterns bound to claims with read/write per extension (:class:`PolicyAuthorizer`). With
  no policy, private channels are denied to every role but ``service_role``.

``service_role`` is always allowed, in both models. This module is pure: no sockets, no database.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "ALLOW_ALL",
    "DENY_ALL",
    "EXTENSIONS",
    "SERVICE_ROLE",
    "UNCHECKED",
    "AuthorizationContext",
    "AuthorizationUnavailable",
    "Authorizer",
    "ChannelPolicy",
    "PermissionCache",
    "Permissions",
    "PolicyAuthorizer",
    "PolicyError",
    "PolicyRule",
    "parse_channel_policy",
    "restrict_read",
    "restrict_write",
]

EXTENSIONS = ("broadcast", "presence")
"""The extensions a permission is about (``realtime.messages.extension``)."""
SERVICE_ROLE = "service_role"
"""The JWT role that is always allowed (it bypasses row level security in Supabase)."""


# --------------------------------------------------------------------------------------------
# Permissions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Permissions:
    """Read and write per extension; ``None`` means not evaluated yet (Supabase's ``nil``).

    Build them with :meth:`of`: equal permissions are then one shared object, so a channel holds
    an 8-byte reference whatever its permissions are.
    """

    broadcast_read: bool | None = None
    broadcast_write: bool | None = None
    presence_read: bool | None = None
    presence_write: bool | None = None

    @staticmethod
    def of(
        broadcast_read: bool | None = None,
        broadcast_write: bool | None = None,
        presence_read: bool | None = None,
        presence_write: bool | None = None,
    ) -> Permissions:
        """The shared instance with these values."""
        key = (broadcast_read, broadcast_write, presence_read, presence_write)
        found = _INTERNED.get(key)
        if found is None:
            found = _INTERNED[key] = Permissions(*key)
        return found

    def can_read(self, extension: str) -> bool:
        """Read of *extension* (``broadcast`` or ``presence``) evaluated and allowed."""
        return bool(self.broadcast_read if extension == "broadcast" else self.presence_read)

    def can_write(self, extension: str) -> bool:
        """Write of *extension* evaluated and allowed."""
        return bool(self.broadcast_write if extension == "broadcast" else self.presence_write)

    @property
    def readable(self) -> bool:
        """A join is allowed: broadcast or presence read (Supabase: ``broadcast_read? || presence_read?``)."""
        return bool(self.broadcast_read or self.presence_read)

    @property
    def read_checked(self) -> bool:
        """Some read permission was evaluated."""
        return self.broadcast_read is not None or self.presence_read is not None

    @property
    def write_checked(self) -> bool:
        """Write permissions were evaluated (at the first broadcast or track)."""
        return self.broadcast_write is not None or self.presence_write is not None

    def merged(self, newer: Permissions) -> Permissions:
        """These permissions with every value *newer* evaluated (not None) taken from *newer*."""

        def pick(old: bool | None, new: bool | None) -> bool | None:
            return old if new is None else new

        return Permissions.of(
            pick(self.broadcast_read, newer.broadcast_read),
            pick(self.broadcast_write, newer.broadcast_write),
            pick(self.presence_read, newer.presence_read),
            pick(self.presence_write, newer.presence_write),
        )

    def read_revoked(self, newer: Permissions) -> bool:
        """A read allowed here is denied in *newer* (close the channel with "You no longer have
        permission to read ..."; Supabase's ``check_read_permissions_revoked``)."""
        return (self.broadcast_read is True and newer.broadcast_read is False) or (
            self.presence_read is True and newer.presence_read is False
        )


_INTERNED: dict[tuple[bool | None, ...], Permissions] = {}

ALLOW_ALL = Permissions.of(True, True, True, True)
"""Everything allowed (``service_role``)."""
DENY_ALL = Permissions.of(False, False, False, False)
"""Everything evaluated and denied."""
UNCHECKED = Permissions.of()
"""Nothing evaluated yet."""


def restrict_read(permissions: Permissions, *, presence: bool) -> Permissions:
    """Only the read values of *permissions*; presence read left unevaluated when presence is off."""
    return Permissions.of(
        permissions.broadcast_read, None, permissions.presence_read if presence else None, None
    )


def restrict_write(permissions: Permissions, *, presence: bool) -> Permissions:
    """Only the write values; presence write denied when presence is off (as Supabase's write check)."""
    return Permissions.of(
        None, permissions.broadcast_write, None, permissions.presence_write if presence else False
    )


# --------------------------------------------------------------------------------------------
# Who asks
# --------------------------------------------------------------------------------------------


def _compact_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


class AuthorizationContext:
    """Who asks about which sub-topic: the claims of the verified token and the request headers.

    Args:
        topic: the sub-topic (``realtime:room-1`` -> ``room-1``), what ``realtime.topic()`` returns.
        claims: the token's claims; ``role`` and ``sub`` are read from them.
        headers: the request's headers (Supabase passes the ``x-`` headers of the WebSocket
            upgrade, all headers of a REST request); names are lower-cased, a later duplicate wins.
    """

    __slots__ = ("_claims_json", "_headers_json", "claims", "headers", "role", "sub", "topic")

    def __init__(
        self,
        topic: str,
        claims: Mapping[str, Any] | None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        self.topic = topic
        self.claims: Mapping[str, Any] = claims if isinstance(claims, Mapping) else {}
        role = self.claims.get("role")
        self.role: str | None = role if isinstance(role, str) and role else None
        sub = self.claims.get("sub")
        self.sub: str | None = None if sub is None else str(sub)
        pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
        self.headers: dict[str, str] = {str(k).lower(): str(v) for k, v in pairs}
        # Serialised on first use: the declarative policy never needs them (a private join
        # without a database then costs no JSON encoding).
        self._claims_json: str | None = None
        self._headers_json: str | None = None

    @property
    def claims_json(self) -> str:
        """The claims as compact JSON with sorted keys (``request.jwt.claims``)."""
        if self._claims_json is None:
            self._claims_json = _compact_json(dict(self.claims))
        return self._claims_json

    @property
    def headers_json(self) -> str:
        """The headers as compact JSON with sorted keys (``request.headers``)."""
        if self._headers_json is None:
            self._headers_json = _compact_json(self.headers)
        return self._headers_json

    @property
    def key(self) -> tuple[str, str, str]:
        """What results are cached by: sub-topic, claims and headers."""
        return (self.topic, self.claims_json, self.headers_json)

    @property
    def is_service_role(self) -> bool:
        """The token's role is ``service_role``: always allowed."""
        return self.role == SERVICE_ROLE

    def for_topic(self, topic: str) -> AuthorizationContext:
        """The same claims and headers asking about another sub-topic (REST batches)."""
        return AuthorizationContext(topic, self.claims, self.headers)

    def __repr__(self) -> str:
        return f"AuthorizationContext(topic={self.topic!r}, role={self.role!r}, sub={self.sub!r})"


class AuthorizationUnavailable(Exception):
    """The permissions could not be evaluated (database unreachable, missing partition, timeout).

    Not a denial: the join is refused with :attr:`reason`, a channel being refreshed is closed
    with :attr:`message`.
    """

    def __init__(self, reason: str, message: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        """The join error reason, e.g. ``UnableToConnectToProject: ...``."""
        self.message = message
        """The in-channel shutdown message."""
        self.detail = detail
        """What went wrong, for the log (one line)."""


class Authorizer(Protocol):
    """What every path uses to learn a :class:`Permissions` (both models implement it)."""

    async def read(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions:
        """Read permissions for *context* (at join; again with ``refresh=True`` on ``access_token``).

        *presence* says whether presence read is evaluated (presence enabled on the channel).

        Raises:
            AuthorizationUnavailable: they could not be evaluated.
        """
        ...

    async def write(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions:
        """Write permissions for *context* (at the first broadcast or track, and for REST).

        Raises:
            AuthorizationUnavailable: they could not be evaluated.
        """
        ...

    def invalidate(self, context: AuthorizationContext | None = None) -> None:
        """Forget the cached results for *context* (every result when None)."""
        ...

    def read_now(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions | None:
        """What :meth:`read` would answer, when that needs no waiting (a pure policy,
        ``service_role``, a live cache entry); None when only :meth:`read` can tell."""
        ...

    def write_now(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions | None:
        """What :meth:`write` would answer, when that needs no waiting; else None."""
        ...


# --------------------------------------------------------------------------------------------
# The declarative policy (no database)
# --------------------------------------------------------------------------------------------


class PolicyError(ValueError):
    """A ``CHANNEL_POLICY`` that cannot be used; ``str()`` is one line saying what and where."""


_RULE_KEYS = ("topic", "roles", "claims", "read", "write")
_DEFAULT_ROLES = ("authenticated",)
_Token = tuple[str, str]  # ("lit", text) | ("claim", dotted path) | ("star", "")


def _is_claim_path(name: str) -> bool:
    parts = name.split(".")
    return all(
        p and (p[0].isalpha() or p[0] == "_") and all(c.isalnum() or c in "_-" for c in p) for p in parts
    )


def _compile_pattern(pattern: str, where: str) -> tuple[_Token, ...]:
    if not isinstance(pattern, str) or not pattern:
        raise PolicyError(f'{where}: topic must be a non-empty string, e.g. "user:{{sub}}"')
    tokens: list[_Token] = []
    literal: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "{":
            end = pattern.find("}", i + 1)
            if end < 0:
                raise PolicyError(f"{where}: topic pattern {pattern!r} has a '{{' without its '}}'")
            name = pattern[i + 1 : end]
            if "{" in name or not name or not _is_claim_path(name):
                raise PolicyError(
                    f"{where}: topic pattern {pattern!r} has a bad claim name {{{name}}} "
                    "(letters, digits, _ and -, dots for nested claims, e.g. {sub} or {app_metadata.org})"
                )
            if literal:
                tokens.append(("lit", "".join(literal)))
                literal = []
            tokens.append(("claim", name))
            i = end + 1
            continue
        if c == "}":
            raise PolicyError(f"{where}: topic pattern {pattern!r} has a '}}' without its '{{'")
        if c == "*":
            if literal:
                tokens.append(("lit", "".join(literal)))
                literal = []
            if not tokens or tokens[-1][0] != "star":
                tokens.append(("star", ""))
            i += 1
            continue
        literal.append(c)
        i += 1
    if literal:
        tokens.append(("lit", "".join(literal)))
    return tuple(tokens)


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _placeholder_text(value: Any) -> str | None:
    """A claim as it appears in a topic: a non-empty string or an integer; anything else never matches."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value:
        return value
    return None


def _glob_match(parts: Sequence[str], text: str) -> bool:
    """*text* matches literal *parts* separated by ``*`` (each ``*`` any run of characters)."""
    if len(parts) == 1:
        return text == parts[0]
    first, last = parts[0], parts[-1]
    if len(text) < len(first) + len(last) or not text.startswith(first) or not text.endswith(last):
        return False
    pos, end = len(first), len(text) - len(last)
    for middle in parts[1:-1]:
        found = text.find(middle, pos, end)
        if found < 0:
            return False
        pos = found + len(middle)
    return True


def _extensions(value: Any, where: str, field: str, default: bool) -> frozenset[str]:
    if value is None:
        return frozenset(EXTENSIONS) if default else frozenset()
    if value is True:
        return frozenset(EXTENSIONS)
    if value is False:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise PolicyError(
            f"{where}: {field} must be true, false or a list of extensions (broadcast, presence)"
        )
    for item in value:
        if item not in EXTENSIONS:
            raise PolicyError(
                f"{where}: unknown extension {item!r} in {field} (expected broadcast or presence)"
            )
    return frozenset(value)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One rule: a topic pattern, who it applies to, and what it allows.

    Attributes:
        topic: the pattern as written: literal text, ``{claim}`` (the claim's value, e.g.
            ``{sub}``, ``{app_metadata.org_id}``) and ``*`` (any run of characters).
        roles: JWT roles the rule applies to.
        claims: ``(claim path, allowed values)``: every one must hold.
        read: extensions the rule lets its subjects read.
        write: extensions the rule lets its subjects write.
    """

    topic: str
    roles: tuple[str, ...]
    claims: tuple[tuple[str, tuple[Any, ...]], ...]
    read: frozenset[str]
    write: frozenset[str]
    tokens: tuple[_Token, ...]

    def applies(self, topic: str, claims: Mapping[str, Any]) -> bool:
        """The rule matches this sub-topic for a token with these claims."""
        role = claims.get("role")
        if role not in self.roles:
            return False
        for path, allowed in self.claims:
            value = _claim(claims, path)
            if not any(_same(value, a) for a in allowed):
                return False
        parts = [""]
        for kind, text in self.tokens:
            if kind == "lit":
                parts[-1] += text
            elif kind == "claim":
                value = _placeholder_text(_claim(claims, text))
                if value is None:
                    return False
                parts[-1] += value
            else:
                parts.append("")
        return _glob_match(parts, topic)

    def as_dict(self) -> dict[str, Any]:
        """The rule in the form :func:`parse_channel_policy` reads."""
        out: dict[str, Any] = {"topic": self.topic, "roles": list(self.roles)}
        if self.claims:
            out["claims"] = {p: (list(v) if len(v) != 1 else v[0]) for p, v in self.claims}
        out["read"] = sorted(self.read)
        out["write"] = sorted(self.write)
        return out


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(value: Any, expected: Any) -> bool:
    """A claim equals a configured value: strings to strings, booleans to booleans, numbers to
    numbers (``1`` is ``1.0`` but not ``true`` nor ``"1"``)."""
    if isinstance(value, bool) or isinstance(expected, bool):
        return value is expected
    if _num(value) and _num(expected):
        return bool(value == expected)
    return isinstance(value, str) and isinstance(expected, str) and value == expected


@dataclass(frozen=True, slots=True)
class ChannelPolicy:
    """The declarative policy: a union of rules (any applying rule grants what it lists).

    Private channels no rule applies to are denied; ``service_role`` is always allowed.
    """

    rules: tuple[PolicyRule, ...] = ()

    def permissions(self, topic: str, claims: Mapping[str, Any] | None) -> Permissions:
        """Read and write of both extensions for *claims* on the sub-topic *topic* (all evaluated)."""
        claims = claims if isinstance(claims, Mapping) else {}
        if claims.get("role") == SERVICE_ROLE:
            return ALLOW_ALL
        read: set[str] = set()
        write: set[str] = set()
        for rule in self.rules:
            if (rule.read - read or rule.write - write) and rule.applies(topic, claims):
                read |= rule.read
                write |= rule.write
        return Permissions.of(
            "broadcast" in read, "broadcast" in write, "presence" in read, "presence" in write
        )

    def __str__(self) -> str:
        return json.dumps([rule.as_dict() for rule in self.rules], separators=(",", ":"))


def _parse_rule(raw: Any, where: str) -> PolicyRule:
    if not isinstance(raw, Mapping):
        raise PolicyError(f'{where}: must be an object with a topic, e.g. {{"topic": "user:{{sub}}"}}')
    unknown = [k for k in raw if k not in _RULE_KEYS]
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(_RULE_KEYS)})")
    if "topic" not in raw:
        raise PolicyError(f'{where}: missing topic, e.g. "topic": "user:{{sub}}"')
    topic = raw["topic"]
    tokens = _compile_pattern(topic, where)
    roles_raw = raw.get("roles", list(_DEFAULT_ROLES))
    if isinstance(roles_raw, str):
        roles_raw = [roles_raw]
    if (
        not isinstance(roles_raw, list | tuple)
        or not roles_raw
        or not all(isinstance(r, str) and r for r in roles_raw)
    ):
        raise PolicyError(f'{where}: roles must be a non-empty list of JWT roles, e.g. ["authenticated"]')
    claims_raw = raw.get("claims", {})
    if not isinstance(claims_raw, Mapping):
        raise PolicyError(
            f'{where}: claims must be an object of claim -> value, e.g. {{"app_metadata.team": "red"}}'
        )
    claims: list[tuple[str, tuple[Any, ...]]] = []
    for path, allowed in claims_raw.items():
        if not isinstance(path, str) or not _is_claim_path(path):
            raise PolicyError(f"{where}: bad claim name {path!r} in claims")
        values = tuple(allowed) if isinstance(allowed, list | tuple) else (allowed,)
        if not values or not all(_scalar(v) and v is not None for v in values):
            raise PolicyError(
                f"{where}: claim {path!r} must equal a string, number or boolean (or a list of them)"
            )
        claims.append((path, values))
    read = _extensions(raw.get("read"), where, "read", default=True)
    write = _extensions(raw.get("write"), where, "write", default=False)
    if not read and not write:
        raise PolicyError(f"{where}: grants nothing (read and write are both empty)")
    return PolicyRule(topic, tuple(roles_raw), tuple(claims), read, write, tokens)


def parse_channel_policy(value: str | Sequence[Any] | Mapping[str, Any] | None) -> ChannelPolicy:
    """A :class:`ChannelPolicy` from the ``CHANNEL_POLICY`` setting.

    *value* is JSON text, or what a TOML file gives (``[[channel_policy]]`` tables): a list of
    rules, or an object ``{"rules": [...]}``. A rule is an object::

        {"topic": "user:{sub}", "roles": ["authenticated"], "claims": {"app_metadata.plan": "pro"},
         "read": ["broadcast", "presence"], "write": ["broadcast"]}

    ``roles`` defaults to ``["authenticated"]``, ``read`` to both extensions, ``write`` to none;
    ``true`` / ``false`` mean both / none. Empty text or None is the empty policy.

    Raises:
        PolicyError: one line naming the rule and what is wrong with it.
    """
    if value is None:
        return ChannelPolicy()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ChannelPolicy()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"not valid JSON ({exc.msg} at char {exc.pos})") from None
    if isinstance(value, Mapping):
        if set(value) != {"rules"}:
            raise PolicyError('expected a list of rules, or {"rules": [...]}')
        value = value["rules"]
    if not isinstance(value, list | tuple):
        raise PolicyError(f"expected a list of rules, got {type(value).__name__}")
    return ChannelPolicy(tuple(_parse_rule(raw, f"rule {i}") for i, raw in enumerate(value, 1)))


class PolicyAuthorizer:
    """The :class:`Authorizer` without a database: evaluates a :class:`ChannelPolicy` (pure and
    cheap, so nothing is cached). With no policy, everyone but ``service_role`` is denied."""

    def __init__(self, policy: ChannelPolicy | None = None) -> None:
        self.policy = policy or ChannelPolicy()

    def permissions(self, context: AuthorizationContext) -> Permissions:
        """Every permission of *context*, evaluated synchronously."""
        return self.policy.permissions(context.topic, context.claims)

    async def read(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions:
        """See :meth:`Authorizer.read`."""
        return restrict_read(self.permissions(context), presence=presence)

    async def write(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions:
        """See :meth:`Authorizer.write`."""
        return restrict_write(self.permissions(context), presence=presence)

    def invalidate(self, context: AuthorizationContext | None = None) -> None:
        """Nothing is cached."""

    def read_now(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions:
        """See :meth:`Authorizer.read_now`: always known."""
        return restrict_read(self.permissions(context), presence=presence)

    def write_now(
        self, context: AuthorizationContext, *, presence: bool = True, refresh: bool = False
    ) -> Permissions:
        """See :meth:`Authorizer.write_now`: always known."""
        return restrict_write(self.permissions(context), presence=presence)


# --------------------------------------------------------------------------------------------
# The cache of evaluated permissions
# --------------------------------------------------------------------------------------------

_ENTRY_OVERHEAD = 240  # bytes: key tuple, OrderedDict node, the entry object


@dataclass(slots=True)
class _Entry:
    permissions: Permissions
    expires: float | None
    size: int


class PermissionCache:
    """Evaluated permissions per :attr:`AuthorizationContext.key`, least recently used dropped first.

    Bounded in entries and in bytes (the key's strings plus a fixed overhead per entry). A result
    is kept at most *ttl* seconds (None: until evicted or invalidated): a cached join skips the
    database, so a policy change reaches later joins within *ttl*. Read and write values of one
    key share an entry; adding the write values never extends the life of the read values.
    """

    def __init__(
        self,
        *,
        max_entries: int = 50_000,
        max_bytes: int = 16 * 1024 * 1024,
        ttl: float | None = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max(1, max_entries)
        self.max_bytes = max(1, max_bytes)
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str, str], _Entry] = OrderedDict()
        self.bytes = 0
        """Estimated bytes held."""
        self.evictions = 0
        """Entries dropped to stay within the bounds."""

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, entry: _Entry, now: float) -> bool:
        return entry.expires is None or entry.expires > now

    def get(self, key: tuple[str, str, str]) -> Permissions | None:
        """The cached permissions of *key*, or None (missing or expired)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not self._live(entry, self._clock()):
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry.permissions

    def put(self, key: tuple[str, str, str], permissions: Permissions) -> Permissions:
        """Merge *permissions* into *key*'s entry; returns what the entry now holds."""
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and self._live(entry, now):
            entry.permissions = entry.permissions.merged(permissions)
            self._entries.move_to_end(key)
            return entry.permissions
        if entry is not None:
            self._remove(key)
        size = sum(len(part) for part in key) + _ENTRY_OVERHEAD
        self._entries[key] = _Entry(permissions, None if self.ttl is None else now + self.ttl, size)
        self.bytes += size
        entries = self._entries
        while len(entries) > self.max_entries or (self.bytes > self.max_bytes and len(entries) > 1):
            self._remove(next(iter(self._entries)))
            self.evictions += 1
        return permissions

    def invalidate(self, key: tuple[str, str, str] | None = None) -> None:
        """Forget *key* (everything when None)."""
        if key is None:
            self._entries.clear()
            self.bytes = 0
        elif key in self._entries:
            self._remove(key)

    def invalidate_topic(self, topic: str) -> int:
        """Forget every entry of sub-topic *topic*; returns how many."""
        keys = [k for k in self._entries if k[0] == topic]
        for key in keys:
            self._remove(key)
        return len(keys)

    def _remove(self, key: tuple[str, str, str]) -> None:
        self.bytes -= self._entries.pop(key).size
