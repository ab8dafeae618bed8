"""The seven benchmark cases. Each starts its processes, measures side by side, adds rows, stops them."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from . import apache, nginx, procs, wrk
from .population import SignIn, make_grants, populate_many, real_sign_in, sign_in
from .procs import Proc
from .report import Row

AUTH_TARGET = PROXY_TARGET = 0.8
NGINX_TARGET = 0.9
MOONSHOT_TARGET = 1.5  # /oauth2/auth on the lean --auth-address listener vs the bare aiohttp handler
PEER_TARGET = 10.0  # nginx with the documented auth cache vs Apache + mod_auth_openidc
PEER_NOTE = "C peer, distro mpm_event defaults (2 processes × 25 threads)"
GETS_TARGET = 1.0  # Redis GETs per second per hot session and worker (1 s session cache)
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
    connections: int = 50
    workers: int = 1
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
    cookie_name: str = "_sidecar"
    peer: bool = False  # another product: its socket errors are shown in its row, not counted as the bench's failures
    script: Path | None = None
    unique: str | None = None  # a header with a new value per request (every request a decision cache miss)
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
            target.script = wrk.script(
                target.cookies, expect=target.expect, name=target.cookie_name, unique=target.unique
            )
        return wrk.run(target.url, duration, self.s.threads, self.s.connections, script=target.script)

    def measure(self, targets: Sequence[Target], repeat: int | None = None, duration: float | None = None) -> None:
        """Preflight each target, warm it up, then alternate wrk runs over all of them ``repeat`` times.

        Every run is kept; rows show the median run and ratios are medians of per-round ratios.
        Failures of every run count, including the warm-up's."""
        before = {t.name: status_counts(t.sidecar_port) for t in targets if t.sidecar_port}
        for t in targets:
            headers = {"Cookie": f"{t.cookie_name}={t.cookies[0]}"} if t.cookies else {}
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
            if t.failures and not t.peer:
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


# ---------------------------------------------------------------- helpers for optional rows


def try_sidecar(b: Bench, **settings: Any) -> tuple[Proc, int] | str:
    """A sidecar with options that may not exist yet (another engineer's work): the process, or why it did
    not start (its last log line), so the row says "skipped: ..." and never shows a number it did not measure."""
    try:
        return b.sidecar("redis", **settings)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        useful = [line for line in lines if "error" in line.lower() or "--" in line] or lines
        return (useful[-1] if useful else "did not start")[:300]


def _redis_gets(url: str) -> int:
    client = redis.from_url(url)
    try:
        return int(client.info("commandstats").get("cmdstat_get", {}).get("calls", 0))
    finally:
        client.close()


# ---------------------------------------------------------------- 1 + 2: framework limit, /oauth2/auth


def case_auth(b: Bench, with_auth: bool) -> None:
    """One sidecar worker at its defaults (Redis, request logging on) against one bare aiohttp process."""
    log(f"case 1{'+2' if with_auth else ''}: bare 202 handler vs /oauth2/auth (one process each, defaults)")
    started: list[Proc] = []
    skips: list[tuple[str, str]] = []
    try:
        bare, bare_port = procs.start_server("bare", 1)
        started.append(bare)
        bare_t = Target("bare aiohttp 202, 1 process", bare_port, "/oauth2/auth", 202, short="bare 202")
        targets = [bare_t]
        extra: dict[str, Target] = {}
        if with_auth:
            # The defaults row has a Redis of its own, so its GETs can be counted alone.
            own_redis, own_url = procs.start_redis()
            started.append(own_redis)
            side, side_port = b.sidecar("redis", workers=1, redis_connection_url=own_url)
            started.append(side)
            own_cookie = asyncio.run(sign_in(f"http://127.0.0.1:{side_port}"))
            default_t = Target(
                "/oauth2/auth defaults (Redis, 1 worker, request logging on)",
                side_port,
                "/oauth2/auth",
                202,
                [own_cookie],
                sidecar_port=side_port,
                short="defaults",
            )
            quiet, quiet_port = b.sidecar("redis", workers=1, request_logging="false")
            started.append(quiet)
            cookie = b.redis_cookie(quiet_port)
            bare_t.cookies = [cookie]  # the same request bytes as the sidecar gets (the bare handler ignores it)
            extra["quiet"] = Target(
                "/oauth2/auth, request logging off (else defaults)",
                quiet_port,
                "/oauth2/auth",
                202,
                [cookie],
                sidecar_port=quiet_port,
            )
            targets.append(default_t)
            targets.append(extra["quiet"])
            oauth = try_sidecar(b, workers=1, oauth_server="true", oauth_resource="/mcp")
            if isinstance(oauth, str):
                skips.append(("/oauth2/auth, --oauth-server on (--oauth-resource=/mcp)", oauth))
            else:
                started.append(oauth[0])
                extra["oauth"] = Target(
                    "/oauth2/auth, --oauth-server on (--oauth-resource=/mcp, else defaults)",
                    oauth[1],
                    "/oauth2/auth",
                    202,
                    [cookie],
                    sidecar_port=oauth[1],
                )
                targets.append(extra["oauth"])
            raw, raw_port = procs.start_server("raw", 1)
            started.append(raw)
            extra["raw"] = Target(
                "raw asyncio.Protocol + httptools 202, 1 process", raw_port, "/oauth2/auth", 202, [cookie]
            )
            targets.append(extra["raw"])
            for key, cache in (("lean", "true"), ("off", "false")):
                auth_port = procs.free_port()
                lean = try_sidecar(b, workers=1, auth_address=f"127.0.0.1:{auth_port}", auth_decision_cache=cache)
                label = "/oauth2/auth on the --auth-address listener" + ("" if cache == "true" else ", cache off")
                if isinstance(lean, str):
                    skips.append((label, lean))
                    continue
                started.append(lean[0])
                try:
                    procs.wait_port(auth_port, lean[0], timeout=10)
                except RuntimeError as exc:
                    skips.append((label, str(exc).splitlines()[0][:300]))
                    continue
                _lean_targets(extra, key, lean[1], auth_port, cookie)
            targets += [extra[k] for k in LEAN_KEYS if k in extra]
        b.measure(targets)
        b.row("1", bare_t, notes=["aiohttp + uvloop, one process, access log off: the framework's limit"])
        if not with_auth:
            return
        b.row("2", default_t, bare_t, AUTH_TARGET, notes=["the defaults: request logging on (to the process's log)"])
        b.row("2", extra["quiet"], bare_t, notes=[f"{extra['quiet'].ratio(default_t):.2f}× defaults"])
        if "oauth" in extra:
            b.row("2", extra["oauth"], bare_t, notes=[f"{extra['oauth'].ratio(default_t):.2f}× --oauth-server off"])
        _lean_rows(b, extra, bare_t, default_t)
        for name, reason in skips:
            b.rows.append(Row("2", name, value=f"skipped: {reason}"))
        assert default_t.typical is not None
        b.results["auth_redis_rps"] = default_t.typical.rps
        _count_gets(b, default_t, own_url)
        _hit_ratio(b, default_t, default_t.port)
        if "lean" in extra and extra["lean"].sidecar_port:
            _hit_ratio(b, extra["lean"], extra["lean"].sidecar_port)
    finally:
        for proc in started:
            proc.stop()


LEAN_KEYS = ("lean", "main-miss", "lean-miss", "off-main", "off", "off-main-uniq", "off-uniq")


def _lean_targets(extra: dict[str, Target], key: str, port: int, auth_port: int, cookie: str) -> None:
    """The decision cache rows of one sidecar process (``key`` "lean": cache on, "off": cache off): its main
    listener and its --auth-address listener, a hot cookie (hits), and one new X-Original-URI per request
    (every request a miss; with the cache off the same requests, for a fair comparison). The main listener's
    hot row with the cache on is the defaults row (a process of its own)."""
    on = key == "lean"
    state = "cache on" if on else "cache off"
    names = {"main": ("main listener", port), "lean": ("--auth-address listener", auth_port)}
    hot = {"lean": "lean"} if on else {"main": "off-main", "lean": "off"}
    uniq = {"main": "main-miss", "lean": "lean-miss"} if on else {"main": "off-main-uniq", "lean": "off-uniq"}
    for where, (name, listen) in names.items():
        if where in hot:
            label = f"/oauth2/auth, {name}, {state} (else defaults)"
            extra[hot[where]] = Target(label, listen, "/oauth2/auth", 202, [cookie], sidecar_port=port)
        label = f"/oauth2/auth, {name}, {state}, a new X-Original-URI per request" + (" (all misses)" if on else "")
        extra[uniq[where]] = Target(
            label, listen, "/oauth2/auth", 202, [cookie], sidecar_port=port, unique="X-Original-URI"
        )


def _lean_rows(b: Bench, extra: dict[str, Target], bare_t: Target, default_t: Target) -> None:
    """Rows for the decision cache: hits on both listeners, misses against the cache turned off, the floor."""
    if "raw" in extra:
        b.row("2", extra["raw"], bare_t, notes=["no framework: the floor under the lean listener"])
    if "lean" in extra:
        notes = [f"{extra['lean'].ratio(default_t):.2f}× the main listener (defaults row)"]
        if "raw" in extra:
            notes.append(f"{extra['lean'].ratio(extra['raw']):.2f}× the raw protocol handler")
        if "off" in extra:
            notes.append(f"{extra['lean'].ratio(extra['off']):.2f}× the same listener, cache off")
        b.row("2", extra["lean"], bare_t, MOONSHOT_TARGET, notes=notes)
    if "off-main" in extra:
        b.row(
            "2",
            extra["off-main"],
            bare_t,
            notes=[f"defaults row (cache on): {default_t.ratio(extra['off-main']):.2f}× this"],
        )
    if "off" in extra:
        b.row("2", extra["off"], bare_t)
    for miss, off in (("main-miss", "off-main-uniq"), ("lean-miss", "off-uniq")):
        if off in extra:
            b.row("2", extra[off], bare_t)
        if miss in extra:
            notes = [f"{extra[miss].ratio(extra[off]):.2f}× the cache off (same requests)"] if off in extra else []
            b.row("2", extra[miss], bare_t, notes=notes)


def _cache_lookups(port: int) -> tuple[float, float] | None:
    """(hits, misses) of the decision cache from a sidecar's /metrics (all workers)."""
    try:
        status, _, body = procs.http_get(port, "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    text = body.decode()
    found = [
        re.search(rf'sidecar_auth_decision_cache_total\{{result="{r}"\}} ([0-9.e+]+)', text) for r in ("hit", "miss")
    ]
    return (float(found[0].group(1)) if found[0] else 0.0, float(found[1].group(1)) if found[1] else 0.0)


def _hit_ratio(b: Bench, t: Target, metrics_port: int, case: str = "2") -> None:
    """One more run of a hot-session target: the decision cache's hit ratio from the sidecar's own counts."""
    before = _cache_lookups(metrics_port)
    result = b.run_wrk(t, 3)
    time.sleep(1.3)  # workers push their tallies every second
    after = _cache_lookups(metrics_port)
    if before is None or after is None:
        b.rows.append(Row(case, f"decision cache hit ratio: {t.name}", value="not measured: no /metrics"))
        return
    hits, misses = after[0] - before[0], after[1] - before[1]
    ratio = hits / (hits + misses) if hits + misses else 0.0
    log(f"  hit ratio {t.name}: {hits:.0f} hits, {misses:.0f} misses")
    b.rows.append(
        Row(
            case,
            f"decision cache hit ratio: {t.name}",
            result.rps,
            result.p50_ms,
            result.p99_ms,
            f"{100 * ratio:.2f}% hits",
            notes=[f"{hits:,.0f} hits, {misses:,.0f} misses in a 3 s run (sidecar_auth_decision_cache_total)"],
        )
    )


def _count_gets(b: Bench, t: Target, url: str) -> None:
    """One hot session, one worker, wrk's 50 connections: Redis GETs per second (INFO commandstats around a run)."""
    before = _redis_gets(url)
    result = b.run_wrk(t, b.s.duration)
    gets = _redis_gets(url) - before
    seconds = max(1, round(b.s.duration))  # wrk runs whole seconds
    rate = gets / seconds
    log(f"  Redis GETs: {gets} in {seconds}s for {result.requests:,} requests")
    b.rows.append(
        Row(
            "2",
            "Redis GETs per hot session per second, 1 worker, 50 connections",
            result.rps,
            result.p50_ms,
            result.p99_ms,
            f"{rate:.2f} GET/s",
            f"≤ {GETS_TARGET:g} per 1 s cache period (≤ {seconds + 1} in {seconds}s)",
            "PASS" if gets <= GETS_TARGET * seconds + 1 and not result.failures else "FAIL",
            [
                f"{gets} GETs for {result.requests:,} requests in {seconds}s (INFO commandstats before/after); "
                f"a {seconds}s window touches up to {seconds + 1} cache periods"
            ],
        )
    )


# ---------------------------------------------------------------- 3: reverse proxy

PASS_THROUGH_TARGET = 0.9  # issue 20: the proxy vs the bare pass-through (also: tests.bench.instructions)


def _upstream_headers(port: int, cookie_header: str) -> list[tuple[str, str]]:
    status, _, body = procs.http_get(port, "/_bench/headers", {"Cookie": cookie_header})
    if status != 200:
        raise RuntimeError(f"/_bench/headers through port {port}: {status} {body[:200]!r}")
    return [(k, v) for k, v in json.loads(body)]


_PASSTHROUGH_OWN = {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "content-length"}


def _same_bytes(sidecar_sent: list[tuple[str, str]]) -> list[str]:
    """The pass-through's arguments to send what the sidecar sent: its identity headers, no session cookie."""
    sent = {k.lower() for k, _ in sidecar_sent}
    args = [f"--set-header={k}={v}" for k, v in sidecar_sent if k.lower() not in _PASSTHROUGH_OWN]
    if "cookie" not in sent:
        args.append("--drop-header=Cookie")
    return args


def _header_bytes(headers: list[tuple[str, str]]) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers)


def case_proxy(b: Bench, peer: bool = True) -> None:
    log("case 3: reverse proxy (one process each, defaults)")
    started: list[Proc] = []
    try:
        up, up_port = procs.start_server("upstream", 1)
        started.append(up)
        side, side_port = b.sidecar("redis", workers=1, upstream=f"http://127.0.0.1:{up_port}/")
        started.append(side)
        cookie = b.redis_cookie(side_port)
        sidecar_sent = _upstream_headers(side_port, f"_sidecar={cookie}")
        passthrough, pt_port = procs.start_server(
            "passthrough", 1, "--target", f"http://127.0.0.1:{up_port}", *_same_bytes(sidecar_sent)
        )
        started.append(passthrough)
        bare_sent = _upstream_headers(pt_port, f"_sidecar={cookie}")
        names = sorted(k.lower() for k, _ in sidecar_sent), sorted(k.lower() for k, _ in bare_sent)
        same = f"upstream request headers: sidecar {_header_bytes(sidecar_sent)} B, pass-through " + (
            f"{_header_bytes(bare_sent)} B, same names"
            if names[0] == names[1]
            else f"{_header_bytes(bare_sent)} B, DIFFERENT names {sorted(set(names[0]) ^ set(names[1]))}"
        )
        page = b"bench upstream"
        direct = Target("upstream app reached directly", up_port, "/app/page", 200, [cookie], page, short="direct")
        bare = Target(
            "bare aiohttp pass-through, same identity headers upstream",
            pt_port,
            "/app/page",
            200,
            [cookie],
            body_has=page,
            short="pass-through",
        )
        sidecar = Target(
            "sidecar reverse proxy, defaults (Redis, 1 worker, request logging on)",
            side_port,
            "/app/page",
            200,
            [cookie],
            body_has=page,
            sidecar_port=side_port,
            sidecar_route="proxy",
        )
        targets = [direct, bare, sidecar]
        oauth = try_sidecar(
            b, workers=1, upstream=f"http://127.0.0.1:{up_port}/", oauth_server="true", oauth_resource="/mcp"
        )
        oauth_t = None
        if isinstance(oauth, str):
            oauth_skip = oauth
        else:
            started.append(oauth[0])
            oauth_t = Target(
                "sidecar reverse proxy, --oauth-server on (--oauth-resource=/mcp, else defaults)",
                oauth[1],
                "/app/page",
                200,
                [cookie],
                body_has=page,
                sidecar_port=oauth[1],
                sidecar_route="proxy",
            )
            targets.append(oauth_t)
        peer_t, peer_why = _apache_target(b, up_port) if peer else (None, "")
        if peer_t is not None:
            started.append(peer_t[0])
            targets.append(peer_t[1])
        peer_one = _apache_target(b, up_port, processes=1)[0] if peer and peer_t is not None else None
        if peer_one is not None:  # at the sidecar's process count (one worker here)
            started.append(peer_one[0])
            targets.append(peer_one[1])
        b.measure(targets)
        b.row("3", direct, notes=["reference: no proxy"])
        b.row("3", bare, direct, notes=[same])
        notes = [f"{sidecar.ratio(direct):.2f}× direct"]
        if peer_t is not None:
            notes.append(f"{sidecar.ratio(peer_t[1]):.2f}× Apache + mod_auth_openidc")
        b.row("3", sidecar, bare, PASS_THROUGH_TARGET, notes=notes)
        if oauth_t is not None:
            b.row("3", oauth_t, bare, notes=[f"{oauth_t.ratio(sidecar):.2f}× --oauth-server off"])
        else:
            b.rows.append(Row("3", "sidecar reverse proxy, --oauth-server on", value=f"skipped: {oauth_skip}"))
        if peer_t is not None:
            b.row("3", peer_t[1], bare, notes=[PEER_NOTE])
        if peer_one is not None:
            b.row("3", peer_one[1], bare, notes=[f"sidecar (1 worker): {sidecar.ratio(peer_one[1]):.2f}× this"])
        if peer_t is None and peer:
            for count in ("distro defaults", "1 process, as the sidecar"):
                b.rows.append(Row("3", f"Apache + mod_auth_openidc → app, {count}", value=f"skipped: {peer_why}"))
    finally:
        for proc in started:
            proc.stop()


def _apache_target(b: Bench, app_port: int, processes: int | None = None) -> tuple[tuple[Proc, Target] | None, str]:
    """Apache + mod_auth_openidc in front of the app, signed in for real; or None and why not. ``processes``:
    that many Apache children (the sidecar's worker count), else the distro's defaults."""
    why = apache.available()
    if why is not None:
        return None, why
    proc, port = apache.start(b.issuer, app_port, processes)
    try:
        cookie = apache.sign_in(port)
    except (RuntimeError, aiohttp.ClientError) as exc:
        proc.stop()
        return None, f"Apache sign-in failed: {exc}"[:300]
    t = Target(
        "Apache + mod_auth_openidc → app (reverse proxy)"
        + (f", {processes} process(es) × 25 threads" if processes else ", distro defaults"),
        port,
        "/app/page",
        200,
        [cookie],
        body_has=b"bench upstream",
        short=f"Apache ({processes} proc)" if processes else "Apache + mod_auth_openidc",
        cookie_name=apache.COOKIE,
        peer=True,
    )
    return (proc, t), ""


# ---------------------------------------------------------------- 4: nginx auth_request


def _time_waits(port: int) -> int:
    """Closed TCP connections to or from ``port`` still in TIME-WAIT (60 s on Linux): new connections made."""
    done = subprocess.run(
        ["ss", "-Htan", "state", "time-wait", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return len([line for line in done.stdout.splitlines() if line.strip()])


def case_nginx(b: Bench) -> None:
    log("case 4: nginx auth_request with the shipped config (nginx 1 worker, sidecar 1 worker, bare 1 process)")
    started: list[Proc] = []
    try:
        up, up_port = procs.start_server("upstream", 1)
        started.append(up)
        bare, bare_port = procs.start_server("bare", 1)
        started.append(bare)
        lean_port = procs.free_port()
        side, side_port = b.sidecar("redis", workers=1, auth_address=f"127.0.0.1:{lean_port}")
        started.append(side)
        procs.wait_port(lean_port, side, timeout=10)
        cookie = b.redis_cookie(side_port)
        page = b"bench upstream"
        fronts = {}
        for key, auth_port, cache, keepalive, lean in (
            ("bare", bare_port, False, None, None),
            ("lean-side", side_port, False, None, lean_port),  # the shipped config: subrequests to --auth-address
            ("side", side_port, False, None, side_port),  # the same, its subrequests to the main listener
            ("cache-bare", bare_port, True, None, None),
            ("cache-side", side_port, True, None, lean_port),
            ("old-side", side_port, False, 32, side_port),
        ):
            port = procs.free_port()
            proc, source = nginx.start(port, auth_port, up_port, cache=cache, keepalive=keepalive, lean_port=lean)
            started.append(proc)
            fronts[key] = (port, source)
        shipped = nginx.shipped_keepalive()

        def front(key: str, name: str, short: str = "", checked: bool = True) -> Target:
            return Target(
                name,
                fronts[key][0],
                "/app/page",
                200,
                [cookie],
                body_has=page,
                sidecar_port=side_port if checked and key.endswith("side") else None,
                sidecar_status=202,
                short=short,
            )

        t_bare = front("bare", "nginx auth_request → bare 202 → app", "nginx + bare 202")
        t_lean = front("lean-side", "nginx auth_request → sidecar --auth-address (shipped config, 1 worker) → app")
        t_side = front("side", "nginx auth_request → sidecar main listener (defaults, 1 worker) → app")
        t_cache_bare = front("cache-bare", "nginx + auth cache → bare 202 → app", "nginx + cache + bare 202")
        t_cache_side = front("cache-side", "nginx + auth cache (1 s) → sidecar → app", checked=False)
        t_old = front("old-side", "nginx, auth keepalive 32 (before) → sidecar → app")
        targets = [t_bare, t_lean, t_side, t_cache_bare, t_cache_side, t_old]
        peer_t, peer_why = _apache_target(b, up_port)
        if peer_t is not None:
            started.append(peer_t[0])
            targets.append(peer_t[1])
        b.measure(targets)
        conns = {key: _new_connections(b, t, side_port) for key, t in (("side", t_side), ("old-side", t_old))}
        b.row("4", t_bare, notes=[f"config: {fronts['bare'][1]}"])
        b.row(
            "4",
            t_lean,
            t_bare,
            NGINX_TARGET,
            notes=[f"{t_lean.ratio(t_side):.2f}× nginx → main listener", f"config: {fronts['lean-side'][1]}"],
        )
        b.row("4", t_side, t_bare, notes=[f"keepalive {shipped}: {conns['side']}", f"config: {fronts['side'][1]}"])
        b.row("4", t_old, t_bare, notes=[f"{t_old.ratio(t_side):.2f}× keepalive {shipped}", conns["old-side"]])
        b.row("4", t_cache_bare, t_bare, notes=[f"config: {fronts['cache-bare'][1]}"])
        if peer_t is not None:
            b.row("4", peer_t[1], t_bare, notes=[PEER_NOTE])
            b.row(
                "4",
                t_cache_side,
                peer_t[1],
                PEER_TARGET,
                notes=[
                    f"{t_cache_side.ratio(t_bare):.2f}× nginx + bare 202 (no cache)",
                    f"{t_cache_side.ratio(t_cache_bare):.2f}× nginx + cache + bare 202",
                    f"nginx without cache → sidecar: {t_side.ratio(peer_t[1]):.2f}× Apache",
                ],
            )
        else:
            b.rows.append(Row("4", "Apache + mod_auth_openidc → app", value=f"skipped: {peer_why}"))
            b.row(
                "4",
                t_cache_side,
                t_bare,
                notes=[
                    "no C peer to compare with; ratio to the bare front without cache",
                    f"{t_cache_side.ratio(t_cache_bare):.2f}× nginx + cache + bare 202",
                ],
            )
    finally:
        for proc in started:
            proc.stop()


def _new_connections(b: Bench, t: Target, side_port: int) -> str:
    """New TCP connections between nginx and the sidecar during one more run (TIME-WAIT sockets it left)."""
    if shutil.which("ss") is None:
        return "new connections not counted: ss (iproute2) not installed"
    before = _time_waits(side_port)
    result = b.run_wrk(t, 3)
    made = max(0, _time_waits(side_port) - before)
    log(f"  {t.name}: {made} new connections to the sidecar in {result.requests:,} requests")
    return f"{made:,} new TCP connections to the sidecar per {result.requests:,} requests (3 s run, ss TIME-WAIT)"


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


GRANTS_MEASURED = 2_000


def _grant_memory(b: Bench, template: SignIn, started: list[Proc]) -> None:
    """Redis memory per OAuth grant (``--oauth-server``), made as the sidecar makes them, on a Redis of its own."""
    red, url = procs.start_redis()
    started.append(red)
    before = _used_memory(url)
    make_grants(b.issuer, url, template, GRANTS_MEASURED)
    per_grant = (_used_memory(url) - before) / GRANTS_MEASURED
    client = redis.from_url(url)
    keys = int(client.dbsize())
    client.close()
    b.rows.append(
        Row(
            "6",
            f"Redis memory per OAuth grant at {GRANTS_MEASURED:,} grants",
            value=f"{per_grant:,.0f} B",
            notes=[
                f"INFO used_memory delta / {GRANTS_MEASURED:,}; {keys / GRANTS_MEASURED:.2f} keys/grant",
                "upstream-token session record + grant + per-user index + one access and one refresh token",
            ],
        )
    )


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
        _grant_memory(b, template, started)
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
