"""Memory follows live sessions, not requests: what the process keeps per session (identity headers, the
log line's user part, cached decisions) is bounded by the sessions in use, however many requests,
cache refills and refreshes go by. A real sidecar app, the dev provider and Redis, in this process."""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from sidecar.errors import StoreUnavailable
from sidecar.models import Session
from sidecar.store import RedisStore
from tests.redis_procs import Proc, query, start_server
from tests.stack import Stack, free_port, stack

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


async def _restart(proc: Proc, directory: Path) -> Proc:
    """Shut Redis down saving its data (as an operator's restart does), start it again on the same port."""
    query(proc.port, lambda client: client.shutdown(save=True))
    proc.stop()
    await asyncio.sleep(0.5)  # traffic meets the outage meanwhile
    return await asyncio.to_thread(start_server, "redis-restarted", directory, proc.port)


def _live(kind: type) -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


async def test_redis_restarts_leave_no_connections_errors_or_sessions_behind(tmp_path: Path) -> None:
    """What a Redis outage creates per request (failed connections, StoreUnavailable with its traceback and
    frames, sessions reloaded after it) is gone once it is over: the counts after three restarts under
    traffic are those after the first, and the client's pool stays at the requests' concurrency."""
    proc = start_server("redis", tmp_path, free_port())
    store = RedisStore(
        aioredis.from_url(f"redis://127.0.0.1:{proc.port}/0", socket_timeout=1, socket_connect_timeout=1)
    )
    try:
        async with stack(store, provider_kw={"access_token_ttl": 2}, request_logging="true", refresh_skew="1s") as st:
            cookies = [await _cookie(st.base) for _ in range(USERS)]
            seen: Counter[int] = Counter()
            counts = []
            for _ in range(3):
                traffic = asyncio.ensure_future(_tolerant_traffic(st.base, cookies, 2.0, seen))
                await asyncio.sleep(0.5)
                proc = await _restart(proc, tmp_path)
                await traffic
                await _tolerant_traffic(st.base, cookies, 0.5, seen)  # Redis back: everything answers again
                gc.collect()
                counts.append((_live(Connection), _live(StoreUnavailable), _live(RedisConnectionError), _live(Session)))
            assert seen[401] == 0 and seen[503] > 0 and seen[200] + seen[202] > 100 * USERS, seen
            assert counts[-1][1:3] == (0, 0), counts  # no error (nor its traceback and frames) kept alive
            assert counts[-1][3] <= 3 * USERS, counts
            assert counts[-1][0] <= max(counts[0][0], 3 * USERS), counts  # the pool follows concurrency
    finally:
        await store.close()
        proc.stop()


async def _tolerant_traffic(base: str, cookies: list[str], seconds: float, seen: Counter[int]) -> None:
    """Each user's requests in a loop; 503 while Redis is down is expected, anything else is counted too."""

    async def user(cookie: str) -> None:
        stop = time.monotonic() + seconds
        async with aiohttp.ClientSession(cookies={"_sidecar": cookie}) as client:
            while time.monotonic() < stop:
                for path in ("/oauth2/auth", "/_demo/echo", "/oauth2/userinfo"):
                    async with client.get(base + path, allow_redirects=False) as resp:
                        await resp.read()
                        seen[resp.status] += 1

    await asyncio.gather(*(user(c) for c in cookies))
