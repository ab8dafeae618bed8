"""OpenID Connect on the authorization server: discovery, JWKS and ID tokens (OIDC Core 3.1.3.3, 3.1.3.7).

The ID token is checked here with PyJWT against the keys the server publishes at its ``jwks_uri`` (what any
relying party does); real OpenID clients (openid-client, oidc-agent) run against it in the e2e client tests.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt

from tests.stack import browser, sign_in
from tests.test_oauth_authorize import approve, authorize_params, consent_page, oauth_stack, pkce, redeem, register


async def _get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, (url, resp.status)
        body: dict[str, Any] = await resp.json()
        return body


def _verify(token: str, jwks: dict[str, Any], issuer: str, audience: str) -> dict[str, Any]:
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    claims: dict[str, Any] = jwt.decode(
        token,
        jwt.PyJWK(key).key,
        algorithms=["ES256"],
        audience=audience,
        issuer=issuer,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "auth_time"]},
    )
    return claims


def _at_hash(access_token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(access_token.encode()).digest()[:16]).rstrip(b"=").decode()


async def test_discovery_jwks_and_id_tokens_for_code_refresh_and_scopes() -> None:
    async with oauth_stack() as st, browser() as client:
        base = st.base
        oidc = await _get_json(base + "/.well-known/openid-configuration")
        assert oidc["issuer"] == base and oidc["jwks_uri"] == base + "/oauth2/jwks"
        assert oidc["subject_types_supported"] == ["public"]
        assert oidc["id_token_signing_alg_values_supported"] == ["ES256"]
        assert oidc["token_endpoint"] == base + "/oauth2/token" and "openid" in oidc["scopes_supported"]
        as_meta = await _get_json(base + "/.well-known/oauth-authorization-server")
        assert {k: v for k, v in oidc.items() if k in as_meta} == as_meta
        jwks = await _get_json(oidc["jwks_uri"])
        assert [k["kty"] for k in jwks["keys"]] == ["EC"] and "d" not in jwks["keys"][0]

        reg = await register(base)
        await sign_in(client, base)
        subs = []
        for scope, nonce in [("openid email profile offline_access", "n-0S6_WzA2Mj"), ("openid", "")]:
            verifier, challenge = pkce()
            extra = {"scope": scope, **({"nonce": nonce} if nonce else {})}
            page = await consent_page(client, base, authorize_params(reg["client_id"], challenge, **extra))
            code = parse_qs(urlsplit(await approve(client, base, page)).query)["code"][0]
            status, tokens = await redeem(base, reg["client_id"], code, verifier)
            assert status == 200, tokens
            claims = _verify(tokens["id_token"], jwks, base, reg["client_id"])
            assert claims["at_hash"] == _at_hash(tokens["access_token"])
            assert claims.get("nonce", "") == nonce
            assert claims["exp"] > claims["iat"] and claims["auth_time"] <= claims["iat"]
            if "email" in scope:
                assert claims["email"] == "alice@example.com" and claims["preferred_username"]
            else:
                assert "email" not in claims and "preferred_username" not in claims
            subs.append(claims["sub"])
            form = {
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": reg["client_id"],
            }
            async with aiohttp.ClientSession() as http, http.post(f"{base}/oauth2/token", data=form) as resp:
                refreshed = await resp.json()
                assert resp.status == 200, refreshed
            again = _verify(refreshed["id_token"], jwks, base, reg["client_id"])
            assert again["sub"] == claims["sub"] and "nonce" not in again  # OIDC Core 12.2
            assert again["at_hash"] == _at_hash(refreshed["access_token"])
        assert subs[0] == subs[1]  # stable per user across grants

        verifier, challenge = pkce()  # no openid: no ID token
        page = await consent_page(client, base, authorize_params(reg["client_id"], challenge, scope="email"))
        code = parse_qs(urlsplit(await approve(client, base, page)).query)["code"][0]
        status, tokens = await redeem(base, reg["client_id"], code, verifier)
        assert status == 200 and "id_token" not in tokens and tokens["scope"] == "email"

        _, challenge = pkce()  # a hostile nonce is refused before any consent
        for bad in ["x" * 513, "caf\u00e9", "a\nb"]:
            params = authorize_params(reg["client_id"], challenge, nonce=bad)
            async with client.get(f"{base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
                assert resp.status == 302 and "error=invalid_request" in resp.headers["Location"], bad


def test_signing_key_follows_the_cookie_secret_and_rotation_publishes_both() -> None:
    from sidecar.config import build_config
    from sidecar.oauth import id_token
    from tests.stack import sidecar_settings

    old, new = "a" * 32, "b" * 32
    before = build_config({**sidecar_settings("http://127.0.0.1:1", 2, "http://127.0.0.1:3/"), "cookie_secret": [old]})
    after = before.replace(cookie_secret=[new, old])
    kids = [k["kid"] for k in id_token.jwks(after)["keys"]]
    assert len(kids) == 2 and kids[1] == id_token.jwks(before)["keys"][0]["kid"]  # the old key stays published
    assert id_token.signing_key(new.encode())[1] == id_token.signing_key(new.encode())[1]  # every replica: same key
    token = jwt.encode({"sub": "x"}, id_token.signing_key(new.encode())[0], algorithm="ES256")
    assert jwt.decode(token, jwt.PyJWK(id_token.jwks(after)["keys"][0]).key, algorithms=["ES256"]) == {"sub": "x"}
