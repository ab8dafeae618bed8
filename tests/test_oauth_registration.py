"""POST /oauth2/register: RFC 7591 dynamic client registration, over real HTTP."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import aiohttp
import pytest

from sidecar.oauth.registration import redirect_uri_problem
from sidecar.store import SessionStore
from tests.test_oauth_authorize import oauth_stack

GOOD_REDIRECTS = [
    "https://app.example.com/cb",
    "https://app.example.com:8443/oauth/callback?tenant=1",
    "https://xn--bcher-kva.example/cb",
    "http://127.0.0.1:33418/callback",
    "http://127.0.0.1/cb",
    "http://[::1]:8080/cb",
    "http://localhost:3000/oauth/callback",
]
BAD_REDIRECTS = [
    "http://app.example.com/cb",
    "http://192.168.1.10/cb",
    "http://127.0.0.2/cb",
    "http://localhost.evil.com/cb",
    "http://127.0.0.1.nip.io/cb",
    "https://app.example.com/cb#frag",
    "https://app.example.com/cb#",
    "https://user:pass@app.example.com/cb",
    "https://user@app.example.com/cb",
    "https://app.example.com@evil.com/cb",
    "javascript:alert(1)",
    "JAVASCRIPT:alert(1)",
    "data:text/html,hi",
    "file:///etc/passwd",
    "com.example.app:/callback",
    "ftp://app.example.com/cb",
    "HTTPS://app.example.com/cb",
    "https://APP.example.com/cb",
    "https://bücher.example/cb",
    "https://аpp.example.com/cb",
    "https:/app.example.com/cb",
    "https:app.example.com/cb",
    "//app.example.com/cb",
    "/cb",
    "https://app.example.com\\@evil.com/cb",
    "https://app.example.com/c b",
    "https://app.example.com/cb\n",
    "https://app.example.com:0/cb",
    "https://app.example.com:99999/cb",
    "https://app.example.com:/cb",
    "https://[::2]/cb",
    "https:///cb",
    "http://[::1/cb",
    "http://[::1]x/cb",
    "http://[::ffff:127.0.0.1]/cb",
    "",
    "https://app.example.com/" + "a" * 2100,
]


@pytest.mark.parametrize("uri", GOOD_REDIRECTS)
def test_redirect_uri_accepted(uri: str) -> None:
    assert redirect_uri_problem(uri) is None


@pytest.mark.parametrize("uri", BAD_REDIRECTS)
def test_redirect_uri_refused(uri: str) -> None:
    assert redirect_uri_problem(uri) is not None


async def _post(base: str, body: Any, *, raw: bytes | None = None, ctype: str = "application/json") -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/oauth2/register", data=data, headers={"Content-Type": ctype}) as resp:
            assert resp.headers.get("Cache-Control") == "no-store"
            return resp.status, await resp.json()


async def test_public_and_confidential_clients_register(store: SessionStore) -> None:
    async with oauth_stack(store) as st:
        status, public = await _post(
            st.base,
            {"redirect_uris": GOOD_REDIRECTS, "token_endpoint_auth_method": "none", "client_name": "CLI", "x": 1},
        )
        assert status == 201, public
        assert public["redirect_uris"] == GOOD_REDIRECTS and "client_secret" not in public
        assert public["grant_types"] == ["authorization_code"] and public["response_types"] == ["code"]
        status, confidential = await _post(st.base, {"redirect_uris": ["https://app.example.com/cb"]})
        assert status == 201
        assert confidential["token_endpoint_auth_method"] == "client_secret_basic"  # RFC 7591's default
        secret = confidential["client_secret"]
        assert len(secret) >= 43 and confidential["client_id"] != public["client_id"]
        from sidecar.oauth.service import OAUTH

        server = st.runners[0].app[OAUTH]
        stored = await server.store.get_client(confidential["client_id"])
        assert stored is not None and stored.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in repr(stored)


@pytest.mark.parametrize(
    "uri", ["http://app.example.com/cb", "javascript:alert(1)", "https://a.example/cb#x", "http://[::1/cb", 7, None]
)
async def test_bad_redirect_uri_is_invalid_redirect_uri(uri: object) -> None:
    async with oauth_stack() as st:
        status, body = await _post(st.base, {"redirect_uris": ["https://ok.example/cb", uri]})
        assert (status, body["error"]) == (400, "invalid_redirect_uri")


async def test_malformed_metadata_is_refused() -> None:
    ok = {"redirect_uris": ["https://app.example.com/cb"], "token_endpoint_auth_method": "none"}
    cases: list[dict[str, Any]] = [
        {**ok, "grant_types": ["password"]},
        {**ok, "grant_types": ["client_credentials", "authorization_code"]},
        {**ok, "grant_types": ["implicit"]},
        {**ok, "grant_types": "authorization_code"},
        {**ok, "grant_types": []},
        {**ok, "response_types": ["token"]},
        {**ok, "response_types": ["code", "id_token"]},
        {**ok, "token_endpoint_auth_method": "private_key_jwt"},
        {**ok, "token_endpoint_auth_method": None},
        {**ok, "client_name": "x" * 201},
        {**ok, "client_name": ["a"]},
        {**ok, "scope": "openid admin"},
        {**ok, "client_uri": "javascript:alert(1)"},
        {**ok, "grant_types": ["a" * 300]},
    ]
    async with oauth_stack(oauth_registration_rate_limit="0") as st:
        for body in cases:
            status, answer = await _post(st.base, body)
            assert (status, answer["error"]) == (400, "invalid_client_metadata"), body
        missing: list[dict[str, Any]] = [
            {"token_endpoint_auth_method": "none"},
            {**ok, "redirect_uris": []},
            {**ok, "redirect_uris": "x"},
        ]
        for body in missing:
            status, answer = await _post(st.base, body)
            assert (status, answer["error"]) == (400, "invalid_redirect_uri"), body
        status, answer = await _post(st.base, {**ok, "redirect_uris": ["https://a.example/cb"] * 11})
        assert status == 400
        for raw, ctype in [
            (b"not json", "application/json"),
            (b"[1,2]", "application/json"),
            (b'"x"', "application/json"),
            (b"\xff\xfe", "application/json"),
            (b"[" * 100000, "application/json"),
            (json.dumps(ok).encode(), "text/plain"),
            (json.dumps(ok).encode(), "application/x-www-form-urlencoded"),
            (json.dumps({**ok, "pad": "x" * 20000}).encode(), "application/json"),
        ]:
            status, answer = await _post(st.base, None, raw=raw, ctype=ctype)
            assert (status, answer["error"]) == (400, "invalid_client_metadata"), raw[:20]


async def test_device_only_client_needs_no_redirect_uri() -> None:
    async with oauth_stack() as st:
        status, body = await _post(
            st.base,
            {"grant_types": ["urn:ietf:params:oauth:grant-type:device_code"], "token_endpoint_auth_method": "none"},
        )
        assert status == 201 and body["redirect_uris"] == [] and body["response_types"] == []


async def test_registration_flood_is_rate_limited_per_address() -> None:
    async with oauth_stack(oauth_registration_rate_limit="3") as st:
        body = {"redirect_uris": ["https://app.example.com/cb"], "token_endpoint_auth_method": "none"}
        statuses = []
        for _ in range(8):
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{st.base}/oauth2/register", json=body) as resp:
                    statuses.append(resp.status)
                    if resp.status == 429:
                        assert int(resp.headers["Retry-After"]) >= 1
                        assert (await resp.json())["error"]
        assert statuses[:6] == [201] * 6  # burst: twice the per-minute rate
        assert statuses[6:] == [429, 429]


# --- private-use schemes, empty redirect lists, scope echo, invisible characters (issue 19) ------------------

GOOD_PRIVATE_USE = [
    "com.example.app:/callback",
    "com.example.app:/",
    "io.github.some-user.tool:/oauth2redirect/provider",
    "com.example.app2:/cb?tenant=1",
]
BAD_PRIVATE_USE = [
    "myapp:/cb",  # not a reverse domain name: any app may take a one-word scheme
    "com.example.app://host/cb",  # an authority: written scheme:/path
    "com.example.app:cb",
    "com.example.app:",
    "Com.Example.App:/cb",
    "com..example:/cb",
    "com.-example:/cb",
    "com.example-:/cb",
    "1com.example:/cb",
    "com.example.app:/cb#x",
    "com.example.app:/c b",
    "com.example.app:/cb\u202e",
    "com.exa_mple:/cb",
    "javascript:alert(1)",
    "data:text/html,x",
    "http://example.com/cb",
    "vbscript:msgbox",
]


@pytest.mark.parametrize("uri", GOOD_PRIVATE_USE)
def test_private_use_redirect_accepted_for_public_clients_only(uri: str) -> None:
    assert redirect_uri_problem(uri, public=True) is None
    assert redirect_uri_problem(uri, public=False) is not None


@pytest.mark.parametrize("uri", BAD_PRIVATE_USE + BAD_REDIRECTS)
def test_bad_redirect_refused_even_for_public_clients(uri: str) -> None:
    if uri in GOOD_PRIVATE_USE or uri == "com.example.app:/callback":
        return  # in BAD_REDIRECTS for the confidential case only
    assert redirect_uri_problem(uri, public=True) is not None


INVISIBLE = [
    "Backup tool \u202eelgoog.www",
    "a\u202ab",
    "a\u202db",
    "a\u2066b\u2069",
    "a\u2067b",
    "a\u2068b",
    "go\u200bogle",
    "go\u200cogle",
    "go\u200dogle",
    "a\u200eb",
    "a\u200fb",
    "\ufeffName",
    "a\u2060b",
    "a\u00adb",
    "tab\there",
    "new\nline",
    "nul\x00",
    "del\x7f",
    "c1\x85",
    "c1\x9b",
    "a\u2028b",
    "a\u2029b",
    "private\ue000",
    "tag\U000e0041",
    "blank\u3164",
    "blank\u115f",
    "sel\ufe0f",
    "unassigned\U0010fffe",
    "go\u034fogle",  # combining grapheme joiner: a mark that shows nothing
    "go\u17b4ogle",
    "go\u17b5ogle",
    "sel\U000e0100",  # a variation selector from the supplement
    "blank\u2800",
    "blank\uffa0",
    "mongolian\u180e",
]


async def test_registration_rules_over_http() -> None:
    device = "urn:ietf:params:oauth:grant-type:device_code"
    async with oauth_stack(oauth_registration_rate_limit="0") as st:
        body = {"redirect_uris": [*GOOD_PRIVATE_USE, "http://127.0.0.1:9/cb"], "token_endpoint_auth_method": "none"}
        status, reply = await _post(st.base, {**body, "scope": "offline_access openid"})
        assert status == 201, reply
        assert reply["redirect_uris"] == body["redirect_uris"] and reply["scope"] == "openid offline_access"
        status, reply = await _post(st.base, {"redirect_uris": GOOD_PRIVATE_USE[:1]})  # confidential by default
        assert (status, reply["error"]) == (400, "invalid_redirect_uri") and "public" in reply["error_description"]
        for uri in BAD_PRIVATE_USE:
            status, reply = await _post(st.base, {**body, "redirect_uris": [uri]})
            assert (status, reply["error"]) == (400, "invalid_redirect_uri"), uri
        status, reply = await _post(st.base, {"redirect_uris": ["https://a.example/cb"]})
        assert status == 201 and reply["scope"] == "openid profile email offline_access"  # none named: all
        device_only = {"grant_types": [device], "token_endpoint_auth_method": "none", "redirect_uris": []}
        status, reply = await _post(st.base, {**device_only, "scope": "offline_access"})
        assert status == 201 and reply["redirect_uris"] == [], reply
        status, again = await _post(st.base, {k: v for k, v in reply.items() if not k.startswith("client_id")})
        assert status == 201, again  # a client re-sending its own metadata is accepted
        form = {"client_id": reply["client_id"], "scope": "openid"}  # beyond the registered scope
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{st.base}/oauth2/device_authorization", data=form) as resp:
                assert (resp.status, (await resp.json())["error"]) == (400, "invalid_scope")
        status, reply = await _post(st.base, {**device_only, "grant_types": [device, "authorization_code"]})
        assert (status, reply["error"]) == (400, "invalid_redirect_uri")
        for name in INVISIBLE:
            status, reply = await _post(st.base, {**body, "client_name": name})
            assert (status, reply["error"]) == (400, "invalid_client_metadata"), repr(name)
        for name in [
            "Ünïcödé CLI",
            "工具 CLI",
            "Outil d\u2019équipe \U0001f680",
            "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
        ]:
            status, reply = await _post(st.base, {**body, "client_name": name})
            assert status == 201 and reply["client_name"] == name, name


async def test_consent_page_shows_a_private_use_redirect_as_an_app_on_this_device() -> None:
    from tests.stack import browser, sign_in
    from tests.test_oauth_authorize import authorize_params, form_fields, pkce

    async with oauth_stack() as st, browser() as client:
        uri = "com.example.app:/oauth2redirect"
        status, reg = await _post(st.base, {"redirect_uris": [uri], "token_endpoint_auth_method": "none"})
        assert status == 201
        await sign_in(client, st.base)
        _, challenge = pkce()
        params = authorize_params(reg["client_id"], challenge, redirect_uri=uri)
        async with client.get(f"{st.base}/oauth2/authorize", params=params) as resp:
            page = await resp.text()
        assert "an app on this device" in page and "<code>com.example.app:</code>" in page
        fields = {**form_fields(page), "decision": "approve"}
        async with client.post(f"{st.base}/oauth2/consent", data=fields, allow_redirects=False) as resp:
            location = resp.headers["Location"]
        for _ in range(6):  # the grant's own sign-in, then back to the app's scheme
            if location.startswith(uri):
                break
            target = location if location.startswith("http") else st.base + location
            async with client.get(target, allow_redirects=False) as resp:
                location = resp.headers["Location"]
        assert location.startswith(uri + "?code=scc."), location


async def test_a_client_without_the_code_grant_may_send_redirect_uris_it_never_uses_and_they_are_not_kept() -> None:
    """oidc-agent registers every client (confidential by default) with its loopback ports and its private-use
    ``edu.kit.data.oidc-agent:/redirect``, even for the device flow alone: accepted, checked, not kept."""
    device = "urn:ietf:params:oauth:grant-type:device_code"
    oidc_agent = {  # oidc-gen 4.2.6 --flow=device, byte for byte but the name
        "application_type": "web",
        "client_name": "oidc-agent:sidecar-vm",
        "response_types": [],
        "grant_types": ["refresh_token", device],
        "scope": "openid offline_access",
        "redirect_uris": [
            "http://localhost:4242",
            "http://localhost:23273",
            "http://localhost:8080",
            "edu.kit.data.oidc-agent:/redirect",
        ],
    }
    async with oauth_stack(oauth_registration_rate_limit="0") as st:
        status, reply = await _post(st.base, oidc_agent)
        assert status == 201, reply
        assert reply["redirect_uris"] == [] and reply["client_secret"], reply
        assert reply["grant_types"] == ["refresh_token", device] and reply["response_types"] == [], reply
        # the URIs it sends are still checked: what no client may register is refused here too
        for uri in [u for u in BAD_PRIVATE_USE + BAD_REDIRECTS if u not in GOOD_PRIVATE_USE]:
            if uri == "com.example.app:/callback":
                continue
            status, refused = await _post(st.base, {**oidc_agent, "redirect_uris": [uri]})
            assert (status, refused["error"]) == (400, "invalid_redirect_uri"), uri
        # and they open no redirect: /authorize refuses the client, naming no redirect
        params = {
            "client_id": reply["client_id"],
            "response_type": "code",
            "redirect_uri": oidc_agent["redirect_uris"][3],
        }
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{st.base}/oauth2/authorize", params=params, allow_redirects=False) as resp:
                assert resp.status == 400 and "Location" not in resp.headers, await resp.text()
        # with the code grant a confidential client still may not register a private-use scheme
        status, refused = await _post(
            st.base, {**oidc_agent, "grant_types": ["authorization_code"], "response_types": ["code"]}
        )
        assert (status, refused["error"]) == (400, "invalid_redirect_uri") and "public" in refused["error_description"]
