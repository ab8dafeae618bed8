"""Decision-cache hits on the main listener, answered as aiohttp's parser hands the request over
(``sidecar/hits.py``): the same bytes, order, counts and connection handling as the ordinary path.

The real app, the dev provider and a real socket; requests are written by hand because these are the
pipelining and keep-alive variants a front's own traffic does not reliably produce.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from sidecar.app import build_app
from sidecar.context import SERVICES
from sidecar.hits import HitFirstSite
from sidecar.store import MemoryStore
from tests.stack import Stack, stack
from tests.test_auth_listener import _read_response, comparable, exchange, header
from tests.test_decisions import TOKENS, _signed_in, ask, lookups, port_of


@pytest.fixture
async def st() -> AsyncIterator[Stack]:
    async with stack(MemoryStore(), reverse_proxy="true", trusted_proxy="127.0.0.1/32", **TOKENS) as s:
        yield s


def counting(server: Any) -> list[Any]:
    """Note every request aiohttp makes from here on (new connections read the server's factory)."""
    made: list[Any] = []
    factory: Callable[..., Any] = server.request_factory

    def request_factory(message: Any, *args: Any) -> Any:
        made.append(message.headers.get("X-Request-Id"))
        return factory(message, *args)

    server.request_factory = request_factory
    return made


def req(i: int, cookie: str | None, extra: str = "", method: str = "GET", uri: str = "/warm") -> str:
    head = f"{method} /oauth2/auth HTTP/1.1\r\nHost: app.example\r\nX-Request-Id: r{i}\r\nX-Original-URI: {uri}\r\n"
    return head + (f"Cookie: _sidecar={cookie}\r\n" if cookie else "") + extra + "\r\n"


async def test_hits_skip_aiohttps_request_and_misses_are_looked_up_once(st: Stack) -> None:
    cookie = await _signed_in(st)
    made = counting(st.runners[0].server)
    before = lookups()
    answers = await one_by_one(port_of(st.base), [req(i, cookie) for i in range(5)])
    after = lookups()
    # r0: a miss, seen once; r1: a miss, kept; r2-r4: hits, with no aiohttp request made for them
    assert [got[0] for got in answers] == [202] * 5
    assert [header(got, "X-Request-Id") for got in answers] == [f"r{i}" for i in range(5)]
    assert made == ["r0", "r1"]
    assert (after["hit"] - before["hit"], after["miss"] - before["miss"]) == (3, 2)  # each request looked up once
    first = comparable(answers[0])
    assert all(comparable(got)[1][:-3] == first[1][:-3] for got in answers[2:])  # same headers up to the request id


async def one_by_one(port: int, requests: list[str], head: bool = False) -> list[Any]:
    """Each request after the answer to the one before, on one connection (as nginx's keep-alive upstream)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for text in requests:
            writer.write(text.encode())
            got = await asyncio.wait_for(_read_response(reader, head), 5)
            assert got is not None
            answers.append(got)
    finally:
        writer.close()
    return answers


async def test_pipelined_hits_and_misses_on_the_main_listener_keep_order_and_their_own_answers(st: Stack) -> None:
    """One write: hits for two users, misses (no cookie, a forged one, Authorization, a new URI, a body, HTTP/1.0
    style closing) between them, in three rotations: every answer in request order, each its own request's."""
    cookies = [await _signed_in(st), await _signed_in(st)]
    main = port_of(st.base)
    users = {}
    for n, cookie in enumerate(cookies):
        for _ in range(3):
            got = await ask(main, cookie, extra={"X-Original-URI": "/warm"})
        users[n] = header(got, "Authorization")
    assert users[0] != users[1] and all(users.values())
    body = "Content-Length: 3\r\n"
    plan: list[tuple[str | None, str, str, str, int, int | None]] = [
        (cookies[0], "", "GET", "/warm", 202, 0),
        (None, "", "GET", "/warm", 401, None),
        (cookies[1], "", "GET", "/warm", 202, 1),
        ("v1.forged.sig", "", "GET", "/warm", 401, None),
        (cookies[0], "", "GET", "/new-1", 202, 0),
        (cookies[1], "Authorization: Basic eA==\r\n", "GET", "/warm", 202, 1),
        (cookies[0], "", "HEAD", "/warm", 202, 0),
        (cookies[1], body, "POST", "/warm", 202, 1),  # a body: aiohttp's, read and skipped
        (cookies[0], "", "GET", "/warm", 202, 0),
    ]
    for rotation in range(3):
        order = plan[rotation:] + plan[:rotation]
        data = "".join(req(i, c, x, m, u) + ("abc" if x == body else "") for i, (c, x, m, u, _, _) in enumerate(order))
        data += req(len(order), cookies[1], "Connection: close\r\n")  # answered, then the connection closes
        heads = tuple(m == "HEAD" for _, _, m, _, _, _ in order) + (False,)
        before = lookups()
        answers = await exchange(main, data.encode(), count=len(order) + 2, heads=heads)
        assert lookups()["hit"] - before["hit"] >= 4, rotation
        assert len(answers) == len(order) + 1, rotation  # and then EOF
        for i, ((_, _, _, _, status, user), got) in enumerate(zip(order, answers, strict=False)):
            assert (got[0], header(got, "X-Request-Id")) == (status, f"r{i}"), (rotation, i, got)
            assert header(got, "Authorization") == (users[user] if user is not None else None), (rotation, i)
        assert answers[-1][0] == 202 and header(answers[-1], "Connection") == "close"


async def test_a_head_hit_is_framed_as_aiohttp_frames_it(st: Stack) -> None:
    cookie = await _signed_in(st)
    main = port_of(st.base)
    made = counting(st.runners[0].server)
    head = "HEAD /oauth2/auth HTTP/1.1\r\nHost: app.example\r\nCookie: _sidecar=" + cookie + "\r\n\r\n"
    answers = await one_by_one(main, [head] * 4, head=True)
    assert len(made) == 2 and [got[0] for got in answers] == [202] * 4
    assert [comparable(got) for got in answers[2:]] == [comparable(answers[0])] * 2
    assert header(answers[3], "Content-Length") is None  # as aiohttp: no length for an empty answer to HEAD


async def test_a_connection_answering_only_hits_is_not_closed_as_idle_and_an_idle_one_is(st: Stack) -> None:
    """aiohttp closes a keep-alive connection idle past its timeout; hits answered before aiohttp sees them
    must count as activity (and an idle connection must still be closed)."""
    cookie = await _signed_in(st)
    config = st.configs[0]
    app = build_app(config, store=st.runners[0].app[SERVICES].sessions.store)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=0.6)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    await HitFirstSite(runner, sock).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        one = req(0, cookie).encode()
        for _ in range(15):  # 1.5 s of hits, the keep-alive timeout 0.6 s
            writer.write(one)
            line = await asyncio.wait_for(reader.readline(), 5)
            assert line.startswith(b"HTTP/1.1 202"), line
            while (line := await reader.readline()) != b"\r\n":
                assert line
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(reader.read(), 3) == b""  # then idle: closed by the server
        writer.close()
    finally:
        await runner.cleanup()


async def test_requests_aiohttp_answers_differently_are_left_to_aiohttp(st: Stack) -> None:
    """What aiohttp does around the answer (an interim 100 for ``Expect: 100-continue``, closing after an
    HTTP/1.0 request or ``Connection: close``) stays: such a request never takes the hit-first path, even when its key
    has an entry. Each is sent alone, three times: the first two make the entry, the third could be a hit."""
    cookie = await _signed_in(st)
    main = port_of(st.base)
    variants = [
        req(0, cookie, "Expect: 100-continue\r\n"),
        req(0, cookie).replace("HTTP/1.1", "HTTP/1.0"),
        req(0, cookie, "Connection: close\r\n"),
    ]
    made = counting(st.runners[0].server)
    for text in variants:
        raw = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", main)
            writer.write(text.encode())
            data = await read_until_quiet(reader)
            writer.close()
            if text.startswith("GET") and "Expect" in text:
                assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202"), data[:80]
            raw.append(b"\n".join(line for line in data.split(b"\r\n") if not line.startswith(b"Date:")))
        assert raw[2] == raw[0], text
    assert len(made) == 3 * len(variants)


async def read_until_quiet(reader: asyncio.StreamReader, quiet: float = 0.3) -> bytes:
    """Everything the server sends until the connection closes or stays quiet for ``quiet`` seconds."""
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), quiet)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk
