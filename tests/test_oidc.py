"""ID-token validation against the dev provider's real discovery and JWKS endpoints."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.config import build_config
from sidecar.errors import InvalidGrant, ProviderProtocolError, ProviderUnavailable, TokenValidationError
from sidecar.oidc import OidcClient, check_at_hash, token_hash
from sidecar.token_response import MAX_LIFETIME, token_set_from_response
from tests.stack import free_port, sidecar_settings, stack


@pytest.fixture
async def env() -> AsyncIterator[tuple[Any, OidcClient]]:
    async with stack(sidecar=False) as st, aiohttp.ClientSession() as http:
        config = build_config(sidecar_settings(st.issuer, free_port()))
        yield st, OidcClient(config, http)


def _claims(st: Any, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": st.issuer,
        "sub": "alice-sub-1",
        "aud": "sidecar-dev",
        "exp": now + 300,
        "iat": now,
        "nonce": "n-1",
        "email": "alice@example.com",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


async def test_valid_token_passes(env: Any) -> None:
    st, client = env
    claims = await client.validate_id_token(st.provider.keys.sign(_claims(st)), nonce="n-1")
    assert claims["email"] == "alice@example.com"


@pytest.mark.parametrize(
    "changes",
    [
        {"nonce": "other"},
        {"aud": "someone-else"},
        {"iss": "http://evil.example"},
        {"exp": int(time.time()) - 3600},
        {"iat": int(time.time()) + 3600},
        {"iat": None},
        {"aud": ["sidecar-dev", "other"], "azp": "other"},
        {"sub": None},
    ],
)
async def test_bad_claims_are_rejected(env: Any, changes: dict[str, Any]) -> None:
    st, client = env
    with pytest.raises(TokenValidationError):
        await client.validate_id_token(st.provider.keys.sign(_claims(st, **changes)), nonce="n-1")


async def test_tampered_and_foreign_tokens_are_rejected(env: Any) -> None:
    st, client = env
    good = st.provider.keys.sign(_claims(st))
    header, payload, sig = good.split(".")
    forged_payload = jwt.utils.base64url_encode(b'{"sub":"mallory"}').decode()
    with pytest.raises(TokenValidationError):
        await client.validate_id_token(f"{header}.{forged_payload}.{sig}", nonce="n-1")
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    foreign = jwt.encode(_claims(st), other_key, algorithm="RS256", headers={"kid": st.provider.keys.current.kid})
    with pytest.raises(TokenValidationError):
        await client.validate_id_token(foreign, nonce="n-1")
    unsigned = jwt.encode(_claims(st), None, algorithm="none")
    with pytest.raises(TokenValidationError):
        await client.validate_id_token(unsigned, nonce="n-1")
    hs = jwt.encode(_claims(st), "sidecar-dev-secret-that-is-long-enough", algorithm="HS256")
    with pytest.raises(TokenValidationError):
        await client.validate_id_token(hs, nonce="n-1")


async def test_unknown_kid_is_unavailable_until_a_refetch_is_allowed_then_followed(env: Any) -> None:
    st, client = env
    await client.validate_id_token(st.provider.keys.sign(_claims(st)), nonce="n-1")
    st.provider.rotate_keys(keep_old=False)
    rotated = st.provider.keys.sign(_claims(st))
    for _ in range(5):  # a key we cannot look up yet is "unavailable", never "invalid"
        with pytest.raises(ProviderUnavailable):
            await client.validate_id_token(rotated, nonce="n-1")
    assert st.provider.stats()["jwks_calls"] == 1  # the refetch is rate limited
    client.jwks_min_refetch = 0.3
    await asyncio.sleep(0.35)
    claims = await client.validate_id_token(rotated, nonce="n-1")
    assert claims["sub"] == "alice-sub-1" and st.provider.stats()["jwks_calls"] == 2
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client.jwks_min_refetch = 0.0
    unknown = jwt.encode(_claims(st), other_key, algorithm="RS256", headers={"kid": "never-published"})
    with pytest.raises(TokenValidationError):  # absent from a key set fetched for it: invalid
        await client.validate_id_token(unknown, nonce="n-1")


async def test_refresh_errors_are_classified(env: Any) -> None:
    st, client = env
    with pytest.raises(InvalidGrant):
        await client.refresh("not-a-real-token")
    st.provider.inject_fault("500", count=-1)
    with pytest.raises(ProviderUnavailable):
        await client.refresh("whatever")
    calls = st.provider.stats()["token_calls"]["refresh_token"]
    assert calls == 1 + 2  # the invalid one, then the 500 tried once and retried once (--provider-retries 1)


def test_token_response_without_expires_in_keeps_lifetime_unknown() -> None:
    opaque = token_set_from_response({"access_token": "opaque-token", "token_type": "bearer"}, now=1000.0)
    assert opaque.access_expires_at is None and opaque.refresh_token is None
    jwt_token = jwt.encode({"exp": 5000}, "k" * 32, algorithm="HS256")
    assert token_set_from_response({"access_token": jwt_token}, now=1000.0).access_expires_at == 5000
    keycloak = token_set_from_response(
        {"access_token": "a", "expires_in": 300, "refresh_token": "r", "refresh_expires_in": 1800}, now=1000.0
    )
    assert keycloak.access_expires_at == 1300 and keycloak.refresh_expires_at == 2800
    offline = token_set_from_response({"access_token": "a", "refresh_token": "r", "refresh_expires_in": 0}, now=1.0)
    assert offline.refresh_expires_at is None  # 0 = no expiry told: --refresh-token-ttl applies
    with pytest.raises(ProviderProtocolError):
        token_set_from_response({"token_type": "Bearer"}, now=1.0)


ODD_LIFETIMES = [1e300, float("inf"), float("-inf"), float("nan"), "abc", "", "9" * 40, "1e5", " 12", "١٢", -5, -1e300,
                 True, False, None, [], {}, {"a": 1}, 10**400]  # fmt: skip


@pytest.mark.parametrize("odd", ODD_LIFETIMES, ids=repr)
def test_odd_lifetimes_are_unknown_or_capped_never_a_crash(odd: Any) -> None:
    now = 1000.0
    for field in ("expires_in", "refresh_expires_in"):
        tokens = token_set_from_response({"access_token": "opaque", "refresh_token": "r", field: odd}, now=now)
        for at in (tokens.access_expires_at, tokens.refresh_expires_at):
            assert at is None or (now < at <= now + MAX_LIFETIME and at == at)  # finite, capped, not NaN
    huge_jwt = jwt.encode({"exp": 1e300}, "k" * 32, algorithm="HS256")
    assert token_set_from_response({"access_token": huge_jwt}, now=now).access_expires_at == now + MAX_LIFETIME


@pytest.mark.parametrize(
    "body",
    [
        {"access_token": ""},
        {"access_token": 42},
        {"access_token": ["a"]},
        {"access_token": "a", "token_type": "mac"},
        {"access_token": "a", "token_type": "DPoP"},
        {"access_token": "a", "token_type": 7},
        {"access_token": "a", "id_token": 5},
        {"access_token": "a", "refresh_token": {"x": 1}},
    ],
    ids=repr,
)
def test_malformed_token_responses_are_protocol_errors(body: dict[str, Any]) -> None:
    with pytest.raises(ProviderProtocolError):
        token_set_from_response(body, now=1.0)


def test_at_hash_is_the_left_half_of_the_algs_hash() -> None:
    # OpenID Connect Core 1.0, Appendix A.3 (an RS256 ID token issued with this access token).
    assert token_hash("jHkWEdUXMU1BwAsC4vtUsZwnNvTIxEl0z9K3vx5KF0Y", "RS256") == "77QmUPtjPfzWtF2AnpK9RQ"
    assert len(token_hash("t", "ES384") or "") == 32 and len(token_hash("t", "PS512") or "") == 43
    assert token_hash("t", "EdDSA") == token_hash("t", "RS512")  # Ed25519 hashes with SHA-512
    assert token_hash("t", "HS256") is None and token_hash("t", "none") is None


async def test_at_hash_mismatches_are_refused(env: Any) -> None:
    st, _ = env
    access = "the-access-token"
    good = token_hash(access, "RS256")
    check_at_hash(st.provider.keys.sign(_claims(st, at_hash=good)), access)
    check_at_hash(st.provider.keys.sign(_claims(st)), access)  # no at_hash: nothing to check
    full = __import__("base64").urlsafe_b64encode(__import__("hashlib").sha256(access.encode()).digest()).decode()
    for wrong in (token_hash("another-token", "RS256"), "", 123, None, [good], full, (good or "") + "=",
                  token_hash(access, "RS384"), (good or "").upper()):  # fmt: skip
        with pytest.raises(TokenValidationError):
            check_at_hash(st.provider.keys.sign({**_claims(st), "at_hash": wrong}), access)
