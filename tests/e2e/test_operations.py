"""Operating a real sidecar process: graceful SIGTERM, metrics across workers, a bounded soak."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.stack import SidecarProcess, Stack, app_token, free_port, sidecar_settings, stack

SOAK_SECONDS = float(os.environ.get("SIDECAR_SOAK_SECONDS", "20"))


@pytest.fixture
async def st() -> AsyncIterator[Stack]:
    async with stack(sidecar=False, provider_kw={"access_token_ttl": 2}) as s:
        yield s


def _process(st: Stack, **overrides: str) -> SidecarProcess:
    port = free_port()
    return SidecarProcess(sidecar_settings(st.issuer, port, st.upstream_url + "/", refresh_skew="0s", **overrides))


async def _signed_in_cookie(base: str) -> str:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        async with client.get(base + "/oauth2/start") as resp:
            assert resp.status == 200
        return next(c.value for c in client.cookie_jar if c.key == "_sidecar")


async def test_sigterm_lets_in_flight_requests_finish(st: Stack) -> None:
    proc = await _process(st, skip_auth_route="^/_demo/", shutdown_timeout="10s").ready()
    try:
        async with aiohttp.ClientSession() as client:

            async def slow() -> tuple[int, bytes]:
                async with client.get(proc.base + "/_demo/stream?n=6&delay=0.25") as resp:
                    return resp.status, await resp.read()

            tasks = [asyncio.ensure_future(slow()) for _ in range(30)]
            await asyncio.sleep(0.4)  # all of them are mid-body now
            proc.proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks)
        assert all(status == 200 and body.count(b"chunk") == 6 for status, body in results)
        assert proc.proc.wait(timeout=15) == 0
        with pytest.raises(aiohttp.ClientError):  # and it no longer accepts connections
            async with aiohttp.ClientSession() as client, client.get(proc.base + "/ping"):
                pass
    finally:
        proc.stop()


async def test_metrics_are_correct_across_workers(st: Stack, redis_url: str) -> None:
    proc = await _process(
        st, session_store_type="redis", redis_connection_url=redis_url, workers="2", pass_access_token="true"
    ).ready()
    try:
        cookie = await _signed_in_cookie(proc.base)
        async with aiohttp.ClientSession(cookies={"_sidecar": cookie}) as client:
            for _ in range(40):  # new connections spread over both workers
                async with (
                    aiohttp.ClientSession(cookies={"_sidecar": cookie}) as fresh,
                    fresh.get(proc.base + "/oauth2/auth") as resp,
                ):
                    assert resp.status == 202
            token = await app_token(client, proc.base) or "missing"
            await asyncio.sleep(2.1)  # the access token expires: the next request refreshes
            async with client.get(proc.base + "/oauth2/auth") as resp:
                assert resp.status == 202
            await asyncio.sleep(1.5)  # workers push their tallies every second
            async with client.get(proc.base + "/metrics") as resp:
                text = await resp.text()
        match = re.search(r'sidecar_requests_total\{route="/oauth2/auth",status="202"\} (\d+)', text)
        assert match and float(match.group(1)) == 41
        assert re.search(r'sidecar_auth_decisions_total\{decision="202"\} 41', text)
        assert re.search(r'sidecar_refreshes_total\{outcome="ok"\} 1', text)
        assert "sidecar_refresh_seconds_bucket" in text and "sidecar_sessions_created_total 1" in text
        assert token not in text and cookie not in text
        pids = {line for line in proc.output().splitlines() if '"listening"' in line}
        assert len(pids) == 2  # two workers really served
    finally:
        proc.stop()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS")).split()[1])


async def test_soak_mixed_traffic_with_refreshes_keeps_memory_flat(st: Stack, redis_url: str) -> None:
    proc = await _process(
        st,
        session_store_type="redis",
        redis_connection_url=redis_url,
        workers="1",
        request_logging="true",
        pass_access_token="true",
    ).ready()
    try:
        cookies = [await _signed_in_cookie(proc.base) for _ in range(20)]
        errors: list[str] = []
        done = 0

        async def worker(cookie: str, stop_at: float) -> None:
            nonlocal done
            async with aiohttp.ClientSession(cookies={"_sidecar": cookie}) as client:
                while time.monotonic() < stop_at:
                    for path, ok in (("/oauth2/auth", 202), ("/_demo/echo", 200), ("/oauth2/userinfo", 200)):
                        async with client.get(proc.base + path) as resp:
                            await resp.read()
                            if resp.status != ok:
                                errors.append(f"{path} {resp.status}")
                            done += 1
                async with client.get(proc.base + "/nope", cookies={"_sidecar": "forged"}) as resp:
                    if resp.status != 401:
                        errors.append(f"forged {resp.status}")

        warm = time.monotonic() + min(5.0, SOAK_SECONDS / 4)
        await asyncio.gather(*(worker(c, warm) for c in cookies))
        rss_start = _rss_kib(proc.proc.pid)
        await asyncio.gather(*(worker(c, time.monotonic() + SOAK_SECONDS) for c in cookies))
        rss_end = _rss_kib(proc.proc.pid)
        refreshes = st.provider.stats()["token_calls"]["refresh_token"]
        async with aiohttp.ClientSession(cookies={"_sidecar": cookies[0]}) as client:
            token = await app_token(client, proc.base) or "missing"
        proc.proc.terminate()  # a graceful stop writes out the last batch of access lines
        assert proc.proc.wait(timeout=20) == 0
        log = proc.output()
    finally:
        proc.stop()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert sum(1 for line in lines if line.get("msg") == "request") >= done  # one JSON line per request
    for secret in (*cookies, token, token.split(".")[2], "sidecar-dev-secret", "test-cookie-secret"):
        assert secret not in log
    assert errors == []
    assert refreshes >= len(cookies) * int(SOAK_SECONDS / 2.5)  # tokens live 2 s: refreshed all along
    assert rss_end - rss_start < 8 * 1024, (rss_start, rss_end, done)


async def _exit_code(proc: SidecarProcess, timeout: float) -> int | None:
    """The process's exit code once it has exited (polled, so the event loop keeps serving clients)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.proc.poll()
        if code is not None:
            return code
        await asyncio.sleep(0.02)
    return None


@pytest.mark.parametrize(("first_workers", "second_workers"), [(1, 1), (2, 2), (2, 1), (1, 2)])
async def test_a_second_instance_on_an_occupied_port_fails_to_start(
    st: Stack, redis_url: str, first_workers: int, second_workers: int
) -> None:
    port = free_port()

    def on_port(workers: int) -> SidecarProcess:
        settings = sidecar_settings(
            st.issuer, port, st.upstream_url + "/", session_store_type="redis", redis_connection_url=redis_url
        )
        return SidecarProcess({**settings, "workers": str(workers)})

    first = await on_port(first_workers).ready()
    second = on_port(second_workers)
    try:
        code = await _exit_code(second, timeout=15)
        assert code == 2, second.output()[-2000:]
        assert "address in use" in second.output() and "--http-address" in second.output()
        for _ in range(10):  # the first one still serves every connection
            async with aiohttp.ClientSession() as client, client.get(first.base + "/ping") as resp:
                assert resp.status == 200
        assert first.proc.poll() is None
    finally:
        second.stop()
        first.stop()


async def test_shutdown_timeout_bounds_the_time_from_sigterm_to_exit(st: Stack) -> None:
    proc = await _process(st, skip_auth_route="^/_demo/", shutdown_timeout="2s").ready()
    try:
        async with aiohttp.ClientSession() as client:

            async def fetch(query: str) -> bytes:
                async with client.get(f"{proc.base}/_demo/stream?{query}") as resp:
                    return await resp.read()

            endless = [asyncio.ensure_future(fetch("n=200&delay=0.2")) for _ in range(5)]  # 40 s each
            short = asyncio.ensure_future(fetch("n=4&delay=0.3"))  # done 0.9 s after it started
            await asyncio.sleep(0.3)
            proc.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            code = await _exit_code(proc, timeout=10)
            took = time.monotonic() - sent
            assert code == 0 and "Traceback" not in proc.output(), proc.output()[-2000:]
            assert took < 2.6, took  # --shutdown-timeout 2s, plus closing and interpreter exit
            assert (await short).count(b"chunk") == 4  # a request that fits in the grace period finishes
            for task in endless:  # the others were cut, not served for 40 s
                with pytest.raises(aiohttp.ClientError):
                    await task
    finally:
        proc.stop()
