"""Start the real processes an end-to-end test (or a benchmark) needs, and stop them again.

Each child runs in its own session with its output in a log file, so a part that does not
come up fails the run with the tail of what it said instead of a bare timeout. Children are
stopped through their own pid (and, if SIGTERM is ignored, their own process group); nothing
is ever killed by name. nginx runs the shipped ``deploy/nginx/sidecar.conf``, rendered onto
private loopback ports and included from a minimal top-level config, exactly as an operator
would include it inside ``http { }``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

from tests.redis_procs import free_ports, require

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SHIPPED_NGINX_CONF = ROOT / "deploy" / "nginx" / "sidecar.conf"
SHIPPED_STEP_UP_CONF = ROOT / "deploy" / "nginx" / "step-up.conf"
STEP_UP_INCLUDE = "include /etc/nginx/step-up.conf;"  # in sidecar.conf; the test copy inlines the file

# The addresses in the shipped config that a private copy replaces (see render_nginx_conf).
NGINX_PLACEHOLDERS = {
    "sidecar": "server 127.0.0.1:4180;",
    "auth": "server 127.0.0.1:4181;",
    "app": "server 127.0.0.1:8080;",
    "listen": "listen 80;",
}

__all__ = [
    "PYTHON",
    "ROOT",
    "SHIPPED_NGINX_CONF",
    "Proc",
    "child_env",
    "free_port",
    "free_ports",
    "http_status",
    "nginx_main_conf",
    "python_module",
    "render_nginx_conf",
    "start_nginx",
]


def free_port() -> int:
    """One free loopback port (use ``free_ports`` for several: they are then distinct)."""
    return free_ports(1)[0]


def python_module(module: str, *args: str) -> list[str]:
    """argv for ``python -m module`` with the interpreter running the tests (the venv's)."""
    return [PYTHON, "-m", module, *args]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without SIDECAR_* settings, so a developer's shell cannot
    change what a test configured, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(extra)
    return env


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """Status of ``GET url`` (redirects not followed, no proxy from the environment), or None
    when nothing answers."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class Proc:
    """A child process whose output goes to ``log_dir/<name>.log``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        extra_logs: Sequence[Path] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.extra_logs = list(extra_logs)  # e.g. nginx's error.log, shown when something fails
        self._on_stop: list[Callable[[], None]] = []
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the test runner only
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, chars: int = 3000) -> str:
        """The tail of everything the process (and its extra logs) wrote."""
        parts = []
        for path in (self.log_path, *self.extra_logs):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- {path.name} ---\n{text[-chars:]}")
        return "\n".join(parts) or "(no output)"

    def fail(self, why: str) -> NoReturn:
        """Stop the process and fail the test with what it printed."""
        code = self.popen.poll()
        self.stop()
        status = f"exited with {code}" if code is not None else "still running"
        pytest.fail(f"{self.name} {why} ({status}): {' '.join(self.argv)}\n{self.output()}", pytrace=False)

    def wait_http(self, url: str, timeout: float = 15.0, expect: int = 200) -> Proc:
        """Return once ``GET url`` answers ``expect``; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                self.fail(f"exited before {url} answered")
            if http_status(url, timeout=1.0) == expect:
                return self
            time.sleep(0.05)
        self.fail(f"did not answer {expect} on {url} within {timeout:.0f}s")

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after the process has stopped (e.g. remove its directory)."""
        self._on_stop.append(callback)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful for the sidecar and nginx), then SIGKILL to its own process group, which also
        ends what it started and left behind (the MCP Inspector's launcher exits on SIGTERM, its UI and
        proxy processes do not)."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # our child led this group (start_new_session)
        if self.popen.returncode is None:
            self.popen.wait(timeout=timeout)
        callbacks, self._on_stop = self._on_stop, []
        for callback in callbacks:
            callback()
        return self.popen.returncode


def render_nginx_conf(listen_port: int, sidecar: str, app: str, text: str | None = None, *, auth: str) -> str:
    """The shipped server config with private addresses: ``sidecar`` (the main listener), ``auth`` (its
    ``--auth-address`` listener, which the auth subrequests go to) and ``app`` as host:port, nginx on
    127.0.0.1:``listen_port``. Fails when a placeholder is missing, so a changed
    shipped file cannot silently leave a test talking to port 80 or 4180. The shipped
    step-up.conf, which sidecar.conf includes from /etc/nginx, is inlined in its place."""
    text = SHIPPED_NGINX_CONF.read_text() if text is None else text
    text = text.replace(STEP_UP_INCLUDE, SHIPPED_STEP_UP_CONF.read_text())
    replacements = {
        NGINX_PLACEHOLDERS["sidecar"]: f"server {sidecar};",
        NGINX_PLACEHOLDERS["auth"]: f"server {auth};",
        NGINX_PLACEHOLDERS["app"]: f"server {app};",
        NGINX_PLACEHOLDERS["listen"]: f"listen 127.0.0.1:{listen_port};",
    }
    for shipped, ours in replacements.items():
        if text.count(shipped) != 1:
            pytest.fail(f"{SHIPPED_NGINX_CONF} must contain {shipped!r} exactly once", pytrace=False)
        text = text.replace(shipped, ours)
    return text


def nginx_main_conf(prefix: Path, include: Path, log_dir: Path, workers: int = 1) -> str:
    """The top-level config around an ``include``d http-level file: what nginx would otherwise
    write under /var goes to ``prefix`` (pid, temp files) and ``log_dir`` (error and access log)."""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes {workers};
pid {prefix / "nginx.pid"};
error_log {log_dir / "nginx-error.log"} notice;
events {{
    worker_connections 1024;
}}
http {{
    access_log {log_dir / "nginx-access.log"};
{temp}
    include {include};
}}
"""


def start_nginx(
    http_conf: str,
    listen_port: int,
    *,
    log_dir: Path,
    prefix: Path | None = None,
    workers: int = 1,
    timeout: float = 10.0,
) -> Proc:
    """nginx serving ``http_conf`` (text for inside ``http { }``), ready once ``listen_port``
    answers HTTP. Logs go to ``log_dir`` (kept); its other files live in ``prefix``, by default
    a fresh directory under the system temp dir removed at stop: started as root, nginx's
    workers run as nobody and must reach their temp directories."""
    binary = require("nginx", "nginx")
    owned = prefix is None
    if prefix is None:
        prefix = Path(tempfile.mkdtemp(prefix="sidecar-nginx-"))
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)
    include = prefix / "site.conf"
    include.write_text(http_conf)
    conf = prefix / "nginx.conf"
    log_dir.mkdir(parents=True, exist_ok=True)
    conf.write_text(nginx_main_conf(prefix, include, log_dir, workers))
    error_log = log_dir / "nginx-error.log"
    argv = [binary, "-p", str(prefix), "-e", str(error_log), "-c", str(conf)]
    check = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, timeout=timeout)
    if check.returncode != 0:
        said = check.stderr + (error_log.read_text(errors="replace") if error_log.exists() else "")
        if owned:
            shutil.rmtree(prefix, ignore_errors=True)
        pytest.fail(f"nginx rejects the config:\n{said}\n{http_conf}", pytrace=False)
    proc = Proc("nginx", argv, log_dir=log_dir, extra_logs=[error_log])
    if owned:
        proc.on_stop(lambda: shutil.rmtree(prefix, ignore_errors=True))
    deadline = time.monotonic() + timeout
    while http_status(f"http://127.0.0.1:{listen_port}/", timeout=1.0) is None:
        if not proc.alive():
            proc.fail("exited at start-up")
        if time.monotonic() > deadline:
            proc.fail(f"did not listen on 127.0.0.1:{listen_port} within {timeout:.0f}s")
        time.sleep(0.05)
    return proc


MCP_SERVER = ROOT / "tests" / "e2e" / "mcp" / "server.py"


@contextlib.contextmanager
def mcp_server_process(cors_origin: str = "") -> Iterator[str]:
    """The MCP server (the Python SDK's ``MCPServer``) in its own process: the upstream behind ``/mcp``. It
    accepts the Host the sidecar forwards, and with ``cors_origin`` calls from that web page's scripts.
    Yields its base URL; stopped on exit."""
    port = free_port()
    cors = ["--cors-origin", cors_origin] if cors_origin else []
    proc = subprocess.Popen(
        [sys.executable, str(MCP_SERVER), "--port", str(port), "--allowed-host", "127.0.0.1:*", *cors],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError("MCP server exited:\n" + (proc.stdout.read().decode() if proc.stdout else ""))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("MCP server did not start within 20 s") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
