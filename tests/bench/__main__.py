"""``python -m tests.bench [--quick] [--only CASE ...]``: run the benchmarks, print one Markdown table.

Cases (by number or name): 1 framework, 2 auth, 3 proxy, 4 nginx, 5 storm, 6 memory, 7 latency.
Cases 2-4 run the sidecar at its defaults (request logging on, Redis sessions) with one worker against
one bare aiohttp process, wrk -t2 -c50; Apache + mod_auth_openidc joins cases 3-4 when installed.
Progress goes to stderr; the table (and the machine it ran on) goes to stdout, and to ``--output``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from . import procs
from .cases import CASES, Bench, Settings, log
from .report import machine, summary, table


def _selected(only: Sequence[str] | None) -> list[str]:
    if not only:
        return [num for num in CASES if num != "1"]  # case 2 measures the framework baselines too
    names = {name: num for num, (name, _) in CASES.items()}
    chosen = set()
    for item in (part.strip().lower() for arg in only for part in arg.split(",")):
        num = item if item in CASES else names.get(item)
        if num is None:
            raise SystemExit(
                f"--only: unknown case {item!r}; choose from " + ", ".join(f"{k} {v[0]}" for k, v in CASES.items())
            )
        chosen.add(num)
    if "2" in chosen:
        chosen.discard("1")  # case 2 measures the framework baselines too
    return sorted(chosen)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs, 10k sessions, one repetition")
    parser.add_argument("--only", action="append", metavar="CASE", help="run only these cases (repeatable, commas)")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes for cases 6-7 (default 1; cases 2-4 compare one each)"
    )
    parser.add_argument("--duration", type=float, help="seconds per wrk run")
    parser.add_argument("--repeat", type=int, help="alternating wrk runs per target (median kept)")
    parser.add_argument("--population", type=int, help="sessions stored for the memory case")
    parser.add_argument("--output", metavar="FILE", help="also write the Markdown report here")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory with logs and configs")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed, not only on errors")
    args = parser.parse_args(argv)

    settings = Settings.make(args.quick, max(1, args.workers))
    for name in ("duration", "repeat", "population"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    cases = _selected(args.only)
    procs.install_cleanup(keep=args.keep)
    for name in ("redis-server", "nginx", "wrk"):
        procs.binary(name)
    bench = Bench(settings)
    started = time.monotonic()
    log(
        f"{machine()}; workers {settings.workers}; wrk -t{settings.threads} -c{settings.connections} "
        f"-d{settings.duration:g}s x{settings.repeat}; work dir {procs.workdir()}"
    )
    errors = []
    for num in cases:
        try:
            CASES[num][1](bench)
        except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others' results
            log(f"case {num} failed: {type(exc).__name__}: {exc}")
            errors.append(f"case {num} ({CASES[num][0]}) did not complete: {type(exc).__name__}: {exc}"[:2000])
    elapsed = time.monotonic() - started
    command = "python -m tests.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Machine: {machine()}.",
        f"Command: `{command.strip()}`; workers {settings.workers}; wrk -t{settings.threads} "
        f"-c{settings.connections} -d{settings.duration:g}s, median of {settings.repeat} alternating run(s) "
        f"({settings.scale_repeat} x {settings.scale_duration:g}s for case 6) after a {settings.warmup:g}s warm-up; "
        f"fixed rate: {settings.rate_repeat} x {settings.rate_duration:g}s per target; total {elapsed:.0f}s.",
        "",
        table(bench.rows),
        "",
        summary(bench.rows),
    ]
    if bench.failures or errors:
        lines += ["", "Failures:"] + [f"- {f}" for f in bench.failures + errors]
    report = "\n".join(lines)
    print(report, flush=True)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(report + "\n")
    missed = any(r.verdict == "FAIL" for r in bench.rows)
    return 1 if errors or bench.failures or (args.strict and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
