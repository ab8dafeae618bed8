"""Memory follows live sessions, not requests: what the process keeps per session (identity headers, the
log line's user part, cached decisions) is bounded by the sessions in use, however many requests,
cache refills and refreshes go by. A real sidecar app, the dev provider and Redis, in this process."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.models import Session
from sidecar.store import RedisStore
from tests.stack import Stack, stack

USERS = 8


@pytest.fixture
async def st(redis_url: str) -> AsyncIterator[Stack]:
    store = RedisStore(aioredis.from_url(redis_url))
    overrides = {"refresh_skew": "0s", "pass_access_token": "true", "session_cache_ttl": "50ms"}
    async with stack(store, provider_kw={"access_token_ttl": 1}, request_logging="true", **overrides) as s:
        yield s
    await store.close()


def _live_sessions() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, Session))


async def _cookie(base: str) -> str:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        async with client.get(base + "/oauth2/start") as resp:
            await resp.read()
        return next(c.value for c in client.cookie_jar if c.key == "_sidecar")


async def _traffic(base: str, cookies: list[str], seconds: float) -> int:
    done = 0

    async def user(cookie: str) -> None:
        nonlocal done
        stop = time.monotonic() + seconds
        async with aiohttp.ClientSession(cookies={"_sidecar": cookie}) as client:
            while time.monotonic() < stop:
                for path, ok in (("/oauth2/auth", 202), ("/_demo/echo", 200), ("/oauth2/userinfo", 200)):
                    async with client.get(base + path) as resp:
                        await resp.read()
                        assert resp.status == ok, (path, resp.status)
                        done += 1

    await asyncio.gather(*(user(c) for c in cookies))
    return done


async def test_per_session_state_does_not_grow_with_requests_refills_and_refreshes(st: Stack) -> None:
    cookies = [await _cookie(st.base) for _ in range(USERS)]
    refreshes = st.provider.stats()["token_calls"]["refresh_token"]
    await _traffic(st.base, cookies, 1.5)
    after_warm_up = _live_sessions()
    done = await _traffic(st.base, cookies, 3.0)
    after = _live_sessions()
    refreshes = st.provider.stats()["token_calls"]["refresh_token"] - refreshes
    # the session cache refilled every 50 ms and every token was refreshed twice or more per user
    assert refreshes >= 2 * USERS and done > 20 * USERS, (refreshes, done)
    # one cached Session per user, plus a few in flight; with memos keyed by id(session) this was one
    # per refill and refresh (hundreds here, ten thousand per table in production)
    assert after <= 3 * USERS, (after_warm_up, after, done)
    assert after <= after_warm_up + USERS, (after_warm_up, after)
