"""GET /oauth2/authorize, POST /oauth2/consent and the grant sign-in, over real HTTP with the dev provider.

A scripted browser goes authorize -> sign-in -> consent -> the grant's own upstream sign-in -> redirect to
the client with a code, which the token endpoint redeems. The hostile families: redirect URI spellings,
PKCE, repeated parameters, CSRF, framing, consent by another user.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from sidecar.store import SessionStore
from tests.stack import Stack, browser, sign_in, stack

REDIRECT = "http://127.0.0.1:8123/cb"
OTHER_REDIRECT = "https://app.example.com/cb"
OAUTH = {"oauth_server": "true", "oauth_resource": "/mcp"}


@asynccontextmanager
async def oauth_stack(store: SessionStore | None = None, **overrides: Any) -> AsyncIterator[Stack]:
    async with stack(store, **{**OAUTH, **overrides}) as st:
        yield st


async def register(base: str, **meta: Any) -> dict[str, Any]:
    body = {
        "redirect_uris": [REDIRECT, OTHER_REDIRECT],
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        "client_name": "Test <b>Client</b>",
        **meta,
    }
    async with aiohttp.ClientSession() as http, http.post(f"{base}/oauth2/register", json=body) as resp:
        assert resp.status == 201, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_params(client_id: str, challenge: str, **extra: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "st-" + secrets.token_hex(4),
        "scope": "openid email offline_access",
    }
    params.update(extra)
    return params


def form_fields(page: str) -> dict[str, str]:
    """The hidden inputs of the page's form."""
    return {
        html.unescape(m.group(1)): html.unescape(m.group(2))
        for m in re.finditer(r"<input type='hidden' name='([^']*)' value='([^']*)'>", page)
    }


async def follow_to_client(client: aiohttp.ClientSession, response: aiohttp.ClientResponse) -> str:
    """Follow redirects by hand until one points at the OAuth client's redirect URI; returns that Location."""
    for _ in range(10):
        assert response.status in (302, 303), (response.status, await response.text())
        location = response.headers["Location"]
        if location.startswith((REDIRECT, OTHER_REDIRECT)):
            return location
        base = f"{response.url.scheme}://{response.url.host}:{response.url.port}"
        target = location if location.startswith("http") else base + location
        async with client.get(target, allow_redirects=False) as response:
            await response.read()
    raise AssertionError("no redirect to the client")


async def consent_page(client: aiohttp.ClientSession, base: str, params: dict[str, str] | list[tuple[str, str]]) -> str:
    async with client.get(f"{base}/oauth2/authorize", params=params) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.url.path == "/oauth2/authorize"
        return await resp.text()


async def approve(client: aiohttp.ClientSession, base: str, page: str, decision: str = "approve") -> str:
    """Post the consent form as the browser would; returns the Location the client is finally sent to."""
    fields = {**form_fields(page), "decision": decision}
    async with client.post(f"{base}/oauth2/consent", data=fields, allow_redirects=False) as resp:
        await resp.read()
        return await follow_to_client(client, resp)


async def code_flow(base: str, client_id: str, client: aiohttp.ClientSession) -> tuple[dict[str, list[str]], str]:
    """The whole scripted browser run; returns the redirect's query and the PKCE verifier."""
    verifier, challenge = pkce()
    params = authorize_params(client_id, challenge, state="xyz")
    page = await consent_page(client, base, params)
    location = await approve(client, base, page)
    return parse_qs(urlsplit(location).query), verifier


async def redeem(base: str, client_id: str, code: str, verifier: str) -> tuple[int, dict[str, Any]]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": client_id,
        "code_verifier": verifier,
    }
    async with aiohttp.ClientSession() as http, http.post(f"{base}/oauth2/token", data=form) as resp:
        return resp.status, await resp.json()


# --- the happy path --------------------------------------------------------------------------------------------


async def test_code_flow_signs_in_asks_consent_and_issues_a_code_the_token_endpoint_redeems(
    store: SessionStore,
) -> None:
    async with oauth_stack(store) as st, browser() as client:
        base = st.base
        reg = await register(base)
        verifier, challenge = pkce()
        params = authorize_params(reg["client_id"], challenge, state="xyz")
        async with client.get(f"{base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
            assert resp.status == 302  # not signed in: the normal browser sign-in first, back here after
            start = resp.headers["Location"]
        assert start.startswith("/oauth2/start?rd=%2Foauth2%2Fauthorize%3F")
        async with client.get(base + start) as resp:
            page = await resp.text()
            assert resp.url.path == "/oauth2/authorize"
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
            assert resp.headers["Cache-Control"] == "no-store"
        assert "Test &lt;b&gt;Client&lt;/b&gt;" in page and "<b>Client" not in page
        assert "not verified" in page
        assert "127.0.0.1:8123" in page and f"{base}/mcp" in page and "alice@example.com" in page
        assert "offline_access" in page and "profile" not in page
        location = await approve(client, base, page)
        query = parse_qs(urlsplit(location).query)
        assert location.startswith(REDIRECT + "?")
        assert query["state"] == ["xyz"] and query["iss"] == [base]
        assert query["code"][0].startswith("scc.")
        status, tokens = await redeem(base, reg["client_id"], query["code"][0], verifier)
        assert status == 200, tokens
        assert tokens["token_type"].lower() == "bearer" and tokens["refresh_token"]
        # the browser session is untouched by the grant's sign-in
        async with client.get(f"{base}/oauth2/userinfo") as resp:
            assert resp.status == 200 and (await resp.json())["email"] == "alice@example.com"


async def test_grant_sign_in_asks_the_provider_for_offline_access() -> None:
    async with oauth_stack() as st, browser() as client:
        reg = await register(st.base)
        await sign_in(client, st.base)
        _, challenge = pkce()
        page = await consent_page(client, st.base, authorize_params(reg["client_id"], challenge))
        async with client.post(
            f"{st.base}/oauth2/consent",
            data={**form_fields(page), "decision": "approve"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 302
            upstream = parse_qs(urlsplit(resp.headers["Location"]).query)
        assert "offline_access" in upstream["scope"][0].split()
        assert upstream["code_challenge_method"] == ["S256"]


# --- errors that must never redirect ----------------------------------------------------------------------------

BAD_REDIRECTS = [
    "HTTP://127.0.0.1:8123/cb",
    "http://127.0.0.1:8123/CB",
    "http://127.0.0.1:8123/cb/",
    "http://127.0.0.1:8123/cb?x=1",
    "http://127.0.0.1:8123/cb#frag",
    "http://user@127.0.0.1:8123/cb",
    "http://localhost:8123/cb",
    "http://localhost:8124/cb",
    "http://[::1]:8123/cb",
    "http://127.0.0.1:0/cb",
    "http://127.0.0.1:65536/cb",
    "http://127.0.0.1:08123/cb",
    "http://127.0.0.1:/cb",
    "http://127.0.0.1:8124/cb/",
    "http://127.0.0.1:8124/CB",
    "http://127.0.0.1:8124/cb?x=1",
    "http://127.0.0.1:8124/cb#frag",
    "http://127.0.0.1:8124@evil.example/cb",
    "http://127.0.0.1.evil.example:8124/cb",
    "https://app.example.com:8443/cb",
    "https://127.0.0.1:8123/cb",
    "https://APP.example.com/cb",
    "https://app.example.com:443/cb",
    "https://app.example.com/cb/../cb",
    "https://app.example.com.evil.com/cb",
    "http://app.example.com/cb",
    "javascript:alert(1)//https://app.example.com/cb",
    "data:text/html,<script>alert(1)</script>",
    "https://аpp.example.com/cb",  # Cyrillic а
    "https://app.example.com/cb ",
    "",
]


@pytest.mark.parametrize("redirect_uri", BAD_REDIRECTS)
async def test_redirect_uri_not_registered_exactly_gets_an_error_page_never_a_redirect(redirect_uri: str) -> None:
    async with oauth_stack() as st, browser() as client:
        reg = await register(st.base)
        await sign_in(client, st.base)
        _, challenge = pkce()
        params = authorize_params(reg["client_id"], challenge, redirect_uri=redirect_uri)
        async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
            assert resp.status == 400
            assert "Location" not in resp.headers
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert "redirect" in (await resp.text()).lower()


async def test_unknown_missing_or_repeated_client_or_redirect_gets_an_error_page() -> None:
    async with oauth_stack() as st, browser() as client:
        reg = await register(st.base)
        await sign_in(client, st.base)
        _, challenge = pkce()
        good = authorize_params(reg["client_id"], challenge)
        cases: list[list[tuple[str, str]]] = [
            [(k, v) for k, v in good.items() if k != "client_id"],
            [(k, v) for k, v in good.items() if k != "redirect_uri"],
            [*good.items(), ("client_id", reg["client_id"])],
            [*good.items(), ("redirect_uri", REDIRECT)],
            [*good.items(), ("redirect_uri", OTHER_REDIRECT)],
            [(k, "unknown-client" if k == "client_id" else v) for k, v in good.items()],
            [(k, "" if k == "client_id" else v) for k, v in good.items()],
            [(k, "a b\x00c" if k == "client_id" else v) for k, v in good.items()],
        ]
        for params in cases:
            async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
                assert resp.status == 400, params
                assert "Location" not in resp.headers


# --- errors that go back to the client -------------------------------------------------------------------------


async def test_request_errors_go_back_to_the_client_with_error_state_and_iss() -> None:
    async with oauth_stack() as st, browser() as client:
        base = st.base
        reg = await register(base)
        await sign_in(client, base)
        verifier, challenge = pkce()
        good = authorize_params(reg["client_id"], challenge, state="s1")

        def with_(**changes: str | None) -> list[tuple[str, str]]:
            merged = {**good, **changes}
            return [(k, v) for k, v in merged.items() if v is not None]

        cases: list[tuple[list[tuple[str, str]], str]] = [
            (with_(code_challenge_method="plain", code_challenge=verifier[:43]), "invalid_request"),
            (with_(code_challenge_method=None), "invalid_request"),
            (with_(code_challenge=None), "invalid_request"),
            (with_(code_challenge_method="s256"), "invalid_request"),
            (with_(code_challenge="short"), "invalid_request"),
            (with_(code_challenge="=" * 43), "invalid_request"),
            (with_(response_type="token"), "unsupported_response_type"),
            (with_(response_type="code id_token"), "unsupported_response_type"),
            (with_(response_type=None), "invalid_request"),
            (with_(response_mode="fragment"), "invalid_request"),
            ([*with_(), ("code_challenge", challenge)], "invalid_request"),
            ([*with_(), ("scope", "openid")], "invalid_request"),
            ([*with_(), ("code_challenge_method", "S256")], "invalid_request"),
            ([*with_(), ("response_type", "code")], "invalid_request"),
            ([*with_(resource=f"{base}/mcp"), ("resource", f"{base}/mcp")], "invalid_request"),
            (with_(resource=f"{base}/other"), "invalid_target"),
            (with_(resource=f"{base}/mcp//"), "invalid_target"),
            (with_(resource=f"{base}/mcp/x"), "invalid_target"),
            (with_(resource="https://evil.example/mcp"), "invalid_target"),
            (with_(resource=f"{base}/MCP"), "invalid_target"),
            (with_(scope="openid admin"), "invalid_scope"),
            (with_(scope="groups"), "invalid_scope"),
            (with_(prompt="none"), "consent_required"),
        ]
        for params, error in cases:
            async with client.get(f"{base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
                assert resp.status == 302, (params, resp.status)
                location = resp.headers["Location"]
                assert location.startswith(REDIRECT + "?"), location
                query = parse_qs(urlsplit(location).query)
                assert query["error"] == [error], (params, query)
                assert query["iss"] == [base] and query["state"] == ["s1"]
                assert "code" not in query
        # a repeated state is not echoed (which one?), but the error still reaches the client
        async with client.get(
            f"{base}/oauth2/authorize", params=[*with_(), ("state", "s2")], allow_redirects=False
        ) as resp:
            query = parse_qs(urlsplit(resp.headers["Location"]).query)
            assert query["error"] == ["invalid_request"] and "state" not in query


async def test_trailing_slash_resource_and_omitted_resource_are_the_one_resource() -> None:
    async with oauth_stack() as st, browser() as client:
        reg = await register(st.base)
        await sign_in(client, st.base)
        for resource in (f"{st.base}/mcp/", f"{st.base}/mcp", None):
            _, challenge = pkce()
            params = authorize_params(reg["client_id"], challenge)
            if resource:
                params["resource"] = resource
            page = await consent_page(client, st.base, params)
            assert f"<code>{st.base}/mcp</code>" in page


async def test_two_resources_need_a_resource_parameter() -> None:
    async with oauth_stack(oauth_resource="/mcp,/api") as st, browser() as client:
        reg = await register(st.base)
        await sign_in(client, st.base)
        _, challenge = pkce()
        async with client.get(
            f"{st.base}/oauth2/authorize", params=authorize_params(reg["client_id"], challenge), allow_redirects=False
        ) as resp:
            assert parse_qs(urlsplit(resp.headers["Location"]).query)["error"] == ["invalid_target"]
        params = authorize_params(reg["client_id"], challenge, resource=f"{st.base}/api")
        page = await consent_page(client, st.base, params)
        assert f"<code>{st.base}/api</code>" in page


async def test_client_without_the_code_grant_is_unauthorized() -> None:
    async with oauth_stack() as st, browser() as client:
        device_grant = "urn:ietf:params:oauth:grant-type:device_code"
        with_redirect = await register(st.base, grant_types=[device_grant])
        without_redirect = await register(st.base, grant_types=[device_grant], redirect_uris=None)
        await sign_in(client, st.base)
        _, challenge = pkce()
        # Without the code grant the redirect URIs a client sends are checked, then not kept (client_metadata.py):
        # neither client has anywhere to be redirected to, so both get the error page, never a redirect.
        assert with_redirect["redirect_uris"] == []
        for reg in (with_redirect, without_redirect):
            params = authorize_params(reg["client_id"], challenge)
            async with client.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
                assert resp.status == 400 and "Location" not in resp.headers


# --- the consent form -----------------------------------------------------------------------------------------


async def test_consent_refuses_missing_forged_foreign_and_cross_site_submissions() -> None:
    async with oauth_stack() as st, browser() as alice, browser() as bob:
        base = st.base
        reg = await register(base)
        await sign_in(alice, base)
        st.provider.config(auto_login="bob")
        await sign_in(bob, base)
        st.provider.config(auto_login="alice")
        _, challenge = pkce()
        alice_page = await consent_page(alice, base, authorize_params(reg["client_id"], challenge))
        bob_page = await consent_page(bob, base, authorize_params(reg["client_id"], challenge))
        fields, bob_fields = form_fields(alice_page), form_fields(bob_page)
        other = await consent_page(alice, base, authorize_params(reg["client_id"], challenge))
        cases: list[tuple[aiohttp.ClientSession, dict[str, str], dict[str, str]]] = [
            (alice, {"pending": fields["pending"], "decision": "approve"}, {}),
            (alice, {**fields, "csrf": "A" * 43, "decision": "approve"}, {}),
            (alice, {**fields, "csrf": "", "decision": "approve"}, {}),
            (alice, {**fields, "csrf": form_fields(other)["csrf"], "decision": "approve"}, {}),
            (alice, {**fields, "csrf": bob_fields["csrf"], "decision": "approve"}, {}),
            (bob, {**fields, "decision": "approve"}, {}),
            (bob, {**bob_fields, "pending": fields["pending"], "decision": "approve"}, {}),
            (alice, {**fields, "decision": "approve"}, {"Origin": "https://evil.example"}),
            (alice, {**fields, "decision": "approve"}, {"Origin": "null"}),
            (alice, {**fields, "decision": "approve"}, {"Sec-Fetch-Site": "cross-site"}),
            (alice, {**fields, "decision": "deny"}, {"Sec-Fetch-Site": "same-site"}),
            # hand-made hostile variants of what a browser might send (the real ones: tests/e2e/test_browser_oauth.py)
            (alice, {**fields, "decision": "approve"}, {"Origin": "null", "Sec-Fetch-Site": "cross-site"}),
            (alice, {**fields, "decision": "approve"}, {"Origin": "null", "Sec-Fetch-Site": "same-site"}),
            (alice, {**fields, "decision": "approve"}, {"Origin": base, "Sec-Fetch-Site": "cross-site"}),
            (alice, {**fields, "decision": "approve"}, {"Origin": base.replace("127.0.0.1", "localhost")}),
            (alice, {**fields, "decision": "approve"}, {"Origin": base[:-1] + str((int(base[-1]) + 1) % 10)}),
            (alice, {**fields, "decision": "approve"}, {"Origin": base + ".evil.example"}),
            (alice, {**fields, "decision": "approve"}, {"Origin": "file://"}),
            (alice, {**fields, "decision": "approve"}, {"Origin": " "}),
        ]
        for who, data, headers in cases:
            async with who.post(f"{base}/oauth2/consent", data=data, headers=headers, allow_redirects=False) as resp:
                assert resp.status == 403, (data, headers, resp.status)
                assert "Location" not in resp.headers
        async with aiohttp.ClientSession() as anonymous:
            async with anonymous.post(
                f"{base}/oauth2/consent", data={**fields, "decision": "approve"}, allow_redirects=False
            ) as resp:
                assert resp.status == 403
        # nothing above used up the request: the real form still works
        assert (await approve(alice, base, alice_page)).startswith(REDIRECT + "?code=")


async def test_a_consent_is_used_once() -> None:
    async with oauth_stack() as st, browser() as client:
        reg = await register(st.base)
        await sign_in(client, st.base)
        _, challenge = pkce()
        page = await consent_page(client, st.base, authorize_params(reg["client_id"], challenge))
        first = await approve(client, st.base, page)
        assert "code=" in first
        async with client.post(
            f"{st.base}/oauth2/consent",
            data={**form_fields(page), "decision": "approve"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 400 and "Location" not in resp.headers


async def test_deny_sends_access_denied_to_the_client() -> None:
    async with oauth_stack() as st, browser() as client:
        reg = await register(st.base)
        await sign_in(client, st.base)
        _, challenge = pkce()
        page = await consent_page(client, st.base, authorize_params(reg["client_id"], challenge, state="d1"))
        location = await approve(client, st.base, page, decision="deny")
        query = parse_qs(urlsplit(location).query)
        assert query == {"error": ["access_denied"], "state": ["d1"], "iss": [st.base]}


async def test_grant_sign_in_as_another_user_than_the_one_who_consented_is_refused() -> None:
    async with oauth_stack() as st, browser() as client:
        reg = await register(st.base)
        await sign_in(client, st.base)
        _, challenge = pkce()
        page = await consent_page(client, st.base, authorize_params(reg["client_id"], challenge))
        st.provider.config(auto_login="bob")  # the provider now signs someone else in
        async with client.post(
            f"{st.base}/oauth2/consent",
            data={**form_fields(page), "decision": "approve"},
        ) as resp:
            assert resp.status == 403
            assert str(resp.url).startswith(st.base)  # never sent to the client
            assert "different user" in await resp.text()
        async with client.get(f"{st.base}/oauth2/grants", headers={"Accept": "application/json"}) as resp:
            assert (await resp.json())["grants"] == []


async def test_consent_page_escapes_what_the_client_registered() -> None:
    async with oauth_stack() as st, browser() as client:
        name = "<script>alert(1)</script>' onmouseover='x"
        reg = await register(st.base, client_name=name)
        await sign_in(client, st.base)
        _, challenge = pkce()
        page = await consent_page(client, st.base, authorize_params(reg["client_id"], challenge, state="<img src=x>"))
        assert "<script>" not in page and "<img" not in page and "onmouseover='x" not in page
        assert html.escape(name, quote=True) in page
