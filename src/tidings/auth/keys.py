"""Key hygiene: one warning of our own for a short HMAC secret, instead of PyJWT's.

PyJWT (2.10+) warns with ``InsecureKeyLengthWarning`` and a Python source line on every encode and
decode with an HMAC key shorter than the hash (32 bytes for HS256). The server and ``tidings token``
say it once, in their own words, and silence PyJWT's.
"""

from __future__ import annotations

import warnings

__all__ = ["MIN_HMAC_SECRET_BYTES", "quiet_pyjwt_key_length_warning", "short_secret_warning"]

MIN_HMAC_SECRET_BYTES = 32
"""RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output."""


def short_secret_warning(secret: str | None, setting: str = "JWT_SECRET") -> str | None:
    """The one-line warning for a secret shorter than :data:`MIN_HMAC_SECRET_BYTES`, else ``None``."""
    if not secret:
        return None
    size = len(secret.encode())
    if size >= MIN_HMAC_SECRET_BYTES:
        return None
    return (
        f"{setting} is {size} bytes; HS256 needs at least {MIN_HMAC_SECRET_BYTES} (RFC 7518 3.2), or the "
        f"tokens can be forged by guessing it: use a random secret, e.g. openssl rand -base64 32"
    )


def quiet_pyjwt_key_length_warning() -> None:
    """Ignore PyJWT's per-call ``InsecureKeyLengthWarning`` in this process (we warned once)."""
    try:
        from jwt.warnings import InsecureKeyLengthWarning
    except ImportError:  # PyJWT < 2.10 does not warn
        return
    warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
