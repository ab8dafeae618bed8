"""A hostile review of ``sidecar.oauth``: each test is an attack or a malformed input that once succeeded or
crashed, over real HTTP against the dev provider (tests/stack.py)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from sidecar.refresh import REFUSAL_BACKOFF
from tests.stack import browser, sign_in
from tests.test_oauth_authorize import OTHER_REDIRECT, REDIRECT, authorize_params, oauth_stack, pkce, register
from tests.test_oauth_resource import get, guarded_stack
from tests.test_oauth_tokens import new_grant, redeem, server_of

pytestmark = pytest.mark.timeout(90)


# --- the audience of a token on /oauth2/auth ------------------------------------------------------------------


async def test_original_uri_headers_that_disagree_never_move_a_tokens_audience() -> None:
    """Traefik's forwardAuth sets only X-Forwarded-Uri and ingress-nginx only X-Original-URL; both copy the
    client's own headers into the auth request. A client holding a /mcp token that adds ``X-Original-URI: /mcp``
    to a request for /api must not be let through to /api (RFC 8707 audience). Asked by a trusted front
    (--reverse-proxy, loopback) configured as nginx (the default --front) and as ingress-nginx."""
    async with guarded_stack(reverse_proxy="true") as (st, _):
        issued = await new_grant(st, "/mcp")
        _, tokens, _ = await redeem(st.base, issued)
        token = tokens["access_token"]
        forged = [
            {"X-Forwarded-Uri": "/api/secret", "X-Original-URI": "/mcp"},  # Traefik + the client's header
            {"X-Original-URL": st.base + "/api/secret", "X-Original-URI": "/mcp"},  # ingress-nginx + the client's
            {"X-Original-URL": st.base + "/api/secret", "X-Forwarded-Uri": "/mcp/x"},
            {"X-Forwarded-Uri": "/api/secret?a=/mcp", "X-Original-URI": "/mcp?x=1"},
        ]
        for headers in forged:
            status, _, resp = await get(st.base + "/oauth2/auth", token, **headers)
            assert not 200 <= status < 300, headers
            assert "X-Auth-Request-Email" not in resp.headers
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                st.base + "/oauth2/auth",
                headers=[
                    ("Authorization", "Bearer " + token),
                    ("X-Original-URI", "/api/x"),
                    ("X-Original-URI", "/mcp"),
                ],
            ) as resp,
        ):
            assert not 200 <= resp.status < 300  # the same header twice, naming two paths
        # fronts that agree with themselves still work: nginx sets both to $request_uri
        status, _, resp = await get(st.base + "/oauth2/auth", token, **{"X-Forwarded-Uri": "/mcp/a?q=1"})
        assert status == 202 and resp.headers["X-Auth-Request-Email"] == "alice@example.com"
        headers = {"X-Forwarded-Uri": "/mcp/a?q=1", "X-Original-URI": "/mcp/a?q=1"}
        status, _, _ = await get(st.base + "/oauth2/auth", token, **headers)
        assert status == 202


async def test_ingress_nginx_original_url_names_the_resource() -> None:
    """ingress-nginx names the request in X-Original-URL (a whole URL): the token is judged for that path."""
    async with guarded_stack(reverse_proxy="true", front="ingress-nginx") as (st, _):
        issued = await new_grant(st, "/mcp")
        _, tokens, _ = await redeem(st.base, issued)
        token = tokens["access_token"]
        # The shipped auth-url ends in ?routed_host=$host, which nginx expands; without it no token is taken,
        # whatever header a client adds (a forged X-Routed-Host is not read).
        auth, routed = st.base + "/oauth2/auth", st.base + "/oauth2/auth?routed_host=127.0.0.1"
        tools = {"X-Original-URL": st.base + "/mcp/tools?x=1"}
        status, _, resp = await get(auth, token, **tools)
        assert status == 401
        status, _, resp = await get(auth, token, **tools, **{"X-Routed-Host": "127.0.0.1"})
        assert status == 401
        status, _, resp = await get(routed, token, **tools)
        assert status == 202 and resp.headers["X-Auth-Request-Email"] == "alice@example.com"
        status, _, resp = await get(routed, token, **{"X-Original-URL": st.base + "/api/tools"})
        assert status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
        status, _, resp = await get(routed, **{"X-Original-URL": st.base + "/api"})
        assert status == 401 and "oauth-protected-resource/api" in resp.headers["WWW-Authenticate"]
        status, _, _ = await get(auth + "?routed_host=other.example", token, **tools)
        assert status == 400


# --- malformed bodies ------------------------------------------------------------------------------------------

HOSTILE_BODIES = [
    ("application/x-www-form-urlencoded", b"\xff\xfe=\xff"),
    ("application/x-www-form-urlencoded", b"csrf=\xc0\xae&pending=\xff"),
    ("application/x-www-form-urlencoded; charset=bogus", b"csrf=x&pending=y"),
    ("application/x-www-form-urlencoded; charset=utf-32", b"csrf=x"),
    ("multipart/form-data; boundary=zz", b"csrf=x"),
    ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--zz--\r\n"),
    ("multipart/form-data", b"--zz\r\n"),
]


@pytest.mark.parametrize(("content_type", "body"), HOSTILE_BODIES)
async def test_hostile_form_bodies_are_refused_never_a_500(content_type: str, body: bytes) -> None:
    async with oauth_stack() as st, browser() as client:
        await sign_in(client, st.base)
        for path in ("/oauth2/consent", "/oauth2/device", "/oauth2/grants/revoke", "/oauth2/device_authorization"):
            async with client.post(
                st.base + path,
                data=body,
                headers={"Content-Type": content_type, "Origin": st.base},
                allow_redirects=False,
            ) as resp:
                text = await resp.text()
                assert 400 <= resp.status < 500, (path, resp.status, text[:200])


# --- a provider refusal that says nothing about the grant -----------------------------------------------------


REFUSALS = ['{"error": "invalid_client"}', '{"error": "invalid_request"}', '{"error": "unauthorized_client"}', ""]


async def test_upstream_refusal_other_than_invalid_grant_keeps_the_grant() -> None:
    """A misconfigured or confused provider (the browser path keeps the session record for these) must not end
    every CLI/MCP grant: the client gets a 503, the provider is not asked again during the refusal back-off,
    and the grant works again once the provider does. (The cases run side by side: each waits the back-off.)"""

    async def case(body: str) -> None:
        async with guarded_stack(provider_kw={"access_token_ttl": 2}) as (st, _):
            issued = await new_grant(st, "/mcp")
            _, tokens, _ = await redeem(st.base, issued)
            server = server_of(st)
            await asyncio.sleep(2.2)  # the upstream access token has expired: the next use refreshes it
            st.provider.inject_fault("raw", count=-1, status=400, body=body)
            status, _, _ = await get(st.base + "/mcp", tokens["access_token"])
            assert status == 503, body
            assert await server.store.get_grant(issued.grant.grant_id) is not None
            st.provider.clear_faults()
            status, _, _ = await get(st.base + "/mcp", tokens["access_token"])
            assert status == 503, body  # backing off: the provider is left alone for a while
            assert st.provider.stats()["token_calls"]["refresh_token"] == 1, body
            await asyncio.sleep(REFUSAL_BACKOFF + 0.2)
            status, text, _ = await get(st.base + "/mcp", tokens["access_token"])
            assert status == 200, (body, text)

    await asyncio.gather(*(case(body) for body in REFUSALS))


# --- the authorization endpoint as an open redirector (RFC 9700 4.11.2) ----------------------------------------


async def test_authorization_errors_never_auto_redirect_to_a_registered_https_uri() -> None:
    """Anyone may register an https redirect URI, so an error sent there without any user interaction would
    make the sidecar's origin an open redirector: a link to /authorize with a bad parameter lands the victim on
    the attacker's site. Loopback redirect URIs (native and MCP clients) still get the error."""
    async with oauth_stack() as st, browser() as client:
        reg = await register(st.base)
        verifier, challenge = pkce()
        good = authorize_params(reg["client_id"], challenge, redirect_uri=OTHER_REDIRECT)
        cases: list[dict[str, str]] = [
            {**good, "response_type": "token"},
            {**good, "code_challenge_method": "plain", "code_challenge": verifier[:43]},
            {k: v for k, v in good.items() if k != "code_challenge"},
            {**good, "scope": "admin"},
            {**good, "resource": "https://evil.example/"},
            {**good, "prompt": "none"},
        ]
        for signed_in in (False, True):
            if signed_in:
                await sign_in(client, st.base)
            for params in cases:
                async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
                    location = resp.headers.get("Location", "")
                    assert not location.startswith(OTHER_REDIRECT), (params, location)
                    assert resp.status == 400 and resp.headers["X-Frame-Options"] == "DENY"
        # a loopback redirect URI (where a native client listens) still gets the error back
        params = {**authorize_params(reg["client_id"], challenge, redirect_uri=REDIRECT), "response_type": "token"}
        async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"].startswith(REDIRECT + "?error=")
