"""Step-up by authentication age: --fresh-auth-route, /oauth2/auth?max_age, /oauth2/start?max_age.

Against the development provider over real HTTP with the Redis store. Durations are one second;
the pure rules take ``now`` and are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.config import parse_duration
from sidecar.errors import ConfigError
from sidecar.location_rules import location_rules
from sidecar.models import Identity, Session, TokenSet
from sidecar.stepup import callback_problem, challenge, parse_fresh_route, required_max_age, session_fields
from sidecar.store import RedisStore
from tests.stack import browser, sign_in, stack

CHALLENGE_1 = (
    'Bearer error="insufficient_user_authentication", '
    'error_description="A more recent authentication is required", max_age=1'
)
JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html"}


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(aioredis.from_url(redis_url))
    yield store
    await store.close()


# ------------------------------------------------------------------ pure rules


@pytest.mark.parametrize(
    ("text", "max_age", "method", "path", "matches"),
    [
        ("5m=^/admin/", 300, "GET", "/admin/x", True),
        ("5m=^/admin/", 300, "GET", "/public/admin/", False),
        ("300=POST=^/settings/", 300, "POST", "/settings/password", True),
        ("300=POST=^/settings/", 300, "GET", "/settings/password", False),
        ("1h=GET!=^/api/", 3600, "DELETE", "/api/x", True),
        ("1.2s=^/a", 2, "GET", "/a", True),  # rounded up to whole seconds
        ("1s=^/a{1,3}=,b$", 1, "GET", "/aa=,b", True),  # the regex is never split
    ],
)
def test_fresh_route_parses(text: str, max_age: int, method: str, path: str, matches: bool) -> None:
    rule = parse_fresh_route(text, "fresh-auth-route", parse_duration)
    assert rule.max_age == max_age
    assert rule.matches(method, path) is matches


@pytest.mark.parametrize(
    "text",
    ["^/admin/", "=^/admin/", "0=^/admin/", "0.5s=^/a", "5m=", "5m=GET=", "abc=^/", "5m=(", "99999d=^/", "-1=^/"],
)
def test_fresh_route_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="fresh-auth-route"):
        parse_fresh_route(text, "fresh-auth-route", parse_duration)


@pytest.mark.parametrize(
    ("rule", "method", "expected"),
    [
        ("60=GET=^/admin/", "HEAD", 60),  # review 2: a HEAD runs the application's GET handler
        ("60=GET=^/admin/", "GET", 60),
        ("60=GET=^/admin/", "POST", None),
        ("60=HEAD=^/admin/", "HEAD", 60),
        ("60=HEAD=^/admin/", "GET", None),
        ("60=POST!=^/admin/", "HEAD", 60),
        ("60=GET!=^/admin/", "HEAD", 60),  # HEAD itself is not GET
        ("60=POST=^/admin/", "HEAD", None),
    ],
)
def test_a_head_is_judged_as_the_get_it_is(rule: str, method: str, expected: int | None) -> None:
    rules = [parse_fresh_route(rule, "fresh-auth-route", parse_duration)]
    assert required_max_age(rules, method, "/admin/x") == expected


@pytest.mark.parametrize(
    ("rule", "method", "path", "expected"),
    [
        ("60=^/admin/x$", "GET", "/ADMIN/X", 60),  # review 2: Express, ASP.NET, IIS route without regard to case
        ("60=^/admin/x$", "GET", "/Admin/x", 60),
        ("60=^/admin/x$", "GET", "/admin/x/", 60),  # and Express, Starlette without regard to a trailing slash
        ("60=^/admin/x$", "GET", "/Admin/X/", 60),
        ("60=^/admin/x/$", "GET", "/admin/x", 60),
        ("60=POST=^/settings/password$", "POST", "/Settings/Password/", 60),
        ("60=^/Admin/$", "GET", "/Admin/", 60),  # a rule with capitals still holds for its own spelling
        ("60=^/admin/x$", "GET", "/admin/xy", None),
        ("60=^/admin/x$", "GET", "/admin", None),
        ("60=^/admin/x$", "GET", "/", None),
        ("60=POST=^/settings/password$", "GET", "/settings/password", None),
    ],
)
def test_a_rule_holds_for_the_spellings_an_application_serves_as_its_page(
    rule: str, method: str, path: str, expected: int | None
) -> None:
    rules = [parse_fresh_route(rule, "fresh-auth-route", parse_duration)]
    assert required_max_age(rules, method, path) == expected


async def test_fresh_route_refused_at_start_up_and_strictest_wins() -> None:
    with pytest.raises(ConfigError, match="fresh-auth-route"):
        async with stack(fresh_auth_route=["5m=^/admin/", "soon=^/x"]):
            pass
    async with stack(fresh_auth_route=["5m=^/admin/", "30=^/admin/keys", "1h=^/"]) as st:
        rules = st.configs[0].fresh_routes
    assert required_max_age(rules, "GET", "/admin/keys/1") == 30
    assert required_max_age(rules, "GET", "/admin/") == 300
    assert required_max_age(rules, "GET", "/home") == 3600


@pytest.mark.parametrize(
    ("query", "max_age", "problem"),
    [
        ("max_age=0", 0, False),
        ("max_age=300", 300, False),
        ("allowed_groups=admins&max_age=60", 60, False),
        ("max_age=", None, True),
        ("max_age", None, True),
        ("max_age=-1", None, True),
        ("max_age=1.5", None, True),
        ("max_age=abc", None, True),
        ("max_age=%EF%BC%91", None, True),  # a fullwidth digit is not a number here
        ("max_age=1&max_age=2", None, True),
        ("max_age=99999999999", None, True),
        ("max_age=1e3", None, True),
        ("maxage=5", None, True),
    ],
)
def test_location_max_age(query: str, max_age: int | None, problem: bool) -> None:
    rules = location_rules(query)
    assert rules.max_age == max_age
    assert (rules.problem is not None) is problem


@pytest.mark.parametrize(
    ("claims", "auth_time", "acr", "amr"),
    [
        ({"auth_time": 900}, 900.0, None, ()),
        ({}, 1000.0, None, ()),  # no auth_time: the callback time stands in
        ({"auth_time": "900"}, 1000.0, None, ()),
        ({"auth_time": True}, 1000.0, None, ()),
        ({"auth_time": None}, 1000.0, None, ()),
        ({"auth_time": -5}, 1000.0, None, ()),
        ({"auth_time": 5000}, 1000.0, None, ()),  # in the future: never fresher than the callback
        ({"auth_time": float("nan")}, 1000.0, None, ()),
        ({"auth_time": 900, "acr": "urn:mfa", "amr": ["pwd", "otp", 3]}, 900.0, "urn:mfa", ("pwd", "otp")),
        ({"acr": 7, "amr": "pwd"}, 1000.0, None, ()),
    ],
)
def test_session_fields(claims: dict[str, Any], auth_time: float, acr: str | None, amr: tuple[str, ...]) -> None:
    assert session_fields(claims, 1000.0) == {"auth_time": auth_time, "acr": acr, "amr": amr}


@pytest.mark.parametrize(
    ("claims", "ok"),
    [
        ({"auth_time": 1000}, True),
        ({"auth_time": 1000 - 60}, True),
        ({"auth_time": 1000 - 64}, True),  # within the leeway
        ({"auth_time": 1000 - 70}, False),
        ({"auth_time": 0}, False),
        ({}, False),  # OIDC Core 3.1.3.7: with max_age the ID token must carry auth_time
        ({"auth_time": "1000"}, False),
        ({"auth_time": None}, False),
        ({"auth_time": False}, False),
    ],
)
def test_callback_needs_recent_auth_time(claims: dict[str, Any], ok: bool) -> None:
    assert (callback_problem(claims, 60, 1000.0) is None) is ok


def test_session_record_keeps_auth_time_and_reads_older_formats() -> None:
    session = Session(
        identity=Identity(sub="s", user="u"),
        tokens=TokenSet(access_token="a", issued_at=50.0),
        created_at=100.0,
        signed_in_at=100.0,
        auth_time=90.0,
        acr="urn:mfa",
        amr=("pwd", "otp"),
    )
    again = Session.from_bytes(session.to_bytes(), 1, 0.0)
    assert (again.auth_time, again.acr, again.amr) == (90.0, "urn:mfa", ("pwd", "otp"))
    row = json.loads(session.to_bytes())
    for old in ([4, *row[1:17]], [3, *row[1:16]]):  # written before auth_time was kept
        read = Session.from_bytes(json.dumps(old).encode(), 1, 0.0)
        assert (read.auth_time, read.acr, read.amr) == (100.0, None, ())  # the sidecar's sign-in time
        assert read.identity == session.identity


# ------------------------------------------------------- over HTTP, Redis store


async def _status(client: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, dict[str, str]]:
    async with client.get(url, allow_redirects=False, **kw) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def _app_headers(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> dict[str, str]:
    async with client.get(url, headers={**JSON, **(headers or {})}) as resp:
        assert resp.status == 200
        headers: dict[str, str] = (await resp.json())["headers"]
        return headers


async def test_fresh_route_open_after_sign_in_closed_when_old_though_refreshed(redis_store: RedisStore) -> None:
    async with stack(redis_store, fresh_auth_route="1s=^/admin/", provider_kw={"access_token_ttl": 1}) as st:
        async with browser() as client:
            await sign_in(client, st.base)
            assert (await _status(client, f"{st.base}/admin/x", headers=JSON))[0] == 200
            await asyncio.sleep(2.2)
            # the access token expired meanwhile and is refreshed: the session lives on ...
            before = st.provider.token_calls["refresh_token"]
            assert (await _status(client, f"{st.base}/_demo/echo", headers=JSON))[0] == 200
            assert st.provider.token_calls["refresh_token"] > before
            # ... but a refresh is not a sign-in: the fresh route is closed, the RFC 9470 way
            for path in ("/admin/x", "/admin/", "//admin/x", "/admin/x?y=1"):
                status, headers = await _status(client, st.base + path, headers=JSON)
                assert status == 401, path
                assert headers["WWW-Authenticate"] == CHALLENGE_1
                assert "Set-Cookie" not in headers  # the session is not ended
            for method in ("POST", "DELETE"):
                async with client.request(method, f"{st.base}/admin/x") as resp:
                    assert resp.status == 401
            # browsers are sent to sign in with max_age, back to the page they asked for
            status, headers = await _status(client, f"{st.base}/admin/x?y=1", headers=HTML)
            assert status == 302
            location = urlsplit(headers["Location"])
            assert location.path == "/oauth2/start"
            assert parse_qs(location.query) == {"max_age": ["1"], "rd": ["/admin/x?y=1"]}
            # other routes keep working
            assert (await _status(client, f"{st.base}/public", headers=JSON))[0] == 200


async def test_browser_step_up_really_re_authenticates_and_lands_on_the_page(redis_store: RedisStore) -> None:
    async with stack(redis_store, fresh_auth_route="1s=^/admin/", provider_kw={"access_token_ttl": 1}) as st:
        st.provider.config(remember_logins=True)
        async with browser() as client:
            await sign_in(client, st.base)
            first = int((await _app_headers(client, f"{st.base}/_demo/echo"))["X-Auth-Request-Auth-Time"])
            # a second sign-in without max_age is answered from the provider's session: no new login
            await sign_in(client, st.base)
            assert st.provider.interactive_logins == 1
            await asyncio.sleep(2.2)
            async with client.get(f"{st.base}/admin/x?y=1", headers=HTML) as resp:
                assert resp.status == 200
                assert resp.url.path == "/admin/x" and resp.url.query_string == "y=1"
                hops = [str(h.url) for h in resp.history]
            assert any("max_age=1" in hop and "/authorize" in hop for hop in hops)
            assert st.provider.interactive_logins == 2  # the provider asked again
            fresh = int((await _app_headers(client, f"{st.base}/_demo/echo"))["X-Auth-Request-Auth-Time"])
            assert fresh > first


@pytest.mark.parametrize("misbehaviour", [{"honour_max_age": False}, {"send_auth_time": False}])
async def test_provider_that_ignores_max_age_gets_an_error_page(
    redis_store: RedisStore, misbehaviour: dict[str, bool]
) -> None:
    async with stack(redis_store, upstream="") as st:
        st.provider.config(remember_logins=True)
        async with browser() as client:
            await sign_in(client, st.base)
            assert (await _status(client, f"{st.base}/oauth2/auth"))[0] == 202
            st.provider.backdate_logins(120)  # the provider's login is two minutes old
            st.provider.config(**misbehaviour)
            async with client.get(f"{st.base}/oauth2/start?max_age=60&rd=/admin/", headers=HTML) as resp:
                body = await resp.text()
                assert resp.status == 403
                assert "Fresh sign-in not confirmed" in body
                assert "/oauth2/start" not in body  # no link that would go round again
                assert resp.url.path == "/oauth2/callback"
            # the old session is untouched
            assert (await _status(client, f"{st.base}/oauth2/auth"))[0] == 202


async def test_provider_that_honours_max_age_passes_the_same_flow(redis_store: RedisStore) -> None:
    async with stack(redis_store, upstream="") as st:
        st.provider.config(remember_logins=True)
        async with browser() as client:
            await sign_in(client, st.base)
            st.provider.backdate_logins(120)
            async with client.get(f"{st.base}/oauth2/start?max_age=60&rd=/oauth2/userinfo", headers=HTML) as resp:
                assert resp.status == 200
                assert resp.url.path == "/oauth2/userinfo"
            assert st.provider.interactive_logins == 2


@pytest.mark.parametrize("value", ["", "-1", "1.5", "x", "%EF%BC%91", "99999999999", "1&max_age=2"])
async def test_start_refuses_bad_max_age(value: str) -> None:
    async with stack(upstream="") as st, browser() as client:
        status, _ = await _status(client, f"{st.base}/oauth2/start?rd=/&max_age={value}")
        assert status == 400


@pytest.mark.parametrize(
    ("url", "max_age"),
    [
        ("/oauth2/start?rd=/admin/x", "30"),  # nginx's plain sign-in location: the route rule adds it
        ("/oauth2/start?rd=/admin/x&max_age=5", "5"),  # the stricter wins
        ("/oauth2/start?rd=/admin/x&max_age=600", "30"),
        ("/oauth2/start?rd=/home&max_age=600", "600"),
        ("/oauth2/start?rd=/home", None),
        ("/oauth2/start?rd=/admin/%2578", "30"),  # rd=/admin/%78: the path as the proxy reads it
    ],
)
async def test_start_sends_max_age_to_the_provider(url: str, max_age: str | None) -> None:
    async with stack(upstream="", fresh_auth_route="30=^/admin/") as st, browser() as client:
        status, headers = await _status(client, st.base + url)
        assert status == 302
        query = parse_qs(urlsplit(headers["Location"]).query)
        assert query.get("max_age") == (None if max_age is None else [max_age])


async def test_auth_endpoint_max_age_both_ways(redis_store: RedisStore) -> None:
    async with stack(redis_store, upstream="") as st, browser() as client:
        await sign_in(client, st.base)
        status, headers = await _status(client, f"{st.base}/oauth2/auth?max_age=60")
        assert status == 202
        assert abs(int(headers["X-Auth-Request-Auth-Time"]) - time.time()) < 5
        await asyncio.sleep(2.2)
        status, headers = await _status(client, f"{st.base}/oauth2/auth?max_age=1")
        assert (status, headers["WWW-Authenticate"]) == (401, CHALLENGE_1)
        status, headers = await _status(client, f"{st.base}/oauth2/auth?allowed_groups=admins&max_age=1")
        assert status == 401
        assert (await _status(client, f"{st.base}/oauth2/auth?allowed_groups=nobody&max_age=1"))[0] == 403
        assert (await _status(client, f"{st.base}/oauth2/auth?max_age=60"))[0] == 202
        assert (await _status(client, f"{st.base}/oauth2/auth?max_age=soon"))[0] == 403
        assert (await _status(client, f"{st.base}/oauth2/auth"))[0] == 202  # the session was not ended


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"X-Original-URI": "/admin/x"}, 401),
        ({"X-Original-URI": "/admin/x?a=b"}, 401),
        ({"X-Forwarded-Uri": "/admin/"}, 401),
        ({"X-Original-URL": "https://app.example.com/admin/x"}, 400),  # not what --front nginx sets: refused
        ({"X-Original-URI": "//admin/x"}, 401),
        ({"X-Original-URI": "/public/%2e%2e/admin/x"}, 401),  # a path the proxy refuses: the strictest rule
        ({"X-Original-URI": "/public/..;/admin/x"}, 401),
        ({"X-Original-URI": "/public/x"}, 202),
        ({"X-Original-URI": "/public/admin/"}, 202),
        ({}, 202),
    ],
)
async def test_auth_request_mode_matches_the_original_uri(
    redis_store: RedisStore, headers: dict[str, str], status: int
) -> None:
    async with stack(redis_store, upstream="", fresh_auth_route="1s=^/admin/", reverse_proxy="true") as st:
        async with browser() as client:
            await sign_in(client, st.base)
            assert (await _status(client, f"{st.base}/oauth2/auth", headers={"X-Original-URI": "/admin/x"}))[0] == 202
            await asyncio.sleep(2.2)
            got, answer = await _status(client, f"{st.base}/oauth2/auth", headers=headers)
            assert got == status
            if status == 401:
                assert answer["WWW-Authenticate"] == CHALLENGE_1


async def test_original_uri_from_an_untrusted_peer_is_not_read(redis_store: RedisStore) -> None:
    """Without --reverse-proxy nobody names the original URI: the auth-url's own max_age is the way."""
    async with stack(redis_store, upstream="", fresh_auth_route="1s=^/admin/") as st, browser() as client:
        await sign_in(client, st.base)
        await asyncio.sleep(2.2)
        status, _ = await _status(client, f"{st.base}/oauth2/auth", headers={"X-Original-URI": "/admin/x"})
        assert status == 202


SPOOFS = [
    "X-Auth-Request-Auth-Time",
    "x-auth-request-auth-time",
    "X_Auth_Request_Auth_Time",
    "X-AUTH-REQUEST-AUTH-TIME",
]


async def test_auth_time_header_is_the_sidecars_and_survives_refresh(redis_store: RedisStore) -> None:
    async with stack(redis_store, provider_kw={"access_token_ttl": 1}) as st, browser() as client:
        await sign_in(client, st.base)
        first = await _app_headers(client, f"{st.base}/_demo/echo", headers={**JSON, SPOOFS[0]: "1"})
        values = [v for k, v in first.items() if k.lower().replace("_", "-") == "x-auth-request-auth-time"]
        assert len(values) == 1 and abs(int(values[0]) - time.time()) < 5
        for spoof in SPOOFS:
            got = await _app_headers(client, f"{st.base}/_demo/echo", headers={**JSON, spoof: "1"})
            seen = [v for k, v in got.items() if k.lower().replace("_", "-") == "x-auth-request-auth-time"]
            assert seen == values, spoof
        await asyncio.sleep(2.2)
        before = st.provider.token_calls["refresh_token"]
        later = await _app_headers(client, f"{st.base}/_demo/echo")
        assert st.provider.token_calls["refresh_token"] > before  # refreshed ...
        assert later["X-Auth-Request-Auth-Time"] == values[0]  # ... and still the same sign-in


def test_challenge_value() -> None:
    assert challenge(1) == CHALLENGE_1


def test_staleness_is_judged_in_whole_seconds_like_auth_time() -> None:
    from sidecar.stepup import is_stale

    assert not is_stale(100, 1, 101.95)  # signed in during second 100: one whole second later
    assert is_stale(100, 1, 102.0)
    assert not is_stale(100.9, 0, 100.99) and is_stale(100.9, 0, 101.0)
