"""Issue 11 proven with the OFFICIAL MCP SDKs: unmodified clients against a real MCP server behind the sidecar.

The Python SDK (``mcp``: ``OAuthClientProvider`` over ``httpx2``) and the TypeScript SDK
(``@modelcontextprotocol/sdk``: ``StreamableHTTPClientTransport`` + ``auth()``, run by node from
tests/e2e/mcp/client.mjs) each: get the 401 on ``/mcp``, discover the resource and authorization server
metadata, register dynamically, send the user's browser (real Chromium, tests/e2e/chromium.py) through the
upstream sign-in, the consent page (Allow clicked) and the grant's upstream sign-in, exchange the code, call
the ``whoami`` tool (which reports the identity headers the MCP server received and whether a sidecar token
reached it), survive access-token expiry by refreshing, and are refused once the user clicks Revoke on
``/oauth2/grants`` in the same browser.

Everything is real: redis-server, the dev OIDC provider over HTTP, the MCP server as its own process (the
Python SDK's ``MCPServer`` with DNS-rebinding protection on), node for the TypeScript SDK. A missing node or
an un-installed npm package fails with what to run; it never skips.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlsplit

import aiohttp
import httpx2
import pytest
import redis.asyncio as aioredis
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from playwright.async_api import Page
from pydantic import AnyUrl

from sidecar.store import RedisStore
from tests.e2e import chromium as person
from tests.e2e.procs import mcp_server_process
from tests.stack import free_port, stack

MCP_DIR = Path(__file__).parent / "mcp"
ACCESS_TTL = 10  # seconds: --oauth-access-token-ttl (its minimum), so that the test outlives a token
pytestmark = pytest.mark.timeout(150)


# --- the real parts ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[str]:
    """The MCP server (upstream) in its own process."""
    with mcp_server_process() as url:
        yield url


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(aioredis.from_url(redis_url))
    yield store
    await store.close()


def oauth_settings(upstream: str) -> dict[str, Any]:
    return {
        "upstream": upstream,
        "oauth_server": "true",
        "oauth_resource": "/mcp",
        "oauth_access_token_ttl": f"{ACCESS_TTL}s",
    }


async def revoke_on_grants_page(page: Page, base: str, client_name: str) -> None:
    """What the user does on /oauth2/grants in the browser: click Revoke on the row of the client with this name."""
    await page.goto(base + "/oauth2/grants", wait_until="load")
    row = page.locator("tr", has_text=client_name)
    assert await row.count() == 1, await person.text(page)
    await person.click_and_wait(page, f"tr:has-text({json.dumps(client_name)}) button:has-text('Revoke')")
    assert urlsplit(page.url).path == "/oauth2/grants", page.url
    assert client_name not in await person.text(page)


async def raw_mcp_status(base: str, access_token: str) -> tuple[int, str]:
    """Status and WWW-Authenticate of a bare MCP request with this bearer token (no SDK in the way)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json, text/event-stream"}
    async with aiohttp.ClientSession() as c, c.post(base + "/mcp", json=body, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("WWW-Authenticate", "")


async def raw_refresh(base: str, refresh_token: str, client_id: str, secret: str | None) -> tuple[int, dict[str, Any]]:
    """A bare refresh at the token endpoint (HTTP Basic for a confidential client, as the SDK does)."""
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id}
    headers = {}
    if secret:
        pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    async with aiohttp.ClientSession() as c, c.post(base + "/oauth2/token", data=data, headers=headers) as resp:
        return resp.status, dict(await resp.json())


def assert_identity(result: dict[str, Any]) -> None:
    """The MCP server saw alice (from the sidecar's identity headers) and no sidecar-issued token."""
    identity = result["identity"]
    assert identity.get("x-forwarded-email") == "alice@example.com", result
    assert identity.get("x-forwarded-user"), result
    assert result["sidecar_token_seen"] is False, result
    assert result["authorization_present"] is False, result  # no --pass-authorization-header: none at all


# --- the Python SDK ---------------------------------------------------------------------------------------------


class MemoryStorage:
    """``mcp.client.auth.TokenStorage`` kept in memory, so the test can look at what the SDK holds."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None
        self.saved: list[OAuthToken] = []

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens
        self.saved.append(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


class ReauthorizationRefused(Exception):
    """The scripted user declines a second authorization (after revoking the grant)."""


class ScriptedUser:
    """``redirect_handler`` + ``callback_handler`` for the SDK: the browser step done in Chromium by a person
    (sign in at the provider if asked, Allow on the consent page)."""

    def __init__(self, page: Page, redirect_uri: str) -> None:
        self.browser = page
        self.redirect_uri = redirect_uri
        self.authorize_urls: list[str] = []
        self.refuse = False
        self._answer: dict[str, str] = {}

    async def redirect(self, url: str) -> None:
        self.authorize_urls.append(url)
        if self.refuse:
            raise ReauthorizationRefused("the user was asked to authorize again")
        self._answer = await person.approve_authorization(self.browser, url, self.redirect_uri)

    async def callback(self) -> AuthorizationCodeResult:
        answer, self._answer = self._answer, {}
        return AuthorizationCodeResult(code=answer["code"], state=answer.get("state"), iss=answer.get("iss"))


async def python_whoami(base: str, provider: OAuthClientProvider) -> dict[str, Any]:
    """One MCP session through the sidecar with the SDK's own client: connect, call whoami, close."""
    async with httpx2.AsyncClient(auth=provider, timeout=httpx2.Timeout(30.0)) as http:
        async with Client(streamable_http_client(base + "/mcp", http_client=http)) as client:
            result = await client.call_tool("whoami", {})
    assert not result.is_error, result
    data = result.structured_content
    assert isinstance(data, dict), result
    return dict(data.get("result", data))


async def test_python_sdk_discovers_registers_consents_refreshes_and_is_refused_after_revocation(
    redis_store: RedisStore, mcp_server: str
) -> None:
    async with stack(redis_store, **oauth_settings(mcp_server)) as st, person.one_page() as b:
        redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
        user = ScriptedUser(b, redirect_uri)
        storage = MemoryStorage()
        provider = OAuthClientProvider(
            server_url=st.base + "/mcp",
            client_metadata=OAuthClientMetadata(
                client_name="sidecar e2e (Python SDK)", redirect_uris=[AnyUrl(redirect_uri)]
            ),
            storage=storage,
            redirect_handler=user.redirect,
            callback_handler=user.callback,
        )

        # 1. Discovery, registration, consent, code exchange, then the tool call.
        result = await asyncio.wait_for(python_whoami(st.base, provider), 60)
        assert_identity(result)
        assert len(user.authorize_urls) == 1
        asked = parse_qs(urlsplit(user.authorize_urls[0]).query)
        assert asked["resource"] == [st.base + "/mcp"]  # RFC 8707, from the protected resource metadata
        assert asked["code_challenge_method"] == ["S256"]
        assert "offline_access" in asked["scope"][0].split()
        assert storage.client_info is not None and storage.client_info.client_secret  # RFC 7591 default: basic
        first = storage.tokens
        assert first is not None and first.access_token.startswith("sca.") and first.refresh_token
        assert first.expires_in is not None and first.expires_in <= ACCESS_TTL

        # 2. Past the access token's life the SDK refreshes (rotating the refresh token) without the user.
        await asyncio.sleep(ACCESS_TTL + 1.5)
        assert (await raw_mcp_status(st.base, first.access_token))[0] == 401
        result = await asyncio.wait_for(python_whoami(st.base, provider), 60)
        assert_identity(result)
        assert len(user.authorize_urls) == 1, "a refresh, not a new authorization"
        second = storage.tokens
        assert second is not None and second.access_token != first.access_token
        assert second.refresh_token and second.refresh_token != first.refresh_token

        # 3. The user revokes the grant on /oauth2/grants: the token is refused and the SDK has to ask again.
        await revoke_on_grants_page(b, st.base, "sidecar e2e (Python SDK)")
        status, challenge = await raw_mcp_status(st.base, second.access_token)
        assert status == 401 and 'error="invalid_token"' in challenge and "resource_metadata=" in challenge
        user.refuse = True
        with pytest.raises(BaseException) as refused:
            await asyncio.wait_for(python_whoami(st.base, provider), 60)
        assert refused.errisinstance(ReauthorizationRefused) or "authorize again" in repr(refused.value)
        assert len(user.authorize_urls) == 2, "the revoked token was refused and the SDK went back to the user"
        info = storage.client_info
        status, body = await raw_refresh(st.base, second.refresh_token, info.client_id, info.client_secret)
        assert status == 400 and body["error"] == "invalid_grant"


async def test_python_sdk_against_the_make_run_demo_mcp_endpoint(redis_store: RedisStore) -> None:
    """The demo app's hand-written ``/mcp`` (what ``make run`` serves) is enough for the unmodified SDK."""
    async with stack(redis_store, oauth_server="true", oauth_resource="/mcp") as st, person.one_page() as b:
        redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
        user = ScriptedUser(b, redirect_uri)
        provider = OAuthClientProvider(
            server_url=st.base + "/mcp",
            client_metadata=OAuthClientMetadata(client_name="demo check", redirect_uris=[AnyUrl(redirect_uri)]),
            storage=MemoryStorage(),
            redirect_handler=user.redirect,
            callback_handler=user.callback,
        )
        seen = await asyncio.wait_for(python_whoami(st.base, provider), 60)
        assert seen["identity"]["X-Forwarded-Email"] == "alice@example.com", seen
        assert seen["authorization_forwarded"] is False, seen
        assert len(user.authorize_urls) == 1


# --- the TypeScript SDK -----------------------------------------------------------------------------------------


def node_client_command(server_url: str, redirect_uri: str) -> list[str]:
    """``node client.mjs``; fails (never skips) when node or the npm package is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: install Node.js 18+ (Debian: apt-get install nodejs npm), then `make test`")
    if not (MCP_DIR / "node_modules" / "@modelcontextprotocol" / "sdk" / "package.json").is_file():
        pytest.fail("the TypeScript MCP SDK is not installed: run `npm ci --prefix tests/e2e/mcp` (make test does)")
    return [node, str(MCP_DIR / "client.mjs"), server_url, redirect_uri]


class NodeClient:
    """The node process speaking the line protocol of client.mjs."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []

    async def read(self, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            stderr = await self.proc.stderr.read() if self.proc.stderr else b""
            raise AssertionError(f"node client exited: {stderr.decode(errors='replace')[-2000:]}")
        event = dict(json.loads(line))
        self.events.append(event)
        return event

    async def read_until(self, *kinds: str) -> dict[str, Any]:
        while True:
            event = await self.read()
            if event["event"] in kinds:
                return event

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        await self.proc.stdin.drain()

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e["event"] == kind)


async def test_typescript_sdk_discovers_registers_consents_refreshes_and_is_refused_after_revocation(
    redis_store: RedisStore, mcp_server: str
) -> None:
    async with stack(redis_store, **oauth_settings(mcp_server)) as st, person.one_page() as b:
        redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
        proc = await asyncio.create_subprocess_exec(
            *node_client_command(st.base + "/mcp", redirect_uri),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        node = NodeClient(proc)
        try:
            # 1. The SDK discovers, registers (a public client: token_endpoint_auth_method none) and sends the
            #    user to the authorization URL; the browser consents and the code goes back to the SDK.
            event = await node.read_until("authorize", "error")
            assert event["event"] == "authorize", event
            asked = parse_qs(urlsplit(event["url"]).query)
            assert asked["resource"] == [st.base + "/mcp"] and asked["code_challenge_method"] == ["S256"]
            answer = await person.approve_authorization(b, event["url"], redirect_uri)
            await node.send({"code": answer["code"], "state": answer.get("state"), "iss": answer.get("iss")})
            event = await node.read_until("connected", "error")
            assert event["event"] == "connected", event
            assert node.events[-2] == {"event": "tokens", "access_prefix": "sca", "has_refresh": True}

            await node.send({"cmd": "whoami"})
            event = await node.read_until("result", "error")
            assert event["event"] == "result", event
            assert_identity(event["data"])

            # 2. Past the access token's life: 401 on /mcp, the SDK refreshes and retries; no new authorization.
            await asyncio.sleep(ACCESS_TTL + 1.5)
            tokens_before = node.count("tokens")
            await node.send({"cmd": "whoami"})
            event = await node.read_until("result", "error")
            assert event["event"] == "result", event
            assert_identity(event["data"])
            assert node.count("tokens") == tokens_before + 1 and node.count("authorize") == 1

            # 3. Revoked on /oauth2/grants: 401, the refresh gets invalid_grant, the SDK drops its tokens and
            #    can only send the user to authorize again; the call fails.
            await revoke_on_grants_page(b, st.base, "sidecar e2e (TypeScript SDK)")
            await node.send({"cmd": "whoami"})
            event = await node.read_until("result", "error")
            assert event["event"] == "error" and event["name"] == "UnauthorizedError", event
            assert node.count("authorize") == 2, node.events
            await node.send({"cmd": "quit"})
            await asyncio.wait_for(proc.wait(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
