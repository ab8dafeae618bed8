"""Path tricks toward the upstream: what the skip-auth rules match is what every upstream serves.

An oracle (``readings``) reads a forwarded path the ways real servers do: Tomcat/Jetty/Spring cut
``;params`` out of segments, some apps decode twice, Windows servers fold ``\\`` into ``/`` and
drop trailing dots, old Java decoders accept overlong UTF-8, some frameworks fold Unicode. A
hostile path must either be refused (400) or, if it is let through by a rule, be read by every
one of those servers as a path the rule meant.
"""

from __future__ import annotations

import asyncio
import itertools
import posixpath
import re
import unicodedata
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from aiohttp import WSMsgType, web

from sidecar.errors import BadRequest
from sidecar.proxy import normalise_path
from sidecar.store import MemoryStore
from tests.stack import free_port, stack

DOTS = (
    "..",
    ".",
    ".%2e",
    "%2e.",
    "%2e%2e",
    "%2E%2E",
    "%2e",
    "%252e%252e",
    "%c0%ae%c0%ae",
    "%e0%80%ae%e0%80%ae",
    "%ef%bc%8e%ef%bc%8e",
    "...",
    "..%20",
    "%2e%2e%20",
    "..%09",
    "%u002e%u002e",
)
SUFFIXES = ("", ";", ";jsessionid=x", "%3b", "%3Bx=1", "%00", "%0a", "%ff")
SEPARATORS = ("/", "%2f", "%2F", "%5c", "\\", "%252f", "%c0%af", "%ef%bc%8f", "//", "/;/")

NAMED = (
    "/public/..;/admin",
    "/public/..;jsessionid=x/admin",
    "/public/%2e%2e;/admin",
    "/public/.%2e/admin",
    "/public/%2e%2e%2fadmin",
    "/public/..%2fadmin",
    "/public/..%5cadmin",
    "/public/%252e%252e/admin",
    "/public/.;/admin",
    "/public/;/../admin",
    "/public/..%00/admin",
    "/public/%c0%ae%c0%ae/admin",
    "/public/../admin",
    "/public/./../admin",
    "/public/x/../../admin",
    "/public/x/..;/..;/admin",
    "//public/../admin",
    "/public%2f..%2fadmin",
    "/public/..%2f..%2fadmin",
    "/public/%2e%2e/%2e%2e/admin",
    "/public/..\\admin",
    "/PUBLIC/../admin",
    "/PUBLIC/x",
    "/public;/../admin",
    "/public/%%32%65%%32%65/admin",
    "/public/%2%65%2%65/admin",
)


def hostile_paths() -> list[str]:
    """The named attacks plus every dot spelling x parameter x separator, after /public/."""
    generated = [f"/public/{d}{s}{sep}admin" for d, s, sep in itertools.product(DOTS, SUFFIXES, SEPARATORS)]
    return list(NAMED) + generated


def _lenient_decode(path: str) -> str:
    """A permissive decoder as in old Java servers: overlong UTF-8 for '.', '/' and '\\' accepted."""
    for overlong, char in (("%c0%ae", "."), ("%e0%80%ae", "."), ("%c0%af", "/"), ("%c1%9c", "\\")):
        path = re.sub(re.escape(overlong), lambda _, c=char: c, path, flags=re.IGNORECASE)
    path = re.sub(r"%u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), path)  # IIS %uXXXX
    return unquote(path, errors="replace")


def _strip_params(path: str) -> str:
    return re.sub(r";[^/]*", "", path)


def _fold(path: str) -> str:
    """Windows and Unicode folding: \\ is /, fullwidth forms are ASCII, trailing dots and spaces go."""
    path = unicodedata.normalize("NFKC", path).replace("\\", "/")
    segments = []
    for seg in path.split("/"):
        core = seg.rstrip(". \t")
        segments.append(core or seg.strip(" \t"))
    return "/".join(segments)


def readings(raw_path: str) -> set[str]:
    """Every way a server in the wild resolves ``raw_path`` (decoded zero to two times)."""
    out = set()
    raw_path = raw_path.split("?")[0]
    for decodes, params, fold in itertools.product((0, 1, 2), (False, True), (False, True)):
        path = raw_path
        if params:
            path = _strip_params(path)
        for _ in range(decodes):
            path = _lenient_decode(path)
        if params:
            path = _strip_params(path)
        if fold:
            path = _fold(path)
        path = path.split("\x00")[0]  # C string APIs stop at NUL
        normal = posixpath.normpath("/" + path.lstrip("/"))
        out.add("/" + normal.lstrip("/") + ("/" if path.endswith("/") and normal != "/" else ""))
    return out


def test_the_oracle_sees_the_java_reading_of_the_named_attack() -> None:
    assert "/admin" in readings("/public/..;/admin")
    assert "/admin" in readings("/public/%252e%252e/admin")
    assert readings("/public/ok") == {"/public/ok"}


@pytest.mark.parametrize("raw", hostile_paths())
def test_a_hostile_path_is_refused_or_means_one_thing_everywhere(raw: str) -> None:
    try:
        path = normalise_path(raw)
    except BadRequest:
        return
    decoded = {r for r in readings(path) if r != path} | {unquote(path)}
    assert len(decoded) == 1, (raw, path, decoded)  # every server reads the same path
    assert normalise_path(path) == path  # and it is a fixed point: nothing left to reinterpret


def test_ordinary_paths_keep_their_meaning() -> None:
    cases = {
        "/": "/",
        "/public/ok": "/public/ok",
        "/a/b/": "/a/b/",
        "//x//y/": "/x/y/",
        "/.well-known/openid-configuration": "/.well-known/openid-configuration",
        "/files/a%20b": "/files/a%20b",
        "/caf%c3%a9": "/caf%C3%A9",
        "/a%2ecss": "/a.css",
        "/q%3Fx": "/q%3Fx",
        "/100%25": "/100%25",
        "/a'b(c)*,=:@!$&+": "/a'b(c)*,=:@!$&+",
        "/x/..a/a..": "/x/..a/a..",
    }
    for raw, expected in cases.items():
        assert normalise_path(raw) == expected, raw
        assert normalise_path(expected) == expected, expected


def test_refused_spellings() -> None:
    for raw in (
        "/a/../b",
        "/a/./b",
        "/a/.",
        "/..",
        "/a;b",
        "/a%3bb",
        "/a%2fb",
        "/a%5cb",
        "/a\\b",
        "/a%00",
        "/a%0d%0aX:1",
        "/a%7f",
        "/a%c2%85",
        "/a%zz",
        "/a%2",
        "/a%252f",
        "/a%25%32%66",
        "/a%c0%ae",
        "/a%ed%a0%80",
        "/a/%20/b",
        "/a/.%20./b",
        "/a/%ef%bc%8f",
        "/a/%ef%bc%bc",
        "/a/%ef%bc%9b",
        "a/b",
    ):
        with pytest.raises(BadRequest):
            normalise_path(raw)


@dataclass
class Recorder:
    """A tiny upstream that records the raw request target and headers of every request."""

    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [r["raw_path"] for r in self.seen]


@asynccontextmanager
async def recording_upstream() -> AsyncIterator[Recorder]:
    recorder = Recorder()

    async def record(request: web.Request) -> web.StreamResponse:
        recorder.seen.append(
            {
                "raw_path": request.raw_path,
                "method": request.method,
                "headers": dict(request.headers),
                "header_list": list(request.headers.items()),
            }
        )
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str(msg.data)
            return ws
        return web.json_response({"path": request.raw_path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    recorder.url = f"http://127.0.0.1:{port}"
    try:
        yield recorder
    finally:
        await runner.cleanup()


async def raw_request(base: str, target: str, method: str = "GET", headers: dict[str, str] | None = None) -> int:
    """Send ``target`` byte for byte (an HTTP client library would normalise it) and return the status."""
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Accept: application/json", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="surrogateescape"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    return int(data.split(b" ", 2)[1])


async def _attack(rule: str, paths: list[str], meant: Callable[[str], bool]) -> dict[str, int]:
    """Send every path unauthenticated; whatever reaches the upstream must mean what ``rule`` meant."""
    async with (
        recording_upstream() as upstream,
        stack(MemoryStore(), skip_auth_route=rule, upstream=upstream.url + "/") as st,
    ):
        statuses = {}
        for raw in paths:
            upstream.seen.clear()
            statuses[raw] = await raw_request(st.base, raw)
            for got in upstream.paths():
                bad = [r for r in readings(got) if not meant(r)]
                assert not bad, f"{raw!r} reached the upstream as {got!r}, which servers read as {bad}"
            assert statuses[raw] in (200, 400, 401), (raw, statuses[raw])
    return statuses


@pytest.mark.parametrize("raw", ["/a%0ab", "/a%0Ab", "/public/%0a", "/a%0d%0aX:1", "/%0a"])
async def test_a_newline_in_the_path_is_the_sidecars_400_not_the_routers_404(raw: str) -> None:
    """The catch-all route must match decoded newlines too, so such a path meets normalise_path (400, and
    an access line) instead of aiohttp's router (a bare 404 nobody logs)."""
    async with recording_upstream() as upstream, stack(MemoryStore(), upstream=upstream.url + "/") as st:
        assert await raw_request(st.base, raw) == 400
        assert upstream.seen == []


async def test_no_path_trick_reaches_outside_a_public_prefix() -> None:
    statuses = await _attack("GET=^/public/", hostile_paths(), lambda p: p.startswith("/public/"))
    assert statuses["/public/..;/admin"] == 400 and statuses["/PUBLIC/x"] == 401


async def test_no_path_trick_makes_a_suffix_rule_serve_something_else() -> None:
    bases = ("/admin", "/admin/secret", "/public/../admin")
    tricks = (
        ";.css",
        "%3b.css",
        "%00.css",
        "%0a.css",
        "/..;/x.css",
        "/.;.css",
        "%2f.css",
        "%23.css",
        "%3f.css",
        "\\.css",
    )
    paths = [b + t for b, t in itertools.product(bases, tricks)] + ["/ok.css", "/a/ok.css", "/admin"]
    statuses = await _attack("GET=\\.css$", paths, lambda p: p.endswith(".css"))
    assert statuses["/admin;.css"] == 400 and statuses["/ok.css"] == 200 and statuses["/admin"] == 401


async def test_the_upstream_receives_exactly_the_path_the_rules_matched() -> None:
    async with (
        recording_upstream() as upstream,
        stack(MemoryStore(), skip_auth_route="GET=^/public/", upstream=upstream.url + "/") as st,
    ):
        for raw in (
            "/public/ok",
            "/public/a%20b",
            "/public/caf%c3%a9/",
            "/public//x",
            "/public/a%2ecss",
            "/public/%41",
        ):
            upstream.seen.clear()
            assert await raw_request(st.base, raw + "?q=%3B;x") == 200, raw
            assert upstream.paths() == [normalise_path(raw) + "?q=%3B;x"], raw
