"""Hostile requests through two revisions of the reverse proxy: what each upstream receives, what each client gets.

``python -m tests.bench.differential --base-root DIR [--root DIR]``

``DIR`` holds a ``sidecar`` package (``git archive REV sidecar | tar -x -C DIR``). Both sidecars run as real
processes with the same settings, Redis and dev provider; each proxies to its own raw echo upstream (a socket
server that keeps the request head byte for byte and answers with hop-by-hop and repeated response headers).
Every request of the family is sent as raw bytes to both; the lines the upstream received (the session cookie
replaced by ``<cookie>``) and the answer the client got (without ``Date`` and ``X-Request-Id``) are compared.
Prints each request with the one side, or both sides where they differ; exit status 1 when any differs.
A review tool: run by hand, not by the suite (the earlier revision is whatever the reviewer extracts).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from pathlib import Path

from . import procs
from .population import sign_in

_ANSWER_HEAD = (
    "HTTP/1.1 200 OK\r\n"
    "Set-Cookie: a=1; Path=/\r\n"
    "Set-Cookie: b=2; Path=/\r\n"
    "set-cookie: c=3, d=4\r\n"
    "Connection: keep-alive, X-Hop-One\r\n"
    "Connection: X-Hop-Two\r\n"
    "X-Hop-One: 1\r\n"
    "X-Hop-Two: 2\r\n"
    "Keep-Alive: timeout=5\r\n"
    "Proxy-Connection: keep-alive\r\n"
    "Trailer: X-T\r\n"
    "Upgrade: h2c\r\n"
    "Server: echo-upstream\r\n"
    "X-Multi: 1\r\n"
    "x-multi: 2\r\n"
)


class Echo:
    """A raw HTTP/1.1 upstream: keeps every request's head and body as received."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bytes]] = []
        self.port = 0

    async def start(self) -> None:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                body = b""
                if b"\r\ntransfer-encoding: chunked" in lower:
                    while True:
                        size_line = await reader.readuntil(b"\r\n")
                        size = int(size_line.split(b";")[0], 16)
                        body += size_line
                        if size == 0:
                            body += await _trailers(reader)
                            break
                        body += await reader.readexactly(size + 2)
                elif m := re.search(rb"\r\ncontent-length: *(\d+)", lower):
                    body = await reader.readexactly(int(m.group(1)))
                self.seen.append((head, body))
                method = head.split(b" ", 1)[0]
                if head.lower().find(b"\r\nupgrade: websocket") >= 0:
                    writer.close()
                    return
                payload = b"" if method == b"HEAD" else b"hello"
                writer.write((_ANSWER_HEAD + "Content-Length: 5\r\n\r\n").encode() + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def _trailers(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while True:
        line = await reader.readuntil(b"\r\n")
        out += line
        if line == b"\r\n":
            return out


def _cases(cookie: str) -> list[tuple[str, bytes]]:
    """(name, raw request) pairs; ``{C}`` is the signed-in session cookie's header line."""
    c = f"Cookie: _sidecar={cookie}\r\n"
    h = "Host: app.example\r\n"

    def get(extra: str, path: str = "/app/x", method: str = "GET", body: str = "", version: str = "1.1") -> bytes:
        return f"{method} {path} HTTP/{version}\r\n{h}{c}{extra}\r\n{body}".encode()

    big = "x" * 200_000
    chunked_big = "".join(f"{len(part):x}\r\n{part}\r\n" for part in (big[i : i + 7000] for i in range(0, 200_000, 7000)))
    cases: list[tuple[str, bytes]] = [
        ("plain", get("")),
        ("repeat same spelling", get("X-Custom: a\r\nX-Custom: b\r\n")),
        ("repeat case variants", get("X-Custom: a\r\nx-custom: b\r\nX-CUSTOM: c\r\n")),
        ("two Authorization", get("Authorization: Basic YTpi\r\nAuthorization: Basic Yzpk\r\n")),
        ("Authorization case variants", get("Authorization: Basic YTpi\r\nauthorization: Basic Yzpk\r\n")),
        ("two Content-Type", get("Content-Type: text/plain\r\ncontent-type: application/json\r\n")),
        ("two Host", f"GET /app/x HTTP/1.1\r\n{h}Host: evil.example\r\n{c}\r\n".encode()),
        ("two Host case", f"GET /app/x HTTP/1.1\r\n{h}host: evil.example\r\n{c}\r\n".encode()),
        ("Host lower only", f"GET /app/x HTTP/1.1\r\nhost: app.example\r\n{c}\r\n".encode()),
        ("no Host", f"GET /app/x HTTP/1.1\r\n{c}\r\n".encode()),
        ("absolute-form", f"GET http://evil.example/app/x HTTP/1.1\r\n{h}{c}\r\n".encode()),
        ("two Content-Length equal", get("Content-Length: 3\r\nContent-Length: 3\r\n", method="POST", body="abc")),
        ("two Content-Length differ", get("Content-Length: 3\r\nContent-Length: 1\r\n", method="POST", body="abc")),
        ("Content-Length list", get("Content-Length: 3, 3\r\n", method="POST", body="abc")),
        ("CL + TE", get("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", method="POST", body="3\r\nabc\r\n0\r\n\r\n")),
        ("TE chunked", get("Transfer-Encoding: chunked\r\n", method="POST", body="3\r\nabc\r\n0\r\n\r\n")),
        (
            "TE chunked with trailer",
            get("Transfer-Encoding: chunked\r\nTrailer: X-Forwarded-User\r\n", method="POST", body="3\r\nabc\r\n0\r\nX-Forwarded-User: mallory\r\n\r\n"),
        ),
        ("TE twice", get("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", method="POST", body="3\r\nabc\r\n0\r\n\r\n")),
        ("TE chunked, identity", get("Transfer-Encoding: chunked, identity\r\n", method="POST", body="3\r\nabc\r\n0\r\n\r\n")),
        ("big chunked upload", get("Transfer-Encoding: chunked\r\n", method="POST", body=chunked_big + "0\r\n\r\n")),
        ("big upload", get(f"Content-Length: {len(big)}\r\n", method="PUT", body=big)),
        ("Expect 100", get("Expect: 100-continue\r\nContent-Length: 3\r\n", method="POST", body="abc")),
        ("HEAD", get("", method="HEAD")),
        ("HTTP/1.0", get("", version="1.0")),
        ("hop-by-hop family", get("TE: trailers\r\nTrailer: X-A\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\nKeep-Alive: 5\r\nProxy-Authorization: Basic eDp5\r\n")),
        ("Connection: close, X-Auth-Request-User", get("Connection: close, X-Auth-Request-User\r\n")),
        ("Connection: X-Forwarded-User", get("Connection: X-Forwarded-User\r\n")),
        ("Connection: X-Forwarded-For/Proto/Host", get("Connection: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host\r\n")),
        ("Connection: Authorization", get("Authorization: Basic YTpi\r\nConnection: Authorization\r\n")),
        ("Connection: Host", get("Connection: Host\r\n")),
        ("Connection: Cookie", get("Cookie: app=1\r\nConnection: Cookie\r\n")),
        ("Connection: Content-Length", get("Content-Length: 3\r\nConnection: Content-Length\r\n", method="POST", body="abc")),
        ("two Connection lines", get("Connection: keep-alive\r\nConnection: X-Drop\r\nX-Drop: 1\r\nX-Keep: 1\r\n")),
        ("forged identity spellings", get("X-Forwarded-User: m1\r\nX_Forwarded_User: m2\r\nx-forwarded-user: m3\r\nX-Auth-Request-User: m4\r\nX_AUTH_REQUEST_EMAIL: m5\r\nX-Forwarded-Access-Token: m6\r\n")),
        ("X-Forwarded-User repeated", get("X-Forwarded-User: m1\r\nX-Forwarded-User: m2\r\n")),
        ("name with trailing space", get("X-Forwarded-User : m1\r\n")),
        ("obs-fold", get("X-Custom: a\r\n X-Forwarded-User: m1\r\n")),
        ("unicode look-alike name", get("X-Forwarded-Us\u0435r: m1\r\n")),
        ("X-Forwarded-User-ish", get("X-Forwarded-User2: m1\r\nX-Forwarded--User: m2\r\nX.Forwarded.User: m3\r\n")),
        ("Cookie twice", get("Cookie: a=1\r\ncookie: b=2; _sidecar=forged\r\n")),
        ("X-Forwarded-For from client", get("X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n")),
        ("method override", get("X-HTTP-Method-Override: DELETE\r\nX-Original-URL: /admin\r\n")),
        ("websocket handshake", get("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-User: m1\r\n")),
    ]
    return cases


async def _exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw``, read the first answer (or what came before the connection closed, 3 s at most)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if b"Expect: 100-continue" in raw:
            head, body = raw.split(b"\r\n\r\n", 1)
            writer.write(head + b"\r\n\r\n")
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            writer.write(body)
            got = interim
        else:
            writer.write(raw)
            got = b""
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except (asyncio.IncompleteReadError, TimeoutError) as exc:
            return got + (getattr(exc, "partial", b"") or b"<no answer>")
        got += head
        m = re.search(rb"\r\ncontent-length: *(\d+)", head.lower())
        if m and not raw.startswith(b"HEAD"):
            got += await asyncio.wait_for(reader.readexactly(int(m.group(1))), 5)
        return got
    finally:
        writer.close()


def _clean(text: bytes, cookie: str, port: int) -> list[str]:
    lines = text.decode("latin-1").replace(cookie, "<cookie>").replace(str(port), "<port>").split("\r\n")
    return [line for line in lines if not re.match(r"(?i)(date|x-request-id):", line)]


async def _run(base_root: Path, root: Path) -> int:
    procs.install_cleanup()
    _, redis_url = procs.start_redis()
    _, issuer = procs.start_provider()
    sides: list[tuple[str, int, Echo]] = []
    for name, where in (("before", base_root), ("after", root)):
        echo = Echo()
        await echo.start()
        port = procs.free_port()
        flags = procs.sidecar_flags(
            issuer,
            port,
            session_store_type="redis",
            redis_connection_url=redis_url,
            upstream=f"http://127.0.0.1:{echo.port}/",
            workers=1,
            request_logging="false",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        argv = [procs.PY, "-m", "sidecar", *(f"--{k}={v}" for k, v in flags.items())]
        proc = procs.Proc(f"sidecar-{name}", ["/bin/sh", "-c", f'cd "{where}" && exec "$@"', "sh", *argv], env)
        for _ in range(200):
            proc.check_alive()
            try:
                await _exchange(port, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                break
            except OSError:
                await asyncio.sleep(0.1)
        sides.append((name, port, echo))
    cookie = await sign_in(f"http://127.0.0.1:{sides[0][1]}")
    differ = 0
    for title, raw in _cases(cookie):
        seen: list[tuple[list[str], list[str]]] = []
        for _, port, echo in sides:
            before = len(echo.seen)
            answer = await _exchange(port, raw)
            await asyncio.sleep(0.05)
            upstream = echo.seen[before:]
            got_up = _clean(upstream[0][0], cookie, echo.port) + [f"<body {len(upstream[0][1])} bytes>"] if upstream else ["<nothing upstream>"]
            seen.append((got_up, _clean(answer, cookie, port)))
        same = seen[0] == seen[1]
        differ += not same
        print(f"=== {title}: {'same' if same else 'DIFFERENT'}")
        for (name, _, _), (up, answer) in zip(sides, seen, strict=True):
            if name == "after" and same:
                break
            print(f"  --- {name}: upstream received")
            print("\n".join("    " + line for line in up if line))
            print(f"  --- {name}: client got")
            print("\n".join("    " + line for line in answer[:40] if line))
    print(f"{differ} of {len(_cases(cookie))} requests differ")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.differential", description=__doc__)
    parser.add_argument("--base-root", type=Path, required=True)
    parser.add_argument("--root", type=Path, default=procs.ROOT)
    args = parser.parse_args(argv)
    return asyncio.run(_run(args.base_root, args.root))


if __name__ == "__main__":
    sys.exit(main())
