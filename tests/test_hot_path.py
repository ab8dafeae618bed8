"""The per-request hot path at the defaults: one store read per stale session, the preformatted access line,
local histogram tallies, the proxy's header filter as sets, whole and streamed bodies."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from sidecar import logs, metrics
from sidecar.config import build_config
from sidecar.cookies import SessionRef
from sidecar.errors import SessionGone, StoreUnavailable
from sidecar.headers import PROTECTED_PREFIX, dropped_from_client, refused_from_client
from sidecar.models import Identity, Session, TokenSet
from sidecar.proxy import WHOLE_BODY, _request_body
from sidecar.sessions import Sessions
from sidecar.store import MemoryStore, RedisStore
from tests.stack import browser, free_port, session_cookie, sidecar_settings, sign_in, stack

CACHE_TTL = 0.2

# --- one store read per stale session (single-flight refill) ----------------------------------------------


async def _get_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


@pytest.fixture
async def sessions(redis_url: str) -> AsyncIterator[tuple[Sessions, RedisStore]]:
    client = aioredis.from_url(redis_url)
    store = RedisStore(client)
    config = build_config(sidecar_settings("http://127.0.0.1:1", free_port(), session_cache_ttl=f"{CACHE_TTL}s"))
    yield Sessions(store, config), store
    await store.close()


async def _hot(sessions: Sessions) -> tuple[SessionRef, Session]:
    """A signed-in session, loaded once (cached), then left until its cached copy is stale."""
    ref, _ = await sessions.create(Identity(sub="s1", user="alice"), TokenSet(access_token="at"), {})
    session = await sessions.load(ref)
    await asyncio.sleep(CACHE_TTL + 0.05)
    return ref, session


@pytest.mark.parametrize("concurrency", [2, 10, 100, 500])
async def test_a_stale_hot_session_is_read_from_redis_once_whatever_the_concurrency(
    sessions: tuple[Sessions, RedisStore], raw_redis: aioredis.Redis, concurrency: int
) -> None:
    sess, _ = sessions
    ref, first = await _hot(sess)
    before = await _get_calls(raw_redis)
    loaded = await asyncio.gather(*(sess.load(ref) for _ in range(concurrency)))
    assert await _get_calls(raw_redis) - before == 1
    assert all(s is loaded[0] for s in loaded) and loaded[0].identity == first.identity
    # and within the cache period nothing more is read
    await asyncio.gather(*(sess.load(ref) for _ in range(concurrency)))
    assert await _get_calls(raw_redis) - before == 1


async def test_a_failing_read_reaches_every_waiter_and_is_not_remembered(
    sessions: tuple[Sessions, RedisStore], raw_redis: aioredis.Redis
) -> None:
    sess, _ = sessions
    ref, first = await _hot(sess)
    key = "sc:s:" + ref.store_key
    record = await raw_redis.get(key)
    assert record is not None
    await raw_redis.delete(key)
    await raw_redis.hset(key, "not", "a string")  # a real failing GET: WRONGTYPE from redis-server
    before = await _get_calls(raw_redis)
    outcomes = await asyncio.gather(*(sess.load(ref) for _ in range(50)), return_exceptions=True)
    assert await _get_calls(raw_redis) - before == 1
    assert all(isinstance(o, StoreUnavailable) for o in outcomes)
    # not poisoned: the next request reads again and gets the session back
    await raw_redis.delete(key)
    await raw_redis.set(key, record)
    again = await asyncio.gather(*(sess.load(ref) for _ in range(50)))
    assert await _get_calls(raw_redis) - before == 2
    assert all(s.identity == first.identity for s in again)


async def test_a_session_gone_from_the_store_is_gone_for_every_waiter(
    sessions: tuple[Sessions, RedisStore], raw_redis: aioredis.Redis
) -> None:
    sess, _ = sessions
    ref, _ = await _hot(sess)
    await raw_redis.delete("sc:s:" + ref.store_key)  # signed out on another replica
    before = await _get_calls(raw_redis)
    outcomes = await asyncio.gather(*(sess.load(ref) for _ in range(50)), return_exceptions=True)
    assert await _get_calls(raw_redis) - before == 1
    assert all(isinstance(o, SessionGone) for o in outcomes)


async def test_a_request_that_goes_away_does_not_cancel_the_read_the_others_wait_for(
    sessions: tuple[Sessions, RedisStore], raw_redis: aioredis.Redis
) -> None:
    sess, _ = sessions
    ref, first = await _hot(sess)
    before = await _get_calls(raw_redis)
    tasks = [asyncio.ensure_future(sess.load(ref)) for _ in range(20)]
    await asyncio.sleep(0)  # every one is waiting for the one read
    tasks[0].cancel()
    tasks[7].cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    kept = [o for i, o in enumerate(outcomes) if i not in (0, 7)]
    assert all(isinstance(o, Session) and o.identity == first.identity for o in kept)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert await _get_calls(raw_redis) - before == 1


# --- the access line ---------------------------------------------------------------------------------------

HOSTILE_TEXT = [
    "/oauth2/auth",
    '/a"b\\c',
    "/\x00\x01\x1f\x7f",
    "/\u2028\u2029",
    "/caf\u00e9/\U0001f600",
    "/\ud800lone",
    "/" + "x" * 500,
    '","status":200,"user":"admin',
    '/\n{"ts":1}',
    "",
]


def _old_line(fields: dict[str, Any], ts: float) -> str:
    """What the access line was before: a dict, merged and dumped."""
    entry = {"ts": ts, "level": "info", "logger": "sidecar.access", "msg": "request", **fields}
    return json.dumps(entry, separators=(",", ":"), default=str)


def _session(user: str) -> Session:
    return Session(identity=Identity(sub="s", user=user), tokens=TokenSet(access_token="secret-token"), created_at=1.0)


@pytest.mark.parametrize("text", HOSTILE_TEXT)
@pytest.mark.parametrize("authed", [True, False])
def test_the_preformatted_access_line_is_byte_for_byte_the_old_json(text: str, authed: bool) -> None:
    session = _session(text) if authed else None
    for method, route, status, latency in (("GET", "auth", 202, 0.07), (text or "X", "proxy", 502, 1234.5)):
        line = logs.access_line("req-" + text[:10], method, route, text, status, latency, session, "203.0.113.9")
        parsed = json.loads(line)
        fields = {
            "request_id": "req-" + text[:10],
            "method": method,
            "route": route,
            "path": text[:200],
            "status": status,
            "latency_ms": latency,
            "user": text if authed else None,
            "client_ip": "203.0.113.9",
        }
        assert line == _old_line(fields, parsed["ts"])
        assert "\n" not in line and "secret-token" not in line
        assert abs(parsed["ts"] - time.time()) < 5


def test_the_user_part_is_rendered_once_per_session_object() -> None:
    first, second = _session("alice"), _session("bob")
    a = logs.access_line("1", "GET", "auth", "/", 202, 0.1, first, "127.0.0.1")
    b = logs.access_line("2", "GET", "auth", "/", 202, 0.1, second, "127.0.0.1")
    assert json.loads(a)["user"] == "alice" and json.loads(b)["user"] == "bob"
    assert first.derived["log_user"] == ',"user":"alice","client_ip":'  # memoised on the object itself


async def test_a_real_app_writes_one_valid_line_per_request_with_the_old_fields(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sidecar.access")  # the batch is written only when INFO is on
    async with stack(MemoryStore(), request_logging="true") as st, browser() as client:
        await sign_in(client, st.base)
        cookie = session_cookie(client) or ""
        logs.flush()
        capsys.readouterr()  # AccessLog writes to sys.stderr as looked up at each flush
        paths = ["/oauth2/auth", '/_demo/echo?q="x"', "/_demo/%22%5C%09%E2%80%A8"]
        for path in paths:
            async with client.get(st.base + path, headers={"X-Request-Id": "abc-1"}) as resp:
                assert resp.headers.get("X-Request-Id", "abc-1") == "abc-1"  # proxied answers are the app's
        async with aiohttp.ClientSession() as anon, anon.get(st.base + "/oauth2/auth") as resp:
            assert resp.status == 401 and resp.headers["X-Request-Id"]
        logs.flush()
    text = capsys.readouterr().err
    lines = [json.loads(line) for line in text.splitlines() if '"sidecar.access"' in line]
    seen = [(e["path"], e["status"]) for e in lines]
    assert len(lines) == len(paths) + 1, seen
    expected = {"ts", "level", "logger", "msg", "request_id", "method", "route", "path", "status", "latency_ms"}
    for entry in lines:
        assert set(entry) == expected | {"user", "client_ip"}
        assert entry["client_ip"] == "127.0.0.1" and entry["method"] == "GET"
    assert [e["user"] for e in lines] == ["alice@example.com"] * 2 + [None, None]  # a refused path: before sign-in
    assert lines[2]["path"] == '/_demo/"\\\t\u2028' and lines[2]["status"] == 400 and lines[0]["request_id"] == "abc-1"
    assert cookie and cookie not in text and "?q=" not in text


XFF = "X-Forwarded-For"


@pytest.mark.parametrize(
    ("reverse_proxy", "header", "headers", "expected"),
    [
        ("true", "X-Real-IP", {"X-Real-IP": "203.0.113.7"}, "203.0.113.7"),
        ("true", XFF, {XFF: "198.51.100.1, 203.0.113.9"}, "203.0.113.9"),
        ("true", "X-Real-IP", {"X-Real-IP": "not-an-ip", XFF: "203.0.113.5"}, "127.0.0.1"),
        ("true", "X-Real-IP", {"X-Real-IP": '"><script>'}, "127.0.0.1"),
        ("true", XFF, {XFF: "<b>, 203.0.113.5"}, "203.0.113.5"),
        ("true", "X-Real-IP", {}, "127.0.0.1"),
        ("false", "X-Real-IP", {"X-Real-IP": "203.0.113.7"}, "127.0.0.1"),
        ("false", XFF, {XFF: "203.0.113.9"}, "127.0.0.1"),
    ],
)
async def test_the_logged_client_ip_is_what_view_of_would_say_without_building_the_view(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    reverse_proxy: str,
    header: str,
    headers: dict[str, str],
    expected: str,
) -> None:
    caplog.set_level(logging.INFO, "sidecar.access")
    overrides = {"reverse_proxy": reverse_proxy, "real_client_ip_header": header, "request_logging": "true"}
    async with stack(MemoryStore(), upstream="", **overrides) as st, aiohttp.ClientSession() as client:
        logs.flush()
        capsys.readouterr()
        async with client.get(st.base + "/oauth2/auth", headers=headers) as resp:  # no cookie: no event, no view
            assert resp.status == 401
        logs.flush()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"sidecar.access"' in line]
    assert [e["client_ip"] for e in lines] == [expected]


# --- histograms tallied locally ---------------------------------------------------------------------------

VALUES = [0.0, 0.0001, 0.0005, 0.00050001, 0.001, 0.003, 0.02, 0.7, 2.5, 9.99, 10.0, 11.0, 1e9]


def _exposed(registry: CollectorRegistry) -> tuple[list[str], float]:
    """Bucket and count lines exactly; the sum apart (added in another order, it may differ in the last bit)."""
    lines = generate_latest(registry).decode().splitlines()
    total = sum(float(line.split()[-1]) for line in lines if line.startswith("h_seconds_sum"))
    return [line for line in lines if "_created" not in line and not line.startswith("h_seconds_sum")], total


def test_a_local_histogram_exposes_what_direct_observations_would() -> None:
    direct_registry, local_registry = CollectorRegistry(), CollectorRegistry()
    buckets = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    direct = Histogram("h_seconds", "h", ["route"], buckets=buckets, registry=direct_registry)
    local_parent = Histogram("h_seconds", "h", ["route"], buckets=buckets, registry=local_registry)
    local = metrics.LocalHistogram(local_parent.labels(route="auth"))
    for period in (VALUES, VALUES[:3], [], VALUES[4:]):
        for value in period:
            direct.labels(route="auth").observe(value)
            local.observe(value)
        if period:
            assert _exposed(local_registry)[0] != _exposed(direct_registry)[0]  # not pushed yet
        metrics.flush()
        (local_lines, local_sum), (direct_lines, direct_sum) = _exposed(local_registry), _exposed(direct_registry)
        assert local_lines == direct_lines and any('le="+Inf"' in line for line in local_lines)
        assert local_sum == pytest.approx(direct_sum, rel=1e-12)


# --- the proxy's header filter as sets ---------------------------------------------------------------------

KNOWN = [
    "Authorization",
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Forwarded-Access-Token",
    "X-User",
    "X-Email",
    "X-Auth-Request-User",
    "X-Auth-Request-Anything",
    "X-Auth-Request-",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "Forwarded",
    "X-Real-IP",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Server",
    "X-Forwarded-Scheme",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
    "Accept",
    "X-Custom",
    "X-Auth-Requestuser",
    "X-Authorization",
]


def _spellings(name: str) -> list[str]:
    return [name, name.lower(), name.upper(), name.replace("-", "_"), name.replace("-", "_").lower(), name + "_"]


@pytest.mark.parametrize("name", [s for n in KNOWN for s in _spellings(n)])
def test_the_set_filter_refuses_exactly_what_dropped_from_client_does(name: str) -> None:
    for authorization in (False, True):
        for trusted in (False, True):
            for skipped in (False, True):
                norm = name.lower().replace("_", "-")
                by_sets = norm in refused_from_client(authorization, trusted, skipped) or norm.startswith(
                    PROTECTED_PREFIX
                )
                old = dropped_from_client(
                    name.lower(), authorization=authorization, trusted_peer=trusted, skipped=skipped
                )
                assert by_sets == old, (name, authorization, trusted, skipped)


# --- bodies: read whole up to 64 KiB, streamed beyond; the same bytes either way ---------------------------

SIZES = [0, 1, 1000, WHOLE_BODY - 1, WHOLE_BODY, WHOLE_BODY + 1, 300_000]


def _payload(size: int) -> bytes:
    return (hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1))[:size]


async def test_small_bodies_with_a_length_are_read_whole_and_others_streamed() -> None:
    kinds: list[tuple[int | None, str]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await _request_body(request)
        kinds.append((request.content_length, type(body).__name__))
        data = body if isinstance(body, bytes) else await body.read() if body is not None else b""
        return web.Response(body=hashlib.sha256(data).hexdigest().encode())

    app = web.Application()
    app.router.add_route("*", "/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as client:
            for size in SIZES:
                async with client.post(f"http://127.0.0.1:{port}/", data=_payload(size)) as resp:
                    assert await resp.text() == hashlib.sha256(_payload(size)).hexdigest()

                async def chunks(size: int = size) -> AsyncIterator[bytes]:
                    yield _payload(size)

                async with client.post(f"http://127.0.0.1:{port}/", data=chunks()) as resp:
                    assert await resp.text() == hashlib.sha256(_payload(size)).hexdigest()
            async with client.get(f"http://127.0.0.1:{port}/") as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()
    expected: list[tuple[int | None, str]] = []
    for size in SIZES:
        expected.append((size, "NoneType" if not size else "bytes" if size <= WHOLE_BODY else "StreamReader"))
        expected.append((None, "StreamReader"))  # chunked: no declared length
    expected.append((None, "NoneType"))
    assert kinds == expected


async def _echo_upstream() -> tuple[web.AppRunner, str]:
    """Answers with the request body it got, with a Content-Length or chunked (``?chunked``)."""

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if "chunked" in request.query:
            response = web.StreamResponse(headers={"X-Got": str(len(body))})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for start in range(0, len(body), 7000):
                await response.write(body[start : start + 7000])
            await response.write_eof()
            return response
        return web.Response(body=body, headers={"X-Got": str(len(body)), "Content-Type": "application/x-test"})

    app = web.Application(client_max_size=2**20)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize("size", SIZES)
async def test_whole_and_streamed_bodies_reach_the_app_and_come_back_byte_for_byte(size: int) -> None:
    runner, upstream = await _echo_upstream()
    try:
        async with stack(MemoryStore(), upstream=upstream) as st, browser() as client:
            await sign_in(client, st.base, rd="/")
            payload = _payload(size)

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, size, 10_000):
                    yield payload[start : start + 10_000]

            for query in ("", "?chunked"):
                for data in (payload, chunks()):
                    async with client.post(st.base + "/up" + query, data=data) as resp:
                        assert resp.status == 200
                        assert resp.headers["X-Got"] == str(size)
                        assert await resp.read() == payload
                        if query:
                            assert resp.headers.get("Transfer-Encoding") == "chunked" or size == 0
                        else:
                            assert resp.headers["Content-Length"] == str(size)
                            assert resp.headers["Content-Type"] == "application/x-test"
            async with client.head(st.base + "/up") as resp:
                assert resp.status == 200 and await resp.read() == b""
    finally:
        await runner.cleanup()
