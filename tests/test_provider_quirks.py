"""Refresh against each real-provider quirk of the dev provider (``tests/provider_quirks.py``): a refused
refresh backs off across replicas and then ends the session; a failing provider never ends one.

The cases of one test run side by side (``asyncio.gather``): each waits out token lifetimes and the
refusal back-off, and in turn they would cost a minute."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from sidecar.context import SERVICES
from sidecar.oidc import NOT_REVOKED_FAILED, NOT_REVOKED_NO_ENDPOINT, REVOKED
from sidecar.refresh import REFUSAL_BACKOFF
from sidecar.store import RedisStore
from tests.provider_quirks import QUIRKS, each_quirk
from tests.redis_procs import start_server
from tests.stack import Stack, browser, free_port, session_cookie, sign_in, stack

OPTS = {"refresh_skew": "0s", "pass_access_token": "true", "upstream": "", "reverse_proxy": "true"}


async def _auth(http: aiohttp.ClientSession, base: str, cookie: str) -> tuple[int, str | None]:
    async with http.get(f"{base}/oauth2/auth", cookies={"_sidecar": cookie}) as resp:
        return resp.status, resp.headers.get("X-Auth-Request-Access-Token")


async def _records(redis: aioredis.Redis, prefix: str) -> int:
    return len([k async for k in redis.scan_iter(match=f"{prefix}s:*")])


Case = Callable[[Stack, str, aioredis.Redis, str, str], Awaitable[None]]


async def _each_quirk(redis_url: str, case: Case, access_token_ttl: int = 1, **opts: str) -> None:
    """Run ``case`` once per quirk, concurrently: two replicas on one Redis (own prefix per quirk), a signed-in
    session, and the quirk applied to the provider before the sign-in. ``opts``: sidecar settings."""
    opts = {**OPTS, **opts}

    async def one(index: int, name: str, quirk: dict[str, Any]) -> None:
        prefix = f"q{index}:"
        raw = aioredis.from_url(redis_url)
        stores = [RedisStore(aioredis.from_url(redis_url), prefix=prefix) for _ in range(2)]
        try:
            async with (
                stack(stores[0], provider_kw={"access_token_ttl": access_token_ttl}, **opts) as st,
                browser() as client,
            ):
                st.provider.config(quirk)
                second = await st.add_sidecar(stores[1], **opts)
                await sign_in(client, st.base)
                await case(st, second, raw, prefix, session_cookie(client) or "")
        except AssertionError as exc:
            raise AssertionError(f"provider quirk {name!r}: {exc}") from exc
        finally:
            for store in stores:
                await store.close()
            await raw.aclose()

    await asyncio.gather(*(one(i, name, quirk) for i, (name, quirk) in enumerate(QUIRKS.items())))


async def test_a_forgotten_refresh_token_costs_at_most_two_grant_calls_then_the_session_ends(redis_url: str) -> None:
    """Whatever the provider answers for it (invalid_grant, or invalid_request as some do), 4 requests and a
    burst of 20 on two replicas cost one grant call; after the back-off, one more, and the session is over."""

    async def case(st: Stack, second: str, raw: aioredis.Redis, prefix: str, cookie: str) -> None:
        # a refresh made before the provider forgot (the sign-in on a loaded machine can outlast the token's
        # one second) is not one of the calls counted here
        earlier = st.provider.stats()["token_calls"]["refresh_token"]
        assert st.provider.forget_refresh_tokens("alice") == 1
        await asyncio.sleep(1.2)  # the access token has expired
        async with aiohttp.ClientSession() as http:
            for base in (st.base, second, st.base, second):
                assert (await _auth(http, base, cookie))[0] == 401
            burst = await asyncio.gather(*(_auth(http, base, cookie) for base in (st.base, second) * 10))
            assert {status for status, _ in burst} == {401}
            calls = st.provider.stats()["token_calls"]["refresh_token"] - earlier
            assert calls == 1, calls  # refused once; both replicas then back off
            records = await _records(raw, prefix)
            # invalid_grant ends it at once; invalid_request is judged dead only when repeated after the back-off
            assert records == (1 if st.provider.unknown_refresh_error == "invalid_request" else 0)
            await asyncio.sleep(REFUSAL_BACKOFF + 0.3)
            for base in (second, st.base, second, st.base):
                assert (await _auth(http, base, cookie))[0] == 401
            assert st.provider.stats()["token_calls"]["refresh_token"] - earlier in (1, 2)
            assert await _records(raw, prefix) == 0  # the session has ended
            async with http.get(
                f"{st.base}/page", cookies={"_sidecar": cookie}, headers={"Accept": "text/html"}, allow_redirects=False
            ) as resp:
                assert resp.status == 302 and resp.headers["Location"].startswith("/oauth2/start")
            assert st.provider.stats()["token_calls"]["refresh_token"] - earlier in (1, 2)

    await _each_quirk(redis_url, case)


async def test_a_refusal_while_the_token_is_valid_serves_it_without_asking_again(redis_url: str) -> None:
    async def case(st: Stack, second: str, raw: aioredis.Redis, prefix: str, cookie: str) -> None:
        async with aiohttp.ClientSession() as http:
            status, first = await _auth(http, st.base, cookie)
            assert status == 202 and first
            await asyncio.sleep(1.6)  # past half its life: due for refresh, still valid (a JWT exp is whole seconds)
            st.provider.inject_fault("raw", count=-1, status=400, body="", content_type="text/plain")
            for base in (st.base, second, st.base, second):
                assert await _auth(http, base, cookie) == (202, first)
            assert st.provider.stats()["token_calls"]["refresh_token"] == 1
            await asyncio.sleep(1.6)
            assert (await _auth(http, second, cookie))[0] == 401  # expired and backing off: sign in again
            assert st.provider.stats()["token_calls"]["refresh_token"] == 1
            assert await _records(raw, prefix) == 1  # one empty 400 is not judged dead
            st.provider.clear_faults()
            await asyncio.sleep(REFUSAL_BACKOFF + 0.3)
            status, token = await _auth(http, st.base, cookie)  # after the back-off it is asked again, and works
            assert status == 202 and token not in (None, first)
            st.provider.inject_fault("raw", count=1, status=400, body='{"error": "invalid_request"}')
            await asyncio.sleep(3.2)  # one more refusal after a success counts as the first: not judged dead
            assert (await _auth(http, second, cookie))[0] == 401
            assert await _records(raw, prefix) == 1

    await _each_quirk(redis_url, case, access_token_ttl=3, refresh_skew="30s")


async def test_a_failing_provider_never_ends_a_session(redis_url: str) -> None:
    async def case(st: Stack, second: str, raw: aioredis.Redis, prefix: str, cookie: str) -> None:
        await asyncio.sleep(1.2)
        async with aiohttp.ClientSession() as http:
            # 5xx, 429, and no answer within --provider-timeout (2 s; the provider answers 500 after 3 s, so it
            # did not process the grant: a rotating provider would otherwise rightly see its token reused).
            for kind, status, delay, expected in (
                ("500", 400, 0.0, 503),
                ("raw", 429, 0.0, 503),
                ("raw", 502, 0.0, 503),
                ("500", 400, 3.0, 504),
                ("503", 400, 0.0, 503),  # last: it says Retry-After: 1, and the sidecar then waits that long
            ):
                st.provider.inject_fault(kind, count=-1, delay=delay, status=status, body="")
                for base in (st.base, second):
                    assert (await _auth(http, base, cookie))[0] == expected, (kind, status)
                st.provider.clear_faults()
            assert await _records(raw, prefix) == 1
            await asyncio.sleep(1.1)  # the 503's Retry-After: no token request before then
            status, token = await _auth(http, second, cookie)
            assert status == 202 and token

    await _each_quirk(redis_url, case)


@each_quirk()
async def test_sign_out_revokes_where_the_provider_can_and_says_so_where_it_cannot(
    quirk: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    async with stack(provider_kw={"access_token_ttl": 60}) as st, browser() as client:
        st.provider.config(quirk)
        await sign_in(client, st.base)
        assert st.provider.live_refresh_tokens() == {"alice": 1}
        svc = st.runners[0].app[SERVICES]
        ref = svc.codec.load_session(session_cookie(client) or "", time.time())
        refresh_token = (await svc.sessions.load_fresh(ref)).tokens.refresh_token
        assert refresh_token
        with caplog.at_level(logging.INFO, logger="sidecar.events"):
            async with client.get(f"{st.base}/oauth2/sign_out", allow_redirects=False) as resp:
                assert resp.status == 302
        lines = [r for r in caplog.records if r.getMessage() == "sign_out"]
        assert len(lines) == 1
        said = lines[0].fields["refresh_token"]  # type: ignore[attr-defined]
        stats = st.provider.stats()
        if quirk.get("revocation_endpoint", True):
            assert said == REVOKED and stats["revoke_calls"] == 1 and st.provider.live_refresh_tokens() == {}
        else:  # nothing is POSTed to an endpoint discovery did not name; the log says the token lives on
            assert said == NOT_REVOKED_NO_ENDPOINT and stats["revoke_calls"] == 0
            assert st.provider.live_refresh_tokens() == {"alice": 1}
        logged = " ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
        assert refresh_token not in logged


async def test_a_failing_revocation_endpoint_is_logged_and_never_fails_the_sign_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with stack() as st, browser() as client:
        await sign_in(client, st.base)
        st.provider.break_endpoint("revoke", "500")
        with caplog.at_level(logging.INFO, logger="sidecar.events"):
            async with client.get(f"{st.base}/oauth2/sign_out", allow_redirects=False) as resp:
                assert resp.status == 302 and session_cookie(client) is None
        said = [getattr(r, "fields", {}).get("refresh_token") for r in caplog.records if r.getMessage() == "sign_out"]
        assert said == [NOT_REVOKED_FAILED]


@each_quirk()
async def test_back_channel_logout_from_the_provider_ends_the_session(quirk: dict[str, Any]) -> None:
    async with stack() as st, browser() as client, aiohttp.ClientSession() as idp:
        st.provider.config(quirk)
        await sign_in(client, st.base)
        token = st.provider.logout_token("alice")
        async with idp.post(f"{st.base}/oauth2/backchannel_logout", data={"logout_token": token}) as resp:
            assert resp.status == 200
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 401
        await sign_in(client, st.base)
        async with idp.post(f"{st.base}/oauth2/backchannel_logout", data={"logout_token": token}) as resp:
            assert resp.status == 400  # a replay
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 202


async def test_a_hung_redis_or_a_refused_connection_never_ends_a_session(tmp_path: Path) -> None:
    """Redis not answering, then the provider not listening at all: 503 each time, and the session refreshes
    once both are back."""
    port = free_port()
    redis_proc = start_server("redis-hang", tmp_path, port)
    store = RedisStore(aioredis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5))
    try:
        async with stack(store, provider_kw={"access_token_ttl": 1}, **OPTS) as st, browser() as client:
            await sign_in(client, st.base)
            cookie = session_cookie(client) or ""
            await asyncio.sleep(1.2)  # expired, and no replica trusts its cached copy any more
            async with aiohttp.ClientSession() as http:
                os.kill(redis_proc.popen.pid, signal.SIGSTOP)  # Redis hangs
                try:
                    assert (await _auth(http, st.base, cookie))[0] == 503
                finally:
                    os.kill(redis_proc.popen.pid, signal.SIGCONT)
                assert st.provider_runner is not None
                await st.provider_runner.cleanup()  # nothing listens on the provider's port: connection refused
                assert (await _auth(http, st.base, cookie))[0] == 503
                st.provider_runner = web.AppRunner(st.provider.app(), access_log=None, shutdown_timeout=0.5)
                await st.provider_runner.setup()
                await web.TCPSite(st.provider_runner, "127.0.0.1", int(st.issuer.rsplit(":", 1)[1])).start()
                status, token = await _auth(http, st.base, cookie)
                assert status == 202 and token
                assert st.provider.stats()["token_calls"]["refresh_token"] == 1
    finally:
        await store.close()
        redis_proc.stop()
