"""A request smuggler's and header forger's requests through the proxy (``sidecar/forward.py``), and the
upstream's answer on its way back: what the app and the client receive, read off the wire.

The app is a raw socket server here (an HTTP library would merge, fold or refuse what is being looked at):
it keeps each request head byte for byte and answers with hop-by-hop, Connection-listed and repeated headers."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from sidecar import upstream_client
from sidecar.store import MemoryStore
from tests.stack import Stack, browser, session_cookie, sign_in, stack

ANSWER = (
    b"HTTP/1.1 200 OK\r\n"
    b"Set-Cookie: a=1; Path=/\r\n"
    b"Set-Cookie: b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT\r\n"
    b"Connection: keep-alive, X-Hop-One\r\n"
    b"Connection: X-Hop-Two\r\n"
    b"connection: X-Hop-Three\r\n"
    b"X-Hop-One: 1\r\nX-Hop-Two: 2\r\nX-Hop-Three: 3\r\n"
    b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTrailer: X-T\r\nUpgrade: h2c\r\n"
    b"Server: the-app\r\n"
    b"X-Kept: k\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)


class RawApp:
    """The upstream app as a socket server: the request heads it got, as sent."""

    def __init__(self) -> None:
        self.heads: list[str] = []
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"\r\ncontent-length: *(\d+)", head.lower())
                if length:
                    await reader.readexactly(int(length.group(1)))
                self.heads.append(head.decode("latin-1"))
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def lines(self) -> list[tuple[str, str]]:
        """The last request's header lines, as (name, value)."""
        return [tuple(line.split(": ", 1)) for line in self.heads[-1].split("\r\n")[1:] if line]  # type: ignore[misc]


@asynccontextmanager
async def _signed_in(**overrides: Any) -> AsyncIterator[tuple[Stack, RawApp, str]]:
    app = RawApp()
    server = await asyncio.start_server(app._serve, "127.0.0.1", 0)
    app.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        async with stack(MemoryStore(), upstream=app.url, **overrides) as st, browser() as client:
            await sign_in(client, st.base)
            cookie = session_cookie(client)
            assert cookie
            app.heads.clear()  # the sign-in's own landing page
            yield st, app, cookie
    finally:
        server.close()


async def _exchange(base: str, head: str, body: bytes = b"") -> bytes:
    """One request byte for byte (with ``Connection: close``): the whole answer."""
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(head.encode("latin-1") + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def _request(cookie: str, extra: list[tuple[str, str]], method: str = "GET") -> str:
    lines = [f"{method} /app/x HTTP/1.1", "Host: app.example", "Connection: close", f"Cookie: _sidecar={cookie}"]
    return "\r\n".join(lines + [f"{name}: {value}" for name, value in extra]) + "\r\n\r\n"


async def test_every_connection_line_of_the_answer_names_headers_the_client_never_sees() -> None:
    """RFC 9110 7.6.1 both ways: the request side reads every Connection line; the answer's side must too.
    Set-Cookie lines stay separate (never joined: an Expires date holds a comma), the app's Server is kept."""
    async with _signed_in() as (st, _, cookie):
        answer = (await _exchange(st.base, _request(cookie, []))).decode("latin-1")
        head = answer.split("\r\n\r\n", 1)[0].lower()
        for hop in ("x-hop-one", "x-hop-two", "x-hop-three", "keep-alive:", "proxy-connection", "trailer", "upgrade"):
            assert hop not in head, (hop, answer)
        assert "\r\nset-cookie: a=1; path=/\r\n" in head
        assert "\r\nset-cookie: b=2; expires=wed, 21 oct 2037 07:28:00 gmt\r\n" in head
        assert "\r\nserver: the-app\r\n" in head and "\r\nx-kept: k\r\n" in head
        assert answer.endswith("\r\n\r\nhello")


@pytest.mark.parametrize(
    "sent",
    [
        [("Authorization", "Basic YTpi"), ("Authorization", "Basic Yzpk")],
        [("Authorization", "Basic YTpi"), ("authorization", "Bearer abc")],
        [("AUTHORIZATION", "Bearer a"), ("Authorization", "Bearer a")],
    ],
    ids=["same-spelling", "case-variant", "same-value"],
)
async def test_two_authorization_headers_are_refused_before_the_app_sees_them(sent: list[tuple[str, str]]) -> None:
    """Never joined into "a, b" (which no server reads as either): refused as nginx refuses them (400)."""
    async with _signed_in() as (st, app, cookie):
        answer = await _exchange(st.base, _request(cookie, sent))
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert app.heads == []
        one = await _exchange(st.base, _request(cookie, sent[:1]))  # one is the client's own, forwarded
        assert one.startswith(b"HTTP/1.1 200 ") and dict(app.lines())["Authorization"] == sent[0][1]


async def test_framing_and_hop_by_hop_names_in_underscore_spellings_never_reach_the_app() -> None:
    """``Transfer_Encoding`` or ``Content_Length`` read as ``Transfer-Encoding``/``Content-Length`` by an app
    server that folds ``_`` into ``-`` (as the identity headers are read, ``headers.py``) would frame the pooled
    upstream connection differently from the sidecar: a smuggled request. Dropped, as the ``-`` spellings are."""
    async with _signed_in() as (st, app, cookie):
        sent = [
            ("Transfer_Encoding", "chunked"),
            ("Content_Length", "40"),
            ("content_length", "41"),
            ("Keep_Alive", "timeout=1"),
            ("Proxy_Connection", "keep-alive"),
            ("Expect_", "100-continue"),
            ("X_Kept_Name", "k"),
        ]
        answer = await _exchange(st.base, _request(cookie, sent))
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        names = [name.lower().replace("_", "-") for name, _ in app.lines()]
        assert names[0] == "host" and names.count("host") == 1
        for dropped in ("transfer-encoding", "content-length", "keep-alive", "proxy-connection", "expect"):
            assert dropped not in names, (dropped, app.heads[-1])
        assert ("X_Kept_Name", "k") in app.lines()  # other names with "_" are the app's business, as before


@pytest.mark.parametrize(
    "extra",
    [
        [("Host", "evil.example")],
        [("host", "evil.example")],
        [("Content-Length", "0"), ("content-length", "0")],
        [("Transfer-Encoding", "chunked"), ("Content-Length", "0")],
        [("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")],
        [("X-Forwarded-User ", "mallory")],
        [("X-Custom", "a"), (" X-Forwarded-User", "mallory")],  # obs-fold
        [("X-Forwarded-Us\u0435r", "mallory")],  # a Cyrillic e, sent as UTF-8
    ],
    ids=["two-host", "two-host-case", "two-length", "te-and-length", "two-te", "space-name", "obs-fold", "lookalike"],
)
async def test_what_http_parsers_disagree_on_is_refused_before_any_upstream(extra: list[tuple[str, str]]) -> None:
    async with _signed_in() as (st, app, cookie):
        head = _request(cookie, extra, method="POST")
        answer = await _exchange(st.base, head.encode("utf-8").decode("latin-1"), b"0\r\n\r\n")
        assert answer.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 ")), answer[:200]
        assert app.heads == []


@pytest.mark.parametrize("listed", ["X-Auth-Request-User", "X-Forwarded-User", "Authorization", "X-Forwarded-For"])
async def test_connection_cannot_take_away_what_the_sidecar_sets(listed: str) -> None:
    """The sidecar's identity, ``Authorization`` (``--pass-authorization-header``), ``X-Forwarded-*``, ``Host``
    and ``Content-Length`` are added after the client's Connection-listed names are dropped."""
    async with _signed_in(pass_authorization_header="true") as (st, app, cookie):
        connection = f"close, {listed}, Host, Content-Length, X-Forwarded-Host, X-Forwarded-Proto, Cookie"
        head = _request(cookie, [("Content-Length", "3"), ("Cookie", "app=1"), (listed, "mallory")], "POST")
        answer = await _exchange(st.base, head.replace("Connection: close", f"Connection: {connection}"), b"abc")
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        got = dict(app.lines())
        assert got["Host"] == "app.example" and got["Content-Length"] == "3"
        assert got["X-Auth-Request-User"] == got["X-Forwarded-User"] == "alice@example.com"
        assert got["Authorization"].startswith("Bearer ") and got["X-Forwarded-For"] == "127.0.0.1"
        assert got["X-Forwarded-Host"] == "app.example" and got["X-Forwarded-Proto"] == "http"
        assert "mallory" not in app.heads[-1] and "Cookie" not in got  # the client's own Cookie: it listed it


async def test_the_upstream_client_says_when_it_takes_aiohttps_own_header_path(caplog: Any) -> None:
    """An aiohttp whose merge differs (here: a session with default headers, which the copy would leave out)
    keeps aiohttp's own path, and the log says so once, as hits.py does for its wrapped parts."""
    caplog.set_level(logging.WARNING, logger="sidecar.upstream_client")
    session = aiohttp.ClientSession(headers={"X-Default": "1"})
    try:
        stock = session._prepare_headers
        assert not upstream_client.hand_over(session)
        assert session._prepare_headers == stock
    finally:
        await session.close()
    warnings = [r for r in caplog.records if r.name == "sidecar.upstream_client"]
    assert len(warnings) == 1 and "aiohttp's own" in warnings[0].getMessage()
    caplog.clear()
    plain = aiohttp.ClientSession()
    try:
        assert upstream_client.hand_over(plain)  # this aiohttp: the copy is used, nothing said
    finally:
        await plain.close()
    assert not [r for r in caplog.records if r.name == "sidecar.upstream_client"]


async def test_every_x_forwarded_for_line_of_a_trusted_proxy_reaches_the_app_in_order() -> None:
    """A front that adds its own ``X-Forwarded-For`` line (HAProxy's ``option forwardfor``) after the client's:
    the sidecar finds the client in the right-most untrusted entry of all lines (``context``); the app must get
    the same list, not the client's first line alone, where the forged address is the right-most untrusted one.
    (Hand-made: nginx, Caddy and Traefik join the lines themselves; no HAProxy binary here.)"""
    async with _signed_in(reverse_proxy="true") as (st, app, cookie):
        sent = [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "10.1.2.3"), ("x-forwarded-for", "10.1.2.4")]
        answer = await _exchange(st.base, _request(cookie, sent))
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert dict(app.lines())["X-Forwarded-For"] == "6.6.6.6, 10.1.2.3, 10.1.2.4, 127.0.0.1"
        one = await _exchange(st.base, _request(cookie, [("X-Forwarded-For", "10.9.9.9")]))
        assert one.startswith(b"HTTP/1.1 200 ") and dict(app.lines())["X-Forwarded-For"] == "10.9.9.9, 127.0.0.1"
        none = await _exchange(st.base, _request(cookie, []))
        assert none.startswith(b"HTTP/1.1 200 ") and dict(app.lines())["X-Forwarded-For"] == "127.0.0.1"


@pytest.mark.parametrize(
    "name",
    ["X.Forwarded.User", "x.auth.request.user", "X_Forwarded.Email", "X.Forwarded_For", "Transfer.Encoding"],
)
async def test_dotted_spellings_of_the_sidecars_names_never_reach_the_app(name: str) -> None:
    """PHP registers ``HTTP_X.FORWARDED.USER`` (what a FastCGI gateway such as Caddy's ``php_fastcgi`` makes of
    ``X.Forwarded.User``) as ``$_SERVER['HTTP_X_FORWARDED_USER']``: the same name as the sidecar's own header,
    and which one wins is the gateway's order. ``/oauth2/auth`` refuses such names (``fronts.refuse_aliases``);
    the proxy drops them as it drops the ``_`` spellings."""
    async with _signed_in() as (st, app, cookie):
        answer = await _exchange(st.base, _request(cookie, [(name, "mallory"), ("X.Kept", "k")]))
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert "mallory" not in app.heads[-1] and ("X.Kept", "k") in app.lines()
        assert dict(app.lines())["X-Forwarded-User"] == "alice@example.com"
