"""``--auth-address``: the lean /oauth2/auth listener, over real sockets, against the dev provider and Redis.

Parity: the same requests to the main listener's /oauth2/auth and to this one get the same status
and the same headers (Date aside). Hostile input: smuggling, oversized and malformed heads, slow
clients, pipelining and keep-alive limits are refused or served the way a front needs, the
connection closed after any refusal, and the listener keeps serving afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from sidecar import logs, metrics
from sidecar.auth_listener import AuthListener
from sidecar.store import MemoryStore, SessionStore
from tests.stack import COOKIE_SECRET, SidecarProcess, Stack, browser, free_port, session_cookie, sign_in, stack
from tests.test_oauth_tokens import new_grant, redeem

TOKENS = {"pass_access_token": "true", "pass_authorization_header": "true"}
GOOD = "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\n\r\n"

Response = tuple[int, list[tuple[str, str]], bytes]


@asynccontextmanager
async def auth_listener(st: Stack, **limits: Any) -> AsyncIterator[int]:
    """An AuthListener on a free port, on the stack's first sidecar app (its services, its decision)."""
    listener = AuthListener(st.runners[0].app, st.configs[0], **limits)
    sock = socket.create_server(("127.0.0.1", 0))
    await listener.start(sock)
    try:
        yield int(sock.getsockname()[1])
    finally:
        await asyncio.wait_for(listener.drain(), 5)


async def _read_response(reader: asyncio.StreamReader, head_only: bool = False) -> Response | None:
    """One response off the wire; None at EOF before a status line."""
    line = await reader.readline()
    if not line:
        return None
    status = int(line.split(b" ")[1])
    headers: list[tuple[str, str]] = []
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
        headers.append((name, value.strip()))
    length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
    body = b"" if head_only else await reader.readexactly(length)
    return status, headers, body


async def exchange(port: int, data: bytes, *, count: int = 1, heads: tuple[bool, ...] = ()) -> list[Response]:
    """Write raw bytes, read up to ``count`` responses, then check what follows is EOF or nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        out = []
        for i in range(count):
            got = await asyncio.wait_for(_read_response(reader, heads[i] if i < len(heads) else False), 5)
            if got is None:
                break
            out.append(got)
        return out
    finally:
        writer.close()


async def closed_after(port: int, data: bytes, timeout: float = 3.0) -> tuple[Response | None, bool]:
    """The first response and whether the server then closed the connection (EOF, nothing more)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        first = await asyncio.wait_for(_read_response(reader), timeout)
        rest = await asyncio.wait_for(reader.read(65536), timeout)
        return first, rest == b""
    finally:
        writer.close()


def header(response: Response, name: str) -> str | None:
    return next((v for k, v in response[1] if k.lower() == name.lower()), None)


def comparable(response: Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers in order with Date's value and a generated request id masked, and the body."""
    masked = []
    for name, value in response[1]:
        if name.lower() == "date":
            value = "<date>"
        elif name.lower() == "x-request-id" and "-" in value:
            value = "<generated>"
        masked.append((name, value))
    return response[0], masked, response[2]


async def still_serves(port: int) -> None:
    got = await exchange(port, GOOD.encode())
    assert got and got[0][0] == 401


# -- parity ------------------------------------------------------------------------------------


async def _parity_table(st: Stack, port: int, cookie: str, method: str = "GET") -> list[str]:
    """Requests a front sends, answered by both listeners; returns the statuses seen (to check coverage)."""
    main_port = int(st.base.rsplit(":", 1)[1])
    forged = cookie[:-4] + ("AAAA" if not cookie.endswith("AAAA") else "BBBB")
    cases = [
        ("", {}),
        ("", {"Cookie": "_sidecar=" + forged}),
        ("", {"Cookie": "_sidecar=garbage"}),
        ("", {"Cookie": "_sidecar=" + cookie}),
        ("", {"Cookie": f"app=1; _sidecar={cookie}; theme=dark", "X-Request-Id": "abc-123"}),
        ("?allowed_groups=admins", {"Cookie": "_sidecar=" + cookie}),
        ("?allowed_groups=nope-group", {"Cookie": "_sidecar=" + cookie}),
        ("?allowed_emails=alice@example.com", {"Cookie": "_sidecar=" + cookie}),
        ("?unknown_rule=1", {"Cookie": "_sidecar=" + cookie}),
        ("?max_age=1", {"Cookie": "_sidecar=" + cookie}),
        ("?max_age=3600", {"Cookie": "_sidecar=" + cookie}),
        ("?max_age=1", {}),
        ("", {"Cookie": "_sidecar=" + cookie, "X-Original-URI": "/admin/x", "X-Forwarded-For": "10.1.1.1"}),
        ("", {"Authorization": "Bearer abc.def.ghi", "Cookie": "_sidecar=" + cookie}),
    ]
    statuses = []
    for query, extra in cases:
        head = f"{method} /oauth2/auth{query} HTTP/1.1\r\nHost: app.example\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in extra.items()) + "\r\n"
        is_head = (method == "HEAD",)
        ours = await exchange(port, head.encode(), heads=is_head)
        theirs = await exchange(main_port, head.encode(), heads=is_head)
        assert ours and theirs, (query, extra)
        assert comparable(ours[0]) == comparable(theirs[0]), (query, extra)
        statuses.append(str(ours[0][0]))
    return statuses


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_same_answers_as_the_main_listener_header_for_header(store: SessionStore, method: str) -> None:
    async with stack(store, upstream="", **TOKENS) as st, browser() as client:
        await sign_in(client, st.base)
        cookie = session_cookie(client)
        assert cookie
        await asyncio.sleep(2.1)  # so that max_age=1 asks for a step-up (auth_time has whole seconds)
        async with auth_listener(st) as port:
            statuses = await _parity_table(st, port, cookie, method)
    assert {"202", "401", "403"} <= set(statuses)


async def test_oauth_resource_tokens_judged_the_same_through_both_listeners(store: SessionStore) -> None:
    """``--oauth-server``: the resource guard hook runs in the shared decision, so a sidecar-issued token asked
    about through ``X-Original-URI`` gets the same answer from both listeners: 202 with the identity for its
    resource, the invalid_token or resource_metadata challenge, the 400 for original-URI headers that disagree."""
    settings = {"oauth_server": "true", "oauth_resource": "/mcp", "reverse_proxy": "true", **TOKENS}
    async with stack(store, upstream="", **settings) as st:
        issued = await new_grant(st, "/mcp")
        status, tokens, _ = await redeem(st.base, issued)
        assert status == 200
        token = tokens["access_token"]
        host = st.base.split("://", 1)[1]  # the origin the token's audience names
        bearer = {"Authorization": "Bearer " + token}
        cases: list[dict[str, str]] = [
            {**bearer, "X-Original-URI": "/mcp"},
            {**bearer, "X-Original-URI": "/mcp/tools?x=1"},
            {**bearer, "X-Original-URL": f"{st.base}/mcp/a"},  # not a header --front nginx sets: 400
            {**bearer, "X-Original-URI": "/mcp/a", "X-Forwarded-Uri": "/mcp/a"},
            {**bearer, "X-Original-URI": "/mcp/a", "X-Forwarded-Uri": "/other"},  # disagree: 400
            {**bearer, "X-Original-URI": "/other"},  # not a resource: the cookie decides
            {"X-Original-URI": "/mcp/a"},  # no token: the resource_metadata challenge
            {"Authorization": "Bearer " + token[:-3] + "AAA", "X-Original-URI": "/mcp/a"},
            {"Authorization": "Bearer sca.garbage", "X-Original-URI": "/mcp/a"},
            {"Authorization": "Bearer ", "X-Original-URI": "/mcp/a"},
        ]
        async with auth_listener(st) as port:
            main_port = int(st.base.rsplit(":", 1)[1])
            statuses = []
            for extra in cases:
                head = f"GET /oauth2/auth HTTP/1.1\r\nHost: {host}\r\n"
                head += "".join(f"{k}: {v}\r\n" for k, v in extra.items()) + "\r\n"
                ours = await exchange(port, head.encode())
                theirs = await exchange(main_port, head.encode())
                assert ours and theirs, extra
                assert comparable(ours[0]) == comparable(theirs[0]), extra
                statuses.append(ours[0][0])
                if ours[0][0] == 202:
                    assert header(ours[0], "X-Auth-Request-Email") == "alice@example.com"
                    assert token not in "".join(v for _, v in ours[0][1])  # the sidecar token never echoed
    assert statuses == [202, 202, 400, 202, 400, 401, 401, 401, 401, 401]


@pytest.mark.parametrize("trusted", [True, False])
async def test_tokens_and_cookie_echo_only_for_a_trusted_front_on_both(trusted: bool) -> None:
    settings = {"reverse_proxy": "true"} if trusted else {"trusted_proxy": "10.0.0.0/8", "reverse_proxy": "true"}
    async with stack(MemoryStore(), upstream="", **TOKENS, **settings) as st, browser() as client:
        await sign_in(client, st.base)
        cookie = session_cookie(client)
        assert cookie
        async with auth_listener(st) as port:
            await _parity_table(st, port, cookie)
            got = await exchange(port, f"{GOOD[:-2]}Cookie: app=1; _sidecar={cookie}\r\n\r\n".encode())
    assert got[0][0] == 202
    assert (header(got[0], "X-Auth-Request-Access-Token") or "").startswith("ey") is trusted
    assert (header(got[0], "Cookie") == "app=1") is trusted


async def test_http10_and_keep_alive_framing_match_the_main_listener() -> None:
    async with stack(MemoryStore(), upstream="") as st, browser() as client:
        await sign_in(client, st.base)
        cookie = session_cookie(client)
        main_port = int(st.base.rsplit(":", 1)[1])
        async with auth_listener(st) as port:
            for head in (
                f"GET /oauth2/auth HTTP/1.0\r\nCookie: _sidecar={cookie}\r\n\r\n",
                f"GET /oauth2/auth HTTP/1.0\r\nConnection: keep-alive\r\nCookie: _sidecar={cookie}\r\n\r\n",
                "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                f"GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nConnection: close\r\nCookie: _sidecar={cookie}\r\n\r\n",
            ):
                ours, theirs = await exchange(port, head.encode()), await exchange(main_port, head.encode())
                assert comparable(ours[0]) == comparable(theirs[0]), head


async def test_metrics_and_access_log_lines_as_on_the_main_listener(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.access")
    async with stack(MemoryStore(), upstream="", request_logging="true") as st, browser() as client:
        await sign_in(client, st.base)
        cookie = session_cookie(client)
        async with auth_listener(st) as port:
            logs.flush()
            capsys.readouterr()
            before = _decisions()
            got = await exchange(port, f"{GOOD[:-2]}Cookie: _sidecar={cookie}\r\nX-Request-Id: req-7\r\n\r\n".encode())
            await exchange(port, GOOD.encode())
            logs.flush()
            lines = [line for line in capsys.readouterr().err.splitlines() if '"sidecar.access"' in line]
    assert got[0][0] == 202 and header(got[0], "X-Request-Id") == "req-7"
    after = _decisions()
    assert after.get("202", 0) - before.get("202", 0) == 1 and after.get("401", 0) - before.get("401", 0) == 1
    assert len(lines) == 2
    assert '"request_id":"req-7"' in lines[0] and '"route":"/oauth2/auth"' in lines[0]
    assert '"user":"alice@example.com"' in lines[0] and '"status":202' in lines[0]
    assert cookie not in "".join(lines)


def _decisions() -> dict[str, float]:
    out = {}
    for line in metrics.render().decode().splitlines():
        if line.startswith("sidecar_auth_decisions_total{"):
            decision = line.split('decision="', 1)[1].split('"', 1)[0]
            out[decision] = float(line.rsplit(" ", 1)[1])
    return out


# -- hostile input -----------------------------------------------------------------------------

SMUGGLING = [
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\n\r\n" + GOOD,
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nContent-Length: +0\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 0\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  chunked\r\n\r\n0\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # obs-fold
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nX: y\r\n\tz\r\n\r\n",  # obs-fold with a tab
    "GET /oauth2/auth HTTP/1.1\nHost: a\n\n",  # bare LF
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",  # one bare LF
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",  # bare CR
    "POST /oauth2/auth HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
]


async def test_request_smuggling_family_is_refused_and_the_connection_closed() -> None:
    async with stack(MemoryStore(), upstream="") as st, auth_listener(st) as port:
        for raw in SMUGGLING:
            first, closed = await closed_after(port, (raw + GOOD).encode())
            assert first is not None and first[0] == 400, raw
            assert closed, raw  # nothing after the refusal is read as a second request
        # Not a Transfer-Encoding (nginx drops such names too): the request is answered, and what a
        # front might have taken for its chunked body is then a malformed request, refused and closed.
        raw = "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\n" + GOOD
        got = await exchange(port, raw.encode(), count=3)
        assert [r[0] for r in got] == [401, 400] and header(got[1], "Connection") == "close"
        await still_serves(port)


MALFORMED = [
    "GET\r\n\r\n",
    "GET /oauth2/auth\r\n\r\n",  # HTTP/0.9
    "GET /oauth2/auth HTTP/9.9\r\nHost: a\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1 extra\r\nHost: a\r\n\r\n",
    "G@T /oauth2/auth HTTP/1.1\r\nHost: a\r\n\r\n",
    "\x00GET /oauth2/auth HTTP/1.1\r\nHost: a\r\n\r\n",
    "GET /oauth2/auth\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nX\x00: b\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nBad Name: b\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\n: novalue\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
    "GET /oauth2/auth?x=\u00e9 HTTP/1.1\r\nHost: a\r\n\r\n",
    "GET /oauth2/au\u00e9th HTTP/1.1\r\nHost: a\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\nH\u00e9st: a\r\n\r\n",
    "GET /oauth2/auth HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
]


async def test_malformed_heads_get_a_4xx_and_a_closed_connection_never_a_5xx() -> None:
    async with stack(MemoryStore(), upstream="") as st, auth_listener(st) as port:
        for raw in MALFORMED:
            first, closed = await closed_after(port, raw.encode("utf-8") + GOOD.encode())
            assert first is not None and 400 <= first[0] < 500, raw
            assert closed, raw
        await still_serves(port)


async def test_non_ascii_header_values_are_served_not_crashed() -> None:
    """obs-text in a value is legal HTTP: answered (401 here), as the main listener does."""
    async with stack(MemoryStore(), upstream="") as st, auth_listener(st) as port:
        for value in ("\u00e9t\u00e9".encode(), b"\xff\xfe", "\u2603".encode()):
            got = await exchange(
                port, b"GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nCookie: _sidecar=" + value + b"\r\n\r\n"
            )
            assert got[0][0] == 401


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("GET /oauth2/auth?" + "a" * 9000 + " HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nX: " + "a" * 8200 + "\r\n\r\n", 400),
        ("GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nCookie: _sidecar=" + "a" * 8200 + "\r\n\r\n", 400),
        ("GET /oauth2/auth HTTP/1.1\r\nHost: a\r\n" + "X" * 8200 + ": a\r\n\r\n", 400),
        ("GET /oauth2/auth HTTP/1.1\r\nHost: a\r\n" + "".join(f"X-{i}: a\r\n" for i in range(200)) + "\r\n", 431),
        ("GET /oauth2/auth HTTP/1.1\r\nHost: a\r\n" + "".join(f"X-{i}: {'a' * 8000}\r\n" for i in range(9)), 431),
    ],
    ids=["target", "value", "cookie", "name", "count", "total"],
)
async def test_oversized_heads_are_refused_with_the_main_listeners_limits(raw: str, status: int) -> None:
    async with stack(MemoryStore(), upstream="") as st, auth_listener(st) as port:
        first, closed = await closed_after(port, raw.encode())
        assert first is not None and first[0] == status
        assert closed
        at_limit = "GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nX: " + "a" * 8190 + "\r\n\r\n"
        assert (await exchange(port, at_limit.encode()))[0][0] == 401  # the limit itself is allowed
        await still_serves(port)


async def test_slow_clients_are_cut_at_the_header_timeout() -> None:
    async with stack(MemoryStore(), upstream="") as st, auth_listener(st, header_timeout=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        eof = False
        for piece in ("GET /oauth2/auth HTTP/1.1\r\n", "Host: a\r\n", "X-1: a\r\n", "X-2: a\r\n", "X-3: a\r\n"):
            try:
                writer.write(piece.encode())
                await writer.drain()
            except ConnectionError:
                break
            try:
                eof = await asyncio.wait_for(reader.read(1), 0.2) == b""
            except TimeoutError:
                continue
            break
        if not eof:
            eof = await asyncio.wait_for(reader.read(1), 2) == b""
        elapsed = time.monotonic() - started
        writer.close()
        assert eof and 0.4 < elapsed < 1.5  # closed, without an answer, about the timeout after the first byte
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)  # connects, sends nothing
        assert await asyncio.wait_for(silent_reader.read(1), 2) == b""
        silent.close()
        await still_serves(port)


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with stack(MemoryStore(), upstream="") as st, browser() as client:
        await sign_in(client, st.base)
        cookie = session_cookie(client)
        async with auth_listener(st) as port:
            good = f"GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nCookie: _sidecar={cookie}\r\n\r\n"
            heads = [good, GOOD, "GET /other HTTP/1.1\r\nHost: a\r\n\r\n", good.replace("GET", "HEAD", 1), good] * 8
            got = await exchange(
                port, "".join(heads).encode(), count=len(heads), heads=(False, False, False, True, False) * 8
            )
    assert [r[0] for r in got] == [202, 401, 404, 202, 202] * 8


async def test_keep_alive_limits_close_the_connection() -> None:
    async with stack(MemoryStore(), upstream="") as st, auth_listener(st, max_requests=3, idle_timeout=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GOOD.encode() * 5)
        answers = [await asyncio.wait_for(_read_response(reader), 5) for _ in range(3)]
        assert await asyncio.wait_for(reader.read(1), 2) == b""  # closed after the third, the rest unread
        writer.close()
        assert [header(a, "Connection") for a in answers if a] == [None, None, "close"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GOOD.encode())
        assert (await _read_response(reader) or (0,))[0] == 401
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(1), 3) == b""  # idle keep-alive connection closed
        assert 0.3 < time.monotonic() - started < 2
        writer.close()
        first, closed = await closed_after(port, b"GET /oauth2/auth HTTP/1.0\r\n\r\n")  # 1.0 without keep-alive
        assert first is not None and first[0] == 401 and closed


async def test_upgrade_requests_are_answered_then_the_connection_closes() -> None:
    """A websocket location's headers copied into the auth subrequest still get their answer; nothing
    after them is read as HTTP."""
    async with stack(MemoryStore(), upstream="") as st, auth_listener(st) as port:
        for upgrade in ("websocket", "h2c", "TLS/1.2"):
            raw = f"GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n" + GOOD
            first, closed = await closed_after(port, raw.encode())
            assert first is not None and first[0] == 401 and header(first, "Connection") == "close"
            assert closed
        await still_serves(port)


async def test_other_paths_and_methods_are_not_served() -> None:
    async with stack(MemoryStore(), upstream="") as st, auth_listener(st) as port:
        for raw, status in [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", 404),
            ("GET /oauth2/start HTTP/1.1\r\nHost: a\r\n\r\n", 404),
            ("GET /oauth2/auth/ HTTP/1.1\r\nHost: a\r\n\r\n", 404),
            ("GET /oauth2/%61uth HTTP/1.1\r\nHost: a\r\n\r\n", 404),
            ("GET http://a/oauth2/auth HTTP/1.1\r\nHost: a\r\n\r\n", 404),
            ("GET /ping HTTP/1.1\r\nHost: a\r\n\r\n", 404),
            ("TRACE /oauth2/auth HTTP/1.1\r\nHost: a\r\n\r\n", 405),
            ("PROPFIND /oauth2/auth HTTP/1.1\r\nHost: a\r\n\r\n", 405),
        ]:
            got = await exchange(port, raw.encode())
            assert got and got[0][0] == status, raw
        await still_serves(port)


# -- the real process --------------------------------------------------------------------------


async def test_the_process_serves_auth_address_in_every_worker_and_stops_on_sigterm(redis_url: str) -> None:
    async with stack(None, sidecar=False) as st:
        http_port, auth_port = free_port(), free_port()
        settings = _process_settings(st, http_port, auth_port, redis_url, workers="2")
        proc = await SidecarProcess(settings).ready()
        try:
            pids = set()
            for _ in range(40):
                got = await exchange(auth_port, GOOD.encode())
                assert got[0][0] == 401, proc.output()[-3000:]
            pids = {line for line in proc.output().splitlines() if '"listening"' in line}
            assert len(pids) == 2  # two workers, each with both listeners
            assert all(f"127.0.0.1:{auth_port}" in line for line in pids)
            reader, writer = await asyncio.open_connection("127.0.0.1", auth_port)
            writer.write(GOOD.encode())
            assert (await _read_response(reader) or (0,))[0] == 401
            os.kill(proc.proc.pid, signal.SIGTERM)
            assert await asyncio.wait_for(reader.read(1), 5) == b""  # the idle keep-alive connection is closed
            writer.close()
            assert await asyncio.to_thread(proc.proc.wait, 10) == 0
        finally:
            proc.stop()


async def test_auth_address_in_use_exits_2_naming_the_option() -> None:
    async with stack(MemoryStore(), sidecar=False) as st:
        taken = socket.create_server(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        try:
            settings = _process_settings(st, free_port(), port, "", workers="1")
            proc = SidecarProcess(settings)
            code = await asyncio.to_thread(proc.proc.wait, 15)
            out = proc.output()
            proc.stop()
        finally:
            taken.close()
    assert code == 2
    assert f"--auth-address: cannot listen on 127.0.0.1:{port} (address in use)" in out


def _process_settings(st: Stack, http_port: int, auth_port: int, redis_url: str, workers: str) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "http_address": f"127.0.0.1:{http_port}",
        "auth_address": f"127.0.0.1:{auth_port}",
        "oidc_issuer_url": st.issuer,
        "client_id": "sidecar-dev",
        "client_secret": "sidecar-dev-secret",
        "redirect_url": f"http://127.0.0.1:{http_port}/oauth2/callback",
        "cookie_secret": COOKIE_SECRET,
        "cookie_secure": "false",
        "email_domain": "*",
        "workers": workers,
        "shutdown_timeout": "3s",
    }
    if redis_url:
        settings.update(session_store_type="redis", redis_connection_url=redis_url)
    return settings
