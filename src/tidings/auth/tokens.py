"""JWT verification -> :class:`Principal`, with the error codes and messages of spec section 7.

Pure given the keys: the caller passes ``now``; no clock, no I/O. Whatever a token holds, the
verifier answers a :class:`Principal` or raises :class:`AuthError`, never anything else: a key
whose type does not fit the token's ``alg`` (a ``kid`` naming an RSA key in an HS256 or ES256
token) is "no signer", any other failure of PyJWT or the crypto library "not a valid JWT".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import OrderedDict
from typing import Any

import jwt

from ..protocol.errors import token_too_large_message

__all__ = ["ANONYMOUS", "AuthError", "Principal", "Verifier", "mint_token"]

log = logging.getLogger("tidings.auth")

KNOWN_TOKENS = 4096  # tokens remembered at most (and TOKEN_CACHE_BYTES)
# Open mode verifies nothing; it remembers only tokens this short (real keys are 0.2-1.5 KB).
# Decoding one costs ~21 us and a Principal of its own ~0.8 KB per connection, which sharing the
# one Principal of the anon key saves; a big token is decoded each time and kept by no one.
OPEN_MODE_CACHED_TOKEN_BYTES = 2048
ENTRY_OVERHEAD = 768  # bytes of a Principal and its claims dict, beyond the token text
HMAC_ALGS = ["HS256", "HS384", "HS512"]
ASYMMETRIC_ALGS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"]
# Which key types (JWK ``kty``) can verify which algorithms.
KEY_TYPE_ALGS = {
    "oct": frozenset(HMAC_ALGS),
    "RSA": frozenset(["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]),
    "EC": frozenset(["ES256", "ES384", "ES512"]),
    "OKP": frozenset(["EdDSA"]),
}


class AuthError(Exception):
    """A token refused: ``code`` prefixes join errors, ``message`` is shown everywhere."""

    def __init__(self, code: str, message: str, http_message: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_message = http_message or message

    @property
    def reason(self) -> str:
        """The join error reason, ``"<Code>: <message>"``."""
        return f"{self.code}: {self.message}"


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for."""

    claims: dict[str, Any]
    role: str
    sub: str | None
    exp: float | None
    token: str | None

    def seconds_left(self, now: float) -> float | None:
        """Seconds until expiry (negative once expired); ``None`` when it never expires."""
        return None if self.exp is None else self.exp - now


ANONYMOUS = Principal(claims={"role": "anon"}, role="anon", sub=None, exp=None, token=None)

_NOT_JWT = ("MalformedJWT", "The token provided is not a valid JWT")
_BAD_SIG = ("JwtSignatureError", "Failed to validate JWT signature")
_NO_SIGNER = (
    "JwtSignerError",
    "Failed to generate JWT signer, check your JWT secret or JWKS configuration",
)
_CLAIMS = ("InvalidJWTToken", "Fields `role` and `exp` are required in JWT")


def _cost(token: str) -> int:
    """Estimated bytes of a remembered token: its text, its claims (about as big) and overhead."""
    return 2 * len(token) + ENTRY_OVERHEAD


def _too_long(token: str, limit: int) -> bool:
    return len(token) > limit or (not token.isascii() and len(token.encode("utf-8", "surrogatepass")) > limit)


class Verifier:
    """Verifies tokens with an HMAC secret and/or a JWKS; with neither, the server is open.

    Args:
        secret: HS256/384/512 shared secret.
        jwks: a JSON Web Key Set (dict, or JSON text) for RS*/ES*/PS*/EdDSA keys, chosen by ``kid``.
        claim_validators: claims that must equal the given values (e.g. ``{"iss": "supabase"}``).
        max_token_bytes: longer tokens are refused before any decoding (``MAX_TOKEN_BYTES``).
        cache_bytes: budget of the remembered tokens (``TOKEN_CACHE_BYTES``; 0 = remember none).
    """

    def __init__(
        self,
        secret: str | None = None,
        jwks: dict[str, Any] | str | None = None,
        claim_validators: dict[str, Any] | None = None,
        *,
        max_token_bytes: int = 16_384,
        cache_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self._secret = secret or None
        self._keys: dict[str | None, Any] = {}
        if jwks:
            data = json.loads(jwks) if isinstance(jwks, str) else jwks
            for jwk in jwt.PyJWKSet.from_dict(data).keys:
                self._keys[jwk.key_id] = jwk
        self._validators = dict(claim_validators or {})
        self.max_token_bytes = max_token_bytes
        self.cache_bytes = cache_bytes
        # Oldest first: the first entries are evicted when the budget is reached.
        self._known: OrderedDict[str, Principal] = OrderedDict()
        self._known_bytes = 0
        #: Tokens refused for ``MAX_TOKEN_BYTES`` (``tidings_tokens_too_large_total``).
        self.too_large = 0

    @property
    def enabled(self) -> bool:
        """False when no key is configured and every token is accepted."""
        return self._secret is not None or bool(self._keys)

    @property
    def cached_tokens(self) -> int:
        """Tokens remembered now."""
        return len(self._known)

    @property
    def cached_bytes(self) -> int:
        """Estimated bytes of the tokens remembered now (at most ``cache_bytes``)."""
        return self._known_bytes

    def verify(self, token: str | None, now: float | None = None) -> Principal:
        """Verify ``token``; raises :class:`AuthError` with the spec's code and message.

        Verified tokens are remembered (many connections share one anon key): a repeat costs a
        dict lookup and the expiry check, not a signature check. The memory is bounded by
        ``cache_bytes`` and :data:`KNOWN_TOKENS`, oldest out first; in open mode only short
        tokens are remembered (:data:`OPEN_MODE_CACHED_TOKEN_BYTES`).
        """
        now = time.time() if now is None else now
        if token:
            known = self._known.get(token)
            if known is not None:
                if known.exp is None or known.exp > now:
                    return known
                self._forget(token)
            if _too_long(token, self.max_token_bytes):
                self.too_large += 1
                raise AuthError("InvalidJWTToken", token_too_large_message(self.max_token_bytes))
        try:
            principal = self._verify(token, now)
        except AuthError:
            raise
        except Exception as exc:  # a token must never crash its caller (REST 500, dropped upgrade)
            log.debug("token verification failed: %s", type(exc).__name__)
            raise AuthError(*_NOT_JWT) from None
        if token:
            self._remember(token, principal)
        return principal

    def _remember(self, token: str, principal: Principal) -> None:
        if not self.enabled and len(token) > OPEN_MODE_CACHED_TOKEN_BYTES:
            return  # not verified, and big: decoded again next time rather than kept
        cost = _cost(token)
        if cost > self.cache_bytes:
            return
        known = self._known
        while known and (len(known) >= KNOWN_TOKENS or self._known_bytes + cost > self.cache_bytes):
            old, _ = known.popitem(last=False)
            self._known_bytes -= _cost(old)
        known[token] = principal
        self._known_bytes += cost

    def _forget(self, token: str) -> None:
        if self._known.pop(token, None) is not None:
            self._known_bytes -= _cost(token)

    def _verify(self, token: str | None, now: float) -> Principal:
        if not self.enabled:
            return self._open_principal(token)
        if not token:
            raise AuthError("InvalidJWTToken", "API key is missing")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.PyJWTError:
            raise AuthError(*_NOT_JWT) from None
        alg, kid = header.get("alg"), header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError(*_NOT_JWT)
        if not isinstance(alg, str):
            raise AuthError(*_NO_SIGNER)
        key: Any
        if alg in HMAC_ALGS:
            # Only an "oct" key is an HMAC secret: a kid naming an RSA or EC key falls back to
            # JWT_SECRET (the signature must then match it), never uses the public key as one.
            jwk = self._keys.get(kid)
            if jwk is not None and jwk.key_type == "oct":
                key = jwk.key
            elif self._secret is not None:
                key = self._secret
            else:
                raise AuthError(*_NO_SIGNER)
        elif alg in ASYMMETRIC_ALGS:
            jwk = self._keys.get(kid)
            if jwk is None and len(self._keys) == 1:
                jwk = next(iter(self._keys.values()))
            if jwk is None or alg not in KEY_TYPE_ALGS.get(str(jwk.key_type), ()):
                raise AuthError(*_NO_SIGNER)
            key = jwk.key
        else:
            raise AuthError(*_NO_SIGNER)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={"verify_exp": False, "verify_aud": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.exceptions.InvalidSignatureError:
            raise AuthError(*_BAD_SIG) from None
        except jwt.exceptions.InvalidKeyError:
            raise AuthError(*_NO_SIGNER) from None
        except jwt.exceptions.PyJWTError:
            raise AuthError(*_NOT_JWT) from None
        except (TypeError, ValueError):
            # The key cannot be used with this algorithm after all (e.g. an EC key of another curve).
            raise AuthError(*_NO_SIGNER) from None
        if not isinstance(claims, dict):
            raise AuthError(*_NOT_JWT)
        return self._principal(claims, token, now)

    def _principal(self, claims: dict[str, Any], token: str, now: float) -> Principal:
        role, exp = claims.get("role"), claims.get("exp")
        if role is None or exp is None:
            raise AuthError(*_CLAIMS)
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AuthError("InvalidJWTToken", "Token expiration time is invalid")
        iat = claims.get("iat")
        if iat is not None and (not isinstance(iat, int | float) or isinstance(iat, bool)):
            raise AuthError(*_NOT_JWT)
        if exp <= now:
            ago = int(now - exp)
            raise AuthError("InvalidJWTToken", f"Token has expired {ago} seconds ago", "Token has expired")
        for name, expected in self._validators.items():
            if claims.get(name) != expected:
                raise AuthError("InvalidJWTToken", f"Claim `{name}` is not valid")
        sub = claims.get("sub")
        return Principal(
            claims=claims, role=str(role), sub=None if sub is None else str(sub), exp=float(exp), token=token
        )

    @staticmethod
    def _open_principal(token: str | None) -> Principal:
        # Open mode: take the claims for identity (sub, role) without trusting them for anything.
        if token:
            try:
                claims = jwt.decode(token, options={"verify_signature": False})
            except Exception:  # anything at all: open mode takes it as anonymous
                claims = {}
            if isinstance(claims, dict) and claims:
                sub = claims.get("sub")
                return Principal(
                    claims=claims,
                    role=str(claims.get("role", "anon")),
                    sub=None if sub is None else str(sub),
                    exp=None,
                    token=token,
                )
        return ANONYMOUS


def mint_token(
    secret: str,
    role: str = "anon",
    sub: str | None = None,
    ttl: float = 3600.0,
    now: float | None = None,
    **claims: Any,
) -> str:
    """Mint an HS256 token (for development and tests)."""
    now = time.time() if now is None else now
    body: dict[str, Any] = {"role": role, "iat": int(now), "exp": int(now + ttl), **claims}
    if sub is not None:
        body["sub"] = sub
    return jwt.encode(body, secret, algorithm="HS256")
