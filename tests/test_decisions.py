"""The /oauth2/auth decision cache, on both listeners, with the real app, the dev provider and Redis.

Every way an answer can change must reach the cached one in time: sign-out here (at once), sign-out on
another replica (within --session-cache-ttl), a refresh (never an expired token), a step-up age crossed
during the cache period (never a 202 past it), the auth-url's location rules and the peer's trust (part of
the key). Nothing is cached without the session cookie, with two, or with Authorization; the table stays
within its entry and byte bounds. Requests here are written by hand on purpose: these are the hostile and
boundary variants on top of the real-nginx tests in tests/e2e, which go through the cache too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import metrics
from sidecar.config import Config
from sidecar.context import SERVICES, Services
from sidecar.decisions import DecisionCache, Key, header_lists, request_key
from sidecar.store import MemoryStore, RedisStore
from tests.stack import Stack, browser, session_cookie, sign_in, stack
from tests.test_auth_listener import Response, comparable, header
from tests.test_auth_listener import auth_listener as lean  # the lean listener on the stack's first app

TOKENS = {"pass_access_token": "true", "pass_authorization_header": "true", "upstream": ""}


def key_of(method: str, headers: list[tuple[str, str]], query: str, trusted: bool, config: Config) -> Key | None:
    """``request_key`` of (name, value) pairs."""
    return request_key(method, [name for name, _ in headers], [value for _, value in headers], query, trusted, config)


def svc_of(st: Stack, index: int = 0) -> Services:
    return st.runners[index].app[SERVICES]


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def ask(
    port: int,
    cookie: str | None = None,
    query: str = "",
    extra: dict[str, str] | None = None,
    source: str = "127.0.0.1",
) -> Response:
    """One GET /oauth2/auth on its own connection, from ``source`` (127.0.0.2 is not a trusted proxy)."""
    head = f"GET /oauth2/auth{query} HTTP/1.1\r\nHost: app.example\r\n"
    if cookie is not None:
        head += f"Cookie: _sidecar={cookie}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items()) + "\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(head.encode())
        return await _read_answer(reader)
    finally:
        writer.close()


def lookups() -> dict[str, float]:
    metrics.flush()
    return {r: metrics.DECISION_CACHE_LOOKUPS.labels(r)._value.get() for r in ("hit", "miss")}  # type: ignore[attr-defined]


@pytest.fixture
async def st() -> AsyncIterator[Stack]:
    async with stack(MemoryStore(), reverse_proxy="true", trusted_proxy="127.0.0.1/32", **TOKENS) as s:
        yield s


async def _signed_in(st: Stack, base: str | None = None) -> str:
    async with browser() as client:
        await sign_in(client, base or st.base)
        cookie = session_cookie(client)
    assert cookie
    return cookie


async def test_a_hit_answers_byte_for_byte_what_the_decision_answered_on_both_listeners(st: Stack) -> None:
    cookie = await _signed_in(st)
    main = port_of(st.base)
    async with lean(st) as port:
        cases = [{}, {"X-Request-Id": "r-1"}, {"X-Original-URI": "/a?b=c", "X-Forwarded-For": "203.0.113.7"}]
        for extra in cases:
            # the first sighting of a key is not kept, the second is: from the third on, hits
            first = await ask(port, cookie, extra=extra)
            await ask(port, cookie, extra=extra)
            before = lookups()
            again = [await ask(port, cookie, extra=extra), await ask(main, cookie, extra=extra)]
            after = lookups()
            assert first[0] == 202 and header(first, "X-Auth-Request-Access-Token")
            assert after["hit"] - before["hit"] == 2 and after["miss"] == before["miss"], extra
            assert [comparable(r) for r in again] == [comparable(first)] * 2, extra


async def test_a_key_seen_once_is_not_kept(st: Stack) -> None:
    """One-off keys (a new URI per request) cost a hash, not an entry: they push nothing out."""
    cookie = await _signed_in(st)
    cache = svc_of(st).decisions
    assert cache is not None
    async with lean(st) as port:
        for i in range(30):
            assert (await ask(port, cookie, extra={"X-Original-URI": f"/once/{i}"}))[0] == 202
        assert len(cache) == 0
        for _ in range(2):
            assert (await ask(port, cookie, extra={"X-Original-URI": "/once/3"}))[0] == 202
        assert len(cache) == 1


async def test_nothing_is_kept_without_one_session_cookie_or_with_authorization(st: Stack) -> None:
    cookie = await _signed_in(st)
    cache = svc_of(st).decisions
    assert cache is not None
    async with lean(st) as port:
        uncacheable: list[tuple[str | None, dict[str, str], int]] = [
            (None, {}, 401),
            (None, {"Cookie": "other=1"}, 401),
            (None, {"Cookie": f"_sidecar={cookie}; _sidecar={cookie}"}, 202),  # twice in one header
            (None, {"Cookie": f"x_sidecar=1; _sidecar={cookie}"}, 202),  # a look-alike name: not worth the doubt
            (cookie, {"Cookie": "app=1"}, 202),  # two Cookie headers
            (cookie, {"Authorization": "Bearer abc.def.ghi"}, 202),  # a bearer token is the app's here
            (cookie, {"authorization": "Basic eDp5"}, 202),
        ]
        not_202: list[tuple[str | None, dict[str, str], int]] = [
            (None, {"Cookie": f"_sidecar={cookie[:-2]}xx"}, 401),  # forged
            (None, {"Cookie": "_sidecar="}, 401),
        ]
        for value, extra, status in uncacheable + not_202:
            for _ in range(2):
                got = await ask(port, value, extra=extra)
                assert got[0] == status, (value, extra, got[0])
            assert len(cache) == 0, extra
    for value, extra, _ in uncacheable:
        items = list(extra.items()) + ([("Cookie", f"_sidecar={value}")] if value else [])
        assert key_of("GET", items, "", True, st.configs[0]) is None, extra


async def test_sign_out_here_ends_cached_answers_at_once(st: Stack) -> None:
    cookie = await _signed_in(st)
    async with lean(st) as port, aiohttp.ClientSession(cookies={"_sidecar": cookie}) as client:
        assert (await ask(port, cookie))[0] == 202
        assert (await ask(port_of(st.base), cookie))[0] == 202  # both listeners share the cache
        assert (await ask(port, cookie))[0] == 202
        assert len(svc_of(st).decisions or ()) == 1
        async with client.get(st.base + "/oauth2/sign_out", allow_redirects=False) as resp:
            assert resp.status == 302
        assert len(svc_of(st).decisions or ()) == 0  # dropped, not merely skipped
        assert (await ask(port, cookie))[0] == 401
        assert (await ask(port_of(st.base), cookie))[0] == 401


async def test_sign_out_on_another_replica_is_seen_within_the_session_cache_period(redis_url: str) -> None:
    """The documented bound: another replica's sign-out reaches this one's cached answers within
    --session-cache-ttl (here 1 s), as for the session cache; after that, never a 202 again."""
    stores = [RedisStore(aioredis.from_url(redis_url)) for _ in range(2)]
    try:
        async with stack(stores[0], session_cache_ttl="1s", **TOKENS) as st:
            await st.add_sidecar(stores[1], session_cache_ttl="1s", **TOKENS)
            cookie = await _signed_in(st)
            async with lean(st) as port, aiohttp.ClientSession(cookies={"_sidecar": cookie}) as client:
                for _ in range(3):  # kept at the second, answered from the cache at the third
                    assert (await ask(port, cookie))[0] == 202
                assert len(svc_of(st).decisions or ()) == 1
                async with client.get(st.sidecars[1] + "/oauth2/sign_out", allow_redirects=False) as resp:
                    assert resp.status == 302
                signed_out = time.monotonic()
                statuses: list[tuple[float, int]] = []
                while time.monotonic() - signed_out < 1.6:
                    statuses.append((time.monotonic() - signed_out, (await ask(port, cookie))[0]))
                    await asyncio.sleep(0.02)
    finally:
        for store in stores:
            await store.close()
    last_202 = max((t for t, status in statuses if status == 202), default=0.0)
    assert last_202 < 1.0, statuses  # within the period
    assert statuses[-1][1] == 401 and all(status == 401 for t, status in statuses if t > last_202)


async def test_a_refresh_replaces_the_cached_answer_never_an_expired_token() -> None:
    """Tokens live 2 s, refreshed at expiry (skew 0), session cache 1 s, asked every 10 ms: no 202 may carry
    a token after the moment the sidecar itself takes it as expired (a cached answer living to the end of
    its period would, by up to a second)."""
    async with stack(
        MemoryStore(),
        provider_kw={"access_token_ttl": 2},
        refresh_skew="0s",
        session_cache_ttl="1s",
        reverse_proxy="true",
        **TOKENS,
    ) as st:
        cookie = await _signed_in(st)
        sessions = svc_of(st).sessions
        seen: list[tuple[float, str]] = []
        expiry: dict[str, float] = {}  # each token as the sidecar's session holds it: until when it is good
        async with lean(st) as port:
            stop = time.time() + 4.5
            while time.time() < stop:
                sent = time.time()
                got = await ask(port, cookie)
                assert got[0] == 202
                seen.append((sent, header(got, "X-Auth-Request-Access-Token") or ""))
                for session, _ in sessions._cache.values():
                    expiry[session.tokens.access_token] = session.tokens.access_expires_at or 0.0
                await asyncio.sleep(0.01)
    tokens = list(dict.fromkeys(token for _, token in seen))
    assert len(tokens) >= 2, "no refresh happened"
    assert [(sent, token[-8:]) for sent, token in seen if sent >= expiry[token]] == []
    assert [tokens.index(token) for _, token in seen] == sorted(tokens.index(token) for _, token in seen)


async def test_no_202_once_the_step_up_age_is_crossed_even_inside_the_cache_period() -> None:
    """``?max_age=2`` (auth-url) and ``--fresh-auth-route 2s=^/admin/`` (X-Original-URI from a trusted front):
    stale from floor(auth_time) + 3 on. Asked every 20 ms with a 1 s session cache, an entry made just
    before the crossing would otherwise answer 202 for up to a second after it."""
    async with stack(
        MemoryStore(), session_cache_ttl="1s", reverse_proxy="true", fresh_auth_route="2s=^/admin/", **TOKENS
    ) as st:
        cookie = await _signed_in(st)
        kinds: dict[str, tuple[str, dict[str, str]]] = {
            "query": ("?max_age=2", {}),
            "route": ("", {"X-Original-URI": "/admin/users"}),
            "plain": ("", {"X-Original-URI": "/home"}),
        }
        seen: dict[str, list[tuple[float, int, str | None]]] = {kind: [] for kind in kinds}
        async with lean(st) as port:
            stop = time.time() + 4.2
            while time.time() < stop:
                for kind, (query, extra) in kinds.items():
                    sent = time.time()
                    got = await ask(port, cookie, query, extra)
                    seen[kind].append((sent, got[0], header(got, "X-Auth-Request-Auth-Time")))
                await asyncio.sleep(0.02)
    auth_time = next(int(at) for _, status, at in seen["plain"] if at)
    crossing = auth_time + 3
    assert all(status == 202 for _, status, _ in seen["plain"])
    for kind in ("query", "route"):
        assert all(sent < crossing for sent, status, _ in seen[kind] if status == 202), kind
        assert any(status == 401 for _, status, _ in seen[kind]), kind
        assert all(status == 401 for sent, status, _ in seen[kind] if sent >= crossing + 0.1), kind


async def test_location_rules_and_peer_trust_are_part_of_the_key(st: Stack) -> None:
    cookie = await _signed_in(st)
    async with lean(st) as port:
        for _ in range(2):  # the second round is answered from the cache where it may be
            assert (await ask(port, cookie))[0] == 202
            assert (await ask(port, cookie, "?allowed_groups=admins"))[0] == 202
            assert (await ask(port, cookie, "?allowed_groups=nope-group"))[0] == 403
            assert (await ask(port, cookie, "?allowed_emails=bob@example.com"))[0] == 403
            assert (await ask(port, cookie, "?unknown_rule=1"))[0] == 403
            trusted = await ask(port, cookie)
            untrusted = await ask(port, cookie, source="127.0.0.2")
            assert trusted[0] == untrusted[0] == 202
            assert header(trusted, "X-Auth-Request-Access-Token") and header(trusted, "Authorization")
            assert (
                header(untrusted, "X-Auth-Request-Access-Token") is None and header(untrusted, "Authorization") is None
            )
            assert header(untrusted, "X-Auth-Request-Email") == "alice@example.com"
        # untrusted first this time, on a fresh key: the trusted answer still carries the tokens
        untrusted = await ask(port, cookie, "?allowed_groups=admins", source="127.0.0.2")
        trusted = await ask(port, cookie, "?allowed_groups=admins")
        assert header(untrusted, "Authorization") is None and header(trusted, "Authorization")


async def test_the_table_stays_within_its_entry_and_byte_bounds(st: Stack) -> None:
    svc = svc_of(st)
    assert svc.decisions is not None
    cookies = [await _signed_in(st) for _ in range(3)]
    for max_entries, max_bytes in ((20, 10**9), (10**6, 40_000)):
        svc.decisions = cache = DecisionCache(svc.sessions, svc.config, max_entries=max_entries, max_bytes=max_bytes)
        sizes = []
        async with lean(st) as port:
            for i in range(120):
                for _ in range(2):  # a key is kept the second time it is seen
                    got = await ask(port, cookies[i % 3], extra={"X-Original-URI": f"/page/{i}"})
                    assert got[0] == 202
                sizes.append((len(cache), cache.bytes))
        assert max(n for n, _ in sizes) <= max_entries and max(b for _, b in sizes) <= max_bytes
        assert len(cache) > 5  # it did keep answers
    assert cache.bytes == sum(entry.size for entry in cache._entries.values())
    svc.sessions.on_change.remove(cache.drop_session)


async def test_access_line_and_counts_per_request_on_hits(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from sidecar import logs

    caplog.set_level(logging.INFO, logger="sidecar.access")
    async with stack(MemoryStore(), request_logging="true", **TOKENS) as st:
        cookie = await _signed_in(st)
        async with lean(st) as port:
            logs.flush()
            capsys.readouterr()
            before = lookups()
            for i in range(7):  # two misses (the key kept at the second), then hits
                got = await ask(port, cookie, extra={"X-Request-Id": f"hit-{i}"})
                assert got[0] == 202 and header(got, "X-Request-Id") == f"hit-{i}"
            generated = await ask(port_of(st.base), cookie)
            after = lookups()
            logs.flush()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"sidecar.access"' in line]
    assert after["hit"] - before["hit"] >= 6  # five on the lean listener, one on the main one
    assert [line["request_id"] for line in lines[:7]] == [f"hit-{i}" for i in range(7)]
    assert all(line["user"] == "alice@example.com" and line["status"] == 202 for line in lines)
    assert lines[-1]["request_id"] == header(generated, "X-Request-Id") and len(lines) == 8
    assert cookie not in json.dumps(lines)


class Recording:
    """Request headers that note every name the decision asks for (any other access fails the test)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._proxy = CIMultiDictProxy(CIMultiDict(items))
        self.read: set[str] = set()

    def get(self, name: str, default: Any = None) -> Any:
        self.read.add(name.lower())
        return self._proxy.get(name, default)

    def getall(self, name: str, default: Any = None) -> Any:
        self.read.add(name.lower())
        return self._proxy.getall(name, default)

    def getone(self, name: str, default: Any = None) -> Any:
        self.read.add(name.lower())
        return self._proxy.getone(name, default)

    def __getitem__(self, name: str) -> str:
        self.read.add(name.lower())
        return self._proxy[name]

    def __contains__(self, name: object) -> bool:
        self.read.add(str(name).lower())
        return name in self._proxy

    # Whole-table passes: refuse_undecodable looks at every value only to find a non-ASCII one (then reads
    # by name, recorded above); refuse_aliases looks at every name only to refuse odd spellings (which the key
    # never caches); read_auth keeps the names of the original-request family, so those are what it reads.
    def values(self) -> Any:
        return self._proxy.values()

    def __iter__(self) -> Any:
        return iter(self._proxy)

    def keys(self) -> Any:
        return self._proxy.keys()

    def items(self) -> Any:
        from sidecar.fronts import FAMILY

        family = {name.lower() for name in FAMILY}
        self.read.update(name.lower() for name in self._proxy if name.lower() in family)
        return self._proxy.items()


FRONT_HEADERS = [
    ("Host", "app.example"),
    ("X-Original-URI", "/admin/x?y=1"),
    ("X-Original-URL", "https://app.example/admin/x?y=1"),
    ("X-Original-Method", "POST"),
    ("X-Forwarded-Uri", "/admin/x?y=1"),
    ("X-Forwarded-Method", "POST"),
    ("X-Forwarded-Host", "app.example"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Real-IP", "203.0.113.9"),
    ("Accept", "text/html"),
    ("User-Agent", "Mozilla/5.0"),
    ("Sec-Fetch-Site", "same-origin"),
    ("Origin", "http://app.example"),
    ("Referer", "http://app.example/"),
    ("X-Auth-Request-Redirect", "/x"),
    ("X-Request-Id", "abc"),
]


@pytest.mark.parametrize(
    "settings",
    [
        {"reverse_proxy": "true", "fresh_auth_route": "1h=^/admin/", "request_logging": "true"},
        {"reverse_proxy": "true", "oauth_server": "true", "oauth_resource": "/admin"},
        {"reverse_proxy": "true", "skip_jwt_bearer_tokens": "true", "real_client_ip_header": "X-ProxyUser-IP"},
        {"trusted_proxy": "10.0.0.0/8"},
        *(
            {
                "reverse_proxy": "true",
                "front": front,
                "fresh_auth_route": "1h=^/admin/",
                "oauth_server": "true",
                "oauth_resource": "/mcp",
            }
            for front in ("nginx", "ingress-nginx", "traefik", "caddy")  # envoy: never cached, see below
        ),
    ],
)
async def test_the_decision_reads_no_header_outside_its_key(settings: dict[str, str]) -> None:
    """Every header the running decision asks for is in the cache key (or is Cookie, Authorization, which
    makes a request uncacheable, or X-Request-Id, echoed per request). A front table that makes the decision
    read another header fails here, before it can make two requests with one key get different answers."""
    from sidecar import auth_decision
    from sidecar.auth_request import AuthRequest
    from sidecar.context import DECISION_KEY
    from sidecar.decisions import _KEY_NAMES, _KEY_PREFIXES
    from sidecar.middleware import guarded

    async with stack(MemoryStore(), **{**TOKENS, **settings}) as st:
        cookie = await _signed_in(st)
        config = st.configs[0]
        allowed = {"cookie", "authorization", "x-request-id", config.real_client_ip_header.lower()}
        decide = guarded(auth_decision.auth, "/oauth2/auth")
        for query in ("", "?max_age=3600", "?allowed_groups=admins"):
            for extra in ([], [("X-ProxyUser-IP", "203.0.113.9")]):
                headers = Recording([*FRONT_HEADERS, *extra, ("Cookie", f"app=1; _sidecar={cookie}")])
                request = AuthRequest(st.runners[0].app, "GET", "/oauth2/auth", query[1:], headers, "127.0.0.1", (1, 1))  # type: ignore[arg-type]
                request[DECISION_KEY] = ()  # the key is the listener's business: here only the decision reads
                response = await decide(request)  # type: ignore[arg-type]
                assert response.status == 202, (settings, query)
                outside = {
                    name
                    for name in headers.read
                    if name not in allowed and name not in _KEY_NAMES and not name.startswith(_KEY_PREFIXES)
                }
                assert outside == set(), (settings, query)


async def test_envoy_checks_by_path_are_never_cached() -> None:
    """``--front envoy`` asks at /oauth2/auth/<original path>: the path is an input the key does not hold, so
    such a check is never kept nor answered from the table (a 202 for /public never answers /admin)."""
    from sidecar.auth_decision import decision_key

    settings = {"reverse_proxy": "true", "front": "envoy", "fresh_auth_route": "1h=^/admin/"}
    async with stack(MemoryStore(), **{**TOKENS, **settings}) as st:
        cookie = await _signed_in(st)
        cache = svc_of(st).decisions
        assert cache is not None
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.get(f"{st.base}/oauth2/auth/public/x", headers={"Cookie": f"_sidecar={cookie}"}) as r:
                    assert r.status == 202
        assert len(cache) == 0
        request = make_mocked_request("GET", "/oauth2/auth/admin/x", headers={"Cookie": f"_sidecar={cookie}"})
        assert decision_key(request, svc_of(st)) == ((), None)


async def test_the_cache_can_be_turned_off_and_is_off_without_a_session_cache() -> None:
    """``--auth-decision-cache=false``: no table at all; ``--session-cache-ttl=0``: nothing is ever kept
    (an answer may not outlive the session cache), and every answer is still right."""
    for settings in ({"auth_decision_cache": "false"}, {"session_cache_ttl": "0s"}):
        async with stack(MemoryStore(), **TOKENS, **settings) as st:
            cookie = await _signed_in(st)
            cache = svc_of(st).decisions
            async with lean(st) as port:
                for _ in range(3):
                    assert (await ask(port, cookie))[0] == 202
                    assert (await ask(port_of(st.base), cookie))[0] == 202
            assert (cache is None) if "auth_decision_cache" in settings else (cache is not None and len(cache) == 0)


async def test_a_cached_answer_never_skips_the_host_rule_or_mixes_methods(st: Stack) -> None:
    """An entry stored from HTTP/1.0 requests without Host is never an HTTP/1.1 request's answer without
    one (that is a 400), even with a header whose value is "host"; HEAD and GET are kept apart."""
    from tests.test_auth_listener import exchange

    cookie = await _signed_in(st)
    cache = svc_of(st).decisions
    assert cache is not None
    async with lean(st) as port:
        old = f"GET /oauth2/auth HTTP/1.0\r\nX-Forwarded-Host: host\r\nCookie: _sidecar={cookie}\r\n\r\n"
        for _ in range(3):
            assert (await exchange(port, old.encode()))[0][0] == 202
        assert len(cache) == 1
        new = old.replace("HTTP/1.0", "HTTP/1.1")
        got = await exchange(port, new.encode())
        assert got[0][0] == 400
        head = f"HEAD /oauth2/auth HTTP/1.1\r\nHost: a\r\nCookie: _sidecar={cookie}\r\n\r\n"
        get = head.replace("HEAD", "GET", 1)
        for _ in range(3):
            (h,) = await exchange(port, head.encode(), heads=(True,))
            (g,) = await exchange(port, get.encode())
            assert h[0] == g[0] == 202
            assert header(h, "Content-Length") is None and header(g, "Content-Length") == "0"
        assert len(cache) == 3


def _config(**overrides: str) -> Any:
    from sidecar.config import build_config
    from tests.stack import sidecar_settings

    return build_config(sidecar_settings("http://127.0.0.1:1", 4180, "", **overrides))


BASE_HEADERS = [("Host", "app.example"), ("Cookie", "a=1; _sidecar=v.s.t"), ("X-Original-URI", "/x")]


@pytest.mark.parametrize(
    "headers",
    [
        [("Host", "h"), ("Cookie", "_sidecar=v"), ("cookie", "_sidecar=v")],  # two Cookie headers, any case
        [("COOKIE", "_sidecar=v"), ("Cookie", "b=2")],
        [("Cookie", "_sidecar=v"), ("authorization", "")],  # Authorization in any case, even empty
        [("Cookie", "_sidecar=v"), ("AUTHORIZATION", "Bearer x")],
        [("Cookie", "_sidecar=v; _sidecar=w")],  # the session cookie twice
        [("Cookie", "app=_sidecar=x; _sidecar=v")],  # its name inside another cookie's value: not worth the doubt
        [("Cookie", "x_sidecar=v; _sidecar=w")],  # a look-alike next to it
        [("Cookie", "_SIDECAR=v")],  # another case is another cookie
        [("Cookie", "")],
        [("Host", "h")],
    ],
)
def test_requests_that_are_never_cached(headers: list[tuple[str, str]]) -> None:
    assert key_of("GET", headers, "", True, _config()) is None


def test_the_key_changes_with_every_input_the_decision_may_read_and_nothing_else() -> None:
    config = _config(real_client_ip_header="X-ProxyUser-IP")
    base = key_of("GET", BASE_HEADERS, "", True, config)
    assert base is not None
    same = [
        [*BASE_HEADERS, ("User-Agent", "x"), ("Accept", "text/html"), ("X-Request-Id", "1"), ("Referer", "/")],
        [(name.upper(), value) for name, value in BASE_HEADERS],  # header names are case-insensitive
    ]
    for headers in same:
        assert key_of("GET", headers, "", True, config) == base, headers
    changed: list[tuple[str, list[tuple[str, str]], str, bool]] = [
        ("GET", [*BASE_HEADERS[:1], ("Cookie", "a=2; _sidecar=v.s.t"), *BASE_HEADERS[2:]], "", True),  # app cookie
        ("GET", [*BASE_HEADERS[:2], ("X-Original-URI", "/y")], "", True),
        ("GET", [*BASE_HEADERS, ("X-Original-Method", "POST")], "", True),
        ("GET", [*BASE_HEADERS, ("X-Original-URL", "http://other/x")], "", True),
        ("GET", [*BASE_HEADERS, ("X-Forwarded-Uri", "/admin")], "", True),
        ("GET", [*BASE_HEADERS, ("X-Forwarded-Method", "DELETE")], "", True),
        ("GET", [*BASE_HEADERS, ("X-Forwarded-Proto", "https")], "", True),
        ("GET", [*BASE_HEADERS, ("X-Forwarded-For", "203.0.113.1")], "", True),
        ("GET", [*BASE_HEADERS, ("X-Forwarded-Prefix", "/p")], "", True),
        ("GET", [*BASE_HEADERS, ("X-Real-IP", "203.0.113.1")], "", True),
        ("GET", [*BASE_HEADERS, ("Forwarded", "for=203.0.113.1")], "", True),
        ("GET", [*BASE_HEADERS, ("X-ProxyUser-IP", "203.0.113.1")], "", True),  # --real-client-ip-header
        ("GET", [("Host", "other"), *BASE_HEADERS[1:]], "", True),
        ("GET", BASE_HEADERS, "max_age=1", True),
        ("GET", BASE_HEADERS, "allowed_groups=admins", True),
        ("GET", BASE_HEADERS, "", False),  # untrusted peer
        ("HEAD", BASE_HEADERS, "", True),
        ("POST", BASE_HEADERS, "", True),
    ]
    keys = [key_of(method, headers, query, trusted, config) for method, headers, query, trusted in changed]
    assert None not in keys and base not in keys
    assert len(set(keys)) == len(keys)  # and no two of them collide either


@pytest.mark.parametrize(
    "name",
    [
        "X_Forwarded_Uri",
        "X.Auth.Request.User",
        "X~Forwarded~Email",
        "x_original_url",
        "X-Forwarded_Host",
        # letters and digits to str.isalnum, a separator to refuse_aliases (should a parser ever pass them)
        "X-Forwarded\u00b9Host",
        "X\u00b2Forwarded\u00b2Uri",
        "X\u00aaOriginal\u00aaURL",
        "X-Auth-Request-\u017fer",
        "X\u0660Auth\u0660Request\u0660Email",
    ],
)
def test_another_spelling_of_a_read_header_makes_the_request_uncacheable(name: str) -> None:
    """The full decision refuses such names (400, fronts.refuse_aliases); the table must never answer first."""
    from types import SimpleNamespace

    config = SimpleNamespace(real_client_ip_header="X-Real-IP", cookie_name="_sidecar")
    plain = [("Cookie", "_sidecar=v"), ("X-Forwarded-Uri", "/x")]
    assert key_of("GET", plain, "", True, config) is not None  # type: ignore[arg-type]
    assert key_of("GET", [*plain, (name, "/admin")], "", True, config) is None  # type: ignore[arg-type]


def test_every_header_a_front_table_reads_is_in_the_key() -> None:
    from types import SimpleNamespace

    from sidecar.fronts import FAMILY

    config = SimpleNamespace(real_client_ip_header="X-Real-IP", cookie_name="_sidecar")
    base = key_of("GET", [("Cookie", "_sidecar=v")], "", True, config)  # type: ignore[arg-type]
    for name in FAMILY:
        with_it = key_of("GET", [("Cookie", "_sidecar=v"), (name, "v")], "", True, config)  # type: ignore[arg-type]
        assert with_it is not None and with_it != base, name


def _hostile_keys(cookie: str, i: int) -> list[tuple[str, list[tuple[str, str]], str, str | None]]:
    """Request keys (method, headers, query) and the answer's Cookie header an attacker with a session can
    make a worker keep, each costing far more memory than its length in characters: many tiny headers (a
    string object each), astral characters (4 bytes each in memory, in the key and in the answer's Cookie),
    undecodable bytes (surrogateescape: 2 bytes each), a long query of them."""
    astral = "\U0001f600" * 1500
    return [
        ("GET", [("Cookie", f"_sidecar={cookie}"), *((f"X-Forwarded-A{j}", str(i)) for j in range(90))], "", None),
        ("GET", [("Cookie", f"a={astral}{i}; _sidecar={cookie}")], "", f"a={astral}{i}"),
        ("GET", [("Cookie", f"_sidecar={cookie}"), ("X-Forwarded-Junk", "\udcff" * 3000 + str(i))], "", None),
        ("GET", [("Cookie", f"_sidecar={cookie}")], "q=" + "\udcfe" * 3000 + str(i), None),
    ]


async def test_the_byte_bound_holds_in_real_memory_under_hostile_keys(st: Stack) -> None:
    """``max_bytes`` bounds what the table really holds (tracemalloc), not the characters it holds: a family
    of hostile keys fills a 2 MB table and the process's memory grows by about that much, not several times it."""
    import gc
    import tracemalloc

    from sidecar.auth_decision import _prebuilt

    svc = svc_of(st)
    max_bytes = 2_000_000
    for family in range(4):
        # A session of its own per family: a 202 is kept only until the access token is due for refresh (30 s
        # after sign-in here), and under tracemalloc on a loaded machine the families before may take longer.
        cookie = await _signed_in(st)
        ref = svc.codec.load_session(cookie, time.time())
        session = await svc.sessions.load(ref)
        plain = _prebuilt(session, svc.config, True)
        gc.collect()
        tracemalloc.start()
        try:
            cache = DecisionCache(svc.sessions, svc.config, max_entries=10**6, max_bytes=max_bytes)
            before = tracemalloc.get_traced_memory()[0]
            for i in range(3000):
                if i % 100 == 0:
                    svc.sessions._remember(ref.store_key, session)  # the same object, cached anew: entries stay live
                method, headers, query, app_cookie = _hostile_keys(cookie, i)[family]
                key = key_of(method, headers, query, True, svc.config)
                assert key is not None
                answer = CIMultiDict({**plain, "Cookie": app_cookie}) if app_cookie else plain
                cache.put(key, answer, ref, session, max_age=None, cookie_until=None, forwarded_ip=None)
                if i % 50 == 0:
                    next(iter(cache._entries.values())).header_block()  # the lean listener's block, at a hit
            for entry in cache._entries.values():
                entry.header_block()
            del key, answer, headers, query
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert cache.bytes <= max_bytes and len(cache) > 5, family
        assert held <= 1.25 * max_bytes, (family, held, len(cache))
        svc.sessions.on_change.remove(cache.drop_session)


async def _raw_status(port: int, target: str, cookie: str) -> int:
    """The status of ``GET target`` sent as written (no client normalises the percent-encoding)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: app.example\r\nCookie: _sidecar={cookie}\r\n\r\n".encode())
        return int((await asyncio.wait_for(reader.readline(), 5)).split(b" ")[1])
    finally:
        writer.close()


async def test_an_encoded_spelling_of_the_auth_path_never_takes_the_plain_paths_answer() -> None:
    """aiohttp decodes ``/oauth2/%61uth`` to ``/oauth2/auth``, but envoy's decision reads the raw path's tail
    (the original request): the key must hold the raw path, or the plain path's cached 202 answers a request
    the decision refuses. Every spelling gets the answer it gets with nothing cached."""
    settings = {"reverse_proxy": "true", "front": "envoy", "fresh_auth_route": "1h=^/admin/"}
    spellings = ["/oauth2/%61uth", "/oauth2%2Fauth", "/%6Fauth2/auth", "/oauth2/aut%68", "/oauth2/%61%75%74%68"]
    async with stack(MemoryStore(), **{**TOKENS, **settings}) as st:
        cookie = await _signed_in(st)
        main = port_of(st.base)
        cold = {target: await _raw_status(main, target, cookie) for target in spellings}
        for _ in range(3):
            assert await _raw_status(main, "/oauth2/auth", cookie) == 202
        cache = svc_of(st).decisions
        assert cache is not None and len(cache) == 1
        warm = {target: await _raw_status(main, target, cookie) for target in spellings}
        assert warm == cold and 202 not in cold.values(), (cold, warm)


async def test_a_session_ended_here_during_its_cache_refill_stays_ended(redis_url: str) -> None:
    """A refill's store read that went out before a sign-out (here, everywhere, or from the account page)
    returns after it: the session it read may answer that one request, but it is not cached again, so no
    later request in this process (session cache or decision cache, either listener) gets a 202 for it."""
    from sidecar.errors import SessionGone

    store = RedisStore(aioredis.from_url(redis_url))
    try:
        async with stack(store, session_cache_ttl="100ms", **TOKENS) as st:
            svc = svc_of(st)
            sessions = svc.sessions
            async with lean(st) as port:
                for how in ("end", "everywhere", "account"):
                    for yields in range(1, 7):
                        cookie = await _signed_in(st)
                        ref = svc.codec.load_session(cookie, time.time())
                        session = await sessions.load(ref)
                        sub = session.identity.sub
                        await asyncio.sleep(0.15)  # the cached copy is past the period: the next load refills
                        refill = asyncio.ensure_future(sessions.load(ref))
                        for _ in range(yields):
                            await asyncio.sleep(0)  # the refill's GET on its way
                        if how == "end":
                            await sessions.end(ref, session, reason="sign_out")
                        elif how == "everywhere":
                            await sessions.end_all_for_user(sub)
                        else:
                            await sessions.end_users_session(sub, ref.store_key)
                        await asyncio.gather(refill, return_exceptions=True)
                        with pytest.raises(SessionGone):
                            await sessions.load(ref)
                        for _ in range(3):
                            assert (await ask(port, cookie))[0] == 401, (how, yields)
                            assert (await ask(port_of(st.base), cookie))[0] == 401, (how, yields)
    finally:
        await store.close()


async def test_pipelined_hits_and_misses_are_answered_in_order_each_with_its_own_answer(st: Stack) -> None:
    """One write holding hits (two users' cached 202s), misses (no cookie, a bad cookie, Authorization, an
    untried URI, HEAD) and a refusal last: every answer comes in request order (the echoed X-Request-Id), each
    the one its own request gets alone, never a neighbour's user, token headers or status."""
    from tests.test_auth_listener import exchange

    cookies = [await _signed_in(st), await _signed_in(st)]
    users = {}
    async with lean(st) as port:
        for n, cookie in enumerate(cookies):
            for _ in range(3):  # kept at the second sight: hits from here on
                got = await ask(port, cookie, extra={"X-Original-URI": "/warm"})
            users[n] = header(got, "Authorization")
        assert users[0] != users[1] and all(users.values())

        def req(i: int, cookie: str | None, extra: str = "", method: str = "GET", uri: str = "/warm") -> str:
            head = f"{method} /oauth2/auth HTTP/1.1\r\nHost: app.example\r\nX-Request-Id: r{i}\r\n"
            head += f"X-Original-URI: {uri}\r\n"
            return head + (f"Cookie: _sidecar={cookie}\r\n" if cookie else "") + extra + "\r\n"

        plan: list[tuple[str | None, str, str, str, int, int | None]] = [
            (cookies[0], "", "GET", "/warm", 202, 0),
            (None, "", "GET", "/warm", 401, None),
            (cookies[1], "", "GET", "/warm", 202, 1),
            ("v1.forged.sig", "", "GET", "/warm", 401, None),
            (cookies[0], "", "GET", "/new-1", 202, 0),  # a miss between hits
            (cookies[1], "Authorization: Basic eA==\r\n", "GET", "/warm", 202, 1),  # never cached: decided afresh
            (cookies[0], "", "HEAD", "/warm", 202, 0),
            (cookies[1], "", "GET", "/warm", 202, 1),
            (cookies[0], "", "GET", "/warm", 202, 0),
        ]
        for rotation in range(3):  # the same family, starting at another place in the pipeline
            order = plan[rotation:] + plan[:rotation]
            data = "".join(req(i, c, x, m, u) for i, (c, x, m, u, _, _) in enumerate(order))
            data += "GET /oauth2/auth HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"  # refused, after the rest
            heads = tuple(m == "HEAD" for _, _, m, _, _, _ in order) + (False,)
            before = lookups()
            answers = await exchange(port, data.encode(), count=len(order) + 1, heads=heads)
            assert lookups()["hit"] - before["hit"] >= 4, rotation  # the cached ones did come from the table
            assert len(answers) == len(order) + 1, rotation
            for i, ((_, _, _, _, status, user), got) in enumerate(zip(order, answers, strict=False)):
                assert (got[0], header(got, "X-Request-Id")) == (status, f"r{i}"), (rotation, i, got)
                assert header(got, "Authorization") == (users[user] if user is not None else None), (rotation, i)
            assert answers[-1][0] == 400


def _fresh_plans(name: str) -> tuple[Any, Any]:
    """A config whose --real-client-ip-header no other test uses: its own, empty, table of plans."""
    from types import SimpleNamespace

    from sidecar import decisions

    config = SimpleNamespace(real_client_ip_header=name, cookie_name="_sidecar")
    assert key_of("GET", [("Cookie", "_sidecar=v")], "", True, config) is not None  # type: ignore[arg-type]
    return config, decisions._tables[name.lower()]


def test_a_remembered_plan_gives_the_key_a_new_one_gives_and_the_plans_stay_bounded() -> None:
    """The key's plan is worked out once per sequence of header names; the key made from a remembered plan is the
    one made anew, whatever the Cookie header's place, and a client inventing names or orders (more sequences than
    the table keeps, or names too long to keep) gets the same keys, only without a kept plan."""
    from sidecar import decisions

    config, plans = _fresh_plans("X-Plans-Test-IP")
    requests = [
        BASE_HEADERS,
        [*BASE_HEADERS, ("X-Plans-Test-IP", "203.0.113.1"), ("User-Agent", "u")],
        [("Cookie", "_sidecar=v"), ("x-forwarded-uri", "/a")],
        [("Cookie", "_sidecar=v"), ("X-Forwarded-Uri", "/a"), ("X-Forwarded-Uri", "/b")],  # a read header twice
        [("Authorization", "Bearer x"), *BASE_HEADERS],
        [*BASE_HEADERS, ("cookie", "b=2")],
    ]
    first = [key_of("GET", headers, "", True, config) for headers in requests]
    again = [key_of("GET", headers, "", True, config) for headers in requests]
    assert first == again and first[-2:] == [None, None] and None not in first[:-2]
    assert len(set(first[:4])) == 4
    # the Cookie header first, last or between: one key, as a front may place it anywhere
    moved = [BASE_HEADERS[1], BASE_HEADERS[0], BASE_HEADERS[2]], [*BASE_HEADERS[:1], *BASE_HEADERS[2:], BASE_HEADERS[1]]
    assert all(key_of("GET", headers, "", True, config) == first[0] for headers in moved)
    # more name sequences than are kept: every key still holds its own header, the table stops growing
    keys = set()
    for i in range(decisions._MAX_PLANS + 300):
        headers = [("Cookie", "_sidecar=v"), (f"X-Forwarded-N{i}", "1"), ("X-Original-URI", f"/{i % 3}")]
        key = key_of("GET", headers, "", True, config)
        assert key is not None and f"x-forwarded-n{i}" in decisions.key_names(key)
        keys.add(key)
    assert len(keys) == decisions._MAX_PLANS + 300 and len(plans) == decisions._MAX_PLANS
    # and once full, a refused sequence is still refused and a known one still keyed the same
    assert key_of("GET", requests[-2], "", True, config) is None
    assert key_of("GET", [*BASE_HEADERS, ("X_Forwarded_Uri", "/admin")], "", True, config) is None
    assert key_of("GET", BASE_HEADERS, "", True, config) == first[0]


def test_names_too_long_to_keep_are_keyed_without_a_plan() -> None:
    from sidecar import decisions

    config, plans = _fresh_plans("X-Long-Names-IP")
    long_name = "X-Forwarded-" + "a" * (decisions._MAX_PLAN_CHARS // 2)
    for value in ("1", "2"):
        headers = [("Cookie", "_sidecar=v"), (long_name, value), (long_name + "b", value)]
        key = key_of("GET", headers, "", True, config)
        assert key is not None and key[-2:] == (value, value)
    assert len(plans) == 1  # only _fresh_plans' own


async def test_a_lean_listener_hit_echoes_the_request_id_the_decision_would(st: Stack) -> None:
    """The lean listener notes the first X-Request-Id as it parses, for its hits: whatever its case, spacing or
    repetition, a hit echoes (or replaces) it as the decided answer does, on a new connection each."""
    cookie = await _signed_in(st)
    variants = [
        "X-Request-Id: r1\r\n",
        "x-request-id: r2\r\n",
        "X-REQUEST-ID: \t r3 \t\r\n",
        "X-Request-Id: r4\r\nX-Request-Id: r5\r\n",
        "X-Request-Id: a b\r\n",  # not a valid id: not echoed
        "",
    ]
    async with lean(st) as port:
        for n, extra in enumerate(variants):  # a key of its own each (the id is not in the key)
            head = f"GET /oauth2/auth HTTP/1.1\r\nHost: app.example\r\nX-Original-URI: /id/{n}\r\n{extra}"
            head += f"Cookie: _sidecar={cookie}\r\n\r\n"
            before = lookups()
            answers = []
            for _ in range(4):  # decided, decided (and kept), then hits
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head.encode())
                answers.append(await _read_answer(reader))
                writer.close()
            assert lookups()["hit"] - before["hit"] == 2, extra
            ids = [header(got, "X-Request-Id") for got in answers]
            assert len(set(ids)) == 1, (extra, ids)  # the hits' the decided answers'
            if extra and "a b" not in extra:
                assert ids[0] == extra.split(":")[1].split("\r\n")[0].strip(), (extra, ids)
            assert len({comparable(got)[0] for got in answers}) == 1


async def _read_answer(reader: asyncio.StreamReader) -> Response:
    status = int((await asyncio.wait_for(reader.readline(), 5)).split(b" ")[1])
    headers: list[tuple[str, str]] = []
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
        headers.append((name, value.strip()))
    length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
    return status, headers, await reader.readexactly(length)


REPEATED_HEADERS = [
    [("Host", "a"), ("Cookie", "_sidecar=s"), ("Cookie", "app=1")],
    [("Host", "a"), ("Cookie", "app=1"), ("cookie", "_sidecar=s")],
    # an unread header repeated before ones the decision reads: their values must stay beside their names
    [("Host", "a"), ("Cookie", "_sidecar=s"), ("X-Pad", "1"), ("X-Pad", "/public"), ("X-Original-URI", "/admin")],
    [("Host", "a"), ("Cookie", "_sidecar=s"), ("x-pad", "1"), ("X-PAD", "2"), ("X-Original-Method", "DELETE")],
    [
        ("Cookie", "_sidecar=s"),
        ("Accept", "a"),
        ("Accept", "b"),
        ("Accept", "c"),
        ("Host", "a"),
        ("X-Forwarded-Uri", "/x"),
    ],
]


@pytest.mark.parametrize("pairs", REPEATED_HEADERS)
def test_a_parsed_request_with_a_repeated_header_is_keyed_as_its_lines(pairs: list[tuple[str, str]]) -> None:
    """aiohttp hands the listeners a multidict whose ``keys()`` (multidict 7) lists a repeated name once while
    ``values()`` has every line: the key must still pair each value with its own name, and see two Cookie lines."""
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    names, values = header_lists(headers)
    assert (names, values) == ([name for name, _ in pairs], [value for _, value in pairs])
    config = _config()
    assert request_key("GET", names, values, "", True, config) == key_of("GET", pairs, "", True, config)


async def test_with_fresh_routes_no_202_may_be_kept_by_a_front_keyed_by_the_cookie() -> None:
    """With --fresh-auth-route a cookie's 202 depends on the original path, which the documented nginx auth cache
    (keyed by the cookie) does not hold: a 202 for /home kept there would answer for /admin/ after the step-up
    age. Every 202 then says no-store, decided or from the table, on both listeners; without the rule, nothing."""
    async with stack(
        MemoryStore(), reverse_proxy="true", trusted_proxy="127.0.0.1/32", fresh_auth_route="1h=^/admin/", **TOKENS
    ) as st:
        cookie = await _signed_in(st)
        async with lean(st) as port:
            for where in (port_of(st.base), port):
                for path in ("/home", "/admin/users"):
                    for _ in range(3):  # decided, decided and kept, then from the table
                        got = await ask(where, cookie, "", {"X-Original-URI": path})
                        assert got[0] == 202 and header(got, "Cache-Control") == "no-store", (where, path, got)
    async with stack(MemoryStore(), reverse_proxy="true", trusted_proxy="127.0.0.1/32", **TOKENS) as st:
        cookie = await _signed_in(st)
        for _ in range(3):
            got = await ask(port_of(st.base), cookie, "", {"X-Original-URI": "/admin/users"})
            assert got[0] == 202 and header(got, "Cache-Control") is None, got
