"""Hostile requests through two revisions of the reverse proxy: what each upstream receives, what each client gets.

``python -m tests.bench.differential --base-root DIR [--root DIR]``

``DIR`` holds a ``sidecar`` package (``git archive REV sidecar | tar -x -C DIR``). Both sidecars run as real
processes with the same settings, Redis and dev provider; each proxies to its own raw echo upstream (a socket
server that keeps the request head byte for byte and answers with hop-by-hop and repeated response headers).
Every request of the family is sent as raw bytes to both; the lines the upstream received (the session cookie
replaced by ``<cookie>``) and the answer the client got (without ``Date`` and ``X-Request-Id``) are compared.
Prints each request with the one side, or both sides where they differ; exit status 1 when any differs
that ``EXPLAINED`` does not explain.
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


# Differences against 3c5a2da (before perf-proxy3) that are meant, and why; any other one is a finding.
EXPLAINED = {
    "repeat case variants": "perf-proxy3: one field line in the order sent (before: aiohttp's merge kept the last)",
    "two Connection lines": "perf-proxy3: every Connection line lists hop-by-hop names (RFC 9110 7.6.1)",
    "two Authorization": "review-proxy3: refused with 400 (before: joined into one value no app reads)",
    "Authorization case variants": "review-proxy3: refused with 400, as the same spelling twice",
    "underscored framing names": "review-proxy3: Transfer_Encoding, Content_Length... dropped as their - spellings",
    "X-Forwarded-User-ish": "review-proxy3: X.Forwarded.User dropped (PHP reads it as X_FORWARDED_USER)",
}
# Answer lines that differ against 3c5a2da, and why.
EXPLAINED_ANSWER_LINES = {
    "X-Hop-Two: 2": "review-proxy3: the answer's second Connection line is read too (X-Hop-Two dropped)",
}


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
    """(name, raw request) pairs, each with the signed-in session cookie."""
    c = f"Cookie: _sidecar={cookie}\r\n"
    h = "Host: app.example\r\n"

    def get(*lines: str, method: str = "GET", body: str = "", version: str = "1.1") -> bytes:
        extra = "".join(line + "\r\n" for line in lines)
        return f"{method} /app/x HTTP/{version}\r\n{h}{c}{extra}\r\n{body}".encode()

    def post(*lines: str, body: str = "3\r\nabc\r\n0\r\n\r\n") -> bytes:
        return get(*lines, method="POST", body=body)

    def head(*lines: str) -> bytes:
        return "".join(lines).encode() + f"{c}\r\n".encode()

    big = "x" * 200_000
    parts = (big[i : i + 7000] for i in range(0, 200_000, 7000))
    chunked_big = "".join(f"{len(part):x}\r\n{part}\r\n" for part in parts) + "0\r\n\r\n"
    te = "Transfer-Encoding: chunked"
    ws = ["Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13"]
    ws += ["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "X-Forwarded-User: m1"]
    forged = ["X-Forwarded-User: m1", "X_Forwarded_User: m2", "x-forwarded-user: m3", "X-Auth-Request-User: m4"]
    forged += ["X_AUTH_REQUEST_EMAIL: m5", "X-Forwarded-Access-Token: m6"]
    hops = ["TE: trailers", "Trailer: X-A", "Upgrade: h2c", "Proxy-Connection: keep-alive", "Keep-Alive: 5"]
    hops.append("Proxy-Authorization: Basic eDp5")
    underscored = ["Transfer_Encoding: chunked", "Content_Length: 40", "Keep_Alive: 1", "Proxy_Connection: x"]
    return [
        ("plain", get()),
        ("repeat same spelling", get("X-Custom: a", "X-Custom: b")),
        ("repeat case variants", get("X-Custom: a", "x-custom: b", "X-CUSTOM: c")),
        ("two Authorization", get("Authorization: Basic YTpi", "Authorization: Basic Yzpk")),
        ("Authorization case variants", get("Authorization: Basic YTpi", "authorization: Basic Yzpk")),
        ("two Content-Type", get("Content-Type: text/plain", "content-type: application/json")),
        ("two Host", head("GET /app/x HTTP/1.1\r\n", h, "Host: evil.example\r\n")),
        ("two Host case", head("GET /app/x HTTP/1.1\r\n", h, "host: evil.example\r\n")),
        ("Host lower only", head("GET /app/x HTTP/1.1\r\n", "host: app.example\r\n")),
        ("no Host", head("GET /app/x HTTP/1.1\r\n")),
        ("absolute-form", head("GET http://evil.example/app/x HTTP/1.1\r\n", h)),
        ("two Content-Length equal", post("Content-Length: 3", "Content-Length: 3", body="abc")),
        ("two Content-Length differ", post("Content-Length: 3", "Content-Length: 1", body="abc")),
        ("Content-Length list", post("Content-Length: 3, 3", body="abc")),
        ("CL + TE", post("Content-Length: 3", te)),
        ("TE chunked", post(te)),
        ("TE chunked with trailer", post(te, body="3\r\nabc\r\n0\r\nX-Forwarded-User: mallory\r\n\r\n")),
        ("TE twice", post("Transfer-Encoding: gzip", te)),
        ("TE chunked, identity", post("Transfer-Encoding: chunked, identity")),
        ("big chunked upload", post(te, body=chunked_big)),
        ("big upload", get(f"Content-Length: {len(big)}", method="PUT", body=big)),
        ("Expect 100", post("Expect: 100-continue", "Content-Length: 3", body="abc")),
        ("HEAD", get(method="HEAD")),
        ("HTTP/1.0", get(version="1.0")),
        ("hop-by-hop family", get(*hops)),
        ("underscored framing names", get(*underscored)),
        ("Connection: close, X-Auth-Request-User", get("Connection: close, X-Auth-Request-User")),
        ("Connection: X-Forwarded-User", get("Connection: X-Forwarded-User")),
        ("Connection: X-Forwarded-*", get("Connection: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host")),
        ("Connection: Authorization", get("Authorization: Basic YTpi", "Connection: Authorization")),
        ("Connection: Host", get("Connection: Host")),
        ("Connection: Cookie", get("Cookie: app=1", "Connection: Cookie")),
        ("Connection: Content-Length", post("Content-Length: 3", "Connection: Content-Length", body="abc")),
        ("two Connection lines", get("Connection: keep-alive", "Connection: X-Drop", "X-Drop: 1", "X-Keep: 1")),
        ("forged identity spellings", get(*forged)),
        ("X-Forwarded-User repeated", get("X-Forwarded-User: m1", "X-Forwarded-User: m2")),
        ("name with trailing space", get("X-Forwarded-User : m1")),
        ("obs-fold", get("X-Custom: a", " X-Forwarded-User: m1")),
        ("unicode look-alike name", get("X-Forwarded-Us\u0435r: m1")),
        ("X-Forwarded-User-ish", get("X-Forwarded-User2: m1", "X-Forwarded--User: m2", "X.Forwarded.User: m3")),
        ("Cookie twice", get("Cookie: a=1", "cookie: b=2; _sidecar=forged")),
        ("X-Forwarded-For from client", get("X-Forwarded-For: 6.6.6.6", "Forwarded: for=6", "X-Real-IP: 6.6.6.6")),
        ("method override", get("X-HTTP-Method-Override: DELETE", "X-Original-URL: /admin")),
        ("websocket handshake", get(*ws)),
    ]


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
    # Date and X-Request-Id differ by nature, Sec-WebSocket-Key is aiohttp's random nonce
    return [line for line in lines if not re.match(r"(?i)(date|x-request-id|sec-websocket-key):", line)]


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
            got_up = ["<nothing upstream>"]
            if upstream:
                got_up = _clean(upstream[0][0], cookie, echo.port) + [f"<body {len(upstream[0][1])} bytes>"]
            seen.append((got_up, _clean(answer, cookie, port)))
        # an answer line only one side has, and why (the echo app's second Connection line lists X-Hop-Two)
        answer_only = set(seen[0][1]) ^ set(seen[1][1])
        answers_explained = bool(answer_only) and answer_only <= EXPLAINED_ANSWER_LINES.keys()
        same = seen[0] == seen[1]
        explained = title in EXPLAINED or (seen[0][0] == seen[1][0] and answers_explained)
        differ += not same and not explained
        why = EXPLAINED.get(title, "") or "; ".join(EXPLAINED_ANSWER_LINES[line] for line in answer_only)
        print(f"=== {title}: {'same' if same else 'DIFFERENT' + (f' (explained: {why})' if explained else '')}")
        for (name, _, _), (up, answer) in zip(sides, seen, strict=True):
            if name == "after" and (same or (explained and title not in EXPLAINED)):
                break
            print(f"  --- {name}: upstream received")
            print("\n".join("    " + line for line in up if line))
            print(f"  --- {name}: client got")
            print("\n".join("    " + line for line in answer[:40] if line))
    print(f"{differ} of {len(_cases(cookie))} requests differ unexplained")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.differential", description=__doc__)
    parser.add_argument("--base-root", type=Path, required=True)
    parser.add_argument("--root", type=Path, default=procs.ROOT)
    args = parser.parse_args(argv)
    return asyncio.run(_run(args.base_root, args.root))


if __name__ == "__main__":
    sys.exit(main())
