"""JWT verification -> :class:`Principal`, with the error codes and messages of spec section 7.

Pure given the keys: the caller passes ``now``; no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jwt

__all__ = ["ANONYMOUS", "AuthError", "Principal", "Verifier", "mint_token"]

KNOWN_TOKENS = 4096  # verified tokens remembered
HMAC_ALGS = ["HS256", "HS384", "HS512"]
ASYMMETRIC_ALGS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"]


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


class Verifier:
    """Verifies tokens with an HMAC secret and/or a JWKS; with neither, the server is open.

    Args:
        secret: HS256/384/512 shared secret.
        jwks: a JSON Web Key Set (dict, or JSON text) for RS*/ES*/PS*/EdDSA keys, chosen by ``kid``.
        claim_validators: claims that must equal the given values (e.g. ``{"iss": "supabase"}``).
    """

    def __init__(
        self,
        secret: str | None = None,
        jwks: dict[str, Any] | str | None = None,
        claim_validators: dict[str, Any] | None = None,
    ) -> None:
        self._secret = secret or None
        self._keys: dict[str | None, Any] = {}
        if jwks:
            data = json.loads(jwks) if isinstance(jwks, str) else jwks
            for jwk in jwt.PyJWKSet.from_dict(data).keys:
                self._keys[jwk.key_id] = jwk
        self._validators = dict(claim_validators or {})
        self._known: dict[str, Principal] = {}

    @property
    def enabled(self) -> bool:
        """False when no key is configured and every token is accepted."""
        return self._secret is not None or bool(self._keys)

    def verify(self, token: str | None, now: float | None = None) -> Principal:
        """Verify ``token``; raises :class:`AuthError` with the spec's code and message.

        Verified tokens are remembered (many connections share one anon key): a repeat costs a
        dict lookup and the expiry check, not a signature check.
        """
        now = time.time() if now is None else now
        if token:
            known = self._known.get(token)
            if known is not None and (known.exp is None or known.exp > now):
                return known
        principal = self._verify(token, now)
        if token:
            if len(self._known) >= KNOWN_TOKENS:
                self._known.clear()  # cheap bound; the hot anon key comes back on the next call
            self._known[token] = principal
        return principal

    def _verify(self, token: str | None, now: float) -> Principal:
        if not self.enabled:
            return self._open_principal(token)
        if not token:
            raise AuthError("InvalidJWTToken", "API key is missing")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.DecodeError:
            raise AuthError(*_NOT_JWT) from None
        alg = header.get("alg")
        key: Any
        if alg in HMAC_ALGS:
            kid_key = self._keys.get(header.get("kid"))
            if kid_key is not None:
                key = kid_key.key
            elif self._secret is not None:
                key = self._secret
            else:
                raise AuthError(*_NO_SIGNER)
        elif alg in ASYMMETRIC_ALGS:
            jwk = self._keys.get(header.get("kid"))
            if jwk is None and len(self._keys) == 1:
                jwk = next(iter(self._keys.values()))
            if jwk is None:
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
            except jwt.exceptions.PyJWTError:
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
