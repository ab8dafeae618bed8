"""Transparent refresh against the dev provider: single-flight, rotation, failures, TTLs."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio as aioredis

from sidecar.store import RedisStore, SessionStore
from tests.stack import app_token, browser, session_cookie, sign_in, stack

FAST = {"access_token_ttl": 1}
OPTS = {"refresh_skew": "0s", "pass_access_token": "true"}


async def _auth(client: aiohttp.ClientSession, base: str) -> tuple[int, str | None]:
    """/oauth2/auth's answer, and the access token the app then receives."""
    async with client.get(f"{base}/oauth2/auth") as resp:
        status = resp.status
    return status, (await app_token(client, base)) if status == 202 else None


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
        async with client.get(f"{st.base}/_demo/echo") as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"]
        st.provider.clear_faults()
        st.provider.inject_fault("timeout", count=1, delay=3.0)
        status, _ = await _auth(client, st.base)
        assert status == 503
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
