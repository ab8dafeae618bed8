"""Every reader of a cookie reads it as ``guard.read_cookie`` does (the Cookie lines joined by "; ", the first
of a name, its value as sent), so one reader never authorises one session while another acts for a second.

Two readers that disagreed were left beside it: aiohttp's ``web.Request.cookies`` (the FIRST Cookie line only,
SimpleCookie's unquoting) and the lean listener's ``AuthRequest.cookies`` (every line, but the LAST of a name
and unquoted). Nothing read them when this was written; a later caller would have picked another session than
the decision did, so neither may be used: this reads the source for them."""

from __future__ import annotations

import ast
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.auth_request import AuthRequest
from sidecar.guard import read_cookie, request_cookies
from sidecar.store import MemoryStore
from tests.e2e.chromium import one_page
from tests.stack import Stack, free_port, stack
from tests.test_auth_listener import auth_listener as lean
from tests.test_auth_listener import header
from tests.test_decisions import TOKENS, port_of
from tests.test_split_cookies import crumbs, send, signed_in

SIDECAR = Path(__file__).resolve().parents[1] / "sidecar"


def _request(lines: list[tuple[str, str]]) -> AuthRequest:
    headers = CIMultiDictProxy(CIMultiDict(lines))
    return AuthRequest(web.Application(), "GET", "/oauth2/auth", "", headers, "127.0.0.1", (1, 1))


def test_no_module_reads_a_requests_own_cookie_parser() -> None:
    """``<request>.cookies`` (aiohttp's, or the lean listener's) is read nowhere but in the dev provider
    (its own SSO cookie, not the sidecar's); ``response.cookies`` (the cookies being set) is fine."""
    found = []
    for path in sorted(SIDECAR.rglob("*.py")):
        if path.parent.name == "dev":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "cookies":
                owner = ast.unparse(node.value)
                if "response" not in owner.lower():
                    found.append(f"{path.relative_to(SIDECAR.parent)}:{node.lineno}: {owner}.cookies")
    assert not found, found
    assert not hasattr(AuthRequest, "cookies"), "the lean listener's request must not parse cookies its own way"


def test_the_lean_listeners_request_reads_the_cookie_the_decision_reads() -> None:
    """Hostile families on the lean listener's request object: two session cookies across lines, quoted values,
    '=' in values, names that differ only in case, commas. One rule for all: the first, as sent."""
    cases = [
        ([("Cookie", "_sidecar=A"), ("Cookie", "_sidecar=B")], "A"),
        ([("Cookie", "app=1"), ("Cookie", "_sidecar=B; _sidecar=C")], "B"),
        ([("Cookie", '_sidecar="A"')], '"A"'),  # quotes are the value's: no cookie of ours has them
        ([("Cookie", "_sidecar=A=B=")], "A=B="),
        ([("Cookie", "_SIDECAR=X"), ("Cookie", "_sidecar=A")], "A"),  # names are case-sensitive
        ([("Cookie", "a=1, _sidecar=X"), ("Cookie", "_sidecar=A")], "A"),  # a comma separates nothing
        ([("cookie", "_sidecar=A"), ("COOKIE", "_sidecar=B")], "A"),
    ]
    for lines, expected in cases:
        request = _request(lines)
        assert read_cookie(request, "_sidecar") == expected, lines
        assert request_cookies(request)["_sidecar"] == expected, lines


# Characters Python's str.strip() removes and a cookie parser must not (RFC 6265 5.2 trims SP and HTAB only):
# Chromium keeps "\u00a0_sidecar" and "_sidecar" as two cookies of two names (seen: /usr/bin/chromium stores
# and sends both), so reading the first as the second lets whoever may set a cookie of another name (a
# sibling domain past a "__Host-" prefix, which "\u00a0__Host-x" does not carry) pick the session the sidecar
# uses, and leaves a cookie the sidecar took for its session to the app (nginx's map removes "_sidecar" only).
NOT_COOKIE_SPACE = ("\u00a0", "\u3000", "\u2003", "\u0085", "\u202f", "\u1680", "\u2028", "\u205f")


def space_variants(c: str) -> list[tuple[list[tuple[str, str]], int, str | None]]:
    """(Cookie lines, the status /oauth2/auth answers, the Cookie a trusted front gets back)."""
    out: list[tuple[list[tuple[str, str]], int, str | None]] = []
    for ws in NOT_COOKIE_SPACE:
        out += [
            ([("Cookie", f"{ws}_sidecar={c}")], 401, None),  # another name: not signed in
            ([("Cookie", f"_sidecar{ws}={c}")], 401, None),
            ([("Cookie", f"app=1; {ws}_sidecar={c}")], 401, None),
            ([("Cookie", f"{ws}_sidecar=x"), ("Cookie", f"_sidecar={c}")], 202, f"{ws}_sidecar=x"),  # the app's
            ([("Cookie", f"{ws}_sidecar=x; _sidecar={c}")], 202, f"{ws}_sidecar=x"),
        ]
    out.append(([("Cookie", f" \t_sidecar \t= {c} \t; app=1")], 202, "app=1"))  # SP and HTAB are trimmed
    return out


@pytest.fixture
async def st() -> AsyncIterator[Stack]:
    """Sidecar 0 answers a trusted front's /oauth2/auth (the 202 carries the app's cookies); sidecar 1 proxies
    the demo app. One store and cookie secret: one session works on both."""
    store = MemoryStore()
    async with stack(store, reverse_proxy="true", trusted_proxy="127.0.0.1/32", **TOKENS) as s:
        await s.add_sidecar(store)
        yield s


async def test_a_name_with_other_unicode_space_is_not_the_session_cookie_for_any_reader(st: Stack) -> None:
    cookie = await signed_in(st)
    async with lean(st) as lean_port:
        for lines, status, passed in space_variants(cookie):
            for port in (port_of(st.base), lean_port):
                got = await send(port, "/oauth2/auth", lines)
                assert got[0] == status, (port, lines, got[0])
                if status == 202:
                    assert header(got, "Cookie") == passed.encode().decode("latin-1"), (port, lines, got[1])
            got = await send(port_of(st.sidecars[1]), "/_demo/echo", [*lines, ("Accept", "application/json")])
            assert got[0] == (200 if status == 202 else 401), (lines, got[0])
            if status == 202:
                seen = {k.lower(): v for k, v in json.loads(got[2])["headers"].items()}
                assert crumbs(seen.get("cookie")) == crumbs(passed) and cookie not in str(seen), (lines, seen)
            got = await send(port_of(st.base), "/oauth2/userinfo", lines)
            assert got[0] == (200 if status == 202 else 401), (lines, got[0])


async def test_chromium_keeps_a_tossed_look_alike_cookie_apart_and_so_does_the_sidecar(st: Stack) -> None:
    """The real counterpart of the families above: another server on the same host (cookies ignore ports, RFC
    6265 8.5: another app there, or a sibling domain with Domain=) sets "\\u00a0_sidecar" holding a valid
    session; Chromium keeps it a cookie of its own beside none of ours, sends it, and the sidecar must not take
    it for its session cookie (before: /oauth2/userinfo answered as that session)."""
    cookie = await signed_in(st)

    async def toss(request: web.Request) -> web.Response:
        response = web.Response(text="tossed")
        response.headers.add("Set-Cookie", f"\u00a0_sidecar={cookie}; Path=/")
        return response

    tosser = web.Application()
    tosser.router.add_get("/", toss)
    runner = web.AppRunner(tosser)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with one_page() as page:
            await page.goto(f"http://127.0.0.1:{port}/")
            names = [c["name"] for c in await page.context.cookies(st.base)]
            assert names == ["\u00a0_sidecar"], names  # stored under its own name, sent to the sidecar's port too
            answer = await page.goto(st.base + "/oauth2/userinfo")
            assert answer is not None and answer.status == 401, (answer and answer.status, names)
    finally:
        await runner.cleanup()
