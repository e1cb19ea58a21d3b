"""Tokens from untrusted clients (issue 11, sections 2 and 5).

* Open mode cached every token with its claims: 300 x 391 KB tokens = +2.2 GB, kept after
  disconnect. Now tokens over MAX_TOKEN_BYTES are refused, the cache is bounded by
  TOKEN_CACHE_BYTES, and open mode (which verifies nothing) remembers only short tokens.
* JWKS ``kid`` crash: an HS256 or ES256 token whose ``kid`` names the RSA key raised a TypeError:
  REST 500 with a traceback, the upgrade dropped without CONNECT_ERROR_BACKOFF. Now 401 everywhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from tests.server.test_bad_input import (
    WAIT,
    heartbeat_ok,
    join,
    metric,
    open_ws,
    recv_json,
    refused,
    ws_url,
)
from tests.support.server import ServerProcess
from tidings.auth.tokens import OPEN_MODE_CACHED_TOKEN_BYTES, AuthError, Verifier

ServerFactory = Callable[..., ServerProcess]

SECRET = "security-token-test-secret-that-is-long-enough-for-hs256"
NOW = 1_800_000_000.0
NO_SIGNER = "JwtSignerError: Failed to generate JWT signer, check your JWT secret or JWKS configuration"


def padded_token(size: int, sub: str, secret: str = SECRET) -> str:
    """An HS256 token of about ``size`` bytes (a big claim inside), like the 391 KB ones."""
    pad = "p" * max(0, (size - 200) * 3 // 4)
    return jwt.encode(
        {"role": "authenticated", "sub": sub, "exp": int(time.time()) + 600, "pad": pad}, secret, "HS256"
    )


def refused_with(verifier: Verifier, token: str, now: float = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now=now)
    return info.value


# -- unit: limits of the verifier ----------------------------------------------------------------


def test_token_over_max_token_bytes_is_refused_in_both_modes() -> None:
    token = padded_token(3000, "u")
    assert len(token) > 2048
    for verifier in (Verifier(SECRET, max_token_bytes=2048), Verifier(max_token_bytes=2048)):
        err = refused_with(verifier, token, now=time.time())
        assert err.reason == "InvalidJWTToken: Token is larger than 2048 bytes"
        assert verifier.too_large == 1
    assert Verifier(SECRET, max_token_bytes=len(token)).verify(token).sub == "u"


def test_cache_is_bounded_by_bytes_oldest_out_first() -> None:
    verifier = Verifier(SECRET, cache_bytes=64 * 1024)
    tokens = [padded_token(8000, f"u{i}") for i in range(20)]  # ~16 KB of budget each
    for token in tokens:
        verifier.verify(token)
    assert verifier.cached_bytes <= 64 * 1024
    assert 0 < verifier.cached_tokens < 20
    newest = verifier.verify(tokens[-1])
    assert verifier.verify(tokens[-1]) is newest  # the newest is still remembered


def test_open_mode_remembers_only_short_tokens() -> None:
    verifier = Verifier()
    small = padded_token(400, "small")
    first = verifier.verify(small)
    assert verifier.verify(small) is first  # shared by every connection with the same key
    before = verifier.cached_bytes
    for i in range(50):
        big = padded_token(OPEN_MODE_CACHED_TOKEN_BYTES + 4000, f"big{i}")
        assert verifier.verify(big).sub == f"big{i}"
    assert verifier.cached_bytes == before and verifier.cached_tokens == 1


def test_refused_tokens_are_never_remembered() -> None:
    verifier = Verifier(SECRET)
    bad = jwt.encode({"role": "anon", "exp": NOW + 60}, "another-secret-of-enough-length-0123456789", "HS256")
    for _ in range(3):
        refused_with(verifier, bad)
    assert verifier.cached_tokens == 0


def hs256_by_hand(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token PyJWT would refuse to make (any header, any key bytes)."""

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims).encode())
    return (signing_input + b"." + b64(hmac.new(secret, signing_input, hashlib.sha256).digest())).decode()


def rsa_jwks(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, alg="RS256", use="sig")
    return key, {"keys": [jwk]}


def public_pem_as_hmac_secret(key: rsa.RSAPrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_kid_naming_a_key_of_another_type_is_no_signer_not_a_crash() -> None:
    rkey, jwks = rsa_jwks("rsa")
    verifier = Verifier(jwks=jwks)
    claims = {"role": "anon", "exp": NOW + 60}
    tokens = {
        "HS256": jwt.encode(claims, "x" * 40, "HS256", {"kid": "rsa"}),
        "ES256": jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), "ES256", {"kid": "rsa"}),
    }
    for alg, token in tokens.items():
        assert refused_with(verifier, token).reason == NO_SIGNER, alg
    # The classic confusion: HS256 signed with the RSA public key's PEM as the HMAC secret.
    token = hs256_by_hand({"alg": "HS256", "kid": "rsa"}, claims, public_pem_as_hmac_secret(rkey))
    assert refused_with(verifier, token).reason == NO_SIGNER


def test_kid_naming_the_rsa_key_falls_back_to_the_secret_for_hmac() -> None:
    _, jwks = rsa_jwks("rsa")
    verifier = Verifier(SECRET, jwks=jwks)
    good = jwt.encode({"role": "anon", "exp": NOW + 60}, SECRET, "HS256", {"kid": "rsa"})
    assert verifier.verify(good, now=NOW).role == "anon"
    forged = jwt.encode({"role": "anon", "exp": NOW + 60}, "x" * 40, "HS256", {"kid": "rsa"})
    assert refused_with(verifier, forged).reason == "JwtSignatureError: Failed to validate JWT signature"


@pytest.mark.parametrize("kid", [["rsa"], {"k": 1}, 5])
def test_kid_that_is_not_a_string_is_not_a_valid_jwt(kid: Any) -> None:
    _, jwks = rsa_jwks("rsa")
    token = hs256_by_hand({"alg": "HS256", "kid": kid}, {"role": "anon", "exp": NOW + 60}, b"x" * 40)
    assert refused_with(Verifier(SECRET, jwks=jwks), token).reason == (
        "MalformedJWT: The token provided is not a valid JWT"
    )


# -- against a real server -------------------------------------------------------------------------


async def test_jwks_kid_mismatch_is_401_on_rest_and_upgrade_and_shuts_the_channel(
    server_factory: ServerFactory,
) -> None:
    rkey, jwks = rsa_jwks("rsa")
    srv = server_factory(env={"JWT_JWKS": json.dumps(jwks), "CONNECT_ERROR_BACKOFF_MS": "200ms"})
    claims = {"role": "anon", "exp": int(time.time()) + 600}
    bad = {
        "HS256": jwt.encode(claims, "x" * 40, "HS256", {"kid": "rsa"}),
        "ES256": jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), "ES256", {"kid": "rsa"}),
    }
    good = jwt.encode({**claims, "role": "authenticated"}, rkey, "RS256", {"kid": "rsa"})
    message = {"messages": [{"topic": "room", "event": "e", "payload": {}}]}
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        for token in bad.values():
            r = await http.post("/api/broadcast", json=message, headers={"apikey": token})
            assert (r.status_code, r.json()) == (401, {"message": "Unauthorized"})
            status, body = await refused(ws_url(srv, apikey=token))
            assert (status, body) == (401, {"error": NO_SIGNER.split(": ", 1)[1]})
        assert (await http.post("/api/broadcast", json=message, headers={"apikey": good})).status_code == 202
        async with open_ws(ws_url(srv, apikey=good)) as ws:
            assert (await join(ws, access_token=good))["status"] == "ok"
            # A join with such a token: the join error, not a crash.
            await ws.send(
                orjson.dumps(
                    ["2", "2", "realtime:other", "phx_join", {"access_token": bad["HS256"]}]
                ).decode()
            )
            reply = await recv_json(ws)
            assert reply[4] == {"status": "error", "response": {"reason": NO_SIGNER}}
            # The access_token event on the joined channel: the channel is shut down, as documented.
            await ws.send(
                orjson.dumps(
                    ["1", "3", "realtime:room", "access_token", {"access_token": bad["ES256"]}]
                ).decode()
            )
            system = await recv_json(ws)
            assert system[3] == "system" and system[4]["status"] == "error", system
            assert system[4]["message"] == NO_SIGNER.split(": ", 1)[1]
            assert (await recv_json(ws))[3] == "phx_close"
            await heartbeat_ok(ws)
    assert "Traceback" not in srv.logs()


async def test_open_mode_big_tokens_are_refused_and_accepted_ones_are_not_kept(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(env={"MAX_TOKEN_BYTES": "16384"})
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=WAIT) as http:
        too_big = padded_token(20_000, "big")
        # In a header: a URL that long is refused before (MAX_REQUEST_URL).
        status, body = await refused(ws_url(srv), additional_headers={"x-api-key": too_big})
        assert (status, body) == (401, {"error": "Token is larger than 16384 bytes"})
        r = await http.post(
            "/api/broadcast",
            json={"messages": [{"topic": "room", "event": "e", "payload": {}}]},
            headers={"apikey": too_big},
        )
        assert r.status_code == 401
        assert await metric(http, "tidings_tokens_too_large_total") == 2
        # 30 connections, each with its own 12 KB token (under the cap): none is remembered.
        for i in range(30):
            headers = {"x-api-key": padded_token(12_000, f"user-{i}")}
            async with open_ws(ws_url(srv), additional_headers=headers) as ws:
                await heartbeat_ok(ws)
        assert await metric(http, "tidings_token_cache_bytes") == 0
        # A join's access_token over the cap: the join error with the same message.
        async with open_ws(ws_url(srv)) as ws:
            await ws.send(
                orjson.dumps(["1", "1", "realtime:room", "phx_join", {"access_token": too_big}]).decode()
            )
            reply = await recv_json(ws)
            assert reply[4] == {
                "status": "error",
                "response": {"reason": "InvalidJWTToken: Token is larger than 16384 bytes"},
            }
