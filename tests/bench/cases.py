"""The seven benchmark cases. Each starts its processes, measures side by side, adds rows, stops them."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from . import nginx, procs, wrk
from .population import SignIn, populate_many, real_sign_in, sign_in
from .procs import Proc
from .report import Row

AUTH_TARGET = PROXY_TARGET = NGINX_TARGET = 0.8
LATENCY_TARGET_MS = 2.0
SCALE_TARGET = 0.9  # 100k sessions within ~10% of 1k
BYTES_TARGET = 1024


@dataclass
class Settings:
    quick: bool = False
    duration: float = 4.0
    warmup: float = 1.0
    repeat: int = 3
    scale_repeat: int = 5
    scale_duration: float = 3.0
    threads: int = 2
    connections: int = 64
    workers: int = 2
    population: int = 100_000
    small_population: int = 1000
    rss_sessions: int = 20_000
    storm_requests: int = 200
    storm_sessions: int = 20
    storm_rounds: int = 3
    rate_duration: float = 4.0
    rate_repeat: int = 4

    @classmethod
    def make(cls, quick: bool, workers: int) -> Settings:
        if quick:
            return cls(
                quick=True,
                duration=3.0,
                warmup=1.0,
                repeat=1,
                scale_repeat=1,
                workers=workers,
                population=10_000,
                rss_sessions=5000,
                storm_rounds=1,
                rate_duration=3.0,
                rate_repeat=1,
            )
        return cls(workers=workers)


@dataclass
class Target:
    """One thing wrk hammers: a URL, the exact status every answer must have, maybe cookies."""

    name: str
    port: int
    path: str
    expect: int
    cookies: Sequence[str] = ()
    body_has: bytes | None = None  # the preflight answer must contain this (e.g. the upstream's page)
    sidecar_port: int | None = None  # whose /metrics must show only expected statuses afterwards
    sidecar_status: int | None = None  # what the sidecar itself must answer (default: ``expect``)
    sidecar_route: str = "/oauth2/auth"  # the metrics label of the route the requests reach
    short: str = ""  # how ratio cells name this target when it is the baseline
    script: Path | None = None
    runs: list[wrk.WrkResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    answered: int = 0  # requests wrk saw answered, preflight and warm-up included

    @property
    def typical(self) -> wrk.WrkResult | None:
        """The median run by req/s (its own p50/p99): robust to a noisy neighbour in either direction."""
        if not self.runs:
            return None
        return sorted(self.runs, key=lambda r: r.rps)[(len(self.runs) - 1) // 2]

    def ratio(self, baseline: Target) -> float:
        """Median of the per-round ratios: each round ran both back to back, so drift cancels out."""
        pairs = sorted(a.rps / b.rps for a, b in zip(self.runs, baseline.runs, strict=False))
        mid = len(pairs) // 2
        return pairs[mid] if len(pairs) % 2 else (pairs[mid - 1] + pairs[mid]) / 2

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- sidecar /metrics


_REQ_LINE = re.compile(r"^sidecar_requests_total\{([^}]*)\}\s+([0-9.e+]+)", re.M)


def status_counts(port: int) -> dict[tuple[str, str], float] | None:
    """Requests by (route, status) from the sidecar's own metrics (all workers), or None if unavailable."""
    try:
        status, _, body = procs.http_get(port, "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    out: dict[tuple[str, str], float] = {}
    for labels, value in _REQ_LINE.findall(body.decode()):
        parts = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = (parts.get("route", ""), parts.get("status", ""))
        out[key] = out.get(key, 0.0) + float(value)
    return out


def unexpected_statuses(
    before: dict[tuple[str, str], float] | None,
    after: dict[tuple[str, str], float] | None,
    route_label: str,
    expect: int,
) -> dict[str, int]:
    if before is None or after is None:
        return {}
    bad = {}
    for (route, status), value in after.items():
        if route != route_label:
            continue
        delta = int(value - before.get((route, status), 0.0))
        if delta and status != str(expect):
            bad[f"{route} {status}"] = delta
    return bad


# ---------------------------------------------------------------- measuring


class Bench:
    """Shared state of one run: settings, rows, results other cases need, the common parts."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.rows: list[Row] = []
        self.results: dict[str, float] = {}
        self.failures: list[str] = []
        self._redis: tuple[Proc, str] | None = None
        self._provider: tuple[Proc, str] | None = None
        self._cookie: str | None = None
        self._template: SignIn | None = None

    # common parts, started on first use and kept for the whole run
    @property
    def redis_url(self) -> str:
        if self._redis is None:
            self._redis = procs.start_redis()
        return self._redis[1]

    @property
    def issuer(self) -> str:
        if self._provider is None:
            # Long-lived access tokens: the throughput cases measure the steady state, not refreshes.
            self._provider = procs.start_provider(access_token_ttl=3600)
        return self._provider[1]

    def redis_cookie(self, sidecar_port: int) -> str:
        """One real browser-style sign-in through a Redis-backed sidecar; every Redis sidecar accepts it."""
        if self._cookie is None:
            self._cookie = asyncio.run(sign_in(f"http://127.0.0.1:{sidecar_port}"))
        return self._cookie

    def template(self) -> SignIn:
        if self._template is None:
            self._template = asyncio.run(real_sign_in(self.issuer, self.redis_url))
        return self._template

    def sidecar(self, store: str = "redis", workers: int | None = None, **settings: Any) -> tuple[Proc, int]:
        if store == "redis":
            settings.setdefault("redis_connection_url", self.redis_url)
        return procs.start_sidecar(
            self.issuer,
            session_store_type=store,
            workers=workers or (1 if store == "memory" else self.s.workers),
            **settings,
        )

    def run_wrk(self, target: Target, duration: float) -> wrk.WrkResult:
        if target.script is None:
            target.script = wrk.script(target.cookies, expect=target.expect)
        return wrk.run(target.url, duration, self.s.threads, self.s.connections, script=target.script)

    def measure(self, targets: Sequence[Target], repeat: int | None = None, duration: float | None = None) -> None:
        """Preflight each target, warm it up, then alternate wrk runs over all of them ``repeat`` times.

        Every run is kept; rows show the median run and ratios are medians of per-round ratios.
        Failures of every run count, including the warm-up's."""
        before = {t.name: status_counts(t.sidecar_port) for t in targets if t.sidecar_port}
        for t in targets:
            headers = {"Cookie": f"_sidecar={t.cookies[0]}"} if t.cookies else {}
            status, _, body = procs.http_get(t.port, t.path, headers)
            if status != t.expect or (t.body_has is not None and t.body_has not in body):
                raise RuntimeError(f"{t.name}: preflight got {status} {body[:200]!r}, expected {t.expect}")
            warm = self.run_wrk(t, self.s.warmup)
            t.answered += 1 + warm.requests
            if warm.failures:
                t.failures.append("warm-up: " + warm.failure_text())
        for _ in range(repeat or self.s.repeat):
            for t in targets:
                result = self.run_wrk(t, duration or self.s.duration)
                log(
                    f"  {t.name}: {result.rps:,.0f} req/s p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms"
                    + (f" FAILURES {result.failure_text()}" if result.failures else "")
                )
                if result.failures:
                    t.failures.append(result.failure_text())
                t.runs.append(result)
                t.answered += result.requests
        if before:
            time.sleep(1.3)  # workers push their request tallies into the metrics every second
        for t in targets:
            if t.sidecar_port:
                after, expect = status_counts(t.sidecar_port), t.sidecar_status or t.expect
                bad = unexpected_statuses(before[t.name], after, t.sidecar_route, expect)
                if bad:
                    t.failures.append("sidecar answered " + ", ".join(f"{k}: {v}" for k, v in bad.items()))
                prior = before[t.name]
                if after is not None and prior is not None:
                    key = (t.sidecar_route, str(expect))
                    seen = after.get(key, 0.0) - prior.get(key, 0.0)
                    if seen < 0.99 * t.answered:  # every answer wrk counted must have passed the sidecar
                        t.failures.append(
                            f"the sidecar answered only {seen:.0f} of {t.answered} requests with {expect}"
                        )
        for t in targets:
            if t.failures:
                self.failures.append(f"{t.name}: " + "; ".join(t.failures))

    def row(
        self,
        case: str,
        t: Target,
        baseline: Target | None = None,
        target: float | None = None,
        notes: Sequence[str] = (),
    ) -> Row:
        assert t.typical is not None
        row = Row(case, t.name, t.typical.rps, t.typical.p50_ms, t.typical.p99_ms, notes=list(notes))
        if baseline is not None and baseline.runs:
            ratio = t.ratio(baseline)
            row.value = f"{ratio:.2f}× {baseline.short or baseline.name}"
            if target is not None:
                row.target = f"≥ {target:.2f}×"
                row.verdict = "PASS" if ratio >= target and not t.failures else "FAIL"
        else:
            row.value = "1.00 (baseline)" if target is None else ""
        if t.failures:
            row.notes.append("FAILURES: " + "; ".join(t.failures))
        self.rows.append(row)
        return row


# ---------------------------------------------------------------- 1 + 2: framework limit, /oauth2/auth


def case_auth(b: Bench, with_auth: bool) -> None:
    n = b.s.workers
    log(f"case 1{'+2' if with_auth else ''}: bare 202 handler vs /oauth2/auth (workers={n})")
    started: list[Proc] = []
    try:
        bare1, bare1_port = procs.start_server("bare", 1)
        started.append(bare1)
        targets = [Target("bare aiohttp 202, workers=1", bare1_port, "/oauth2/auth", 202, short="bare, 1 worker")]
        if n > 1:
            bare_n, bare_n_port = procs.start_server("bare", n)
            started.append(bare_n)
            targets.append(
                Target(f"bare aiohttp 202, workers={n}", bare_n_port, "/oauth2/auth", 202, short=f"bare, {n} workers")
            )
        if with_auth:
            mem, mem_port = b.sidecar("memory")
            started.append(mem)
            mem_cookie = asyncio.run(sign_in(f"http://127.0.0.1:{mem_port}"))
            red, red_port = b.sidecar("redis")
            started.append(red)
            cookie = b.redis_cookie(red_port)
            log_file = procs.workdir() / "sidecar-requests.log"
            logged, logged_port = b.sidecar("redis", request_logging="true", log_file=str(log_file))
            started.append(logged)
            targets += [
                Target(
                    "/oauth2/auth memory store, workers=1",
                    mem_port,
                    "/oauth2/auth",
                    202,
                    [mem_cookie],
                    sidecar_port=mem_port,
                ),
                Target(
                    f"/oauth2/auth Redis store, workers={n}",
                    red_port,
                    "/oauth2/auth",
                    202,
                    [cookie],
                    sidecar_port=red_port,
                ),
                Target(
                    f"/oauth2/auth Redis store, workers={n}, request logging on (to a file)",
                    logged_port,
                    "/oauth2/auth",
                    202,
                    [cookie],
                    sidecar_port=logged_port,
                ),
            ]
            for t in targets[: 2 if n > 1 else 1]:
                t.cookies = [cookie]  # the same request bytes as the sidecar gets (the bare handler ignores it)
        b.measure(targets)
        bare_1, bare_n_t = targets[0], targets[1] if n > 1 else targets[0]
        b.row("1", bare_1)
        if n > 1:
            b.row("1", bare_n_t)
        if with_auth:
            mem_t, red_t, log_t = targets[-3:]
            b.row("2", mem_t, bare_1)
            b.row("2", red_t, bare_n_t, AUTH_TARGET)
            size = log_file.stat().st_size if log_file.exists() else 0
            b.row(
                "2",
                log_t,
                bare_n_t,
                notes=[
                    f"{log_t.ratio(red_t):.2f}× logging off",
                    f"log {size / 1e6:.1f} MB written",
                ],
            )
            assert red_t.typical is not None
            b.results["auth_redis_rps"] = red_t.typical.rps
    finally:
        for proc in started:
            proc.stop()


# ---------------------------------------------------------------- 3: reverse proxy


def case_proxy(b: Bench) -> None:
    n = b.s.workers
    log(f"case 3: reverse proxy (workers={n})")
    started: list[Proc] = []
    try:
        up, up_port = procs.start_server("upstream", n)
        started.append(up)
        passthrough, pt_port = procs.start_server("passthrough", n, "--target", f"http://127.0.0.1:{up_port}")
        started.append(passthrough)
        side, side_port = b.sidecar("redis", upstream=f"http://127.0.0.1:{up_port}/")
        started.append(side)
        cookie = b.redis_cookie(side_port)
        page = b"bench upstream"
        direct = Target(
            f"upstream app reached directly, workers={n}", up_port, "/app/page", 200, [cookie], page, short="direct"
        )
        bare = Target(
            f"bare aiohttp pass-through proxy, workers={n}",
            pt_port,
            "/app/page",
            200,
            [cookie],  # same request bytes everywhere; the pass-through forwards it, the sidecar strips its own
            body_has=page,
            short="pass-through",
        )
        sidecar = Target(
            f"sidecar reverse proxy, Redis, workers={n}",
            side_port,
            "/app/page",
            200,
            [cookie],
            body_has=page,
            sidecar_port=side_port,
            sidecar_route="proxy",
        )
        b.measure([direct, bare, sidecar])
        b.row("3", direct, notes=["reference: no proxy"])
        b.row("3", bare, direct)
        b.row("3", sidecar, bare, PROXY_TARGET, notes=[f"{sidecar.ratio(direct):.2f}× direct"])
    finally:
        for proc in started:
            proc.stop()


# ---------------------------------------------------------------- 4: nginx auth_request


def case_nginx(b: Bench) -> None:
    n = b.s.workers
    log(f"case 4: nginx auth_request (sidecar workers={n}, nginx workers=1)")
    started: list[Proc] = []
    try:
        up, up_port = procs.start_server("upstream", n)
        started.append(up)
        bare, bare_port = procs.start_server("bare", n)
        started.append(bare)
        side, side_port = b.sidecar("redis")
        started.append(side)
        cookie = b.redis_cookie(side_port)
        ng_bare_port, ng_side_port = procs.free_port(), procs.free_port()
        ng_bare, source = nginx.start(ng_bare_port, bare_port, up_port)
        started.append(ng_bare)
        ng_side, _ = nginx.start(ng_side_port, side_port, up_port)
        started.append(ng_side)
        page = b"bench upstream"
        t_bare = Target(
            "nginx auth_request → bare 202 → app",
            ng_bare_port,
            "/app/page",
            200,
            [cookie],
            body_has=page,
            short="nginx + bare 202",
        )
        t_side = Target(
            f"nginx auth_request → sidecar (Redis, workers={n}) → app",
            ng_side_port,
            "/app/page",
            200,
            [cookie],
            body_has=page,
            sidecar_port=side_port,
            sidecar_status=202,
        )
        b.measure([t_bare, t_side])
        b.row("4", t_bare, notes=[f"config: {source}"])
        b.row("4", t_side, t_bare, NGINX_TARGET)
    finally:
        for proc in started:
            proc.stop()


# ---------------------------------------------------------------- 5: refresh storm


async def _burst(bases: Sequence[str], cookies: Sequence[str], n: int) -> list[tuple[float, int]]:
    """``n`` concurrent /oauth2/auth requests, each on its own new connection; session k's requests
    are spread over every process. Returns (latency s, status) per request (status 0: no answer)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

        async def one(i: int) -> tuple[float, int]:
            base = bases[(i // len(cookies)) % len(bases)]
            started = time.perf_counter()
            try:
                headers = {"Cookie": f"_sidecar={cookies[i % len(cookies)]}"}
                timeout = aiohttp.ClientTimeout(total=30)
                async with client.get(base + "/oauth2/auth", headers=headers, timeout=timeout) as resp:
                    await resp.read()
                    return time.perf_counter() - started, resp.status
            except (TimeoutError, aiohttp.ClientError):
                return time.perf_counter() - started, 0

        return await asyncio.gather(*(one(i) for i in range(n)))


async def _provider_stats(issuer: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client, client.get(issuer + "/_control/stats") as resp:
        return await resp.json()  # type: ignore[no-any-return]


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


def metric_total(text: str, name: str) -> float | None:
    """Sum of every sample of one metric (any labels) in Prometheus text, None when absent."""
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in values) if values else None


def _refresh_metrics(ports: Sequence[int]) -> str:
    """What the sidecars say about the storm: provider call time, lock waits, joined requests."""
    texts = []
    for port in ports:
        try:
            status, _, body = procs.http_get(port, "/metrics")
        except OSError:
            continue
        if status == 200:
            texts.append(body.decode())
    got: dict[str, float] = {}
    for name in (
        "sidecar_refresh_seconds_sum",
        "sidecar_refresh_seconds_count",
        "sidecar_refresh_lock_waits_total",
        "sidecar_refresh_lock_wait_seconds_sum",
        "sidecar_refresh_lock_wait_seconds_count",
        "sidecar_refresh_joined_total",
    ):
        values = [v for v in (metric_total(t, name) for t in texts) if v is not None]
        if values:
            got[name] = sum(values)
    parts = []
    if got.get("sidecar_refresh_seconds_count"):
        mean = got["sidecar_refresh_seconds_sum"] / got["sidecar_refresh_seconds_count"] * 1000
        parts.append(f"provider refresh call mean {mean:.0f} ms")
    if got.get("sidecar_refresh_lock_wait_seconds_count"):
        mean = got["sidecar_refresh_lock_wait_seconds_sum"] / got["sidecar_refresh_lock_wait_seconds_count"] * 1000
        parts.append(
            f"{got['sidecar_refresh_lock_waits_total']:.0f} waits for the other process's lock, mean {mean:.0f} ms"
        )
    if "sidecar_refresh_joined_total" in got:
        parts.append(f"{got['sidecar_refresh_joined_total']:.0f} requests joined an in-process refresh")
    return "sidecar metrics: " + ", ".join(parts) if parts else ""


def case_storm(b: Bench) -> None:
    n, m, rounds, ttl = b.s.storm_requests, b.s.storm_sessions, b.s.storm_rounds, 2
    log(
        f"case 5: refresh storm, {n} concurrent requests on {m} expired sessions, 2 sidecar processes, "
        f"{rounds} round(s)"
    )
    started: list[Proc] = []
    try:
        provider, issuer = procs.start_provider(ttl, "--rotate-refresh-tokens")
        started.append(provider)
        ports = []
        for _ in range(2):
            proc, port = procs.start_sidecar(
                issuer, session_store_type="redis", redis_connection_url=b.redis_url, workers=1, refresh_skew="0s"
            )
            started.append(proc)
            ports.append(port)
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        storm_lat: list[float] = []
        fresh_lat: list[float] = []
        problems: list[str] = []
        refresh_calls = 0

        async def run() -> None:
            nonlocal refresh_calls
            cookies = list(await asyncio.gather(*(sign_in(bases[0]) for _ in range(m))))
            issued = time.time()
            for r in range(rounds):
                await asyncio.sleep(max(0.0, issued + ttl + 0.3 - time.time()))  # every access token has expired
                s0 = await _provider_stats(issuer)
                storm = await _burst(bases, cookies, n)
                issued = time.time()
                s1 = await _provider_stats(issuer)
                fresh = await _burst(bases, cookies, n)
                s2 = await _provider_stats(issuer)
                calls = s1["token_calls"]["refresh_token"] - s0["token_calls"]["refresh_token"]
                refresh_calls += calls
                presented = s1["refresh_tokens_presented"][len(s0["refresh_tokens_presented"]) :]
                bad = [s for _, s in storm + fresh if s != 202]
                log(f"  round {r + 1}: {calls} refresh calls for {m} sessions, non-202: {len(bad)}")
                if calls != m:
                    problems.append(f"round {r + 1}: {calls} refresh calls for {m} sessions")
                if len(presented) != len(set(presented)):
                    problems.append(f"round {r + 1}: a refresh token was presented twice")
                if s1["reuse_detected"] != s0["reuse_detected"]:
                    problems.append(f"round {r + 1}: the provider detected refresh-token reuse")
                if s2["token_calls"]["refresh_token"] != s1["token_calls"]["refresh_token"]:
                    problems.append(f"round {r + 1}: refreshes during the fresh-token requests")
                if bad:
                    statuses = {s: bad.count(s) for s in set(bad)}
                    problems.append(f"round {r + 1}: {len(bad)} failed requests {statuses}")
                storm_lat.extend(t for t, _ in storm)
                fresh_lat.extend(t for t, _ in fresh)
            # For comparison: one refresh with no contention at all (one keep-alive connection, in turn).
            await asyncio.sleep(max(1.3, issued + ttl + 0.3 - time.time()))
            inside.append(_refresh_metrics(ports))  # the storms' numbers only
            async with aiohttp.ClientSession() as client:
                for phase in (alone, alone_fresh):
                    for cookie in cookies:
                        started = time.perf_counter()
                        headers = {"Cookie": f"_sidecar={cookie}"}
                        async with client.get(bases[0] + "/oauth2/auth", headers=headers) as resp:
                            await resp.read()
                        phase.append(time.perf_counter() - started)

        inside: list[str] = []
        alone: list[float] = []
        alone_fresh: list[float] = []
        asyncio.run(run())
        fp50, fp99, sp50, sp99 = (
            _pct(fresh_lat, 0.5),
            _pct(fresh_lat, 0.99),
            _pct(storm_lat, 0.5),
            _pct(storm_lat, 0.99),
        )
        b.rows.append(
            Row(
                "5",
                f"same {n} requests, fresh tokens (baseline)",
                None,
                fp50,
                fp99,
                "",
                notes=[f"{rounds} round(s), new connection per request"],
            )
        )
        per_session = refresh_calls / (m * rounds)
        b.rows.append(
            Row(
                "5",
                f"refresh storm: {n} concurrent on {m} expired sessions, 2 processes",
                None,
                sp50,
                sp99,
                f"{per_session:.2f} refresh/session",
                "= 1, 0 failures",
                "PASS" if not problems else "FAIL",
                [
                    f"added p50 +{sp50 - fp50:.1f} ms, p99 +{sp99 - fp99:.1f} ms",
                    f"provider refresh calls {refresh_calls} for {m}×{rounds}",
                    f"one refresh alone (sequential, median) +{_pct(alone, 0.5) - _pct(alone_fresh, 0.5):.1f} ms",
                    *inside,
                    "failures 0" if not problems else "PROBLEMS: " + "; ".join(problems),
                ],
            )
        )
        if problems:
            b.failures.append("refresh storm: " + "; ".join(problems))
    finally:
        for proc in started:
            proc.stop()


# ---------------------------------------------------------------- 6: memory and population size


def _used_memory(url: str) -> int:
    client = redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def _memory_usage(url: str, pattern: str, count: int = 200) -> tuple[float, float | None, int]:
    """Average ``MEMORY USAGE`` (exact, SAMPLES 0) of up to ``count`` keys matching ``pattern``, their
    average value length when they are strings, and the number of keys."""
    client = redis.from_url(url)
    try:
        sizes, lengths = [], []
        for key in client.scan_iter(match=pattern, count=1000):
            sizes.append(int(client.memory_usage(key, samples=0) or 0))
            if client.type(key) == b"string":
                lengths.append(int(client.strlen(key)))
            if len(sizes) >= count:
                break
        mean = sum(sizes) / len(sizes) if sizes else 0.0
        return mean, (sum(lengths) / len(lengths) if lengths else None), int(client.dbsize())
    finally:
        client.close()


async def _serve_each(port: int, cookies: Sequence[str], concurrency: int = 64) -> dict[int, int]:
    """GET /oauth2/auth once with every cookie (keep-alive, ``concurrency`` at a time); statuses counted."""
    statuses: dict[int, int] = {}
    todo = iter(cookies)
    url = f"http://127.0.0.1:{port}/oauth2/auth"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as client:

        async def worker() -> None:
            for cookie in todo:
                try:
                    async with client.get(url, headers={"Cookie": f"_sidecar={cookie}"}) as resp:
                        await resp.read()
                        status = resp.status
                except aiohttp.ClientError:
                    status = 0
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def _rss_mib(proc: Proc) -> list[float]:
    return [procs.rss_kib(pid) / 1024 for pid in procs.worker_pids(proc)]


def _fmt_rss(values: list[float]) -> str:
    return " + ".join(f"{v:.0f}" for v in values) + " MiB"


def case_memory(b: Bench) -> None:
    small, big = b.s.small_population, b.s.population
    log(f"case 6: memory at {big:,} sessions; cost per request at {small:,} vs {big:,} stored sessions")
    started: list[Proc] = []
    try:
        template = b.template()
        red_small, url_small = procs.start_redis()
        red_big, url_big = procs.start_redis()
        started += [red_small, red_big]
        before = _used_memory(url_big)
        t0 = time.monotonic()
        cookies_small = populate_many(b.issuer, url_small, template, small)
        cookies_big = populate_many(b.issuer, url_big, template, big)
        log(f"  wrote {small + big:,} sessions with Sessions.create in {time.monotonic() - t0:.0f}s")
        per_session = (_used_memory(url_big) - before) / big
        record, value_len, keys = _memory_usage(url_big, "sc:s:*")
        index, _, _ = _memory_usage(url_big, "sc:u:*")
        b.rows.append(
            Row(
                "6",
                f"Redis memory per session at {big:,} sessions",
                value=f"{per_session:,.0f} B",
                target=f"≤ {BYTES_TARGET} B",
                verdict="PASS" if per_session <= BYTES_TARGET else "FAIL",
                notes=[
                    f"INFO used_memory delta / {big:,}",
                    f"MEMORY USAGE: record {record:,.0f} B"
                    + (f" ({value_len:,.0f} B value)" if value_len else "")
                    + f", user index {index:,.0f} B",
                    f"{keys / big:.2f} keys/session",
                    "one user per session",
                ],
            )
        )
        side: dict[str, tuple[Proc, int]] = {}
        for label, url in (("small", url_small), ("big", url_big)):
            for cache in ("default", "off"):
                extra: dict[str, Any] = {"session_cache_ttl": "0"} if cache == "off" else {}
                side[f"{label}-{cache}"] = b.sidecar("redis", redis_connection_url=url, **extra)
                started.append(side[f"{label}-{cache}"][0])
        rss_idle = _rss_mib(side["big-default"][0])
        sample = random.Random(7).sample(cookies_big, small)
        k_small, k_big = f"{small // 1000}k", f"{big // 1000}k"
        targets = {}
        for cache, what in (("default", "session cache on (1 s)"), ("off", "session cache off: Redis every request")):
            targets[f"small-{cache}"] = Target(
                f"/oauth2/auth, {k_small} sessions stored, {what}",
                side[f"small-{cache}"][1],
                "/oauth2/auth",
                202,
                cookies_small,
                sidecar_port=side[f"small-{cache}"][1],
                short=f"{k_small} stored",
            )
            targets[f"big-{cache}"] = Target(
                f"/oauth2/auth, {k_big} sessions stored, {what}",
                side[f"big-{cache}"][1],
                "/oauth2/auth",
                202,
                sample,
                sidecar_port=side[f"big-{cache}"][1],
            )
        # like for like: more, shorter rounds against noise
        b.measure(list(targets.values()), b.s.scale_repeat, b.s.scale_duration)
        for cache in ("default", "off"):
            b.row("6", targets[f"small-{cache}"], notes=[f"wrk rotates over all {small:,} cookies"])
            b.row(
                "6",
                targets[f"big-{cache}"],
                targets[f"small-{cache}"],
                SCALE_TARGET,
                notes=[f"wrk rotates over {small:,} random cookies of {big:,}"],
            )
        rss_after = _rss_mib(side["big-default"][0])
        distinct = min(b.s.rss_sessions, big)
        t0 = time.monotonic()
        statuses = asyncio.run(_serve_each(side["big-default"][1], cookies_big[:distinct]))
        took = time.monotonic() - t0
        bad = {k: v for k, v in statuses.items() if k != 202}
        if bad:
            b.failures.append(f"serving {distinct:,} distinct sessions: unexpected statuses {bad}")
        rss_many = _rss_mib(side["big-default"][0])
        b.rows.append(
            Row(
                "6",
                f"sidecar RSS per worker, {k_big} sessions in Redis",
                value=_fmt_rss(rss_many),
                notes=[
                    f"idle after start {_fmt_rss(rss_idle)}",
                    f"after the {small:,}-cookie runs {_fmt_rss(rss_after)}",
                    f"after serving each of {distinct:,} distinct sessions once ({distinct / took:,.0f} req/s, "
                    f"Python client) {_fmt_rss(rss_many)}",
                    f"FAILURES: {bad}" if bad else "",
                ],
            )
        )
    finally:
        for proc in started:
            proc.stop()


# ---------------------------------------------------------------- 7: latency at half load


def _loadgen(port: int, rate: float, duration: float, cookie: str | None, connections: int) -> dict[str, Any]:
    argv = [
        procs.PY,
        "-m",
        "tests.bench.loadgen",
        "--port",
        str(port),
        "--path",
        "/oauth2/auth",
        "--rate",
        f"{rate:.0f}",
        "--duration",
        str(duration),
        "--expect",
        "202",
        "--connections",
        str(connections),
    ]
    if cookie:
        argv += ["--cookie", cookie]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, cwd=procs.ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _median(values: Sequence[float]) -> float:
    ordered, mid = sorted(values), len(values) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number is the median over the runs (each run alternated with the other target's, same rate)."""
    out = dict(runs[0])
    for key in ("achieved_rps", "p50_ms", "p99_ms", "service_p99_ms", "generator_cpu"):
        out[key] = _median([r[key] for r in runs])
    out["errors"] = sum(r["errors"] for r in runs)
    out["statuses"] = {k: sum(r["statuses"].get(k, 0) for r in runs) for k in {k for r in runs for k in r["statuses"]}}
    return out


def case_latency(b: Bench) -> None:
    n = b.s.workers
    started: list[Proc] = []
    try:
        bare, bare_port = procs.start_server("bare", n)
        side, side_port = b.sidecar("redis")
        started += [bare, side]
        cookie = b.redis_cookie(side_port)
        max_rps = b.results.get("auth_redis_rps")
        if max_rps is None:
            t = Target("max /oauth2/auth Redis (for the rate)", side_port, "/oauth2/auth", 202, [cookie])
            max_rps = b.run_wrk(t, b.s.duration).rps
        rate = max_rps / 2
        log(f"case 7: fixed rate {rate:,.0f} req/s (half of {max_rps:,.0f}) for {b.s.rate_duration:g}s, open loop")
        runs: dict[str, list[dict[str, Any]]] = {"bare": [], "sidecar": []}
        for _ in range(b.s.rate_repeat):
            for name, port, ck in (("bare", bare_port, None), ("sidecar", side_port, cookie)):
                res = _loadgen(port, rate, b.s.rate_duration, ck, b.s.connections)
                log(
                    f"  {name}: achieved {res['achieved_rps']:,.0f} req/s p50 {res['p50_ms']:.2f} ms "
                    f"p99 {res['p99_ms']:.2f} ms errors {res['errors']}"
                )
                if res["errors"]:
                    b.failures.append(f"fixed-rate {name}: {res['errors']} errors {res['statuses']}")
                runs[name].append(res)
        base, ours = _median_run(runs["bare"]), _median_run(runs["sidecar"])
        # per round, both ran back to back at the same rate: the median difference is the added latency
        added = _median([o["p99_ms"] - a["p99_ms"] for o, a in zip(runs["sidecar"], runs["bare"], strict=True)])

        def notes(res: dict[str, Any]) -> list[str]:
            out = [
                f"achieved {res['achieved_rps']:,.0f} of {rate:,.0f} req/s",
                f"service time p99 {res['service_p99_ms']:.2f} ms",
                f"generator CPU {res['generator_cpu']:.0%} of a core",
            ]
            if res["achieved_rps"] < 0.95 * rate:
                out.append(f"ONLY {res['achieved_rps'] / rate:.0%} OF THE OFFERED RATE COMPLETED")
            if res["errors"]:
                out.append(f"FAILURES: {res['errors']} {res['statuses']}")
            return out

        b.rows.append(
            Row(
                "7",
                f"bare aiohttp 202 at {rate:,.0f} req/s, workers={n}",
                base["achieved_rps"],
                base["p50_ms"],
                base["p99_ms"],
                "baseline",
                notes=notes(base),
            )
        )
        b.rows.append(
            Row(
                "7",
                f"/oauth2/auth Redis at {rate:,.0f} req/s (½ max), workers={n}",
                ours["achieved_rps"],
                ours["p50_ms"],
                ours["p99_ms"],
                f"p99 {added:+.2f} ms",
                f"< {LATENCY_TARGET_MS:g} ms added",
                "PASS" if added < LATENCY_TARGET_MS and not ours["errors"] else "FAIL",
                notes(ours),
            )
        )
    finally:
        for proc in started:
            proc.stop()


CASES: dict[str, tuple[str, Callable[[Bench], None]]] = {
    "1": ("framework", lambda b: case_auth(b, with_auth=False)),
    "2": ("auth", lambda b: case_auth(b, with_auth=True)),
    "3": ("proxy", case_proxy),
    "4": ("nginx", case_nginx),
    "5": ("storm", case_storm),
    "6": ("memory", case_memory),
    "7": ("latency", case_latency),
}
