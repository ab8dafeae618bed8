"""Knowing what happens: log lines, provider problems named, error pages, metrics, no Server header."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.store import SessionStore
from tests.stack import COOKIE_SECRET, SidecarProcess, app_token, browser, free_port, session_cookie, sign_in, stack

CLIENT_SECRET = "sidecar-dev-secret"
HOSTILE = ("<script>alert(1)</script>", "\"'><img src=x onerror=alert(1)>", "&lt;b&gt;", "a\u202eb</a>")


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "sidecar.events" and r.fields.get("event") == name]  # type: ignore[attr-defined]


# --- a real process's log ---------------------------------------------------------------------------------


def _lines(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return found


async def test_a_real_process_logs_what_happens_and_never_a_secret_token_or_cookie() -> None:
    async with stack(sidecar=False, provider_kw={"access_token_ttl": 1}) as st:
        port = free_port()
        from tests.stack import sidecar_settings

        settings = sidecar_settings(
            st.issuer, port, st.upstream_url + "/", request_logging="true", pass_access_token="true", log_level="info"
        )
        proc = SidecarProcess(settings)
        try:
            await proc.ready()
            async with browser() as client:
                await sign_in(client, proc.base)
                cookie = session_cookie(client)
                first = await app_token(client, proc.base)
                await asyncio.sleep(1.2)  # the access token expires: the next request refreshes it
                second = await app_token(client, proc.base)
                async with client.get(proc.base + "/oauth2/auth?allowed_groups=nobody-has-this") as resp:
                    assert resp.status == 403
                async with aiohttp.ClientSession() as anon:
                    for forged in ("x" * 40, (cookie or "")[:-4] + "AAAA"):
                        async with anon.get(proc.base + "/oauth2/auth", cookies={"_sidecar": forged}) as resp:
                            assert resp.status == 401
                async with client.get(proc.base + "/oauth2/sign_out", allow_redirects=False) as resp:
                    assert resp.status == 302
        finally:
            proc.proc.terminate()
            proc.proc.wait(timeout=20)
            output = proc.output()
            proc.stop()
    assert cookie and first and second and first != second
    for secret in (COOKIE_SECRET, CLIENT_SECRET, cookie, first, second):
        assert secret not in output, "a secret, token or cookie reached the log"
    lines = _lines(output)
    starting = [e for e in lines if e.get("msg") == "starting"]
    assert starting and starting[0]["settings"]["client_secret"] != CLIENT_SECRET
    assert starting[0]["settings"]["oidc_issuer_url"] == st.issuer
    by_event: dict[str, list[dict[str, Any]]] = {}
    for entry in lines:
        if "event" in entry:
            by_event.setdefault(entry["event"], []).append(entry)
    assert by_event["sign_in"][0]["user"] and len(by_event["sign_in"][0]["sub_hash"]) == 16
    assert any(e["outcome"] == "ok" and e["provider_latency_ms"] >= 0 for e in by_event["refresh"])
    assert by_event["denied"][0]["reason"] == "location_rule"
    assert len(by_event["cookie_refused"]) >= 2
    assert by_event["sign_out"][0]["user"] == by_event["sign_in"][0]["user"]


# --- events and the client address in-process ------------------------------------------------------------


XFF = "X-Forwarded-For"


@pytest.mark.parametrize(
    ("header", "headers", "expected"),
    [
        ("X-Real-IP", {"X-Real-IP": "203.0.113.7"}, "203.0.113.7"),
        (XFF, {XFF: "198.51.100.1, 203.0.113.9"}, "203.0.113.9"),
        ("X-Real-IP", {"X-Real-IP": "not-an-ip", XFF: "203.0.113.5"}, "127.0.0.1"),
        ("X-Real-IP", {"X-Real-IP": "<script>"}, "127.0.0.1"),
        ("X-Real-IP", {XFF: "203.0.113.5"}, "127.0.0.1"),
        (XFF, {XFF: "<b>, 203.0.113.5"}, "203.0.113.5"),
        ("X-Real-IP", {}, "127.0.0.1"),
    ],
)
async def test_the_logged_client_ip_comes_from_the_trusted_header(
    store: SessionStore, caplog: pytest.LogCaptureFixture, header: str, headers: dict[str, str], expected: str
) -> None:
    caplog.set_level(logging.INFO, "sidecar.events")
    overrides = {"reverse_proxy": "true", "real_client_ip_header": header}
    async with stack(store, upstream="", **overrides) as st, browser() as client:
        async with client.get(st.base + "/oauth2/auth", cookies={"_sidecar": "forged"}, headers=headers) as resp:
            assert resp.status == 401
    assert [e["client_ip"] for e in events(caplog, "cookie_refused")] == [expected]


async def test_headers_from_an_untrusted_peer_are_not_the_client_ip(
    store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sidecar.events")
    async with stack(store, upstream="") as st, browser() as client:  # --reverse-proxy is off
        headers = {"X-Real-IP": "203.0.113.7", "X-Forwarded-For": "203.0.113.8"}
        async with client.get(st.base + "/oauth2/auth", cookies={"_sidecar": "forged"}, headers=headers) as resp:
            assert resp.status == 401
    assert [e["client_ip"] for e in events(caplog, "cookie_refused")] == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("overrides", "query", "reason"),
    [
        ({"allowed_group": "auditors"}, "", "group"),
        ({"email_domain": "elsewhere.example"}, "", "email_domain"),
        ({}, "?allowed_groups=auditors", "location_rule"),
        ({}, "?allowed_emails=bob@example.com", "location_rule"),
        ({}, "?no_such_rule=1", "location_rule"),
    ],
)
async def test_denials_are_logged_with_their_reason(
    store: SessionStore, caplog: pytest.LogCaptureFixture, overrides: dict[str, str], query: str, reason: str
) -> None:
    caplog.set_level(logging.INFO, "sidecar.events")
    async with stack(store, upstream="") as st, browser() as client:
        await sign_in(client, st.base)
        strict = await st.add_sidecar(store, upstream="", **overrides)  # same store and cookie secret
        async with client.get(strict + "/oauth2/auth" + query) as resp:
            assert resp.status == 403
        await sign_in(client, strict)  # the same rule refuses the sign-in itself
    denied = events(caplog, "denied")
    assert [e["reason"] for e in denied][:1] == [reason] and denied[0]["route"] == "/oauth2/auth"
    if overrides:
        assert denied[-1]["route"] == "/oauth2/callback" and denied[-1]["reason"] == reason
    assert all(e["user"] == "alice@example.com" and len(e["sub_hash"]) == 16 for e in denied)


async def test_an_unreachable_upstream_is_logged_as_an_upstream_error(
    store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sidecar.events")
    dead = f"http://127.0.0.1:{free_port()}/"
    async with stack(store, upstream=dead) as st, browser() as client:
        await sign_in(client, st.base)
        async with client.get(st.base + "/some/page?token=abc") as resp:
            assert resp.status == 502
    errors = events(caplog, "upstream_error")
    assert errors and errors[0]["upstream"] == dead.rstrip("/") and "token=abc" not in json.dumps(errors)


# --- provider problems named --------------------------------------------------------------------------------


@pytest.mark.parametrize("issuer_kind", ["404", "unreachable", "not_json"])
async def test_a_wrong_or_unreachable_issuer_makes_ready_fail_naming_the_provider(
    store: SessionStore, caplog: pytest.LogCaptureFixture, issuer_kind: str
) -> None:
    caplog.set_level(logging.ERROR)
    async with stack(store, sidecar=False) as st:
        issuer = {
            "404": st.issuer + "/no/such/realm",
            "unreachable": f"http://127.0.0.1:{free_port()}",
            "not_json": st.upstream_url + "/_demo",
        }[issuer_kind]
        base = await st.add_sidecar(store, oidc_issuer_url=issuer)
        async with aiohttp.ClientSession() as client, client.get(base + "/ready") as resp:
            assert resp.status == 503
            text = await resp.text()
    assert "identity provider" in text and issuer in text
    assert any(r.levelno == logging.ERROR and "oidc-issuer-url" in r.getMessage() for r in caplog.records)


async def test_ready_is_ok_with_a_working_provider(store: SessionStore) -> None:
    async with stack(store) as st, aiohttp.ClientSession() as client, client.get(st.base + "/ready") as resp:
        assert resp.status == 200


@pytest.mark.parametrize("accept", ["text/html", "*/*"])
async def test_a_wrong_client_secret_says_so_to_the_operator_and_the_user(
    store: SessionStore, caplog: pytest.LogCaptureFixture, accept: str
) -> None:
    caplog.set_level(logging.ERROR)
    async with stack(store, client_secret="not-the-secret-xyz") as st, browser() as client:
        async with client.get(
            st.base + "/oauth2/start", params={"rd": "/"}, headers={"Accept": accept}, allow_redirects=True
        ) as resp:
            text = await resp.text()
            assert resp.status == 502
    assert "try again shortly" not in text and "client id and secret" in text
    assert any("check the client id/secret" in json.dumps(getattr(r, "fields", {})) for r in caplog.records)
    logged = "".join(r.getMessage() + json.dumps(getattr(r, "fields", {})) for r in caplog.records)
    assert "not-the-secret-xyz" not in logged


# --- error pages ---------------------------------------------------------------------------------------------


async def _expired_state(client: aiohttp.ClientSession, base: str, hostile: str, accept: str) -> tuple[int, str]:
    params = {"state": hostile, "code": hostile}
    async with client.get(base + "/oauth2/callback", params=params, headers={"Accept": accept}) as resp:
        return resp.status, await resp.text()


async def _refused(client: aiohttp.ClientSession, base: str, hostile: str, accept: str) -> tuple[int, str]:
    params = {"error": hostile, "state": "s"}
    async with client.get(base + "/oauth2/callback", params=params, headers={"Accept": accept}) as resp:
        return resp.status, await resp.text()


@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize(("page", "status", "title"), [(_expired_state, 400, "expired"), (_refused, 403, "refused")])
async def test_sign_in_error_pages_say_what_happened_and_offer_a_way_on(
    store: SessionStore, hostile: str, page: Any, status: int, title: str
) -> None:
    async with stack(store) as st, browser() as client:
        got, html_text = await page(client, st.base, hostile, "text/html")
        assert got == status and title in html_text.lower()
        assert "href='/oauth2/start?rd=" in html_text
        assert hostile not in html_text and "<script" not in html_text and "<img" not in html_text
        if page is _refused:  # the provider's word is shown, escaped
            assert html.escape(hostile) in html_text
        got, text = await page(client, st.base, hostile, "*/*")
        assert got == status and title in text.lower() and "<html" not in text


@pytest.mark.parametrize("path", ["/", "/app/page?x=1", "/<script>/x", "/%22'%3E"])
async def test_the_403_page_offers_signing_in_as_someone_else_and_signing_out(store: SessionStore, path: str) -> None:
    async with stack(store) as st, browser() as client:
        await sign_in(client, st.base, rd="/")
        strict = await st.add_sidecar(store, allowed_group="auditors")  # same cookie secret, same store
        async with client.get(strict + path, headers={"Accept": "text/html"}, allow_redirects=False) as resp:
            text = await resp.text()
            assert resp.status == 403
    assert "Access denied" in text and "Sign in as someone else" in text
    assert "href='/oauth2/sign_out'" in text and "href='/oauth2/sign_out?rd=%2Foauth2%2Fstart%3Frd%3D" in text
    assert "<script>" not in text


# --- metrics -------------------------------------------------------------------------------------------------


async def test_build_info_and_request_latency_by_fixed_route(store: SessionStore) -> None:
    async with stack(store) as st, aiohttp.ClientSession() as client:
        for path in ("/ping", "/oauth2/auth", "/<script>/x", "/a" * 50, "/oauth2/no-such"):
            async with client.get(st.base + path) as resp:
                await resp.read()
        async with client.get(st.base + "/metrics") as resp:
            text = await resp.text()
    assert 'sidecar_build_info{version="' in text
    routes = {
        line.split('route="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("sidecar_request_seconds_count{")
    }
    assert {"/ping", "/oauth2/auth", "proxy"} <= routes
    fixed = {"proxy", "/metrics", "oauth_metadata", "oauth_resource_metadata"}  # the last two: --oauth-server
    assert all(r in fixed or r.startswith(("/oauth2/", "/ping", "/ready")) for r in routes), routes
    assert "<script>" not in text and "/a/a" not in text


# --- Server header -------------------------------------------------------------------------------------------


async def _app_with_server_header() -> tuple[web.AppRunner, str]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi", headers={"Server": "the-app/1.0"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/"


async def test_no_server_header_from_the_sidecar_but_the_apps_own_is_kept(store: SessionStore) -> None:
    runner, app_url = await _app_with_server_header()
    try:
        async with stack(store, skip_auth_route="^/public/") as st, browser() as client:
            # aiohttp's own: the demo app is aiohttp too, and its answer must not advertise it either.
            own = ["/ping", "/ready", "/metrics", "/oauth2/sign_in", "/oauth2/auth", "/oauth2/callback", "/x"]
            for path in own:
                async with client.get(st.base + path, allow_redirects=False) as resp:
                    assert "Server" not in resp.headers, path
            await sign_in(client, st.base)
            async with client.get(st.base + "/_demo/echo") as resp:
                assert resp.status == 200 and "Server" not in resp.headers
            base = await st.add_sidecar(store, upstream=app_url, skip_auth_route="^/public/")
            async with client.get(base + "/public/x") as resp:
                assert resp.status == 200 and resp.headers.get("Server") == "the-app/1.0"
    finally:
        await runner.cleanup()


# --- metrics files and temp dirs of a real process -----------------------------------------------------------


async def test_multiproc_dir_is_emptied_of_old_metric_files_and_temp_dirs_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    stale = multiproc / "counter_999999.db"
    stale.write_bytes(b"\0" * 64)
    other = multiproc / "README"
    other.write_text("not ours")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    redis = {"session_store_type": "redis", "redis_connection_url": redis_url}
    async with stack(sidecar=False) as st:
        from tests.stack import sidecar_settings

        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(multiproc))
        proc = SidecarProcess(sidecar_settings(st.issuer, free_port(), workers="2", **redis))
        try:
            await proc.ready()
        finally:
            proc.stop()
        assert not stale.exists() and other.read_text() == "not ours"
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
        proc = SidecarProcess(sidecar_settings(st.issuer, free_port(), workers="2", **redis))
        try:
            await proc.ready()
            assert [p.name for p in temp.iterdir() if p.name.startswith("sidecar-metrics-")]
        finally:
            proc.stop()
    assert not [p.name for p in temp.iterdir() if p.name.startswith("sidecar-metrics-")]
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None
