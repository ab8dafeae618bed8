"""Issue 19: OAuth clients that nobody here wrote, each used as its own documentation says, against the sidecar's
authorization server (``--oauth-server``) in front of a real MCP server at ``/mcp``.

- **mcp-remote** (npm): the stdio bridge desktop assistants run (``mcp-remote URL``). The test is the assistant:
  it speaks MCP over the bridge's stdin/stdout (initialize, tools/list, tools/call). The bridge discovers,
  registers and opens the authorization URL with the system browser; ``BROWSER`` (what its ``open`` dependency's
  ``xdg-open`` uses on Linux without a desktop) and an ``xdg-open`` first on ``PATH`` are shims that hand the URL
  to the test, whose person approves it in the browser; the browser then lands on the bridge's own loopback
  callback. It must survive an access-token expiry (short ``--oauth-access-token-ttl``) and its own restart
  (tokens cached in ``MCP_REMOTE_CONFIG_DIR``), and go back to the browser once the user revokes the grant.
- **openid-client** (npm), run by tests/e2e/clients/openid_device.mjs: discovery through
  ``/.well-known/openid-configuration``, dynamic registration, the device flow, a call, refresh, revocation.
- **oidc-agent** (Debian): ``oidc-gen`` registers dynamically and runs the device flow against a private agent,
  ``oidc-token`` hands out a token (refreshed when asked for a longer life) that curl uses on ``/mcp``.

One stack for the module: the dev provider, the sidecar on a real redis-server, the MCP server as its own process.
A missing node, npm package or oidc-agent binary fails with what to install; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from sidecar.store import RedisStore
from tests.e2e.oauth_browser import approve_device, follow_to, forms, submit
from tests.stack import Stack, browser, free_port, sign_in, stack

HERE = Path(__file__).parent
CLIENTS = HERE / "clients"
MCP_SERVER = HERE / "mcp" / "server.py"
ACCESS_TTL = 10  # seconds: --oauth-access-token-ttl (its minimum), so that a test outlives a token
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]


# --- the real parts, once for the module --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[str]:
    """The MCP server (Python SDK's ``MCPServer``) in its own process, the upstream behind ``/mcp``."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(MCP_SERVER), "--port", str(port), "--allowed-host", "127.0.0.1:*"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError("MCP server exited:\n" + (proc.stdout.read().decode() if proc.stdout else ""))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("MCP server did not start within 20 s") from None
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/"
    proc.terminate()
    proc.wait(timeout=10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sidecar(redis_server: str, mcp_server: str) -> AsyncIterator[Stack]:
    store = RedisStore(aioredis.from_url(redis_server))
    settings = {
        "upstream": mcp_server,
        "oauth_server": "true",
        "oauth_resource": "/mcp",
        "oauth_access_token_ttl": f"{ACCESS_TTL}s",
        "oauth_device_poll_interval": "1s",
    }
    async with stack(store, **settings) as st:
        yield st
    await store.close()


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is not installed: install Node.js 20+ (Debian: apt-get install nodejs npm), then `make test`")
    return found


def npm_bin(name: str) -> str:
    """A client installed from tests/e2e/clients/package-lock.json; fails (never skips) when it is not."""
    path = CLIENTS / "node_modules" / ".bin" / name
    if not path.exists():
        pytest.fail(f"{name} is not installed: run `make client-deps` (npm ci in tests/e2e/clients; make test does)")
    return str(path)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a client run by a user with a fresh home and no desktop (no display, no session bus),
    so that nothing but the shims below can open a browser."""
    drop = ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS", "BROWSER", "DESKTOP_SESSION", "KDE_FULL_SESSION")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("XDG_", "GNOME_", "MCP_"))}
    env.update(HOME=str(home), **extra)
    return env


# --- the person at the browser ------------------------------------------------------------------------------------


class Person:
    """Alice at her browser: opens what a client hands her, signs in, allows."""

    def __init__(self, base: str) -> None:
        self.base = base

    async def open_authorization(self, url: str) -> None:
        """Open the authorization URL, click Allow, and let the browser land on the client's redirect URI."""
        redirect_uri = parse_qs(urlsplit(url).query)["redirect_uri"][0]
        async with browser() as b:
            await sign_in(b, self.base, rd="/oauth2/userinfo")
            async with b.get(url, allow_redirects=False) as resp:
                page = await resp.text()
                assert resp.status == 200, f"consent page expected, got {resp.status}: {page[:300]}"
            resp = await submit(b, url, page, {"decision": "approve"})
            answer = await follow_to(b, resp, redirect_uri)
            callback = redirect_uri + "?" + "&".join(f"{k}={v}" for k, v in answer.items())
            async with aiohttp.ClientSession() as c, c.get(callback) as landed:
                assert landed.status == 200, await landed.text()

    async def approve_device(self, verification_uri_complete: str) -> None:
        async with browser() as b:
            assert "Device connected" in await approve_device(b, verification_uri_complete)

    async def revoke_grant(self, client_name: str) -> None:
        """On /oauth2/grants, revoke the one grant of the client with this name."""
        async with browser() as b:
            await sign_in(b, self.base, rd="/oauth2/userinfo")
            async with b.get(self.base + "/oauth2/grants", headers={"Accept": "application/json"}) as resp:
                page = await resp.json()
            mine = [g for g in page["grants"] if g["client_name"] == client_name]
            assert len(mine) == 1, page["grants"]
            data = {"csrf": page["csrf"], "grant_id": mine[0]["grant_id"]}
            headers = {"Origin": self.base, "Accept": "application/json"}
            async with b.post(self.base + "/oauth2/grants/revoke", data=data, headers=headers) as resp:
                assert resp.status == 200, await resp.text()


# --- mcp-remote ---------------------------------------------------------------------------------------------------

SHIM = """#!/bin/sh
# the system browser, as far as the client can tell: hands the URL to the test
printf '%s\\n' "$1" >> "$SIDECAR_TEST_BROWSER_LOG"
"""


class BrowserShim:
    """``BROWSER`` and an ``xdg-open`` first on ``PATH``, both writing the URL they are given to a file."""

    def __init__(self, root: Path) -> None:
        bindir = root / "bin"
        bindir.mkdir()
        for name in ("xdg-open", "browser"):
            path = bindir / name
            path.write_text(SHIM)
            path.chmod(path.stat().st_mode | stat.S_IXUSR)
        self.log = root / "browser.log"
        self.log.touch()
        self.env = {
            "BROWSER": str(bindir / "browser"),
            "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
            "SIDECAR_TEST_BROWSER_LOG": str(self.log),
        }

    def urls(self) -> list[str]:
        return self.log.read_text().split()

    async def next_url(self, seen: int, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while len(urls := self.urls()) <= seen:
            if time.monotonic() > deadline:
                raise AssertionError("the client never opened a browser")
            await asyncio.sleep(0.1)
        return urls[seen]


class StdioMCP:
    """The desktop assistant's side of a stdio MCP server (here: the mcp-remote bridge)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.next_id = 0
        self.stderr: list[str] = []
        self._drain = asyncio.ensure_future(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace"))

    def log(self) -> str:
        return "".join(self.stderr[-60:])

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        await self.proc.stdin.drain()

    async def request(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        self.next_id += 1
        await self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}})
        assert self.proc.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            except TimeoutError:
                raise AssertionError(f"no answer to {method} within {timeout} s; mcp-remote:\n{self.log()}") from None
            if not line:
                await asyncio.sleep(0.2)
                raise AssertionError(f"mcp-remote exited during {method}:\n{self.log()}")
            message = json.loads(line)
            if message.get("id") == self.next_id:
                return dict(message)

    async def initialize(self) -> dict[str, Any]:
        params = {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "sidecar-e2e-assistant", "version": "1"},
        }
        answer = await self.request("initialize", params)
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return answer

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._drain.cancel()


@contextlib.asynccontextmanager
async def mcp_remote(server_url: str, port: int, env: dict[str, str]) -> AsyncIterator[StdioMCP]:
    """``mcp-remote URL PORT --allow-http`` as an assistant's config would start it (http: loopback test server)."""
    command = [node(), npm_bin("mcp-remote"), server_url, str(port), "--allow-http", "--auth-timeout", "60"]
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    bridge = StdioMCP(proc)
    try:
        yield bridge
    finally:
        await bridge.close()


def whoami_of(answer: dict[str, Any]) -> dict[str, Any]:
    assert "result" in answer, answer
    result = answer["result"]
    assert not result.get("isError"), result
    data = result.get("structuredContent") or json.loads(result["content"][0]["text"])
    return dict(data.get("result", data))


def assert_alice(seen: dict[str, Any]) -> None:
    """The MCP server saw alice through the sidecar's identity headers, and never a sidecar token."""
    assert seen["identity"].get("x-forwarded-email") == "alice@example.com", seen
    assert seen["sidecar_token_seen"] is False, seen


def cached_tokens(config_dir: Path) -> dict[str, Any]:
    found = list(config_dir.glob("mcp-remote-v*/*_tokens.json"))
    assert len(found) == 1, found
    return dict(json.loads(found[0].read_text()))


async def test_mcp_remote_bridge_signs_in_calls_refreshes_restarts_and_is_sent_back_after_revocation(
    sidecar: Stack, tmp_path: Path
) -> None:
    shim = BrowserShim(tmp_path)
    config_dir = tmp_path / "mcp-auth"
    env = clean_env(tmp_path, MCP_REMOTE_CONFIG_DIR=str(config_dir), **shim.env)
    person = Person(sidecar.base)
    server_url = sidecar.base + "/mcp"
    port = free_port()

    async with mcp_remote(server_url, port, env) as bridge:
        # 1. The bridge gets the 401, discovers, registers, opens the browser; alice allows in the browser,
        #    which lands on the bridge's loopback callback; then the assistant's MCP session goes through.
        url = await shim.next_url(0)
        asked = parse_qs(urlsplit(url).query)
        assert url.startswith(sidecar.base + "/oauth2/authorize?"), url
        assert asked["code_challenge_method"] == ["S256"] and asked["resource"] == [server_url], asked
        assert asked["redirect_uri"][0].startswith(("http://localhost:", "http://127.0.0.1:")), asked
        await person.open_authorization(url)
        init = await bridge.initialize()
        assert init["result"]["serverInfo"]["name"] == "sidecar-e2e", init
        tools = await bridge.request("tools/list")
        assert "whoami" in [t["name"] for t in tools["result"]["tools"]], tools
        assert_alice(whoami_of(await bridge.request("tools/call", {"name": "whoami", "arguments": {}})))
        first = cached_tokens(config_dir)
        assert first["access_token"].startswith("sca.") and first["refresh_token"].startswith("scr."), first

        # 2. Past the access token's life the next call still works: the bridge refreshed (rotation), no browser.
        await asyncio.sleep(ACCESS_TTL + 1)
        assert_alice(whoami_of(await bridge.request("tools/call", {"name": "whoami", "arguments": {}})))
        second = cached_tokens(config_dir)
        assert second["access_token"] != first["access_token"], "a new access token"
        assert second["refresh_token"] != first["refresh_token"], "the refresh token rotated"
        assert len(shim.urls()) == 1, "refreshed, not sent to the browser again"

    # 3. The assistant restarts the bridge: the cached tokens carry the new process, no browser.
    async with mcp_remote(server_url, port, env) as bridge:
        await bridge.initialize()
        assert_alice(whoami_of(await bridge.request("tools/call", {"name": "whoami", "arguments": {}})))
        assert len(shim.urls()) == 1, "the restarted bridge used its cached tokens"

        # 4. Alice revokes the grant on /oauth2/grants: the bridge's token is refused, its refresh too, and all
        #    it can do is send her to the browser again.
        client_name = json.loads(next(config_dir.glob("mcp-remote-v*/*_client_info.json")).read_text())["client_name"]
        await person.revoke_grant(client_name)
        call = asyncio.ensure_future(bridge.request("tools/call", {"name": "whoami", "arguments": {}}, timeout=90))
        again = await shim.next_url(1)
        assert again.startswith(sidecar.base + "/oauth2/authorize?"), again
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, AssertionError):
            await call
