"""Logging set-up: plain or JSON lines, level from config, secrets redacted.

Structured fields go in ``extra={"fields": {...}}``: JSON lines merge them into the object, plain
lines append them as ``key=value``. Every record passes :class:`Redactor` before it is written:
JWT-shaped strings and the secrets registered with :func:`redact` (``JWT_SECRET``, the webhook
URL, passwords in database and Redis URLs; the node registers them) become ``[redacted]``.

Client input never shapes the log: control characters (CR, LF, ...) in a message or field are
escaped, so no value can start a forged line; values passed through :class:`Clipped` are cut to
:data:`CLIP_CHARS` with a ``…(+N bytes)`` marker, and a whole message to :data:`MAX_MESSAGE_CHARS`.
:class:`LineLimiter` writes at most ``LOG_RATE_LIMIT`` lines of one kind (logger, level, message
template) per :data:`LIMIT_WINDOW` seconds and then one ``suppressed K similar lines`` line.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import urlsplit

import orjson

__all__ = [
    "CLIP_CHARS",
    "LIMIT_WINDOW",
    "MAX_MESSAGE_CHARS",
    "JsonFormatter",
    "LineLimiter",
    "PlainFormatter",
    "Redactor",
    "Clipped",
    "clip_text",
    "escape_control",
    "first_line",
    "flush_suppressed",
    "redact",
    "secrets_of",
    "set_log_rate_limit",
    "setup_logging",
    "suppressed_lines",
]

REDACTED = "[redacted]"
# header.payload.signature, base64url: what every JWT looks like (both first parts start with "eyJ").
_JWT = re.compile(r"eyJ[\w-]{4,}\.eyJ[\w-]{4,}\.[\w-]*")
_secrets: set[str] = set()
_secrets_re: re.Pattern[str] | None = None

CLIP_CHARS = 200  # characters kept of one client value (topic, event, reason) in a log line
MAX_MESSAGE_CHARS = 8192  # characters kept of a whole message: the net under every call site
LIMIT_WINDOW = 10.0  # seconds of the line limiter's window
MAX_LIMITED_KINDS = 1024  # line kinds tracked at once; beyond, new kinds of a logger share one
# C0 (but tab), DEL, C1 (NEL among them) and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, else its type's name: what a log line or a
    one-line start-up failure shows of a database or network error (drivers add hints and
    context on further lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def secrets_of(*values: str | None) -> list[str]:
    """The secret parts of settings: whole secrets, and the password (and query) of URLs."""
    out: list[str] = []
    for value in values:
        if not value:
            continue
        if "://" in value:
            parts = urlsplit(value)
            if parts.password:
                out.append(parts.password)
            if parts.scheme in ("http", "https"):
                # Webhook URLs carry their token in the path or the query.
                out += [p for p in (value, parts.query, parts.path.strip("/")) if len(p) >= 8]
        else:
            out.append(value)
    return out


def redact(*secrets: str | None) -> None:
    """Never write these strings to the log (shorter than 4 characters are ignored)."""
    global _secrets_re
    _secrets.update(s for s in secrets if s and len(s) >= 4)
    if _secrets:
        ordered = sorted(_secrets, key=len, reverse=True)  # longest first: no partial leftovers
        _secrets_re = re.compile("|".join(re.escape(s) for s in ordered))


def _scrub(text: str) -> str:
    text = _JWT.sub(REDACTED, text)
    if _secrets_re is not None:
        text = _secrets_re.sub(REDACTED, text)
    return text


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """``text`` with control characters written as ``\\xNN`` / ``\\uNNNN``: one value, one line."""
    return _CONTROL.sub(_escape_one, text)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    left_out = len(text[limit:].encode("utf-8", "surrogatepass"))
    return f"{text[:limit]}…(+{left_out} bytes)"


def clip_text(value: object, limit: int = CLIP_CHARS) -> str:
    """``value`` as loggable text: secrets redacted, cut to ``limit`` characters, controls escaped.

    Redaction comes before the cut, so a secret cut in half cannot leave its first half behind.
    """
    text = value if isinstance(value, str) else str(value)
    return escape_control(_cut(_scrub(text), limit))


class Clipped:
    """A client value for a log argument, clipped only when the line is really written.

    ``log.info("join %s refused", Clipped(topic))`` costs nothing for a line the level or the
    :class:`LineLimiter` drops, however large ``topic`` is.
    """

    __slots__ = ("limit", "value")

    def __init__(self, value: object, limit: int = CLIP_CHARS) -> None:
        self.value = value
        self.limit = limit

    def __str__(self) -> str:
        return clip_text(self.value, self.limit)

    def __repr__(self) -> str:
        return clip_text(repr(self.value), self.limit)


class Redactor(logging.Filter):
    """Rewrites each record's message (arguments merged in) and exception text without secrets.

    The message also gets its control characters escaped and is cut to :data:`MAX_MESSAGE_CHARS`,
    whatever a call site passed in.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        # Line breaks at either end only frame a message (a banner's blank line): dropped; inside
        # they are escaped like every control character.
        clean = escape_control(_cut(_scrub(message), MAX_MESSAGE_CHARS).strip("\r\n"))
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _scrub(record.exc_text)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {
                k: escape_control(_cut(_scrub(v), MAX_MESSAGE_CHARS)) if isinstance(v, str) else v
                for k, v in fields.items()
            }
        return True


class LineLimiter(logging.Filter):
    """At most ``per_window`` lines of one kind per ``window`` seconds; the rest are counted.

    A kind is (logger, level, message template before its arguments), so a flood of one refusal
    is limited while other lines go on. Suppressed lines are reported in one line per kind,
    ``suppressed K similar lines in the last 10 s: <template>``, once its window is over: when the
    kind logs again, or at :meth:`flush` (the node's sweeper calls :func:`flush_suppressed`).
    ``per_window`` 0 turns the limiter off.
    """

    def __init__(
        self,
        per_window: int = 20,
        window: float = LIMIT_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.per_window = per_window
        self.window = window
        self.clock = clock
        #: kind -> [window start, lines written in it, lines suppressed in it]
        self._kinds: dict[tuple[str, int, str], list[float]] = {}
        #: Lines suppressed since the start (``tidings_log_lines_suppressed_total``).
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.per_window <= 0 or getattr(record, "tidings_summary", False):
            return True
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        key = (record.name, record.levelno, template)
        now = self.clock()
        state = self._kinds.get(key)
        if state is None:
            if len(self._kinds) >= MAX_LIMITED_KINDS:
                self.flush(now)
                if len(self._kinds) >= MAX_LIMITED_KINDS:
                    # Templates built from client input (f-strings) must not grow this without
                    # bound: their lines share one kind per logger and level.
                    key = (record.name, record.levelno, "")
                    state = self._kinds.get(key)
            if state is None:
                state = self._kinds[key] = [now, 0, 0]
        elif now - state[0] >= self.window:
            if state[2]:
                self._summarise(key, state)
            state[0], state[1], state[2] = now, 0, 0
        if state[1] < self.per_window:
            state[1] += 1
            return True
        state[2] += 1
        self.suppressed_total += 1
        return False

    def flush(self, now: float | None = None) -> None:
        """Report the kinds whose window is over with lines suppressed, and forget finished ones."""
        now = self.clock() if now is None else now
        for key, state in list(self._kinds.items()):
            if now - state[0] >= self.window:
                if state[2]:
                    self._summarise(key, state)
                del self._kinds[key]

    def _summarise(self, key: tuple[str, int, str], state: list[float]) -> None:
        name, level, template = key
        logging.getLogger(name).log(
            level,
            "suppressed %d similar lines in the last %g s: %s",
            int(state[2]),
            self.window,
            Clipped(template),
            extra={"tidings_summary": True},
        )


_limiter = LineLimiter()


def set_log_rate_limit(per_window: int) -> None:
    """Lines of one kind written per :data:`LIMIT_WINDOW` seconds (``LOG_RATE_LIMIT``; 0 = all)."""
    _limiter.per_window = per_window


def flush_suppressed() -> None:
    """Write the pending ``suppressed K similar lines`` summaries (called once a second)."""
    _limiter.flush()


def suppressed_lines() -> int:
    """Log lines suppressed by the line limiter since the process started."""
    return _limiter.suppressed_total


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            entry.setdefault(key, value)
        if record.exc_text:
            entry["exc"] = record.exc_text
        elif record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class PlainFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def setup_logging(level: str = "info", fmt: str = "plain", stream: TextIO | None = None) -> None:
    """Configure the root logger once for the process (``stream``: stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    handler.addFilter(_limiter)  # first: a suppressed line is never formatted
    handler.addFilter(Redactor())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to ours.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("websockets").setLevel(logging.WARNING)
