"""The MCP Inspector's web UI in real Chromium, connecting to an MCP server behind the sidecar's OAuth server.

The Inspector (npm ``@modelcontextprotocol/inspector``, v1.0.3 and v2.12.0 as ``inspector-v2``, pinned in
tests/e2e/inspector/package-lock.json) is started as its docs say (``mcp-inspector``: v1's UI on one port, its
proxy on another; v2's web UI and its Node backend) and driven by the person in Chromium. v1: Streamable HTTP,
the server URL, connection type **Direct**, Connect. In that mode the OAuth flow
runs in the page: the 401's ``resource_metadata``, both metadata documents, dynamic registration and the token
request are ``fetch()`` calls from the Inspector's origin (``http://localhost:PORT``) to the sidecar's
(``http://127.0.0.1:PORT``), so each needs the sidecar's CORS answers (``sidecar/oauth/cors.py``); then the
consent page (Allow, in the sidecar's own origin), back to the Inspector's callback, connected, tools listed,
one called. In its default "Via Proxy" mode v1 sends discovery and registration through its own Node proxy's
``/fetch`` but its callback page redeems the code from the page (CORS again); v2 sends every one of them
through its backend (``/api/fetch``): its page only navigates to the consent page and back.

The MCP server is the app: it lets the Inspector's origin call it (its own CORS and DNS-rebinding settings,
``--cors-origin``); the sidecar answers the preflights and the 401 on ``/mcp`` itself. Nothing here sets
``Origin`` or any CORS header by hand: Chromium does (the hostile variants are in tests/test_oauth_cors.py).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Request, Response
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeout

from tests.e2e import a11y
from tests.e2e import chromium as person
from tests.e2e.procs import Proc, child_env, mcp_server_process
from tests.stack import Stack, free_port, stack

INSPECTOR = Path(__file__).parent / "inspector"
pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(90)]


V1 = INSPECTOR / "node_modules" / "@modelcontextprotocol" / "inspector" / "cli" / "build" / "cli.js"
V2 = INSPECTOR / "node_modules" / "inspector-v2" / "clients" / "launcher" / "build" / "index.js"


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is not installed: install Node.js 20+ (Debian: apt-get install nodejs npm), then `make test`")
    return found


@contextlib.contextmanager
def inspector_process(logs: Path, v2: bool = False) -> Iterator[str]:
    """``mcp-inspector`` (v1, or v2's web UI) on free ports, no browser opened by itself, a fresh user's home and
    storage; yields the URL it prints (with its API token), which the person opens."""
    entry = V2 if v2 else V1
    if not entry.exists():
        pytest.fail("the MCP Inspector is not installed: run `make inspector-deps` (npm ci in tests/e2e/inspector)")
    home = logs / ("home-v2" if v2 else "home-v1")
    home.mkdir()
    env = child_env(
        CLIENT_PORT=str(free_port()),
        SERVER_PORT=str(free_port()),  # v1's proxy
        MCP_SANDBOX_PORT=str(free_port()),  # v2's MCP Apps sandbox and app origin
        MCP_APP_ORIGIN_PORT=str(free_port()),
        MCP_AUTO_OPEN_ENABLED="false",
        MCP_INSPECTOR_SECRET_STORE="memory",  # no keychain here; tokens stay in the process
        MCP_STORAGE_DIR=str(home / "storage"),
        HOME=str(home),
    )
    for name in ("BROWSER", "DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS"):
        env.pop(name, None)
    argv = [node(), str(entry), *(["--web"] if v2 else [])]
    printed = (
        r"(http://127\.0\.0\.1:\d+/?\?MCP_INSPECTOR_API_TOKEN=\w+)"
        if v2
        else r"(http://localhost:\d+/\?\S*MCP_PROXY_AUTH_TOKEN=\w+)"
    )
    proc = Proc("mcp-inspector-v2" if v2 else "mcp-inspector", argv, log_dir=logs, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            found = re.search(printed, proc.output(20_000))
            if found:
                yield found.group(1)
                return
            if not proc.alive() or time.monotonic() > deadline:
                proc.fail("did not print the URL of its UI")
            time.sleep(0.1)
    finally:
        proc.stop()


def origin_of(url: str) -> str:
    return re.sub(r"^(http://[^/?]+).*$", r"\1", url)


class Setup:
    def __init__(self, st: Stack, inspector_url: str, v2_url: str) -> None:
        self.st = st
        self.url = inspector_url
        self.origin = origin_of(inspector_url)
        self.v2_url = v2_url
        self.v2_origin = origin_of(v2_url)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    """The dev provider, the sidecar (--oauth-server, memory store), the MCP server letting the Inspector's
    origin call it, and the Inspector."""
    logs = tmp_path_factory.mktemp("inspector")
    with contextlib.ExitStack() as procs:
        url = procs.enter_context(inspector_process(logs))
        v2_url = procs.enter_context(inspector_process(logs, v2=True))
        upstream = procs.enter_context(mcp_server_process(cors_origin=origin_of(url)))
        async with stack(upstream=upstream, oauth_server="true", oauth_resource="/mcp") as st:
            yield Setup(st, url, v2_url)
            # the Inspector's proxy and the MCP server first: the streams opened through the sidecar then end
            # at once, with no wait for the proxy's client-gone watcher
            procs.close()


class Traffic:
    """What the page fetched from the sidecar, as Chromium sent it and as it answered."""

    def __init__(self, page: Page, base: str) -> None:
        self.sent: list[tuple[str, str, dict[str, str]]] = []
        self.answered: list[tuple[str, str, int]] = []

        async def on_request(request: Request) -> None:
            if request.url.startswith(base) and request.resource_type == "fetch":
                self.sent.append((request.method, request.url, await request.all_headers()))

        self.refusals: list[str] = []  # the token endpoint's error answers: error and its fixed description

        async def on_response(response: Response) -> None:
            request = response.request
            if request.url.startswith(base) and request.resource_type == "fetch":
                self.answered.append((request.method, request.url.removeprefix(base), response.status))
                if request.url.endswith("/oauth2/token") and response.status != 200:
                    with contextlib.suppress(PlaywrightError, ValueError):
                        body = await response.json()
                        self.refusals.append(f"{response.status} {body.get('error')}: {body.get('error_description')}")

        page.on("request", on_request)
        page.on("response", on_response)

    def paths(self) -> list[str]:
        return [f"{method} {path.split('?')[0]} {status}" for method, path, status in self.answered]


async def choose(page: Page, label: str, option: str) -> None:
    await page.get_by_role("combobox", name=label).click()
    await page.get_by_role("option", name=option).click()


async def test_inspector_direct_connection_oauth_in_the_browser_then_tools_list_and_call(
    chromium_browser: Browser, setup: Setup
) -> None:
    st = setup.st
    async with person.new_page(chromium_browser) as page:
        traffic = Traffic(page, st.base)
        await page.goto(setup.url, wait_until="load")
        await choose(page, "Transport Type", "Streamable HTTP")
        await page.get_by_label("URL").fill(st.base + "/mcp")
        await choose(page, "Connection Type", "Direct")
        await page.get_by_role("button", name="Connect").click()

        # the Inspector's page found the server, registered and sent the browser to authorize
        await consent_as_shown(page, st.base)
        assert "MCP Inspector" in await person.text(page)  # its registered client_name, on the consent page
        await person.carry_on(page, lambda at, _body: at.startswith(setup.origin + "/"))
        await page.wait_for_url(setup.origin + "/", wait_until="load")  # the callback redeemed the code
        await connected(page, traffic, setup)

        await page.get_by_role("tab", name="Tools").click()
        await page.get_by_role("button", name="List Tools").click()
        await page.get_by_text("whoami", exact=True).first.click()
        await page.get_by_role("button", name="Run Tool").click()
        await page.get_by_text("Tool Result: Success").wait_for()
        result = await person.text(page)
        a11y.SHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(a11y.SHOTS / "inspector-connected.png"))

    # the tool's structured result as the Inspector shows it (a tree: "name:" and the value on the next line)
    assert re.search(r"x-forwarded-email:\s*\"alice@example.com\"", result), result  # alice, as her token says
    assert re.search(r"sidecar_token_seen:\s*false", result), result  # the app never sees the sidecar's token
    assert re.search(r"authorization_present:\s*false", result), result
    seen = traffic.paths()
    for step in (
        "POST /mcp 401",  # the challenge, read by the page: WWW-Authenticate exposed
        "GET /.well-known/oauth-protected-resource/mcp 200",
        "GET /.well-known/oauth-authorization-server 200",
        "POST /oauth2/register 201",
        "POST /oauth2/token 200",
        "POST /mcp 200",
    ):
        assert step in seen, (step, seen)
    # the code redeemed once (a second redemption would be refused and end the grant); refused only in the
    # Inspector's own race (see connected), then redeemed once after the second consent
    redemptions = [p for p in seen if "/oauth2/token" in p]
    if traffic.refusals:
        assert traffic.refusals == INSPECTOR_RACE, traffic.refusals
        assert redemptions == ["POST /oauth2/token 400", "POST /oauth2/token 400", "POST /oauth2/token 200"], seen
    else:
        assert redemptions == ["POST /oauth2/token 200"], seen
    # every one a cross-origin fetch by Chromium from the Inspector's page (a metadata document answered from the
    # browser's cache shows Playwright no network headers, hence None)
    origins = {headers.get("origin") for _, _, headers in traffic.sent}
    assert origins - {None} == {setup.origin}, origins
    assert all(h.get("origin") == setup.origin for m, _, h in traffic.sent if m == "POST"), traffic.sent
    tokens = [h for m, u, h in traffic.sent if m == "POST" and u.endswith("/oauth2/token")]
    assert all("cookie" not in h for h in tokens)  # the wildcard never lets a cookie along


async def consent_as_shown(page: Page, sidecar: str) -> None:
    """Wait until the browser has stopped on the sidecar's consent page. One Connect in Inspector v1 starts two
    authorization requests: its transport's ``auth()`` answers the 401 by sending the browser to authorize, then
    its connection hook's error handler runs ``auth()`` again, which saves a new PKCE verifier over the first
    one and sends the browser once more. The first navigation is then aborted (a wait for that navigation fails
    with ERR_ABORTED: seen once in 3 runs under load), or it arrives first and the second one may still replace
    it. The person answers the page once nothing moves any more, as shown, and never opens its URL again (that
    could cancel the Inspector's newer navigation and answer the older request; ``INSPECTOR_RACE`` is what
    remains of the race in the Inspector itself)."""
    allow = page.get_by_role("button", name="Allow", exact=True)
    await allow.wait_for()  # a locator's wait outlives an aborted navigation; a navigation's wait does not
    await page.wait_for_load_state("networkidle")  # no navigation of the Inspector's still in flight
    await allow.wait_for()
    assert page.url.startswith(sidecar + "/oauth2/authorize?"), page.url


# Inspector v1's own race, about once in 25 runs: one Connect starts two authorization requests (above), each
# saving its PKCE verifier in the same slot of the page's sessionStorage. Now and then the browser shows the
# consent page of one request while the verifier of the other is the one stored (the first request's page
# commits in a new renderer process while the old page's script still runs the second ``auth()``): the callback
# then redeems the code with the wrong verifier, the sidecar refuses it as PKCE demands, the SDK's ``auth()``
# retries the same code once (refused as used; nothing had been issued from it) and the Inspector stays without
# tokens. Nothing the sidecar may do about it: a code is never redeemed without its own verifier.
INSPECTOR_RACE = [
    "400 invalid_grant: the code_verifier does not match the code_challenge",
    "400 invalid_grant: the code was already used",
]


async def connected(page: Page, traffic: Traffic, setup: Setup, again_after_race: bool = False) -> None:
    """Wait until the sidebar says Connected. Inspector v1 reconnects by itself after the callback only when
    its proxy listens on the default port (its callback URL drops ``MCP_PROXY_PORT``, so it finds the settings
    "changed" and asks to "Connect again from the sidebar"): the person then clicks Connect once more, with
    the tokens the callback stored. If those are missing or refused, Connect sends the browser to the consent
    page again: that fails here, with what the token endpoint refused, unless the refusals are exactly those of
    the Inspector's race (``INSPECTOR_RACE``): then the person allows once more, and that must connect."""
    status = page.get_by_text("Connected", exact=True)
    again = page.get_by_text("Connect again from the sidebar")
    asked = page.get_by_text("Allow access?")
    try:
        # The "Connect again" notice is a toast that goes away after a few seconds; on a busy machine the page
        # can be read after it went, showing only "Disconnected". Either way the person clicks Connect: with
        # the stored tokens that connects without a new consent.
        with contextlib.suppress(PlaywrightTimeout):
            await status.or_(again).first.wait_for(timeout=5_000)
        if await status.count():
            return
        await page.get_by_role("button", name="Connect").click()
        await status.or_(asked).first.wait_for()
    except Exception as exc:
        raise AssertionError(f"not connected: {await person.text(page)}") from exc
    if await status.count():
        return
    if again_after_race or traffic.refusals != INSPECTOR_RACE:
        refused = traffic.refusals
        raise AssertionError(f"Connect asked for consent again: no usable tokens; the token endpoint refused {refused}")
    await consent_as_shown(page, setup.st.base)
    await person.carry_on(page, lambda at, _body: at.startswith(setup.origin + "/"))
    await page.wait_for_url(setup.origin + "/", wait_until="load")
    await connected(page, traffic, setup, again_after_race=True)


async def test_inspector_via_its_proxy_redeems_the_code_from_the_page(chromium_browser: Browser, setup: Setup) -> None:
    """The Inspector's default connection type: its Node proxy fetches discovery and registration for the page
    (``/fetch``) and carries the MCP session; the code is redeemed by the page itself."""
    st = setup.st
    async with person.new_page(chromium_browser) as page:
        traffic = Traffic(page, st.base)
        await page.goto(setup.url, wait_until="load")
        await choose(page, "Transport Type", "Streamable HTTP")
        await page.get_by_label("URL").fill(st.base + "/mcp")
        assert await page.get_by_role("combobox", name="Connection Type").inner_text() == "Via Proxy"
        await page.get_by_role("button", name="Connect").click()
        await consent_as_shown(page, st.base)
        await person.carry_on(page, lambda at, _body: at.startswith(setup.origin + "/"))
        await page.wait_for_url(setup.origin + "/", wait_until="load")
        # v1's callback URL drops MCP_PROXY_PORT, so the page looks for its proxy on 6277 ("Error Connecting to
        # MCP Inspector Proxy"): the person opens the URL the Inspector printed again; the tokens stayed in the
        # tab's storage and the sidebar kept its settings
        await page.goto(setup.url, wait_until="load")
        await page.get_by_role("button", name="Connect").click()
        await page.get_by_text("Connected", exact=True).wait_for()
        await page.get_by_role("tab", name="Tools").click()
        await page.get_by_role("button", name="List Tools").click()
        await page.get_by_text("whoami", exact=True).first.click()
        await page.get_by_role("button", name="Run Tool").click()
        await page.get_by_text("Tool Result: Success").wait_for()
        assert re.search(r"x-forwarded-email:\s*\"alice@example.com\"", await person.text(page))
    # discovery and registration went through the proxy; the callback page (OAuthCallback) redeems the code
    # itself, from the page: v1's default mode needs the CORS answers of metadata and token endpoint too
    seen = traffic.paths()
    assert seen == [
        "GET /.well-known/oauth-protected-resource/mcp 200",
        "GET /.well-known/oauth-authorization-server 200",
        "POST /oauth2/token 200",
    ], seen
    assert {headers.get("origin") for _, _, headers in traffic.sent} - {None} == {setup.origin}


SCRIPT = """async ([url, init]) => {
    try {
        const response = await fetch(url, {...init, signal: AbortSignal.timeout(5000)});
        return `${response.status} ${(await response.text()).slice(0, 40)}`;
    } catch (error) {
        return `refused: ${error.name}`;
    }
}"""


async def test_a_page_of_another_origin_reads_the_open_endpoints_but_never_with_the_session_cookie(
    chromium_browser: Browser, setup: Setup
) -> None:
    """Alice is signed in at the sidecar; a page on another port of the same host (same site: her SameSite=Lax
    cookie goes along when a script asks for credentials) fetches from the sidecar. Chromium decides from our
    answers what the page may read."""
    base = setup.st.base
    async with person.other_site() as site, person.new_page(chromium_browser) as page:
        grants = base + "/oauth2/grants"
        await person.walk(page, grants, lambda at, body: at == grants and "Connected applications" in body)
        site.pages["hostile"] = "<!doctype html><html lang='en'><title>another page</title><main>hi</main></html>"
        await page.goto(site.origin + "/hostile", wait_until="load")
        metadata = base + "/.well-known/oauth-authorization-server"
        token = {
            "method": "POST",
            "body": "grant_type=refresh_token&refresh_token=x&client_id=y",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        }
        results = {
            "metadata": await page.evaluate(SCRIPT, [metadata, {}]),
            "metadata with cookies": await page.evaluate(SCRIPT, [metadata, {"credentials": "include"}]),
            "token": await page.evaluate(SCRIPT, [base + "/oauth2/token", token]),
            "token with cookies": await page.evaluate(
                SCRIPT, [base + "/oauth2/token", {**token, "credentials": "include"}]
            ),
            "grants": await page.evaluate(SCRIPT, [grants, {"headers": {"Accept": "application/json"}}]),
            "grants with cookies": await page.evaluate(SCRIPT, [grants, {"credentials": "include"}]),
            "account with cookies": await page.evaluate(SCRIPT, [base + "/oauth2/account", {"credentials": "include"}]),
            "userinfo with cookies": await page.evaluate(
                SCRIPT, [base + "/oauth2/userinfo", {"credentials": "include"}]
            ),
            "consent post": await page.evaluate(
                SCRIPT,
                [base + "/oauth2/consent", {"method": "POST", "credentials": "include", "body": "decision=approve"}],
            ),
        }
    assert results["metadata"].startswith('200 {"issuer"'), results
    assert results["token"].startswith("40"), results  # an OAuth error the page can read
    for name, outcome in results.items():
        if name not in ("metadata", "token"):
            assert outcome == "refused: TypeError", (name, results)


async def test_inspector_v2_web_ui_runs_the_flow_through_its_own_process(
    chromium_browser: Browser, setup: Setup
) -> None:
    """Inspector v2 (what ``npx @modelcontextprotocol/inspector`` runs today): the person adds the server by
    hand and switches it on; its Node process discovers, registers and redeems (``/api/fetch``), the page
    only navigates to the consent page and back."""
    st = setup.st
    async with person.new_page(chromium_browser) as page:
        traffic = Traffic(page, st.base)
        await page.goto(setup.v2_url, wait_until="load")
        await page.get_by_role("button", name="Add Servers").click()
        await page.get_by_role("menuitem", name="Add manually").click()
        dialog = page.get_by_role("dialog")
        await dialog.get_by_label("Server ID").fill("sidecar-mcp")
        await dialog.get_by_label("Transport").click()
        await page.get_by_role("option", name=re.compile("streamable", re.I)).first.click()
        await dialog.get_by_label("URL").fill(st.base + "/mcp")
        await dialog.get_by_role("button", name="Add").click()
        switch = page.get_by_role("switch", name='Connect or disconnect "sidecar-mcp"')
        await switch.focus()  # the switch's track covers its input: the person uses the keyboard
        await page.keyboard.press("Space")
        await page.wait_for_url(st.base + "/oauth2/authorize?*")
        assert "MCP Inspector" in await person.text(page)
        await person.walk(page, page.url, lambda at, _body: at.startswith(setup.v2_origin + "/"))
        await page.get_by_text("sidecar-e2e").first.wait_for()  # the server's name: connected
        await page.get_by_text("Tools", exact=True).first.click()
        await page.get_by_text("whoami", exact=True).first.click()
        await page.get_by_role("button", name=re.compile(r"^(run|call|execute)", re.I)).first.click()
        await page.get_by_text("alice@example.com").first.wait_for()  # the tool's answer: alice, as her token says
        result = await person.text(page)
        a11y.SHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(a11y.SHOTS / "inspector-v2-connected.png"))
    assert re.search(r"sidecar_token_seen\W+false", result), result
    assert traffic.sent == [], traffic.paths()
