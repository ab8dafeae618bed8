"""Hostile variants on the main listener's hit-first path (``sidecar/hits.py``), from a review of it: each
case here once went wrong. Raw sockets, the real app, the dev provider."""

from __future__ import annotations

import asyncio
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
from tests.test_decisions import TOKENS, _signed_in, port_of
from tests.test_hits import counting, one_by_one, req


@pytest.fixture
async def st() -> AsyncIterator[Stack]:
    async with stack(MemoryStore(), reverse_proxy="true", trusted_proxy="127.0.0.1/32", **TOKENS) as s:
        yield s


@pytest.mark.parametrize("misses", [(), (5,), (3, 40), (31, 32, 33)])
async def test_more_pipelined_hits_than_aiohttps_queue_limit_are_all_answered(st: Stack, misses: tuple[int, ...]) -> None:
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
