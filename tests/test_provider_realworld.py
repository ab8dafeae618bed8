"""What real providers send that the other provider tests do not: logout tokens typed or shaped the way
different providers write them, ``Retry-After`` on a rate-limited token endpoint, and ID tokens signed with
the algorithms and key sets real providers use (ES256, PS256, EdDSA, a key set whose keys carry no ``kid``).
Real HTTP against the dev provider and a started sidecar; one stack shared by the cases of a test."""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import jwt
import redis.asyncio as aioredis

from sidecar.oidc import BACKCHANNEL_EVENT
from sidecar.store import RedisStore
from sidecar.token_response import RETRY_AFTER_MAX
from tests.stack import Stack, browser, sign_in, stack
from tests.test_provider_failures import _logout_claims


def _signed(st: Stack, claims: dict[str, Any], **header: Any) -> str:
    """Signed with the provider's current key, with these extra header fields (``typ``)."""
    key = st.provider.keys.current
    return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid, **header})


async def _post_logout(base: str, token: str) -> int:
    async with aiohttp.ClientSession() as idp:
        async with idp.post(f"{base}/oauth2/backchannel_logout", data={"logout_token": token}) as resp:
            await resp.read()
            return resp.status


async def _auth(client: aiohttp.ClientSession, base: str) -> int:
    async with client.get(f"{base}/oauth2/auth") as resp:
        return resp.status


# Each refused with 400, the session untouched (OIDC Back-Channel Logout 1.0, 2.4 and 2.6).
REFUSED_LOGOUT_TOKENS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("event value a string", {"events": {BACKCHANNEL_EVENT: "logout"}}, {}),
    ("event value null", {"events": {BACKCHANNEL_EVENT: None}}, {}),
    ("event value a list", {"events": {BACKCHANNEL_EVENT: []}}, {}),
    ("event value true", {"events": {BACKCHANNEL_EVENT: True}}, {}),
    ("events a list", {"events": [BACKCHANNEL_EVENT]}, {}),
    ("another event only", {"events": {"http://schemas.openid.net/event/other": {}}}, {}),
    ("typed as an access token", {}, {"typ": "at+jwt"}),
    ("typed as an access token, media type", {}, {"typ": "application/at+jwt"}),
    ("typed as a security event", {}, {"typ": "secevent+jwt"}),
    ("typed as an ID token", {}, {"typ": "id_token+jwt"}),
    ("typ not a string", {}, {"typ": 1}),
    ("nonce present", {"nonce": "n-1"}, {}),
    ("neither sub nor sid", {"sub": None}, {}),
    ("an empty sub and no sid", {"sub": ""}, {}),
    ("an empty sub and an empty sid", {"sub": "", "sid": ""}, {}),
]
# Accepted: explicit typing in its spellings, no typ (tokens from before the 2023 errata), sub only, sid only.
ACCEPTED_TYPS: list[str | None] = ["logout+jwt", "application/logout+jwt", "Logout+JWT", "JWT", None]


async def test_logout_tokens_shaped_like_other_tokens_are_refused_and_every_real_format_accepted() -> None:
    async with stack(provider_kw={"send_sid": True}) as st, browser() as client:
        await sign_in(client, st.base)
        for name, changes, header in REFUSED_LOGOUT_TOKENS:
            token = _signed(st, _logout_claims(st, **changes), **header)
            assert await _post_logout(st.base, token) == 400, name
            assert await _auth(client, st.base) == 202, name
        for typ in ACCEPTED_TYPS:
            header = {} if typ is None else {"typ": typ}
            assert await _post_logout(st.base, _signed(st, _logout_claims(st), **header)) == 200, typ
            assert await _auth(client, st.base) == 401, typ
            await sign_in(client, st.base)
        # an empty sid names no provider session: the sub decides
        assert await _post_logout(st.base, _signed(st, _logout_claims(st, sid=""))) == 200
        assert await _auth(client, st.base) == 401
        await sign_in(client, st.base)
        # sid only (no sub): ends the provider session it names, and no other
        async with browser() as other:
            await sign_in(other, st.base)
            sid = list(st.provider._families)[-2]  # the provider session of `client`'s last sign-in
            assert await _post_logout(st.base, _signed(st, _logout_claims(st, sub=None, sid=sid))) == 200
            assert await _auth(client, st.base) == 401
            assert await _auth(other, st.base) == 202


# ------------------------------------------------------------------ a rate-limited token endpoint


def _http_date(seconds_ahead: float) -> str:
    return email.utils.formatdate(time.time() + seconds_ahead, usegmt=True)


async def _answer(client: aiohttp.ClientSession, base: str, path: str = "/oauth2/auth") -> tuple[int, str | None]:
    async with client.get(base + path, allow_redirects=False) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Retry-After")


async def _told_to_wait(status: int, retry_after: str, wait: float, redis_url: str, index: int) -> None:
    """The provider answers ``status`` with ``Retry-After: retry_after`` (``wait`` seconds): the sidecar neither
    retries at once nor asks again before then; its answer says when to come back; the session is kept."""
    store = RedisStore(aioredis.from_url(redis_url), prefix=f"wait{index}:")
    settings = {"pass_access_token": "true", "refresh_skew": "0s", "provider_retries": "2"}
    try:
        async with stack(store, provider_kw={"access_token_ttl": 1}, **settings) as st, browser() as client:
            await sign_in(client, st.base)
            await asyncio.sleep(1.2)  # the access token (1 s) has expired: every request needs a refresh
            st.provider.reset_counters()
            st.provider.inject_fault("raw", count=1, status=status, body="", headers={"Retry-After": retry_after})
            for path in ("/oauth2/auth", "/oauth2/auth", "/_demo/echo"):
                answer, told = await _answer(client, st.base, path)
                assert answer == 503 and told is not None, (status, retry_after, path, answer)
                assert wait - 2 <= int(told) <= wait + 1, (retry_after, told)
            assert st.provider.stats()["token_calls"]["refresh_token"] == 1, retry_after  # asked once, not retried
            async with browser() as newcomer:  # a sign-in meanwhile: the code is not spent on a closed endpoint
                assert (await sign_in(newcomer, st.base)).status == 503, (status, retry_after)
            assert st.provider.stats()["token_calls"]["authorization_code"] == 0
            await asyncio.sleep(wait + 0.2)
            assert (await _answer(client, st.base))[0] == 202, retry_after  # the same session, refreshed
            assert st.provider.stats()["token_calls"]["refresh_token"] == 2
    finally:
        await store.close()


async def test_a_provider_that_says_retry_after_is_left_alone_until_then_and_no_session_ends(redis_url: str) -> None:
    cases = [
        (429, "2", 2.0),
        (503, "2", 2.0),
        (429, _http_date(4), 4.0),  # whole seconds: between 3 and 4 s from now
        (503, _http_date(4), 4.0),
    ]
    await asyncio.gather(*(_told_to_wait(*case, redis_url, i) for i, case in enumerate(cases)))


RETRY_AFTER_CASES = [  # (the provider's Retry-After, ours, the token calls it cost)
    ("soon", "2", 2),  # not a Retry-After value: the usual one retry, the usual answer
    ("-5", "2", 2),
    ("1e3", "2", 2),
    ("3 ", "3", 1),
    ("Sun, 06 Nov 1994 08:49:37 GMT", "2", 2),  # a date in the past: nothing to wait for
    ("0", "2", 2),
    ("86400", str(RETRY_AFTER_MAX), 1),  # a day: asked again within the cap, never a day of 503s
    ("9" * 40, str(RETRY_AFTER_MAX), 1),
]


async def test_retry_after_is_capped_and_nonsense_is_ignored() -> None:
    async with stack(provider_kw={"access_token_ttl": 1}, sidecar=False) as st:
        users = []
        for _ in RETRY_AFTER_CASES:  # a sidecar per case: a pause is per process
            base = await st.add_sidecar(refresh_skew="0s", provider_retries="1")
            users.append((base, browser()))
            await sign_in(users[-1][1], base)
        await asyncio.sleep(1.1)  # every access token has expired
        try:
            for (retry_after, told, calls), (base, client) in zip(RETRY_AFTER_CASES, users, strict=True):
                st.provider.reset_counters()
                st.provider.inject_fault("raw", count=-1, status=429, body="", headers={"Retry-After": retry_after})
                assert await _answer(client, base) == (503, told), retry_after
                assert st.provider.stats()["token_calls"]["refresh_token"] == calls, retry_after
                st.provider.clear_faults()
        finally:
            for _, client in users:
                await client.close()


# ------------------------------------------------------------------ signing algorithms and key sets


async def _signs_in_refreshes_and_logs_out(settings: dict[str, Any]) -> None:
    """With the provider set to ``settings`` before the sidecar first reads its discovery document: sign-in,
    a refresh whose new ID token is checked, and a back-channel logout all work."""
    async with stack(provider_kw={"access_token_ttl": 1}, refresh_skew="0s") as st, browser() as client:
        st.provider.config(settings)
        assert (await sign_in(client, st.base)).status == 200, settings
        await asyncio.sleep(1.1)
        assert await _auth(client, st.base) == 202, settings
        assert st.provider.stats()["token_calls"]["refresh_token"] == 1, settings
        assert await _post_logout(st.base, st.provider.logout_token("alice")) == 200, settings
        assert await _auth(client, st.base) == 401, settings


async def test_id_tokens_signed_with_each_algorithm_real_providers_use_and_keys_without_kid() -> None:
    cases: list[dict[str, Any]] = [
        {"signing_alg": "PS256"},
        {"signing_alg": "ES256"},
        {"signing_alg": "EdDSA"},
        {"send_kid": False},  # one key; neither it nor the tokens name a kid
        {"signing_alg": "ES256", "send_kid": False, "send_id_token_on_refresh": False},
    ]
    await asyncio.gather(*(_signs_in_refreshes_and_logs_out(case) for case in cases))


# ------------------------------------------------------------------ client authentication the provider allows


async def _authenticates_as_allowed(choice: str) -> None:
    async with stack(provider_kw={"access_token_ttl": 1}, refresh_skew="0s") as st, browser() as client:
        st.provider.config(client_auth=choice)
        assert (await sign_in(client, st.base)).status == 200, choice
        await asyncio.sleep(1.1)
        assert await _auth(client, st.base) == 202, choice
        async with client.get(f"{st.base}/oauth2/sign_out", allow_redirects=False) as resp:
            assert resp.status in (302, 303), choice
        stats = st.provider.stats()
        assert stats["token_calls"] == {"authorization_code": 1, "refresh_token": 1}, choice
        assert stats["revocations"] == 1, choice


async def test_a_provider_that_allows_only_one_client_authentication_method_gets_that_one() -> None:
    """Discovery's ``token_endpoint_auth_methods_supported`` (and the revocation endpoint's) decide how the client
    secret is sent: Basic when allowed (RFC 6749 2.3.1), else in the form; sign-in, refresh and revocation work."""
    await asyncio.gather(*(_authenticates_as_allowed(choice) for choice in ("post", "basic", "both")))


# ------------------------------------------------------------------ RFC 9207: the provider names itself


async def _provider_answer(client: aiohttp.ClientSession, base: str) -> str:
    """Start a sign-in and let the provider answer; the callback URL it sends the browser to."""
    async with client.get(f"{base}/oauth2/start", params={"rd": "/x"}, allow_redirects=False) as resp:
        authorize = resp.headers["Location"]
    async with client.get(authorize, allow_redirects=False) as resp:
        return resp.headers["Location"]


def _without_iss(callback: str, iss: str | None = None) -> str:
    parts = urlsplit(callback)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "iss"] + ([("iss", iss)] if iss is not None else [])
    return parts._replace(query=urlencode(query)).geturl()


async def _callback_status(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url, allow_redirects=False) as resp:
        return resp.status


async def test_a_callback_without_the_iss_its_provider_promises_is_refused_before_the_code_is_used() -> None:
    async with stack() as st, browser() as client:
        for hostile in (
            _without_iss,
            lambda url: _without_iss(url, st.issuer + "/"),
            lambda url: _without_iss(url, ""),
        ):
            callback = await _provider_answer(client, st.base)
            assert await _callback_status(client, hostile(callback)) == 400
        assert st.provider.stats()["token_calls"]["authorization_code"] == 0  # no code was spent
        assert await _callback_status(client, await _provider_answer(client, st.base)) == 302  # as sent: accepted
        # A provider that does not say it sends iss (Google, Entra ID): no iss is fine, a wrong one is not.
        st.provider.config(send_iss=False)
        second = await st.add_sidecar()  # reads discovery afresh
        async with browser() as other:
            callback = await _provider_answer(other, second)
            assert "iss=" not in callback
            assert await _callback_status(other, _without_iss(callback, "https://other.example")) == 400
            assert await _callback_status(other, await _provider_answer(other, second)) == 302


# ------------------------------------------------------------------ JWT confusion (RFC 8725 3.11)


async def _bearer_status(base: str, token: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/oauth2/auth", headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status


async def test_a_logout_token_is_never_accepted_as_a_bearer_token() -> None:
    """With ``--skip-jwt-bearer-tokens`` a signed JWT naming this client is an identity; a logout token is one
    too (iss, sub, aud, iat, exp), so it is told apart by what only a logout token carries."""
    async with stack(upstream="", skip_jwt_bearer_tokens="true") as st:
        now = int(time.time())
        access = {"iss": st.issuer, "sub": "alice-sub-1", "aud": "sidecar-dev", "iat": now, "exp": now + 60}
        assert await _bearer_status(st.base, _signed(st, access)) == 202  # the control: a plain JWT is accepted
        assert await _bearer_status(st.base, _signed(st, _logout_claims(st))) == 401
        assert await _bearer_status(st.base, _signed(st, _logout_claims(st), typ="logout+jwt")) == 401
        assert await _bearer_status(st.base, _signed(st, access, typ="logout+jwt")) == 401
        assert await _bearer_status(st.base, _signed(st, {**access, "events": {}})) == 401


# ------------------------------------------------------------------ an issuer identifier ending in "/"


async def test_an_issuer_with_a_trailing_slash_works_whichever_way_it_is_configured() -> None:
    """Auth0's issuer is ``https://TENANT.auth0.com/``; a new user often leaves the "/" out. Both spellings fetch
    the same discovery document, so both work, and every token's ``iss`` is then checked exactly against the
    document's issuer. An issuer that differs in anything more is still refused."""
    async with stack(provider_kw={"access_token_ttl": 1}, sidecar=False) as st:
        st.provider.config(issuer_trailing_slash=True)
        for configured in (st.issuer, st.issuer + "/"):
            base = await st.add_sidecar(oidc_issuer_url=configured, refresh_skew="0s")
            async with browser() as client:
                assert (await sign_in(client, base)).status == 200, configured
                await asyncio.sleep(1.1)
                assert await _auth(client, base) == 202, configured  # refreshed, the new ID token checked
                slash = _logout_claims(st, iss=st.issuer + "/")
                assert await _post_logout(base, _signed(st, _logout_claims(st))) == 400, configured  # iss without "/"
                assert await _post_logout(base, _signed(st, slash)) == 200, configured
                assert await _auth(client, base) == 401
        # no discovery document there (503); a document naming another issuer: the mix-up is refused (502)
        for other, status in ((st.issuer + "/x", 503), (st.issuer.replace("127.0.0.1", "localhost"), 502)):
            base = await st.add_sidecar(oidc_issuer_url=other)
            async with browser() as client:
                assert (await sign_in(client, base)).status == status, other


# ------------------------------------------------------------------ HTTP 200 carrying an error


async def _ok_with_error(body: str, first: int, after: int) -> None:
    async with stack(provider_kw={"access_token_ttl": 1}, refresh_skew="0s") as st, browser() as client:
        await sign_in(client, st.base)
        await asyncio.sleep(1.1)
        st.provider.inject_fault("raw", count=1, status=200, body=body)
        assert await _auth(client, st.base) == first, body
        await asyncio.sleep(0.1)
        assert await _auth(client, st.base) == after, body  # the provider answers normally again


async def test_a_200_answer_carrying_an_error_is_that_error_never_tokens() -> None:
    """Some token endpoints answer an error with HTTP 200; the ``error`` member decides, as for a 400."""
    cases = [
        ('{"error": "invalid_grant"}', 401, 401),  # the provider's verdict: the session ends
        ('{"error": "temporarily_unavailable", "access_token": "x"}', 503, 202),  # passing trouble: kept
        ('{"error": "server_error"}', 503, 202),
    ]
    await asyncio.gather(*(_ok_with_error(*case) for case in cases))


# ------------------------------------------------------------------ token responses as real providers write them

PROVIDER_RESPONSES: dict[str, dict[str, Any]] = {
    # Entra ID v1: every number a string, extra lifetimes and the resource
    "entra-v1": {"expires_in": "2", "ext_expires_in": "2", "expires_on": "1700000000", "not_before": "1699990000",
                 "resource": "00000003-0000-0000-c000-000000000000", "token_type": "Bearer"},
    # Keycloak: a refresh lifetime, 0 for an offline token, and its own extras
    "keycloak-offline": {"expires_in": 2, "refresh_expires_in": 0, "not-before-policy": 0, "session_state": "s-1"},
    # a lower-case token type, or none at all (GitHub-style answers, older providers)
    "lower-case-bearer": {"expires_in": 2, "token_type": "bearer"},
    "no-token-type": {"expires_in": 2, "token_type": None},
}  # fmt: skip


async def _signs_in_and_refreshes_with(fields: dict[str, Any]) -> None:
    async with stack(refresh_skew="0s") as st, browser() as client:
        st.provider.override_token_fields(fields)
        assert (await sign_in(client, st.base)).status == 200, fields
        async with client.get(f"{st.base}/oauth2/userinfo") as resp:
            expires = (await resp.json())["access_token_expires_at"]
        assert expires is not None and 0 < expires - time.time() <= 2.2, fields  # "2" read as 2 s (kept to 0.1 s)
        await asyncio.sleep(2.1)
        assert await _auth(client, st.base) == 202, fields
        assert st.provider.stats()["token_calls"]["refresh_token"] == 1, fields


async def test_token_responses_written_the_way_real_providers_write_them_sign_in_and_refresh() -> None:
    await asyncio.gather(*(_signs_in_and_refreshes_with(fields) for fields in PROVIDER_RESPONSES.values()))
