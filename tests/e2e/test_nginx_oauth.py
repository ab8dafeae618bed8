"""CLI and MCP clients through the shipped nginx config (``--oauth-server``): discovery reaches the
sidecar, a client without a token gets the resource's 401 challenge (never a sign-in redirect), and
with a sidecar token the app gets the identity and the provider's token, never the sidecar's."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.e2e.chromium import approve_device, one_page
from tests.e2e.test_nginx import Site, run_site

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@pytest.fixture(scope="module")
def oauth_site(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from run_site(redis_server, tmp_path_factory, "--oauth-server", "--oauth-resource=/_demo")


async def _form(client: aiohttp.ClientSession, url: str, **fields: str) -> tuple[int, dict[str, Any]]:
    async with client.post(url, data=fields) as resp:
        return resp.status, await resp.json(content_type=None)


async def _device_token(site: Site) -> str:
    """A device-flow token, every step through nginx: register, device code, the person approves, poll."""
    async with (
        aiohttp.ClientSession() as cli,
        one_page() as person,
    ):
        meta = {"client_name": "cli", "grant_types": [DEVICE_GRANT], "token_endpoint_auth_method": "none"}
        async with cli.post(site.base + "/oauth2/register", json=meta) as resp:
            assert resp.status == 201, await resp.text()
            client_id = (await resp.json())["client_id"]
        status, device = await _form(
            cli, site.base + "/oauth2/device_authorization", client_id=client_id, resource=site.base + "/_demo"
        )
        assert status == 200, device
        assert "Device connected" in await approve_device(person, device["verification_uri_complete"])
        status, tokens = await _form(
            cli, site.base + "/oauth2/token", grant_type=DEVICE_GRANT, device_code=device["device_code"],
            client_id=client_id,
        )  # fmt: skip
        assert status == 200, tokens
        token: str = tokens["access_token"]
        return token


async def test_discovery_documents_reach_the_sidecar_through_nginx(oauth_site: Site) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(oauth_site.base + "/.well-known/oauth-protected-resource/_demo") as resp:
            assert resp.status == 200
            assert (await resp.json())["resource"] == oauth_site.base + "/_demo"
        async with client.get(oauth_site.base + "/.well-known/oauth-authorization-server") as resp:
            assert resp.status == 200
            meta = await resp.json()
            assert meta["issuer"] == oauth_site.base and meta["code_challenge_methods_supported"] == ["S256"]


@pytest.mark.parametrize("token", [None, "sca.AAAAAAAAAAAAAAAAAAAAAA." + "A" * 43, "not-ours"])
async def test_a_client_without_a_valid_token_gets_the_resource_challenge(oauth_site: Site, token: str | None) -> None:
    headers = {"Accept": "text/html"} | ({"Authorization": f"Bearer {token}"} if token else {})
    async with (
        aiohttp.ClientSession() as client,
        client.post(oauth_site.base + "/_demo/echo", headers=headers, allow_redirects=False) as resp,
    ):
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
        assert f'resource_metadata="{oauth_site.base}/.well-known/oauth-protected-resource/_demo"' in challenge
        assert ('error="invalid_token"' in challenge) == (token is not None)


async def test_with_a_sidecar_token_the_app_gets_the_identity_and_never_the_token(oauth_site: Site) -> None:
    token = await _device_token(oauth_site)
    async with aiohttp.ClientSession() as client:
        async with client.get(
            oauth_site.base + "/_demo/echo", headers={"Authorization": f"Bearer {token}"}, allow_redirects=False
        ) as resp:
            assert resp.status == 200, await resp.text()
            seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
        assert seen["x-auth-request-email"] == "alice@example.com"
        assert token not in str(seen)
        assert seen["authorization"].startswith("Bearer ey")  # --pass-authorization-header: the provider's JWT


async def test_a_page_on_another_origin_gets_the_preflight_answered_and_reads_the_challenge(oauth_site: Site) -> None:
    """A browser OAuth client (Chromium, a page on another origin) calls the resource behind nginx's
    auth_request with a JSON body, so Chromium sends a CORS preflight first. The shipped config needs no
    OPTIONS rule of its own: /oauth2/auth answers the preflight 401 (it carries no credentials), nginx's
    error_page hands it to the sidecar, which answers it as the resource's (204, ``*``, no credentials);
    the app never sees it. The page then reads the 401's WWW-Authenticate; with a token the preflight
    (Authorization named) passes too and the POST reaches the app (whose answer, without CORS headers of
    its own, the page may not read: the app's decision)."""
    site = oauth_site
    token = await _device_token(site)
    rpc = '{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
    url = site.base + "/_demo/echo"
    read = """async ([url, headers, body]) => {
        try {
            const r = await fetch(url, {method: 'POST', headers, body});
            return [r.status, r.headers.get('www-authenticate') || '', await r.text()];
        } catch (e) { return [0, String(e), '']; }
    }"""
    json_type = {"Content-Type": "application/json"}
    async with one_page() as page:
        await page.goto(site.issuer + "/.well-known/openid-configuration")  # another origin: the provider's
        status, challenge, _ = await page.evaluate(read, [url, json_type, rpc])
        assert status == 401, (status, challenge)  # 0: the preflight failed and the page saw nothing
        assert f'resource_metadata="{site.base}/.well-known/oauth-protected-resource/_demo"' in challenge
        bearer = {**json_type, "Authorization": f"Bearer {token}"}
        said: list[str] = []
        page.on("console", lambda m: said.append(m.text))
        status, error, _ = await page.evaluate(read, [url, bearer, rpc])
        assert status == 0, (status, error)  # the demo app answers no CORS: the page may not read it ...
        for _ in range(50):  # (Chromium logs the reason a moment later)
            if said:
                break
            await asyncio.sleep(0.05)
        # ... but the preflight passed, and the answer the page may not read is the app's: the sidecar's
        # own 401 would have carried Access-Control-Allow-Origin.
        assert any("No 'Access-Control-Allow-Origin' header is present on the requested resource" in m for m in said)
        assert not any("preflight" in m for m in said), said
        assert status == 0, (status, said)  # the demo app answers no CORS: the page may not read it
    # nginx's access log says who answered: each preflight 204, the sidecar's (the demo app answers any method
    # 200), and the POST with the token 200 (the app's: the sidecar never answers a POST to the resource 200).
    assert site.logs is not None
    lines = [line for line in (site.logs / "nginx-access.log").read_text().splitlines() if "/_demo/echo HTTP/" in line]
    answered = [(line.split('"')[1].split(" ")[0], line.split('"')[2].split()[0]) for line in lines]
    assert answered.count(("OPTIONS", "204")) == 2 and ("POST", "200") in answered, answered
    assert not [a for a in answered if a[0] == "OPTIONS" and a[1] != "204"], answered
    # Hand-made, hostile: a preflight for a path that is not the resource gets no CORS answer, with or
    # without a forged cookie; nothing of the sidecar's preflight answer grants credentials.
    asked = {"Origin": site.issuer, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-a"}
    async with aiohttp.ClientSession() as client:
        for path, extra in (("/private/x", {}), ("/private/x", {"Cookie": "_sidecar=forged"}), ("/_demo", {})):
            async with client.options(site.base + path, headers={**asked, **extra}, allow_redirects=False) as resp:
                assert "Access-Control-Allow-Credentials" not in resp.headers, (path, resp.headers)
                if path == "/_demo":
                    assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "*", resp.headers
                else:
                    assert resp.status == 401 and "Access-Control-Allow-Origin" not in resp.headers, resp.headers
