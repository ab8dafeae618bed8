"""Every reader of a cookie reads it as ``guard.read_cookie`` does (the Cookie lines joined by "; ", the first
of a name, its value as sent), so one reader never authorises one session while another acts for a second.

Two readers that disagreed were left beside it: aiohttp's ``web.Request.cookies`` (the FIRST Cookie line only,
SimpleCookie's unquoting) and the lean listener's ``AuthRequest.cookies`` (every line, but the LAST of a name
and unquoted). Nothing read them when this was written; a later caller would have picked another session than
the decision did, so neither may be used: this reads the source for them."""

from __future__ import annotations

import ast
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.auth_request import AuthRequest
from sidecar.guard import read_cookie, request_cookies

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
