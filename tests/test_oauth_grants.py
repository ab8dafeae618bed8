"""GET /oauth2/grants and POST /oauth2/grants/revoke: a user's own grants, listed and revoked; sign out everywhere."""

from __future__ import annotations

import asyncio

import aiohttp

from sidecar.store import SessionStore
from tests.stack import browser, sign_in, sign_out_everywhere
from tests.test_oauth_authorize import code_flow, form_fields, oauth_stack, redeem, register

JSON = {"Accept": "application/json"}


async def _tokens(base: str, client: aiohttp.ClientSession, **meta: str) -> tuple[dict[str, object], str]:
    reg = await register(base, **meta)
    query, verifier = await code_flow(base, reg["client_id"], client)
    status, tokens = await redeem(base, reg["client_id"], query["code"][0], verifier)
    assert status == 200, tokens
    return tokens, reg["client_id"]


async def _mcp(base: str, access_token: object) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/mcp", headers={"Authorization": f"Bearer {access_token}"}) as resp:
            return resp.status


async def _list(client: aiohttp.ClientSession, base: str) -> dict[str, object]:
    async with client.get(f"{base}/oauth2/grants", headers=JSON) as resp:
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
        body: dict[str, object] = await resp.json()
        return body


async def test_grants_page_lists_own_grants_and_revoke_ends_one(store: SessionStore) -> None:
    async with oauth_stack(store) as st, browser() as alice, browser() as bob:
        base = st.base
        await sign_in(alice, base)
        tokens, client_id = await _tokens(base, alice, client_name="My <CLI>")
        assert await _mcp(base, tokens["access_token"]) != 401
        listing = await _list(alice, base)
        grants = listing["grants"]
        assert isinstance(grants, list) and len(grants) == 1
        assert grants[0]["client_id"] == client_id and grants[0]["client_name"] == "My <CLI>"
        assert grants[0]["resource"] == f"{base}/mcp"
        async with alice.get(f"{base}/oauth2/grants") as resp:
            page = await resp.text()
            assert resp.headers["X-Frame-Options"] == "DENY"
        assert "My &lt;CLI&gt;" in page and "My <CLI>" not in page and "Revoke" in page
        # bob sees none of it and cannot revoke it
        st.provider.config(auto_login="bob")
        await sign_in(bob, base)
        assert (await _list(bob, base))["grants"] == []
        bob_csrf = str((await _list(bob, base))["csrf"])
        async with bob.post(
            f"{base}/oauth2/grants/revoke",
            data={"csrf": bob_csrf, "grant_id": grants[0]["grant_id"]},
            headers=JSON,
        ) as resp:
            assert resp.status == 404
        assert await _mcp(base, tokens["access_token"]) != 401
        # alice's own revoke needs her CSRF token and our origin
        fields = form_fields(page)
        for data, headers in [
            ({"grant_id": fields["grant_id"]}, {}),
            ({**fields, "csrf": bob_csrf}, {}),
            ({**fields, "csrf": "x" * 43}, {}),
            (fields, {"Origin": "https://evil.example"}),
            (fields, {"Sec-Fetch-Site": "cross-site"}),
        ]:
            async with alice.post(
                f"{base}/oauth2/grants/revoke", data=data, headers=headers, allow_redirects=False
            ) as resp:
                assert resp.status == 403, (data, headers)
        assert await _mcp(base, tokens["access_token"]) != 401
        async with alice.post(f"{base}/oauth2/grants/revoke", data=fields, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/oauth2/grants"
        assert (await _list(alice, base))["grants"] == []
        assert await _mcp(base, tokens["access_token"]) == 401
        async with aiohttp.ClientSession() as http:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": str(tokens["refresh_token"]),
                "client_id": client_id,
            }
            async with http.post(f"{base}/oauth2/token", data=form) as resp:
                assert resp.status == 400 and (await resp.json())["error"] == "invalid_grant"


async def test_grants_need_a_browser_session() -> None:
    async with oauth_stack() as st, aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{st.base}/oauth2/grants", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"].startswith("/oauth2/start?rd=%2Foauth2%2Fgrants")
        async with anonymous.get(f"{st.base}/oauth2/grants", headers=JSON) as resp:
            assert resp.status == 401
        async with anonymous.post(f"{st.base}/oauth2/grants/revoke", data={"grant_id": "x"}) as resp:
            assert resp.status == 401


async def test_a_sidecar_token_is_not_a_browser_session_for_the_grants_page() -> None:
    async with oauth_stack() as st, browser() as alice:
        await sign_in(alice, st.base)
        tokens, _ = await _tokens(st.base, alice)
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {tokens['access_token']}", **JSON}
            async with http.get(f"{st.base}/oauth2/grants", headers=headers) as resp:
                assert resp.status == 401


async def test_sign_out_everywhere_ends_grants_but_plain_sign_out_does_not(store: SessionStore) -> None:
    async with oauth_stack(store) as st, browser() as alice:
        base = st.base
        await sign_in(alice, base)
        tokens, _ = await _tokens(base, alice)
        async with alice.get(f"{base}/oauth2/sign_out", allow_redirects=False) as resp:
            assert resp.status == 302
        assert await _mcp(base, tokens["access_token"]) != 401  # a browser sign-out leaves CLI grants alone
        await sign_in(alice, base)
        assert await sign_out_everywhere(alice, base) == 302
        await asyncio.sleep(1.1)  # --session-cache-ttl: a replica trusts its cached copy of a record up to 1 s
        assert await _mcp(base, tokens["access_token"]) == 401
        await sign_in(alice, base)
        assert (await _list(alice, base))["grants"] == []
