"""Hostile review of the provider-facing changes (branch newuser), against a started sidecar and the dev provider
over real HTTP: what a real provider or client does that they mishandled, and variants of what they got right.

- A sign-in callback arriving while the token endpoint's ``Retry-After`` pause lasts is 503 without using up its
  state: reloaded after the pause (our 503 says when), the same callback signs in.
- A grant's upstream sign-in refused at the callback (``max_age`` not met, or the account not allowed) revokes the
  refresh token it got (offline, valid for months), as the grant finisher does when it makes no grant.
- Loopback redirect URIs (RFC 8252 7.3): any port, nothing else; more spellings of a loopback address and path.
"""

from __future__ import annotations

import asyncio

from tests.stack import browser, sign_in, stack
from tests.test_oauth_acr import _grant, _query
from tests.test_oauth_authorize import authorize_params, oauth_stack, pkce, register
from tests.test_provider_realworld import _callback_status, _provider_answer


async def test_a_callback_during_a_retry_after_pause_is_503_and_the_same_callback_works_after_it() -> None:
    async with stack() as st, browser() as first, browser() as second:
        waiting = await _provider_answer(second, st.base)  # the provider sent this browser back with a code
        st.provider.inject_fault(
            "raw", count=1, grant="authorization_code", status=429, body="", headers={"Retry-After": "2"}
        )
        assert await _callback_status(first, await _provider_answer(first, st.base)) == 503  # the 429 itself
        async with second.get(waiting, allow_redirects=False) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] in ("1", "2"), resp.status
        assert st.provider.stats()["token_calls"]["authorization_code"] == 1  # the paused endpoint was not asked
        await asyncio.sleep(2.1)
        assert await _callback_status(second, waiting) == 302  # the state was not used up by the 503
        async with second.get(f"{st.base}/oauth2/userinfo") as resp:
            assert resp.status == 200 and (await resp.json())["email"] == "alice@example.com"


async def test_a_grant_sign_in_refused_at_the_callback_revokes_its_upstream_refresh_token() -> None:
    async with oauth_stack(email_domain="example.com") as st, browser() as client:
        st.provider.config(remember_logins=True, honour_max_age=False)
        await sign_in(client, st.base)
        st.provider.backdate_logins(600)
        reg = await register(st.base)
        # the provider ignored max_age: the old login's auth_time, no code for the client
        revocations = st.provider.stats()["revocations"]
        location, _, _ = await _grant(client, st.base, reg["client_id"], max_age="60")
        assert not location
        assert st.provider.stats()["revocations"] == revocations + 1
        # the grant's sign-in came back as an account the sidecar does not allow (bob@example.org)
        st.provider.config(remember_logins=False, auto_login="bob")
        location, _, _ = await _grant(client, st.base, reg["client_id"])
        assert not location
        assert st.provider.stats()["revocations"] == revocations + 2
        # a browser sign-in refused the same way keeps its provider tokens (its own session may still use them)
        async with browser() as other:
            assert (await sign_in(other, st.base)).status == 403
        assert st.provider.stats()["revocations"] == revocations + 2


HOSTILE_LOOPBACK = [  # registered: http://127.0.0.1:8123/cb and http://localhost/done?app=cli
    "http://[::ffff:127.0.0.1]:8124/cb",
    "http://[::ffff:7f00:1]:8124/cb",
    "http://[0:0:0:0:0:0:0:1]:8124/cb",
    "http://127.1:8124/cb",
    "http://127.0.1:8124/cb",
    "http://0x7f.0.0.1:8124/cb",
    "http://0x7f000001:8124/cb",
    "http://2130706433:8124/cb",
    "http://0177.0.0.1:8124/cb",
    "http://127.0.0.2:8124/cb",
    "http://127.0.0.1.:8124/cb",
    "http://127.0.0.1.nip.io:8124/cb",
    "http://localhost.:3000/done?app=cli",
    "http://LOCALHOST:3000/done?app=cli",
    "http://localhost.evil.example:3000/done?app=cli",
    "http://evil.example#@localhost:3000/done?app=cli",
    "http://localhost:3000@evil.example/done?app=cli",
    "http://localhost@evil.example/done?app=cli",
    "http://127.0.0.1:8124\\@evil.example/cb",
    "http://127.0.0.1:8124/cb/../cb",
    "http://127.0.0.1:8124/./cb",
    "http://127.0.0.1:8124//cb",
    "http://127.0.0.1:8124/cb%2F..%2Fx",
    "http://127.0.0.1:8124/%63b",
    "http://127.0.0.1:8124/cb;x",
    "http://127.0.0.1:8124/cb?",
    "http://127.0.0.1:8124/cb%00",
    "http://127.0.0.1:8124/cb\t",
    "http://127.0.0.1:+8124/cb",
    "http://127.0.0.1:-1/cb",
    "http://127.0.0.1:8124:8124/cb",
    "http://127.0.0.1:\uff18\uff11\uff12\uff14/cb",  # full-width digits
    "http://127.0.0.1:99999/cb",
    "http://127.0.0.1:123456/cb",
    "http://127.0.0.1:00008124/cb",
    "http://localhost:3000/done?app=cli&x=1",
    "http://localhost:3000/done?APP=cli",
    "http://localhost:3000/done",
    "http://localhost:3000/done?app=cli#x",
    "http:/127.0.0.1:8124/cb",
    "http:127.0.0.1:8124/cb",
    "//127.0.0.1:8124/cb",
    "https://127.0.0.1:8124/cb",
    "https://localhost:3000/done?app=cli",
    "ws://127.0.0.1:8124/cb",
]


async def test_loopback_any_port_matches_no_other_spelling_of_host_or_path() -> None:
    async with oauth_stack() as st, browser() as client:
        registered = ["http://127.0.0.1:8123/cb", "http://localhost/done?app=cli"]
        reg = await register(st.base, redirect_uris=registered)
        await sign_in(client, st.base)
        _, challenge = pkce()
        for uri in HOSTILE_LOOPBACK:
            params = authorize_params(reg["client_id"], challenge, redirect_uri=uri)
            async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
                assert resp.status == 400 and "Location" not in resp.headers, (uri, resp.status)
        for uri in ("http://127.0.0.1:1/cb", "http://localhost:65535/done?app=cli"):  # the controls: accepted
            params = authorize_params(reg["client_id"], challenge, redirect_uri=uri)
            async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
                assert resp.status == 200 and "Allow" in await resp.text(), uri
        # a loopback client's refusal goes back to it on the port it asked for, never to another
        params = authorize_params(reg["client_id"], challenge, redirect_uri="http://127.0.0.1:4444/cb", max_age="x")
        async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
            assert resp.headers["Location"].startswith("http://127.0.0.1:4444/cb?")
            assert _query(resp.headers["Location"])["error"] == ["invalid_request"]
