"""The whole sign-in round trip against the dev provider, on both stores."""

from __future__ import annotations

import aiohttp

from sidecar.store import SessionStore
from tests.stack import browser, session_cookie, sign_in, stack


async def test_browser_signs_in_and_reaches_the_app_with_identity_headers(store: SessionStore) -> None:
    async with stack(store) as st, browser() as client:
        resp = await sign_in(client, st.base, rd="/_demo/echo")
        assert resp.status == 200
        echo = await resp.json()
        headers = {k.lower(): v for k, v in echo["headers"].items()}
        assert headers["x-forwarded-user"] == "alice@example.com"
        assert headers["x-forwarded-email"] == "alice@example.com"
        assert headers["x-forwarded-groups"] == "admins,staff"
        assert headers["x-forwarded-preferred-username"] == "alice"
        assert "_sidecar" not in headers.get("cookie", "")
        assert session_cookie(client) is not None
        assert st.provider.stats()["token_calls"]["authorization_code"] == 1


async def test_auth_endpoint_answers_202_with_headers_then_401_after_sign_out(store: SessionStore) -> None:
    async with stack(store) as st, browser() as client:
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 401
        await sign_in(client, st.base)
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 202
            assert resp.headers["X-Auth-Request-User"] == "alice@example.com"
            assert resp.headers["X-Auth-Request-Email"] == "alice@example.com"
            assert resp.headers["X-Auth-Request-Groups"] == "admins,staff"
            assert resp.headers["X-Auth-Request-Preferred-Username"] == "alice"
            assert "Set-Cookie" not in resp.headers
        async with client.get(f"{st.base}/oauth2/sign_out", allow_redirects=False) as resp:
            assert resp.status == 302
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 401
        assert st.provider.stats()["revocations"] == 1


async def test_unauthenticated_browser_is_redirected_and_api_client_gets_401(store: SessionStore) -> None:
    async with stack(store) as st, aiohttp.ClientSession() as client:
        async with client.get(
            f"{st.base}/some/page?x=1", headers={"Accept": "text/html"}, allow_redirects=False
        ) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/oauth2/start?rd=%2Fsome%2Fpage%3Fx%3D1"
        async with client.get(
            f"{st.base}/api/thing", headers={"Accept": "application/json"}, allow_redirects=False
        ) as resp:
            assert resp.status == 401
