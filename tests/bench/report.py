"""The one results table: rows, ratios, PASS/FAIL against the team's targets, rendered as Markdown."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    case: str
    name: str
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    value: str = ""  # ratio to the baseline, or the measured quantity for non-throughput rows
    target: str = ""
    verdict: str = ""  # PASS, FAIL or empty for rows without a target
    notes: list[str] = field(default_factory=list)


def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return ""
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    head = "| # | benchmark | req/s | p50 ms | p99 ms | ratio / value | target | result | notes |"
    lines = [head, "|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        verdict = f"**{r.verdict}**" if r.verdict else ""
        cells = [
            r.case,
            r.name,
            _num(r.rps, 0),
            _num(r.p50_ms),
            _num(r.p99_ms),
            r.value,
            r.target,
            verdict,
            "; ".join(n for n in r.notes if n),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    return (
        f"nproc {os.cpu_count()}, CPU {cpu_model()}, Python {sys.version.split()[0]}, "
        f"{platform.system()} {platform.release()}"
    )


def summary(rows: list[Row]) -> str:
    checked = [r for r in rows if r.verdict]
    failed = [r for r in checked if r.verdict != "PASS"]
    text = f"targets: {len(checked) - len(failed)}/{len(checked)} PASS"
    if failed:
        text += " — FAIL: " + ", ".join(f"{r.case} {r.name}" for r in failed)
    return text
