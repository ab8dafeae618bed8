"""The request wrapper's cheaper path, held to the old behaviour: the access line byte for byte (latency without
``round``/``repr``), request ids echoed or replaced as before, undecodable bytes refused only where the sidecar
reads them, and the client address read without a ``KeyError``, on the proxy route and the sidecar's own."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from sidecar import logs, middleware
from sidecar.context import AUTHED
from sidecar.store import MemoryStore
from tests.stack import browser, free_port, session_cookie, sign_in, stack

GENERATED = re.compile(r"[0-9a-f]{8}-[0-9a-f]+")
IP = "203.0.113.9"
KEYS = ["ts", "level", "logger", "msg", "request_id", "method", "route", "path", "status", "latency_ms", "user"]


def _latencies() -> list[float]:
    """Seconds whose milliseconds sit on, just beside and exactly at (in binary) the hundredths' halves."""
    rng = random.Random(20)
    values = [0.0, 1e-12, 5e-9, 4.9999e-6, 5e-6, 5.0001e-6, 0.000125, 0.000375, 1.0, 3600.0, 86400.0 * 365, 1e7]
    values += [i / 100000 for i in range(20000)]  # every hundredth of a millisecond up to 200 ms
    values += [(i + 0.5) / 100000 for i in range(20000)]  # the halves between them
    values += [i / 8000 for i in range(8000)]  # ms with an exact binary .xx5: the ties themselves
    values += [rng.random() * 10 ** rng.randint(-9, 7) for _ in range(50000)]
    return values


def test_the_latency_text_is_what_round_then_repr_made() -> None:
    wrong = [s for s in _latencies() if logs.latency_ms(s) != repr(round(s * 1000, 2))]
    assert wrong == []


def test_the_latency_text_is_the_old_one_for_negative_non_finite_and_huge_values_too() -> None:
    """Not reachable from a monotonic clock, held all the same: up to 10**13 ms (317 years), as documented."""
    rng = random.Random(21)
    values = [-0.0, -1e-12, -5e-6, -0.000125, -1.0, float("nan"), float("inf"), float("-inf"), 9999999999.999]
    values += [rng.random() * 10 ** rng.randint(7, 9) for _ in range(20000)]
    values += [-rng.random() * 10 ** rng.randint(-9, 9) for _ in range(20000)]
    wrong = [s for s in values if logs.latency_ms(s) != repr(round(s * 1000, 2))]
    assert wrong == []


@pytest.mark.parametrize("request_id", ["abc-1", "a" * 64, "0123abcd-1f", "A.b_C-9"])
def test_a_line_from_seconds_is_the_line_from_rounded_milliseconds(
    request_id: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sidecar.access")
    capsys.readouterr()
    for seconds in (0.0, 0.000125, 0.0123456, 1.23456789, 61.0):
        for method, path in (("GET", "/"), ("PURGE", '/a"b\\c\u2028\udcff'), ("G\u00e9T", "/" + "x" * 300)):
            logs.access_request(request_id, method, "proxy", path, 200, seconds, None, IP)  # no loop: written at once
            (line,) = capsys.readouterr().err.splitlines()
            old = logs.access_line(request_id, method, "proxy", path, 200, round(seconds * 1000, 2), None, IP)
            ts = json.loads(line)["ts"]
            assert line == old.replace(f'"ts":{json.loads(old)["ts"]!r}', f'"ts":{ts!r}', 1)


class _Adapter:
    """What the lean listener hands the wrapper: no ``_state``, a ``get`` of its own."""

    def __init__(self, keys: dict[Any, Any]) -> None:
        self._keys = keys

    def get(self, key: Any, default: Any = None) -> Any:
        return self._keys.get(key, default)


def test_the_request_state_is_read_from_either_request_kind() -> None:
    from aiohttp.test_utils import make_mocked_request

    request = make_mocked_request("GET", "/")
    request[AUTHED] = ("ref", "session")  # type: ignore[assignment]
    assert middleware._state_of(request).get(AUTHED) == ("ref", "session")
    assert middleware._state_of(request) is request._state
    adapter = _Adapter({AUTHED: 1})
    assert middleware._state_of(adapter).get(AUTHED) == 1  # type: ignore[arg-type]
    assert isinstance(request, web.Request)


async def _raw(base: str, target: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, str], bytes]:
    """One request with ``headers`` byte for byte (a client library would refuse or normalise them)."""
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n".encode()
    writer.write(head + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    answer, _, body = data.partition(b"\r\n\r\n")
    lines = answer.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ", 2)[1]), fields, body


# (X-Request-Id values, sent in order; the one logged, None: a generated one)
REQUEST_IDS: list[tuple[list[bytes], str | None]] = [
    ([b"abc-1"], "abc-1"),
    ([b"a" * 64], "a" * 64),
    ([b"a" * 65], None),
    ([b""], None),
    ([b"abc def"], None),
    ([b'abc"},"user":"admin'], None),
    ([b"ab\\c"], None),
    ([b"abc\tdef"], None),
    (["\u00e9t\u00e9".encode()], None),
    ([b"\xff\xfe"], None),
    ([b"abc-1%0a"], None),
    ([b"first-1", b"second-2"], "first-1"),  # the first one, as before
    ([b"bad id", b"good-2"], None),
    ([b"x" * 8000], None),
]


async def test_request_ids_and_log_lines_on_the_proxy_and_the_sidecars_own_routes(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sidecar.access")
    async with stack(MemoryStore(), request_logging="true") as st, browser() as client:
        await sign_in(client, st.base)
        cookie = ("_sidecar=" + (session_cookie(client) or "")).encode()
        logs.flush()
        capsys.readouterr()
        sent: list[tuple[str, int, dict[str, str], str | None, str | None]] = []
        for values, logged in REQUEST_IDS:
            ids = [(b"X-Request-Id", v) for v in values]
            for target, extra, user in (
                ("/_demo/echo", [(b"Cookie", cookie)], "alice@example.com"),  # proxied: the app's answer
                ("/oauth2/auth", [(b"Cookie", cookie)], "alice@example.com"),  # the sidecar's own 202
                ("/_demo/echo", [], None),  # not signed in: the sidecar's sign-in redirect
            ):
                status, headers, _ = await _raw(st.base, target, ids + extra)
                sent.append((target, status, headers, logged, user))
        # Undecodable bytes: refused where the sidecar reads them, passed on where only the app does.
        status, _, _ = await _raw(st.base, "/_demo/echo", [(b"Cookie", cookie), (b"X-Forwarded-Host", b"h\xff")])
        sent.append(("/_demo/echo", status, {}, None, None))
        status, _, body = await _raw(st.base, "/_demo/echo", [(b"Cookie", cookie), (b"X-App", b"caf\xc3\xa9 \xff")])
        sent.append(("/_demo/echo", status, {}, None, "alice@example.com"))
        assert status == 200 and json.loads(body)["headers"]["X-App"]
        big = [(b"Cookie", cookie), *((f"X-Big-{i}".encode(), b"b" * 8000) for i in range(6))]
        status, _, _ = await _raw(st.base, "/_demo/echo", big)
        sent.append(("/_demo/echo", status, {}, None, "alice@example.com"))
        logs.flush()
    text = capsys.readouterr().err
    lines = [line for line in text.splitlines() if '"sidecar.access"' in line]
    assert len(lines) == len(sent), (len(lines), len(sent))
    assert cookie.decode() not in text and cookie.decode().split("=", 1)[1] not in text
    statuses = [s[1] for s in sent]
    assert statuses[-3:] == [400, 200, 200]
    for line, (target, status, headers, logged, user) in zip(lines, sent, strict=True):
        entry = json.loads(line)
        assert list(entry) == [*KEYS, "client_ip"]
        assert line == json.dumps(entry, separators=(",", ":"))  # the old encoder's bytes exactly
        assert entry["path"] == target and entry["status"] == status and entry["method"] == "GET"
        assert entry["client_ip"] == "127.0.0.1" and entry["user"] == (user if status != 400 else None)
        assert entry["latency_ms"] == round(entry["latency_ms"], 2) >= 0
        assert entry["route"] == ("proxy" if target == "/_demo/echo" else "/oauth2/auth")
        if logged is not None:
            assert entry["request_id"] == logged
        else:
            assert GENERATED.fullmatch(entry["request_id"]), entry["request_id"]
        echoed = headers.get("X-Request-Id")
        if status == 200 and target == "/_demo/echo":
            assert echoed is None  # a proxied answer is the app's own: nothing added
        elif headers:
            assert echoed == entry["request_id"]  # the sidecar's answers carry the id the line has
        assert "Server" not in headers


async def test_no_server_header_on_any_kind_of_answer_and_other_prepare_receivers_still_run() -> None:
    """Without the signal, through the request class: whole and streamed proxied answers, a WebSocket's 101,
    HEAD, the sidecar's own pages, refusals and redirects; a receiver someone else adds still runs."""

    seen: list[str] = []

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(request.path)
        response.headers["X-Marked"] = "1"

    async with stack(MemoryStore()) as st, browser() as client:
        await sign_in(client, st.base)
        for method, path in (
            ("GET", "/_demo/echo"),
            ("HEAD", "/_demo/echo"),
            ("GET", "/_demo/stream"),
            ("GET", "/ping"),
            ("HEAD", "/ping"),
            ("GET", "/oauth2/auth"),
            ("GET", "/oauth2/sign_in"),
            ("GET", "/_demo/%2e%2e/x"),
        ):
            async with client.request(method, st.base + path, allow_redirects=False) as resp:
                await resp.read()
                assert "Server" not in resp.headers, (method, path, resp.status)
        async with client.ws_connect(st.base.replace("http", "ws") + "/_demo/ws") as ws:
            await ws.send_str("hi")
            assert (await ws.receive()).data == "hi"
        async with browser() as anon, anon.get(st.base + "/_demo/echo", allow_redirects=False) as resp:
            assert resp.status == 401 and "Server" not in resp.headers  # not a browser: no redirect
    app = web.Application()
    middleware.drop_server_headers(app)
    assert list(app.on_response_prepare) == []  # the request class does it
    app.on_response_prepare.append(mark)

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="x")

    app.router.add_get("/x", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with browser() as anon, anon.get(f"http://127.0.0.1:{port}/x") as resp:
            assert resp.headers.get("X-Marked") == "1" and "Server" not in resp.headers and seen == ["/x"]
    finally:
        await runner.cleanup()


def test_without_aiohttps_request_class_hook_the_signal_drops_the_header() -> None:
    app = web.Application()
    object.__setattr__(app, "_make_request", lambda *args: None)  # an aiohttp that chooses no request class
    middleware.drop_server_headers(app)
    assert list(app.on_response_prepare) == [middleware.drop_server_header]


# Requests aiohttp's own parser refuses before any route is looked up: its 400 goes through the request's
# prepare step but not the on_response_prepare signal (no match info), so only the request class drops Server.
PARSER_REFUSALS = [
    b"GARBAGE\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 9000 + b"\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"GET /x HTTP/9.9\r\nHost: a\r\n\r\n",
    b"G\x00T /x HTTP/1.1\r\nHost: a\r\n\r\n",
]


async def _head_of(port: int, data: bytes) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer.partition(b"\r\n\r\n")[0].decode("latin-1")


async def test_no_server_header_on_aiohttps_own_parser_refusals_on_the_main_and_the_metrics_listener() -> None:
    """The metrics app used the signal alone and said ``Server: Python/3.x aiohttp/3.y`` on these (fails without
    build_metrics_app's drop_server_headers); the main app holds it through its request class."""
    from sidecar.app import build_metrics_app

    runner = web.AppRunner(build_metrics_app(), access_log=None)
    await runner.setup()
    metrics_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", metrics_port).start()
    try:
        async with stack(MemoryStore()) as st:
            main_port = urlsplit(st.base).port
            assert main_port is not None
            for port in (main_port, metrics_port):
                for data in PARSER_REFUSALS:
                    head = await _head_of(port, data)
                    assert head.split(" ", 2)[1] == "400", (port, data[:40], head)
                    assert "\r\nserver:" not in head.lower(), (port, data[:40], head)
                head = await _head_of(port, b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                assert head.split(" ", 2)[1] in ("200", "302", "401") and "\r\nserver:" not in head.lower(), head
    finally:
        await runner.cleanup()


# (extra header lines, whether the one-pass gate must send the request on to refuse_undecodable's 400)
HOSTILE_BYTES: list[tuple[list[tuple[bytes, bytes]], bool]] = [
    ([(b"X-Forwarded-Host", b"ok.example"), (b"X-Forwarded-Host", b"h\xff")], True),  # only the second is bad
    ([(b"x-forwarded-host", b"ok"), (b"X-FORWARDED-HOST", b"\xe9")], True),  # a latin-1 byte, other spellings
    ([(b"X-Forwarded-Uri", "/caf\u00e9".encode())], True),  # well-formed UTF-8 is still not ASCII
    ([(b"X-Forwarded-Uri", b"/\xed\xa0\x80")], True),  # an encoded surrogate
    ([(b"X-Forwarded-Method", b"G\xc0\xafT")], True),  # an overlong encoding
    ([(b"Authorization", b"Bearer \xff\xfe")], True),
    ([(b"X-App", b"\xff"), (b"X-Forwarded-Proto", "\u2028".encode())], True),
    ([(b"X-App", b"\xff\xfe \xed\xa0\x80")], False),  # a header the sidecar never reads: passed on
    ([(b"X-Request-Id", b"id-\xff"), (b"X-App", b"\x80")], False),  # an undecodable id: replaced, not refused
]


async def test_hostile_header_bytes_and_ids_on_both_auth_listeners_give_one_valid_line_each(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The one-pass gate in front of ``refuse_undecodable`` on the main /oauth2/auth, the lean --auth-address
    listener's decision and its decision-cache hits: every family refused or passed as the full check would,
    and each answer one access line that is a JSON object on its own, with an id of the strict pattern."""
    from tests.test_auth_listener import auth_listener

    caplog.set_level(logging.INFO, "sidecar.access")
    async with stack(MemoryStore(), request_logging="true") as st, browser() as client:
        await sign_in(client, st.base)
        cookie = (b"Cookie", ("_sidecar=" + (session_cookie(client) or "")).encode())
        async with auth_listener(st) as lean:
            logs.flush()
            capsys.readouterr()
            answers: list[tuple[int, dict[str, str]]] = []
            for base in (st.base, f"http://127.0.0.1:{lean}", f"http://127.0.0.1:{lean}"):  # lean twice: hits
                for extra, refused in HOSTILE_BYTES:
                    status, headers, _ = await _raw(base, "/oauth2/auth", [cookie, *extra])
                    assert status == (400 if refused else 202), (base, extra, status)
                    answers.append((status, headers))
                for rid in (b'a"}\n{"x":1', b"a\r\nb", b'a\r\n{"x":1}', b"\\u0022", b'"', b"ok.id-1"):
                    status, headers, _ = await _raw(base, "/oauth2/auth", [cookie, (b"X-Request-Id", rid)])
                    if b"\n" in rid:  # the parser's own 400 (a broken head): no route ran, so no line
                        assert status == 400 and "X-Request-Id" not in headers, (base, rid, status, headers)
                    else:
                        assert status == 202, (base, rid, status)
                        answers.append((status, headers))
            logs.flush()
    text = capsys.readouterr().err
    lines = [line for line in text.splitlines() if '"sidecar.access"' in line]
    assert len(lines) == len(answers), (len(lines), len(answers))
    assert cookie[1].decode().split("=", 1)[1] not in text and '{"x":1' not in text
    for line, (status, headers) in zip(lines, answers, strict=True):
        entry = json.loads(line)
        assert line == json.dumps(entry, separators=(",", ":")) and entry["status"] == status
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", entry["request_id"]), entry["request_id"]
        assert headers.get("X-Request-Id") in (None, entry["request_id"]) and "Server" not in headers
