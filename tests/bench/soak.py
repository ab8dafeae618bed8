"""``python -m tests.bench.soak [--minutes 30]``: RSS over time under steady mixed traffic (``make soak``).

Two sidecar replicas (one worker each, Redis sessions, request logging on, ``--auth-address``) in front of
the demo app, 20 signed-in users whose access tokens live 5 s (a refresh every few seconds per user), about
137 requests a second spread over the lean and the main listener's ``/oauth2/auth``, the reverse proxy and
``/oauth2/userinfo``, and Redis shut down (saving) and started again every 90 s. Every 10 s it prints each
replica's RSS; at the end the RSS slope after the warm-up (least squares, MiB per hour) and what went
wrong: any 401 (a session lost) fails the run, 503s while Redis is down are expected and counted apart.
Memory that follows live sessions shows a flat line; memory that follows requests shows a slope.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import redis

from tests.redis_procs import redis_server_argv

from . import procs
from .population import sign_in
from .report import machine

USERS = 20
TOKEN_TTL = 5


def _rss_mib(pid: int) -> float:
    """RSS of a process and its children (the sidecar's workers), MiB."""
    total = 0
    for one in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{one}/status") as fh:
                total += int(next(line for line in fh if line.startswith("VmRSS")).split()[1])
        except (OSError, StopIteration):
            continue
    return total / 1024


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB), in MiB per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if not var:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 3600


class RedisBox:
    """A redis-server that can be shut down with its data saved and started again on the same port."""

    def __init__(self) -> None:
        self.port = procs.free_port()
        self.dir = procs.workdir() / f"soak-redis-{self.port}"
        self.dir.mkdir()
        self.proc: procs.Proc | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = procs.Proc("redis", redis_server_argv(procs.binary("redis-server"), self.port, Path(self.dir)))
        procs.wait_port(self.port, self.proc)

    def restart(self, down: float = 1.0) -> None:
        client = redis.from_url(self.url)
        try:
            client.shutdown(save=True)  # saves, then exits: nothing written before it is lost
        except redis.ConnectionError:
            pass
        finally:
            client.close()
        if self.proc is not None:
            self.proc.stop()
        time.sleep(down)
        self.start()


async def _traffic(
    targets: list[tuple[str, str, int]], cookies: list[str], rate: float, seconds: float, tally: Counter[str]
) -> None:
    """``rate`` requests a second for ``seconds``, round robin over users and targets (name, url, expected)."""
    interval = 1.0 / rate
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:

        async def one(name: str, url: str, ok: int, cookie: str) -> None:
            try:
                async with client.get(url, headers={"Cookie": f"_sidecar={cookie}"}, allow_redirects=False) as resp:
                    await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                tally[f"{name} {type(exc).__name__}"] += 1
                return
            tally["requests"] += 1
            if status != ok:
                tally[f"{name} {status}"] += 1

        pending: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < seconds:
            name, url, ok = targets[i % len(targets)]
            task = asyncio.ensure_future(one(name, url, ok, cookies[(i // len(targets)) % len(cookies)]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
            due = start + i * interval
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        if pending:
            await asyncio.wait(pending, timeout=15)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=137.0, help="requests per second, all replicas together")
    parser.add_argument("--redis-restart", type=float, default=90.0, help="seconds between Redis restarts (0: never)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds left out of the slope")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory with the logs")
    args = parser.parse_args(argv)
    procs.install_cleanup(keep=args.keep)
    for name in ("redis-server",):
        procs.binary(name)
    store = RedisBox()
    provider, issuer = procs.start_provider(TOKEN_TTL)
    app_port = procs.free_port()
    app = procs.Proc("demo-app", [procs.PY, "-m", "sidecar.dev.demo_app", f"--port={app_port}"])
    procs.wait_port(app_port, app)
    replicas = []
    for _ in range(2):
        auth_port = procs.free_port()
        proc, port = procs.start_sidecar(
            issuer,
            log_file="/dev/null",
            session_store_type="redis",
            redis_connection_url=store.url,
            workers=1,
            auth_address=f"127.0.0.1:{auth_port}",
            upstream=f"http://127.0.0.1:{app_port}/",
            refresh_skew="1s",
        )
        procs.wait_port(auth_port, proc)
        replicas.append((proc, port, auth_port))
    cookies = [asyncio.run(sign_in(f"http://127.0.0.1:{replicas[0][1]}")) for _ in range(USERS)]
    targets = []
    for n, (_, port, auth_port) in enumerate(replicas):
        base, lean = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{auth_port}"
        targets += [
            (f"r{n} lean /oauth2/auth", lean + "/oauth2/auth", 202),
            (f"r{n} /oauth2/auth", base + "/oauth2/auth", 202),
            (f"r{n} proxy", base + "/_demo/echo", 200),
            (f"r{n} /oauth2/userinfo", base + "/oauth2/userinfo", 200),
        ]
    command = "python -m tests.bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {command}; {machine()}", flush=True)
    print(
        f"# 2 replicas x 1 worker, {USERS} users, tokens {TOKEN_TTL}s, {args.rate:g} req/s, Redis restart every "
        f"{args.redis_restart:g}s; load at start: {Path('/proc/loadavg').read_text().split()[:3]}",
        flush=True,
    )
    tally: Counter[str] = Counter()
    samples: list[tuple[float, list[float]]] = []
    total = args.minutes * 60
    started = time.monotonic()
    next_restart = args.redis_restart or float("inf")
    restarts = 0
    restarter: threading.Thread | None = None
    print(
        "#  time   " + "   ".join(f"replica {n} RSS" for n in range(len(replicas))) + "   requests  off-status",
        flush=True,
    )
    while (elapsed := time.monotonic() - started) < total:
        chunk = min(args.sample, total - elapsed)
        asyncio.run(_traffic(targets, cookies, args.rate, chunk, tally))
        elapsed = time.monotonic() - started
        rss = [_rss_mib(proc.pid) for proc, _, _ in replicas]
        samples.append((elapsed, rss))
        off = sum(v for k, v in tally.items() if k != "requests")
        print(
            f"{elapsed:7.0f}s  " + "  ".join(f"{v:12.1f} MiB" for v in rss) + f"  {tally['requests']:9d}  {off}",
            flush=True,
        )
        if elapsed >= next_restart and (restarter is None or not restarter.is_alive()):
            # in a thread: the traffic goes on while Redis is down (503s then are expected, 401s never)
            restarter = threading.Thread(target=store.restart, daemon=True)
            restarter.start()
            restarts += 1
            next_restart += args.redis_restart
    after = [(t, sum(v)) for t, v in samples if t >= args.warmup] or [(t, sum(v)) for t, v in samples]
    slope = slope_per_hour(after)
    per_replica = [slope_per_hour([(t, v[i]) for t, v in samples if t >= args.warmup]) for i in range(len(replicas))]
    print(
        f"# RSS both replicas: {sum(samples[0][1]):.1f} MiB at {samples[0][0]:.0f}s, {sum(samples[-1][1]):.1f} MiB "
        f"at {samples[-1][0]:.0f}s; slope after {args.warmup:g}s: {slope:+.1f} MiB/hour "
        f"(per replica {', '.join(f'{s:+.1f}' for s in per_replica)})"
    )
    print(
        f"# {tally['requests']} requests answered, Redis restarted {restarts} times; other outcomes: "
        + (", ".join(f"{k}: {v}" for k, v in sorted(tally.items()) if k != "requests") or "none")
    )
    print(f"# load at end: {Path('/proc/loadavg').read_text().split()[:3]}")
    if restarter is not None:
        restarter.join(timeout=30)
    lost = sum(v for k, v in tally.items() if k.endswith(" 401"))
    for proc, _, _ in replicas:
        proc.stop()
    app.stop()
    provider.stop()
    if store.proc is not None:
        store.proc.stop()
    if lost:
        print(f"# FAIL: {lost} answers were 401: a session was lost")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
