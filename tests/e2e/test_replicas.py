"""Several real sidecar processes sharing one redis-server: one refresh, lock expiry after a crash."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from playwright.async_api import Error as PlaywrightError

from tests.e2e.chromium import fetch, one_page, watch
from tests.stack import (
    SidecarProcess,
    Stack,
    app_token,
    browser,
    free_port,
    sidecar_settings,
    sign_in,
    stack,
)

OPTS = {
    "refresh_skew": "0s",
    "pass_access_token": "true",
    "session_store_type": "redis",
    "workers": "1",
    "provider_timeout": "2s",
    "provider_retries": "0",
}


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[Stack, list[SidecarProcess]]]:
    async with stack(sidecar=False, provider_kw={"access_token_ttl": 1}) as st:
        procs = []
        callback_port = free_port()  # every replica shares one public callback, as behind a load balancer
        try:
            for _ in range(2):
                settings = sidecar_settings(
                    st.issuer, free_port(), st.upstream_url + "/", **OPTS, redis_connection_url=redis_url
                )
                settings["redirect_url"] = f"http://127.0.0.1:{callback_port}/oauth2/callback"
                procs.append(SidecarProcess(settings))
            for proc in procs:
                await proc.ready()
            yield st, procs
        finally:
            for proc in procs:
                proc.stop()


async def _sign_in_at(client: aiohttp.ClientSession, proc: SidecarProcess, st: Stack) -> None:
    """Sign in through one replica: its callback URL names the shared port, so finish it by hand."""
    async with client.get(proc.base + "/oauth2/start", allow_redirects=False) as resp:
        authorize = resp.headers["Location"]
    async with client.get(authorize, allow_redirects=False) as resp:
        callback = resp.headers["Location"]
    path = callback.split("/oauth2/callback", 1)[1]
    async with client.get(proc.base + "/oauth2/callback" + path, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()


async def _auth(client: aiohttp.ClientSession, base: str) -> tuple[int, Any]:
    """/oauth2/auth's answer, and the access token the app then receives."""
    async with client.get(base + "/oauth2/auth") as resp:
        status = resp.status
    return status, (await app_token(client, base)) if status == 202 else None


async def test_two_processes_refresh_an_expired_session_once(replicas: tuple[Stack, list[SidecarProcess]]) -> None:
    st, procs = replicas
    async with browser() as client:
        await _sign_in_at(client, procs[0], st)
        await asyncio.sleep(1.1)
        results = await asyncio.gather(*(_auth(client, p.base) for _ in range(50) for p in procs))
    assert [s for s, _ in results] == [202] * 100
    assert len({t for _, t in results}) == 1
    assert st.provider.stats()["token_calls"]["refresh_token"] == 1


async def test_a_process_killed_holding_the_lock_blocks_only_until_the_lock_expires(
    replicas: tuple[Stack, list[SidecarProcess]],
) -> None:
    st, (doomed, survivor) = replicas
    async with browser() as client:
        await _sign_in_at(client, doomed, st)
        await asyncio.sleep(1.1)
        st.provider.inject_fault("slow", count=1, delay=6.0)  # the doomed replica's call hangs at the provider
        pending = asyncio.ensure_future(_auth(client, doomed.base))
        while st.provider.stats()["token_calls"]["refresh_token"] < 1:
            await asyncio.sleep(0.05)
        doomed.kill()  # dies holding the refresh lock
        killed_at = time.monotonic()
        with pytest.raises(aiohttp.ClientError):
            await pending
        status, token = await _auth(client, survivor.base)
        waited = time.monotonic() - killed_at
    assert status == 202 and token
    # Lock TTL here = 2 s provider timeout + backoff + 5 s margin: the survivor waited for it, then refreshed.
    assert waited > 3.0
    assert st.provider.stats()["token_calls"]["refresh_token"] == 2


async def test_signed_in_on_one_process_works_on_the_other(replicas: tuple[Stack, list[SidecarProcess]]) -> None:
    """In Chromium: the sign-in starts on one replica, and its callback (the shared public port, where nobody
    listens here) is finished on that replica, as a load balancer would route it; the browser then sends its
    cookie to the other replica (same host) on its own, and is signed in there."""
    _, procs = replicas
    async with one_page() as page:
        hops = watch(page, "")
        try:
            await page.goto(procs[0].base + "/oauth2/start?rd=%2F_demo%2Fecho", wait_until="load")
        except PlaywrightError as exc:
            assert "net::ERR_CONNECTION_REFUSED" in str(exc)  # the shared callback port
        await page.wait_for_url(lambda url: url.startswith("chrome-error:"))  # Chromium's error page, then on
        callback = next(u for u in hops if urlsplit(u).path == "/oauth2/callback")
        await page.goto(procs[0].base + "/oauth2/callback?" + urlsplit(callback).query, wait_until="load")
        assert page.url == procs[0].base + "/_demo/echo", page.url
        response = await page.goto(procs[1].base + "/_demo/echo", wait_until="load")
        assert response is not None and response.status == 200 and response.request.redirected_from is None
        assert (await response.json())["headers"]["X-Auth-Request-Email"] == "alice@example.com"
        status, _, _ = await fetch(page, procs[1].base + "/oauth2/auth")
        assert status == 202


async def _auth_answer(client: aiohttp.ClientSession, base: str) -> tuple[int, Any]:
    async with client.get(base + "/oauth2/auth") as resp:
        return resp.status, resp.headers.get("X-Auth-Request-Access-Token")


async def test_rotated_token_is_saved_even_when_redis_stalls_after_the_provider_answered(
    redis_url: str,
    raw_redis: Any,
) -> None:
    import redis.asyncio as aioredis

    from sidecar.store import RedisStore

    provider_kw = {"access_token_ttl": 1, "rotate_refresh_tokens": True, "reuse_detection": True}
    store = RedisStore(aioredis.from_url(redis_url, socket_timeout=0.5))
    try:
        async with (
            # No upstream: the auth_request role, where /oauth2/auth itself carries the token, so each
            # check is exactly one request (a second one could find the 1 s token expired again).
            stack(
                store,
                provider_kw=provider_kw,
                refresh_skew="0s",
                pass_access_token="true",
                upstream="",
                reverse_proxy="true",
            ) as st,
            browser() as client,
        ):
            await sign_in(client, st.base)
            await asyncio.sleep(1.1)
            st.provider.inject_fault("slow", count=1, delay=0.5)
            started = time.monotonic()
            pending = asyncio.ensure_future(_auth_answer(client, st.base))
            await asyncio.sleep(0.2)
            await raw_redis.execute_command("CLIENT", "PAUSE", "2000", "WRITE")  # saves stall after the answer
            status, token = await pending
            assert status == 202 and token  # the save was retried until Redis took it
            assert time.monotonic() - started > 1.5  # it really did wait out the stall
            await asyncio.sleep(1.1)
            status, newer = await _auth_answer(client, st.base)  # next refresh presents the rotated token
            assert status == 202 and newer != token
            stats = st.provider.stats()
            assert stats["reuse_detected"] == 0 and stats["token_calls"]["refresh_token"] == 2
    finally:
        await store.close()
