"""Start and stop the benchmark's processes: each in its own process group, all stopped at exit.

Nothing here kills by name: a process is stopped through the group id of the child we started.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]
COOKIE_SECRET = "bench-cookie-secret-0123456789abcdef"
CLIENT_ID, CLIENT_SECRET = "sidecar-dev", "sidecar-dev-secret"

_running: list[Proc] = []
_workdir: Path | None = None
_names = itertools.count(1)


def workdir() -> Path:
    """One temporary directory per run (logs, configs, Lua scripts), removed at exit."""
    global _workdir
    if _workdir is None:
        _workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
        _workdir.chmod(0o755)  # nginx workers run as nobody and read their config from here
    return _workdir


def binary(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), None)
    if path is None:
        raise SystemExit(f"{name} not found: install it with `apt-get install {name}` (make bench does this as root)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """A child process in its own session, with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = workdir() / f"{next(_names):02d}-{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        _running.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after ``timeout``."""
        if self not in _running:
            return
        _running.remove(self)
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=timeout)
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers (forked workers) in our group
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        self._log.close()


def stop_all() -> None:
    for proc in reversed(list(_running)):
        proc.stop(timeout=5)


def cleanup(keep: bool = False) -> None:
    stop_all()
    if _workdir is not None and not keep:
        shutil.rmtree(_workdir, ignore_errors=True)


def _on_term(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_cleanup(keep: bool = False) -> None:
    atexit.register(cleanup, keep)
    signal.signal(signal.SIGTERM, _on_term)


def wait_port(port: int, proc: Proc | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s" + (f":\n{proc.output()}" if proc else ""))


def http_get(port: int, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_http(port: int, path: str, proc: Proc | None = None, timeout: float = 20.0) -> None:
    """Wait until ``path`` answers with any HTTP status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.check_alive()
        try:
            http_get(port, path)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not answer HTTP" + (f":\n{proc.output()}" if proc else ""))


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the workers of a forking server)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    except OSError:
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
        return out


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS")).split()[1])


def worker_pids(proc: Proc) -> list[int]:
    """The processes that serve requests: the forked workers, or the process itself."""
    return children(proc.pid) or [proc.pid]


# ---------------------------------------------------------------- the parts


def start_redis(port: int | None = None) -> tuple[Proc, str]:
    port = port or free_port()
    data = workdir() / f"redis-{port}"
    data.mkdir()
    from tests.redis_procs import redis_server_argv

    proc = Proc("redis", redis_server_argv(binary("redis-server"), port, data))
    wait_port(port, proc)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_provider(access_token_ttl: int = 3600, *extra: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        "provider",
        [
            PY,
            "-m",
            "sidecar.dev.provider",
            "--port",
            str(port),
            "--auto-login",
            "alice",
            "--access-token-ttl",
            str(access_token_ttl),
            "--refresh-token-ttl",
            "86400",
            *extra,
        ],
    )
    wait_http(port, "/.well-known/openid-configuration", proc)
    return proc, f"http://127.0.0.1:{port}"


def start_server(kind: str, workers: int, *extra: str) -> tuple[Proc, int]:
    """One of the bench's own aiohttp servers (see ``tests.bench.servers``)."""
    port = free_port()
    proc = Proc(kind, [PY, "-m", "tests.bench.servers", kind, "--port", str(port), "--workers", str(workers), *extra])
    wait_http(port, "/", proc)
    return proc, port


def sidecar_flags(issuer: str, port: int, **settings: Any) -> dict[str, Any]:
    flags: dict[str, Any] = {
        "http-address": f"127.0.0.1:{port}",
        "oidc-issuer-url": issuer,
        "client-id": CLIENT_ID,
        "client-secret": CLIENT_SECRET,
        "redirect-url": f"http://127.0.0.1:{port}/oauth2/callback",
        "cookie-secret": COOKIE_SECRET,
        "cookie-secure": "false",
        "shutdown-timeout": "1s",
        "email-domain": "*",
    }
    flags.update({k.replace("_", "-"): v for k, v in settings.items()})
    return flags


def start_sidecar(issuer: str, log_file: str | None = None, **settings: Any) -> tuple[Proc, int]:
    """A real ``python -m sidecar`` at its defaults (request logging on: its lines go to the process's log
    file, or ``log_file``) plus ``settings``, flag names (underscores allowed)."""
    port = free_port()
    flags = sidecar_flags(issuer, port, **settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    metrics_dir = workdir() / f"metrics-{port}"  # ours, so it is removed with the run's directory
    metrics_dir.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    argv = [PY, "-m", "sidecar", *(f"--{k}={v}" for k, v in flags.items())]
    if log_file is not None:
        # Request logging on: the JSON lines go to a file, as a real deployment's log collector would read.
        argv = ["/bin/sh", "-c", 'exec "$@" 2>>' + log_file, "sh", *argv]
    proc = Proc("sidecar", argv, env)
    wait_http(port, "/ping", proc)
    return proc, port
