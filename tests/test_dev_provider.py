"""Real-HTTP tests of the development OIDC provider and the demo app."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlsplit

import aiohttp
import jwt
import pytest
from aiohttp import web

from sidecar.dev.demo_app import demo_app
from sidecar.dev.provider import ClientReg, DevProvider, run_provider
from tests.redis_procs import free_ports

CLIENT = ("sidecar-dev", "sidecar-dev-secret")
REDIRECT = "http://127.0.0.1:4180/oauth2/callback"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free loopback port below the ephemeral range (see ``tests.redis_procs.free_ports``)."""
    return free_ports(1)[0]


def basic_auth(client_id: str, secret: str) -> dict[str, str]:
    """client_secret_basic header, form-url-encoding both parts as RFC 6749 2.3.1 says."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@pytest.fixture
async def idp() -> AsyncIterator[tuple[DevProvider, aiohttp.ClientSession]]:
    port = free_port()
    runner, provider = await run_provider("127.0.0.1", port, auto_login="alice")
    assert provider.issuer == f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(base_url=provider.issuer) as http:
        yield provider, http
    await runner.cleanup()


async def authorize(http: aiohttp.ClientSession, **extra: str) -> dict[str, str]:
    """Run /authorize (auto_login) and return the callback's query parameters."""
    params = {
        "client_id": CLIENT[0],
        "redirect_uri": REDIRECT,
        "response_type": "code",
        "scope": "openid email profile",
        "state": "st-1",
        "nonce": "n-1",
        "code_challenge_method": "S256",
        **extra,
    }
    async with http.get("/authorize", params=params, allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        loc = r.headers["Location"]
    assert loc.startswith(REDIRECT)
    return {k: v[0] for k, v in parse_qs(urlsplit(loc).query).items()}


async def token(http: aiohttp.ClientSession, form: dict[str, str], basic: bool = True) -> tuple[int, dict[str, Any]]:
    headers = basic_auth(*CLIENT) if basic else {}
    if not basic:
        form = {**form, "client_id": CLIENT[0], "client_secret": CLIENT[1]}
    async with http.post("/token", data=form, headers=headers) as r:
        assert r.headers.get("Cache-Control") == "no-store"
        return r.status, await r.json()


async def login(http: aiohttp.ClientSession, nonce: str = "n-1") -> dict[str, Any]:
    verifier, challenge = pkce()
    q = await authorize(http, code_challenge=challenge, nonce=nonce)
    status, body = await token(
        http,
        {
            "grant_type": "authorization_code",
            "code": q["code"],
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        },
    )
    assert status == 200, body
    return body


async def refresh(http: aiohttp.ClientSession, rt: str) -> tuple[int, dict[str, Any]]:
    return await token(http, {"grant_type": "refresh_token", "refresh_token": rt})


async def verify_id_token(http: aiohttp.ClientSession, issuer: str, tok: str) -> dict[str, Any]:
    async with http.get("/jwks") as r:
        jwks = await r.json()
    kid = jwt.get_unverified_header(tok)["kid"]
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    key = jwt.PyJWK(jwk).key
    claims: dict[str, Any] = jwt.decode(tok, key, algorithms=["RS256"], audience=CLIENT[0], issuer=issuer)
    return claims


async def test_discovery(idp: tuple[DevProvider, aiohttp.ClientSession]) -> None:
    p, http = idp
    async with http.get("/.well-known/openid-configuration") as r:
        doc = await r.json()
    assert doc["issuer"] == p.issuer
    assert doc["token_endpoint"] == p.issuer + "/token"
    assert doc["end_session_endpoint"] == p.issuer + "/logout"
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert "client_secret_basic" in doc["token_endpoint_auth_methods_supported"]


async def test_code_flow_id_token_and_userinfo(
    idp: tuple[DevProvider, aiohttp.ClientSession],
) -> None:
    p, http = idp
    body = await login(http, nonce="nonce-xyz")
    assert body["token_type"] == "Bearer" and body["expires_in"] == 60
    assert body["refresh_expires_in"] in (3599, 3600)
    claims = await verify_id_token(http, p.issuer, body["id_token"])
    assert claims["nonce"] == "nonce-xyz"
    assert claims["sub"] == "alice-sub-1" and claims["azp"] == CLIENT[0]
    assert claims["groups"] == ["admins", "staff"] and claims["email_verified"] is True
    assert claims["exp"] - claims["iat"] == 300
    at = await verify_id_token(http, p.issuer, body["access_token"])
    assert at["client_id"] == CLIENT[0] and at["scope"] == "openid email profile"
    async with http.get("/userinfo", headers={"Authorization": "Bearer " + body["access_token"]}) as r:
        assert r.status == 200
        assert (await r.json())["email"] == "alice@example.com"
    async with http.get("/userinfo", headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert p.userinfo_calls == 2


async def test_authorize_errors_and_login_page(
    idp: tuple[DevProvider, aiohttp.ClientSession],
) -> None:
    p, http = idp
    q = await authorize(http)  # no code_challenge
    assert q["error"] == "invalid_request" and q["state"] == "st-1"
    async with http.get("/authorize", params={"client_id": "evil", "redirect_uri": REDIRECT}) as r:
        assert r.status == 400
    p.config(auto_login=None)
    _, challenge = pkce()
    params = {
        "client_id": CLIENT[0],
        "redirect_uri": REDIRECT,
        "response_type": "code",
        "scope": "openid",
        "state": "<s>",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    async with http.get("/authorize", params=params) as r:
        page = await r.text()
    assert "not for production" in page and "&lt;s&gt;" in page and "<s>" not in page
    async with http.post("/authorize", data={**params, "user": "mallory"}) as r:
        assert r.status == 400
    async with http.post("/authorize", data={**params, "user": "bob"}, allow_redirects=False) as r:
        assert r.status == 302
        assert "code=" in r.headers["Location"] and "state=%3Cs%3E" in r.headers["Location"]


async def test_bad_verifier_and_code_reuse(idp: tuple[DevProvider, aiohttp.ClientSession]) -> None:
    _, http = idp
    verifier, challenge = pkce()
    q = await authorize(http, code_challenge=challenge)
    form = {
        "grant_type": "authorization_code",
        "code": q["code"],
        "redirect_uri": REDIRECT,
        "code_verifier": pkce()[0],
    }
    status, body = await token(http, form)
    assert (status, body["error"]) == (400, "invalid_grant")
    q = await authorize(http, code_challenge=challenge)
    form = {**form, "code": q["code"], "code_verifier": verifier}
    assert (await token(http, form, basic=False))[0] == 200  # client_secret_post
    status, body = await token(http, form)
    assert (status, body["error"]) == (400, "invalid_grant")
    async with http.post("/token", data=form, headers=basic_auth(CLIENT[0], "wrong")) as r:
        assert r.status == 401 and "WWW-Authenticate" in r.headers
        assert (await r.json())["error"] == "invalid_client"


async def test_refresh_without_rotation(idp: tuple[DevProvider, aiohttp.ClientSession]) -> None:
    p, http = idp
    body = await login(http)
    status, new = await refresh(http, body["refresh_token"])
    assert (
        status == 200
        and "refresh_token" not in new
        and "nonce" not in jwt.decode(new["id_token"], options={"verify_signature": False})
    )
    p.config(return_same_refresh_token=True, send_id_token_on_refresh=False)
    status, new = await refresh(http, body["refresh_token"])
    assert new["refresh_token"] == body["refresh_token"] and "id_token" not in new
    assert p.token_calls == {"authorization_code": 1, "refresh_token": 2}
    status, new = await refresh(http, "bogus")
    assert (status, new["error"]) == (400, "invalid_grant")


async def test_rotation_and_reuse_detection(
    idp: tuple[DevProvider, aiohttp.ClientSession],
) -> None:
    p, http = idp
    p.config(rotate_refresh_tokens=True)
    first = (await login(http))["refresh_token"]
    status, body = await refresh(http, first)
    second = body["refresh_token"]
    assert status == 200 and second != first
    status, body = await refresh(http, first)
    assert (status, body["error"]) == (400, "invalid_grant")
    assert p.reuse_detected == 1
    status, body = await refresh(http, second)  # whole family revoked
    assert (status, body["error"]) == (400, "invalid_grant")
    assert len(p.refresh_tokens_presented) == 3


async def test_concurrent_rotation_is_serialized(
    idp: tuple[DevProvider, aiohttp.ClientSession],
) -> None:
    p, http = idp
    p.config(rotate_refresh_tokens=True)
    rt = (await login(http))["refresh_token"]
    p.inject_fault("slow", count=1, delay=0.2)
    results = await asyncio.gather(refresh(http, rt), refresh(http, rt))
    assert sorted(s for s, _ in results) == [200, 400]
    assert p.reuse_detected == 1 and p.token_calls["refresh_token"] == 2


async def test_fault_injection(idp: tuple[DevProvider, aiohttp.ClientSession]) -> None:
    p, http = idp
    rt = (await login(http))["refresh_token"]
    p.inject_fault("500", count=1)
    p.inject_fault("invalid_grant", count=1)
    assert (await refresh(http, rt))[0] == 500
    status, body = await refresh(http, rt)
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await refresh(http, rt))[0] == 200  # faults used up, token still good
    p.inject_fault("invalid_json", count=-1)
    async with http.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": rt},
        headers=basic_auth(*CLIENT),
    ) as r:
        with pytest.raises(ValueError):
            await r.json()
    p.clear_faults()
    assert (await refresh(http, rt))[0] == 200
    p.inject_fault("timeout", delay=30)  # the fixture's cleanup must not wait for it
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(refresh(http, rt), 0.2)
    assert p.token_calls["refresh_token"] == 6
    with pytest.raises(ValueError):
        p.inject_fault("explode")


async def test_revocation(idp: tuple[DevProvider, aiohttp.ClientSession]) -> None:
    p, http = idp
    body = await login(http)
    auth = basic_auth(*CLIENT)
    async with http.post("/revoke", data={"token": "unknown"}, headers=auth) as r:
        assert r.status == 200
    async with http.post(
        "/revoke",
        data={"token": body["refresh_token"], "token_type_hint": "refresh_token"},
        headers=auth,
    ) as r:
        assert r.status == 200
    assert p.revocations == 2
    assert (await refresh(http, body["refresh_token"]))[0] == 400
    bearer = {"Authorization": "Bearer " + body["access_token"]}
    async with http.get("/userinfo", headers=bearer) as r:
        assert r.status == 401  # its family is gone too
    async with http.post("/revoke", data={"token": "x"}) as r:
        assert r.status == 401


async def test_logout(idp: tuple[DevProvider, aiohttp.ClientSession]) -> None:
    p, http = idp
    params = {"post_logout_redirect_uri": "http://127.0.0.1:4180/bye", "state": "s9"}
    async with http.get("/logout", params=params, allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == "http://127.0.0.1:4180/bye?state=s9"
    async with http.get("/logout") as r:
        assert r.status == 200 and "Signed out" in await r.text()
    assert p.logout_calls == 2


async def test_control_api_over_http(idp: tuple[DevProvider, aiohttp.ClientSession]) -> None:
    p, http = idp
    async with http.post("/_control/config", json={"rotate_refresh_tokens": True, "access_token_ttl": 30}) as r:
        assert r.status == 200 and (await r.json())["access_token_ttl"] == 30
    async with http.post("/_control/config", json={"nope": 1}) as r:
        assert r.status == 400
    async with http.post("/_control/set_groups", json={"user": "alice", "groups": ["x"]}) as r:
        assert r.status == 200
    body = await login(http)
    assert body["expires_in"] == 30
    assert jwt.decode(body["id_token"], options={"verify_signature": False})["groups"] == ["x"]
    async with http.post("/_control/fault", json={"kind": "503", "count": 1}) as r:
        assert r.status == 200
    assert (await refresh(http, body["refresh_token"]))[0] == 503
    async with http.post("/_control/revoke_user", json={"sub": "alice-sub-1"}) as r:
        assert (await r.json())["revoked"] == 1
    assert (await refresh(http, body["refresh_token"]))[0] == 400
    async with http.get("/_control/stats") as r:
        stats = await r.json()
    assert stats["token_calls"] == {"authorization_code": 1, "refresh_token": 2}
    assert stats["rotate_refresh_tokens"] is True and len(stats["refresh_tokens_presented"]) == 2
    async with http.post("/_control/reset_counters") as r:
        assert r.status == 200
    assert p.token_calls["refresh_token"] == 0 and p.refresh_tokens_presented == []


async def test_key_rotation(idp: tuple[DevProvider, aiohttp.ClientSession]) -> None:
    p, http = idp
    old = await login(http)
    old_kid = jwt.get_unverified_header(old["id_token"])["kid"]
    async with http.post("/_control/rotate_keys", json={"keep_old": True}) as r:
        new_kid = (await r.json())["kid"]
    new = await login(http)
    assert jwt.get_unverified_header(new["id_token"])["kid"] == new_kid != old_kid
    await verify_id_token(http, p.issuer, old["id_token"])
    await verify_id_token(http, p.issuer, new["id_token"])
    p.rotate_keys(keep_old=False)
    async with http.get("/jwks") as r:
        kids = [k["kid"] for k in (await r.json())["keys"]]
    assert len(kids) == 1 and new_kid not in kids


async def test_port_zero_and_isolated_users() -> None:
    runner, p = await run_provider("127.0.0.1", 0)
    try:
        assert not p.issuer.endswith(":0")
        p.set_groups("bob", [])
        assert DevProvider("http://x").users["bob"].groups == ["staff"]
        url = p.issuer + "/.well-known/openid-configuration"
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            assert (await r.json())["issuer"] == p.issuer
    finally:
        await runner.cleanup()


async def test_standalone_subprocess() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "sidecar.dev.provider",
        "--port",
        str(port),
        "--rotate-refresh-tokens",
        "--access-token-ttl",
        "42",
    ]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert f"127.0.0.1:{port}" in line.decode()
        url = f"http://127.0.0.1:{port}/_control/stats"
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            stats = await r.json()
        assert stats["rotate_refresh_tokens"] is True and stats["access_token_ttl"] == 42
    finally:
        proc.terminate()
        await proc.communicate()


async def test_demo_app() -> None:
    runner = web.AppRunner(demo_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    at = jwt.encode({"exp": 2_000_000_000}, "k" * 32, algorithm="HS256")
    headers = {
        "X-Forwarded-User": "alice",
        "X-Evil": "<script>x</script>",
        "Authorization": "Bearer " + at,
    }
    try:
        async with aiohttp.ClientSession(base_url=base) as http:
            async with http.get("/some/path?q=1", headers=headers) as r:
                page = await r.text()
            assert "<title>sidecar demo app</title>" in page and "2000000000" in page
            assert "&lt;script&gt;x&lt;/script&gt;" in page and at not in page
            async with http.post("/_demo/echo?a=1", data=b"hello") as r:
                echo = await r.json()
            assert echo["method"] == "POST" and echo["query"] == {"a": ["1"]}
            assert echo["body_length"] == 5
            async with http.get("/_demo/stream", params={"n": "3", "delay": "0"}) as r:
                assert await r.text() == "chunk 0\nchunk 1\nchunk 2\n"
            async with http.ws_connect("/_demo/ws") as ws:
                await ws.send_str("ping")
                assert (await ws.receive_str()) == "ping"
    finally:
        await runner.cleanup()


async def test_basic_auth_credentials_are_url_decoded(
    idp: tuple[DevProvider, aiohttp.ClientSession],
) -> None:
    p, http = idp
    p.clients["odd client"] = ClientReg("odd client", "p:w+%&é", [])
    form = {"grant_type": "refresh_token", "refresh_token": "unknown"}
    async with http.post("/token", data=form, headers=basic_auth("odd client", "p:w+%&é")) as r:
        assert (r.status, (await r.json())["error"]) == (400, "invalid_grant")
    async with http.post("/token", data=form, headers=basic_auth("odd client", "p:w")) as r:
        assert r.status == 401


async def test_real_provider_quirks(idp: tuple[DevProvider, aiohttp.ClientSession]) -> None:
    """The switches that make the dev provider behave like providers nobody here wrote."""
    p, http = idp
    body = await login(http)
    assert p.live_refresh_tokens() == {"alice": 1}
    for error in ("invalid_request", "invalid_grant"):  # a refresh token it forgot, refused either way
        p.config(unknown_refresh_error=error)
        assert p.forget_refresh_tokens("alice") == (1 if error == "invalid_request" else 0)
        status, refused = await refresh(http, body["refresh_token"])
        assert (status, refused["error"]) == (400, error)
    assert p.live_refresh_tokens() == {}
    with pytest.raises(ValueError):
        p.config(unknown_refresh_error="server_error")
    # Logout tokens in the format before the 2023 errata carry no exp; otherwise exp is there.
    for with_exp in (True, False):
        p.config(logout_token_exp=with_exp)
        claims = jwt.decode(p.logout_token("bob", sid="s1"), options={"verify_signature": False})
        assert ("exp" in claims) == with_exp and claims["sid"] == "s1" and claims["sub"] == "bob-sub-2"
        assert claims["jti"] and claims["iat"] and "nonce" not in claims
    # No RFC 7009 endpoint: discovery names none and a POST there is a 404 (and counted).
    p.config(revocation_endpoint=False)
    async with http.get("/.well-known/openid-configuration") as r:
        doc = await r.json()
    assert "revocation_endpoint" not in doc and "revocation_endpoint_auth_methods_supported" not in doc
    async with http.post("/revoke", data={"token": "x"}, headers=basic_auth(*CLIENT)) as r:
        assert r.status == 404
    p.config(revocation_endpoint=True)
    p.break_endpoint("revoke", "500")
    async with http.post("/revoke", data={"token": "x"}, headers=basic_auth(*CLIENT)) as r:
        assert r.status == 500
    assert p.stats()["revoke_calls"] == 2 and p.revocations == 0
