"""Reverse proxying to the demo app: bodies, streaming, WebSockets, failures, paths."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from sidecar.proxy import normalise_path
from sidecar.store import MemoryStore
from tests.stack import browser, free_port, sign_in, stack


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
    assert normalise_path("/a/../b") == "/b"
    assert normalise_path("/public/..%2Fadmin") == "/admin"
    assert normalise_path("//x//y/") == "/x/y/"
    assert normalise_path("/%2e%2e/etc") == "/etc"
    assert normalise_path("/a/./b/") == "/a/b/"


async def test_skip_auth_cannot_be_reached_by_a_path_that_normalises_elsewhere() -> None:
    async with stack(MemoryStore(), skip_auth_route="GET=^/public/") as st, aiohttp.ClientSession() as anon:
        async with anon.get(f"{st.base}/public/ok") as resp:
            assert resp.status == 200
        for path in ("/public/..%2F_demo/echo", "/public/%2e%2e/_demo/echo", "/_demo/echo?x=/public/"):
            async with anon.get(st.base + path, headers={"Accept": "application/json"}) as resp:
                assert resp.status == 401, path
        async with anon.post(f"{st.base}/public/ok") as resp:
            assert resp.status == 401  # the rule is for GET only
