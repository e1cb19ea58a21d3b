"""Logging set-up: plain or JSON lines, level from config, secrets redacted.

Structured fields go in ``extra={"fields": {...}}``: JSON lines merge them into the object, plain
lines append them as ``key=value``. Every record passes :class:`Redactor` before it is written:
JWT-shaped strings and the secrets registered with :func:`redact` (``JWT_SECRET``, the webhook
URL, passwords in database and Redis URLs; the node registers them) become ``[redacted]``.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any, TextIO
from urllib.parse import urlsplit

import orjson

__all__ = ["JsonFormatter", "PlainFormatter", "Redactor", "redact", "secrets_of", "setup_logging"]

REDACTED = "[redacted]"
# header.payload.signature, base64url: what every JWT looks like (both first parts start with "eyJ").
_JWT = re.compile(r"eyJ[\w-]{4,}\.eyJ[\w-]{4,}\.[\w-]*")
_secrets: set[str] = set()
_secrets_re: re.Pattern[str] | None = None


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


class Redactor(logging.Filter):
    """Rewrites each record's message (arguments merged in) and exception text without secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = _scrub(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _scrub(record.exc_text)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: _scrub(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


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
    handler.addFilter(Redactor())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to ours.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("websockets").setLevel(logging.WARNING)
