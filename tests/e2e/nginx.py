"""Run the shipped deploy/nginx/sidecar.conf with the distro's nginx on private ports."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.redis_procs import require

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "sidecar.conf"


def render(workdir: Path, port: int, sidecar: str, app: str) -> Path:
    """A private copy of the shipped server block, wrapped in a minimal top-level config."""
    server = SHIPPED.read_text()
    for shipped, ours in (
        ("127.0.0.1:4180", sidecar),
        ("127.0.0.1:8080", app),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
    ):
        assert shipped in server, f"the shipped config no longer contains {shipped!r}"
        server = server.replace(shipped, ours)
    (workdir / "sidecar.conf").write_text(server)
    temp = {name: workdir / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {workdir}/sidecar.conf;
}}
""")
    return conf


class Nginx:
    def __init__(self, workdir: Path, port: int, sidecar: str, app: str) -> None:
        self.workdir = workdir
        self.base = f"http://127.0.0.1:{port}"
        conf = render(workdir, port, sidecar, app)
        binary = require("nginx", "nginx")
        check = subprocess.run(
            [binary, "-t", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(
            [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not start: " + (workdir / "error.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
