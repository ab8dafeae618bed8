"""The baselines: tiny aiohttp servers run exactly like the sidecar (uvloop, N forked workers, one socket).

``python -m tests.bench.servers KIND --port P --workers N [--target URL]`` where KIND is

* ``bare``: answers every request with an empty 202 (the framework's limit, and the
  stand-in for the sidecar behind nginx ``auth_request``);
* ``raw``: the same empty 202 from a bare ``asyncio.Protocol`` on llhttp (``httptools``), no
  framework at all: the floor under the lean ``--auth-address`` listener;
* ``upstream``: the small app behind the proxies, a fixed 1 KiB page (``/_bench/headers``
  answers with the request's headers as JSON, so the bench can see what each proxy sends);
* ``passthrough``: a minimal streaming reverse proxy to ``--target``, built like the
  sidecar's proxy (pooled client, hop-by-hop headers dropped, body streamed both ways)
  but with no authentication, so it is what "proxying in aiohttp" costs by itself.
  ``--set-header NAME=VALUE`` and ``--drop-header NAME`` (repeatable) make it send the same
  identity headers (and no session cookie) as the sidecar, so both send the same bytes upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

from sidecar.headers import HOP_BY_HOP  # the same set the sidecar drops

UPSTREAM_BODY = (b"<!doctype html><html><head><title>bench upstream</title></head><body>" + b"x" * 1024)[:1024]


def bare_app() -> web.Application:
    async def accept(request: web.Request) -> web.Response:
        return web.Response(status=202)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", accept)
    return app


def upstream_app() -> web.Application:
    async def page(request: web.Request) -> web.Response:
        if request.path == "/_bench/headers":
            return web.json_response(list(request.headers.items()))
        return web.Response(body=UPSTREAM_BODY, content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    return app


def passthrough_app(target: str, set_headers: Sequence[str] = (), drop_headers: Sequence[str] = ()) -> web.Application:
    fixed = dict(item.split("=", 1) for item in set_headers)
    dropped = {name.lower() for name in drop_headers} | {name.lower() for name in fixed}
    client_key = web.AppKey("client", aiohttp.ClientSession)
    target = target.rstrip("/")

    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        app[client_key] = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        yield
        await app[client_key].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length" and k.lower() not in dropped
        }
        headers.update(fixed)
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        headers["X-Forwarded-For"] = str(request.remote)
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host
        body = request.content if request.body_exists else None
        try:
            upstream = await request.app[client_key].request(
                request.method,
                target + request.rel_url.raw_path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(sock_connect=30, sock_read=30),
            )
        except (TimeoutError, aiohttp.ClientError):
            return web.Response(status=502)
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            if upstream.headers.get("Content-Length") is None and request.method != "HEAD":
                response.enable_chunked_encoding()
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            upstream.release()

    app = web.Application()
    app.cleanup_ctx.append(client_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def build(
    kind: str, target: str | None, set_headers: Sequence[str] = (), drop_headers: Sequence[str] = ()
) -> web.Application:
    if kind == "bare":
        return bare_app()
    if kind == "upstream":
        return upstream_app()
    if kind == "passthrough":
        if not target:
            raise SystemExit("passthrough needs --target")
        return passthrough_app(target, set_headers, drop_headers)
    raise SystemExit(f"unknown server kind {kind!r}")


_dates: list[object] = [0, ""]


def _date() -> str:
    """Formatted once a second, as aiohttp and the lean listener do."""
    import email.utils
    import time

    now = int(time.time())
    if _dates[0] != now:
        _dates[0], _dates[1] = now, email.utils.formatdate(now, usegmt=True)
    return str(_dates[1])


class _Raw(asyncio.Protocol):
    """An empty 202 (with Date, as aiohttp sends) per request; keep-alive as the client asks. Nothing else."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:  # noqa: BLE001 - a baseline: drop what it cannot parse
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        head = "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nDate: " + _date()
        assert self.transport is not None
        self.transport.write((head + ("\r\n\r\n" if keep else "\r\nConnection: close\r\n\r\n")).encode())
        if not keep:
            self.transport.close()


async def _serve_raw(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Raw, sock=sock, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


async def _serve(kind: str, target: str | None, sock: socket.socket, extra: tuple[list[str], list[str]]) -> None:
    if kind == "raw":
        await _serve_raw(sock)
        return
    runner = web.AppRunner(build(kind, target, *extra), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def _worker(kind: str, target: str | None, sock: socket.socket, extra: tuple[list[str], list[str]]) -> None:
    import uvloop

    uvloop.install()
    asyncio.run(_serve(kind, target, sock, extra))


def _listener(port: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.servers")
    parser.add_argument("kind", choices=("bare", "raw", "upstream", "passthrough"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--target")
    parser.add_argument("--set-header", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--drop-header", action="append", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    extra = (args.set_header, args.drop_header)
    # The same socket layout as `python -m sidecar --workers N`: one listener per worker with
    # SO_REUSEPORT when there are several, so baseline and sidecar are spread alike.
    if args.workers <= 1:
        _worker(args.kind, args.target, _listener(args.port, reuse_port=False), extra)
        return
    pids = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _worker(args.kind, args.target, _listener(args.port, reuse_port=True), extra)
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent's loop
                code = 1
            os._exit(code)
        pids.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for pid in pids:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break


if __name__ == "__main__":
    main()
