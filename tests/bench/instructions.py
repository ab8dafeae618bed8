"""Case 3 by instruction counts: user-space instructions per proxied request, sidecar vs the bare pass-through.

``python -m tests.bench.instructions [--requests N] [--sidecar-root DIR] [--auth [--shape nginx|minimal]]``

A shared 2-core machine makes req/s ratios swing by 0.1 or more between runs; callgrind's instruction count
(``valgrind --tool=callgrind``, counters zeroed after a warm-up, dumped after N requests) moves by about 1 %.
Both servers run exactly as in case 3 (one process, uvloop, the sidecar at its defaults with Redis and
request logging on, the pass-through sending the same header bytes upstream) and get the same requests: N
keep-alive GETs of the same page over four connections, one at a time, with the signed-in cookie. Kernel time
(the syscalls) is not counted: the sidecar makes one send fewer per small answer than the pass-through.
``--sidecar-root``: run the sidecar package from that directory instead (``git archive REV sidecar | tar -x``
there measures an earlier revision against the same pass-through).

``--cpu ROUNDS``: also run both at full speed (no valgrind) under ``wrk -t2 -c50 -d3s``, alternating, and
count each process's CPU time (user + system, from ``/proc``) per request: the kernel's share included,
still far less sensitive to other load on the machine than req/s.

``--auth``: ``/oauth2/auth`` instead (``auth_counts.py``): misses and hits, decision cache on and off, on the
main listener and the ``--auth-address`` one.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from . import procs, wrk
from .cases import Bench, Settings, _same_bytes, _upstream_headers, log

_TOTAL = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.M)


def _send(port: int, cookie: str, count: int) -> None:
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(4)]
    for i in range(count):
        conn = conns[i % 4]
        conn.request("GET", "/app/page", headers={"Cookie": f"_sidecar={cookie}"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"port {port}: {resp.status} on request {i}")
    for conn in conns:
        conn.close()


def _count(name: str, argv: list[str], port: int, cookie: str, requests: int, cwd: Path, env: dict[str, str]) -> int:
    """Instructions per request of ``argv`` (a server listening on ``port``) under callgrind."""
    out = procs.workdir() / f"callgrind-{name}.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(procs.workdir() / f"callgrind-{name}.log", "wb"),  # noqa: SIM115 - the child keeps it
        start_new_session=True,
    )
    try:
        procs.wait_http(port, "/app/page" if name == "pass-through" else "/ping", timeout=120)
        _send(port, cookie, max(100, requests // 4))  # warm-up: caches filled, code paths taken
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        _send(port, cookie, requests)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    dumps = sorted(procs.workdir().glob(f"callgrind-{name}.out*"), key=lambda p: p.stat().st_mtime)
    found = [m for d in dumps if (m := _TOTAL.search(d.read_bytes()))]
    if not found:
        raise RuntimeError(f"{name}: no callgrind dump in {procs.workdir()}")
    return int(found[0].group(1)) // requests  # the first dump: the N requests after the zeroing


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


def _cpu_per_request(procs_ports: dict[str, tuple[int, int]], cookie: str, rounds: int) -> dict[str, list[float]]:
    """Microseconds of CPU per request for each (pid, port), over ``rounds`` alternating wrk runs."""
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    script = wrk.script([cookie], expect=200)
    seen: dict[str, list[float]] = {name: [] for name in procs_ports}
    for _ in range(rounds):
        for name, (pid, port) in procs_ports.items():
            before = _cpu_ticks(pid)
            result = wrk.run(f"http://127.0.0.1:{port}/app/page", 3.0, 2, 50, script=script)
            if result.failures:
                raise RuntimeError(f"{name}: {result.failure_text()}")
            seen[name].append((_cpu_ticks(pid) - before) * tick_us / result.requests)
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.instructions", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--sidecar-root", type=Path, default=procs.ROOT)
    parser.add_argument("--cpu", type=int, default=0, metavar="ROUNDS", help="also CPU time per request, N rounds")
    parser.add_argument("--auth", action="store_true", help="/oauth2/auth misses and hits, cache on vs off")
    parser.add_argument("--shape", choices=("nginx", "minimal"), default="nginx", help="--auth: the request headers")
    args = parser.parse_args(argv)
    if args.auth:
        from .auth_counts import run

        return run(args.requests, args.sidecar_root, args.shape)
    for name in ("valgrind", "callgrind_control", "redis-server"):
        procs.binary(name)
    procs.install_cleanup()
    b = Bench(Settings())
    started: list[procs.Proc] = []
    try:
        up, up_port = procs.start_server("upstream", 1)
        started.append(up)
        side, side_port = b.sidecar("redis", workers=1, upstream=f"http://127.0.0.1:{up_port}/")
        started.append(side)
        cookie = b.redis_cookie(side_port)
        same = _same_bytes(_upstream_headers(side_port, f"_sidecar={cookie}"))
        side.stop()
        started.remove(side)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        metrics_dir = procs.workdir() / "metrics-callgrind"
        metrics_dir.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        flags = procs.sidecar_flags(
            b.issuer,
            procs.free_port(),
            session_store_type="redis",
            workers=1,
            upstream=f"http://127.0.0.1:{up_port}/",
            redis_connection_url=b.redis_url,
        )
        side_port = int(flags["http-address"].rsplit(":", 1)[1])
        side_argv = [procs.PY, "-m", "sidecar", *(f"--{k}={v}" for k, v in flags.items())]
        pt_port = procs.free_port()
        pt_argv = [procs.PY, "-m", "tests.bench.servers", "passthrough", "--port", str(pt_port)]
        pt_argv += ["--target", f"http://127.0.0.1:{up_port}", *same]
        if args.requests:  # --requests 0: the CPU rounds only
            log(f"callgrind: {args.requests} requests each, sidecar from {args.sidecar_root}")
            began = time.monotonic()
            side_ir = _count("sidecar", side_argv, side_port, cookie, args.requests, args.sidecar_root, env)
            pt_ir = _count("pass-through", pt_argv, pt_port, cookie, args.requests, procs.ROOT, env)
            print(
                f"instructions per request (callgrind, {args.requests} requests after a warm-up): "
                f"sidecar {side_ir:,}, pass-through {pt_ir:,}; pass-through / sidecar = {pt_ir / side_ir:.3f} "
                f"({time.monotonic() - began:.0f} s)",
                flush=True,
            )
        if args.cpu:
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
            side_proc = subprocess.Popen(side_argv, cwd=args.sidecar_root, env=env, **quiet)  # type: ignore[call-overload]
            pt_proc = subprocess.Popen(pt_argv, cwd=procs.ROOT, env=env, **quiet)  # type: ignore[call-overload]
            try:
                procs.wait_http(side_port, "/ping")
                procs.wait_http(pt_port, "/app/page")
                seen = _cpu_per_request(
                    {"sidecar": (side_proc.pid, side_port), "pass-through": (pt_proc.pid, pt_port)}, cookie, args.cpu
                )
            finally:
                for child in (side_proc, pt_proc):
                    child.terminate()
                    child.wait(30)
            ratios = sorted(p / s for s, p in zip(seen["sidecar"], seen["pass-through"], strict=True))
            print(
                "CPU per request (us, user + system, wrk -t2 -c50 -d3s, alternating): sidecar "
                + ", ".join(f"{v:.0f}" for v in seen["sidecar"])
                + "; pass-through "
                + ", ".join(f"{v:.0f}" for v in seen["pass-through"])
                + f"; pass-through / sidecar per round {ratios[0]:.3f}-{ratios[-1]:.3f}, "
                f"median {ratios[len(ratios) // 2]:.3f}",
                flush=True,
            )
    finally:
        for proc in started:
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
