"""The README's client snippets run as written against ``python -m sidecar.dev --port 0`` (what ``make run
PORT=0`` starts): the MCP Python SDK program, with ``$BROWSER`` set to the scripted person
(``tests/e2e/person.py``) that Python's ``webbrowser`` calls, and the curl device-flow session in bash, the
person approving the code it prints. Only ``SIDECAR_URL`` differs from a reader's run (the free port)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.person import act

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def snippet(language: str, after: str) -> str:
    """The first ```language block after the paragraph that starts with ``after``."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(readme, start)
    assert match is not None, f"no {language} block after {after!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def demo() -> Iterator[str]:
    """``make run PORT=0 ARGS="--oauth-access-token-ttl 20s"``, as a reader would start it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.dev", "--port", "0", "--oauth-access-token-ttl", "20s"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    url, printed = "", []
    while not url:
        line = proc.stdout.readline()
        assert line, "the demo exited before printing its address:\n" + "".join(printed)
        printed.append(line)
        if line.strip().startswith("SIDECAR_URL="):
            url = line.strip().split("=", 1)[1]
    assert "access tokens live 20 s" in "".join(printed)  # ARGS reached the sidecar
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # its log must never fill the pipe
    yield url
    proc.terminate()
    proc.wait(10)


def env(url: str) -> dict[str, str]:
    browser = f"{shlex.quote(sys.executable)} -m tests.e2e.person %s"
    return {**os.environ, "SIDECAR_URL": url, "BROWSER": browser, "PYTHONPATH": str(ROOT)}


async def test_readme_python_mcp_client_runs_as_written(demo: str) -> None:
    code = snippet("python", "**An MCP client**")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=ROOT, env=env(demo),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-3000:]
    lines = out.decode().splitlines()
    assert lines[0].startswith(f"Opening the browser at {demo}/oauth2/authorize?"), lines
    assert lines[-1] == "alice@example.com", lines


async def test_readme_curl_device_flow_runs_as_written(demo: str) -> None:
    script = snippet("sh", "**A CLI without a browser")
    proc = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", script, cwd=ROOT, env=env(demo),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("Open "):
            page = await act(line.split()[1])  # the person, in a browser, with the code the CLI showed
            assert "Device connected" in page
    assert await proc.wait() == 0, (await proc.stderr.read()).decode() if proc.stderr else ""
    registration, whoami, refreshed = lines[0], lines[-2], lines[-1]
    assert '"scope": "openid profile email offline_access"' in registration
    assert '"X-Forwarded-Email": "alice@example.com"' in whoami and '"authorization_forwarded": true' in whoami
    assert '"access_token": "sca.' in refreshed and '"refresh_token": "scr.' in refreshed
