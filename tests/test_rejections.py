"""Every bad input is refused with the right status, and none of them crashes anything."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from yarl import URL

from sidecar.context import SERVICES
from sidecar.cookies import SignInAttempt, state_cookie_suffix
from sidecar.store import MemoryStore
from tests.stack import browser, session_cookie, sign_in, stack


async def _start(client: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    """Begin sign-in without following: returns (provider authorize URL, state)."""
    async with client.get(f"{base}/oauth2/start", params={"rd": "/x"}, allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    return location, parse_qs(urlsplit(location).query)["state"][0]


async def _authorize(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(url, allow_redirects=False) as resp:
        assert resp.status == 302
        return resp.headers["Location"]


async def test_callback_with_missing_foreign_or_reused_state_never_calls_the_provider() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        url, state = await _start(client, st.base)
        callback = await _authorize(client, url)
        code = parse_qs(urlsplit(callback).query)["code"][0]
        for params in ({"code": code}, {"code": code, "state": "forged-state"}, {"state": state}):
            async with client.get(f"{st.base}/oauth2/callback", params=params, allow_redirects=False) as resp:
                assert resp.status == 400
        async with aiohttp.ClientSession() as no_cookie:  # the right state but from another browser
            async with no_cookie.get(callback, allow_redirects=False) as resp:
                assert resp.status == 400
        assert st.provider.stats()["token_calls"]["authorization_code"] == 0
        async with client.get(callback, allow_redirects=False) as resp:
            assert resp.status == 302
        async with client.get(callback, allow_redirects=False) as resp:  # replay
            assert resp.status == 400
        assert st.provider.stats()["token_calls"]["authorization_code"] == 1


async def test_parallel_tabs_all_sign_in() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        starts = await asyncio.gather(*(_start(client, st.base) for _ in range(3)))
        callbacks = [await _authorize(client, url) for url, _ in starts]
        for callback in reversed(callbacks):
            async with client.get(callback, allow_redirects=False) as resp:
                assert resp.status == 302, await resp.text()


async def test_provider_error_and_missing_pkce_verifier_refuse_sign_in() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        async with client.get(f"{st.base}/oauth2/callback", params={"error": "access_denied", "state": "s"}) as resp:
            assert resp.status == 403
        url, state = await _start(client, st.base)
        callback = await _authorize(client, url)
        # The verifier travels sealed in the attempt cookie; one sealed with the right secret but another
        # verifier must be refused by the provider (PKCE), and no session is made.
        codec = st.runners[0].app[SERVICES].codec
        wrong = codec.dump_attempt(SignInAttempt(state=state, verifier="w" * 43, nonce="n", rd="/"))
        client.cookie_jar.update_cookies({f"_sidecar_csrf_{state_cookie_suffix(state)}": wrong}, URL(st.base))
        async with client.get(callback, allow_redirects=False) as resp:
            assert resp.status == 403
        assert session_cookie(client) is None


@pytest.mark.parametrize(
    "rd",
    [
        "https://evil.example/",
        "//evil.example/",
        "/\\evil.example",
        "/%2F%2Fevil.example",
        "javascript:alert(1)",
        "http://127.0.0.1.evil.example/",
        "https://user@evil.example/",
        "/%5Cevil.example",
        "\\\\evil.example",
    ],
)
async def test_open_redirects_fall_back_to_root(rd: str) -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        resp = await sign_in(client, st.base, rd=rd)
        assert resp.url.host == "127.0.0.1" and resp.url.path == "/"


async def _landing(client: aiohttp.ClientSession, base: str, rd: str) -> str:
    """Sign in without following the last redirect: where would the browser be sent?"""
    async with client.get(f"{base}/oauth2/start", params={"rd": rd}, allow_redirects=False) as resp:
        authorize = resp.headers["Location"]
    callback = await _authorize(client, authorize)
    async with client.get(callback, allow_redirects=False) as resp:
        assert resp.status == 302
        return resp.headers["Location"]


async def test_whitelisted_and_local_redirects_are_kept() -> None:
    async with stack(MemoryStore(), whitelist_domain=".example.com") as st, browser() as client:
        assert await _landing(client, st.base, "https://app.example.com/a?b=1") == "https://app.example.com/a?b=1"
        assert await _landing(client, st.base, "https://example.com/") == "https://example.com/"
        assert await _landing(client, st.base, "https://example.com.evil.org/") == "/"
        assert await _landing(client, st.base, "/deep/path?q=1") == "/deep/path?q=1"


async def test_forged_and_resigned_cookies_are_not_signed_in() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        await sign_in(client, st.base)
        real = session_cookie(client) or ""
        payload, _, sig = real.rpartition(".")
        forged = [
            real[:-2] + ("AA" if not real.endswith("AA") else "BB"),
            "garbage",
            "a.b.c",
            "x" * 5000,
            payload + ".",
            real.replace(real[5], "Z" if real[5] != "Z" else "Y", 1),
        ]
        import hashlib

        from itsdangerous import URLSafeTimedSerializer

        other = URLSafeTimedSerializer(
            "another-secret-0123456789", salt="sidecar.session", signer_kwargs={"digest_method": hashlib.sha256}
        )
        forged.append(other.dumps("A" * 43 + "." + "B" * 43))
        for value in forged:
            async with aiohttp.ClientSession(cookies={"_sidecar": value}) as c:
                async with c.get(f"{st.base}/oauth2/auth") as resp:
                    assert resp.status in (400, 401), value[:20]
                async with c.get(f"{st.base}/api") as resp:
                    assert resp.status in (400, 401)
        async with aiohttp.ClientSession(cookies={"_sidecar": real}) as c:  # still fine afterwards
            async with c.get(f"{st.base}/oauth2/auth") as resp:
                assert resp.status == 202


async def test_spoofed_identity_headers_never_reach_the_app() -> None:
    # The sidecar sets Authorization here, so a client's own one must not pass either.
    async with (
        stack(MemoryStore(), skip_auth_route="^/public/", pass_authorization_header="true") as st,
        browser() as client,
    ):
        spoof = {
            "X-Auth-Request-User": "mallory",
            "X-Forwarded-User": "mallory",
            "X_Forwarded_Email": "m@evil",
            "x-auth-request-groups": "admins",
            "Authorization": "Bearer forged",
            "X_Auth_Request_Email": "m@evil",
            "X-Forwarded-Preferred-Username": "mallory",
            "X-Forwarded-Access-Token": "forged",
        }
        async with aiohttp.ClientSession() as anon, anon.get(f"{st.base}/public/x", headers=spoof) as resp:
            assert resp.status == 200  # skip-auth route: served without a session
            echo_text = await resp.text()
            assert "mallory" not in echo_text and "forged" not in echo_text
        resp = await sign_in(client, st.base)
        async with client.get(f"{st.base}/_demo/echo", headers=spoof) as resp:
            echo = await resp.json()
        seen = {k.lower().replace("_", "-"): v for k, v in echo["headers"].items()}
        assert seen["x-forwarded-user"] == "alice@example.com"
        assert seen["x-auth-request-user"] == "alice@example.com"
        assert seen["x-auth-request-groups"] == "admins,staff"
        assert seen["authorization"].startswith("Bearer ey") and "x-forwarded-access-token" not in seen
        assert "mallory" not in str(echo) and "forged" not in str(echo) and "m@evil" not in str(echo)


async def test_oversized_headers_are_refused_with_4xx_and_the_server_lives_on() -> None:
    async with stack(MemoryStore()) as st, aiohttp.ClientSession() as client:
        async with client.get(f"{st.base}/oauth2/auth", headers={"Cookie": "_sidecar=" + "a" * 20000}) as resp:
            assert resp.status in (400, 431)
        async with client.get(f"{st.base}/oauth2/auth", headers={"X-Big": "b" * 20000}) as resp:
            assert resp.status in (400, 431)
        async with client.get(f"{st.base}/ping") as resp:
            assert resp.status == 200
