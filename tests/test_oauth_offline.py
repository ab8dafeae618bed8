"""A grant must outlive the upstream access token, so its upstream sign-in needs a refresh token. Providers that
list ``offline_access`` get that scope (``test_oauth_authorize``); Google lists none and gives a refresh token only
for ``access_type=offline``, and on a second consent only with ``prompt=consent``. The dev provider does the same
(``refresh_tokens="google"``); real HTTP, a started sidecar, a scripted browser, the grant used after the upstream
access token has expired."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.stack import browser, sign_in
from tests.test_oauth_authorize import code_flow, oauth_stack, redeem, register


async def _use(base: str, token: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/mcp", headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status


async def test_grants_get_an_upstream_refresh_token_from_a_provider_that_wants_access_type_offline() -> None:
    async with oauth_stack(provider_kw={"access_token_ttl": 1}) as st, browser() as client:
        st.provider.config(refresh_tokens="google")
        await sign_in(client, st.base)  # the browser's own sign-in asks for no refresh token: none is issued
        assert st.provider.stats()["live_refresh_tokens"] == {}
        reg = await register(st.base)
        for grant in (1, 2):  # the second is a repeated consent: Google needs prompt=consent for it
            query, verifier = await code_flow(st.base, reg["client_id"], client)
            status, tokens = await redeem(st.base, reg["client_id"], query["code"][0], verifier)
            assert status == 200, tokens
            assert st.provider.stats()["live_refresh_tokens"] == {"alice": grant}
            await asyncio.sleep(1.2)  # the grant's upstream access token has expired
            calls = st.provider.stats()["token_calls"]["refresh_token"]
            assert await _use(st.base, tokens["access_token"]) != 401, grant  # refreshed upstream, not ended
            assert st.provider.stats()["token_calls"]["refresh_token"] == calls + 1
