"""--oauth-grants-per-user end to end: over real HTTP, with grants made by the scripted browser flow (DCR,
authorize with PKCE, consent, the grant's upstream sign-in, the code redeemed at P/token), on both stores.

The store-level tests (test_oauth_store.py) show the index evicts the least recently used entry; these show
what a user and their clients see: the evicted grant's access token is refused on the resource and its
refresh token at the token endpoint, the others keep working, the grants page lists what is left, another
user's grants neither count nor suffer, and "sign out everywhere" ends one user's grants and nobody else's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from sidecar.store import SessionStore
from tests.stack import Stack, browser, sign_in, sign_out_everywhere, stack
from tests.test_oauth_authorize import code_flow, redeem, register

pytestmark = pytest.mark.timeout(90)

JSON = {"Accept": "application/json"}
EMAILS = {"alice": "alice@example.com", "bob": "bob@example.org"}
SESSION_CACHE_WAIT = 1.2  # --session-cache-ttl is 1 s: a replica may trust its cached copy of a record that long


@dataclass
class Tokens:
    """One grant as its client holds it: the client id and the current access and refresh tokens."""

    client_id: str
    access: str
    refresh: str


@asynccontextmanager
async def limited_stack(store: SessionStore) -> AsyncIterator[Stack]:
    async with stack(store, oauth_server="true", oauth_resource="/mcp", oauth_grants_per_user="2") as st:
        yield st


async def signed_in(st: Stack, client: aiohttp.ClientSession, user: str) -> None:
    """A browser session for ``user`` (the dev provider signs in whoever auto_login names)."""
    st.provider.config(auto_login=user)
    await sign_in(client, st.base)


async def new_grant(st: Stack, client: aiohttp.ClientSession) -> Tokens:
    """A fresh DCR client, authorized by the signed-in browser ``client`` (consent and the grant's own upstream
    sign-in included), its code redeemed at the token endpoint."""
    reg = await register(st.base, client_name="Limits CLI")
    query, verifier = await code_flow(st.base, reg["client_id"], client)
    status, body = await redeem(st.base, reg["client_id"], query["code"][0], verifier)
    assert status == 200, body
    return Tokens(reg["client_id"], body["access_token"], body["refresh_token"])


async def whoami(base: str, access: str) -> tuple[int, str, str | None]:
    """Call the demo MCP server's whoami tool with ``access``: status, WWW-Authenticate, the email it saw."""
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
    headers = {"Authorization": f"Bearer {access}", "Accept": "application/json, text/event-stream"}
    async with aiohttp.ClientSession() as http, http.post(f"{base}/mcp", json=call, headers=headers) as resp:
        challenge = resp.headers.get("WWW-Authenticate", "")
        if resp.status != 200:
            await resp.read()
            return resp.status, challenge, None
        identity = (await resp.json())["result"]["structuredContent"]["identity"]
    email = next((v for k, v in identity.items() if k.lower() == "x-forwarded-email"), None)
    return resp.status, challenge, email


async def refresh(base: str, tokens: Tokens) -> tuple[int, dict[str, Any]]:
    """Use the refresh token once; on success ``tokens`` holds the rotated pair, as a client would keep it."""
    form = {"grant_type": "refresh_token", "refresh_token": tokens.refresh, "client_id": tokens.client_id}
    async with aiohttp.ClientSession() as http, http.post(f"{base}/oauth2/token", data=form) as resp:
        body: dict[str, Any] = await resp.json()
        status = resp.status
    if status == 200:
        tokens.access, tokens.refresh = body["access_token"], body["refresh_token"]
    return status, body


async def assert_works(base: str, tokens: Tokens, user: str) -> None:
    """The access token reaches the resource as ``user`` and the refresh token rotates (and the new pair works)."""
    status, _, email = await whoami(base, tokens.access)
    assert status == 200 and email == EMAILS[user], (status, email)
    status, body = await refresh(base, tokens)
    assert status == 200, body
    status, _, email = await whoami(base, tokens.access)
    assert status == 200 and email == EMAILS[user], (status, email)


async def assert_ended(base: str, tokens: Tokens) -> None:
    """The access token gets the resource's invalid_token challenge, the refresh token invalid_grant."""
    status, challenge, _ = await whoami(base, tokens.access)
    assert status == 401 and 'error="invalid_token"' in challenge, (status, challenge)
    assert f'resource_metadata="{base}/.well-known/oauth-protected-resource/mcp"' in challenge
    status, body = await refresh(base, tokens)
    assert status == 400 and body["error"] == "invalid_grant", (status, body)


async def listed_clients(base: str, client: aiohttp.ClientSession) -> list[str]:
    """The client ids on the signed-in user's grants page (JSON form)."""
    async with client.get(f"{base}/oauth2/grants", headers=JSON) as resp:
        assert resp.status == 200, await resp.text()
        grants = (await resp.json())["grants"]
    return sorted(g["client_id"] for g in grants)


async def test_third_grant_ends_the_least_recently_used_not_the_oldest(store: SessionStore) -> None:
    async with limited_stack(store) as st, browser() as alice:
        await signed_in(st, alice, "alice")
        first = await new_grant(st, alice)
        second = await new_grant(st, alice)
        await assert_works(st.base, second, "alice")  # both live while within the limit
        status, body = await refresh(st.base, first)  # the first is now used after the second
        assert status == 200, body
        third = await new_grant(st, alice)
        await assert_ended(st.base, second)
        await assert_works(st.base, first, "alice")
        await assert_works(st.base, third, "alice")
        assert await listed_clients(st.base, alice) == sorted([first.client_id, third.client_id])


async def test_another_users_grants_do_not_count_against_the_limit(store: SessionStore) -> None:
    async with limited_stack(store) as st, browser() as alice, browser() as bob:
        await signed_in(st, bob, "bob")
        bobs = await new_grant(st, bob)  # the oldest and least recently used grant of all
        await signed_in(st, alice, "alice")
        alices = [await new_grant(st, alice) for _ in range(3)]
        await assert_ended(st.base, alices[0])  # alice's limit did apply: her own oldest went
        await assert_works(st.base, bobs, "bob")
        for tokens in alices[1:]:
            await assert_works(st.base, tokens, "alice")
        assert await listed_clients(st.base, alice) == sorted(t.client_id for t in alices[1:])
        assert await listed_clients(st.base, bob) == [bobs.client_id]


async def test_sign_out_everywhere_ends_only_that_users_grants(store: SessionStore) -> None:
    async with limited_stack(store) as st, browser() as alice, browser() as bob:
        await signed_in(st, bob, "bob")
        bobs = await new_grant(st, bob)
        await signed_in(st, alice, "alice")
        alices = [await new_grant(st, alice) for _ in range(2)]
        assert await sign_out_everywhere(alice, st.base) == 302
        await asyncio.sleep(SESSION_CACHE_WAIT)
        for tokens in alices:
            await assert_ended(st.base, tokens)
        await assert_works(st.base, bobs, "bob")
        assert await listed_clients(st.base, bob) == [bobs.client_id]  # bob's browser session survives too
        await signed_in(st, alice, "alice")
        assert await listed_clients(st.base, alice) == []
