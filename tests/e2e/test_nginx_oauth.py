"""CLI and MCP clients through the shipped nginx config (``--oauth-server``): discovery reaches the
sidecar, a client without a token gets the resource's 401 challenge (never a sign-in redirect), and
with a sidecar token the app gets the identity and the provider's token, never the sidecar's."""

from __future__ import annotations

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
