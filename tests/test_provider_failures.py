"""A misbehaving provider against a real sidecar: JWKS storms, a hanging issuer, refused and malformed
token-endpoint answers, at_hash, and back-channel logout tokens (age, expiry, replay)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from functools import cache
from typing import Any

import aiohttp
import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.oidc import (
    BACKCHANNEL_EVENT,
    FAILURE_BACKOFF,
    FIRST_FAILURE_BACKOFF,
    logout_token_replay_ttl,
)
from sidecar.refresh import REFUSAL_BACKOFF
from sidecar.store import RedisStore
from sidecar.token_response import MAX_LIFETIME
from tests.stack import Stack, app_token, browser, session_cookie, sign_in, stack


@cache
def _foreign_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _logout_claims(st: Stack, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": st.issuer,
        "aud": "sidecar-dev",
        "iat": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "sub": "alice-sub-1",
        "events": {BACKCHANNEL_EVENT: {}},
        **changes,
    }
    return {k: v for k, v in claims.items() if v is not None}


def _logout_token(st: Stack, **changes: Any) -> str:
    return st.provider.keys.sign(_logout_claims(st, **changes))


def _unknown_kid_token(st: Stack, kid: str) -> str:
    return jwt.encode(_logout_claims(st), _foreign_key(), algorithm="RS256", headers={"kid": kid})


async def _post_logout(http: aiohttp.ClientSession, base: str, token: str) -> int:
    async with http.post(f"{base}/oauth2/backchannel_logout", data={"logout_token": token}) as resp:
        await resp.read()
        return resp.status


async def _auth(client: aiohttp.ClientSession, base: str) -> tuple[int, str | None]:
    """/oauth2/auth's answer, and the access token the app then receives (with --pass-access-token)."""
    async with client.get(f"{base}/oauth2/auth") as resp:
        status = resp.status
    return status, (await app_token(client, base)) if status == 202 else None


# ------------------------------------------------------------------------------------- JWKS storms


async def test_concurrent_unknown_kids_cause_at_most_one_jwks_fetch() -> None:
    async with stack() as st, aiohttp.ClientSession() as idp:
        for kids in (["same-kid"] * 50, [f"kid-{i}" for i in range(50)]):  # one kid, and fifty different ones
            tokens = [_unknown_kid_token(st, kid) for kid in kids]
            statuses = await asyncio.gather(*(_post_logout(idp, st.base, t) for t in tokens))
            assert set(statuses) <= {400, 503}
        assert st.provider.stats()["jwks_calls"] == 1


async def test_a_failing_jwks_endpoint_is_not_fetched_on_every_request() -> None:
    async with stack() as st, aiohttp.ClientSession() as idp:
        for n, kind in enumerate(("500", "invalid_json")):
            if n:
                await asyncio.sleep(FIRST_FAILURE_BACKOFF + 0.1)  # the failure is remembered briefly, then asked again
            st.provider.break_endpoint("jwks", kind)
            st.provider.reset_counters()
            started = time.monotonic()
            for i in range(10):
                assert await _post_logout(idp, st.base, _unknown_kid_token(st, f"k{i}")) == 503
                assert await _post_logout(idp, st.base, _logout_token(st)) == 503  # even our own kid: no key set
            # the first failure is remembered FIRST_FAILURE_BACKOFF seconds, the second in a row twice that
            assert time.monotonic() - started < FIRST_FAILURE_BACKOFF * (n + 1), "too slow to prove the bound"
            assert st.provider.stats()["jwks_calls"] == 1


async def test_a_provider_that_comes_up_after_the_sidecar_is_used_within_seconds() -> None:
    """As in one pod or compose file: discovery fails at first, and the failure is not remembered long."""
    async with stack() as st, aiohttp.ClientSession() as idp:
        st.provider.break_endpoint("discovery", "500")
        st.provider.reset_counters()
        for calls in (1, 2):
            for _ in range(5):  # the failure is remembered: one fetch for all of these
                assert await _post_logout(idp, st.base, _logout_token(st)) == 503
            assert st.provider.stats()["discovery_calls"] == calls
            if calls == 2:  # two in a row: remembered twice as long
                await asyncio.sleep(FIRST_FAILURE_BACKOFF + 0.1)
                assert await _post_logout(idp, st.base, _logout_token(st)) == 503
                assert st.provider.stats()["discovery_calls"] == 2
            await asyncio.sleep(FIRST_FAILURE_BACKOFF + 0.1)
        st.provider.clear_faults()
        started = time.monotonic()
        while await _post_logout(idp, st.base, _logout_token(st)) == 503:
            assert time.monotonic() - started < FAILURE_BACKOFF + 1, "the provider came back but was not asked again"
            await asyncio.sleep(0.1)
        assert st.provider.stats()["discovery_calls"] == 3


# ------------------------------------------------------------------------------- hanging discovery


async def test_a_hanging_issuer_costs_every_waiting_request_one_timeout() -> None:
    async with stack(provider_timeout="1s") as st, aiohttp.ClientSession() as idp:
        st.provider.break_endpoint("discovery", "slow", delay=30)
        started = time.monotonic()
        statuses = await asyncio.gather(*(_post_logout(idp, st.base, _logout_token(st)) for _ in range(8)))
        elapsed = time.monotonic() - started
        assert set(statuses) == {504} and elapsed < 1.9  # not k x --provider-timeout
        started = time.monotonic()
        assert await _post_logout(idp, st.base, _logout_token(st)) == 504  # the failure is remembered briefly
        assert time.monotonic() - started < 0.5
        assert st.provider.stats()["discovery_calls"] == 1


# ------------------------------------------------------------------- token endpoint at the callback

MALFORMED = [
    (200, "not json at all", "text/html"),
    (200, "", "application/json"),
    (200, "[]", "application/json"),
    (200, "{}", "application/json"),
    (200, '{"access_token": ""}', "application/json"),
    (200, '{"access_token": 42, "token_type": "Bearer"}', "application/json"),
    (200, '{"access_token": "a", "token_type": "mac"}', "application/json"),
    (200, '{"access_token": "a", "token_type": "Bearer", "id_token": ["x"]}', "application/json"),
    (200, '{"access_token": "a", "expires_in": ' + "9" * 5000 + "}", "application/json"),
    (200, "[" * 100_000, "application/json"),
    (200, b"\xff\xfe{".decode("latin-1"), "application/json"),
]
REFUSED_AT_CALLBACK = [
    (400, "", "application/json"),
    (400, '{"error": "invalid_scope"}', "application/json"),
    (400, '{"error": "unauthorized_client"}', "application/json"),
    (401, '{"error": "invalid_client"}', "application/json"),
    (401, "<html>Unauthorized</html>", "text/html"),
    (400, '{"error": "invalid_request"}', "application/json"),
    (403, "Forbidden", "text/plain"),
]


async def test_malformed_or_refused_code_redemption_is_502_and_a_timeout_504() -> None:
    async with stack() as st, browser() as client:
        for status, body, ctype in MALFORMED + REFUSED_AT_CALLBACK:
            st.provider.inject_fault("raw", grant="authorization_code", status=status, body=body, content_type=ctype)
            resp = await sign_in(client, st.base)
            assert resp.status == 502, (status, body[:40])
        st.provider.inject_fault("timeout", grant="authorization_code", delay=3.0)  # --provider-timeout is 2 s
        assert (await sign_in(client, st.base)).status == 504
        assert (await sign_in(client, st.base)).status == 200  # nothing stuck afterwards


ODD_LIFETIMES = [1e300, float("inf"), float("nan"), "abc", -5, True, [], {}, "9" * 40, 0, 10**30]


async def test_odd_lifetimes_never_give_a_500(redis_url: str) -> None:
    store = RedisStore(aioredis.from_url(redis_url))
    try:
        async with stack(store) as st:
            for field in ("expires_in", "refresh_expires_in"):
                for odd in ODD_LIFETIMES:
                    st.provider.override_token_fields({field: odd})
                    async with browser() as client:
                        assert (await sign_in(client, st.base)).status == 200, (field, odd)
                        async with client.get(f"{st.base}/oauth2/userinfo") as resp:
                            assert resp.status == 200
                            expires = (await resp.json())["access_token_expires_at"]
                        assert expires is None or expires <= time.time() + MAX_LIFETIME + 5
                        assert (await _auth(client, st.base))[0] == 202
    finally:
        await store.close()


# ---------------------------------------------------------------------------- refused refreshes

# (status, body, content type, the record is deleted once the access token has expired)
REFUSALS = [
    (400, "", "application/json", False),
    (400, '{"error": "invalid_scope"}', "application/json", True),
    (400, '{"error": "unauthorized_client"}', "application/json", False),
    (401, '{"error": "invalid_client", "error_description": "bad secret"}', "application/json", False),
    (400, '{"error": "unsupported_grant_type"}', "application/json", False),
    (400, '{"error": "invalid_request"}', "application/json", False),
    (400, "<html><body>Bad Request</body></html>", "text/html", False),
    (401, "Unauthorized", "text/plain", False),
    (400, '{"error": 12}', "application/json", False),
    (400, '{"error": "no such\\ncode \\u0000"}', "application/json", False),
]


async def _refused_refresh(redis_url: str, index: int, status: int, body: str, ctype: str, deleted: bool) -> None:
    client_redis = aioredis.from_url(redis_url)
    store = RedisStore(client_redis, prefix=f"refused{index}:")
    try:
        provider_kw = {"access_token_ttl": 2}
        async with stack(store, provider_kw=provider_kw, pass_access_token="true") as st, browser() as client:
            await sign_in(client, st.base)
            first = await _auth(client, st.base)
            assert first[0] == 202 and first[1]
            await asyncio.sleep(1.1)  # past half its life: due for refresh (skew 30 s), still valid
            st.provider.inject_fault("raw", count=-1, status=status, body=body, content_type=ctype)
            assert await _auth(client, st.base) == first  # the current token is served while it lasts
            await asyncio.sleep(1.0)
            assert (await _auth(client, st.base))[0] == 401  # expired: sign in again, never 503
            page = f"{st.base}/somewhere"
            async with client.get(page, headers={"Accept": "text/html"}, allow_redirects=False) as resp:
                assert resp.status == 302 and resp.headers["Location"].startswith("/oauth2/start")
            records = [k async for k in client_redis.scan_iter(match=f"refused{index}:s:*")]
            assert len(records) == (0 if deleted else 1), (status, body)
            st.provider.clear_faults()
            await sign_in(client, st.base)  # and signing in again works
            assert (await _auth(client, st.base))[0] == 202
    finally:
        await store.close()


async def test_a_refused_refresh_serves_the_token_while_valid_then_sends_to_sign_in(redis_url: str) -> None:
    await asyncio.gather(*(_refused_refresh(redis_url, i, *case) for i, case in enumerate(REFUSALS)))


# Answers that say nothing about the grant: a firewall's or load balancer's page in front of the provider, an
# empty or odd 4xx, an error field that is no RFC 6749 code, and the codes a provider sends for its own passing
# trouble. (status, body, content type, what /oauth2/auth answers once the access token has expired)
PASSING_REFUSALS = [
    (403, "<html><body>Request blocked by the web application firewall</body></html>", "text/html", 401),
    (400, "", "application/json", 401),
    (404, "<html>Not Found</html>", "text/html", 401),
    (408, "Request Timeout", "text/plain", 401),
    (400, '{"error": 12}', "application/json", 401),
    (400, '{"error": "no such\\ncode"}', "application/json", 401),
    (400, '{"error": "temporarily_unavailable"}', "application/json", 503),
    (400, '{"error": "server_error", "error_description": "database restarting"}', "application/json", 503),
]


async def _passing_refusal(redis_url: str, index: int, status: int, body: str, ctype: str, expired: int) -> None:
    client_redis = aioredis.from_url(redis_url)
    prefix = f"passing{index}:"
    store = RedisStore(client_redis, prefix=prefix)
    try:
        async with (
            stack(store, provider_kw={"access_token_ttl": 1}, pass_access_token="true", refresh_skew="0s") as st,
            browser() as client,
        ):
            await sign_in(client, st.base)
            first = await _auth(client, st.base)
            assert first[0] == 202 and first[1]
            st.provider.inject_fault("raw", count=-1, status=status, body=body, content_type=ctype)
            await asyncio.sleep(1.2)  # expired: each request now needs a refresh
            for _ in range(2):  # refused, then refused again once the back-off has passed
                assert (await _auth(client, st.base))[0] == expired, (status, body)
                assert len([k async for k in client_redis.scan_iter(match=f"{prefix}s:*")]) == 1, (status, body)
                await asyncio.sleep(REFUSAL_BACKOFF + 0.3)
            st.provider.clear_faults()
            await asyncio.sleep(REFUSAL_BACKOFF + 0.3)  # the second back-off is twice as long
            status_after, token = await _auth(client, st.base)  # the same cookie, refreshed: never signed out
            assert status_after == 202 and token not in (None, first[1]), (status, body, status_after)
    finally:
        await store.close()


async def test_a_passing_refusal_repeated_never_ends_a_valid_session(redis_url: str) -> None:
    """Only the provider's own verdict (an RFC 6749 error code, repeated) may end a session: the same page from
    a firewall twice in a row, or ``temporarily_unavailable``, must not sign everyone out."""
    await asyncio.gather(*(_passing_refusal(redis_url, i, *case) for i, case in enumerate(PASSING_REFUSALS)))


async def test_configuration_refusals_are_logged_as_errors_naming_the_cause(caplog: pytest.LogCaptureFixture) -> None:
    async with stack(provider_kw={"access_token_ttl": 2}) as st, browser() as client:
        await sign_in(client, st.base)
        await asyncio.sleep(1.1)
        body = '{"error": "invalid_client", "error_description": "secret sidecar-dev-secret is wrong"}'
        st.provider.inject_fault("raw", count=1, status=401, body=body)
        with caplog.at_level(logging.ERROR, logger="sidecar.oidc"):
            assert (await _auth(client, st.base))[0] == 202
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "sidecar.oidc"]
        assert errors
        text = " ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in errors)
        assert "check the client id/secret" in text and "invalid_client" in text
        assert "sidecar-dev-secret" not in text  # the provider's description is not repeated


# ------------------------------------------------------------------------------------------ at_hash


async def test_a_wrong_at_hash_refuses_sign_in() -> None:
    async with stack() as st, browser() as client:
        assert (await sign_in(client, st.base)).status == 200  # the dev provider sends a correct at_hash
        for mode, expected in (("bad", 403), ("none", 200), ("good", 200)):
            st.provider.config(at_hash=mode)
            async with browser() as other:
                resp = await sign_in(other, st.base)
                assert resp.status == expected, mode
                assert (session_cookie(other) is not None) == (expected == 200)


# ---------------------------------------------------------------------------------- logout tokens


@pytest.mark.parametrize("with_exp", [True, False], ids=["exp", "no-exp"])
async def test_logout_tokens_need_recent_iat_and_a_fresh_jti(redis_url: str, with_exp: bool) -> None:
    """Both formats: with ``exp`` (2023 errata), and without (earlier providers): ``iat`` within minutes, a
    fresh ``jti`` across replicas, and everything else as strict."""
    stores = [RedisStore(aioredis.from_url(redis_url)) for _ in range(2)]
    try:
        async with stack(stores[0]) as st, browser() as laptop, aiohttp.ClientSession() as idp:
            st.provider.config(logout_token_exp=with_exp)
            second = await st.add_sidecar(stores[1])
            await sign_in(laptop, st.base)
            now = int(time.time())
            common = [
                {"iat": None},
                {"iat": now - 400},
                {"iat": "now"},
                {"iat": now + 3600},
                {"jti": None},
                {"jti": ""},
                {"jti": 17},
                {"jti": "x" * 300},
                {"nonce": "n"},
                {"events": None},
                {"aud": "other-client"},
                {"iss": "http://elsewhere.example"},
                {"sub": None},
            ]
            with_exp_only = [{"iat": now - 86400, "exp": now + 60}, {"exp": now - 3600}, {"exp": "soon"}]
            no_exp = {} if with_exp else {"exp": None}
            for changes in common + (with_exp_only if with_exp else []):
                assert await _post_logout(idp, st.base, _logout_token(st, **{**no_exp, **changes})) == 400, changes
            assert await _post_logout(idp, st.base, _unknown_kid_token(st, "forged")) in (400, 503)
            assert (await _auth(laptop, st.base))[0] == 202  # nothing was ended by them
            uri = f"{st.base}/oauth2/backchannel_logout"
            assert await st.provider.send_backchannel_logout(uri, "alice") == 200  # the provider's own format
            assert (await _auth(laptop, st.base))[0] == 401
            await sign_in(laptop, st.base)  # signed in again; replays must not end the new session
            token = st.provider.logout_token("alice")
            assert ("exp" in jwt.decode(token, options={"verify_signature": False})) == with_exp
            assert await _post_logout(idp, second, token) == 200
            await sign_in(laptop, st.base)
            for base in (st.base, second, st.base):
                assert await _post_logout(idp, base, token) == 400
            assert (await _auth(laptop, st.base))[0] == 202
            same_jti = _logout_claims(st)["jti"]
            assert await _post_logout(idp, second, _logout_token(st, jti=same_jti, **no_exp)) == 200
            assert await _post_logout(idp, st.base, _logout_token(st, jti=same_jti, iat=now + 1, **no_exp)) == 400
    finally:
        for s in stores:
            await s.close()


def test_a_logout_jti_is_remembered_as_long_as_its_token_could_be_accepted() -> None:
    """Accepted until iat + 300 s + 60 s of leeway (sooner when exp says so); remembered 60 s beyond that."""
    now = 1_000_000.0
    assert logout_token_replay_ttl({"iat": now}, now) == 420  # the pre-2023 format: only iat bounds it
    assert logout_token_replay_ttl({"iat": now, "exp": now + 3600}, now) == 420  # iat bounds it first
    assert logout_token_replay_ttl({"iat": now, "exp": now + 10}, now) == 130
    assert logout_token_replay_ttl({"iat": now - 1000}, now) == 1.0  # long past: no one accepts it any more
