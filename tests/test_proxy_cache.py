"""The proxy's hot path: a hot session's sign-in check from the decision cache, and aiohttp's automatic
headers decided once. What the app receives must not change on a cache hit, nor for hostile variants."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from subprocess import PIPE
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from sidecar import proxy, upstream_client
from sidecar.config import build_config
from sidecar.context import SERVICES, Services
from sidecar.store import MemoryStore
from tests.stack import Stack, browser, session_cookie, sidecar_settings, sign_in, sign_out_everywhere, stack
from tests.test_paths import Recorder, recording_upstream

# Identity headers a client forges, in several spellings: never seen by the app, on a miss or on a hit.
FORGED = {
    "X-Forwarded-User": "mallory",
    "X-Forwarded-Email": "mallory@evil.test",
    "X_Forwarded_Groups": "admins",
    "x-auth-request-user": "mallory",
    "X-Auth-Request-Access-Token": "forged-token",
    "X-Forwarded-Access-Token": "forged-token",
    "X-Original-URL": "/admin",
}


@asynccontextmanager
async def _signed_in(**overrides: Any) -> AsyncIterator[tuple[Stack, Recorder, aiohttp.ClientSession, str]]:
    async with recording_upstream() as up, stack(MemoryStore(), upstream=up.url + "/", **overrides) as st:
        async with browser() as client:
            await sign_in(client, st.base)
            cookie = session_cookie(client)
            assert cookie
            yield st, up, client, cookie


def _services(st: Stack) -> Services:
    return st.runners[0].app[SERVICES]


def _proxy_entries(st: Stack) -> list[str]:
    """The Cookie headers the decision cache holds a proxied request's check for."""
    decisions = _services(st).decisions
    assert decisions is not None
    return [key[0] for key in decisions._entries if key[1:] == (proxy._PROXY_KEY,)]


async def _send(base: str, path: str, headers: list[tuple[str, str]], body: bytes = b"", method: str = "GET") -> int:
    """One request byte for byte (an HTTP library would merge or add headers): its status."""
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return int(answer.split(b" ", 2)[1])


def _seen_values(seen: dict[str, object]) -> str:
    return repr(seen["header_list"])


async def test_a_hot_session_is_answered_from_the_cache_and_the_app_sees_the_same_request() -> None:
    async with _signed_in() as (st, up, _, cookie):
        header = f"theme=dark; _sidecar={cookie}; _sidecar_0123456789abcdef=state; app_token=x"
        up.seen.clear()
        for _ in range(4):  # the first two decide in full (the key is kept the second time), then hits
            assert await _send(st.base, "/app/page?q=1", [("Cookie", header), *FORGED.items()]) == 200
        assert _proxy_entries(st) == [header]
        first, *rest = up.seen
        assert all(seen["header_list"] == first["header_list"] for seen in rest), "a hit changed what the app saw"
        headers = first["headers"]
        assert isinstance(headers, dict)
        assert headers["Cookie"] == "theme=dark; app_token=x"  # the app's own cookies kept, the sidecar's gone
        assert headers["X-Forwarded-User"] == headers["X-Auth-Request-User"] == "alice@example.com"
        assert headers["X-Forwarded-Email"] == "alice@example.com"
        text = _seen_values(first)
        for forged in ("mallory", "forged-token", "/admin", "X_Forwarded_Groups"):
            assert forged not in text


async def test_a_session_cookie_only_header_reaches_the_app_without_a_cookie_header_on_hits_too() -> None:
    async with _signed_in() as (st, up, _, cookie):
        up.seen.clear()
        for _ in range(3):
            assert await _send(st.base, "/app", [("Cookie", f"_sidecar={cookie}")]) == 200
        assert _proxy_entries(st) == [f"_sidecar={cookie}"]
        assert all("Cookie" not in seen["headers"] for seen in up.seen)


@pytest.mark.parametrize(
    "variant",
    ["two cookie headers", "session cookie twice", "look-alike name", "authorization", "forged", "other name"],
)
async def test_hostile_variants_are_decided_in_full_every_time_and_never_kept(variant: str) -> None:
    async with _signed_in() as (st, up, _, cookie):
        tampered = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
        headers: list[tuple[str, str]] = {
            "two cookie headers": [("Cookie", f"_sidecar={cookie}"), ("Cookie", "theme=dark")],
            "session cookie twice": [("Cookie", f"_sidecar={cookie}; _sidecar={cookie}")],
            "look-alike name": [("Cookie", f"x_sidecar=1; _sidecar={cookie}")],
            "authorization": [("Cookie", f"_sidecar={cookie}"), ("Authorization", "Basic YTpi")],
            "forged": [("Cookie", f"_sidecar={tampered}")],
            "other name": [("Cookie", f"_sidecarX={cookie}")],
        }[variant]
        up.seen.clear()
        statuses = {await _send(st.base, "/app", headers) for _ in range(4)}
        assert _proxy_entries(st) == []
        if variant in ("forged", "other name"):
            assert statuses == {401} and not up.seen  # not signed in: nothing reaches the app
            return
        assert statuses == {200} and len(up.seen) == 4
        seen = up.seen[-1]["headers"]
        assert isinstance(seen, dict)
        assert seen["X-Forwarded-User"] == "alice@example.com" and cookie not in _seen_values(up.seen[-1])
        if variant == "authorization":
            assert seen["Authorization"] == "Basic YTpi"  # the client's own reaches the app, as before


async def test_sign_out_drops_the_cached_check_at_once() -> None:
    async with _signed_in() as (st, up, client, cookie):
        header = [("Cookie", f"_sidecar={cookie}")]
        for _ in range(3):
            assert await _send(st.base, "/app", header) == 200
        assert _proxy_entries(st)
        assert await sign_out_everywhere(client, st.base) in (302, 303)
        up.seen.clear()
        assert await _send(st.base, "/app", header) == 401
        assert not up.seen and _proxy_entries(st) == []


async def test_an_expiring_token_is_refreshed_transparently_past_a_cached_check() -> None:
    async with (
        recording_upstream() as up,
        stack(MemoryStore(), upstream=up.url + "/", provider_kw={"access_token_ttl": 2}, refresh_skew="1s") as st,
        browser() as client,
    ):
        await sign_in(client, st.base)
        cookie = session_cookie(client)
        header = [("Cookie", f"_sidecar={cookie}")]
        for _ in range(3):
            assert await _send(st.base, "/app", header) == 200
        session = _services(st).decisions._entries[(f"_sidecar={cookie}", proxy._PROXY_KEY)].session  # type: ignore[union-attr]
        await asyncio.sleep(1.3)  # past the refresh moment (2 s token, refreshed 1 s before it expires)
        up.seen.clear()
        assert await _send(st.base, "/app", header) == 200  # the same cookie still works: refreshed in between
        assert len(up.seen) == 1
        sessions = _services(st).sessions
        refreshed = await sessions.load(_services(st).codec.load_session(cookie or "", time.time()))
        assert refreshed is not session and refreshed.tokens.access_token != session.tokens.access_token


async def test_the_app_gets_no_header_aiohttp_would_add_and_keeps_the_clients_own() -> None:
    async with _signed_in() as (st, up, _, cookie):
        jar = [("Cookie", f"_sidecar={cookie}")]
        up.seen.clear()
        assert await _send(st.base, "/bare", jar) == 200
        assert await _send(st.base, "/bare", jar, body=b"payload", method="POST") == 200
        for seen in up.seen:
            names = {name.lower() for name, _ in seen["header_list"]}
            assert not names & {"user-agent", "accept-encoding", "content-type"}, names
            assert seen["headers"]["Accept"] == "*/*"  # aiohttp's default, as before
        own = [("Accept", "text/x"), ("User-Agent", "ua/1"), ("Accept-Encoding", "br"), ("Content-Type", "a/b")]
        up.seen.clear()
        assert await _send(st.base, "/own", jar + own, body=b"x", method="PUT") == 200
        seen = up.seen[0]["headers"]
        assert isinstance(seen, dict)
        assert [seen[name] for name, _ in own] == [value for _, value in own]


async def test_the_fast_request_class_is_used_only_when_it_matches_aiohttps_own() -> None:
    class AddsAnAgent(aiohttp.ClientRequest):
        def update_auto_headers(self, skip_auto_headers: object) -> None:
            super().update_auto_headers(None)  # forgets the skip list: a User-Agent appears

    class Broken(aiohttp.ClientRequest):
        def update_auto_headers(self, skip_auto_headers: object) -> None:
            raise AttributeError("an aiohttp this class was not written for")

    loop = asyncio.get_running_loop()
    assert upstream_client.same_auto_headers(loop)
    assert not upstream_client.same_auto_headers(loop, AddsAnAgent)
    assert not upstream_client.same_auto_headers(loop, Broken)
    client = upstream_client.upstream_client(
        build_config(sidecar_settings("http://127.0.0.1:1", 1, upstream_timeout="7s"))
    )
    try:
        assert client._request_class is upstream_client._UpstreamRequest
        assert client.timeout.sock_read == client.timeout.sock_connect == 7
    finally:
        await client.close()


@asynccontextmanager
async def _raw_upstream(head: bytes, body: bytes) -> AsyncIterator[str]:
    """An upstream that answers every request with exactly these header lines (no library tidies them)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.close()


ANSWER_HEADS = {
    "plain": b"Content-Type: text/plain\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-App: kept\r\n",
    "connection-listed": b"Connection: X-Secret, keep-alive\r\nX-Secret: gone\r\nSet-Cookie: a=1\r\nX-App: kept\r\n",
    "keep-alive": b"Keep-Alive: timeout=5\r\nX-App: kept\r\nSet-Cookie: a=1\r\n",
    "odd case": b"kEEp-aLIVE: timeout=5\r\nPROXY-AUTHENTICATE: Basic\r\nX-App: kept\r\nSet-Cookie: a=1\r\n",
    "trailer and upgrade": b"Trailer: X-T\r\nUpgrade: h2c\r\nTE: trailers\r\nX-App: kept\r\nSet-Cookie: a=1\r\n",
}


@pytest.mark.parametrize("case", list(ANSWER_HEADS))
async def test_the_answer_keeps_the_apps_headers_and_never_a_hop_by_hop_one(case: str) -> None:
    async with _raw_upstream(ANSWER_HEADS[case], b"hello") as up, stack(MemoryStore(), upstream=up) as st:
        async with browser() as client:
            await sign_in(client, st.base, rd="/")
            for _ in range(3):  # full decision, kept, then a hit: the same answer each time
                async with client.get(f"{st.base}/page") as resp:
                    assert resp.status == 200 and await resp.read() == b"hello"
                    names = {name.lower() for name in resp.headers}
                    assert resp.headers["X-App"] == "kept" and "a=1" in resp.headers.getall("Set-Cookie")
                    assert not names & {"x-secret", "keep-alive", "proxy-authenticate", "trailer", "upgrade", "te"}
                    if case == "plain":
                        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]  # both, in order


async def test_a_slow_stream_to_a_client_still_there_is_not_cut_by_the_watcher() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        await sign_in(client, st.base)
        async with client.get(f"{st.base}/_demo/stream?n=4&delay=0.6") as resp:  # about 2 s: two looks
            lines = [line async for line in resp.content]
        assert lines == [f"chunk {i}\n".encode() for i in range(4)]


@asynccontextmanager
async def _upstream_without_100(saw: list[bytes]) -> AsyncIterator[str]:
    """An upstream that reads the body without ever sending ``100 Continue`` (RFC 9110 10.1.1 lets a server do
    that) and echoes it: a proxy that forwards ``Expect`` and waits for the upstream's 100 would hang."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        saw.append(head)
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
        lengths = [v for k, v in fields.items() if k.strip().lower() == b"content-length"]
        chunked = any(k.strip().lower() == b"transfer-encoding" for k in fields)
        if lengths:
            body = await reader.readexactly(int(lengths[0]))
        elif chunked:
            body = b""
            while size := int((await reader.readline()).strip(), 16):
                body += await reader.readexactly(size)
                await reader.readline()
            await reader.readline()
        else:
            body = b""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    finally:
        server.close()


async def _expecting(base: str, cookie: str, body: bytes, *, chunked: bool = False) -> tuple[int, bytes]:
    """A client that sends ``Expect: 100-continue`` and its body once it gets the interim 100 (as curl does)."""
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    head = f"PUT /up HTTP/1.1\r\nHost: {parts.netloc}\r\nCookie: _sidecar={cookie}\r\n{framing}\r\n"
    writer.write((head + "Expect: 100-continue\r\nConnection: close\r\n\r\n").encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")  # the sidecar's own interim answer
    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)
    answer = await reader.read()
    writer.close()
    status_head, _, got = answer.partition(b"\r\n\r\n")
    return int(status_head.split(b" ", 2)[1]), got


async def test_expect_100_continue_is_answered_by_the_sidecar_and_never_forwarded_upstream(tmp_path: Path) -> None:
    """Fails without the fix: the sidecar forwarded ``Expect`` and aiohttp's client waited for the upstream's 100
    before sending the body, so an upstream that never sends one got no body and the request hung, past
    ``--upstream-timeout`` (the stack's cleanup then waits for it: without the fix this ends at pytest-timeout)."""
    saw: list[bytes] = []
    async with _upstream_without_100(saw) as up, stack(MemoryStore(), upstream=up, upstream_timeout="3s") as st:
        async with browser() as client:
            await sign_in(client, st.base, rd="/")
            cookie = session_cookie(client)
            assert cookie
        small, large = b"small body", bytes(range(256)) * 400  # read whole / streamed (over proxy.WHOLE_BODY)
        assert len(large) > proxy.WHOLE_BODY
        saw.clear()
        for body, chunked in ((small, False), (small, False), (small, False), (large, False), (small, True)):
            status, got = await asyncio.wait_for(_expecting(st.base, cookie, body, chunked=chunked), 10)
            assert (status, got) == (200, body), (status, got[:100], chunked)  # misses, then hits: the same
        assert _proxy_entries(st)  # the hits were hits
        # the real client: curl sends Expect: 100-continue itself for an upload this size (seen by the upstream?)
        curl = shutil.which("curl")
        upload = tmp_path / "upload"
        upload.write_bytes(large * 21)  # over curl's 1 MiB threshold for sending Expect
        assert curl, "curl is missing: install it (Debian: apt-get install curl)"
        command = [curl, "-sS", "--max-time", "10", "-X", "PUT", "--data-binary", f"@{upload}", "-v", f"{st.base}/up"]
        command += ["-H", f"Cookie: _sidecar={cookie}", "-H", "Content-Type: application/octet-stream"]
        proc = await asyncio.create_subprocess_exec(*command, stdout=PIPE, stderr=PIPE)
        out, err = await proc.communicate()
        assert b"> Expect: 100-continue" in err, err[-500:]  # curl did ask
        assert proc.returncode == 0 and out == large * 21, (proc.returncode, err[-500:])
        assert len(saw) == 6 and not any(b"expect" in head.lower() for head in saw), saw


async def test_several_cookie_headers_reach_the_app_as_one_without_the_sidecars_cookies() -> None:
    """Fails without the fix: the headers were joined by ", " (the app read ``a=1, b=2`` as one cookie ``a``), and
    two spellings of the name (``Cookie``, ``cookie``) reached the app as two Cookie headers. Never cached."""
    async with _signed_in() as (st, up, _, cookie):
        variants = [
            [("Cookie", f"a=1; _sidecar={cookie}"), ("Cookie", "b=2")],
            [("Cookie", f"_sidecar={cookie}; a=1"), ("cookie", "b=2")],  # the session is read from the first one
            [
                ("COOKIE", f"a=1; _sidecar={cookie}"),
                ("Cookie", "_sidecar=x"),
                ("cookie", "_sidecar_0123456789abcdef=s; b=2"),
            ],
        ]
        for headers in variants:
            up.seen.clear()
            for _ in range(3):
                assert await _send(st.base, "/app", headers) == 200
            for seen in up.seen:
                cookies = [value for name, value in seen["header_list"] if name.lower() == "cookie"]
                assert cookies == ["a=1; b=2"], (headers, seen["header_list"])
        assert _proxy_entries(st) == []


async def test_pipelined_head_304_and_get_answers_keep_their_framing_on_misses_and_hits() -> None:
    """The upstream's answer headers passed on as they are: a HEAD's Content-Length (small and over
    ``WHOLE_BODY``) and a 304's are kept or dropped without a body byte, so the next answer on the keep-alive
    connection starts where it should. Checked at once; held before (a regression guard for the pass-through)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                first = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0]
            except asyncio.IncompleteReadError:
                break
            method, path = first.split(b" ")[:2]
            n = int(path.rsplit(b"/", 1)[1])
            status = b"304 Not Modified" if path.startswith(b"/304") else b"200 OK"
            body = b"" if method == b"HEAD" or status != b"200 OK" else b"x" * n
            writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\nX-App: %s\r\n\r\n%s" % (status, n, path, body))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    upstream = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        async with stack(MemoryStore(), upstream=upstream) as st, browser() as client:
            await sign_in(client, st.base, rd="/a/0")
            cookie = session_cookie(client)
            asked = [("HEAD", "/a/5"), ("HEAD", f"/a/{proxy.WHOLE_BODY + 1}"), ("GET", "/304/7"), ("GET", "/a/3")]
            asked += [("HEAD", "/a/0"), ("GET", f"/a/{proxy.WHOLE_BODY + 2}"), ("GET", "/a/2")] * 2
            parts = urlsplit(st.base)
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            head = f"HTTP/1.1\r\nHost: {parts.netloc}\r\nCookie: _sidecar={cookie}\r\n"
            writer.write("".join(f"{m} {p} {head}\r\n" for m, p in asked).encode())
            writer.write(f"GET /a/1 {head}Connection: close\r\n\r\n".encode())
            await writer.drain()
            stream = await asyncio.wait_for(reader.read(), 20)
            writer.close()
        for method, path in [*asked, ("GET", "/a/1")]:
            status_line, _, stream = stream.partition(b"\r\n")
            fields, _, stream = stream.partition(b"\r\n\r\n")
            headers = dict(line.lower().split(b": ", 1) for line in fields.split(b"\r\n"))
            assert headers[b"x-app"] == path.encode(), (method, path, status_line)
            n = int(path.rsplit("/", 1)[1])
            if path.startswith("/304"):
                assert status_line.endswith(b"304 Not Modified") and b"content-length" not in headers
                continue
            assert headers[b"content-length"] == str(n).encode() and b"transfer-encoding" not in headers
            if method == "GET":
                body, stream = stream[:n], stream[n:]
                assert body == b"x" * n
        assert stream == b""
        assert _proxy_entries(st)  # most of them were hits
    finally:
        server.close()
