"""Reverse proxying to the demo app: bodies, streaming, WebSockets, failures, paths."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from yarl import URL

from sidecar.errors import BadRequest
from sidecar.proxy import normalise_path
from sidecar.store import MemoryStore
from tests.e2e.chromium import one_page
from tests.stack import browser, free_port, sign_in, stack
from tests.test_paths import raw_request, recording_upstream


async def test_method_query_body_and_forwarded_headers_are_kept() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        await sign_in(client, st.base)
        body = b"x" * 300_000
        async with client.post(
            f"{st.base}/_demo/echo?a=1&a=2&b=%20",
            data=body,
            headers={
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Drop",
                "X-Drop": "gone",
                "Content-Type": "application/octet-stream",
            },
        ) as resp:
            assert resp.status == 200
            echo = await resp.json()
        assert echo["method"] == "POST" and echo["body_length"] == len(body)
        assert echo["query"] == {"a": ["1", "2"], "b": [" "]}
        headers = {k.lower(): v for k, v in echo["headers"].items()}
        assert headers["x-custom"] == "kept" and "x-drop" not in headers
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["x-forwarded-proto"] == "http"
        assert headers["x-forwarded-host"] == st.base.removeprefix("http://")


async def test_chunked_upload_and_streamed_response_are_not_buffered() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        await sign_in(client, st.base)

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(20):
                yield b"y" * 10_000

        async with client.put(f"{st.base}/_demo/echo", data=chunks()) as resp:
            assert (await resp.json())["body_length"] == 200_000
        started = time.monotonic()
        async with client.get(f"{st.base}/_demo/stream?n=5&delay=0.3") as resp:
            first = await resp.content.readline()
            first_at = time.monotonic() - started
            rest = await resp.read()
        assert first == b"chunk 0\n" and rest.count(b"chunk") == 4
        assert first_at < 0.9  # the first chunk arrived long before the 1.2 s the whole body takes


async def test_websocket_is_proxied() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        await sign_in(client, st.base)
        async with client.ws_connect(f"{st.base}/_demo/ws") as ws:
            await ws.send_str("hello")
            assert (await ws.receive()).data == "hello"
            await ws.send_bytes(b"\x00\x01")
            assert (await ws.receive()).data == b"\x00\x01"


async def test_upstream_down_is_502_and_slow_upstream_is_504() -> None:
    dead = f"http://127.0.0.1:{free_port()}/"
    async with stack(MemoryStore(), upstream_timeout="0.5s") as st, browser() as client:
        await sign_in(client, st.base)
        async with client.get(f"{st.base}/_demo/stream?n=2&delay=2") as resp:
            # headers come at once, then the body stalls past the read timeout: the connection is cut
            assert resp.status == 200
        second = await st.add_sidecar(MemoryStore(), upstream=dead)
        async with aiohttp.ClientSession() as anon, anon.get(f"{second}/ping") as resp:
            assert resp.status == 200
    async with stack(MemoryStore(), skip_auth_route="^/", upstream=dead) as st, aiohttp.ClientSession() as anon:
        async with anon.get(f"{st.base}/anything") as resp:
            assert resp.status == 502
            assert "upstream" in await resp.text()


async def test_slow_upstream_headers_give_504() -> None:
    from aiohttp import web

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with (
            stack(
                MemoryStore(), skip_auth_route="^/", upstream=f"http://127.0.0.1:{port}/", upstream_timeout="0.3s"
            ) as st,
            aiohttp.ClientSession() as anon,
            anon.get(f"{st.base}/x") as resp,
        ):
            assert resp.status == 504
    finally:
        await runner.cleanup()


async def test_a_quiet_stream_is_closed_upstream_soon_after_the_client_leaves() -> None:
    """An SSE upstream that has nothing more to say must not hold its connection after the browser left."""
    closed = asyncio.Event()

    async def sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"d\r\ndata: hello\n\n\r\n")
        await writer.drain()
        await reader.read()  # nothing more is written: EOF here means the sidecar closed its side
        closed.set()
        writer.close()

    server = await asyncio.start_server(sse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with stack(MemoryStore(), skip_auth_route="^/", upstream=f"http://127.0.0.1:{port}/") as st:
            async with aiohttp.ClientSession() as client, client.get(f"{st.base}/events") as resp:
                assert resp.status == 200
                assert await resp.content.readline() == b"data: hello\n"
            assert not closed.is_set()  # still open while the client listened
            await asyncio.wait_for(closed.wait(), timeout=5)  # the upstream timeout is 30 s: this is the watcher
    finally:
        server.close()


async def test_path_prefix_routing_picks_the_longest_prefix() -> None:
    async with stack(MemoryStore(), skip_auth_route="^/", upstream="") as st, aiohttp.ClientSession() as anon:
        api = await st.add_sidecar(
            MemoryStore(), skip_auth_route="^/", upstream=f"{st.upstream_url}/_demo/,http://127.0.0.1:{free_port()}/"
        )
        async with anon.get(f"{api}/_demo/echo") as resp:
            assert resp.status == 200  # /_demo/ goes to the demo app
        async with anon.get(f"{api}/other") as resp:
            assert resp.status == 502  # / goes to the dead one
        async with anon.get(f"{st.base}/x") as resp:
            assert resp.status == 404  # no upstream at all


def test_paths_are_normalised_before_matching_and_forwarding() -> None:
    assert normalise_path("//x//y/") == "/x/y/"
    assert normalise_path("/a%2Eb/%7Ex") == "/a.b/~x"
    for tricky in ("/a/../b", "/public/..%2Fadmin", "/%2e%2e/etc", "/a/./b/"):
        with pytest.raises(BadRequest):
            normalise_path(tricky)  # more in tests/test_paths.py


async def test_skip_auth_cannot_be_reached_by_a_path_that_normalises_elsewhere() -> None:
    async with stack(MemoryStore(), skip_auth_route="GET=^/public/") as st, aiohttp.ClientSession() as anon:
        async with anon.get(f"{st.base}/public/ok") as resp:
            assert resp.status == 200
        for path in ("/public/..%2F_demo/echo", "/public/%2e%2e/_demo/echo", "/_demo/echo?x=/public/"):
            async with anon.get(URL(st.base + path, encoded=True), headers={"Accept": "application/json"}) as resp:
                assert resp.status in (400, 401), path
        async with anon.post(f"{st.base}/public/ok") as resp:
            assert resp.status == 401  # the rule is for GET only


async def test_the_clients_authorization_reaches_the_app_unless_the_sidecar_sets_one() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        await sign_in(client, st.base)
        for spelling in ("Authorization", "authorization"):
            async with client.get(f"{st.base}/_demo/echo", headers={spelling: "Basic YXBwOnB3"}) as resp:
                headers = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
            assert headers["authorization"] == "Basic YXBwOnB3"  # the app's own scheme, untouched
            assert headers["x-auth-request-user"]  # while the identity headers are still the sidecar's
    async with stack(MemoryStore(), pass_authorization_header="true") as st, browser() as client:
        await sign_in(client, st.base)
        async with client.get(f"{st.base}/_demo/echo", headers={"Authorization": "Bearer forged"}) as resp:
            headers = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
        assert headers["authorization"].startswith("Bearer ey") and "forged" not in headers["authorization"]
    async with stack(MemoryStore(), pass_authorization_header="true", skip_auth_route="^/_demo/") as st:
        async with aiohttp.ClientSession() as anon:
            async with anon.get(f"{st.base}/_demo/echo", headers={"Authorization": "Bearer forged"}) as resp:
                headers = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
        assert "authorization" not in headers  # the app trusts this header: nobody else may set it


_FROM_A_PROXY = [
    ("Forwarded", "for=1.2.3.4;host=evil.example;proto=https"),
    ("X-Real-IP", "1.2.3.4"),
    ("x-real-ip", "1.2.3.5"),
    ("X_Real_IP", "1.2.3.6"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/admin"),
    ("x_forwarded_prefix", "/admin2"),
    ("X-Forwarded-Server", "evil"),
    ("X-Forwarded-Scheme", "https"),
]
_REWRITTEN = [
    ("X-Forwarded-Host", "evil.example"),
    ("x-forwarded-host", "evil2.example"),
    ("X_Forwarded_Host", "evil3.example"),
    ("x-forwarded-proto", "https"),
    ("X-Forwarded-For", "9.9.9.9"),
    ("x_forwarded_for", "8.8.8.8"),
]
_PATH_OVERRIDES = [("X-Original-URL", "/admin"), ("x-rewrite-url", "/admin"), ("X_Original_URL", "/admin")]
_METHOD_OVERRIDES = [("X-HTTP-Method-Override", "DELETE"), ("x-http-method", "PUT"), ("X-Method-Override", "DELETE")]


async def _forwarded(base: str, recorder, headers) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    recorder.seen.clear()
    async with aiohttp.ClientSession() as anon, anon.get(f"{base}/public/x", headers=headers) as resp:
        assert resp.status == 200
    (seen,) = recorder.seen
    out: dict[str, list[str]] = {}
    for name, value in seen["header_list"]:
        out.setdefault(name.lower(), []).append(value)
    return out


async def test_headers_about_the_client_are_believed_only_from_a_trusted_proxy() -> None:
    sent = _FROM_A_PROXY + _REWRITTEN + _PATH_OVERRIDES + _METHOD_OVERRIDES + [("X-Kept", "1")]
    async with recording_upstream() as up, stack(MemoryStore(), skip_auth_route="GET=^/public/", upstream=up.url) as st:
        got = await _forwarded(st.base, up, sent)
        host = st.base.removeprefix("http://")
        assert got["x-forwarded-host"] == [host] and got["x-forwarded-proto"] == ["http"]
        assert got["x-forwarded-for"] == ["127.0.0.1"] and got["host"] == [host] and got["x-kept"] == ["1"]
        for name, _ in _FROM_A_PROXY + _PATH_OVERRIDES + _METHOD_OVERRIDES:
            assert name.lower() not in got and name.lower().replace("_", "-") not in got, name
        trusted = await st.add_sidecar(
            MemoryStore(), skip_auth_route="GET=^/public/", upstream=up.url, reverse_proxy="true"
        )
        got = await _forwarded(trusted, up, sent)
        assert got["forwarded"] == [_FROM_A_PROXY[0][1]] and got["x-forwarded-port"] == ["443"]
        assert got["x-forwarded-prefix"] == ["/admin"] and "x-real-ip" in got
        (forwarded_host,) = got["x-forwarded-host"]  # the trusted proxy's view, one value
        assert forwarded_host in ("evil.example", "evil2.example")
        assert got["x-forwarded-for"] == ["9.9.9.9, 127.0.0.1"]
        assert "x-original-url" not in got and "x-rewrite-url" not in got  # a path the rules never saw
        assert "x-http-method-override" not in got  # the GET-only rule let this request through
    async with stack(MemoryStore()) as st, browser() as client:
        await sign_in(client, st.base)
        async with client.post(f"{st.base}/_demo/echo", headers=dict(_METHOD_OVERRIDES)) as resp:
            names = {k.lower() for k in (await resp.json())["headers"]}
        assert {name.lower() for name, _ in _METHOD_OVERRIDES} <= names  # signed in: the app's business


_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
_GOOD = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": _KEY}


def _bad_handshakes() -> list[tuple[str, dict[str, str]]]:
    cases: list[tuple[str, dict[str, str]]] = [("POST", _GOOD)]
    for key in (
        "",
        "not base64!",
        "dGhlIHNhbXBsZSBub25j",
        "dGhlIHNhbXBsZSBub25jZSE=",
        "AAAA" * 8,
        "dGhlIHNhbXBsZSBub25jZQ",
    ):
        cases.append(("GET", {**_GOOD, "Sec-WebSocket-Key": key}))
    for version in ("8", "7", "12", "14", "", "13, 8", "thirteen"):
        cases.append(("GET", {**_GOOD, "Sec-WebSocket-Version": version}))
    for connection in ("keep-alive", "close", "", "upgrades"):
        cases.append(("GET", {**_GOOD, "Connection": connection}))
    for upgrade in ("websocket, h2c", "websocket2, websocket"):
        cases.append(("GET", {**_GOOD, "Upgrade": upgrade}))
    without_key = {k: v for k, v in _GOOD.items() if k != "Sec-WebSocket-Key"}
    without_version = {k: v for k, v in _GOOD.items() if k != "Sec-WebSocket-Version"}
    return [*cases, ("GET", without_key), ("GET", without_version)]


async def test_websocket_handshake_is_checked_before_the_upstream_is_contacted() -> None:
    async with (
        recording_upstream() as up,
        stack(MemoryStore(), skip_auth_route="^/ws", upstream=up.url) as st,
    ):
        for method, headers in _bad_handshakes():
            up.seen.clear()
            status = await raw_request(st.base, "/ws", method=method, headers=headers)
            assert status == 400, (method, headers)
            assert up.seen == [], (method, headers)  # no upstream connection was opened
        # A good handshake is a real browser's: a page of the site opens a WebSocket in Chromium, which sets
        # Origin, Sec-WebSocket-Key/-Version and Upgrade itself.
        async with one_page() as page:
            await page.goto(st.base + "/ws-page", wait_until="load")  # a page of the site (skip-auth: ^/ws)
            up.seen.clear()
            echoed = await page.evaluate(
                """url => new Promise((resolve, reject) => {
                    const ws = new WebSocket(url);
                    ws.onopen = () => ws.send('hi');
                    ws.onmessage = event => { resolve(event.data); ws.close(); };
                    ws.onerror = () => reject(new Error('websocket error'));
                })""",
                st.base.replace("http://", "ws://") + "/ws",
            )
        assert echoed == "hi"
        (seen,) = up.seen
        assert seen["headers"]["Host"] == st.base.removeprefix("http://")  # the client's Host, not the upstream's
        assert seen["headers"]["Origin"] == st.base  # as Chromium sent it
