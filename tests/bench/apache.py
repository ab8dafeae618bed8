"""The C peer: Apache httpd + mod_auth_openidc as a reverse proxy in front of the same app.

Configured against the same development provider, signed in once for real (authorization code
flow through the provider's auto-login), then hammered with that session cookie like the sidecar.
``available()`` says why the peer cannot run (not installed: ``apt-get install apache2
libapache2-mod-auth-openidc``) instead of failing the bench.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
from pathlib import Path

import aiohttp

from .procs import Proc, free_port, wait_port, workdir

APACHE = "/usr/sbin/apache2"
MODULES = Path("/usr/lib/apache2/modules")
NEEDED = (
    "mod_mpm_event.so",
    "mod_authn_core.so",
    "mod_authz_core.so",
    "mod_authz_user.so",
    "mod_proxy.so",
    "mod_proxy_http.so",
)
OPENIDC = "mod_auth_openidc.so"
COOKIE = "mod_auth_openidc_session"


def available() -> str | None:
    """None when Apache and mod_auth_openidc are installed, else the reason they are not."""
    binary = shutil.which("apache2") or (APACHE if Path(APACHE).exists() else None)
    if binary is None:
        return "apache2 not installed (apt-get install apache2 libapache2-mod-auth-openidc)"
    missing = [m for m in (*NEEDED, OPENIDC) if not (MODULES / m).exists()]
    if missing:
        return f"Apache modules missing: {', '.join(missing)} (apt-get install libapache2-mod-auth-openidc)"
    return None


def _user() -> str:
    """Apache as root needs an unprivileged user for its children; the distro package creates www-data."""
    for name in ("www-data", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return "nobody"


def _mpm(processes: int | None) -> str:
    """The distro's mpm_event defaults (mods-available/mpm_event.conf), or exactly ``processes`` child
    processes of 25 threads each (ServerLimit caps them), for a run at the sidecar's process count."""
    if processes is None:
        return """# The distro's mpm_event defaults (mods-available/mpm_event.conf), stated so the run is reproducible.
StartServers 2
MinSpareThreads 25
MaxSpareThreads 75
ThreadLimit 64
ThreadsPerChild 25
MaxRequestWorkers 150"""
    return f"""# {processes} child process(es) of 25 threads: the same process count as the sidecar it is compared with.
ServerLimit {processes}
StartServers {processes}
MinSpareThreads 1
MaxSpareThreads {25 * processes}
ThreadLimit 64
ThreadsPerChild 25
MaxRequestWorkers {25 * processes}"""


def config(prefix: Path, port: int, issuer: str, app_port: int, processes: int | None = None) -> str:
    loads = "\n".join(f"LoadModule {m[4:-3]}_module {MODULES / m}" for m in NEEDED if m != "mod_mpm_event.so")
    user = f"User {_user()}\nGroup {_user() if _user() != 'nobody' else 'nogroup'}" if os.geteuid() == 0 else ""
    return f"""
ServerRoot {prefix}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {prefix}/httpd.pid
ErrorLog {prefix}/error.log
LogLevel warn
{user}
LoadModule mpm_event_module {MODULES / "mod_mpm_event.so"}
{loads}
LoadModule auth_openidc_module {MODULES / OPENIDC}
{_mpm(processes)}
MaxConnectionsPerChild 0
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 5

OIDCProviderMetadataURL {issuer}/.well-known/openid-configuration
OIDCClientID sidecar-dev
OIDCClientSecret sidecar-dev-secret
OIDCRedirectURI http://127.0.0.1:{port}/redirect_uri
OIDCCryptoPassphrase bench-apache-passphrase-0123456789
OIDCScope "openid email profile"
OIDCPKCEMethod S256
OIDCSSLValidateServer Off
OIDCSessionInactivityTimeout 3600
OIDCRemoteUserClaim email
OIDCPassClaimsAs headers
OIDCCookieSameSite On

ProxyPass /redirect_uri !
ProxyPass / http://127.0.0.1:{app_port}/ keepalive=On
<Location />
    AuthType openid-connect
    Require valid-user
</Location>
"""


def start(issuer: str, app_port: int, processes: int | None = None) -> tuple[Proc, int]:
    port = free_port()
    prefix = workdir() / f"apache-{port}"
    prefix.mkdir()
    prefix.chmod(0o755)
    conf = prefix / "httpd.conf"
    conf.write_text(config(prefix, port, issuer, app_port, processes))
    proc = Proc("apache", [APACHE, "-d", str(prefix), "-f", str(conf), "-DFOREGROUND"], env={"LANG": "C"})
    wait_port(port, proc)
    return proc, port


async def _sign_in(port: int, path: str) -> str:
    """The browser round trip through Apache: 302 to the provider, auto-login, code back to Apache."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        async with client.get(f"http://127.0.0.1:{port}{path}", headers={"Accept": "text/html"}) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"Apache sign-in ended with {resp.status}: {body[:300]!r}")
        value = next((c.value for c in client.cookie_jar if c.key == COOKIE), None)
    if not value:
        raise RuntimeError("Apache sign-in set no session cookie")
    return value


def sign_in(port: int, path: str = "/app/page") -> str:
    return asyncio.run(_sign_in(port, path))
