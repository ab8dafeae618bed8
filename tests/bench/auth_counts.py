"""``/oauth2/auth`` by instruction counts: what the decision cache costs on a miss and saves on a hit.

``python -m tests.bench.instructions --auth [--requests N] [--shape nginx|minimal] [--sidecar-root DIR]``

Two real ``python -m sidecar`` processes under callgrind, one worker each, at the defaults with Redis,
request logging on and ``--auth-address``: one with the decision cache (``--auth-decision-cache``) on, one
with it off. Each gets, on its main listener and then on its lean listener, the same four kinds of
requests, one at a time on one keep-alive connection with the signed-in cookie: misses (a new
``X-Original-URI`` every request, never seen before in the process) and hits (one URI, a hot session; with
the cache off, the same requests). For every kind: N/4 warm-up requests, the counters zeroed, N requests,
a dump; the figure is instructions per request (user space: the syscalls are the same either way). Under
callgrind a request takes some 50 times longer, so the once-a-second work (metrics and log flushes, cache
upkeep) lands on far fewer requests than at full speed and moves with the machine's load: each process's
idle rate is measured too (counters over 5 s with no request), and the "net" figures take that rate times
each phase's duration off.
``--shape nginx`` (the default) sends what ``deploy/nginx/sidecar.conf`` sends for its auth subrequest
(Host, X-Real-IP, X-Forwarded-*, X-Original-URI) plus a browser's own headers, from a trusted peer
(``--reverse-proxy``); ``--shape minimal``: Host, X-Original-URI and Cookie at the defaults (the requests of
BENCHMARKS.md's perf-auth figures). Repeated runs of one build differ by up to 2 % on a miss, more on
a hit (a shorter request); the on/off gap within one run is steadier than either figure.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import procs
from .cases import Bench, Settings, log

_TOTAL = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.M)
IDLE_SECONDS = 5.0
KINDS = (("main", "miss"), ("lean", "miss"), ("main", "hit"), ("lean", "hit"))
_BROWSER = (
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"),
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"),
    ("Accept-Language", "en-GB,en;q=0.9"),
    ("Accept-Encoding", "gzip, deflate, br"),
    ("Sec-Fetch-Dest", "document"),
    ("Sec-Fetch-Mode", "navigate"),
    ("Sec-Fetch-Site", "same-origin"),
    ("Upgrade-Insecure-Requests", "1"),
)


def _request(shape: str, port: int, uri: str, cookie: str) -> bytes:
    if shape == "minimal":
        headers = [("Host", f"127.0.0.1:{port}"), ("X-Original-URI", uri)]
    else:  # deploy/nginx/sidecar.conf's location = /oauth2/auth, then the browser's headers nginx passes on
        headers = [
            ("Host", "app.example.test"),
            ("X-Real-IP", "203.0.113.7"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "app.example.test"),
            ("X-Forwarded-Method", "GET"),
            ("X-Forwarded-Uri", uri),
            ("X-Original-URI", uri),
            *_BROWSER,
        ]
    headers.append(("Cookie", f"_sidecar={cookie}"))
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"GET /oauth2/auth HTTP/1.1\r\n{head}\r\n".encode()


class _Client:
    """One keep-alive connection sending auth requests one at a time; every answer must be a 202."""

    def __init__(self, shape: str, port: int, cookie: str) -> None:
        self.shape, self.port, self.cookie = shape, port, cookie
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.run = secrets.token_hex(4)  # misses: URIs never seen before by this process
        self.sent = 0

    def send(self, count: int, hit: bool) -> None:
        for _ in range(count):
            self.sent += 1
            uri = "/page/hot" if hit else f"/page/{self.run}-{self.sent}"
            self.sock.sendall(_request(self.shape, self.port, uri, self.cookie))
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise RuntimeError(f"port {self.port}: connection closed after {self.sent} requests")
                data += chunk
            if not data.startswith(b"HTTP/1.1 202 "):
                raise RuntimeError(f"port {self.port}: {data[:200]!r} on request {self.sent}")


def _measure(
    name: str,
    argv: list[str],
    ports: dict[str, int],
    cookie: str,
    shape: str,
    requests: int,
    cwd: Path,
    env: dict[str, str],
) -> dict[tuple[str, ...], int]:
    """Instructions per request for each of ``KINDS`` in one sidecar process under callgrind."""
    out = procs.workdir() / f"callgrind-auth-{name}.out"
    proc = procs.Proc(
        f"callgrind-{name}", ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv], env, cwd
    )
    seen: dict[tuple[str, ...], int] = {}
    try:
        procs.wait_http(ports["main"], "/ping", proc, timeout=300)
        procs.wait_port(ports["lean"], proc, timeout=60)
        done: set[Path] = set()

        def counted(send: Callable[[], None]) -> tuple[int, float]:
            """Instructions between zeroing and dumping the counters around ``send``, and the seconds taken."""
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
            began = time.monotonic()
            send()
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
            took = time.monotonic() - began
            found = _TOTAL.search(_new_dump(out, done).read_bytes())
            if found is None:
                raise RuntimeError(f"{name}: no total in the dump")
            return int(found.group(1)), took

        idle_rate = 0.0
        for where, kind in KINDS:
            client = _Client(shape, ports[where], cookie)  # a new connection: the lean one closes idle heads
            client.send(max(50, requests // 4), kind == "hit")  # warm-up: caches filled, code paths taken
            if not idle_rate:  # the once-a-second work (metrics, log and cache upkeep) with no request at all
                total, took = counted(lambda: time.sleep(IDLE_SECONDS))
                idle_rate = total / took
                log(f"  {name} idle: {idle_rate:,.0f} instructions per second")
            total, took = counted(functools.partial(client.send, requests, kind == "hit"))
            seen[(where, kind)] = total // requests
            seen[(where, kind, "net")] = int(total - idle_rate * took) // requests
            log(f"  {name} {where} {kind}: {total // requests:,} instructions per request ({took:.0f} s)")
            client.sock.close()
    finally:
        proc.stop(30)
    return seen


def _new_dump(out: Path, done: set[Path]) -> Path:
    """The dump ``callgrind_control -d`` just wrote (it may land a moment after the command returns)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fresh = [p for p in out.parent.glob(out.name + ".*") if p not in done and p.stat().st_size]
        if fresh:
            time.sleep(0.2)  # written in one go at the dump, but let it finish
            done.add(fresh[0])
            return fresh[0]
        time.sleep(0.1)
    raise RuntimeError(f"no new callgrind dump next to {out}")


def run(requests: int, root: Path, shape: str) -> int:
    for name in ("valgrind", "callgrind_control", "redis-server"):
        procs.binary(name)
    procs.install_cleanup()
    requests = requests or 1000
    b = Bench(Settings())
    side, side_port = b.sidecar("redis", workers=1)
    cookie = b.redis_cookie(side_port)
    side.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    results: dict[str, dict[tuple[str, ...], int]] = {}
    errors: list[BaseException] = []
    threads = []
    log(f"callgrind, /oauth2/auth: {requests} requests per kind, shape {shape}, sidecar from {root}")
    began = time.monotonic()
    for cache in ("on", "off"):
        ports = {"main": procs.free_port(), "lean": procs.free_port()}
        extra = {"reverse_proxy": "true"} if shape == "nginx" else {}
        flags = procs.sidecar_flags(
            b.issuer,
            ports["main"],
            session_store_type="redis",
            workers=1,
            redis_connection_url=b.redis_url,
            auth_address=f"127.0.0.1:{ports['lean']}",
            auth_decision_cache="true" if cache == "on" else "false",
            **extra,
        )
        metrics_dir = procs.workdir() / f"metrics-callgrind-{cache}"
        metrics_dir.mkdir()
        own_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        argv = [procs.PY, "-m", "sidecar", *(f"--{k}={v}" for k, v in flags.items())]

        def one(
            cache: str = cache, argv: list[str] = argv, ports: dict[str, int] = ports, e: dict[str, str] = own_env
        ) -> None:
            try:
                results[cache] = _measure(cache, argv, ports, cookie, shape, requests, root, e)
            except BaseException as exc:  # reported below, after both have stopped
                errors.append(exc)

        threads.append(threading.Thread(target=one))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    print(
        f"/oauth2/auth instructions per request (callgrind, {requests} requests per kind after a warm-up, "
        f"shape {shape}, {time.monotonic() - began:.0f} s):",
        flush=True,
    )
    print(f"{'':12} {'cache on':>10} {'cache off':>10}  on / off   (net of idle work: on, off, on / off)", flush=True)
    for where, kind in KINDS:
        on, off = results["on"][(where, kind)], results["off"][(where, kind)]
        net_on, net_off = results["on"][(where, kind, "net")], results["off"][(where, kind, "net")]
        print(
            f"{where + ' ' + kind:12} {on:>10,} {off:>10,}  {100 * (on / off - 1):+5.1f} %   "
            f"({net_on:,}, {net_off:,}, {100 * (net_on / net_off - 1):+.1f} %)",
            flush=True,
        )
    return 0
