"""nginx in front: ``auth_request`` to the sidecar (or the bare 202 handler), then proxy to the app.

The shipped ``deploy/nginx/sidecar.conf`` is used, rendered by the e2e tests' helper
(``tests/e2e/nginx.py``) or, failing that, by ``render_shipped``. Without it, ``MINIMAL`` is
used: the usual oauth2-proxy style setup (keep-alive upstreams, an internal ``/oauth2/auth``
location without the request body, identity headers copied with ``auth_request_set``).
"""

from __future__ import annotations

import atexit
import re
import shutil
from pathlib import Path

from .procs import ROOT, Proc, binary, wait_port, workdir

SHIPPED = ROOT / "deploy" / "nginx" / "sidecar.conf"
CACHE_CONF = ROOT / "deploy" / "nginx" / "auth-cache.conf"
_ZONE_LINE = re.compile(r"^# (proxy_cache_path \S+ (.*))$", re.M)
_INCLUDE_LINE = "# include /etc/nginx/auth-cache.conf;"
_SIDECAR_KEEPALIVE = re.compile(r"(upstream sidecar \{[^}]*?keepalive )(\d+);")


def variant(text: str, cache_dir: Path | None = None, keepalive: int | None = None) -> str:
    """The shipped config with the documented auth cache turned on (its two commented lines, the cache under
    ``cache_dir``) and/or another keepalive pool to the sidecar. Fails when the shipped file lost the lines."""
    if cache_dir is not None:
        zones = _ZONE_LINE.findall(text)
        if len(zones) != 1 or text.count(_INCLUDE_LINE) != 1:
            raise RuntimeError("sidecar.conf no longer carries the commented auth cache lines")
        whole, rest = zones[0]
        text = text.replace("# " + whole, f"proxy_cache_path {cache_dir} {rest}")
        text = text.replace(_INCLUDE_LINE, CACHE_CONF.read_text())
    if keepalive is not None:
        text, count = _SIDECAR_KEEPALIVE.subn(rf"\g<1>{keepalive};", text)
        if count != 1:
            raise RuntimeError("sidecar.conf: no keepalive in upstream sidecar")
    return text


def shipped_keepalive() -> int:
    match = _SIDECAR_KEEPALIVE.search(SHIPPED.read_text())
    return int(match.group(2)) if match else 0


# The main-context wrapper the bench needs to run nginx unprivileged-ish in a temp prefix.
MAIN = """
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http}
}}
"""

MINIMAL = """
    upstream bench_auth {{ server 127.0.0.1:{auth_port}; keepalive 64; }}
    upstream bench_app {{ server 127.0.0.1:{app_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{listen_port};
        location /oauth2/ {{
            proxy_pass http://bench_auth;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
        location = /oauth2/auth {{
            internal;
            proxy_pass http://bench_auth;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Host $host;
            proxy_set_header X-Original-URI $request_uri;
        }}
        location / {{
            auth_request /oauth2/auth;
            error_page 401 = /oauth2/sign_in;
            auth_request_set $user $upstream_http_x_auth_request_user;
            auth_request_set $email $upstream_http_x_auth_request_email;
            auth_request_set $groups $upstream_http_x_auth_request_groups;
            proxy_set_header X-User $user;
            proxy_set_header X-Email $email;
            proxy_set_header X-Groups $groups;
            proxy_pass http://bench_app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
"""


def render_shipped(text: str, listen_port: int, auth_port: int, app_port: int) -> str | None:
    """The shipped config with the bench's addresses, or None when its shape is not recognised.

    Upstream blocks are matched by their name: one containing "sidecar"/"oauth"/"auth" gets the
    auth service, any other the app; ``listen`` lines get the bench's port on loopback."""
    upstreams = re.findall(r"upstream\s+(\S+)\s*\{", text)
    if not upstreams or "auth_request" not in text:
        return None

    def server_for(match: re.Match[str]) -> str:
        name = match.group(1)
        port = auth_port if re.search(r"sidecar|oauth|auth", name) else app_port
        body = re.sub(r"server\s+[^;]+;", f"server 127.0.0.1:{port};", match.group(2))
        return f"upstream {name} {{{body}}}"

    out = re.sub(r"upstream\s+(\S+)\s*\{([^}]*)\}", server_for, text)
    out = re.sub(r"listen\s+[^;]+;", f"listen 127.0.0.1:{listen_port};", out)
    out = re.sub(r"^\s*(ssl_\w+|access_log|error_log)\s[^;]*;", "", out, flags=re.M)
    if out.count(f"listen 127.0.0.1:{listen_port};") != 1:
        return None
    return out


def config_text(prefix: Path, listen_port: int, auth_port: int, app_port: int, workers: int) -> tuple[str, str]:
    """(nginx.conf text, which template was used)."""
    http, source = None, "minimal equivalent in tests/bench/nginx.py"
    if SHIPPED.exists():
        http = render_shipped(SHIPPED.read_text(), listen_port, auth_port, app_port)
        source = "deploy/nginx/sidecar.conf" if http else source + " (shipped config not recognised)"
    if http is None:
        http = MINIMAL.format(listen_port=listen_port, auth_port=auth_port, app_port=app_port)
    return MAIN.format(workers=workers, prefix=prefix, http=http), source


def start(
    listen_port: int,
    auth_port: int,
    app_port: int,
    workers: int = 1,
    cache: bool = False,
    keepalive: int | None = None,
    lean_port: int | None = None,
) -> tuple[Proc, str]:
    """nginx on ``listen_port``: the shipped config as the e2e tests render it when possible; ``cache`` turns on
    the documented auth cache (deploy/nginx/auth-cache.conf, its files on /dev/shm), ``keepalive`` another pool."""
    prefix = workdir() / f"nginx-{listen_port}"
    prefix.mkdir()
    error_log = str(prefix / "error.log")
    cache_dir = None
    if cache:
        shm = Path("/dev/shm")
        cache_dir = (shm if shm.is_dir() else prefix) / f"sidecar-bench-auth-cache-{listen_port}"
        atexit.register(shutil.rmtree, cache_dir, True)  # tmpfs outside the run's directory
    try:
        from tests.e2e.procs import nginx_main_conf, render_nginx_conf  # the e2e tests' renderer

        server = prefix / "sidecar.conf"
        text = variant(SHIPPED.read_text(), cache_dir, keepalive)
        auth = f"127.0.0.1:{lean_port or auth_port}"  # the shipped config's auth subrequests (--auth-address)
        server.write_text(
            render_nginx_conf(listen_port, f"127.0.0.1:{auth_port}", f"127.0.0.1:{app_port}", text, auth=auth)
        )
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_main_conf(prefix, server, prefix, workers))
        argv = [binary("nginx"), "-p", str(prefix), "-e", error_log, "-c", str(conf)]
        source = "deploy/nginx/sidecar.conf, rendered by tests/e2e/procs.py"
        if lean_port is None:
            source += ", auth subrequests to the main listener"
        if cache:
            source += " + auth-cache.conf (tmpfs)"
        if keepalive is not None:
            source += f", keepalive {keepalive}"
    except (ImportError, AssertionError, OSError):
        if cache or keepalive is not None:
            raise
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir(exist_ok=True)
        text, source = config_text(prefix, listen_port, auth_port, app_port, workers)
        conf = prefix / "nginx.conf"
        conf.write_text(text)
        argv = [binary("nginx"), "-p", str(prefix), "-e", error_log, "-c", str(conf), "-g", "daemon off;"]
    proc = Proc("nginx", argv)
    wait_port(listen_port, proc)
    return proc, source
