"""CORS (``sidecar/oauth/cors.py``): what a browser-based OAuth client may fetch() from another origin, and what
it may never read.

The real browser's requests are in tests/e2e/test_inspector.py (the MCP Inspector in Chromium); these are the
hostile variants on top, sent by hand: odd methods and header lists in preflights, ``Origin: null``, many
origins, credentials asked for, and every other route of the application, which must answer no CORS at all.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.stack import Stack
from tests.test_oauth_authorize import oauth_stack, register

pytestmark = pytest.mark.asyncio(loop_scope="module")

# path -> the methods a browser-based client uses there
OPEN = {
    "/.well-known/oauth-authorization-server": ("GET",),
    "/.well-known/openid-configuration": ("GET",),
    "/.well-known/oauth-protected-resource/mcp": ("GET",),
    "/.well-known/oauth-protected-resource": ("GET",),
    "/oauth2/jwks": ("GET",),
    "/oauth2/register": ("POST",),
    "/oauth2/token": ("POST",),
    "/oauth2/revoke": ("POST",),
}
ORIGINS = ("http://localhost:6274", "https://inspector.example", "null", "http://127.0.0.1:1", "chrome-extension://abc")
SDK_HEADERS = "content-type, mcp-protocol-version, authorization"
CORS_NAMES = re.compile(r"^access-control-", re.I)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def st() -> AsyncIterator[Stack]:
    async with oauth_stack() as st:
        yield st


async def send(method: str, url: str, **kw: Any) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.request(method, url, allow_redirects=False, **kw) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.text()


def preflight_of(origin: str, method: str, headers: str | None = SDK_HEADERS) -> dict[str, str]:
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        sent["Access-Control-Request-Headers"] = headers
    return sent


def no_cors(headers: dict[str, str]) -> bool:
    return not any(CORS_NAMES.match(name) for name in headers)


async def test_preflights_of_the_open_endpoints_are_approved_for_any_origin_without_credentials(st: Stack) -> None:
    for path, methods in OPEN.items():
        for origin in ORIGINS:
            status, headers, _ = await send("OPTIONS", st.base + path, headers=preflight_of(origin, methods[0]))
            assert status == 204, (path, origin)
            assert headers["access-control-allow-origin"] == "*", (path, origin, headers)
            assert headers["access-control-allow-methods"] == ", ".join(methods)
            # Authorization is never covered by a "*" in Allow-Headers: it is named
            assert headers["access-control-allow-headers"] == SDK_HEADERS
            assert "access-control-allow-credentials" not in headers
            assert int(headers["access-control-max-age"]) <= 7200


async def test_answers_of_the_open_endpoints_are_readable_errors_included_and_never_with_credentials(st: Stack) -> None:
    origin = {"Origin": "http://localhost:6274"}
    answers = [
        await send("GET", st.base + "/.well-known/oauth-authorization-server", headers=origin),
        await send("GET", st.base + "/.well-known/oauth-protected-resource/nothing", headers=origin),  # 404
        await send("GET", st.base + "/oauth2/jwks", headers=origin),
        await send("POST", st.base + "/oauth2/register", headers=origin, json={"redirect_uris": ["javascript:x"]}),
        await send("POST", st.base + "/oauth2/token", headers=origin, data={"grant_type": "authorization_code"}),
        await send(
            "POST",
            st.base + "/oauth2/token",
            headers={**origin, "Authorization": "Basic bm9ib2R5Ondyb25n"},
            data={"grant_type": "refresh_token", "refresh_token": "scr.x.y"},
        ),
        await send("POST", st.base + "/oauth2/revoke", headers=origin, data={"token": "x", "client_id": "nobody"}),
    ]
    statuses = [status for status, _, _ in answers]
    assert statuses[:3] == [200, 404, 200] and statuses[3] == 400 and statuses[4] in (400, 401), statuses
    assert statuses[5] == 401 and "www-authenticate" in answers[5][1], answers[5]
    for status, headers, _ in answers:
        assert headers["access-control-allow-origin"] == "*", (status, headers)
        assert "WWW-Authenticate" in headers["access-control-expose-headers"]
        assert "access-control-allow-credentials" not in headers
    reg = await register(st.base)  # a browser-based public client registers and reads its client_id
    assert reg["client_id"]


async def test_the_origin_is_never_reflected_whatever_many_origins_ask(st: Stack) -> None:
    """No per-origin answer to poison a cache with, and no origin a wildcard could be mistaken for."""
    url = st.base + "/oauth2/token"
    for n in range(40):
        origin = f"https://site{n}.example" if n % 2 else f"http://localhost:{6000 + n}"
        status, headers, _ = await send("OPTIONS", url, headers=preflight_of(origin, "POST"))
        assert status == 204 and headers["access-control-allow-origin"] == "*"
        assert origin not in str(headers)
    # two Origin headers, an Origin with a path, an overlong one: still the wildcard, still no credentials
    for origin in ("https://a.example/path", "x" * 3000, "https://a.example, https://b.example"):
        status, headers, _ = await send("OPTIONS", url, headers=preflight_of(origin, "POST"))
        assert headers.get("access-control-allow-origin") == "*" and "access-control-allow-credentials" not in headers


@pytest.mark.parametrize(
    "method",
    ["DELETE", "PUT", "PATCH", "CONNECT", "TRACE", "post", "Post", "GET", "POST, GET", "", "*"],
)
async def test_preflight_for_a_method_the_endpoint_does_not_serve_is_not_approved(st: Stack, method: str) -> None:
    status, headers, _ = await send(
        "OPTIONS", st.base + "/oauth2/token", headers=preflight_of("https://a.example", method)
    )
    assert status == 204 and no_cors(headers), (method, headers)
    status, headers, _ = await send(
        "OPTIONS",
        st.base + "/.well-known/oauth-authorization-server",
        headers=preflight_of("https://a.example", "POST"),
    )
    assert no_cors(headers)


@pytest.mark.parametrize(
    "requested",
    [
        "cookie",
        "content-type, Cookie",
        "set-cookie",
        "host",
        "origin",
        "referer",
        "x a",
        "x-a;b",
        "x-\u00e9",
        "(x)",
        ",".join(f"x-h{i}" for i in range(25)),
        "x-" + "a" * 1200,
    ],
)
async def test_preflight_asking_for_odd_headers_is_not_approved(st: Stack, requested: str) -> None:
    try:
        status, headers, _ = await send(
            "OPTIONS", st.base + "/oauth2/register", headers=preflight_of("https://a.example", "POST", requested)
        )
    except ValueError:  # a header value aiohttp itself will not send is no test of ours
        pytest.fail(f"the client refused to send {requested!r}")
    assert status == 204 and no_cors(headers), (requested, headers)


async def test_preflight_headers_are_lower_cased_deduplicated_and_empty_entries_ignored(st: Stack) -> None:
    asked = "Content-Type,, AUTHORIZATION ,content-type,MCP-Protocol-Version"
    _, headers, _ = await send("OPTIONS", st.base + "/oauth2/token", headers=preflight_of("null", "POST", asked))
    assert headers["access-control-allow-headers"] == "content-type, authorization, mcp-protocol-version"
    _, headers, _ = await send("OPTIONS", st.base + "/oauth2/token", headers=preflight_of("null", "POST", None))
    assert headers["access-control-allow-origin"] == "*" and "access-control-allow-headers" not in headers


async def test_options_without_origin_is_a_plain_question_about_methods(st: Stack) -> None:
    status, headers, _ = await send("OPTIONS", st.base + "/oauth2/token")
    assert status == 204 and headers["allow"] == "OPTIONS, POST" and no_cors(headers)
    # a preflight forged with the session cookie and an attacker's Origin: still no credentials
    cookie = {"Cookie": "_sidecar=abc", **preflight_of("https://evil.example", "POST")}
    _, headers, _ = await send("OPTIONS", st.base + "/oauth2/token", headers=cookie)
    assert "access-control-allow-credentials" not in headers


# --- everything else stays closed --------------------------------------------------------------------------------


def closed_paths(st: Stack) -> list[str]:
    """Every other route the application has (placeholders filled in), the browser pages and the cookie
    endpoints among them: read from the router, so a route added later is checked too."""
    paths = []
    for resource in st.runners[0].app.router.resources():
        canonical = resource.canonical
        if canonical.startswith("/.well-known/oauth-protected-resource"):
            continue
        path = re.sub(r"\{[^}]*\}", "x", canonical)
        if path not in OPEN:
            paths.append(path)
    return sorted(set(paths))


async def test_every_other_route_answers_no_cors_to_any_origin(st: Stack) -> None:
    paths = closed_paths(st)
    for page in (
        "/oauth2/authorize",
        "/oauth2/consent",
        "/oauth2/device",
        "/oauth2/grants",
        "/oauth2/grants/revoke",
        "/oauth2/device_authorization",
        "/oauth2/start",
        "/oauth2/callback",
        "/oauth2/sign_out",
    ):
        assert page in paths, (page, paths)
    for path in paths + ["/", "/some/app/page"]:
        for origin in ("https://evil.example", "null"):
            for method in ("GET", "POST"):
                _, headers, _ = await send("OPTIONS", st.base + path, headers=preflight_of(origin, method))
                assert no_cors(headers), (path, origin, method, headers)
                _, headers, _ = await send(method, st.base + path, headers={"Origin": origin})
                assert no_cors(headers), (path, origin, method, headers)


# --- the resource path (/mcp) ----------------------------------------------------------------------------------------


async def test_resource_preflight_is_answered_and_its_401_exposes_the_challenge_to_a_page(st: Stack) -> None:
    url = st.base + "/mcp"
    status, headers, _ = await send("OPTIONS", url, headers=preflight_of("http://localhost:6274", "POST"))
    assert status == 204 and headers["access-control-allow-origin"] == "*", headers
    assert headers["access-control-allow-headers"] == SDK_HEADERS and "access-control-allow-credentials" not in headers
    assert "access-control-expose-headers" not in headers  # meaningless on a preflight: the app's answer exposes
    status, headers, _ = await send("POST", url, headers={"Origin": "http://localhost:6274"}, json={})
    assert status == 401 and "resource_metadata=" in headers["www-authenticate"]
    assert (
        headers["access-control-allow-origin"] == "*" and headers["access-control-expose-headers"] == "WWW-Authenticate"
    )
    assert "access-control-allow-credentials" not in headers
    bad = {"Origin": "null", "Authorization": "Bearer sca.AAAAAAAAAAAAAAAA.BBBBBBBBBBBBBBBB"}
    status, headers, _ = await send("POST", url, headers=bad, json={})
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
    assert (
        headers["access-control-allow-origin"] == "*" and headers["access-control-expose-headers"] == "WWW-Authenticate"
    )
    status, headers, _ = await send("POST", url, json={})  # no Origin: a program, not a page
    assert status == 401 and no_cors(headers)


@pytest.mark.parametrize(
    "asked",
    [("CONNECT", None), ("TRACE", None), ("post", None), ("POST", "cookie"), ("POST", "x a"), ("GET", "host")],
)
async def test_resource_preflight_refuses_odd_methods_and_headers_and_never_reaches_the_app(
    st: Stack, asked: tuple[str, str | None]
) -> None:
    method, requested = asked
    status, headers, _ = await send(
        "OPTIONS", st.base + "/mcp/x", headers=preflight_of("https://a.example", method, requested)
    )
    assert status == 204 and no_cors(headers), (asked, headers)
    assert headers["vary"] == "Origin" and headers["cache-control"] == "no-store"  # the sidecar's, not the app's


async def test_resource_options_that_is_not_a_preflight_still_needs_a_token(st: Stack) -> None:
    status, headers, _ = await send("OPTIONS", st.base + "/mcp", headers={"Origin": "https://a.example"})
    assert status == 401 and "resource_metadata=" in headers["www-authenticate"]
    # the front's decision endpoint answers a preflight it is asked about like any request: 401, never 204
    status, _, _ = await send(
        "OPTIONS",
        st.base + "/oauth2/auth",
        headers={"X-Original-URI": "/mcp", **preflight_of("https://a.example", "POST")},
    )
    assert status == 401


async def test_token_and_revocation_challenge_with_basic_only_a_client_that_sent_basic(st: Stack) -> None:
    """RFC 6749 5.2: the ``WWW-Authenticate: Basic`` answer is owed to a client that authenticated with it. Sent
    to anyone else, a browser would ask the person for a password in the sidecar's name (another site's page
    posting with ``credentials: "include"`` hung Chromium on that prompt). Without the challenge the answer is
    400, RFC 6749 5.2's default: a 401 must carry one (RFC 9110 15.5.2), and one without failed before the fix."""
    form = {"grant_type": "refresh_token", "refresh_token": "scr.x.y", "client_id": "nobody"}
    for path in ("/oauth2/token", "/oauth2/revoke"):
        for extra in ({}, {"client_secret": "wrong"}, {"client_id": ""}):
            status, headers, _ = await send("POST", st.base + path, data={**form, "token": "t", **extra})
            assert status == 400 and "www-authenticate" not in headers, (path, extra, headers)
        for authorization in ("Basic bm9ib2R5Ondyb25n", "Basic !!!", "Basic bm9jb2xvbg==", "Bearer x"):
            status, headers, _ = await send(
                "POST",
                st.base + path,
                data={"grant_type": "refresh_token", "token": "t"},
                headers={"Authorization": authorization},
            )
            assert status == 401 and headers["www-authenticate"] == 'Basic realm="sidecar"', (path, authorization)


async def test_head_of_the_documents_and_rate_limited_answers_carry_the_wildcard_too() -> None:
    async with oauth_stack(oauth_registration_rate_limit="1") as st:
        for path in ("/.well-known/oauth-authorization-server", "/oauth2/jwks"):
            status, headers, _ = await send("HEAD", st.base + path, headers={"Origin": "null"})
            assert status == 200 and headers["access-control-allow-origin"] == "*", (path, status)
        body = {"redirect_uris": ["http://127.0.0.1:1/cb"], "token_endpoint_auth_method": "none"}
        statuses = []
        for _ in range(4):
            status, headers, _ = await send("POST", st.base + "/oauth2/register", json=body, headers={"Origin": "null"})
            statuses.append(status)
            assert headers["access-control-allow-origin"] == "*" and "access-control-allow-credentials" not in headers
        assert statuses[0] == 201 and statuses[-1] == 429, statuses
        assert "Retry-After" in headers["access-control-expose-headers"] and "retry-after" in headers
