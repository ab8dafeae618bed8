"""Issue 19: OAuth clients that nobody here wrote, each used as its own documentation says, against the sidecar's
authorization server (``--oauth-server``) in front of a real MCP server at ``/mcp``.

- **mcp-remote** (npm): the stdio bridge desktop assistants run (``mcp-remote URL``). The test is the assistant:
  it speaks MCP over the bridge's stdin/stdout (initialize, tools/list, tools/call). The bridge discovers,
  registers and opens the authorization URL with the system browser; ``BROWSER`` (what its ``open`` dependency's
  ``xdg-open`` uses on Linux without a desktop) and an ``xdg-open`` first on ``PATH`` are shims that hand the URL
  to the test, whose person approves it in Chromium; the browser then lands on the bridge's own loopback
  callback. It must survive an access-token expiry (short ``--oauth-access-token-ttl``) and a restart after its
  cached token expired (tokens in ``MCP_REMOTE_CONFIG_DIR``), and go back to the browser once the user revokes
  the grant on ``/oauth2/grants`` (it has no revoke of its own). Headless, ``--device-code`` logs the URL instead.
- **openid-client** (npm), run by tests/e2e/clients/openid_device.mjs: discovery through
  ``/.well-known/openid-configuration``, dynamic registration, the device flow, the ID token verified against
  ``jwks_uri``, a call, refresh, RFC 7009 revocation.
- **oidc-agent** (Debian): ``oidc-gen`` registers dynamically and runs the device flow against a private agent
  (the person types the code it prints), ``oidc-token`` hands out a token and a forced new one (a refresh) that
  curl uses on ``/mcp``; ``oidc-gen --delete`` revokes. A Deny leaves no account.

Every browser step is real Chromium (tests/e2e/chromium.py). One stack for the module: the dev provider, the
sidecar on a real redis-server, the MCP server as its own process. A missing node, npm package, oidc-agent or
curl fails with what to install; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from playwright.async_api import Browser

from sidecar.store import RedisStore
from tests.e2e import chromium as person
from tests.e2e.procs import mcp_server_process
from tests.stack import Stack, free_port, stack

HERE = Path(__file__).parent
CLIENTS = HERE / "clients"
ACCESS_TTL = 10  # seconds: --oauth-access-token-ttl (its minimum), so that a test outlives a token
pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(120)]


# --- the real parts, once for the module --------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sidecar(redis_server: str) -> AsyncIterator[Stack]:
    """The dev provider, the sidecar (Redis store) and the MCP server. The MCP server stops first: the SSE
    streams the clients opened through the sidecar then end at once, with no wait for the proxy's
    client-gone watcher."""
    store = RedisStore(aioredis.from_url(redis_server))
    settings = {
        "oauth_server": "true",
        "oauth_resource": "/mcp",
        "oauth_access_token_ttl": f"{ACCESS_TTL}s",
        "oauth_device_poll_interval": "1s",
    }
    try:
        with contextlib.ExitStack() as upstream:
            url = upstream.enter_context(mcp_server_process())
            async with stack(store, upstream=url, **settings) as st:
                yield st
                upstream.close()
    finally:
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


def npm_script(name: str, package: str) -> Path:
    """A script of ours next to the npm package it drives; fails (never skips) when the package is missing."""
    if not (CLIENTS / "node_modules" / package / "package.json").is_file():
        pytest.fail(f"{package} is not installed: run `make client-deps` (npm ci in tests/e2e/clients; make test does)")
    return CLIENTS / name


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a client run by a user with a fresh home and no desktop (no display, no session bus),
    so that nothing but the shims below can open a browser."""
    drop = ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS", "BROWSER", "DESKTOP_SESSION", "KDE_FULL_SESSION")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("XDG_", "GNOME_", "MCP_"))}
    env.update(HOME=str(home), **extra)
    return env


# --- the person at the browser ------------------------------------------------------------------------------------


class Person:
    """Alice at her browser (real Chromium, a fresh cookie jar for each errand): opens what a client hands her,
    signs in at the dev provider, continues and allows; revokes on the grants page."""

    def __init__(self, chromium_browser: Browser, base: str) -> None:
        self.browser = chromium_browser
        self.base = base

    async def open_authorization(self, url: str) -> str:
        """Open the authorization URL, sign in, Allow, and stay until the browser has loaded the client's
        redirect URI (the client's own loopback listener answers it); that page's text."""
        redirect_uri = parse_qs(urlsplit(url).query)["redirect_uri"][0]
        async with person.new_page(self.browser) as page:
            return await person.walk(page, url, lambda at, _body: at.startswith(redirect_uri))

    async def approve_device(self, verification_uri_complete: str) -> None:
        async with person.new_page(self.browser) as page:
            assert "Device connected" in await person.approve_device(page, verification_uri_complete)

    async def revoke_grant(self, client_name: str) -> None:
        """On /oauth2/grants, click Revoke on the one grant of the client with this name."""
        grants = self.base + "/oauth2/grants"
        async with person.new_page(self.browser) as page:
            await person.walk(page, grants, lambda at, body: at == grants and "Application" in body)
            row = page.locator("tr", has_text=client_name)
            assert await row.count() == 1, await person.text(page)
            await person.click_and_wait(page, f"tr:has-text({json.dumps(client_name)}) button:has-text('Revoke')")
            await page.goto(grants, wait_until="load")
            assert await page.locator("tr", has_text=client_name).count() == 0, await person.text(page)


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

    async def stderr_line_after(self, marker: str, timeout: float = 30) -> str:
        """The first line the bridge logs after the line holding ``marker`` (what a person reads in the log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [line.strip() for line in self.stderr]
            for i, line in enumerate(lines[:-1]):
                if marker in line:
                    return lines[i + 1]
            await asyncio.sleep(0.1)
        raise AssertionError(f"mcp-remote never logged {marker!r}:\n{self.log()}")

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
async def mcp_remote(server_url: str, port: int, env: dict[str, str], *flags: str) -> AsyncIterator[StdioMCP]:
    """``mcp-remote URL PORT --allow-http`` as an assistant's config would start it (http: loopback test server)."""
    command = [node(), npm_bin("mcp-remote"), server_url, str(port), "--allow-http", "--auth-timeout", "60", *flags]
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
    chromium_browser: Browser, sidecar: Stack, tmp_path: Path
) -> None:
    shim = BrowserShim(tmp_path)
    config_dir = tmp_path / "mcp-auth"
    env = clean_env(tmp_path, MCP_REMOTE_CONFIG_DIR=str(config_dir), **shim.env)
    alice = Person(chromium_browser, sidecar.base)
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
        landed = await alice.open_authorization(url)
        assert "Authorization successful" in landed, landed  # mcp-remote's own callback page
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

    # 3. The assistant is restarted later, its cached access token expired meanwhile: the new bridge process
    #    refreshes with the cached refresh token; no browser.
    await asyncio.sleep(ACCESS_TTL + 1)
    async with mcp_remote(server_url, port, env) as bridge:
        await bridge.initialize()
        assert_alice(whoami_of(await bridge.request("tools/call", {"name": "whoami", "arguments": {}})))
        third = cached_tokens(config_dir)
        assert third["refresh_token"] != second["refresh_token"], "the restarted bridge refreshed"
        assert len(shim.urls()) == 1, "the restarted bridge used its cached tokens"

        # 4. Alice revokes the grant on /oauth2/grants: the bridge's token is refused, its refresh too, and all
        #    it can do is send her to the browser again.
        client_name = json.loads(next(config_dir.glob("mcp-remote-v*/*_client_info.json")).read_text())["client_name"]
        await alice.revoke_grant(client_name)
        call = asyncio.ensure_future(bridge.request("tools/call", {"name": "whoami", "arguments": {}}, timeout=90))
        again = await shim.next_url(1)
        assert again.startswith(sidecar.base + "/oauth2/authorize?"), again
        # the same registered client, asked to authorize anew (a new state and PKCE challenge)
        renewed = parse_qs(urlsplit(again).query)
        assert renewed["client_id"] == asked["client_id"] and renewed["state"] != asked["state"], (asked, renewed)
        assert renewed["code_challenge"] != asked["code_challenge"], (asked, renewed)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, AssertionError):
            await call


async def test_mcp_remote_headless_with_its_device_code_flag(
    chromium_browser: Browser, sidecar: Stack, tmp_path: Path
) -> None:
    """``mcp-remote URL --device-code`` (no browser on this machine): it registers for the device grant, logs the
    verification URL to stderr (the assistant's log), and polls while the person approves on another device."""
    shim = BrowserShim(tmp_path)
    env = clean_env(tmp_path, MCP_REMOTE_CONFIG_DIR=str(tmp_path / "mcp-auth"), **shim.env)
    async with mcp_remote(sidecar.base + "/mcp", free_port(), env, "--device-code") as bridge:
        url = (await bridge.stderr_line_after("To authorize this client, visit:")).split()[-1]  # "[pid]   URL"
        assert url.startswith(sidecar.base + "/oauth2/device?user_code="), url
        async with person.new_page(chromium_browser) as page:
            assert "Device connected" in await person.approve_device(page, url)
        await bridge.initialize()
        assert_alice(whoami_of(await bridge.request("tools/call", {"name": "whoami", "arguments": {}})))
    assert shim.urls() == [], "the device flow never opens a browser here"
    info = json.loads(next((tmp_path / "mcp-auth").glob("mcp-remote-v*/*_client_info.json")).read_text())
    assert info["grant_types"] == ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"], info


# --- openid-client ------------------------------------------------------------------------------------------------


class LineClient:
    """A client process that reports each step as one JSON line on stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name

    async def next(self, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name} said nothing within {timeout} s") from None
        if not line:
            stderr = await self.proc.stderr.read() if self.proc.stderr else b""
            raise AssertionError(f"{self.name} exited: {stderr.decode(errors='replace')[-2000:]}")
        event = dict(json.loads(line))
        assert event["event"] != "error", event
        return event

    async def expect(self, kind: str) -> dict[str, Any]:
        event = await self.next()
        assert event["event"] == kind, event
        return event


def mcp_whoami(call: dict[str, Any]) -> dict[str, Any]:
    """The whoami result of an MCP tools/call answered over Streamable HTTP (JSON or one SSE event)."""
    assert call["status"] == 200, call
    return whoami_of(call["body"])


async def test_openid_client_discovers_by_openid_configuration_registers_and_runs_the_device_flow(
    chromium_browser: Browser, sidecar: Stack
) -> None:
    alice = Person(chromium_browser, sidecar.base)
    resource = sidecar.base + "/mcp"
    proc = await asyncio.create_subprocess_exec(
        node(),
        str(npm_script("openid_device.mjs", "openid-client")),
        sidecar.base,
        resource,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    lib = LineClient(proc, "openid-client")
    try:
        # discovery through /.well-known/openid-configuration (the library checks the issuer), registration
        registered = await lib.expect("registered")
        assert registered["issuer"] == sidecar.base and not registered["has_secret"], registered
        assert registered["device_endpoint"] == sidecar.base + "/oauth2/device_authorization", registered
        assert set(str(registered["registered_scope"]).split()) >= {"openid", "offline_access"}, registered

        # the device flow: alice opens verification_uri_complete in Chromium while the library polls
        device = await lib.expect("device")
        assert device["verification_uri"] == sidecar.base + "/oauth2/device", device
        await alice.approve_device(device["verification_uri_complete"])
        tokens = await lib.expect("tokens")
        assert tokens["access_token"].startswith("sca.") and tokens["refresh_token"].startswith("scr."), tokens
        assert 0 < tokens["expires_in"] <= ACCESS_TTL and tokens["token_type"].lower() == "bearer", tokens
        # openid was asked for: an ID token the library verified (signature against jwks_uri, iss, aud, exp)
        claims = tokens["id_token_claims"]
        assert claims and claims["iss"] == sidecar.base and claims["sub"], tokens
        assert registered["client_id"] in ([claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"])

        # the call (openid-client's fetchProtectedResource puts the bearer on), refresh (rotation), the call again
        assert_alice(mcp_whoami(await lib.expect("call")))
        refreshed = await lib.expect("refreshed")
        assert refreshed["access_token"] != tokens["access_token"], refreshed
        assert refreshed["refresh_token"] != tokens["refresh_token"], refreshed
        assert refreshed["id_token_claims"]["sub"] == claims["sub"], refreshed  # same person, checked again
        assert_alice(mcp_whoami(await lib.expect("call")))

        # RFC 7009 revocation of the refresh token ends the grant: the access token is refused with a challenge
        # naming the resource metadata, and the refresh token is dead
        await lib.expect("revoked")
        refused = (await lib.expect("call_after_revocation"))["failure"]
        assert refused and refused["status"] == 401 and refused["name"] == "WWWAuthenticateChallengeError", refused
        challenge = refused["challenges"][0]
        assert challenge["scheme"] == "bearer" and challenge["parameters"]["error"] == "invalid_token", refused
        dead = (await lib.expect("refresh_after_revocation"))["failure"]
        assert dead and dead["error"] == "invalid_grant", dead
        await lib.expect("done")
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- oidc-agent ---------------------------------------------------------------------------------------------------


def oidc_agent_binaries() -> dict[str, str]:
    found = {name: shutil.which(name) for name in ("oidc-agent", "oidc-gen", "oidc-token", "curl")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: install them (Debian: apt-get install oidc-agent-cli curl)")
    return {name: str(path) for name, path in found.items()}


async def run(*command: str, env: dict[str, str], timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{command[0]} did not finish within {timeout} s") from None
    return int(proc.returncode or 0), out.decode(errors="replace"), err.decode(errors="replace")


async def curl_mcp(curl: str, url: str, token: str, message: dict[str, Any], session: str = "") -> dict[str, Any]:
    """One MCP message with ``curl -H 'Authorization: Bearer …'``: status, headers, the JSON-RPC answer."""
    command = [curl, "-sS", "-D", "-", "-X", "POST", url, "-H", f"Authorization: Bearer {token}"]
    command += ["-H", "Content-Type: application/json", "-H", "Accept: application/json, text/event-stream"]
    if session:
        command += ["-H", f"Mcp-Session-Id: {session}"]
    code, out, err = await run(*command, "--data-binary", json.dumps(message), env=dict(os.environ))
    assert code == 0, err
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    status = int(head.split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head.split("\n")[1:])}
    events = [json.loads(ln[5:]) for ln in body.split("\n") if ln.startswith("data:")]
    answer = events[-1] if events else (json.loads(body) if body.strip().startswith("{") else body)
    return {"status": status, "headers": headers, "body": answer}


async def curl_whoami(curl: str, url: str, token: str) -> dict[str, Any]:
    """initialize, initialized, tools/call whoami: the MCP session a shell script would hold with curl."""
    hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "curl", "version": "8"}}
    init = await curl_mcp(curl, url, token, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello})
    if init["status"] != 200:
        return init
    session = init["headers"].get("mcp-session-id", "")
    await curl_mcp(curl, url, token, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
    return await curl_mcp(curl, url, token, call, session)


@contextlib.asynccontextmanager
async def oidc_agent(agent: str, home: Path) -> AsyncIterator[dict[str, str]]:
    """A private oidc-agent on the console (not daemonised: this test owns its process) with its socket in a temp
    dir; yields the environment its clients need (``OIDC_SOCK``, a fresh ``HOME`` for the account files)."""
    sock = home / "agent.sock"
    env = clean_env(home)
    log = (home / "oidc-agent.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        agent, "--console", "--socket-path", str(sock), "--quiet",
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.returncode is not None or time.monotonic() > deadline:
                said = (home / "oidc-agent.log").read_text(errors="replace")
                raise AssertionError(f"oidc-agent did not open its socket: {said}")
            await asyncio.sleep(0.05)
        yield {**env, "OIDC_SOCK": str(sock), "OIDC_ENCRYPTION_PW": "e2e-account-password"}
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        log.close()


async def oidc_gen_device(
    gen_bin: str, env: dict[str, str], browser: Browser, base: str, account: str, decision: str = "approve"
) -> tuple[int, str]:
    """``oidc-gen`` as its man page has it for a headless machine: dynamic registration at the issuer it
    discovers (/.well-known/openid-configuration), the device flow, the account password from the environment.
    The person reads the URL and the code off the terminal and answers in Chromium. (exit code, output)."""
    gen = await asyncio.create_subprocess_exec(
        gen_bin, account, f"--iss={base}", "--flow=device", "--scope=openid offline_access",
        "--pw-env", "--no-url-call", "--prompt=none", "--confirm-default",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    shown = ""
    try:
        assert gen.stdout is not None
        while "enter the code:" not in shown:
            line = await asyncio.wait_for(gen.stdout.readline(), 30)
            if not line:
                raise AssertionError(f"oidc-gen stopped before showing a code:\n{shown}")
            shown += line.decode(errors="replace")
        words = shown.split()
        verification_uri = next(w for w in words if w.startswith(base))
        user_code = words[words.index("code:") + 1]
        assert verification_uri == base + "/oauth2/device", shown
        async with person.new_page(browser) as page:
            done = await person.approve_device(page, verification_uri, decision=decision, user_code=user_code)
        assert ("Device connected" if decision == "approve" else "Access denied") in done, done
        rest, _ = await asyncio.wait_for(gen.communicate(), 30)
        return int(gen.returncode or 0), shown + rest.decode(errors="replace")
    finally:
        if gen.returncode is None:
            gen.kill()
            await gen.wait()


async def test_oidc_agent_registers_runs_the_device_flow_and_hands_out_refreshed_tokens_curl_uses(
    chromium_browser: Browser, sidecar: Stack, tmp_path: Path
) -> None:
    bins = oidc_agent_binaries()
    resource = sidecar.base + "/mcp"
    async with oidc_agent(bins["oidc-agent"], tmp_path) as env:
        code, shown = await oidc_gen_device(bins["oidc-gen"], env, chromium_browser, sidecar.base, "sidecar")
        assert code == 0, shown

        # oidc-token hands out the access token; curl calls the MCP server with it
        code, first, err = await run(bins["oidc-token"], "sidecar", env=env)
        assert code == 0 and first.strip().startswith("sca."), (first, err)
        assert_alice(mcp_whoami(await curl_whoami(bins["curl"], resource, first.strip())))

        # a new access token, from the refresh token the agent holds (-f: force a new one); curl again
        code, second, err = await run(bins["oidc-token"], "--force-new", "sidecar", env=env)
        assert code == 0 and second.strip().startswith("sca.") and second != first, (first, second, err)
        assert_alice(mcp_whoami(await curl_whoami(bins["curl"], resource, second.strip())))

        # deleting the account revokes its refresh token (RFC 7009): the grant ends, the last token is refused
        code, out, err = await run(
            bins["oidc-gen"], "--delete", "sidecar", "--pw-env", "--prompt=none", "--confirm-yes", env=env
        )
        assert code == 0 and "deleted" in out.lower(), (out, err)
        refused = await curl_mcp(bins["curl"], resource, second.strip(), {"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert refused["status"] == 401, refused
        assert 'error="invalid_token"' in refused["headers"].get("www-authenticate", ""), refused


async def test_oidc_agent_when_the_person_denies_gets_no_account_and_no_token(
    chromium_browser: Browser, sidecar: Stack, tmp_path: Path
) -> None:
    bins = oidc_agent_binaries()
    async with oidc_agent(bins["oidc-agent"], tmp_path) as env:
        code, shown = await oidc_gen_device(
            bins["oidc-gen"], env, chromium_browser, sidecar.base, "denied", decision="deny"
        )
        assert code != 0 and "access_denied" in shown.replace(" ", "_").lower(), shown
        code, out, err = await run(bins["oidc-token"], "denied", env=env)
        assert code != 0 and not out.strip(), (out, err)
        assert not (tmp_path / ".oidc-agent" / "denied").exists() and not (tmp_path / ".config").exists()
