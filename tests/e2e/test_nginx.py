"""The shipped deploy/nginx/sidecar.conf, run by the distro's nginx in front of real processes.

nginx, the sidecar (``python -m sidecar``, Redis sessions), the development provider and the
demo app all run as separate processes on private ports, started once for this module. What
is proven here is what an operator copying the config relies on: sign-in through nginx,
the identity and token the app receives, a transparent refresh, sign-out, that no
identity header a client makes up ever reaches the app, that the app gets its own cookies but
never the sidecar's session or sign-in cookies, and that /oauth2/auth (which carries the
access token) answers only nginx's subrequests.

Every honest flow runs in real Chromium (tests/e2e/chromium.py): the person signs in on the
provider's login page, and the browser itself sets Accept, Origin, Referer, Sec-Fetch-* and
Cookie, including the app's own cookies (set by a page's script). Requests made by hand with
aiohttp are only hostile variants on top (spoofed identity headers, hand-written or forged Cookie
headers, direct hits on /oauth2/auth) or a program's API call, and say so where they are made.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import jwt
import pytest
import redis
import yaml
from playwright.async_api import Browser, Page
from yarl import URL

from sidecar.cookies import CookieCodec
from tests.e2e.chromium import fetch, new_page, submit_form, text, walk, watch
from tests.e2e.procs import (
    ROOT,
    Proc,
    child_env,
    free_ports,
    python_module,
    render_nginx_conf,
    start_nginx,
)
from tests.redis_procs import Proc as RedisProc
from tests.redis_procs import query
from tests.redis_procs import start_server as start_redis

# The session event loop: the run's one Chromium (the chromium_browser fixture) lives there.
pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]

ACCESS_TOKEN_TTL = 3  # seconds: short, so the refresh test waits only a few seconds
COOKIE = "_sidecar"
COOKIE_SECRET = "nginx-e2e-cookie-secret-0123456789"
HTML = {"Accept": "text/html,application/xhtml+xml"}  # only in hand-made (hostile) requests

# Everything a client might send to pass as someone else, in every spelling an app could read.
SPOOF = {
    "X-Auth-Request-User": "mallory",
    "X-Auth-Request-Email": "mallory@evil.example",
    "X-Auth-Request-Groups": "mallory-admins",
    "X-Auth-Request-Preferred-Username": "mallory",
    "X-Auth-Request-Access-Token": "mallory-token",
    "X-Forwarded-User": "mallory",
    "X-Forwarded-Email": "mallory@evil.example",
    "X-Forwarded-Groups": "mallory-admins",
    "X-Forwarded-Preferred-Username": "mallory",
    "X-Forwarded-Access-Token": "mallory-token",
    "X-User": "mallory",
    "X-Email": "mallory@evil.example",
    "Authorization": "Bearer mallory-forged",
    "X_Auth_Request_User": "mallory",
    "X_Auth_Request_Email": "mallory@evil.example",
    "X_Forwarded_User": "mallory",
}
IDENTITY = {
    "x-auth-request-user": "alice@example.com",
    "x-auth-request-email": "alice@example.com",
    "x-auth-request-groups": "admins,staff",
    "x-auth-request-preferred-username": "alice",
    "x-forwarded-user": "alice@example.com",
    "x-forwarded-email": "alice@example.com",
    "x-forwarded-groups": "admins,staff",
    "x-forwarded-preferred-username": "alice",
}


@dataclass(frozen=True)
class Site:
    base: str  # nginx, where the browser goes
    issuer: str  # the development provider
    sidecar: str
    app: str  # the demo app, directly
    redis: str  # the sidecar's session database
    logs: Path | None = None  # nginx's access and error logs, the processes' output


@pytest.fixture(scope="module")
def site(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from run_site(redis_server, tmp_path_factory)


def run_site(redis_server: str, tmp_path_factory: pytest.TempPathFactory, *extra_flags: str) -> Iterator[Site]:
    """The shipped sidecar.conf in real nginx, before the sidecar (these flags plus ``extra_flags``),
    the dev provider and the demo app, all as processes."""
    nginx_port, sidecar_port, provider_port, app_port, auth_port = free_ports(5)
    logs: Path = tmp_path_factory.mktemp("nginx-e2e")
    base, issuer = f"http://127.0.0.1:{nginx_port}", f"http://127.0.0.1:{provider_port}"
    # A database of our own on the shared server: other tests flush database 0 between tests.
    redis_url = redis_server.rsplit("/", 1)[0] + "/9"
    sidecar_flags = [
        f"--http-address=127.0.0.1:{sidecar_port}",
        f"--auth-address=127.0.0.1:{auth_port}",  # the shipped config sends the auth subrequests there
        f"--oidc-issuer-url={issuer}",
        "--client-id=sidecar-dev",
        "--client-secret=sidecar-dev-secret",
        f"--redirect-url={base}/oauth2/callback",
        f"--cookie-secret={COOKIE_SECRET}",
        "--cookie-secure=false",
        "--email-domain=*",
        "--session-store-type=redis",
        f"--redis-connection-url={redis_url}",
        "--reverse-proxy",
        "--trusted-proxy=127.0.0.1/32",  # nginx, as in the README: token headers go to it only
        "--pass-access-token",
        "--pass-authorization-header",
        "--refresh-skew=0s",
        "--workers=1",
        "--shutdown-timeout=2s",
        *extra_flags,
    ]
    procs: list[Proc] = []

    def launch(name: str, module: str, *args: str) -> Proc:
        procs.append(Proc(name, python_module(module, *args), log_dir=logs, env=child_env()))
        return procs[-1]

    try:
        # The three Python processes start side by side; the sidecar is ready once it has discovered the provider.
        # The provider shows its login page: the person in Chromium picks alice (no auto-login).
        provider = launch(
            "provider", "sidecar.dev.provider", f"--port={provider_port}", f"--access-token-ttl={ACCESS_TOKEN_TTL}"
        )
        app = launch("demo-app", "sidecar.dev.demo_app", f"--port={app_port}")
        sidecar = launch("sidecar", "sidecar", *sidecar_flags)
        provider.wait_http(issuer + "/.well-known/openid-configuration")
        app.wait_http(f"http://127.0.0.1:{app_port}/_demo/echo")
        sidecar.wait_http(f"http://127.0.0.1:{sidecar_port}/ready")  # Redis and the provider's discovery
        sidecar.wait_http(f"http://127.0.0.1:{auth_port}/oauth2/auth", expect=401)
        conf = render_nginx_conf(
            nginx_port, f"127.0.0.1:{sidecar_port}", f"127.0.0.1:{app_port}", auth=f"127.0.0.1:{auth_port}"
        )
        procs.append(start_nginx(conf, nginx_port, log_dir=logs))
        yield Site(
            base=base,
            issuer=issuer,
            sidecar=f"http://127.0.0.1:{sidecar_port}",
            app=f"http://127.0.0.1:{app_port}",
            redis=redis_url,
            logs=logs,
        )
    finally:
        for proc in reversed(procs):
            proc.stop()


# --------------------------------------------------------------------------
# The person in Chromium
# --------------------------------------------------------------------------


async def sign_in(page: Page, site: Site, path: str = "/_demo/echo", user: str = "alice") -> dict[str, Any]:
    """The person asks nginx for ``path`` in Chromium, is sent through /oauth2/start to the provider, picks
    ``user`` on its login page (unless the provider remembers them), and lands back on ``path``. Returns what
    the app answered there (the demo echo's JSON, header names lower-cased; ``{}`` for another page)."""
    target = site.base + path
    hops = watch(page, "")  # every navigation the browser makes, redirects included
    async with page.expect_response(lambda r: r.url == target and r.status == 200) as landing:
        await walk(page, target, lambda url, _body: url == target, user=user)
    assert hops[0] == target and hops[-1] == target, hops
    assert hops[1] == site.base + "/oauth2/start?rd=" + quote(path, safe=""), hops
    assert hops[2].startswith(site.issuer + "/authorize?"), hops
    assert urlsplit(hops[-2]).path == "/oauth2/callback" and hops[-2].startswith(site.base), hops
    response = await landing.value
    if not path.startswith("/_demo/echo"):
        return {}
    return lowered(await response.json())


def lowered(data: dict[str, Any]) -> dict[str, Any]:
    data["headers"] = {k.lower(): v for k, v in data["headers"].items()}
    return data


async def echo(page: Page, base: str, path: str = "/_demo/echo") -> dict[str, Any]:
    """What the app received when the browser opened ``path`` through ``base``: served at once, no redirect."""
    response = await page.goto(base + path, wait_until="load")
    assert response is not None and response.status == 200, (page.url, response and response.status)
    assert response.request.redirected_from is None, page.url
    return lowered(await response.json())


async def session_cookie(page: Page, site: Site) -> str | None:
    """The session cookie in the browser's own jar."""
    return next((c["value"] for c in await page.context.cookies(site.base) if c["name"] == COOKIE), None)


def store_key(cookie_value: str) -> str:
    """The Redis key of the session a cookie names (the sidecar's own cookie format, verified)."""
    return "sc:s:" + CookieCodec((COOKIE_SECRET.encode(),), 3600).load_session(cookie_value, time.time()).store_key


def in_redis(site: Site, key: str) -> bool:
    client = redis.Redis.from_url(site.redis, socket_timeout=2)
    try:
        return bool(client.exists(key))
    finally:
        client.close()


async def provider_json(site: Site, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client, client.get(site.issuer + path) as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def verified_claims(site: Site, token: str) -> dict[str, Any]:
    """The access token's claims, checked against the provider's published keys: a real token."""
    discovery = await provider_json(site, "/.well-known/openid-configuration")
    jwks = await provider_json(site, urlsplit(discovery["jwks_uri"]).path)
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwt.PyJWKSet.from_dict(jwks).keys if k.key_id == kid)
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["RS256"], issuer=site.issuer, audience="sidecar-dev"
    )
    return claims


async def token_calls(site: Site) -> dict[str, int]:
    calls: dict[str, int] = (await provider_json(site, "/_control/stats"))["token_calls"]
    return calls


async def test_unauthenticated_browser_is_sent_to_sign_in_with_the_original_uri(
    chromium_browser: Browser, site: Site
) -> None:
    original = "/_demo/echo?a=1&b=x%26y&c=d+e"  # &, an escaped & and + must all survive the trip
    async with new_page(chromium_browser) as page:
        for path in (original, "/"):
            hops = watch(page, "")
            await page.goto(site.base + path, wait_until="load")
            assert hops[1] == site.base + "/oauth2/start?rd=" + quote(path, safe=""), hops
            assert parse_qs(urlsplit(hops[1]).query) == {"rd": [path]}
            # ... and on to the provider, whose login page now asks who signs in.
            assert page.url.startswith(site.issuer + "/authorize?"), page.url
            assert await page.locator("button[name='user'][value='alice']").count() == 1

        # A form the page posts, and the page's own fetch(), are told 401, never sent to a login page.
        await page.goto(site.base + "/public/page", wait_until="load")
        posted = await submit_form(page, site.base + "/_demo/echo", {"x": "x" * 100_000})
        assert posted.status == 401 and posted.request.redirected_from is None
        status, headers, _ = await fetch(page, site.base + "/_demo/echo")
        assert status == 401 and "location" not in headers
        assert headers["www-authenticate"].startswith("Cookie")

        # The sidecar's own endpoints never answer in the app's place.
        for path in ("/metrics", "/ping", "/ready/", "/%6Detrics", "//ping"):
            response = await page.goto(site.base + path, wait_until="load")
            assert page.url == site.base + path  # sent as written, nowhere else
            assert response is not None and response.status == 401, path
            assert response.request.redirected_from is None, path
            assert "sidecar_" not in await response.text()

    # A program (aiohttp's own headers, no Accept: text/html) gets the 401 and the challenge too.
    async with aiohttp.ClientSession() as client, client.get(site.base + "/", allow_redirects=False) as resp:
        assert resp.status == 401 and "Location" not in resp.headers
        assert resp.headers["WWW-Authenticate"].startswith("Cookie")
    # Hostile, by hand: the token-bearing auth endpoint is nginx's alone, whatever the request claims to be.
    async with aiohttp.ClientSession() as client:
        for headers in ({}, HTML, {"Sec-Fetch-Mode": "navigate", **HTML}):
            async with client.get(site.base + "/oauth2/auth", headers=headers, allow_redirects=False) as resp:
                assert resp.status == 404


async def test_sign_in_through_nginx_hands_identity_and_token_to_the_app(chromium_browser: Browser, site: Site) -> None:
    before = await token_calls(site)
    logins = await interactive_logins(site)
    async with new_page(chromium_browser) as page:
        landed = await sign_in(page, site, "/_demo/echo?a=1&b=x%26y")
        assert landed["query"] == {"a": ["1"], "b": ["x&y"]}
        assert (await token_calls(site))["authorization_code"] == before["authorization_code"] + 1
        assert await interactive_logins(site) == logins + 1  # the person signed in on the login page

        seen = (await echo(page, site.base))["headers"]
    assert seen["sec-fetch-mode"] == "navigate"  # Chromium's own request reached the app
    for name, value in IDENTITY.items():
        assert seen.get(name) == value, name
    token = seen["x-auth-request-access-token"]
    assert seen["x-forwarded-access-token"] == token
    assert seen["authorization"] == "Bearer " + token
    claims = await verified_claims(site, token)
    assert claims["client_id"] == "sidecar-dev" and claims["exp"] > time.time()
    assert "x-user" not in seen and "x-email" not in seen
    assert COOKIE not in seen.get("cookie", "")


async def test_expired_access_token_is_refreshed_without_signing_in_again(
    chromium_browser: Browser, site: Site
) -> None:
    async with new_page(chromium_browser) as page:
        first = (await sign_in(page, site))["headers"]["x-auth-request-access-token"]
        signed_in_cookie = await session_cookie(page, site)
        assert signed_in_cookie
        calls = await token_calls(site)
        expires = jwt.decode(first, options={"verify_signature": False})["exp"]
        await asyncio.sleep(max(0.0, expires - time.time()) + 1.0)

        seen = (await echo(page, site.base))["headers"]  # 200 straight away: no redirect to sign in
        after = await token_calls(site)
        second = seen["x-auth-request-access-token"]
        assert second != first
        assert seen["authorization"] == "Bearer " + second
        assert (await verified_claims(site, second))["exp"] > time.time()
        assert seen["x-auth-request-user"] == "alice@example.com"
        assert after["authorization_code"] == calls["authorization_code"]  # no sign-in in between
        assert after["refresh_token"] == calls["refresh_token"] + 1  # exactly one call to the provider
        # The refresh changed only the server-side record: the browser's cookie is the same, still valid.
        assert await session_cookie(page, site) == signed_in_cookie
        assert (await echo(page, site.base))["headers"]["x-auth-request-access-token"] == second
    assert (await token_calls(site))["refresh_token"] == after["refresh_token"]


async def test_sign_out_through_nginx_ends_the_session(chromium_browser: Browser, site: Site) -> None:
    async with new_page(chromium_browser) as page:
        await sign_in(page, site)
        old = await session_cookie(page, site)
        assert old
        key = store_key(old)
        assert in_redis(site, key)

        hops = watch(page, "")
        await page.goto(site.base + "/oauth2/sign_out", wait_until="load")
        # Through the provider's end-session page and back to nginx, port included (X-Forwarded-Host is
        # the Host header as sent when it names $host).
        end_session = next(urlsplit(h) for h in hops if h.startswith(site.issuer))
        assert parse_qs(end_session.query)["post_logout_redirect_uri"] == [site.base + "/oauth2/signed_out"]
        assert page.url.startswith(site.base + "/oauth2/signed_out"), page.url
        assert await session_cookie(page, site) is None
        assert not in_redis(site, key)  # ended server-side, not just forgotten by this browser

        await page.goto(site.base + "/_demo/echo", wait_until="load")  # sent to sign in again
        assert page.url.startswith(site.issuer + "/authorize?"), page.url
    # Hostile, by hand: the old cookie replayed is worthless now.
    async with aiohttp.ClientSession() as client:
        headers = {"Cookie": f"{COOKIE}={old}", **HTML}
        async with client.get(site.base + "/_demo/echo", headers=headers, allow_redirects=False) as resp:
            assert resp.status == 302
        async with client.get(site.base + "/oauth2/userinfo", headers={"Cookie": f"{COOKIE}={old}"}) as resp:
            assert resp.status == 401


async def test_spoofed_identity_headers_never_reach_the_app(chromium_browser: Browser, site: Site) -> None:
    """Hostile: a browser (an extension, a proxy on the person's side) adds made-up identity headers to every
    request, and a program sends them by hand."""
    async with new_page(chromium_browser) as page:
        await page.set_extra_http_headers(SPOOF)
        # Not signed in: made-up headers sign nobody in.
        await page.goto(site.base + "/_demo/echo", wait_until="load")
        assert page.url.startswith(site.issuer + "/authorize?"), page.url
        async with aiohttp.ClientSession() as client:
            async with client.get(site.base + "/_demo/echo", headers=SPOOF, allow_redirects=False) as resp:
                assert resp.status == 401

        # Signed in: the app sees the sidecar's values, never the client's.
        await sign_in(page, site)
        seen = (await echo(page, site.base))["headers"]
        for name, value in IDENTITY.items():
            assert seen.get(name) == value, name
        assert seen["authorization"] == "Bearer " + seen["x-auth-request-access-token"]
        assert "mallory" not in repr(seen)
        assert not [name for name in seen if "_" in name]  # underscore spellings are dropped
        assert "x-user" not in seen and "x-email" not in seen

        # A public path (no auth_request) gets no identity at all, signed in or not.
        response = await page.goto(site.base + "/public/page", wait_until="load")
        assert response is not None and response.status == 200
        pages = [await response.text()]
    async with aiohttp.ClientSession() as stranger:
        async with stranger.get(site.base + "/public/page", headers=SPOOF, allow_redirects=False) as resp:
            assert resp.status == 200
            pages.append(await resp.text())
    for page_html in pages:
        assert "mallo" not in page_html  # (the demo page shows only the first 12 characters of a token)
        assert page_html.count("(absent)") == 10  # its 8 identity headers, Authorization, X-Forwarded-Access-Token


# --------------------------------------------------------------------------
# The sidecar's cookies stay between the browser, nginx and the sidecar
# --------------------------------------------------------------------------

# The application's own cookies, among them names that merely contain, start or end like the
# sidecar's, and a value that looks like one: all of them must reach the application.
APP_COOKIES = (
    "a=1",
    "b=2",
    "my_sidecar=1",
    "x_sidecarish=2",
    "_sidecarish=3",
    "_sidecar-x=4",
    "_Sidecar=5",
    "sidecar=6",
    "c=_sidecar=7",
    "sidecar_=8",
)
# Sign-in state cookies and anything else named "_sidecar_*": the application never sees them.
OTHER_SIDECAR_COOKIES = (
    "_sidecar_csrf_ab=1",
    "_sidecar_csrf_0123456789abcdef=InN0YXRlIg.Zx.sig",
    "_sidecar_x=",
    "_sidecar_=z",
)


def is_sidecar_cookie(pair: str) -> bool:
    name = pair.split("=", 1)[0].strip()
    return name == COOKIE or name.startswith(COOKIE + "_")


def app_cookie_pairs(header: str | None) -> list[str]:
    """The cookies of a Cookie header the application received, in order, as sent."""
    return [part.strip() for part in (header or "").split(";") if part.strip()]


async def browser_with_app_cookies(page: Page, site: Site) -> str:
    """A person's real cookie jar: signed in, the app's own cookies set by a script of the app's page, and a
    sign-in abandoned in another tab (its attempt cookie, ``_sidecar_csrf_*``, still in the jar). Returns the
    session cookie; Chromium sends them all, in its own order (oldest first), to every page of 127.0.0.1."""
    await sign_in(page, site)
    await page.goto(site.base + "/public/page", wait_until="load")
    await page.evaluate("pairs => { for (const p of pairs) document.cookie = p + '; path=/'; }", list(APP_COOKIES))
    names = {pair.split("=", 1)[0] for pair in APP_COOKIES}
    for _ in range(100):  # document.cookie reaches the browser's network cookie store a moment later
        if names <= {c["name"] for c in await page.context.cookies(site.base)}:
            break
        await asyncio.sleep(0.02)
    tab = await page.context.new_page()
    await tab.goto(site.base + "/oauth2/start?rd=%2Felsewhere", wait_until="load")  # left on the login page
    assert tab.url.startswith(site.issuer + "/authorize?"), tab.url
    await tab.close()
    jar = {c["name"]: c for c in await page.context.cookies(site.base + "/_demo/echo")}
    pending = [name for name in jar if name.startswith(COOKIE + "_csrf_")]
    assert pending and jar[pending[0]]["path"] == "/", jar  # sent with every page, like the session
    assert all(pair.split("=", 1)[0] in jar for pair in APP_COOKIES), jar
    return str(jar[COOKIE]["value"])


async def test_the_browsers_own_cookies_reach_the_app_without_the_sidecars(
    chromium_browser: Browser, site: Site
) -> None:
    async with new_page(chromium_browser) as page:
        session = await browser_with_app_cookies(page, site)
        seen = (await echo(page, site.base))["headers"]
        assert seen["x-auth-request-user"] == "alice@example.com"
        assert app_cookie_pairs(seen.get("cookie")) == list(APP_COOKIES)
        assert session not in repr(seen) and COOKIE + "_csrf_" not in repr(seen)

        # A public page gets the app's cookies the same way (the demo page lists its request headers).
        response = await page.goto(site.base + "/public/page", wait_until="load")
        assert response is not None and response.status == 200
        assert app_cookie_pairs(public_page_cookie(await response.text())) == list(APP_COOKIES)
        assert session not in await response.text()

        # The sidecar's own endpoints do get the session cookie among the others.
        await page.goto(site.base + "/oauth2/userinfo", wait_until="load")
        assert json.loads(await text(page))["email"] == "alice@example.com"


def public_page_cookie(page_html: str) -> str | None:
    """The Cookie header the demo page says it got (it lists its request headers, escaped, one table row each)."""
    row = re.search(r"<tr><th>Cookie</th><td><code>(.*?)</code></td></tr>", page_html)
    return html.unescape(row.group(1)) if row else None


async def signed_in_cookie(chromium_browser: Browser, site: Site) -> str:
    """A session cookie from a sign-in in Chromium, for the hostile hand-made requests that follow."""
    async with new_page(chromium_browser) as page:
        await sign_in(page, site)
        value = await session_cookie(page, site)
    assert value
    return value


async def cookies_seen(site: Site, header: str, path: str = "/_demo/echo") -> str | None:
    """The Cookie header the application got for a request with exactly ``header``, sent by a
    client without a cookie jar. The request must pass the auth check: the sidecar did get the
    session cookie in the auth subrequest."""
    async with aiohttp.ClientSession() as client:
        async with client.get(site.base + path, headers={"Cookie": header}, allow_redirects=False) as resp:
            assert resp.status == 200, (header, resp.status, resp.headers.get("Location"))
            data: dict[str, Any] = await resp.json()
    seen: dict[str, str] = {k.lower(): v for k, v in data["headers"].items()}
    assert seen.get("x-auth-request-user") == "alice@example.com", header
    return seen.get("cookie")


def cookie_cases(session: str) -> list[tuple[str, list[str]]]:
    """(Cookie header, the cookies the application must get) for a family of orderings and spacings no
    browser sends, and forged sidecar cookies around a real session: hand-made, hostile."""
    s = f"{COOKIE}={session}"
    cases = [
        (f"a=1; {s}; b=2", ["a=1", "b=2"]),
        (f"{s}; a=1", ["a=1"]),
        (f"a=1; {s}", ["a=1"]),
        (f"_sidecar_csrf_ab=1; a=1; {s}; c=3", ["a=1", "c=3"]),
        (f"my_sidecar=1; {s}; x_sidecarish=2", ["my_sidecar=1", "x_sidecarish=2"]),
        (f"a=1;{s};b=2", ["a=1", "b=2"]),
        (f"a=1;   {s}  ;b=2", ["a=1", "b=2"]),
        (f"{s}; _sidecar_csrf_ab=1; _sidecar_csrf_cd=2; z=9", ["z=9"]),
    ]
    # Every order of four cookies, two of them the sidecar's.
    for order in itertools.permutations(["a=1", s, "_sidecar_csrf_ab=1", "my_sidecar=1"]):
        cases.append(("; ".join(order), [c for c in order if not is_sidecar_cookie(c)]))
    # Random mixes: up to six application cookies, the session and up to four other sidecar
    # cookies in any position, with the separators browsers and hand-written clients use.
    rng = random.Random(13)
    for _ in range(40):
        mix = [*rng.sample(APP_COOKIES, rng.randint(0, 6)), s]
        mix += rng.sample(OTHER_SIDECAR_COOKIES, rng.randint(0, 4))
        rng.shuffle(mix)
        cases.append((rng.choice(["; ", ";", "; ", ";  "]).join(mix), [c for c in mix if not is_sidecar_cookie(c)]))
    return cases


async def test_hand_made_cookie_headers_give_the_app_its_own_cookies_only(
    chromium_browser: Browser, site: Site
) -> None:
    """Hostile: hand-written Cookie headers (every order, odd spacing, forged sidecar cookies) around a real session."""
    session = await signed_in_cookie(chromium_browser, site)
    for header, expected in cookie_cases(session):
        seen = await cookies_seen(site, header)
        assert app_cookie_pairs(seen) == expected, header
        assert session not in (seen or ""), header
        if not expected:
            assert seen is None, header  # no empty Cookie header either


async def test_more_sidecar_cookies_than_the_config_handles_fail_closed(chromium_browser: Browser, site: Site) -> None:
    """Hostile: more forged sidecar cookies than the config strips, around a real session."""
    session = await signed_in_cookie(chromium_browser, site)
    # Eight sidecar cookies, each between application cookies, are still handled exactly ...
    sidecar_ones = [f"{COOKIE}={session}", *(f"{COOKIE}_csrf_{i:02x}={i}" for i in range(7))]
    header = "; ".join(f"{c}; app{i}={i}" for i, c in enumerate(sidecar_ones))
    assert app_cookie_pairs(await cookies_seen(site, header)) == [f"app{i}={i}" for i in range(8)]
    # ... and beyond that the application gets no cookies at all rather than the session.
    for extra in (1, 5, 30):
        more = [*sidecar_ones, *(f"{COOKIE}_csrf_x{i}={i}" for i in range(extra))]
        for chosen in (more, list(reversed(more))):
            header = "; ".join(f"{c}; app{i}={i}" for i, c in enumerate(chosen))
            assert await cookies_seen(site, header) is None, header


async def test_public_paths_get_the_apps_cookies_without_the_sidecars(chromium_browser: Browser, site: Site) -> None:
    """Hostile: hand-written Cookie headers on a public path (the browser's own case is above)."""
    session = await signed_in_cookie(chromium_browser, site)
    for header, expected in cookie_cases(session)[:12]:
        async with aiohttp.ClientSession() as client:
            async with client.get(site.base + "/public/page", headers={"Cookie": header}) as resp:
                assert resp.status == 200
                page = await resp.text()
        assert app_cookie_pairs(public_page_cookie(page)) == expected, header
        assert session not in page, header


async def test_the_sign_in_endpoints_still_get_the_sidecars_cookies(chromium_browser: Browser, site: Site) -> None:
    """Hand-made Cookie headers: /oauth2/userinfo answers from the session wherever the cookie sits."""
    session = await signed_in_cookie(chromium_browser, site)
    for header in (f"a=1; {COOKIE}={session}; b=2", f"{COOKIE}={session}", f"my_sidecar=1; {COOKIE}={session}"):
        async with aiohttp.ClientSession() as client:
            async with client.get(site.base + "/oauth2/userinfo", headers={"Cookie": header}) as resp:
                assert resp.status == 200, header
                assert (await resp.json())["email"] == "alice@example.com"


# Ways to spell /oauth2/auth that nginx normalises, or that reach the sidecar's other routes.
AUTH_PATHS = (
    "/oauth2/auth",
    "/oauth2/auth?x=1",
    "/oauth2/auth/",
    "//oauth2/auth",
    "/oauth2//auth",
    "/oauth2/./auth",
    "/oauth2/x/../auth",
    "/oauth2/%61uth",
    "/oauth2%2Fauth",
    "/oauth2/auth%2F",
    "/oauth2/auth;x",
    "/OAUTH2/AUTH",
)
TOKEN_RESPONSE_HEADERS = ("X-Auth-Request-Access-Token", "Authorization", "X-Auth-Request-User", "X-Forwarded-User")


async def test_the_auth_endpoint_is_not_reachable_from_outside_even_signed_in(
    chromium_browser: Browser, site: Site
) -> None:
    """Hostile, by hand: direct hits on /oauth2/auth in every spelling, with a real session cookie."""
    session = await signed_in_cookie(chromium_browser, site)
    headers = {"Cookie": f"{COOKIE}={session}", "Accept": "*/*"}
    async with aiohttp.ClientSession() as client:
        for path in AUTH_PATHS:
            for method in ("GET", "HEAD", "POST"):
                url = URL(site.base + path, encoded=True)  # sent exactly as written
                async with client.request(method, url, headers=headers, allow_redirects=False) as resp:
                    await resp.read()
                    where = (method, path, resp.status)
                    assert resp.status != 202, where
                    assert not [h for h in TOKEN_RESPONSE_HEADERS if h in resp.headers], where
                    if path.startswith("/oauth2/auth") and path[len("/oauth2/auth") :] in ("", "?x=1"):
                        assert resp.status == 404, where


# --------------------------------------------------------------------------
# The opt-in ingress-nginx snippet (deploy/kubernetes/components/strip-session-cookie)
# --------------------------------------------------------------------------

SNIPPET_PATCH = ROOT / "deploy" / "kubernetes" / "components" / "strip-session-cookie" / "snippet-patch.yaml"


def ingress_nginx_like_conf(port: int, site: Site, snippet: str) -> str:
    """A server shaped like what ingress-nginx generates for an Ingress with auth-url,
    auth-response-headers and a configuration-snippet: an internal location proxying to the
    auth URL, auth_request_set/proxy_set_header pairs, the snippet inside the location."""
    indented = "\n".join("        " + line for line in snippet.splitlines())
    return f"""
server {{
    listen 127.0.0.1:{port};
    location = /_external-auth-Lw-Prefix {{
        internal;
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Original-URL $scheme://$http_host$request_uri;
        proxy_set_header X-Original-Method $request_method;
        proxy_pass {site.sidecar}/oauth2/auth;
    }}
    location / {{
        set $proxy_upstream_name "sidecar-demo-demo-app-http";
        auth_request /_external-auth-Lw-Prefix;
        auth_request_set $auth_cookie $upstream_http_set_cookie;
        auth_request_set $authHeader0 $upstream_http_x_auth_request_user;
        proxy_set_header 'X-Auth-Request-User' $authHeader0;
        auth_request_set $authHeader1 $upstream_http_x_auth_request_access_token;
        proxy_set_header 'X-Auth-Request-Access-Token' $authHeader1;
{indented}
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_pass {site.app};
    }}
}}
"""


@pytest.fixture(scope="module")
def ingress_like(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The component's snippet, as shipped, in an ingress-nginx-shaped server of its own."""
    patch = yaml.safe_load(SNIPPET_PATCH.read_text())
    snippet = patch["metadata"]["annotations"]["nginx.ingress.kubernetes.io/configuration-snippet"]
    (port,) = free_ports(1)
    proc = start_nginx(
        ingress_nginx_like_conf(port, site, snippet), port, log_dir=tmp_path_factory.mktemp("ingress-like")
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


async def test_the_ingress_nginx_snippet_strips_the_same_cookies(
    chromium_browser: Browser, site: Site, ingress_like: str
) -> None:
    async with new_page(chromium_browser) as page:
        session = await browser_with_app_cookies(page, site)
        # The same browser on the ingress-shaped front (cookies belong to the host, not the port).
        seen = (await echo(page, ingress_like))["headers"]
        assert seen.get("x-auth-request-user") == "alice@example.com"
        assert seen.get("x-auth-request-access-token", "").startswith("eyJ")
        assert app_cookie_pairs(seen.get("cookie")) == list(APP_COOKIES)
        assert session not in repr(seen) and COOKIE + "_csrf_" not in repr(seen)
    # Hostile, by hand: every hand-written ordering and forged sidecar cookie around the real session.
    for header, expected in cookie_cases(session):
        async with aiohttp.ClientSession() as client:
            async with client.get(ingress_like + "/_demo/echo", headers={"Cookie": header}) as resp:
                assert resp.status == 200, (header, resp.status)
                seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
        # The auth subrequest still got the session (202, with the identity and the token) ...
        assert seen.get("x-auth-request-user") == "alice@example.com", header
        assert seen.get("x-auth-request-access-token", "").startswith("eyJ"), header
        # ... and the application only its own cookies.
        assert app_cookie_pairs(seen.get("cookie")) == expected, header
        if not expected:
            assert "cookie" not in seen, header
    # Beyond eight interleaved sidecar cookies: no Cookie header at all.
    many = "; ".join(f"{COOKIE}_csrf_{i}={i}; app{i}={i}" for i in range(9)) + f"; {COOKIE}={session}"
    async with aiohttp.ClientSession() as client:
        async with client.get(ingress_like + "/_demo/echo", headers={"Cookie": many}) as resp:
            assert resp.status == 200
            assert "cookie" not in {k.lower() for k in (await resp.json())["headers"]}


INGRESS = ROOT / "deploy" / "kubernetes" / "overlays" / "ingress-nginx" / "ingress.yaml"


def ingress_nginx_default_conf(port: int, site: Site) -> str:
    """What ingress-nginx generates for the shipped Ingress (no snippet): one auth_request_set and
    proxy_set_header pair per name in its auth-response-headers annotation, as its template does."""
    app_ingress = next(d for d in yaml.safe_load_all(INGRESS.read_text()) if d["metadata"]["name"] == "demo-app")
    names = app_ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/auth-response-headers"].split(",")
    pairs = "\n".join(
        f"        auth_request_set $authHeader{i} $upstream_http_{n.strip().lower().replace('-', '_')};\n"
        f"        proxy_set_header '{n.strip()}' $authHeader{i};"
        for i, n in enumerate(names)
    )
    return ingress_nginx_like_conf(port, site, "").replace(
        "        auth_request_set $authHeader0 $upstream_http_x_auth_request_user;\n"
        "        proxy_set_header 'X-Auth-Request-User' $authHeader0;\n"
        "        auth_request_set $authHeader1 $upstream_http_x_auth_request_access_token;\n"
        "        proxy_set_header 'X-Auth-Request-Access-Token' $authHeader1;\n",
        pairs + "\n",
    )


@pytest.fixture(scope="module")
def ingress_default(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    (port,) = free_ports(1)
    conf = ingress_nginx_default_conf(port, site)
    assert "'Cookie' $authHeader" in conf  # the shipped annotation asks for the sidecar's Cookie answer
    proc = start_nginx(conf, port, log_dir=tmp_path_factory.mktemp("ingress-default"))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


async def test_the_shipped_ingress_keeps_the_session_cookie_from_the_app_without_snippets(
    chromium_browser: Browser, site: Site, ingress_default: str
) -> None:
    """/oauth2/auth answers a trusted front with the app's cookies minus the sidecar's, and the
    Ingress's auth-response-headers puts exactly that on the request to the app."""
    async with new_page(chromium_browser) as page:
        session = await browser_with_app_cookies(page, site)
        seen = (await echo(page, ingress_default))["headers"]
        assert seen.get("x-auth-request-user") == "alice@example.com"
        assert app_cookie_pairs(seen.get("cookie")) == list(APP_COOKIES)
        assert session not in repr(seen) and COOKIE + "_csrf_" not in repr(seen)
    # Hostile, by hand: hand-written orderings, forged sidecar cookies, more than the snippet would handle.
    many = "; ".join(f"{COOKIE}_csrf_{i}={i}; app{i}={i}" for i in range(9)) + f"; {COOKIE}={session}"
    cases = [*cookie_cases(session), (many, [f"app{i}={i}" for i in range(9)])]
    for header, expected in cases:
        async with aiohttp.ClientSession() as client:
            async with client.get(ingress_default + "/_demo/echo", headers={"Cookie": header}) as resp:
                assert resp.status == 200, (header, resp.status)
                seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
        assert seen.get("x-auth-request-user") == "alice@example.com", header
        assert app_cookie_pairs(seen.get("cookie")) == expected, header
        assert session not in str(seen), header


# --------------------------------------------------------------------------
# A sidecar that cannot decide: 503 with Retry-After, not nginx's bare 500
# --------------------------------------------------------------------------


@dataclass
class Outage:
    base: str  # nginx with the shipped config, in front of a sidecar with a Redis of its own
    redis: RedisProc
    redis_dir: Path
    sidecar: str


@pytest.fixture(scope="module")
def outage(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    """A second sidecar (same provider and app as ``site``) whose Redis the test may stop."""
    nginx_port, sidecar_port, redis_port, auth_port = free_ports(4)
    logs: Path = tmp_path_factory.mktemp("nginx-outage")
    redis_dir = logs / "redis"
    base = f"http://127.0.0.1:{nginx_port}"
    holder = [start_redis("outage-redis", redis_dir, redis_port)]
    flags = [
        f"--http-address=127.0.0.1:{sidecar_port}",
        f"--auth-address=127.0.0.1:{auth_port}",
        f"--oidc-issuer-url={site.issuer}",
        "--client-id=sidecar-dev",
        "--client-secret=sidecar-dev-secret",
        f"--redirect-url={base}/oauth2/callback",
        "--cookie-secret=nginx-outage-cookie-secret-0123456789",
        "--cookie-secure=false",
        "--email-domain=*",
        "--session-store-type=redis",
        f"--redis-connection-url=redis://127.0.0.1:{redis_port}/0",
        "--reverse-proxy",
        "--trusted-proxy=127.0.0.1/32",
        "--session-cache-ttl=0s",  # every request asks Redis, so stopping it is felt at once
        "--workers=1",
        "--shutdown-timeout=2s",
    ]
    procs = [Proc("outage-sidecar", python_module("sidecar", *flags), log_dir=logs, env=child_env())]
    try:
        procs[0].wait_http(f"http://127.0.0.1:{sidecar_port}/ready")
        procs[0].wait_http(f"http://127.0.0.1:{auth_port}/oauth2/auth", expect=401)
        conf = render_nginx_conf(
            nginx_port, f"127.0.0.1:{sidecar_port}", urlsplit(site.app).netloc, auth=f"127.0.0.1:{auth_port}"
        )
        procs.append(start_nginx(conf, nginx_port, log_dir=logs))
        made = Outage(base, holder[0], redis_dir, f"http://127.0.0.1:{sidecar_port}")
        yield made
        holder.append(made.redis)  # the test may have started a new one in its place
    finally:
        for proc in reversed(procs):
            proc.stop()
        for redis in holder:
            redis.stop()


# The requests of a person during an outage, all made by Chromium from a page of the site: two page
# loads, the page's own fetch() calls (JSON, HEAD, DELETE) and a form the page posts.
OUTAGE_REQUESTS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("page", "GET", "/_demo/echo", {}),
    ("page", "GET", "/some/page?a=1&b=2", {}),
    ("fetch", "GET", "/_demo/echo", {"Accept": "application/json"}),
    ("fetch", "HEAD", "/", {}),
    ("form", "POST", "/_demo/echo", {}),
    ("fetch", "DELETE", "/api/thing/1", {}),
)


async def statuses_during(page: Page, base: str) -> list[tuple[str, str, int, str | None, str]]:
    """(method, path, status, Retry-After, body) for each of OUTAGE_REQUESTS through nginx at ``base``."""
    seen = []
    await page.goto(base + "/public/page", wait_until="load")  # a page of the site (public: no auth subrequest)
    for kind, method, path, headers in OUTAGE_REQUESTS:
        if kind == "fetch":
            status, answer, body = await fetch(page, base + path, method, headers)
        else:
            if kind == "page":
                response = await page.goto(base + path, wait_until="load")
                assert response is not None
            else:
                response = await submit_form(page, base + path, {"x": "1"})
            assert response.request.redirected_from is None, (method, path, page.url)
            status, answer, body = response.status, await response.all_headers(), await response.text()
        seen.append((method, path, status, answer.get("retry-after"), body))
    return seen


async def test_a_redis_outage_gives_503_with_retry_after_and_the_session_survives(
    chromium_browser: Browser, site: Site, outage: Outage
) -> None:
    async with new_page(chromium_browser) as page:
        await sign_in(page, Site(outage.base, site.issuer, outage.sidecar, site.app, ""))
        session = next(c["value"] for c in await page.context.cookies(outage.base) if c["name"] == COOKIE)
        assert {s for _, _, s, _, _ in await statuses_during(page, outage.base)} == {200}
        # What the sidecar itself says while Redis is down, so nginx's answer can be compared with it.
        query(outage.redis.port, lambda c: c.save())
        outage.redis.stop()
        try:
            # By hand, straight to the sidecar (not a browser flow): its own Retry-After.
            async with aiohttp.ClientSession() as client:
                headers = {"Cookie": f"a=1; {COOKIE}={session}"}
                async with client.get(outage.sidecar + "/oauth2/auth", headers=headers) as resp:
                    assert resp.status == 503
                    sidecar_retry = resp.headers["Retry-After"]
            for method, path, status, retry, body in await statuses_during(page, outage.base):
                assert status == 503, (method, path, status, body)
                assert retry == sidecar_retry, (method, path)  # the sidecar's own value, passed on
                if method != "HEAD":
                    assert "unavailable" in body and session not in body, (method, path)
        finally:
            # Back with the saved data: the same cookie works again, nobody was signed out.
            outage.redis = start_redis("outage-redis", outage.redis_dir, outage.redis.port)
        assert {s for _, _, s, _, _ in await statuses_during(page, outage.base)} == {200}
        assert next(c["value"] for c in await page.context.cookies(outage.base) if c["name"] == COOKIE) == session


@pytest.mark.parametrize("kind", ["sidecar-down", "not-a-sidecar"])
async def test_an_unreachable_sidecar_is_503_and_other_failures_stay_500(
    chromium_browser: Browser, site: Site, kind: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Nothing listening where the sidecar should be (nginx's own 502 for the subrequest) is an
    outage: 503 with the default Retry-After. An auth answer that is neither 2xx/401/403 nor
    "unavailable" (here the provider's 404 for /oauth2/auth) is a misconfiguration: still 500,
    without Retry-After."""
    nginx_port, dead_port = free_ports(2)
    target = f"127.0.0.1:{dead_port}" if kind == "sidecar-down" else urlsplit(site.issuer).netloc
    conf = render_nginx_conf(nginx_port, target, urlsplit(site.app).netloc, auth=target)
    proc = start_nginx(conf, nginx_port, log_dir=tmp_path_factory.mktemp(f"nginx-{kind}"))
    try:
        async with new_page(chromium_browser) as page:
            for method, path, status, retry, body in await statuses_during(page, f"http://127.0.0.1:{nginx_port}"):
                if kind == "sidecar-down":
                    assert (status, retry) == (503, "5"), (method, path, status, body)
                else:
                    assert (status, retry) == (500, None), (method, path, status, body)
    finally:
        proc.stop()


# --------------------------------------------------------------------------
# Step-up per location: deploy/nginx/step-up.conf (/admin/, max_age=300), as sidecar.conf includes it
# --------------------------------------------------------------------------

STEP_UP_CONF = ROOT / "deploy" / "nginx" / "step-up.conf"
NGINX_README = ROOT / "deploy" / "nginx" / "README.md"
STEP_UP_CHALLENGE = (
    'Bearer error="insufficient_user_authentication", '
    'error_description="A more recent authentication is required", max_age=300'
)


async def provider_post(site: Site, action: str, data: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{site.issuer}/_control/{action}", json=data) as resp:
            assert resp.status == 200, await resp.text()


async def interactive_logins(site: Site) -> int:
    return int((await provider_json(site, "/_control/stats"))["interactive_logins"])


async def test_the_readmes_step_up_lines_are_the_shipped_files() -> None:  # async: the module runs on one loop
    """The README's step-up snippet is an excerpt of step-up.conf, which the tests run: line for line."""
    readme = NGINX_README.read_text()
    section = readme[readme.index("**Per location in nginx**") :]
    snippet = section[section.index("```nginx") + len("```nginx") : section.index("```", section.index("```nginx") + 3)]
    shipped = {line.strip() for line in STEP_UP_CONF.read_text().splitlines()}
    lines = [line.strip() for line in snippet.splitlines() if line.strip()]
    assert len(lines) > 10
    assert [line for line in lines if line not in shipped] == []
    assert "include /etc/nginx/step-up.conf;" in (ROOT / "deploy" / "nginx" / "sidecar.conf").read_text()


async def test_step_up_location_needs_a_recent_sign_in_and_the_provider_asks_again(
    chromium_browser: Browser, site: Site
) -> None:
    # Hostile: made-up headers the browser adds to its requests.
    spoof = {"X-Auth-Request-Auth-Time": "9999999999", "X-Auth-Request-User": "mallory"}
    await provider_post(site, "config", {"remember_logins": True})
    try:
        async with new_page(chromium_browser) as page:
            # The person signs in on the provider's login page; the provider remembers this browser's login.
            first = (await sign_in(page, site))["headers"]
            logins = await interactive_logins(site)
            assert first["x-auth-request-user"] == "alice@example.com"
            signed_in_at = int(first["x-auth-request-auth-time"])
            assert abs(signed_in_at - time.time()) < 30
            # Right after the sign-in: /admin/ is served, and made-up headers change nothing.
            await page.set_extra_http_headers(spoof)
            response = await page.goto(site.base + "/admin/x", wait_until="load")
            assert response is not None and response.status == 200 and response.request.redirected_from is None
            seen = (await echo(page, site.base))["headers"]
            assert (seen["x-auth-request-user"], seen["x-auth-request-auth-time"]) == (
                "alice@example.com",
                str(signed_in_at),
            )
            await page.set_extra_http_headers({})

            # Ten minutes pass at the provider; a plain sign-in is answered from its remembered login
            # (this dev provider honours a remembered login only in its auto-login mode), so the
            # session's auth_time is ten minutes old while its tokens are new.
            await provider_post(site, "config", {"auto_login": "alice"})
            await provider_post(site, "backdate_logins", {"seconds": 600})
            response = await page.goto(site.base + "/oauth2/start?rd=%2F_demo%2Fecho", wait_until="load")
            assert response is not None and response.status == 200 and page.url == site.base + "/_demo/echo"
            aged = lowered(await response.json())["headers"]
            assert await interactive_logins(site) == logins  # no new login: the provider remembered it
            assert int(aged["x-auth-request-auth-time"]) <= signed_in_at - 590
            aged_cookie = await session_cookie(page, site)

            # The page's own API calls and forms: the RFC 9470 challenge, the session untouched.
            for path in ("/admin/", "/admin/x?y=1", "/admin/x?max_age=999999"):
                for method, headers in (("GET", {"Accept": "application/json"}), ("GET", {}), ("DELETE", {})):
                    status, answer, _ = await fetch(page, site.base + path, method, headers)
                    assert status == 401, (method, path, status)
                    assert set(challenges(answer)) == {STEP_UP_CHALLENGE}, (method, path)
                    assert "set-cookie" not in answer and "location" not in answer, (method, path)
                posted = await submit_form(page, site.base + path, {"x": "1"})
                assert posted.status == 401 and posted.request.redirected_from is None, path
                answer = await posted.all_headers()
                assert set(challenges(answer)) == {STEP_UP_CHALLENGE} and "set-cookie" not in answer, path
            # Other locations keep working without a new sign-in.
            seen = (await echo(page, site.base))["headers"]
            assert seen["x-auth-request-user"] == "alice@example.com"
            assert seen["x-auth-request-auth-time"] == aged["x-auth-request-auth-time"]
            response = await page.goto(site.base + "/public/page", wait_until="load")
            assert response is not None and response.status == 200
            assert await session_cookie(page, site) == aged_cookie and await interactive_logins(site) == logins

            # The browser opens an /admin/ page: sent straight to the provider with max_age=300, which
            # logs alice in again despite the remembered login; the page's own query (with a max_age
            # and an rd of its own) is the page to come back to, not part of the sign-in request.
            admin = "/admin/x?y=1&max_age=9&rd=%2Fpublic%2Fx"
            await page.set_extra_http_headers(spoof)
            hops = watch(page, "")
            await page.goto(site.base + admin, wait_until="load")
            assert hops[0] == site.base + admin and hops[1].startswith(site.issuer + "/authorize?"), hops
            assert parse_qs(urlsplit(hops[1]).query)["max_age"] == ["300"]
            assert page.url == site.base + admin, hops  # back on the page asked for, as asked
            body = await text(page)
            assert "alice@example.com" in body and "mallory" not in body
            assert await interactive_logins(site) == logins + 1  # the provider really asked again
            await page.set_extra_http_headers({})

            # The new session is fresh: /admin/ open to pages and to the page's API calls, with the new auth_time.
            fresh = (await echo(page, site.base))["headers"]
            assert int(fresh["x-auth-request-auth-time"]) >= signed_in_at
            assert await session_cookie(page, site) != aged_cookie
            status, _, _ = await fetch(page, site.base + "/admin/x", headers={"Accept": "application/json"})
            assert status == 200
    finally:
        await provider_post(site, "config", {"remember_logins": False, "auto_login": None})


def challenges(headers: dict[str, str]) -> list[str]:
    """The WWW-Authenticate challenges of a response as Chromium holds its headers (repeated ones joined by ", ")."""
    return re.split(r", (?=Bearer |Cookie )", headers.get("www-authenticate", ""))


async def test_a_step_up_401_carries_its_challenge_once(chromium_browser: Browser, site: Site) -> None:
    """nginx's auth_request already passes the sidecar's WWW-Authenticate on with the 401, so
    @sidecar_signin_fresh must not add it a second time (it did: found by the page's fetch() in Chromium,
    where aiohttp's ``headers[...]`` had shown only the first)."""
    await provider_post(site, "config", {"remember_logins": True, "auto_login": "alice"})
    try:
        async with new_page(chromium_browser) as page:
            await page.goto(site.base + "/_demo/echo", wait_until="load")  # signed in, the login remembered
            await provider_post(site, "backdate_logins", {"seconds": 600})
            await page.goto(site.base + "/oauth2/start?rd=%2F_demo%2Fecho", wait_until="load")  # an aged session
            assert page.url == site.base + "/_demo/echo"
            status, answer, _ = await fetch(page, site.base + "/admin/", headers={"Accept": "application/json"})
    finally:
        await provider_post(site, "config", {"remember_logins": False, "auto_login": None})
    assert status == 401
    assert challenges(answer) == [STEP_UP_CHALLENGE]


async def test_a_step_up_401_without_a_session_names_a_challenge(chromium_browser: Browser, site: Site) -> None:
    """Without a session the /admin/ 401 names a challenge (RFC 9110 15.5.2), the one every other location
    answers with: the sidecar's /oauth2/auth 401 without a session has none, so step-up.conf adds
    ``Cookie realm="sidecar"`` ($sidecar_fresh_challenge) only then (it used to send none)."""
    async with new_page(chromium_browser) as page:
        await page.goto(site.base + "/public/page", wait_until="load")
        status, answer, _ = await fetch(page, site.base + "/_demo/echo")
        assert (status, challenges(answer)) == (401, ['Cookie realm="sidecar"'])  # the other locations
        status, answer, _ = await fetch(page, site.base + "/admin/")
    assert status == 401
    assert challenges(answer) == ['Cookie realm="sidecar"']


async def test_step_up_location_without_a_session(chromium_browser: Browser, site: Site) -> None:
    """No session at all: browsers go to sign in (with max_age), the page's API calls and forms get a plain 401."""
    async with new_page(chromium_browser) as page:
        hops = watch(page, "")
        await page.goto(site.base + "/admin/", wait_until="load")
        assert hops[1].startswith(site.issuer + "/authorize?"), hops
        assert parse_qs(urlsplit(hops[1]).query)["max_age"] == ["300"]
        assert await page.locator("button[name='user'][value='alice']").count() == 1  # the login page asks
        await page.goto(site.base + "/public/page", wait_until="load")
        for method, headers in (("GET", {}), ("HEAD", {"Accept": "application/json"})):
            status, answer, _ = await fetch(page, site.base + "/admin/", method, headers)
            assert status == 401 and "location" not in answer, method
        posted = await submit_form(page, site.base + "/admin/", {"x": "1"})
        assert posted.status == 401 and posted.request.redirected_from is None
    # A program (aiohttp's own headers) too.
    async with aiohttp.ClientSession() as client:
        async with client.get(site.base + "/admin/", allow_redirects=False) as resp:
            assert resp.status == 401 and "Location" not in resp.headers
