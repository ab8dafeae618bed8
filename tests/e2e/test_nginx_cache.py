"""The optional auth cache (deploy/nginx/auth-cache.conf), run by the distro's nginx.

The shipped sidecar.conf with its two commented cache lines turned on, as an operator would,
in front of a real sidecar, provider and demo app. nginx logs every auth subrequest with its
cache status (HIT, MISS, BYPASS, EXPIRED) and the sidecar's own status, so each test sees
whether the sidecar was asked. What an operator relies on: a cached answer still carries the
identity, a missing, forged or odd cookie always reaches the sidecar and is never stored, two
users never share an entry, and a signed-out cookie stops working within the validity.

People sign in, browse and sign out in real Chromium (their pages' own fetch() calls make the cached
requests, with the browser's cookies); Cookie headers written by hand are only the hostile variants
(missing, forged, odd spellings) and the replay of a signed-out cookie.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page

from tests.e2e.chromium import new_page
from tests.e2e.procs import ROOT, SHIPPED_NGINX_CONF, Proc, child_env, free_ports, python_module, render_nginx_conf
from tests.e2e.procs import start_nginx as start_nginx_proc
from tests.e2e.test_nginx import COOKIE, IDENTITY, Site, session_cookie, sign_in

# The session event loop: the run's one Chromium (the chromium_browser fixture) lives there.
pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(90)]

CACHE_CONF = ROOT / "deploy" / "nginx" / "auth-cache.conf"
ZONE_LINE = re.compile(r"^# (proxy_cache_path \S+ (.*))$", re.M)
INCLUDE_LINE = "# include /etc/nginx/auth-cache.conf;"
VALIDITY = 1.0  # proxy_cache_valid 202 1s
_ids = itertools.count(1)
AUTH_LOGS: dict[str, Path] = {}  # nginx base URL -> its log of auth subrequests


def cached_conf(listen_port: int, sidecar: str, app: str, cache_dir: Path, auth_log: Path, auth: str) -> str:
    """sidecar.conf with the cache turned on as its comments say, plus a test-only log of each auth subrequest."""
    text = SHIPPED_NGINX_CONF.read_text()
    zones = ZONE_LINE.findall(text)
    assert len(zones) == 1, "sidecar.conf must carry exactly one commented proxy_cache_path line"
    assert text.count(INCLUDE_LINE) == 1, f"sidecar.conf must carry {INCLUDE_LINE!r} exactly once"
    whole, rest = zones[0]
    text = text.replace("# " + whole, f"proxy_cache_path {cache_dir} {rest}")
    log = f"log_subrequest on;\n        access_log {auth_log} sidecar_auth_test;\n"
    text = text.replace(INCLUDE_LINE, log + CACHE_CONF.read_text())
    fmt = "log_format sidecar_auth_test '$http_x_test_id $upstream_cache_status $upstream_status';\n"
    return fmt + render_nginx_conf(listen_port, sidecar, app, text, auth=auth)


@pytest.fixture(scope="module")
def site(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    nginx_port, sidecar_port, provider_port, app_port, auth_port = free_ports(5)
    logs: Path = tmp_path_factory.mktemp("nginx-cache")
    base, issuer = f"http://127.0.0.1:{nginx_port}", f"http://127.0.0.1:{provider_port}"
    redis_url = redis_server.rsplit("/", 1)[0] + "/10"  # our own database: others flush database 0
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None  # tmpfs, as the config asks
    cache_parent = Path(tempfile.mkdtemp(prefix="sidecar-auth-cache-", dir=shm))
    cache_parent.chmod(0o755)  # nginx's workers (nobody when started as root) create entries below
    procs: list[Proc] = []

    def launch(name: str, module: str, *args: str) -> Proc:
        procs.append(Proc(name, python_module(module, *args), log_dir=logs, env=child_env()))
        return procs[-1]

    try:
        provider = launch("provider", "sidecar.dev.provider", f"--port={provider_port}")  # a login page: who signs in
        app = launch("demo-app", "sidecar.dev.demo_app", f"--port={app_port}")
        sidecar = launch(
            "sidecar",
            "sidecar",
            f"--http-address=127.0.0.1:{sidecar_port}",
            f"--auth-address=127.0.0.1:{auth_port}",
            f"--oidc-issuer-url={issuer}",
            "--client-id=sidecar-dev",
            "--client-secret=sidecar-dev-secret",
            f"--redirect-url={base}/oauth2/callback",
            "--cookie-secret=nginx-cache-cookie-secret-0123456789",
            "--cookie-secure=false",
            "--email-domain=*",
            "--session-store-type=redis",
            f"--redis-connection-url={redis_url}",
            "--reverse-proxy",
            "--trusted-proxy=127.0.0.1/32",
            "--pass-access-token",
            "--pass-authorization-header",
            "--workers=1",
            "--shutdown-timeout=2s",
        )
        provider.wait_http(issuer + "/.well-known/openid-configuration")
        app.wait_http(f"http://127.0.0.1:{app_port}/_demo/echo")
        # Ready, not only alive: it has fetched the provider's discovery document, so the first sign-in
        # on a busy machine does not race it (a 503 from /oauth2/start).
        sidecar.wait_http(f"http://127.0.0.1:{sidecar_port}/ready", timeout=30)
        sidecar.wait_http(f"http://127.0.0.1:{auth_port}/oauth2/auth", expect=401)
        conf = cached_conf(
            nginx_port,
            f"127.0.0.1:{sidecar_port}",
            f"127.0.0.1:{app_port}",
            cache_parent / "c",
            logs / "auth.log",
            f"127.0.0.1:{auth_port}",
        )
        procs.append(start_nginx_proc(conf, nginx_port, log_dir=logs))
        AUTH_LOGS[base] = logs / "auth.log"
        yield Site(
            base=base,
            issuer=issuer,
            sidecar=f"http://127.0.0.1:{sidecar_port}",
            app=f"http://127.0.0.1:{app_port}",
            redis=redis_url,
        )
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(cache_parent, ignore_errors=True)


def auth_log(site: Site) -> dict[str, tuple[str, str]]:
    """Test id -> (cache status, the sidecar's status) of every auth subrequest so far ("-": not asked)."""
    out = {}
    for line in AUTH_LOGS[site.base].read_text().splitlines():
        test_id, status, upstream = (line.split(" ", 2) + ["", ""])[:3]
        out[test_id] = (status, upstream)
    return out


async def fetch(site: Site, headers: dict[str, str]) -> tuple[str, int, dict[str, str]]:
    """Hand-made: GET /_demo/echo with exactly these headers (plus a test id); (id, status, headers the app saw)."""
    test_id = f"t{next(_ids)}"
    async with aiohttp.ClientSession() as client:  # no cookie jar: only the headers given
        async with client.get(
            site.base + "/_demo/echo", headers={**headers, "X-Test-Id": test_id}, allow_redirects=False
        ) as resp:
            seen = {}
            if resp.status == 200:
                seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
            else:
                await resp.read()
            return test_id, resp.status, seen


_PAGE_FETCHES = """async ([url, ids]) => Promise.all(ids.map(async id => {
    const r = await fetch(url, {headers: {'X-Test-Id': id}, redirect: 'manual'});
    return [id, r.status, r.status === 200 ? (await r.json()).headers : {}];
}))"""


async def page_fetches(page: Page, site: Site, count: int) -> list[tuple[str, int, dict[str, str]]]:
    """``count`` GET /_demo/echo made at once by the signed-in page's own script (Chromium's cookies and
    headers; the script adds only the test id): (id, status, headers the app saw) each."""
    ids = [f"t{next(_ids)}" for _ in range(count)]
    answers: list[list[Any]] = await page.evaluate(_PAGE_FETCHES, [site.base + "/_demo/echo", ids])
    return [(test_id, status, {k.lower(): v for k, v in seen.items()}) for test_id, status, seen in answers]


async def asked(site: Site, test_id: str) -> tuple[str, str]:
    """The auth subrequest's log line for this request (nginx writes it at the end of the request)."""
    for _ in range(50):
        entry = auth_log(site).get(test_id)
        if entry is not None:
            return entry
        await asyncio.sleep(0.02)
    raise AssertionError(f"no auth subrequest logged for {test_id}")


async def test_a_cache_hit_still_hands_the_identity_and_token_to_the_app(chromium_browser: Browser, site: Site) -> None:
    async with new_page(chromium_browser) as page:
        await sign_in(page, site)
        results = [*await page_fetches(page, site, 1), *await page_fetches(page, site, 19)]
    statuses = [await asked(site, test_id) for test_id, _, _ in results]
    hits = [r for r, (cache, _) in zip(results, statuses, strict=True) if cache == "HIT"]
    assert len(hits) >= 10, statuses  # 20 requests in well under a second: most are answered by the cache
    for _, status, seen in results:
        assert status == 200
        for name, value in IDENTITY.items():
            assert seen.get(name) == value, name
        assert seen["authorization"] == "Bearer " + seen["x-auth-request-access-token"]
        assert seen["sec-fetch-site"] == "same-origin"  # the page's own requests, as Chromium sent them
    for _, (cache, upstream) in zip(hits, [s for s in statuses if s[0] == "HIT"], strict=True):
        assert cache == "HIT" and upstream == "-"  # the sidecar was not asked, and the app still got all of it


def forged_headers(valid: str) -> list[dict[str, str]]:
    """Cookies the sidecar refuses: none, empty, made up, a valid one altered, the right value under a wrong name."""
    # One letter of the signature changed, not the last: the last base64 letter carries two unused bits,
    # so A/B/C/D there decode to the same signature (the cookie stays valid one run in sixteen).
    flipped = valid[:-5] + ("A" if valid[-5] != "A" else "B") + valid[-4:]
    return [
        {},
        {"Cookie": f"{COOKIE}="},
        {"Cookie": "other=1"},
        {"Cookie": f"{COOKIE}=forged"},
        {"Cookie": f"{COOKIE}={'x' * 200}"},
        {"Cookie": f"{COOKIE}={flipped}"},
        {"Cookie": f"{COOKIE}={valid[:-4]}"},
        {"Cookie": f"{COOKIE}={valid}x"},
        {"Cookie": f"{COOKIE.upper()}={valid}"},  # nginx's $cookie__sidecar ignores case, the sidecar does not
        {"Cookie": f"x{COOKIE}={valid}"},
        {"Cookie": f"{COOKIE}_csrf={valid}"},
        {"Cookie": f"{COOKIE}={flipped}; {COOKIE.upper()}={valid}"},
        {"Authorization": "Bearer forged"},
        {"Authorization": f"Bearer {valid}"},
    ]


async def signed_in_cookie(chromium_browser: Browser, site: Site) -> str:
    """A session cookie from a sign-in in Chromium whose page then made two requests (so a fresh cache entry
    for it is there), for the hand-made hostile variants that follow."""
    async with new_page(chromium_browser) as page:
        await sign_in(page, site)
        for _ in range(2):
            assert [status for _, status, _ in await page_fetches(page, site, 1)] == [200]
        valid = await session_cookie(page, site)
    assert valid
    return valid


async def test_missing_and_forged_cookies_reach_the_sidecar_and_are_never_cached(
    chromium_browser: Browser, site: Site
) -> None:
    """Hostile, by hand: Cookie headers the sidecar refuses, next to a valid cookie whose answer is cached."""
    valid = await signed_in_cookie(chromium_browser, site)
    for headers in forged_headers(valid):
        for attempt in range(2):  # the second try would be a HIT had the first been stored
            test_id, status, seen = await fetch(site, headers)
            cache, upstream = await asked(site, test_id)
            assert (status, cache, upstream) in ((401, "MISS", "401"), (401, "BYPASS", "401")), (headers, attempt)
            assert not seen


async def test_odd_spellings_of_a_valid_cookie_are_answered_by_the_sidecar_every_time(
    chromium_browser: Browser, site: Site
) -> None:
    """Hostile, by hand: where nginx and the sidecar could read different cookies, or a bearer token decides:
    never cached (the valid cookie's own answer is cached meanwhile)."""
    valid = await signed_in_cookie(chromium_browser, site)
    for headers in (
        {"Cookie": f"{COOKIE}=forged; {COOKIE}={valid}"},
        {"Cookie": f"{COOKIE}={valid}; {COOKIE}=forged"},
        {"Cookie": f"{COOKIE} ={valid}"},
        {"Cookie": f"{COOKIE}={valid}", "Authorization": "Bearer something"},
    ):
        for _ in range(2):
            test_id, _, _ = await fetch(site, headers)
            cache, upstream = await asked(site, test_id)
            assert cache == "BYPASS" and upstream != "-", headers


async def test_two_users_never_see_each_others_identity(chromium_browser: Browser, site: Site) -> None:
    """Alice and Bob sign in in two browsers; their pages then make 15 requests each, all at once."""
    async with new_page(chromium_browser) as alice, new_page(chromium_browser) as bob:
        await sign_in(alice, site, user="alice")
        await sign_in(bob, site, user="bob")
        answers = await asyncio.gather(page_fetches(alice, site, 15), page_fetches(bob, site, 15))
        rounds = [*answers[0], *answers[1]]
        who = ["alice@example.com"] * 15 + ["bob@example.org"] * 15
        tokens: dict[str, set[str]] = {user: set() for user in who}
        for user, (_, status, seen) in zip(who, rounds, strict=True):
            assert status == 200
            assert seen["x-auth-request-email"] == user and seen["x-forwarded-email"] == user
            tokens[user].add(seen["x-auth-request-access-token"])
        assert not tokens["alice@example.com"] & tokens["bob@example.org"]
        hits = [(await asked(site, test_id))[0] for test_id, _, _ in rounds]
        assert hits.count("HIT") >= 10  # the cache was in play, not bypassed


async def test_after_sign_out_the_cached_entry_lives_at_most_the_validity(
    chromium_browser: Browser, site: Site
) -> None:
    """The person signs out in Chromium; a copy of the old cookie, replayed by hand (hostile), stops working
    within the cache validity."""
    async with new_page(chromium_browser) as page:
        await sign_in(page, site)
        old = await session_cookie(page, site)
        for _ in range(2):
            assert [status for _, status, _ in await page_fetches(page, site, 1)] == [200]
        answered: list[float] = []  # when the sidecar's answer to /oauth2/sign_out (the session gone) arrived
        page.on("response", lambda r: answered.append(time.monotonic()) if "/oauth2/sign_out" in r.url else None)
        await page.goto(site.base + "/oauth2/sign_out", wait_until="load")
        signed_out = answered[0]
        assert page.url.startswith(site.base + "/oauth2/signed_out"), page.url
        assert await session_cookie(page, site) is None
        await page.goto(site.base + "/_demo/echo", wait_until="load")  # and the browser is sent to sign in again
        assert page.url.startswith(site.issuer + "/authorize?"), page.url
    headers = {"Cookie": f"{COOKIE}={old}"}
    refused_at = None
    while time.monotonic() - signed_out < VALIDITY + 2.0:
        _, status, seen = await fetch(site, headers)
        now = time.monotonic()
        if status == 200:
            assert refused_at is None, "accepted again after being refused"
            assert seen["x-auth-request-email"] == "alice@example.com"
        else:
            assert status == 401
            refused_at = refused_at or now
        await asyncio.sleep(0.05)
    assert refused_at is not None
    # nginx counts cache validity in whole seconds of its clock: "1s" lasts between 1 and 2 s.
    assert refused_at - signed_out <= 2 * VALIDITY + 0.3, refused_at - signed_out
