"""``sidecar.fronts``: the original request is read only from the headers the configured front sets itself.

The tables give each front's own headers as it really writes them (ingress-nginx's auth location,
Traefik's forwardAuth, Caddy's forward_auth, the shipped nginx config, Envoy's ext_authz) and then add,
as a hostile client would, every other name of the same family: a name that disagrees is a 400, a name
that agrees changes nothing, a family member without the front's own header is a 400. The real fronts
run in tests/e2e/test_fronts_e2e.py; here both listeners answer the same hand-made subrequests.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import context
from sidecar.context import SERVICES
from sidecar.errors import BadRequest
from sidecar.fronts import (
    FRONTS,
    REQUEST,
    URI_HEADERS,
    URL_HEADERS,
    Original,
    read_auth,
    refuse_aliases,
    refuse_undecodable,
    split_routed,
)
from sidecar.oauth.service import OAUTH
from sidecar.store import MemoryStore
from tests.stack import browser, session_cookie, sign_in, stack
from tests.test_auth_listener import auth_listener, comparable, exchange
from tests.test_oauth_tokens import REDIRECT, Issued, new_grant, pkce, redeem, register

HOST = "app.example.com"

# What each front writes on the auth subrequest for "POST https://app.example.com/admin/x?a=1".
OWN: dict[str, dict[str, str]] = {
    "nginx": {
        "X-Forwarded-Uri": "/admin/x?a=1",
        "X-Original-URI": "/admin/x?a=1",
        "X-Forwarded-Method": "POST",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": HOST,
    },
    "ingress-nginx": {"X-Original-URL": f"https://{HOST}/admin/x?a=1", "X-Original-Method": "POST"},
    "traefik": {
        "X-Forwarded-Uri": "/admin/x?a=1",
        "X-Forwarded-Method": "POST",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": HOST,
    },
    "caddy": {
        "X-Forwarded-Uri": "/admin/x?a=1",
        "X-Forwarded-Method": "POST",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": HOST,
    },
    "envoy": {"X-Forwarded-Proto": "https"},  # path, method and Host are the subrequest's own
}
EXPECTED = Original(uri="/admin/x?a=1", method="POST", scheme="https", host=HOST)

# A client's own copies, naming another request: every family, several spellings.
HOSTILE: list[tuple[str, str]] = [
    ("X-Forwarded-Uri", "/public/x"),
    ("X-Original-URI", "/public/x"),
    ("X-Original-URL", f"https://{HOST}/public/x"),
    ("X-Original-URL", "https://evil.example/admin/x?a=1"),
    ("X-Original-URL", f"http://{HOST}/admin/x?a=1"),
    ("X-Forwarded-Path", "/public/x"),
    ("X-Envoy-Original-Path", "/public/x"),
    ("X-Rewrite-URL", "/public/x"),
    ("X-Forwarded-Method", "GET"),
    ("X-Original-Method", "GET"),
    ("X-HTTP-Method-Override", "GET"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Scheme", "http"),
    ("X-Scheme", "http"),
    ("X-Forwarded-Ssl", "off"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Original-Host", "evil.example"),
    ("X-Host", "evil.example"),
    ("Forwarded", "for=1.2.3.4;host=evil.example;proto=https"),
    ("Forwarded", f"host={HOST};proto=http"),
    # Other method overrides applications honour (review 2).
    ("X-HTTP-Method", "GET"),
    ("X-Method-Override", "GET"),
    ("x-http-method", "DELETE"),
    # Lists: an application may read any element (Werkzeug's ProxyFix the last), so every one must agree.
    ("X-Forwarded-Host", f"{HOST}, evil.example"),
    ("X-Original-Host", f"{HOST},evil.example"),
    ("X-Forwarded-Proto", "https, http"),
    ("X-Scheme", "https,http"),
    # Forwarded: every element, quoted strings holding "," or ";", any case, malformed lists.
    ("Forwarded", 'for="1.2.3.4,5.6.7.8";host=evil.example;proto=https'),
    ("Forwarded", f'for="a;host={HOST}";host=evil.example;proto=https'),
    ("Forwarded", f"host={HOST};proto=https, host=evil.example"),
    ("Forwarded", f"host={HOST};proto=https,for=1.2.3.4;proto=http"),
    ("Forwarded", 'FOR=x;HOST="evil.example";PROTO=https'),
    ("Forwarded", f'host="{HOST}'),
    ("Forwarded", f"host={HOST} evil.example"),
    ("Forwarded", "host"),
    # A whole URL in a header that usually holds a path names a scheme and a host as well.
    ("X-Original-URI", "https://evil.example/admin/x?a=1"),
    ("X-Rewrite-URL", "https://evil.example/admin/x?a=1"),
    ("X-Forwarded-Uri", f"http://{HOST}/admin/x?a=1"),
    ("X-Envoy-Original-Path", f"http://{HOST}/admin/x?a=1"),
]
# The same families agreeing with the front: harmless.
AGREEING: list[tuple[str, str]] = [
    ("X-Forwarded-Uri", "/admin/x?a=1"),
    ("X-Original-URI", "/admin/x?a=1"),
    ("X-Original-URL", f"https://{HOST}/admin/x?a=1"),
    ("X-Original-Method", "post"),
    ("X-Forwarded-Method", "POST"),
    ("X-Scheme", "https"),
    ("X-Forwarded-Ssl", "on"),
    ("X-Original-Host", HOST.upper()),
    ("Forwarded", f'for=1.2.3.4;host="{HOST}";proto=https'),
    ("X-HTTP-Method", "POST"),
    ("X-Original-URI", f"https://{HOST}/admin/x?a=1"),
    ("Forwarded", f'for="1.2.3.4,5.6.7.8";host={HOST}, for=9.9.9.9;Host="{HOST}";proto=https'),
]


def read(front: str, headers: dict[str, str] | list[tuple[str, str]], query: str = "") -> Original:
    items = list(headers.items()) if isinstance(headers, dict) else headers
    envoy = front == "envoy"
    return read_auth(
        CIMultiDictProxy(CIMultiDict(items)),
        FRONTS[front],
        "POST" if envoy else "GET",
        "/admin/x?a=1" if envoy else "",
        HOST if envoy else "sidecar.sidecar.svc:4180",
        query,
    )


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_each_front_is_read_from_its_own_headers(front: str) -> None:
    assert read(front, OWN[front]) == EXPECTED


@pytest.mark.parametrize(("front", "hostile"), list(itertools.product(sorted(FRONTS), HOSTILE)))
def test_a_client_copy_naming_another_request_is_refused(front: str, hostile: tuple[str, str]) -> None:
    name, value = hostile
    if name in OWN[front]:  # the front overwrites it: the client's copy never arrives; add it twice instead
        with pytest.raises(BadRequest):
            read(front, [*OWN[front].items(), hostile])
        return
    with pytest.raises(BadRequest):
        read(front, {**OWN[front], name: value})


@pytest.mark.parametrize(("front", "agreeing"), list(itertools.product(sorted(FRONTS), AGREEING)))
def test_a_copy_that_agrees_changes_nothing(front: str, agreeing: tuple[str, str]) -> None:
    assert read(front, {**OWN[front], agreeing[0]: agreeing[1]}) == EXPECTED


@pytest.mark.parametrize("front", ["nginx", "ingress-nginx", "traefik", "caddy"])
def test_another_fronts_headers_alone_are_refused(front: str) -> None:
    """The ingress-nginx bypass: its headers are not the configured front's, so a client cannot choose."""
    others = {k: v for f, own in OWN.items() if f not in (front, "envoy") for k, v in own.items()}
    alone = {k: v for k, v in others.items() if k not in OWN[front]}
    for name, value in alone.items():
        with pytest.raises(BadRequest, match="does not set"):
            read(front, {name: value})


def test_nothing_named_reads_nothing() -> None:
    for front in ("nginx", "ingress-nginx", "traefik", "caddy"):
        assert read(front, {}) == Original(None, None, None, None)


@pytest.mark.parametrize(
    "value",
    ["/mcp\udcff", "/m\x00cp", "/mcp\t", "/é", "https://app.example.com/\udcff", "not-a-path", "http://[::1/x"],
)
def test_bytes_and_shapes_a_front_never_writes_are_refused(value: str) -> None:
    name = "X-Original-URL" if "://" in value else "X-Forwarded-Uri"
    front = "ingress-nginx" if name == "X-Original-URL" else "nginx"
    with pytest.raises(BadRequest):
        read(front, {name: value})
    with pytest.raises(BadRequest):
        refuse_undecodable(CIMultiDictProxy(CIMultiDict({"X-Forwarded-Uri": "/mcp\udcff"})))


def test_other_spellings_are_refused_and_the_dash_spellings_are_not() -> None:
    for alias in ("X_Auth_Request_User", "X.Forwarded.Email", "x~original~url", "X+Forwarded+Uri", "X_User"):
        with pytest.raises(BadRequest, match="another spelling"):
            refuse_aliases(CIMultiDict({alias: "v", "X-Forwarded-Uri": "/a"}))
    fine = CIMultiDict({"My_Header": "v", "X-Forwarded-Uri": "/a", "X-Auth-Request-User": "u", "X_Trace": "1"})
    refuse_aliases(fine)  # an app's own underscore header, next to the dash spellings a front sets


FRAGMENTS = ["/admin/x#y", "/admin/x#", "/admin/x?a=1#y", "/admin/x#/../public/", "/#/admin/x", "/admin/x?a#b?c"]


@pytest.mark.parametrize(("front", "target"), list(itertools.product(sorted(FRONTS), FRAGMENTS)))
def test_a_fragment_in_the_original_target_is_refused(front: str, target: str) -> None:
    """nginx passes a client's ``GET /admin/x#y`` on in ``$request_uri``, and most applications serve /admin/x
    for it: judged as the path ``/admin/x%23y`` it would slip past ``^/admin/x$``. Never a browser's request."""
    if front == "envoy":
        with pytest.raises(BadRequest, match="fragment"):
            read_auth(CIMultiDictProxy(CIMultiDict(OWN[front])), FRONTS[front], "POST", target, HOST)
        return
    names = FRONTS[front].uri or (FRONTS[front].url or "",)
    own = {k: v for k, v in OWN[front].items() if k not in (*URI_HEADERS, *URL_HEADERS)}
    headers = {**own, **{name: f"https://{HOST}{target}" if name in URL_HEADERS else target for name in names}}
    with pytest.raises(BadRequest, match="fragment"):
        read(front, headers)
    escaped = {k: v.replace("#", "%23") for k, v in headers.items()}  # an escaped "#" is part of the path
    assert read(front, escaped).path == target.split("?", 1)[0].replace("#", "%23")


BAD_HOSTS = ["app.example.com?", "app.example.com?x=", "a\\b", "a;b", "a b", "app.example.com#", "[::1", "a:b:c",
             "a%2fb", "a,b", "app.example.com:4x", "a@b", "(a)"]  # fmt: skip


@pytest.mark.parametrize(("front", "bad"), list(itertools.product(sorted(FRONTS), BAD_HOSTS)))
def test_a_host_no_request_can_have_is_refused(front: str, bad: str) -> None:
    """Review 2: nginx takes ``Host: app.example.com?`` and ingress-nginx writes it into X-Original-URL as it
    came, where the "?" ended the host and made the path a query: ``https://app.example.com?/admin/x`` was
    read as the page "/" (no step-up rule for /admin/x). A host a request cannot have is refused."""
    own = dict(OWN[front])
    if front == "envoy":
        with pytest.raises(BadRequest):
            read_auth(CIMultiDictProxy(CIMultiDict(own)), FRONTS[front], "POST", "/admin/x?a=1", bad)
        return
    if front == "ingress-nginx":
        own["X-Original-URL"] = f"https://{bad}/admin/x?a=1"
    else:
        own["X-Forwarded-Host"] = bad
    with pytest.raises(BadRequest):
        read(front, own)


def test_envoy_reads_the_subrequest_itself() -> None:
    assert FRONTS["envoy"].method == REQUEST
    with pytest.raises(BadRequest):  # a client's X-Forwarded-Method is no more than a claim
        read("envoy", {"X-Forwarded-Proto": "https", "X-Forwarded-Method": "GET"})


# --- both listeners, one stack -----------------------------------------------------------------------------


async def test_both_listeners_refuse_the_ingress_nginx_bypass_and_bad_bytes_alike() -> None:
    """--front ingress-nginx with a POST-only step-up rule and an OAuth resource: the client's own copies of
    X-Forwarded-Uri/-Method (the bypass of issue 18) and undecodable bytes get the same 400 from both
    listeners; the front's own X-Original-URL decides otherwise."""
    settings = {
        "upstream": "",
        "reverse_proxy": "true",
        "front": "ingress-nginx",
        "fresh_auth_route": "1s=POST=^/admin/",
        "oauth_server": "true",
        "oauth_resource": "/mcp",
    }
    async with stack(MemoryStore(), **settings) as st, browser() as client:
        await sign_in(client, st.base)
        cookie = session_cookie(client)
        issued = await new_grant(st, "/mcp")
        _, tokens, _ = await redeem(st.base, issued)
        await asyncio.sleep(2.1)  # the sign-in is now older than the rule's 1 s
        origin = st.base
        front = lambda path, method="GET": {  # noqa: E731 - what ingress-nginx writes
            "X-Original-URL": origin + path,
            "X-Original-Method": method,
        }
        routed = "?routed_host=127.0.0.1"  # the shipped auth-url's routed_host=$host, as nginx expands it
        jar = {"Cookie": f"_sidecar={cookie}"}
        bearer = {"Authorization": "Bearer " + tokens["access_token"]}
        cases: list[tuple[str, dict[str, str], int]] = [
            (routed, {**jar, **front("/admin/x", "POST")}, 401),  # stale for the POST rule
            (routed, {**jar, **front("/admin/x", "GET")}, 202),
            ("", {**jar, **front("/admin/x", "GET")}, 202),  # a cookie is not host-bound
            (routed, {**jar, **front("/admin/x", "POST"), "X-Forwarded-Uri": "/x"}, 400),
            (routed, {**jar, **front("/admin/x", "POST"), "X-Forwarded-Method": "GET"}, 400),
            (routed, {**jar, **front("/admin/x", "POST"), "X-Original-URI": "/public"}, 400),
            (routed, {**jar, **front("/admin/x", "POST"), "X-Forwarded-Host": "evil.example"}, 400),
            (routed, {**jar, "X-Forwarded-Uri": "/x", "X-Forwarded-Method": "GET"}, 400),  # no X-Original-URL
            (routed, {**bearer, **front("/mcp/a")}, 202),
            ("", {**bearer, **front("/mcp/a")}, 401),  # an auth-url without routed_host: no token
            ("", {**bearer, **front("/mcp/a"), "X-Routed-Host": "127.0.0.1"}, 401),  # a client's header: not read
            ("", {**bearer, **front("/mcp/a?routed_host=127.0.0.1")}, 401),  # nor its own request's query
            ("?routed_host=other.example", {**bearer, **front("/mcp/a")}, 400),  # not the host routed by
            ("?routed_host=other.example", {**jar, **front("/admin/x", "GET")}, 400),
            ("?routed_host=127.0.0.1&routed_host=127.0.0.1", {**bearer, **front("/mcp/a")}, 400),
            ("?routed_host=", {**bearer, **front("/mcp/a")}, 400),
            ("?routed_host=127.0.0.1#x", {**bearer, **front("/mcp/a")}, 400),
            ("?routed_host=127.0.0.1%2E", {**bearer, **front("/mcp/a")}, 400),
            (routed, {**bearer, **front("/mcp/a"), "X-Forwarded-Uri": "/other"}, 400),
            (routed, {**bearer, "X-Original-URL": "http://evil.example/mcp/a"}, 400),  # not the host routed by
            ("", {**bearer, "X-Original-URL": "http://evil.example/mcp/a"}, 401),  # a token for another origin
            (routed, {**bearer, **front("/other"), "X-Forwarded-Uri": "/mcp/a"}, 400),
        ]
        raw_cases: list[tuple[str, bytes, int]] = [
            (routed, b"X-Original-URL: " + origin.encode() + b"/mcp\xff\r\n", 400),
            (routed, b"X-Forwarded-Uri: /mcp\xff\r\n", 400),
            (routed, b"X-Original-Method: G\xffT\r\n", 400),
            (routed, b"Authorization: Bearer \xff\r\n", 400),
            (routed, b"X_Auth_Request_User: mallory\r\n", 400),  # other spellings of identity and original headers
            (routed, b"X.Forwarded.Email: mallory\r\n", 400),
            (routed, b"X~Original~URL: https://evil.example/x\r\n", 400),
            (routed, b"x_forwarded_uri: /x\r\n", 400),
            (routed, b"X-Forwarded-Email2: harmless\r\n", 401),  # no session: not refused for its name
        ]
        host = st.base.split("://", 1)[1]
        async with auth_listener(st) as port:
            main_port = int(st.base.rsplit(":", 1)[1])
            heads = [
                (query, "".join(f"{k}: {v}\r\n" for k, v in extra.items()).encode(), status)
                for query, extra, status in cases
            ] + raw_cases
            for query, extra, status in heads:
                head = f"GET /oauth2/auth{query} HTTP/1.1\r\nHost: {host}\r\n".encode() + extra + b"\r\n"
                ours = await exchange(port, head)
                theirs = await exchange(main_port, head)
                assert ours and theirs, extra
                assert comparable(ours[0]) == comparable(theirs[0]), extra
                assert ours[0][0] == status, (query, extra, ours[0])


async def test_fragments_method_overrides_and_odd_lists_never_pass_a_step_up_on_either_listener() -> None:
    """Review 2: --front nginx (its own X-Forwarded-Uri/-Method, as deploy/nginx writes them for a client's
    request line) with end-anchored and DELETE-only step-up rules and a stale sign-in. A fragment nginx copies
    from the request line, another method-override name, a host or scheme list and a Forwarded element hiding
    in a quoted string are 400 on both listeners; the rules themselves still decide (401) and other paths
    pass (202)."""
    settings = {
        "upstream": "",
        "reverse_proxy": "true",
        "fresh_auth_route": ["1s=^/admin/x$", "1s=DELETE=^/account$"],
    }
    async with stack(MemoryStore(), **settings) as st, browser() as client:
        await sign_in(client, st.base)
        cookie = session_cookie(client)
        await asyncio.sleep(2.1)  # the sign-in is now older than the rules' 1 s
        host = st.base.split("://", 1)[1]

        def nginx(uri: str, method: str = "GET") -> str:  # what deploy/nginx/sidecar.conf writes
            fields = {"X-Forwarded-Uri": uri, "X-Original-URI": uri, "X-Forwarded-Method": method}
            fields |= {"X-Forwarded-Proto": "http", "X-Forwarded-Host": host}
            return "".join(f"{k}: {v}\r\n" for k, v in fields.items())

        cases = [
            (nginx("/admin/x"), 401),
            (nginx("/admin/x?a=1"), 401),
            (nginx("/ADMIN/X"), 401),  # the spellings many applications serve as /admin/x
            (nginx("/admin/x/"), 401),
            (nginx("/%41dmin/x/?a=1"), 401),
            (nginx("/Account/", "DELETE"), 401),
            (nginx("/admin/x%23y"), 202),  # an escaped "#": another path, for the application too
            (nginx("/admin/y"), 202),
            (nginx("/account", "DELETE"), 401),
            (nginx("/account", "POST"), 202),
            *[(nginx(uri), 400) for uri in ("/admin/x#y", "/admin/x#", "/admin/x?a#b", "/admin/x#/../y")],
            *[
                (nginx("/account", "POST") + f"{name}: DELETE\r\n", 400)
                for name in ("X-HTTP-Method", "X-Method-Override", "x-http-method", "X-HTTP-Method-Override")
            ],
            (nginx("/admin/y") + f"X-Original-Host: {host}, evil.example\r\n", 400),
            (nginx("/admin/y") + "X-Scheme: http, https\r\n", 400),
            (nginx("/admin/y") + 'Forwarded: for="1.2.3.4,x";host=evil.example\r\n', 400),
            (nginx("/admin/y") + f"Forwarded: host={host}, host=evil.example\r\n", 400),
            (nginx("/admin/y") + f'Forwarded: for="1.2.3.4,x";host="{host}";proto=http\r\n', 202),
        ]
        async with auth_listener(st) as port:
            main_port = int(st.base.rsplit(":", 1)[1])
            for extra, status in cases:
                head = f"GET /oauth2/auth HTTP/1.1\r\nHost: {host}\r\nCookie: _sidecar={cookie}\r\n{extra}\r\n"
                ours = await exchange(port, head.encode())
                theirs = await exchange(main_port, head.encode())
                assert ours and theirs, extra
                assert comparable(ours[0]) == comparable(theirs[0]), extra
                assert ours[0][0] == status, (extra, ours[0][:2])


async def test_whitespace_at_the_ends_and_repeated_singletons_read_alike_on_both_listeners() -> None:
    """Review 2: the lean listener kept a value's trailing whitespace (llhttp does, aiohttp strips it), so
    ``X-Forwarded-Uri: /admin/x `` passed an end-anchored step-up rule there and not on the main listener;
    and it decided requests with two Host headers, which aiohttp refuses. Both now answer alike."""
    settings = {"upstream": "", "reverse_proxy": "true", "front": "traefik", "fresh_auth_route": ["1s=^/admin/x$"]}
    async with stack(MemoryStore(), **settings) as st, browser() as client:
        await sign_in(client, st.base)
        cookie = session_cookie(client)
        await asyncio.sleep(2.1)
        host = st.base.split("://", 1)[1]
        traefik = f"X-Forwarded-Method: GET\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: {host}\r\n"
        jar = f"Cookie: _sidecar={cookie}\r\n"
        cases = [
            (f"Host: {host}\r\n{jar}{traefik}X-Forwarded-Uri: /admin/x\r\n", 401),
            *[
                (f"Host: {host}\r\n{jar}{traefik}X-Forwarded-Uri: /admin/x{tail}\r\n", 401)
                for tail in (" ", "  ", "\t", " \t ")
            ],
            (f"Host: {host}\r\n{jar}{traefik}X-Forwarded-Uri: /admin/y \r\n", 202),
            (f"Host: {host} \r\nCookie: _sidecar={cookie} \r\n{traefik}X-Forwarded-Uri: /admin/y\r\n", 202),
            (f"Host: {host}\r\n{jar}X-Forwarded-Method: GET \r\nX-Forwarded-Proto: http\t\r\n"
             f"X-Forwarded-Host: {host} \r\nX-Forwarded-Uri: /admin/x \r\nX-Original-URI: /admin/x\r\n", 401),
            *[
                (f"Host: {host}\r\n{jar}{traefik}X-Forwarded-Uri: /admin/y\r\n{name}: {value}\r\n", 400)
                for name, value in (
                    ("Host", "evil.example"),
                    ("host", host),
                    ("User-Agent", "b"),
                    ("Content-Type", "text/plain"),
                    ("Max-Forwards", "1"),
                )
            ],
        ]  # fmt: skip
        async with auth_listener(st) as port:
            main_port = int(st.base.rsplit(":", 1)[1])
            for extra, status in cases:
                if "User-Agent" in extra:
                    extra = "User-Agent: a\r\n" + extra
                elif "Content-Type" in extra:
                    extra = "Content-Type: text/html\r\n" + extra
                elif "Max-Forwards" in extra:
                    extra = "Max-Forwards: 2\r\n" + extra
                head = f"GET /oauth2/auth HTTP/1.1\r\n{extra}\r\n".encode()
                ours = await exchange(port, head)
                theirs = await exchange(main_port, head)
                assert ours and theirs, extra
                assert ours[0][0] == theirs[0][0] == status, (extra, ours[0][:2], theirs[0][:2])
                if status != 400:  # the two parsers word their refusals differently
                    assert comparable(ours[0]) == comparable(theirs[0]), extra


async def test_envoy_paths_are_judged_the_same_on_both_listeners() -> None:
    """--front envoy: ext_authz appends the original path to the auth path; both listeners serve those paths
    and read the original path, method and Host from the subrequest itself (a client's X-Forwarded-Uri
    naming the resource is refused)."""
    settings = {"upstream": "", "reverse_proxy": "true", "front": "envoy", "oauth_server": "true"}
    async with stack(MemoryStore(), oauth_resource="/mcp", **settings) as st:
        issued = await new_grant(st, "/mcp")
        _, tokens, _ = await redeem(st.base, issued)
        bearer = f"Authorization: Bearer {tokens['access_token']}\r\n"
        host = st.base.split("://", 1)[1]
        cases = [
            ("/oauth2/auth/mcp/a", bearer, 202),
            ("/oauth2/auth/mcp", bearer + "X-Forwarded-Proto: http\r\n", 202),
            ("/oauth2/auth/other", bearer, 401),
            ("/oauth2/auth/other", bearer + "X-Forwarded-Uri: /mcp/a\r\n", 400),
            ("/oauth2/auth/mcp/a", bearer + "X-Original-URL: http://evil.example/mcp/a\r\n", 400),
            ("/oauth2/auth/mcp/a", bearer + "X-Forwarded-Host: evil.example\r\n", 400),
            ("/oauth2/authz", bearer, 404),
            # Review 2: the original query comes along (/oauth2/auth/search?q=1): it is the client's, so neither
            # an unknown parameter (403 and an error log for every page with a query) nor a rule it names counts.
            ("/oauth2/auth/mcp/a?page=2", bearer, 202),
            ("/oauth2/auth/mcp/a?allowed_groups=nobody", bearer, 202),
            ("/oauth2/auth/mcp/a?allowed_emails=x@y&max_age=0", bearer, 202),
            ("/oauth2/auth/mcp/a?max_age=0", bearer, 202),
            ("/oauth2/auth/mcp/a?", bearer, 202),
            ("/oauth2/auth?allowed_groups=nobody", bearer, 400),  # no original path: not what ext_authz sends
        ]
        async with auth_listener(st) as port:
            main_port = int(st.base.rsplit(":", 1)[1])
            for path, extra, status in cases:
                head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
                ours = await exchange(port, head)
                theirs = await exchange(main_port, head)
                assert ours and theirs and ours[0][0] == status, (path, extra, ours)
                if status != 404:  # the two 404 pages differ in wording only
                    assert comparable(ours[0]) == comparable(theirs[0]), (path, extra)


async def test_an_untrusted_front_is_named_once_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """A front whose address is not a --trusted-proxy: its headers are not read, and the log says why, once."""
    settings = {"upstream": "", "reverse_proxy": "true", "trusted_proxy": "10.9.9.9/32", "oauth_server": "true"}
    context._untrusted_warned.clear()  # once per process: another test may have been told already
    async with stack(MemoryStore(), oauth_resource="/mcp", **settings) as st:
        host = st.base.split("://", 1)[1]
        head = f"GET /oauth2/auth HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-Uri: /mcp\r\n\r\n".encode()
        main_port = int(st.base.rsplit(":", 1)[1])
        for _ in range(3):
            (answer,) = await exchange(main_port, head)
            assert answer[0] == 401 and not any(k.lower() == "www-authenticate" for k, _ in answer[1])
    said = [r for r in caplog.records if "not in --trusted-proxy" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]


async def test_oauth_issuer_is_the_origin_whatever_the_front_says_and_other_hosts_are_refused() -> None:
    """--oauth-issuer: metadata and challenges name it even when a (trusted) front reports another scheme (TLS
    ended before it); a token for it works when the front names its host, and is refused for another host."""
    issuer = "https://app.example.com"
    settings = {"upstream": "", "reverse_proxy": "true", "oauth_server": "true", "oauth_issuer": issuer}
    async with stack(MemoryStore(), oauth_resource="/mcp", **settings) as st:
        app = st.runners[0].app
        server, svc = app[OAUTH], app[SERVICES]
        async with browser() as b:
            await sign_in(b, st.base)
            ref = svc.codec.load_session(session_cookie(b), time.time())
        session = await svc.sessions.load(ref)
        client = await register(server)
        grant, key = await server.start_grant(
            session.identity, session.tokens, {"sub": session.identity.sub}, client, resource=issuer + "/mcp",
            resource_path="/mcp", scope="openid", client_ip="127.0.0.1", user_agent="test",
        )  # fmt: skip
        verifier, challenge = pkce()
        code = await server.issue_code(grant, key, REDIRECT, challenge)
        status, tokens, _ = await redeem(st.base, Issued(grant, code, verifier, client))
        assert status == 200, tokens
        host = st.base.split("://", 1)[1]
        main_port = int(st.base.rsplit(":", 1)[1])
        bearer = f"Authorization: Bearer {tokens['access_token']}\r\n"
        for front, status in [
            ("X-Forwarded-Uri: /mcp\r\nX-Forwarded-Host: app.example.com\r\nX-Forwarded-Proto: http\r\n", 202),
            ("X-Forwarded-Uri: /mcp\r\nX-Forwarded-Host: app-b.example.com\r\nX-Forwarded-Proto: https\r\n", 401),
            ("X-Forwarded-Uri: /mcp\r\n", 401),  # no host named: the Host header, 127.0.0.1:port
        ]:
            head = f"GET /oauth2/auth HTTP/1.1\r\nHost: {host}\r\n{bearer}{front}\r\n".encode()
            (answer,) = await exchange(main_port, head)
            assert answer[0] == status, (front, answer)
            if status == 401:
                challenge_header = next(v for k, v in answer[1] if k.lower() == "www-authenticate")
                assert f'resource_metadata="{issuer}/.well-known/oauth-protected-resource/mcp"' in challenge_header
        async with aiohttp.ClientSession() as http:
            spoof = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"}
            async with http.get(st.base + "/.well-known/oauth-authorization-server", headers=spoof) as resp:
                assert (await resp.json())["issuer"] == issuer


# (the Host header ingress-nginx writes into X-Original-URL, nginx's $host it routed by, in the auth-url's
# routed_host=$host): read when they agree
ROUTED_AGREE = [
    ("app.example.com", "app.example.com"),
    ("APP.Example.com", "app.example.com"),  # nginx lower-cases $host
    ("app.example.com:443", "app.example.com"),  # and drops the port
    ("app.example.com:8443", "app.example.com"),
    ("app.example.com.", "app.example.com"),  # and one final dot
    ("[::1]:443", "[::1]"),
    ("[::1]", "[::1]"),
    ("10.0.0.1:80", "10.0.0.1"),
]
# ... and refused (400) when they do not: an absolute-form line (GET https://b/ HTTP/1.1, Host: a) or a
# $host no nginx writes (port, final dot, upper case, a list, characters no host has)
ROUTED_DISAGREE = [
    ("app.example.com", "other.example"),
    ("other.example", "app.example.com"),
    ("app.example.com", "app.example.com.other.example"),
    ("app.example.com.other.example", "app.example.com"),
    ("app.example.com", "example.com"),
    ("app.example.com", "[::1]"),
    ("[::1]", "[::2]"),
    ("[::ffff:127.0.0.1]", "127.0.0.1"),
    ("app.example.com", "app.example.com:443"),
    ("app.example.com", "app.example.com."),
    ("app.example.com", "APP.example.com"),
    ("app.example.com", "app.example.com, other.example"),
    ("app.example.com", "user@app.example.com"),
    ("app.example.com", "app%2Eexample.com"),
    ("app.example.com", "app.example.com\\"),
    ("app.example.com", "app.example.com#x"),  # a Host may hold "#", "&", "%", "=": never split or decoded
    ("app.example.com", "app.example.com&routed_host=app.example.com"),
    ("other.example", "other.example&routed_host=app.example.com"),
    ("app.example.com", "x&routed_host=app.example.com"),
    ("app.example.com", "app.example.com&"),
    ("app.example.com", "app.example.com&allowed_groups=a"),
    ("app.example.com", "app.example.com%26x"),
    ("app.example.com", "app.example.com+"),
    ("app.example.com", " app.example.com"),
    ("app.example.com", "app.example.com="),
    ("app.example.com", "[app.example.com]"),
    ("app.example.com", "app.example.com/"),
    ("app.example.com", ""),
    ("app.example.com..", "app.example.com."),
]


@pytest.mark.parametrize(("url_host", "routed"), ROUTED_AGREE)
def test_ingress_nginx_reads_a_url_whose_host_is_the_one_nginx_routed_by(url_host: str, routed: str) -> None:
    for rules in ("", "allowed_groups=a&"):
        found = read("ingress-nginx", {"X-Original-URL": f"https://{url_host}/mcp"}, f"{rules}routed_host={routed}")
        assert (found.host, found.routed, found.path) == (url_host.lower(), routed, "/mcp")


@pytest.mark.parametrize(("url_host", "routed"), ROUTED_DISAGREE)
def test_ingress_nginx_refuses_a_url_whose_host_is_not_the_one_nginx_routed_by(url_host: str, routed: str) -> None:
    for rules in ("", "allowed_groups=a&"):
        with pytest.raises(BadRequest):
            read("ingress-nginx", {"X-Original-URL": f"https://{url_host}/mcp"}, f"{rules}routed_host={routed}")


def test_the_routed_host_is_read_only_from_the_auth_url_and_only_for_ingress_nginx() -> None:
    """Without routed_host ingress-nginx's reading says nothing was routed (no token then: oauth/service.py),
    whatever header a client adds (nginx passes it on where nothing overwrites it); spelt another way it is not
    read (location_rules refuses it); twice, refused; any other front ignores it."""
    url = {"X-Original-URL": "https://app.example.com/mcp"}
    assert read("ingress-nginx", url).routed is None
    assert read("ingress-nginx", {**url, "X-Routed-Host": "app.example.com"}).routed is None
    for query in ("routed_host", "routed%5Fhost=app.example.com", "xrouted_host=app.example.com", "a=routed_host="):
        assert read("ingress-nginx", url, query).routed is None, query
    with pytest.raises(BadRequest):
        read("ingress-nginx", url, "routed_host=app.example.com&routed_host=app.example.com")
    for front in sorted(set(FRONTS) - {"ingress-nginx", "envoy"}):
        assert read(front, dict(OWN[front]), "routed_host=other.example").routed is None, front


def test_split_routed_keeps_the_rules_before_it_and_the_whole_rest_after() -> None:
    assert split_routed("") == ("", None)
    assert split_routed("allowed_groups=a") == ("allowed_groups=a", None)
    assert split_routed("routed_host=a.example") == ("", "a.example")
    assert split_routed("allowed_groups=a&max_age=5&routed_host=a.example&x") == (
        "allowed_groups=a&max_age=5",
        "a.example&x",
    )
    assert split_routed("xrouted_host=a&routed_host=b") == ("xrouted_host=a", "b")
    assert split_routed("routed_host=a&routed_host=b") == ("", "a&routed_host=b")
