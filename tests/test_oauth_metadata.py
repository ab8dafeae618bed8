"""Discovery documents: RFC 8414 authorization server metadata and RFC 9728 protected resource metadata."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.e2e.chromium import one_page, other_site
from tests.test_oauth_authorize import oauth_stack, register


async def _get(url: str, **kw: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(url, **kw) as resp:
        body = await resp.json(content_type=None)
        return resp.status, dict(resp.headers), body


async def test_authorization_server_metadata_names_every_endpoint_and_only_s256() -> None:
    async with oauth_stack() as st:
        base = st.base
        status, headers, meta = await _get(f"{base}/.well-known/oauth-authorization-server")
        assert status == 200
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert meta["issuer"] == base
        for name, path in [
            ("authorization_endpoint", "/oauth2/authorize"),
            ("token_endpoint", "/oauth2/token"),
            ("registration_endpoint", "/oauth2/register"),
            ("revocation_endpoint", "/oauth2/revoke"),
            ("device_authorization_endpoint", "/oauth2/device_authorization"),
        ]:
            assert meta[name] == base + path
        assert meta["response_types_supported"] == ["code"]
        assert meta["code_challenge_methods_supported"] == ["S256"]
        assert set(meta["grant_types_supported"]) == {
            "authorization_code",
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:device_code",
        }
        assert set(meta["token_endpoint_auth_methods_supported"]) == {
            "none",
            "client_secret_post",
            "client_secret_basic",
        }
        assert meta["authorization_response_iss_parameter_supported"] is True
        assert meta["client_id_metadata_document_supported"] is False
        assert "offline_access" in meta["scopes_supported"]


async def test_protected_resource_metadata_per_path_and_root_form_and_404_elsewhere() -> None:
    async with oauth_stack(oauth_resource="/mcp,/api/v1") as st:
        base = st.base
        for path in ("/mcp", "/api/v1"):
            status, headers, meta = await _get(f"{base}/.well-known/oauth-protected-resource{path}")
            assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
            assert meta["resource"] == base + path
            assert meta["authorization_servers"] == [base]
            assert meta["bearer_methods_supported"] == ["header"]
        status, _, meta = await _get(f"{base}/.well-known/oauth-protected-resource")
        assert status == 200 and meta["resource"] in (f"{base}/mcp", f"{base}/api/v1")
        for path in ("/other", "/mcp/", "/mcp/x", "/api", "/MCP", "//mcp", "/mcp%2F"):
            status, _, _ = await _get(f"{base}/.well-known/oauth-protected-resource{path}")
            assert status == 404, path


async def test_issuer_ignores_forwarded_headers_from_untrusted_peers() -> None:
    async with oauth_stack() as st:
        headers = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
        _, _, meta = await _get(f"{st.base}/.well-known/oauth-authorization-server", headers=headers)
        assert meta["issuer"] == st.base
        _, _, prm = await _get(f"{st.base}/.well-known/oauth-protected-resource/mcp", headers=headers)
        assert prm["authorization_servers"] == [st.base]


_CROSS_ORIGIN_FETCH = """async ([url, init]) => {
    try {
        const r = await fetch(url, init);
        return {status: r.status, body: await r.text()};
    } catch (e) {
        return {error: String(e)};
    }
}"""


async def test_a_browser_app_on_another_origin_reads_the_metadata_and_registers_but_not_the_device_endpoint() -> None:
    """The real counterpart of the hand-made preflight below: a page of another origin (a browser MCP client
    such as the Inspector) in Chromium, which sends Origin and the CORS preflight itself."""
    async with oauth_stack() as st, one_page() as page, other_site() as inspector:
        inspector.pages["app"] = "<!doctype html><html lang='en'><title>a browser MCP client</title></html>"
        await page.goto(inspector.origin + "/app", wait_until="load")
        asks = {"headers": {"mcp-protocol-version": "2025-06-18"}}  # not CORS-safelisted: a preflight first
        for path in ("/.well-known/oauth-authorization-server", "/.well-known/oauth-protected-resource/mcp"):
            answer = await page.evaluate(_CROSS_ORIGIN_FETCH, [st.base + path, asks])
            assert answer.get("status") == 200, (path, answer)
            meta = json.loads(answer["body"])
            assert st.base in (meta.get("issuer"), *meta.get("authorization_servers", [])), meta
        registration = {
            "method": "POST",
            "headers": {"Content-Type": "application/json"},
            "body": json.dumps({"redirect_uris": ["http://127.0.0.1:1/cb"], "token_endpoint_auth_method": "none"}),
        }
        answer = await page.evaluate(_CROSS_ORIGIN_FETCH, [st.base + "/oauth2/register", registration])
        assert answer.get("status") == 201 and json.loads(answer["body"])["client_id"], answer  # cors.py
        device = {"method": "POST", "body": "client_id=nobody", "headers": {"Content-Type": "text/plain"}}
        answer = await page.evaluate(_CROSS_ORIGIN_FETCH, [st.base + "/oauth2/device_authorization", device])
        assert "Failed to fetch" in answer.get("error", ""), answer  # the browser refuses: no CORS there


async def test_cors_preflight_for_metadata_and_registration_but_not_for_the_device_endpoint() -> None:
    """Registration is fetch()ed by browser-based clients and reads no cookie (tests/test_oauth_cors.py); the
    device authorization endpoint is for devices without a browser and stays closed. Hand-made: the exact CORS
    headers of each answer (the browser's own view is the test above)."""
    async with oauth_stack() as st:
        async with aiohttp.ClientSession() as http:
            for path in ("/.well-known/oauth-authorization-server", "/.well-known/oauth-protected-resource/mcp"):
                headers = {
                    "Origin": "https://inspector.example",
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "mcp-protocol-version",
                }
                async with http.options(st.base + path, headers=headers) as resp:
                    assert resp.status == 204
                    assert resp.headers["Access-Control-Allow-Origin"] == "*"
            async with http.post(
                f"{st.base}/oauth2/register",
                json={"redirect_uris": ["http://127.0.0.1:1/cb"], "token_endpoint_auth_method": "none"},
                headers={"Origin": "https://inspector.example"},
            ) as resp:
                assert resp.status == 201
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
                assert "Access-Control-Allow-Credentials" not in resp.headers
            async with http.post(
                f"{st.base}/oauth2/device_authorization",
                data={"client_id": "nobody"},
                headers={"Origin": "https://inspector.example"},
            ) as resp:
                assert resp.status in (400, 401)
                assert "Access-Control-Allow-Origin" not in resp.headers
        reg = await register(st.base, token_endpoint_auth_method="client_secret_post")
        assert reg["client_secret"]
