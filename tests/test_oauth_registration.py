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
