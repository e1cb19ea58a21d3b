"""JWT verification (spec 1.3, 7.1, 8.4): every code and message, HS256, JWKS RS256/ES256, open mode."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tidings.auth.tokens import ANONYMOUS, AuthError, Principal, Verifier, mint_token

SECRET = "super-secret-jwt-token-with-at-least-64-characters-for-hs512-tokens-too"
NOW = 1_800_000_000.0

NOT_JWT = "MalformedJWT: The token provided is not a valid JWT"
BAD_SIG = "JwtSignatureError: Failed to validate JWT signature"
NO_SIGNER = "JwtSignerError: Failed to generate JWT signer, check your JWT secret or JWKS configuration"
CLAIMS = "InvalidJWTToken: Fields `role` and `exp` are required in JWT"


def hs(claims: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers or None)


def refused(verifier: Verifier, token: str | None, now: float = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now=now)
    return info.value


# -- HS256 -------------------------------------------------------------------------------------


def test_hs256_ok() -> None:
    token = hs({"role": "authenticated", "sub": "u1", "exp": NOW + 60, "iat": NOW, "email": "a@b"})
    p = Verifier(SECRET).verify(token, now=NOW)
    assert p == Principal(
        claims={"role": "authenticated", "sub": "u1", "exp": NOW + 60, "iat": NOW, "email": "a@b"},
        role="authenticated",
        sub="u1",
        exp=NOW + 60,
        token=token,
    )
    assert p.seconds_left(NOW + 10) == 50


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms(alg: str) -> None:
    token = jwt.encode({"role": "anon", "exp": NOW + 60}, SECRET, algorithm=alg)
    assert Verifier(SECRET).verify(token, now=NOW).role == "anon"


def test_mint_token_round_trip() -> None:
    token = mint_token(SECRET, role="service_role", sub="me", ttl=120, now=NOW, iss="tidings")
    p = Verifier(SECRET).verify(token, now=NOW)
    assert (p.role, p.sub, p.exp, p.claims["iss"], p.claims["iat"]) == (
        "service_role",
        "me",
        NOW + 120,
        "tidings",
        NOW,
    )


# -- every error of spec 1.3 / 8.4 ---------------------------------------------------------------


@pytest.mark.parametrize("token", [None, ""])
def test_missing_api_key(token: str | None) -> None:
    err = refused(Verifier(SECRET), token)
    assert err.http_message == "API key is missing"


@pytest.mark.parametrize("claims", [{"exp": NOW + 60}, {"role": "anon"}, {"sub": "x"}])
def test_missing_role_or_exp(claims: dict[str, Any]) -> None:
    err = refused(Verifier(SECRET), hs(claims))
    assert err.reason == CLAIMS
    assert err.code == "InvalidJWTToken"
    assert err.message == err.http_message == "Fields `role` and `exp` are required in JWT"


def test_expired_says_how_many_seconds_ago() -> None:
    err = refused(Verifier(SECRET), hs({"role": "anon", "exp": NOW - 12}))
    assert err.reason == "InvalidJWTToken: Token has expired 12 seconds ago"
    assert err.message == "Token has expired 12 seconds ago"
    assert err.http_message == "Token has expired"  # spec 1.3's HTTP body


def test_expiring_exactly_now_is_expired() -> None:
    err = refused(Verifier(SECRET), hs({"role": "anon", "exp": NOW}))
    assert err.message == "Token has expired 0 seconds ago"


@pytest.mark.parametrize("exp", ["tomorrow", True, [1], {"t": 1}])
def test_invalid_expiration(exp: Any) -> None:
    err = refused(Verifier(SECRET), hs({"role": "anon", "exp": exp}))
    assert err.reason == "InvalidJWTToken: Token expiration time is invalid"


@pytest.mark.parametrize("token", ["not-a-jwt", "a.b.c", "eyJhbGciOiJIUzI1NiJ9", "...", "sb_publishable_abc"])
def test_not_a_jwt(token: str) -> None:
    err = refused(Verifier(SECRET), token)
    assert err.reason == NOT_JWT
    assert err.http_message == "The token provided is not a valid JWT"


def test_non_numeric_iat_is_not_a_valid_jwt() -> None:
    # PyJWT itself refuses a non-numeric iat before our own check can; either way it is a bad token.
    err = refused(Verifier(SECRET), hs({"role": "anon", "exp": NOW + 60, "iat": "yesterday"}))
    assert err.reason == NOT_JWT


def test_bad_signature() -> None:
    token = hs({"role": "anon", "exp": NOW + 60}, secret="another-secret-that-is-long-enough-too!!")
    err = refused(Verifier(SECRET), token)
    assert err.reason == BAD_SIG
    assert err.http_message == "Failed to validate JWT signature"


def test_tampered_payload_is_a_bad_signature() -> None:
    header, _, sig = hs({"role": "anon", "exp": NOW + 60}).split(".")
    forged = jwt.utils.base64url_encode(
        json.dumps({"role": "service_role", "exp": NOW + 60}).encode()
    ).decode()
    assert refused(Verifier(SECRET), f"{header}.{forged}.{sig}").reason == BAD_SIG


def test_alg_none_has_no_signer() -> None:
    token = jwt.encode({"role": "service_role", "exp": NOW + 60}, "", algorithm="none")
    assert refused(Verifier(SECRET), token).reason == NO_SIGNER


def test_hmac_token_without_a_secret_has_no_signer() -> None:
    _, jwks = rsa_jwks("k1")
    err = refused(Verifier(jwks=jwks), hs({"role": "anon", "exp": NOW + 60}))
    assert err.reason == NO_SIGNER
    assert err.http_message == "Failed to generate JWT signer, check your JWT secret or JWKS configuration"


def test_rsa_token_without_a_jwks_has_no_signer() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode({"role": "anon", "exp": NOW + 60}, key, algorithm="RS256", headers={"kid": "k1"})
    assert refused(Verifier(SECRET), token).reason == NO_SIGNER


# -- JWKS --------------------------------------------------------------------------------------


def rsa_jwks(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, alg="RS256", use="sig")
    return key, {"keys": [jwk]}


def ec_jwks(kid: str) -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, alg="ES256", use="sig")
    return key, {"keys": [jwk]}


def test_jwks_rs256() -> None:
    key, jwks = rsa_jwks("rsa-1")
    token = jwt.encode({"role": "authenticated", "sub": "u", "exp": NOW + 60}, key, "RS256", {"kid": "rsa-1"})
    p = Verifier(jwks=jwks).verify(token, now=NOW)
    assert (p.role, p.sub) == ("authenticated", "u")


def test_jwks_es256() -> None:
    key, jwks = ec_jwks("ec-1")
    token = jwt.encode({"role": "authenticated", "exp": NOW + 60}, key, "ES256", {"kid": "ec-1"})
    assert Verifier(jwks=jwks).verify(token, now=NOW).role == "authenticated"


def test_jwks_as_json_text_and_key_choice_by_kid() -> None:
    rkey, rjwks = rsa_jwks("r")
    ekey, ejwks = ec_jwks("e")
    verifier = Verifier(jwks=json.dumps({"keys": rjwks["keys"] + ejwks["keys"]}))
    assert verifier.enabled
    for key, alg, kid in ((rkey, "RS256", "r"), (ekey, "ES256", "e")):
        token = jwt.encode({"role": "anon", "exp": NOW + 60}, key, alg, {"kid": kid})
        assert verifier.verify(token, now=NOW).role == "anon"
    unknown = jwt.encode({"role": "anon", "exp": NOW + 60}, rkey, "RS256", {"kid": "nope"})
    assert refused(verifier, unknown).reason == NO_SIGNER


def test_jwks_single_key_is_used_without_kid() -> None:
    key, jwks = rsa_jwks("only")
    token = jwt.encode({"role": "anon", "exp": NOW + 60}, key, "RS256")
    assert Verifier(jwks=jwks).verify(token, now=NOW).role == "anon"


def test_jwks_wrong_key_is_a_bad_signature() -> None:
    _, jwks = rsa_jwks("k")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode({"role": "anon", "exp": NOW + 60}, other, "RS256", {"kid": "k"})
    assert refused(Verifier(jwks=jwks), token).reason == BAD_SIG


def test_jwks_expired_and_missing_claims() -> None:
    key, jwks = ec_jwks("e")
    v = Verifier(jwks=jwks)
    expired = jwt.encode({"role": "anon", "exp": NOW - 5}, key, "ES256", {"kid": "e"})
    assert refused(v, expired).message == "Token has expired 5 seconds ago"
    no_role = jwt.encode({"exp": NOW + 5}, key, "ES256", {"kid": "e"})
    assert refused(v, no_role).reason == CLAIMS


def test_jwks_oct_key_for_hmac_tokens() -> None:
    oct_key = {
        "kty": "oct",
        "kid": "h",
        "k": jwt.utils.base64url_encode(SECRET.encode()).decode(),
        "alg": "HS256",
    }
    token = hs({"role": "anon", "exp": NOW + 60}, kid="h")
    assert Verifier(jwks={"keys": [oct_key]}).verify(token, now=NOW).role == "anon"


# -- claim validators --------------------------------------------------------------------------


def test_claim_validators() -> None:
    v = Verifier(SECRET, claim_validators={"iss": "supabase", "aud": "authenticated"})
    good = hs({"role": "anon", "exp": NOW + 60, "iss": "supabase", "aud": "authenticated"})
    assert v.verify(good, now=NOW).claims["iss"] == "supabase"
    wrong = hs({"role": "anon", "exp": NOW + 60, "iss": "someone-else", "aud": "authenticated"})
    assert refused(v, wrong).reason == "InvalidJWTToken: Claim `iss` is not valid"
    missing = hs({"role": "anon", "exp": NOW + 60, "iss": "supabase"})
    assert refused(v, missing).reason == "InvalidJWTToken: Claim `aud` is not valid"


# -- open mode ---------------------------------------------------------------------------------


def test_open_mode_accepts_everyone() -> None:
    v = Verifier()
    assert not v.enabled
    assert v.verify(None) is ANONYMOUS
    assert v.verify("") is ANONYMOUS
    assert v.verify("not-a-jwt") is ANONYMOUS


def test_open_mode_reads_identity_without_trusting_expiry() -> None:
    token = hs(
        {"role": "authenticated", "sub": "u1", "exp": NOW - 1000},
        secret="whatever-secret-the-client-used-to-sign-this",
    )
    p = Verifier().verify(token, now=NOW)
    assert (p.role, p.sub, p.exp, p.token) == ("authenticated", "u1", None, token)


def test_empty_secret_is_open_mode() -> None:
    assert not Verifier("").enabled
    assert not Verifier(None, jwks=None).enabled


def test_anonymous_never_expires() -> None:
    assert ANONYMOUS.seconds_left(time.time()) is None
    assert ANONYMOUS.role == "anon"


def test_verified_tokens_are_remembered_but_expiry_still_applies() -> None:
    from tidings.auth.tokens import Verifier, mint_token

    secret = "a-test-secret-of-at-least-thirty-two-bytes"
    verifier = Verifier(secret)
    token = mint_token(secret, role="anon", ttl=10, now=1_000.0)
    first = verifier.verify(token, now=1_001.0)
    assert verifier.verify(token, now=1_002.0) is first  # no second signature check
    try:
        verifier.verify(token, now=1_020.0)
    except Exception as exc:
        assert "Token has expired 10 seconds ago" in str(exc)
    else:
        raise AssertionError("an expired token was accepted from the cache")
