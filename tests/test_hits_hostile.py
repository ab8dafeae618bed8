"""Hostile variants on the main listener's hit-first path (``sidecar/hits.py``), from a review of it: each
case here once went wrong. Raw sockets, the real app, the dev provider."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from sidecar.app import build_app
from sidecar.context import SERVICES
from sidecar.hits import HitFirstSite
from sidecar.store import MemoryStore
from tests.stack import Stack, stack
from tests.test_auth_listener import _read_response, header
from tests.test_decisions import TOKENS, _signed_in, lookups, port_of
from tests.test_hits import counting, one_by_one, read_until_quiet, req


@pytest.fixture
async def st() -> AsyncIterator[Stack]:
    async with stack(MemoryStore(), reverse_proxy="true", trusted_proxy="127.0.0.1/32", **TOKENS) as s:
        yield s


@pytest.mark.parametrize("misses", [(), (5,), (3, 40), (31, 32, 33)])
async def test_more_pipelined_hits_than_aiohttps_queue_limit_all_answered(st: Stack, misses: tuple[int, ...]) -> None:
    """aiohttp's parser stops after 32 queued requests and keeps the rest until aiohttp's queue drains; hits never
    enter that queue, so the rest waited for the client's next bytes (a client waiting for its 80 answers hung)."""
    cookie = await _signed_in(st)
    main = port_of(st.base)
    await one_by_one(main, [req(0, cookie)] * 2)  # the entry exists from here on
    n = 80
    reader, writer = await asyncio.open_connection("127.0.0.1", main)
    try:
        writer.write("".join(req(i, None if i in misses else cookie) for i in range(n)).encode())
        got = []
        for _ in range(n):
            answer = await asyncio.wait_for(_read_response(reader), 5)
            assert answer is not None
            got.append((answer[0], header(answer, "X-Request-Id")))
    finally:
        writer.close()
    assert got == [(401 if i in misses else 202, f"r{i}") for i in range(n)]


async def test_a_new_connection_that_only_gets_hits_is_still_closed_when_idle(st: Stack) -> None:
    """aiohttp closes an idle keep-alive connection only once it has answered on it (``_keepalive``, False on a
    new connection before aiohttp 3.14.5): a connection whose every request was a hit stayed open for ever, so
    each client could hold a socket. (Fails without the fix on aiohttp 3.14.3/3.14.4; 3.14.5 starts it True.)"""
    cookie = await _signed_in(st)
    app = build_app(st.configs[0], store=st.runners[0].app[SERVICES].sessions.store)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=0.5)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    await HitFirstSite(runner, sock).start()
    try:
        await one_by_one(port, [req(0, cookie)] * 2)  # the entry, made on another connection
        made = counting(runner.server)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(1, cookie).encode())
        answer = await asyncio.wait_for(_read_response(reader), 3)
        assert answer is not None and header(answer, "X-Request-Id") == "r1"
        assert made == []  # a hit: aiohttp made no request, so only the hit path can start the idle clock
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server once idle
        writer.close()
    finally:
        await runner.cleanup()


def _variants(cookie: str) -> dict[str, str]:
    """Hostile and odd spellings of one auth request; each alone on its connection."""
    c = f"Cookie: _sidecar={cookie}\r\n"
    get = "GET /oauth2/auth HTTP/1.1\r\nHost: app.example\r\n"

    def line(target: str, method: str = "GET", version: str = "HTTP/1.1") -> str:
        return f"{method} {target} {version}\r\nHost: app.example\r\n"

    return {
        "plain": get + c + "\r\n",
        "no Host": "GET /oauth2/auth HTTP/1.1\r\n" + c + "\r\n",
        "two Host": get + "Host: b\r\n" + c + "\r\n",
        "Content-Length: 0": get + c + "Content-Length: 0\r\n\r\n",
        "Content-Length twice": get + c + "Content-Length: 0\r\nContent-Length: 0\r\n\r\n",
        "chunked GET": get + c + "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "CL and TE": get + c + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "obs-fold": get + c + "X-Foo: a\r\n b\r\n\r\n",
        "obs-fold in a read header": get + c + "X-Forwarded-Uri: /a\r\n /admin\r\n\r\n",
        "bare LF": (get + c).replace("\r\n", "\n") + "\n",
        "bad request id": get + c + "X-Request-Id: a b\r\n\r\n",
        "long request id": get + c + "X-Request-Id: " + "a" * 65 + "\r\n\r\n",
        "two request ids": get + c + "X-Request-Id: x1\r\nX-Request-Id: x2\r\n\r\n",
        "8-bit User-Agent": get + c + "User-Agent: caf\xe9\r\n\r\n",
        "8-bit X-Forwarded-Uri": get + c + "X-Forwarded-Uri: /caf\xe9\r\n\r\n",
        "control in X-Forwarded-Host": get + c + "X-Forwarded-Host: a\x01b\r\n\r\n",
        "8-bit app cookie (passed back)": get + f"Cookie: _sidecar={cookie}; app=caf\xe9\r\n\r\n",
        "absolute form": line("http://app.example/oauth2/auth") + c + "\r\n",
        "empty query": line("/oauth2/auth?") + c + "\r\n",
        "fragment": line("/oauth2/auth?a#b") + c + "\r\n",
        "OPTIONS": line("/oauth2/auth", "OPTIONS") + c + "\r\n",
        "POST, no body": line("/oauth2/auth", "POST") + c + "Content-Length: 0\r\n\r\n",
        "unknown method": line("/oauth2/auth", "FOO") + c + "\r\n",
        "lower-case method": line("/oauth2/auth", "get") + c + "\r\n",
        "keep-alive, close": get + c + "Connection: keep-alive, close\r\n\r\n",
        "Connection: upgrade": get + c + "Connection: upgrade\r\n\r\n",
        "Upgrade alone": get + c + "Upgrade: websocket\r\n\r\n",
        "websocket upgrade": get + c + "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "Expect: other": get + c + "Expect: foo\r\n\r\n",
        "HTTP/1.2": line("/oauth2/auth", version="HTTP/1.2") + c + "\r\n",
        "header at the limit": get + c + "X-Big: " + "a" * 8100 + "\r\n\r\n",
        "header past the limit": get + c + "X-Big: " + "a" * 8200 + "\r\n\r\n",
        "200 headers": get + c + "".join(f"X-H{i}: v\r\n" for i in range(200)) + "\r\n",
        "space before colon": get + c + "X-Forwarded-Uri : /admin\r\n\r\n",
        "tabs around a value": get + c + "X-Forwarded-Uri:\t/admin\t\r\n\r\n",
        "underscore spelling": get + c + "X_Forwarded_Uri: /admin\r\n\r\n",
        "Authorization": get + c + "Authorization: Bearer x\r\n\r\n",
        "double slash": line("//oauth2/auth") + c + "\r\n",
        "dot segment": line("/oauth2/./auth") + c + "\r\n",
        "encoded path": line("/oauth2/%61uth") + c + "\r\n",
        "trailing slash": line("/oauth2/auth/") + c + "\r\n",
        "8-bit query": line("/oauth2/auth?a=\xe9") + c + "\r\n",
        "X-Real-IP": get + c + "X-Real-IP: 203.0.113.5\r\n\r\n",
        "Forwarded": get + c + "Forwarded: for=203.0.113.9\r\n\r\n",
        "Host with a port": "GET /oauth2/auth HTTP/1.1\r\nHost: app.example:8443\r\n" + c + "\r\n",
    }


async def test_every_variant_gets_the_same_bytes_whether_decided_or_answered_from_the_table(st: Stack) -> None:
    """Each variant four times, each on a new connection: the first two are decided (the second is kept when
    it may be), the last two may be hits. Every answer must be the first one's (Date and a generated id aside)
    and the hit path must have answered some. Found: the app's cookie passed back with an undecodable byte, which
    aiohttp drops (its C writer) or fails on (its Python one) while a hit sent the byte."""
    cookie = await _signed_in(st)
    main = port_of(st.base)

    async def four(text: str) -> list[bytes]:
        out = []
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", main)
            writer.write(text.encode("latin-1"))
            out.append(_masked(await read_until_quiet(reader, 0.2)))
            writer.close()
        return out

    variants = _variants(cookie)
    before = lookups()
    results = await asyncio.gather(*(four(text) for text in variants.values()))
    assert lookups()["hit"] - before["hit"] >= 30
    different = {name: got for name, got in zip(variants, results, strict=True) if len(set(got)) != 1}
    assert different == {}


def _masked(data: bytes) -> bytes:
    lines = []
    for line in data.split(b"\r\n"):
        if line.startswith(b"Date: "):
            continue
        if line.startswith(b"X-Request-Id: ") and b"-" in line:
            line = b"X-Request-Id: <generated>"
        lines.append(line)
    return b"\n".join(lines)


async def test_a_hits_access_line_and_counts_are_the_decisions(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The access line of a hit on the main listener against the line of the same request decided in full: the
    client address (a trusted front's X-Forwarded-For / X-Real-IP, an untrusted peer's own address whatever it
    sends), method, path, route, status, user; the request id echoed or generated; the counts per request."""
    from sidecar import logs, metrics

    caplog.set_level(logging.INFO, logger="sidecar.access")
    settings = {"reverse_proxy": "true", "trusted_proxy": "127.0.0.1/32", "request_logging": "true"}
    settings["real_client_ip_header"] = "X-Forwarded-For"
    async with stack(MemoryStore(), **settings, **TOKENS) as st:
        cookie = await _signed_in(st)
        main = port_of(st.base)
        cases = [
            ("127.0.0.1", "GET", {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}),
            ("127.0.0.1", "HEAD", {"X-Forwarded-For": "203.0.113.8, 127.0.0.1"}),
            ("127.0.0.1", "GET", {"X-Forwarded-For": "not-an-ip"}),
            ("127.0.0.2", "GET", {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.10"}),
            ("127.0.0.2", "GET", {"X-Request-Id": "bad id"}),
            ("127.0.0.1", "GET", {"X-Request-Id": "given-1"}),
        ]
        logs.flush()
        capsys.readouterr()
        metrics.flush()
        counted = metrics.REQUESTS.labels("/oauth2/auth", "202")._value.get()  # type: ignore[attr-defined]
        before = lookups()
        for source, method, extra in cases:
            text = req(0, cookie, "".join(f"{k}: {v}\r\n" for k, v in extra.items()), method)
            if "X-Request-Id" in extra:
                text = text.replace("X-Request-Id: r0\r\n", "")
            for _ in range(4):
                reader, writer = await asyncio.open_connection("127.0.0.1", main, local_addr=(source, 0))
                writer.write(text.encode())
                assert (await asyncio.wait_for(_read_response(reader, method == "HEAD"), 5) or [0])[0] == 202
                writer.close()
        assert lookups()["hit"] - before["hit"] >= 2 * len(cases)
        metrics.flush()
        after = metrics.REQUESTS.labels("/oauth2/auth", "202")._value.get()  # type: ignore[attr-defined]
        assert after - counted == 4 * len(cases)
        logs.flush()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"sidecar.access"' in line]
    assert len(lines) == 4 * len(cases)
    for n, (source, _, extra) in enumerate(cases):
        four = [{k: v for k, v in line.items() if k not in ("latency_ms", "ts")} for line in lines[4 * n :][:4]]
        ids = [line.pop("request_id") for line in four]
        assert all(line == four[0] for line in four), (n, four)
        given = extra.get("X-Request-Id", "r0")
        assert ids == [given] * 4 if given != "bad id" else len(set(ids)) == 4 and "bad id" not in ids, ids
        expected = {0: "203.0.113.7", 1: "203.0.113.8", 2: "127.0.0.1"}.get(n, source)
        assert four[0]["client_ip"] == expected, (n, four[0])


async def test_requests_split_byte_by_byte_or_behind_a_body_being_read_keep_their_order(st: Stack) -> None:
    """Hits and misses pipelined one byte per segment; and a hit arriving while aiohttp is still reading the
    body of the request before it (answered, then lingering): each answer is its own request's, in order."""
    cookie = await _signed_in(st)
    main = port_of(st.base)
    await one_by_one(main, [req(0, cookie)] * 2)
    plan = [(cookie, "GET", 202), (None, "GET", 401), (cookie, "HEAD", 202), (cookie, "GET", 202), (None, "HEAD", 401)]
    data = "".join(req(i, c, method=m) for i, (c, m, _) in enumerate(plan)).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", main)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            if i % 50 == 0:
                await asyncio.sleep(0.001)  # let the server read what is there
        for i, (_, method, status) in enumerate(plan):
            got = await asyncio.wait_for(_read_response(reader, method == "HEAD"), 5)
            assert got is not None and (got[0], header(got, "X-Request-Id")) == (status, f"r{i}"), (i, got)
        post = req(10, cookie, "Content-Length: 10\r\n", "POST").encode()
        writer.write(post + b"12345")  # aiohttp answers without reading the body, then reads the rest of it
        got = await asyncio.wait_for(_read_response(reader), 5)
        assert got is not None and (got[0], header(got, "X-Request-Id")) == (202, "r10")
        await asyncio.sleep(0.1)
        writer.write(b"67890" + req(11, cookie).encode() + req(12, cookie).encode())
        for i in (11, 12):
            got = await asyncio.wait_for(_read_response(reader), 5)
            assert got is not None and (got[0], header(got, "X-Request-Id")) == (202, f"r{i}")
    finally:
        writer.close()


async def test_hits_sent_before_a_half_close_are_all_answered(st: Stack) -> None:
    cookie = await _signed_in(st)
    main = port_of(st.base)
    await one_by_one(main, [req(0, cookie)] * 2)
    reader, writer = await asyncio.open_connection("127.0.0.1", main)
    try:
        writer.write("".join(req(i, cookie) for i in range(40)).encode())
        writer.write_eof()
        for i in range(40):
            got = await asyncio.wait_for(_read_response(reader), 5)
            assert got is not None and (got[0], header(got, "X-Request-Id")) == (202, f"r{i}")
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_a_flood_of_pipelined_requests_from_a_client_that_does_not_read_is_answered_in_order(st: Stack) -> None:
    """2,000 pipelined requests (a miss every 97th), the client reading nothing for a second: the server's writes
    pause, the rest goes through aiohttp's queue (which pauses reading), and every answer comes, in order."""
    cookie = await _signed_in(st)
    main = port_of(st.base)
    await one_by_one(main, [req(0, cookie)] * 2)
    n = 2000
    reader, writer = await asyncio.open_connection("127.0.0.1", main)
    try:
        writer.write("".join(req(i, None if i % 97 == 0 else cookie) for i in range(n)).encode())
        await asyncio.sleep(1.0)
        for i in range(n):
            got = await asyncio.wait_for(_read_response(reader), 10)
            assert got is not None, i
            assert (got[0], header(got, "X-Request-Id")) == (401 if i % 97 == 0 else 202, f"r{i}"), i
    finally:
        writer.close()


async def test_a_fragment_in_the_auth_target_is_part_of_the_key_on_both_paths(st: Stack) -> None:
    """yarl's query drops a "#..." that the decision's own reading of the target (fronts, location rules) keeps:
    a request with one must never be answered from the entry kept for the same target without it, whether the
    parser-level hit path or the handler looks it up (the lean listener keys on the target as sent already)."""
    cookie = await _signed_in(st)
    main = port_of(st.base)

    def at(target: str, i: int, extra: str = "") -> str:
        return req(i, cookie, extra).replace("/oauth2/auth ", target + " ", 1)

    plain = "/oauth2/auth?allowed_emails=alice@example.com"
    answers = await one_by_one(main, [at(plain, i) for i in range(3)])
    assert [a[0] for a in answers] == [202, 202, 202]
    assert (await one_by_one(main, [at(plain, 9, "Connection: close\r\n")]))[0][0] == 202  # the handler's lookup
    for n, suffix in enumerate(("#x", "#", "#allowed_emails=bob@example.com")):
        for extra in ("", "Connection: close\r\n"):  # the hit path, then the handler (aiohttp's, for a close)
            before = lookups()
            await one_by_one(main, [at(plain + suffix, 10 + n, extra)])
            after = lookups()
            assert after["hit"] == before["hit"], (suffix, extra)  # a miss: decided for its own target
            assert after["miss"] == before["miss"] + 1, (suffix, extra)
