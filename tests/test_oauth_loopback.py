"""RFC 8252 7.3 against a real sidecar: a native app registers a loopback redirect URI and, at each run, asks
for it on whatever port the system gave its listener; the code goes there, and only there. The refusals (other
hosts, paths, spellings of the port) are in ``test_oauth_authorize.BAD_REDIRECTS``."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import aiohttp

from tests.stack import browser, sign_in
from tests.test_oauth_authorize import authorize_params, consent_page, form_fields, oauth_stack, pkce, register

REGISTERED = ["http://127.0.0.1:8123/cb", "http://[::1]/callback", "http://localhost/done?app=cli"]
# (the URI asked for at /authorize, the registered one it stands for)
ANY_PORT = [
    ("http://127.0.0.1:45678/cb", "http://127.0.0.1:8123/cb"),
    ("http://127.0.0.1/cb", "http://127.0.0.1:8123/cb"),
    ("http://[::1]:51000/callback", "http://[::1]/callback"),
    ("http://[::1]/callback", "http://[::1]/callback"),
    ("http://localhost:3000/done?app=cli", "http://localhost/done?app=cli"),
    ("http://127.0.0.1:65535/cb", "http://127.0.0.1:8123/cb"),
]


async def _to_client(client: aiohttp.ClientSession, base: str, page: str, redirect_uri: str) -> str:
    """Approve the consent form and follow redirects until one goes to ``redirect_uri``; that Location."""
    async with client.post(
        f"{base}/oauth2/consent", data={**form_fields(page), "decision": "approve"}, allow_redirects=False
    ) as resp:
        location = resp.headers.get("Location", "")
    for _ in range(10):
        if location.startswith(redirect_uri):
            return location
        target = location if location.startswith("http") else base + location
        async with client.get(target, allow_redirects=False) as resp:
            location = resp.headers.get("Location", "")
    raise AssertionError(f"never sent to {redirect_uri}")


async def _redeem(base: str, client_id: str, code: str, verifier: str, redirect_uri: str) -> tuple[int, str]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": client_id,
        "code_verifier": verifier,
    }
    async with aiohttp.ClientSession() as http, http.post(f"{base}/oauth2/token", data=form) as resp:
        body = await resp.json()
        return resp.status, body.get("error") or body["token_type"]


async def test_a_loopback_redirect_uri_may_name_any_port_and_the_code_is_bound_to_the_one_asked_for() -> None:
    async with oauth_stack() as st, browser() as client:
        reg = await register(st.base, redirect_uris=REGISTERED)
        await sign_in(client, st.base)
        for asked, registered in ANY_PORT:
            verifier, challenge = pkce()
            page = await consent_page(
                client, st.base, authorize_params(reg["client_id"], challenge, redirect_uri=asked)
            )
            location = await _to_client(client, st.base, page, asked)
            assert urlsplit(location)._replace(query="").geturl() == urlsplit(asked)._replace(query="").geturl()
            code = parse_qs(urlsplit(location).query)["code"][0]
            if asked != registered:  # RFC 6749 4.1.3: the redirect_uri of the authorization request, not another
                assert await _redeem(st.base, reg["client_id"], code, verifier, registered) == (400, "invalid_grant")
                continue
            assert await _redeem(st.base, reg["client_id"], code, verifier, asked) == (200, "Bearer"), asked
        # the code bound to a port other than the registered one redeems with that port
        verifier, challenge = pkce()
        asked = "http://127.0.0.1:40001/cb"
        page = await consent_page(client, st.base, authorize_params(reg["client_id"], challenge, redirect_uri=asked))
        code = parse_qs(urlsplit(await _to_client(client, st.base, page, asked)).query)["code"][0]
        assert await _redeem(st.base, reg["client_id"], code, verifier, asked) == (200, "Bearer")
