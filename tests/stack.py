"""Helpers that start real parts for tests: the dev provider, sidecars, the demo upstream."""

from __future__ import annotations

import html
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.app import build_app
from sidecar.config import Config, build_config
from sidecar.dev.demo_app import demo_app
from sidecar.dev.provider import DevProvider, run_provider
from sidecar.hits import HitFirstSite
from sidecar.store import SessionStore
from tests.redis_procs import free_ports

COOKIE_SECRET = "test-cookie-secret-0123456789abcdef"


def free_port() -> int:
    """A free loopback port below the ephemeral range (see ``tests.redis_procs.free_ports``)."""
    return free_ports(1)[0]


def sidecar_settings(issuer: str, port: int, upstream: str | None = None, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "http_address": f"127.0.0.1:{port}",
        "oidc_issuer_url": issuer,
        "client_id": "sidecar-dev",
        "client_secret": "sidecar-dev-secret",
        "redirect_url": f"http://127.0.0.1:{port}/oauth2/callback",
        "cookie_secret": COOKIE_SECRET,
        "cookie_secure": "false",
        "upstream": upstream if upstream is not None else "",
        "request_logging": "false",
        "provider_timeout": "2s",
        "provider_retries": "1",
        "email_domain": "*",
    }
    settings.update(overrides)
    return settings


@dataclass
class Stack:
    """A provider, an upstream and one or more sidecars, all on loopback."""

    provider: DevProvider
    issuer: str
    upstream_url: str
    sidecars: list[str] = field(default_factory=list)
    runners: list[web.AppRunner] = field(default_factory=list)
    configs: list[Config] = field(default_factory=list)
    provider_runner: web.AppRunner | None = None  # stop it (and start a new one on its port) for an outage

    @property
    def base(self) -> str:
        return self.sidecars[0]

    async def add_sidecar(self, store: SessionStore | None = None, **overrides: Any) -> str:
        port = free_port()
        upstream = overrides.pop("upstream", self.upstream_url + "/")
        config = build_config(sidecar_settings(self.issuer, port, upstream, **overrides))
        runner = web.AppRunner(build_app(config, store=store), access_log=None)
        await runner.setup()
        # the sidecar's own site (sidecar/__main__.py): decision-cache hits answered before aiohttp's machinery
        await HitFirstSite(runner, socket.create_server(("127.0.0.1", port))).start()
        self.runners.append(runner)
        self.configs.append(config)
        base = f"http://127.0.0.1:{port}"
        self.sidecars.append(base)
        return base


@asynccontextmanager
async def stack(
    store: SessionStore | None = None,
    *,
    sidecar: bool = True,
    provider_kw: dict[str, Any] | None = None,
    **overrides: Any,
) -> AsyncIterator[Stack]:
    provider_port = free_port()
    provider_runner, provider = await run_provider(
        "127.0.0.1", provider_port, auto_login="alice", **(provider_kw or {})
    )
    upstream_runner = web.AppRunner(demo_app(), access_log=None)
    await upstream_runner.setup()
    upstream_port = free_port()
    await web.TCPSite(upstream_runner, "127.0.0.1", upstream_port).start()
    st = Stack(
        provider=provider,
        issuer=f"http://127.0.0.1:{provider_port}",
        upstream_url=f"http://127.0.0.1:{upstream_port}",
        provider_runner=provider_runner,
    )
    try:
        if sidecar:
            await st.add_sidecar(store, **overrides)
        yield st
    finally:
        for runner in reversed(st.runners):
            await runner.cleanup()
        await upstream_runner.cleanup()
        if st.provider_runner is not None:
            await st.provider_runner.cleanup()


def browser() -> aiohttp.ClientSession:
    """A client with a cookie jar that accepts cookies from 127.0.0.1, like a browser would."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(client: aiohttp.ClientSession, base: str, rd: str = "/_demo/echo") -> aiohttp.ClientResponse:
    """The whole browser round trip: start -> provider (auto login) -> callback -> rd."""
    async with client.get(f"{base}/oauth2/start", params={"rd": rd}, headers={"Accept": "text/html"}) as resp:
        await resp.read()
        return resp


async def sign_out_everywhere(
    client: aiohttp.ClientSession, base: str, headers: dict[str, str] | None = None, form: dict[str, str] | None = None
) -> int:
    """What a person does: open the "sign out everywhere" confirmation, press its button (the form's action and
    CSRF token, plus ``form``); the status of that POST."""
    async with client.get(f"{base}/oauth2/sign_out?everywhere=true") as resp:
        page = await resp.text()
    found = re.search(r"<form method='post' action='([^']*)'>", page)
    assert found, page
    token = re.search(r"name='csrf' value='([^']*)'", page)
    data = {**({"csrf": html.unescape(token.group(1))} if token else {}), **(form or {})}
    action = base + html.unescape(found.group(1))
    async with client.post(action, data=data, headers=headers or {}, allow_redirects=False) as resp:
        return resp.status


def session_cookie(client: aiohttp.ClientSession, name: str = "_sidecar") -> str | None:
    for cookie in client.cookie_jar:
        if cookie.key == name:
            return cookie.value
    return None


class SidecarProcess:
    """A real `python -m sidecar` process, configured through SIDECAR_* environment variables."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import os
        import subprocess
        import sys
        import tempfile

        self.base = "http://" + settings["http_address"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env.update({"SIDECAR_" + k.upper(): str(v) for k, v in settings.items()})
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "sidecar"], env=env, stdout=self.log, stderr=self.log)

    async def ready(self, timeout: float = 15.0) -> SidecarProcess:
        import asyncio
        import time

        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    async with client.get(self.base + "/ping") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"sidecar process did not come up:\n{self.output()[-3000:]}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        self.log.close()


async def app_token(client: aiohttp.ClientSession, base: str, cookies: dict[str, str] | None = None) -> str | None:
    """The access token the app receives on a proxied request (``--pass-access-token``). A sidecar
    with upstreams never puts tokens on ``/oauth2/auth``: a page's script could read them there."""
    async with client.get(f"{base}/_demo/echo", cookies=cookies) as resp:
        if resp.status != 200:
            return None
        headers = (await resp.json())["headers"]
    return next((v for k, v in headers.items() if k.lower() == "x-forwarded-access-token"), None)
