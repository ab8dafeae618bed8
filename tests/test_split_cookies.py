"""Cookies split over several ``Cookie`` headers (RFC 9113 8.2.3: an HTTP/2 client may send each cookie as a
header line of its own, and a front may pass them on so): every place the sidecar reads a cookie reads them
joined by "; ", the first of a name winning, and the decision cache keeps nothing for such a request.

The fronts the repository ships join an HTTP/2 client's cookie crumbs into one line (nginx's
ngx_http_v2_construct_cookie_header, Go's HTTP/2 server for Traefik and Caddy), but pass an HTTP/1.1
client's several Cookie lines on as they came (tests/e2e/test_real_fronts.py sends them through each);
these are the hand-made hostile variants at the sidecar itself. Real app, dev provider, raw sockets (a
client library would join or reorder the headers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import pytest

from sidecar.store import MemoryStore
from tests.stack import Stack, browser, session_cookie, sign_in, stack
from tests.test_auth_listener import Response, header
from tests.test_auth_listener import auth_listener as lean
from tests.test_decisions import TOKENS, port_of, svc_of

Headers = list[tuple[str, str]]


@pytest.fixture
async def st() -> AsyncIterator[Stack]:
    """Sidecar 0 answers a trusted front's /oauth2/auth (no upstream: the 202 carries the app's cookies);
    sidecar 1 proxies the demo app. One store and cookie secret: one session works on both."""
    store = MemoryStore()
    async with stack(store, reverse_proxy="true", trusted_proxy="127.0.0.1/32", **TOKENS) as s:
        await s.add_sidecar(store)
        yield s


async def send(port: int, target: str, headers: Headers, method: str = "GET") -> Response:
    """One request with exactly these header lines, in this order, on its own connection."""
    head = f"{method} {target} HTTP/1.1\r\nHost: app.example\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write((head + "Connection: close\r\n\r\n").encode())
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    pairs = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    return int(lines[0].split(" ")[1]), pairs, body


async def signed_in(st: Stack) -> str:
    async with browser() as client:
        await sign_in(client, st.base)
        cookie = session_cookie(client)
    assert cookie
    return cookie


def crumbs(header: str | None) -> list[str]:
    """The cookies of a header, without the empty crumbs a client may send (the proxy passes those on)."""
    return [part.strip() for part in (header or "").split(";") if part.strip()]


def variants(c: str) -> list[tuple[Headers, int, str | None]]:
    """(Cookie header lines, the status /oauth2/auth answers, the Cookie a trusted front gets back)."""
    forged = c[:-2] + ("AA" if not c.endswith("AA") else "BB")
    return [
        ([("Cookie", "app=1"), ("Cookie", f"_sidecar={c}")], 202, "app=1"),  # the session in the second line
        ([("Cookie", f"_sidecar={c}"), ("Cookie", "app=1")], 202, "app=1"),
        ([("Cookie", "a=1; b=2"), ("Cookie", "t=d"), ("Cookie", f"_sidecar={c}; z=9")], 202, "a=1; b=2; t=d; z=9"),
        ([("Cookie", ""), ("Cookie", f"_sidecar={c}")], 202, ""),  # an empty crumb
        ([("Cookie", " ; ;"), ("Cookie", f"  _sidecar = {c} ")], 202, ""),  # whitespace and empty crumbs
        ([("Cookie", "x=_sidecar"), ("Cookie", f"_sidecar={c}")], 202, "x=_sidecar"),  # the name as a value first
        ([("cookie", "app=1"), ("COOKIE", f"_sidecar={c}")], 202, "app=1"),  # any spelling of the name
        ([("Cookie", "_sidecar_csrf_ab=1"), ("Cookie", f"_sidecar={c}")], 202, ""),  # an attempt cookie never passes
        # The session cookie twice across two lines: the first one decides, as within one line
        ([("Cookie", f"_sidecar={c}"), ("Cookie", f"_sidecar={forged}")], 202, ""),
        ([("Cookie", f"_sidecar={forged}"), ("Cookie", f"_sidecar={c}")], 401, None),
        ([("Cookie", "_sidecar="), ("Cookie", f"_sidecar={c}")], 401, None),  # an empty first one decides too
        ([("Cookie", "app=1"), ("Cookie", f"_sidecar={forged}")], 401, None),
        ([("Cookie", "app=1"), ("Cookie", "theme=dark")], 401, None),
        ([("Cookie", "app=1"), ("Cookie", f"_sidecarX={c}")], 401, None),  # a look-alike name
        # Headers of other names are never cookies
        ([("Cookie", "app=1"), ("Cookie2", f"_sidecar={c}")], 401, None),
        ([("Cookie", "app=1"), ("X-Cookie", f"_sidecar={c}")], 401, None),
        ([("Cookie", "app=1"), ("Set-Cookie", f"_sidecar={c}")], 401, None),
        ([("Cookies", f"_sidecar={c}")], 401, None),
    ]


async def test_auth_reads_every_cookie_header_on_both_listeners_and_keeps_none(st: Stack) -> None:
    cookie = await signed_in(st)
    cache = svc_of(st).decisions
    assert cache is not None
    async with lean(st) as lean_port:
        for port in (port_of(st.base), lean_port):
            for lines, status, passed in variants(cookie):
                for _ in range(3):  # from the second time a key is seen it would be kept: never here
                    got = await send(port, "/oauth2/auth", lines)
                    assert got[0] == status, (port, lines, got)
                    if status == 202:
                        assert header(got, "X-Auth-Request-Email") == "alice@example.com", (port, lines)
                        assert header(got, "Cookie") == passed, (port, lines, got[1])  # the app's, joined
                        assert cookie not in str(got[1]), lines
                assert len(cache) == 0, (port, lines)
        # The same session in one header is kept as before: the split ones above were not for want of a session.
        for _ in range(3):
            assert (await send(lean_port, "/oauth2/auth", [("Cookie", f"app=1; _sidecar={cookie}")]))[0] == 202
        assert len(cache) == 1


async def test_the_proxy_userinfo_and_account_read_every_cookie_header(st: Stack) -> None:
    cookie = await signed_in(st)
    proxy = port_of(st.sidecars[1])
    for lines, status, passed in variants(cookie):
        got = await send(proxy, "/_demo/echo", [*lines, ("Accept", "application/json")])
        assert got[0] == (200 if status == 202 else 401), (lines, got[0])
        if status == 202:
            seen = {k.lower(): v for k, v in json.loads(got[2])["headers"].items()}
            assert seen.get("x-forwarded-email") == "alice@example.com", (lines, seen)
            assert crumbs(seen.get("cookie", "")) == crumbs(passed) and cookie not in str(seen), (lines, seen)
        got = await send(port_of(st.base), "/oauth2/userinfo", lines)
        assert got[0] == (200 if status == 202 else 401), (lines, got[0])
        got = await send(port_of(st.base), "/oauth2/account", [*lines, ("Accept", "text/html")])
        assert (got[0] == 200) == (status == 202), (lines, got[0])
        if status == 202:
            assert b"alice@example.com" in got[2], lines
    assert len(svc_of(st, 1).decisions or ()) == 0  # the proxy's cache kept none of them either


async def test_sign_out_ends_the_session_named_in_a_later_cookie_header(st: Stack) -> None:
    cookie = await signed_in(st)
    lines = [("Cookie", "app=1"), ("Cookie", f"_sidecar={cookie}")]
    got = await send(port_of(st.base), "/oauth2/sign_out", lines)
    assert got[0] == 302 and any(k.lower() == "set-cookie" and v.startswith("_sidecar=") for k, v in got[1]), (
        got
    )  # the cookie is cleared ...
    got = await send(port_of(st.base), "/oauth2/auth", [("Cookie", f"_sidecar={cookie}")])
    assert got[0] == 401, got  # ... and the session it named is gone, not only the cookie


async def test_sign_in_finds_its_attempt_cookie_in_a_later_cookie_header(st: Stack) -> None:
    """The callback reads the sign-in attempt's cookie wherever its crumb came, and /oauth2/start counts the
    attempts across every line (it clears the oldest past the limit)."""
    base = st.base
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/oauth2/start?rd=/x", allow_redirects=False) as resp:
            assert resp.status == 302
            attempt = resp.cookies  # the attempt cookie, set on this answer
            to_provider = resp.headers["Location"]
        ((name, morsel),) = attempt.items()
        async with http.get(to_provider, allow_redirects=False) as resp:  # the dev provider signs alice in
            back = resp.headers["Location"]
        assert urlsplit(back).path == "/oauth2/callback"
    target = back.split(urlsplit(back).netloc, 1)[1]
    lines = [("Cookie", "app=1"), ("Cookie", "theme=dark"), ("Cookie", f"{name}={morsel.value}")]
    got = await send(port_of(base), target, lines)
    assert got[0] == 302 and header(got, "Location") == "/x", got
    made = [v for k, v in got[1] if k.lower() == "set-cookie" and v.startswith("_sidecar=")]
    session = made[0].split(";", 1)[0].split("=", 1)[1]
    assert (await send(port_of(base), "/oauth2/auth", [("Cookie", f"_sidecar={session}")]))[0] == 202
