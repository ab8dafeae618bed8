"""The README's ``curl`` device-flow session (section "CLI and MCP clients"), request for request, against the
demo app's ``/mcp`` behind the sidecar: register a public client, ask for a device code, the person approves it
in real Chromium (code form, consent, the grant's sign-in), poll the token endpoint, call the MCP tool with
the access token, refresh (rotation; a retry within the reuse window gets the same answer), and see a
replayed refresh token end the whole grant.

The README's session itself is a script that ``tests/e2e/test_readme.py`` runs as written against the demo; this
test goes further (one redemption only, a replayed refresh token ending the grant) on the Redis store.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.store import RedisStore
from tests.e2e.chromium import approve_device, one_page
from tests.stack import stack

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
WHOAMI = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(aioredis.from_url(redis_url))
    yield store
    await store.close()


async def post_form(c: aiohttp.ClientSession, url: str, **fields: str) -> tuple[int, dict[str, Any]]:
    async with c.post(url, data=fields) as resp:
        return resp.status, dict(await resp.json())


async def call_whoami(c: aiohttp.ClientSession, url: str, access_token: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json, text/event-stream"}
    async with c.post(url, json=WHOAMI, headers=headers) as resp:
        if resp.status != 200:
            return resp.status, resp.headers.get("WWW-Authenticate", "")
        return resp.status, await resp.json()


async def test_device_flow_session_as_in_the_readme(redis_store: RedisStore) -> None:
    settings = {"oauth_server": "true", "oauth_resource": "/mcp", "pass_authorization_header": "true"}
    async with stack(redis_store, **settings) as st, aiohttp.ClientSession() as cli, one_page() as person:
        s = st.base
        # register: a public client for the device grant (no redirect URI, no secret)
        meta = {
            "client_name": "my-cli",
            "grant_types": [DEVICE_GRANT, "refresh_token"],
            "token_endpoint_auth_method": "none",
        }
        async with cli.post(s + "/oauth2/register", json=meta) as resp:
            assert resp.status == 201, await resp.text()
            client = await resp.json()
        assert "client_secret" not in client
        client_id = client["client_id"]

        status, device = await post_form(
            cli, s + "/oauth2/device_authorization", client_id=client_id, resource=s + "/mcp"
        )
        assert status == 200, device
        assert re.fullmatch(r"[A-Z]{4}-[A-Z]{4}", device["user_code"]), device
        assert device["verification_uri"] == s + "/oauth2/device"
        assert device["verification_uri_complete"].startswith(device["verification_uri"] + "?user_code=")
        poll = {"grant_type": DEVICE_GRANT, "device_code": device["device_code"], "client_id": client_id}
        status, body = await post_form(cli, s + "/oauth2/token", **poll)
        assert (status, body["error"]) == (400, "authorization_pending")

        # the person opens verification_uri_complete, confirms the code and allows
        assert "Device connected" in await approve_device(person, device["verification_uri_complete"])

        status, tokens = await post_form(cli, s + "/oauth2/token", **poll)
        assert status == 200, tokens
        assert tokens["token_type"] == "Bearer" and tokens["access_token"].startswith("sca.")
        assert tokens["refresh_token"].startswith("scr.") and tokens["expires_in"] > 0
        status, again = await post_form(cli, s + "/oauth2/token", **poll)
        assert status == 400 and again["error"] in ("invalid_grant", "expired_token"), "one redemption only"

        # the API (the demo's MCP server) with the token: the user's identity, the provider's token, not ours
        status, answer = await call_whoami(cli, s + "/mcp", tokens["access_token"])
        assert status == 200, answer
        seen = answer["result"]["structuredContent"]
        assert seen["identity"]["X-Forwarded-Email"] == "alice@example.com"
        assert seen["authorization_forwarded"] is True  # --pass-authorization-header: the provider's token

        # refresh: a new pair. The same refresh token again at once is a retry (--oauth-refresh-reuse-seconds,
        # 10 s): the same answer, no second branch. Once the new one was used, the old one presented again ends
        # the grant (RFC 9700 4.14.2)
        refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id}
        status, fresh = await post_form(cli, s + "/oauth2/token", **refresh)
        assert status == 200 and fresh["refresh_token"] != tokens["refresh_token"], fresh
        assert (await call_whoami(cli, s + "/mcp", fresh["access_token"]))[0] == 200
        status, retried = await post_form(cli, s + "/oauth2/token", **refresh)
        assert status == 200, retried
        assert (retried["access_token"], retried["refresh_token"]) == (fresh["access_token"], fresh["refresh_token"])
        newer = {**refresh, "refresh_token": fresh["refresh_token"]}
        status, fresher = await post_form(cli, s + "/oauth2/token", **newer)
        assert status == 200 and fresher["refresh_token"] != fresh["refresh_token"], fresher
        status, replay = await post_form(cli, s + "/oauth2/token", **refresh)
        assert (status, replay["error"]) == (400, "invalid_grant")
        status, challenge = await call_whoami(cli, s + "/mcp", fresher["access_token"])
        assert status == 401 and 'error="invalid_token"' in challenge
        newest = {**refresh, "refresh_token": fresher["refresh_token"]}
        assert (await post_form(cli, s + "/oauth2/token", **newest))[1]["error"] == "invalid_grant"
