"""Transparent refresh against the dev provider: single-flight, rotation, failures, TTLs."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import jwt
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.context import SERVICES
from sidecar.models import TokenSet
from sidecar.oidc import BACKCHANNEL_EVENT
from sidecar.store import RedisStore, SessionStore
from tests.stack import Stack, browser, session_cookie, sign_in, stack

FAST = {"access_token_ttl": 1}
# No upstream: the auth_request role, where /oauth2/auth itself carries the token (a sidecar that
# proxies the app never puts tokens there), so each check is exactly one request.
OPTS = {"refresh_skew": "0s", "pass_access_token": "true", "upstream": "", "reverse_proxy": "true"}


async def _auth(client: aiohttp.ClientSession, base: str) -> tuple[int, str | None]:
    async with client.get(f"{base}/oauth2/auth") as resp:
        return resp.status, resp.headers.get("X-Auth-Request-Access-Token")


async def test_hundred_concurrent_requests_on_an_expired_session_cause_one_refresh(store: SessionStore) -> None:
    async with stack(store, provider_kw=FAST, **OPTS) as st, browser() as client:
        await sign_in(client, st.base)
        status, first_token = await _auth(client, st.base)
        assert status == 202
        await asyncio.sleep(1.1)
        results = await asyncio.gather(*(_auth(client, st.base) for _ in range(100)))
        assert [s for s, _ in results] == [202] * 100
        tokens = {t for _, t in results}
        assert len(tokens) == 1 and first_token not in tokens
        assert st.provider.stats()["token_calls"]["refresh_token"] == 1


async def test_two_replicas_sharing_redis_refresh_once(redis_url: str) -> None:
    stores = [RedisStore(aioredis.from_url(redis_url)) for _ in range(2)]
    try:
        async with stack(stores[0], provider_kw=FAST, **OPTS) as st, browser() as client:
            second = await st.add_sidecar(stores[1], **OPTS)
            await sign_in(client, st.base)
            await asyncio.sleep(1.1)
            cookie = {"_sidecar": session_cookie(client) or ""}
            async with aiohttp.ClientSession(cookies=cookie) as plain:
                results = await asyncio.gather(*(_auth(plain, base) for _ in range(50) for base in (st.base, second)))
            assert [s for s, _ in results] == [202] * 100
            assert len({t for _, t in results}) == 1
            assert st.provider.stats()["token_calls"]["refresh_token"] == 1
    finally:
        for s in stores:
            await s.close()


async def test_rotating_provider_with_reuse_detection_never_sees_a_token_twice(store: SessionStore) -> None:
    provider_kw = {**FAST, "rotate_refresh_tokens": True, "reuse_detection": True}
    async with stack(store, provider_kw=provider_kw, **OPTS) as st, browser() as client:
        await sign_in(client, st.base)
        for _ in range(4):  # several expiries, each hit by a burst of concurrent requests
            await asyncio.sleep(1.05)
            results = await asyncio.gather(*(_auth(client, st.base) for _ in range(30)))
            assert [s for s, _ in results] == [202] * 30
        stats = st.provider.stats()
        assert stats["reuse_detected"] == 0
        presented = stats["refresh_tokens_presented"]
        assert len(presented) == len(set(presented)) == stats["token_calls"]["refresh_token"] >= 4


async def test_provider_failure_keeps_the_session_and_recovery_refreshes(store: SessionStore) -> None:
    async with stack(store, provider_kw=FAST, **OPTS) as st, browser() as client:
        await sign_in(client, st.base)
        await asyncio.sleep(1.1)
        st.provider.inject_fault("500", count=-1)
        status, _ = await _auth(client, st.base)
        assert status == 503
        async with client.get(f"{st.base}/oauth2/userinfo") as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"]
        st.provider.clear_faults()
        st.provider.inject_fault("timeout", count=1, delay=3.0)
        status, _ = await _auth(client, st.base)
        assert status == 504  # the provider did not answer in --provider-timeout; the session is kept
        st.provider.clear_faults()
        status, token = await _auth(client, st.base)
        assert status == 202 and token


async def test_invalid_grant_ends_the_session(store: SessionStore) -> None:
    async with stack(store, provider_kw=FAST, **OPTS) as st, browser() as client:
        await sign_in(client, st.base)
        await asyncio.sleep(1.1)
        st.provider.inject_fault("invalid_grant", count=1)
        status, _ = await _auth(client, st.base)
        assert status == 401
        async with client.get(f"{st.base}/page", headers={"Accept": "text/html"}, allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"].startswith("/oauth2/start")
        assert st.provider.stats()["token_calls"]["refresh_token"] == 1  # the dead session is not retried


async def test_unknown_lifetime_is_not_invented(store: SessionStore) -> None:
    provider_kw = {"send_expires_in": False, "access_token_ttl": 3600}
    async with stack(store, provider_kw=provider_kw, **OPTS) as st, browser() as client:
        await sign_in(client, st.base)
        async with client.get(f"{st.base}/oauth2/userinfo") as resp:
            info = await resp.json()
        # No expires_in: the JWT access token's own exp is used, nothing shorter is made up.
        assert info["access_token_expires_at"] is not None
        assert st.provider.stats()["token_calls"]["refresh_token"] == 0


async def test_removed_from_group_loses_access_at_next_refresh(store: SessionStore) -> None:
    async with stack(store, provider_kw=FAST, allowed_group="admins", **OPTS) as st, browser() as client:
        await sign_in(client, st.base)
        assert (await _auth(client, st.base))[0] == 202
        st.provider.set_groups("alice", ["staff"])
        await asyncio.sleep(1.1)
        assert (await _auth(client, st.base))[0] == 403


async def test_redis_ttl_is_the_refresh_lifetime_after_sign_in_and_refresh(
    redis_url: str, raw_redis: aioredis.Redis
) -> None:
    store = RedisStore(aioredis.from_url(redis_url))
    provider_kw = {**FAST, "refresh_token_ttl": 5000}
    try:
        async with stack(store, provider_kw=provider_kw, **OPTS) as st, browser() as client:
            await sign_in(client, st.base)
            keys = [k async for k in raw_redis.scan_iter(match="sc:s:*")]
            assert len(keys) == 1
            assert 4990 <= await raw_redis.ttl(keys[0]) <= 5000  # refresh_expires_in, not the 1 s access token
            await asyncio.sleep(2)
            assert (await _auth(client, st.base))[0] == 202
            assert st.provider.stats()["token_calls"]["refresh_token"] == 1
            assert 4990 <= await raw_redis.ttl(keys[0]) <= 5000  # reset to the provider's refresh lifetime
    finally:
        await store.close()


async def test_redis_dump_reveals_no_token(redis_url: str, raw_redis: aioredis.Redis) -> None:
    store = RedisStore(aioredis.from_url(redis_url))
    try:
        async with stack(store, **OPTS) as st, browser() as client:
            await sign_in(client, st.base)
            status, token = await _auth(client, st.base)
            assert status == 202 and token
            dump = b""
            async for key in raw_redis.scan_iter():
                kind = await raw_redis.type(key)
                if kind == b"hash":
                    dump += b"".join(await raw_redis.hvals(key))
                elif kind == b"string":
                    dump += await raw_redis.get(key) or b""
                elif kind == b"set":
                    dump += b"".join(await raw_redis.smembers(key))
            assert token.encode() not in dump and token.split(".")[1].encode() not in dump
            assert b"alice" not in dump
    finally:
        await store.close()


def test_outcome_keys_name_one_refresh_of_one_record_version() -> None:
    from sidecar.refresh import outcome_key

    assert outcome_key("rt", 3) == outcome_key("rt", 3)
    assert outcome_key("rt", 3) != outcome_key("rt", 4)  # a non-rotating token refreshed again later
    assert outcome_key("rt", 3) != outcome_key("rt2", 3)
    assert "rt" not in outcome_key("rt", 3)


def _services(st: Stack, index: int = 0) -> Any:
    return st.runners[index].app[SERVICES]


async def test_a_key_rotation_during_a_session_never_ends_it(store: SessionStore) -> None:
    async with stack(store, provider_kw=FAST, **OPTS) as st, browser() as client, aiohttp.ClientSession() as idp:
        _services(st).oidc.jwks_min_refetch = 2.5
        await sign_in(client, st.base)  # the JWKS is fetched here
        await asyncio.sleep(1.1)
        # Anyone may make the sidecar look at the JWKS (an unknown kid) right before the provider rotates.
        now = int(time.time())
        claims = {"iss": st.issuer, "aud": "sidecar-dev", "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex,
                  "sub": "nobody", "events": {BACKCHANNEL_EVENT: {}}}  # fmt: skip
        foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        form = {"logout_token": jwt.encode(claims, foreign, algorithm="RS256", headers={"kid": "not-published"})}
        async with idp.post(f"{st.base}/oauth2/backchannel_logout", data=form):
            pass
        st.provider.rotate_keys(keep_old=False)
        status, token = await _auth(client, st.base)  # refreshed ID token signed with a key not fetchable yet
        assert status == 202 and token
        assert st.provider.stats()["token_calls"]["refresh_token"] == 1
        await asyncio.sleep(2.6)  # a refetch is allowed again: the next refresh checks the identity
        status, later = await _auth(client, st.base)
        assert status == 202 and later != token
        assert st.provider.stats()["token_calls"]["refresh_token"] == 2 and st.provider.stats()["jwks_calls"] == 2


async def test_the_lock_is_held_until_the_outcome_is_safe(redis_url: str) -> None:
    """A slow JWKS fetch after the provider rotated the token, with a refresh lock that lives much shorter:
    the second replica must neither get in nor present the consumed token."""
    stores = [RedisStore(aioredis.from_url(redis_url)) for _ in range(2)]
    provider_kw = {"access_token_ttl": 3, "rotate_refresh_tokens": True, "reuse_detection": True}
    try:
        async with stack(stores[0], provider_kw=provider_kw, **OPTS) as st, browser() as client:
            signer = await st.add_sidecar(stores[1], **OPTS)
            await sign_in(client, signer)  # the second replica has the JWKS; the first has never fetched it
            for index in (0, 1):
                _services(st, index).refresher.lock_ttl = 0.3
            st.provider.break_endpoint("jwks", "slow", delay=1.5)  # --provider-timeout is 2 s
            await asyncio.sleep(3.1)

            async def late() -> tuple[int, str | None]:
                await asyncio.sleep(0.6)  # the first replica is validating the new ID token by now
                return await _auth(client, signer)

            results = await asyncio.gather(_auth(client, st.base), late())
            assert [s for s, _ in results] == [202, 202]
            assert results[0][1] == results[1][1]
            stats = st.provider.stats()
            assert stats["reuse_detected"] == 0 and stats["token_calls"]["refresh_token"] == 1
            assert len(set(stats["refresh_tokens_presented"])) == len(stats["refresh_tokens_presented"])
    finally:
        for s in stores:
            await s.close()


async def test_one_wait_budget_per_refresh(store: SessionStore) -> None:
    """Every wait of one refresh spends the same --refresh-wait-timeout: a request that joins late does
    not get a fresh one, and the refresh itself still completes and is kept."""
    async with stack(store, provider_kw=FAST, refresh_wait_timeout="2s", provider_timeout="5s", **OPTS) as st, \
            browser() as client:  # fmt: skip
        await sign_in(client, st.base)
        await asyncio.sleep(1.1)
        st.provider.inject_fault("slow", count=1, delay=3.0)
        started = time.monotonic()

        async def late() -> tuple[int, float]:
            await asyncio.sleep(1.5)
            status, _ = await _auth(client, st.base)
            return status, time.monotonic() - started

        first, (late_status, late_at) = await asyncio.gather(_auth(client, st.base), late())
        assert first[0] == 503 and late_status == 503
        assert late_at < 2.6  # answered when the refresh's budget ran out, not 2 s after it joined
        await asyncio.sleep(3.2 - (time.monotonic() - started))
        status, token = await _auth(client, st.base)
        assert status == 202 and token  # the refresh finished in the background and was saved
        assert st.provider.stats()["token_calls"]["refresh_token"] == 1


async def test_a_refresh_without_an_id_token_keeps_the_stored_one(store: SessionStore) -> None:
    provider_kw = {**FAST, "rotate_refresh_tokens": True, "send_id_token_on_refresh": False}
    async with stack(store, provider_kw=provider_kw, oidc_logout_id_token_hint="true", **OPTS) as st, \
            browser() as client:  # fmt: skip
        await sign_in(client, st.base)
        for _ in range(2):
            await asyncio.sleep(1.1)
            assert (await _auth(client, st.base))[0] == 202
        assert st.provider.stats()["token_calls"]["refresh_token"] == 2
        async with client.post(f"{st.base}/oauth2/sign_out", allow_redirects=False) as resp:
            assert resp.status == 302
            assert "id_token_hint=" in resp.headers["Location"]


def test_merged_over_keeps_each_missing_token_on_its_own() -> None:
    old = TokenSet(access_token="a0", refresh_token="r0", id_token="i0", refresh_expires_at=50.0)
    cases = [
        (TokenSet(access_token="a1"), ("r0", "i0", 50.0)),
        (TokenSet(access_token="a1", refresh_token="r1"), ("r1", "i0", None)),
        (TokenSet(access_token="a1", refresh_token="r1", refresh_expires_at=90.0), ("r1", "i0", 90.0)),
        (TokenSet(access_token="a1", id_token="i1"), ("r0", "i1", 50.0)),
        (TokenSet(access_token="a1", refresh_token="r1", id_token="i1"), ("r1", "i1", None)),
    ]
    for new, (refresh, id_token, refresh_expires) in cases:
        merged = new.merged_over(old)
        assert (merged.access_token, merged.refresh_token, merged.id_token) == ("a1", refresh, id_token)
        assert merged.refresh_expires_at == refresh_expires
