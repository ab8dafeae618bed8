"""``max_age`` at the authorization server's ``/oauth2/authorize`` (OIDC Core 3.1.2.1; the way an RFC 9470
client answers ``insufficient_user_authentication``): the grant's own upstream sign-in then asks the provider
for a sign-in at most that old, so the ID token's ``auth_time`` is recent even when the provider remembers an
older login. Real HTTP: the dev provider with remembered logins, a started sidecar, a scripted browser."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt

from tests.stack import browser, sign_in
from tests.test_oauth_authorize import (
    REDIRECT,
    authorize_params,
    consent_page,
    form_fields,
    oauth_stack,
    pkce,
    redeem,
    register,
)


async def _approve(client: aiohttp.ClientSession, base: str, page: str) -> tuple[int, str]:
    """Approve and follow redirects; (the last status, the Location that reached the client or "")."""
    async with client.post(
        f"{base}/oauth2/consent", data={**form_fields(page), "decision": "approve"}, allow_redirects=False
    ) as resp:
        status, location = resp.status, resp.headers.get("Location", "")
    for _ in range(10):
        if not location or location.startswith(REDIRECT):
            return status, location
        async with client.get(
            location if location.startswith("http") else base + location, allow_redirects=False
        ) as resp:
            await resp.read()
            status, location = resp.status, resp.headers.get("Location", "")
    raise AssertionError("too many redirects")


async def test_max_age_makes_the_grants_sign_in_fresh_even_when_the_provider_remembers_an_old_login() -> None:
    async with oauth_stack() as st, browser() as client:
        st.provider.config(remember_logins=True)
        await sign_in(client, st.base)
        st.provider.backdate_logins(600)  # the provider's remembered login is now ten minutes old
        reg = await register(st.base)
        for max_age, fresh in ((None, False), ("60", True)):
            logins = st.provider.stats()["interactive_logins"]
            verifier, challenge = pkce()
            extra = {} if max_age is None else {"max_age": max_age}
            page = await consent_page(client, st.base, authorize_params(reg["client_id"], challenge, **extra))
            status, location = await _approve(client, st.base, page)
            assert location, (max_age, status)
            code = parse_qs(urlsplit(location).query)["code"][0]
            status, tokens = await redeem(st.base, reg["client_id"], code, verifier)
            assert status == 200, tokens
            auth_time = jwt.decode(tokens["id_token"], options={"verify_signature": False})["auth_time"]
            assert (time.time() - auth_time < 60) is fresh, (max_age, time.time() - auth_time)
            assert (st.provider.stats()["interactive_logins"] > logins) is fresh, max_age
            st.provider.backdate_logins(600)


async def test_a_provider_that_ignores_max_age_gives_the_client_no_code() -> None:
    async with oauth_stack() as st, browser() as client:
        st.provider.config(remember_logins=True, honour_max_age=False)
        await sign_in(client, st.base)
        st.provider.backdate_logins(600)
        reg = await register(st.base)
        _, challenge = pkce()
        page = await consent_page(client, st.base, authorize_params(reg["client_id"], challenge, max_age="60"))
        status, location = await _approve(client, st.base, page)
        assert not location and status >= 400, (status, location)


async def test_a_malformed_max_age_is_invalid_request() -> None:
    async with oauth_stack() as st, browser() as client:
        await sign_in(client, st.base)
        reg = await register(st.base)
        _, challenge = pkce()
        for bad in ("-1", "abc", "1e3", "", " 5", "9" * 40, "١٢"):
            params = authorize_params(reg["client_id"], challenge, max_age=bad)
            async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
                query = parse_qs(urlsplit(resp.headers.get("Location", "")).query)
                assert resp.status == 302 and query["error"] == ["invalid_request"], (bad, resp.status)
        params = [*authorize_params(reg["client_id"], challenge).items(), ("max_age", "5"), ("max_age", "500")]
        async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
            assert parse_qs(urlsplit(resp.headers["Location"]).query)["error"] == ["invalid_request"]
