"""Module structure: every module imports alone, and imports inside ``sidecar/`` form no cycle.

Cycles are found from the source (``ast``), counting every import: at module level, inside functions (a
lazy import hides a cycle, it does not remove it) and under ``TYPE_CHECKING``. Importing alone runs in a
fresh interpreter per module; the interpreter preloads the third-party libraries once and forks a child per
module, so each child starts with no ``sidecar`` module loaded (seconds for the whole package, not minutes).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"
# The dev provider's routes are its methods moved to a second file: provider.app() imports them and they
# name DevProvider in annotations only. A Protocol standing in for DevProvider would have to repeat every
# attribute the routes use; this one type-only back-reference is accepted, and nothing else.
ACCEPTED = {frozenset({"sidecar.dev.provider", "sidecar.dev.provider_routes"})}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The sidecar modules ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x` names a module; `from .m import f` names m
                out.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {m for m in out if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_within_the_package() -> None:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert graph["sidecar.oauth.authorize"] >= {"sidecar.oauth.cimd"}  # the parser sees these edges
    assert "sidecar.oauth.service" in graph["sidecar.oauth.resource"]
    found = [c for c in cycles(graph) if frozenset(c) not in ACCEPTED]
    assert not found, f"import cycles: {found}"


def test_the_cycle_finder_sees_lazy_and_type_only_imports(tmp_path: Path) -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    path = tmp_path / "x.py"
    path.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .y import Y\n"
        "def f():\n    from . import z\n    from ..config import Config\n"
    )
    known = {name: path for name in ("sidecar.oauth.x", "sidecar.oauth.y", "sidecar.oauth.z", "sidecar.config")}
    assert imports_of("sidecar.oauth.x", path, known) == {"sidecar.oauth.y", "sidecar.oauth.z", "sidecar.config"}


_CHILD = """
import os, sys, traceback
import aiohttp, aiohttp.web, redis.asyncio, jwt, cryptography, authlib, itsdangerous, prometheus_client, yarl
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            assert not [m for m in sys.modules if m == "sidecar" or m.startswith("sidecar.")]
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED", " ".join(failed))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    names = [n for n in modules() if not n.endswith("__main__")] + ["sidecar.__main__", "sidecar.dev.__main__"]
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, *names], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "FAILED", result.stdout + result.stderr[-4000:]
