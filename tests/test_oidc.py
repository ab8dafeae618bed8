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
from sidecar.errors import InvalidGrant, ProviderUnavailable, TokenValidationError
from sidecar.oidc import OidcClient, token_set_from_response
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


async def test_key_rotation_is_followed_by_refetching_jwks(env: Any) -> None:
    st, client = env
    await client.validate_id_token(st.provider.keys.sign(_claims(st)), nonce="n-1")
    st.provider.rotate_keys(keep_old=False)
    await asyncio.sleep(1.1)  # unknown kids refetch the JWKS at most once a second
    claims = await client.validate_id_token(st.provider.keys.sign(_claims(st)), nonce="n-1")
    assert claims["sub"] == "alice-sub-1"


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
    with pytest.raises(ProviderUnavailable):
        token_set_from_response({"token_type": "Bearer"}, now=1.0)
