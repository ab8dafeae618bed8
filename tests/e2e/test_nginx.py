"""The shipped nginx auth_request config, with the distro's nginx in front of a sidecar process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.e2e.nginx import Nginx
from tests.stack import SidecarProcess, Stack, browser, free_port, sidecar_settings, stack

SPOOF = {
    "X-Auth-Request-User": "mallory",
    "X-Auth-Request-Email": "m@evil.example",
    "X-Auth-Request-Groups": "admins",
    "X-Forwarded-User": "mallory",
    "X-Forwarded-Email": "m@evil.example",
    "X_Auth_Request_Email": "m@evil.example",
    "X-Forwarded-Groups": "admins",
    "Authorization": "Bearer forged",
    "X-Auth-Request-Access-Token": "forged",
}


@pytest.fixture
async def site(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[Stack, Nginx]]:
    async with stack(sidecar=False, provider_kw={"access_token_ttl": 2}) as st:
        nginx_port, sidecar_port = free_port(), free_port()
        settings = sidecar_settings(
            st.issuer,
            sidecar_port,
            "",
            session_store_type="redis",
            redis_connection_url=redis_url,
            workers="1",
            reverse_proxy="true",
            pass_access_token="true",
            pass_authorization_header="true",
            refresh_skew="0s",
        )
        settings["redirect_url"] = f"http://127.0.0.1:{nginx_port}/oauth2/callback"
        proc = await SidecarProcess(settings).ready()
        nginx = Nginx(tmp_path, nginx_port, f"127.0.0.1:{sidecar_port}", st.upstream_url.removeprefix("http://"))
        try:
            yield st, nginx
        finally:
            nginx.stop()
            proc.stop()


async def _echo(client: aiohttp.ClientSession, base: str, **kw: object) -> dict[str, str]:
    async with client.get(base + "/_demo/echo?x=1&y=2", **kw) as resp:  # type: ignore[arg-type]
        assert resp.status == 200, await resp.text()
        data = await resp.json()
    return {k.lower(): v for k, v in data["headers"].items()}


async def test_sign_in_refresh_and_sign_out_through_nginx(site: tuple[Stack, Nginx]) -> None:
    st, nginx = site
    async with browser() as client:
        async with client.get(
            nginx.base + "/_demo/echo?x=1&y=2", headers={"Accept": "text/html"}, allow_redirects=False
        ) as resp:
            assert resp.status == 302  # to sign in: straight to the provider, state cookie set
            assert resp.headers["Location"].startswith(st.issuer + "/authorize?")
        async with client.get(nginx.base + "/_demo/echo?x=1&y=2", headers={"Accept": "text/html"}) as resp:
            assert resp.status == 200  # the whole round trip, back on the page first asked for
            assert urlsplit(str(resp.url)).query == "x=1&y=2"
        first = await _echo(client, nginx.base)
        assert first["x-auth-request-user"] == "alice@example.com"
        assert first["x-auth-request-email"] == "alice@example.com"
        assert first["x-auth-request-groups"] == "admins,staff"
        assert first["x-auth-request-preferred-username"] == "alice"
        assert first["x-forwarded-user"] == "alice@example.com"
        token = first["x-auth-request-access-token"]
        assert first["authorization"] == "Bearer " + token and token.count(".") == 2

        await asyncio.sleep(2.2)  # the access token expires; the next request is refreshed inside auth_request
        later = await _echo(client, nginx.base)
        assert later["x-auth-request-access-token"] != token
        assert later["authorization"] == "Bearer " + later["x-auth-request-access-token"]
        stats = st.provider.stats()["token_calls"]
        assert stats["authorization_code"] == 1 and stats["refresh_token"] >= 1  # never signed in again

        async with client.get(nginx.base + "/oauth2/sign_out", allow_redirects=False) as resp:
            assert resp.status == 302
        async with client.get(nginx.base + "/", headers={"Accept": "text/html"}, allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"].startswith(st.issuer + "/authorize?")


async def test_spoofed_identity_headers_never_reach_the_app(site: tuple[Stack, Nginx]) -> None:
    st, nginx = site
    async with browser() as client:
        async with client.get(nginx.base + "/", headers=SPOOF, allow_redirects=False) as resp:
            assert resp.status == 302  # spoofed headers do not sign anyone in
        async with client.get(nginx.base + "/oauth2/start", params={"rd": "/"}) as resp:
            assert resp.status == 200
        seen = await _echo(client, nginx.base, headers=SPOOF)
    assert seen["x-auth-request-user"] == "alice@example.com"
    assert seen["x-auth-request-email"] == "alice@example.com"
    assert seen["x-auth-request-groups"] == "admins,staff"
    assert seen["x-forwarded-user"] == "alice@example.com"
    assert seen["authorization"] != "Bearer forged" and seen["x-auth-request-access-token"] != "forged"
    assert "mallory" not in str(seen) and "evil" not in str(seen) and "x-auth-request-email" in seen


async def test_the_auth_endpoint_is_internal_only(site: tuple[Stack, Nginx]) -> None:
    _, nginx = site
    async with aiohttp.ClientSession() as client, client.get(nginx.base + "/oauth2/auth") as resp:
        assert resp.status == 404  # nginx keeps the token-bearing auth answer to itself
