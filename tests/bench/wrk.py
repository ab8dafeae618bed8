"""Run wrk for a bounded time and parse what it prints (rate, latency percentiles, failures)."""

from __future__ import annotations

import itertools
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .procs import binary, workdir

_scripts = itertools.count(1)
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int = 0
    unexpected: int = 0  # answers with another status than expected (counted by the Lua script)
    socket_errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""

    @property
    def failures(self) -> int:
        return max(self.non2xx, self.unexpected) + sum(self.socket_errors.values())

    def failure_text(self) -> str:
        parts = [f"non-2xx/3xx {self.non2xx}"] if self.non2xx else []
        parts += [f"unexpected status {self.unexpected}"] if self.unexpected else []
        parts += [f"{k} {v}" for k, v in self.socket_errors.items() if v]
        return ", ".join(parts)


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(out: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and total and p50 and p99):
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    result = WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        requests=int(total.group(1)),
        raw=out,
    )
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        result.non2xx = int(non2xx.group(1))
    unexpected = re.search(r"unexpected-status: (\d+)", out)
    if unexpected:
        result.unexpected = int(unexpected.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        result.socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
    return result


def run(
    url: str,
    duration: float,
    threads: int = 2,
    connections: int = 64,
    headers: Sequence[str] = (),
    script: Path | None = None,
) -> WrkResult:
    """wrk ``-t -c -d --latency``; ``headers`` are ``"Name: value"`` strings."""
    argv = [
        binary("wrk"),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    for header in headers:
        argv += ["-H", header]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse(done.stdout)


def script(
    cookies: Sequence[str] = (), expect: int | None = None, name: str = "_sidecar", unique: str | None = None
) -> Path:
    """A Lua script: rotate among session cookies (requests formatted once, up front) and count
    answers whose status is not exactly ``expect`` (wrk alone would accept any 2xx or 3xx).
    ``unique``: a header sent with a new value on every request (``/page/<run>-<thread>-<n>``, ``<run>`` random
    per wrk run), so no two requests of any run share a decision cache key: every one is a miss (each request
    is formatted then).

    Each wrk thread starts at a different offset so threads do not walk the list in lockstep."""
    path = workdir() / f"wrk-{next(_scripts)}.lua"
    lines = ["local cookies = {"]
    lines += [f'"{c}",' for c in cookies]
    lines += [
        "}",
        "local n = #cookies",
        "local reqs = {}",
        "local i = 0",
        "local threads = {}",
        "unexpected = 0",
        "function setup(thread)",
        "  thread:set('thread_id', #threads)",
        "  table.insert(threads, thread)",
        "end",
        "function init(args)",
        "  for k = 1, n do",
        f"    reqs[k] = wrk.format(nil, nil, {{['Cookie'] = '{name}=' .. cookies[k]}})",
        "  end",
        "  if n > 0 then i = ((thread_id or 0) * 7919) % n end",
        "end",
    ]
    if cookies and unique:
        # The run's own random prefix: each wrk run (warm-up, every round) counts from 1 again, and without it
        # the second round repeated the first round's values, so its requests were second sightings (kept in
        # the table, pushing others out) rather than the misses the row is about.
        lines += [
            "local count = 0",
            "local run = ''",
            "local first_init = init",
            "function init(args)",
            "  first_init(args)",
            "  math.randomseed(os.time() * 7919 + (thread_id or 0))",
            "  run = string.format('%d%09d', os.time(), math.random(0, 999999999))",
            "end",
            "function request()",
            "  i = i + 1",
            "  if i > n then i = 1 end",
            "  count = count + 1",
            f"  return wrk.format(nil, nil, {{['Cookie'] = '{name}=' .. cookies[i],"
            f" ['{unique}'] = '/page/' .. run .. '-' .. (thread_id or 0) .. '-' .. count}})",
            "end",
        ]
    elif cookies:
        lines += [
            "function request()",
            "  i = i + 1",
            "  if i > n then i = 1 end",
            "  return reqs[i]",
            "end",
        ]
    if expect is not None:
        lines += [
            "function response(status, headers, body)",
            f"  if status ~= {expect} then unexpected = unexpected + 1 end",
            "end",
        ]
    lines += [
        "function done(summary, latency, requests)",
        "  local total = 0",
        "  for _, t in ipairs(threads) do total = total + (t:get('unexpected') or 0) end",
        "  io.write(string.format('unexpected-status: %d\\n', total))",
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
