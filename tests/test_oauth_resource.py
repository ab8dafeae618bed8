"""The resource guard over real HTTP: audience per resource path, challenges, no token passthrough, upstream
provider failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.stack import Stack, free_port, stack
from tests.test_oauth_tokens import new_grant, redeem, server_of

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def recording_upstream() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A real upstream app that records the headers of every request it gets."""
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="ok " + request.path)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/", seen
    finally:
        await runner.cleanup()


@asynccontextmanager
async def guarded_stack(**kw: Any) -> AsyncIterator[tuple[Stack, list[dict[str, str]]]]:
    async with (
        recording_upstream() as (url, seen),
        stack(None, upstream=url, oauth_server="true", oauth_resource="/mcp,/api", **kw) as st,
    ):
        yield st, seen


async def get(url: str, token: str | None = None, **headers: str) -> tuple[int, str, aiohttp.ClientResponse]:
    if token is not None:
        headers["Authorization"] = "Bearer " + token
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers, allow_redirects=False) as resp:
        return resp.status, await resp.text(), resp


async def test_token_reaches_only_its_resource_and_never_the_upstream() -> None:
    async with guarded_stack(pass_access_token="true") as (st, seen):
        issued = await new_grant(st, "/mcp")
        _, tokens, _ = await redeem(st.base, issued)
        access = tokens["access_token"]
        status, text, _ = await get(st.base + "/mcp/tools", access)
        assert status == 200 and text == "ok /mcp/tools"
        forwarded = seen[-1]
        assert forwarded["X-Forwarded-Email"] == "alice@example.com"
        assert "Authorization" not in forwarded  # neither the sidecar's token ...
        assert access not in str(forwarded) and tokens["refresh_token"] not in str(forwarded)
        assert forwarded["X-Forwarded-Access-Token"]  # ... but the provider's, as asked by --pass-access-token
        assert not forwarded["X-Forwarded-Access-Token"].startswith("sca.")
        count = len(seen)
        # Audience: the /mcp token is refused on /api, on the resource path's lookalikes' neighbours, and
        # for another origin's canonical resource (Host decides the issuer).
        for path in ("/api", "/api/x"):
            status, _, resp = await get(st.base + path, access)
            assert status == 401
            challenge = resp.headers["WWW-Authenticate"]
            assert f'resource_metadata="{st.base}/.well-known/oauth-protected-resource/api"' in challenge
            assert 'error="invalid_token"' in challenge
        status, _, _ = await get(st.base + "/mcp", access, Host="other.example:80")
        assert status == 401
        assert len(seen) == count  # nothing refused reached the upstream


@pytest.mark.parametrize(
    "token",
    [
        "sca.AAAAAAAAAAAAAAAAAAAAAA." + "A" * 43,  # well-formed, unknown
        "sca.short",
        "scr.AAAAAAAAAAAAAAAAAAAAAA." + "A" * 43,  # a refresh token is not an access token
        "eyJhbGciOiJSUzI1NiJ9.e30.sig",  # a JWT without --skip-jwt-bearer-tokens
    ],  # "Bearer " with no token is malformed: 400 invalid_request (test_bearer_malformed)
)
async def test_bad_tokens_get_invalid_token(token: str) -> None:
    async with guarded_stack() as (st, seen):
        status, text, resp = await get(st.base + "/mcp/x", token)
        assert status == 401
        assert resp.headers["WWW-Authenticate"].startswith(
            f'Bearer resource_metadata="{st.base}/.well-known/oauth-protected-resource/mcp"'
        )
        assert token == "" or token not in text
        assert seen == []


async def test_no_credentials_on_a_resource_path_gets_the_challenge() -> None:
    async with guarded_stack() as (st, _):
        for url in (st.base + "/mcp", st.base + "/mcp/deep/path"):
            status, _, resp = await get(url, Accept="text/html")
            assert status == 401  # never a sign-in redirect on an API path
            challenge = resp.headers["WWW-Authenticate"]
            assert challenge.startswith(
                f'Bearer resource_metadata="{st.base}/.well-known/oauth-protected-resource/mcp"'
            )
            assert 'scope="openid profile email offline_access"' in challenge
        # outside the resource paths the browser behaviour is unchanged
        status, _, resp = await get(st.base + "/mcpx", Accept="text/html")
        assert status == 302 and "/oauth2/start" in resp.headers["Location"]


async def test_auth_endpoint_judges_the_original_uri() -> None:
    """Asked by a trusted front (--reverse-proxy, loopback): the original URI it names decides the resource."""
    async with guarded_stack(reverse_proxy="true") as (st, _):
        issued = await new_grant(st, "/mcp")
        _, tokens, _ = await redeem(st.base, issued)
        status, _, resp = await get(st.base + "/oauth2/auth", tokens["access_token"], **{"X-Original-URI": "/mcp/a"})
        assert status in (200, 202) and resp.headers.get("X-Auth-Request-Email") == "alice@example.com"
        status, _, resp = await get(st.base + "/oauth2/auth", tokens["access_token"], **{"X-Original-URI": "/api/a"})
        assert status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
        status, _, resp = await get(st.base + "/oauth2/auth", **{"X-Forwarded-Uri": "/api"})
        assert status == 401 and "oauth-protected-resource/api" in resp.headers["WWW-Authenticate"]


async def test_an_untrusted_caller_of_the_auth_endpoint_names_no_resource() -> None:
    """Without --reverse-proxy no header names the original request: the cookie decides (plain 401)."""
    async with guarded_stack() as (st, _):
        issued = await new_grant(st, "/mcp")
        _, tokens, _ = await redeem(st.base, issued)
        status, _, resp = await get(st.base + "/oauth2/auth", tokens["access_token"], **{"X-Original-URI": "/mcp/a"})
        assert status == 401 and "WWW-Authenticate" not in resp.headers


async def test_expired_access_token_is_refused() -> None:
    async with guarded_stack() as (st, _):
        issued = await new_grant(st, "/mcp")
        _, tokens, _ = await redeem(st.base, issued)
        server = server_of(st)
        server.clock = lambda: time.time() + 901  # past --oauth-access-token-ttl (15m)
        status, _, resp = await get(st.base + "/mcp", tokens["access_token"])
        assert status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_upstream_invalid_grant_ends_the_grant_and_outage_keeps_it() -> None:
    async with guarded_stack(provider_kw={"access_token_ttl": 2}) as (st, _):
        issued = await new_grant(st, "/mcp")
        _, tokens, _ = await redeem(st.base, issued)
        server = server_of(st)
        await asyncio.sleep(2.2)  # the upstream access token has expired: the next use refreshes it
        st.provider.inject_fault("500", count=-1)
        status, _, _ = await get(st.base + "/mcp", tokens["access_token"])
        assert status in (502, 503, 504)
        assert await server.store.get_grant(issued.grant.grant_id) is not None  # an outage changes nothing
        st.provider.clear_faults()
        st.provider.inject_fault("invalid_grant", count=1)
        status, _, resp = await get(st.base + "/mcp", tokens["access_token"])
        assert status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
        assert await server.store.get_grant(issued.grant.grant_id) is None


@pytest.mark.parametrize(
    "spelling",
    ["Bearer {t}", "bearer {t}", "BEARER  {t}", " Bearer {t}", "Bearer\t{t}"],
)
async def test_a_sidecar_token_never_reaches_the_app_off_the_resource_paths(spelling: str) -> None:
    """A browser with a session (cookie) that also sends a sidecar token on a plain proxied path: the cookie
    authenticates it, and the token is still not passed through; a client's other Authorization is."""
    from tests.stack import browser, sign_in

    async with guarded_stack() as (st, seen):
        issued = await new_grant(st, "/mcp")
        _, tokens, _ = await redeem(st.base, issued)
        async with browser() as b:
            await sign_in(b, st.base)
            for token in (tokens["access_token"], tokens["refresh_token"]):
                async with b.get(st.base + "/app/page", headers={"Authorization": spelling.format(t=token)}) as r:
                    assert r.status == 200
                assert "Authorization" not in seen[-1]
                assert token not in str(seen[-1])
            async with b.get(st.base + "/app/page", headers={"Authorization": "Bearer app-own-token"}) as r:
                assert r.status == 200
            assert seen[-1]["Authorization"] == "Bearer app-own-token"
