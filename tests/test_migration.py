"""oauth2-proxy options people rely on, each against real parts: the dev provider over real HTTP (and
HTTPS with a private CA), a second dev provider as an extra JWT issuer, real sidecars on loopback."""

from __future__ import annotations

import datetime
import html
import ipaddress
import logging
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from sidecar.app import build_app
from sidecar.config import build_config
from sidecar.context import forwarded_client_ip
from sidecar.cookies import cookie_domain_for
from sidecar.dev.provider import DevProvider, run_provider
from sidecar.errors import ConfigError
from sidecar.store import MemoryStore
from sidecar.templates import Html, load_templates
from tests.stack import COOKIE_SECRET, browser, free_port, session_cookie, sidecar_settings, sign_in, stack

BEARER_401 = 'Bearer error="invalid_token"'


def _settings(**overrides: Any) -> dict[str, Any]:
    return sidecar_settings("http://127.0.0.1:1", free_port(), **overrides)


def _problem(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(_settings(**overrides))
    return str(info.value)


# ------------------------------------------------------------------ --cookie-secret-file


def test_cookie_secret_file_is_read_and_a_flag_wins(tmp_path: Path) -> None:
    path = tmp_path / "cookie-secret"
    path.write_text("from-the-file-0123456789abcdef\n")
    config = build_config({**_settings(cookie_secret=""), "cookie_secret_file": str(path)})
    assert config.cookie_secrets == (b"from-the-file-0123456789abcdef",)
    config = build_config({**_settings(), "cookie_secret_file": str(path)})
    assert config.cookie_secrets == (COOKIE_SECRET.encode(),)


@pytest.mark.parametrize("content", [None, "", "\n  \n", "short", b"\xff\xfe-not-text-0123456789"])
def test_a_missing_empty_short_or_binary_cookie_secret_file_stops_start_up(tmp_path: Path, content: Any) -> None:
    path = tmp_path / "cookie-secret"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    problem = _problem(cookie_secret="", cookie_secret_file=str(path))
    assert "--cookie-secret" in problem
    assert "short" not in problem.replace("too short", "")  # the secret itself is never repeated


# ------------------------------------------------------------------ --provider-ca-file, --ssl-insecure-skip-verify


def _certificate(
    subject: str, key: rsa.RSAPrivateKey, issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None, ca: bool
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@asynccontextmanager
async def _https_provider(tmp_path: Path) -> AsyncIterator[tuple[DevProvider, str, Path]]:
    """The dev provider on HTTPS with a certificate from a private CA; yields (provider, issuer, CA file)."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = _certificate("sidecar test CA", ca_key, None, ca=True)
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = _certificate("127.0.0.1", leaf_key, (ca.subject, ca_key), ca=False)
    (tmp_path / "ca.pem").write_bytes(_pem(ca))
    (tmp_path / "leaf.pem").write_bytes(_pem(leaf))
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "leaf.key").write_bytes(key_pem)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    port = free_port()
    issuer = f"https://127.0.0.1:{port}"
    provider = DevProvider(issuer, auto_login="alice")
    runner = web.AppRunner(provider.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_ssl).start()
    try:
        yield provider, issuer, tmp_path / "ca.pem"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _sidecar(issuer: str, **overrides: Any) -> AsyncIterator[str]:
    port = free_port()
    config = build_config(sidecar_settings(issuer, port, "", **overrides))
    runner = web.AppRunner(build_app(config), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _tls_browser(ca_file: Path) -> aiohttp.ClientSession:
    """A browser that trusts the test CA (it visits the provider's pages itself)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), connector=aiohttp.TCPConnector(ssl=context))


async def test_provider_ca_file_lets_sign_in_reach_a_provider_with_a_private_ca(tmp_path: Path) -> None:
    async with _https_provider(tmp_path) as (provider, issuer, ca_file):
        async with _sidecar(issuer, provider_ca_file=str(ca_file)) as base, _tls_browser(ca_file) as client:
            await sign_in(client, base, rd="/")
            assert session_cookie(client) is not None
            assert provider.stats()["token_calls"]["authorization_code"] == 1
            async with client.get(f"{base}/oauth2/auth") as resp:
                assert resp.status == 202


async def test_without_the_ca_file_the_private_ca_provider_is_not_trusted(tmp_path: Path) -> None:
    async with _https_provider(tmp_path) as (provider, issuer, _):
        async with _sidecar(issuer) as base, aiohttp.ClientSession() as client:
            async with client.get(f"{base}/oauth2/start", allow_redirects=False) as resp:
                assert resp.status == 503  # the provider cannot be verified: unavailable, never trusted
        assert provider.discovery_calls == 0  # the TLS handshake failed before any request


async def test_ssl_insecure_skip_verify_connects_and_warns_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar")
    async with _https_provider(tmp_path) as (provider, issuer, ca_file):
        async with _sidecar(issuer, ssl_insecure_skip_verify="true") as base, _tls_browser(ca_file) as client:
            await sign_in(client, base, rd="/")
            assert session_cookie(client) is not None
    assert any("--ssl-insecure-skip-verify" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", [None, "", "not a certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_an_unreadable_or_bad_ca_file_stops_start_up(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(content)
    assert "--provider-ca-file" in _problem(provider_ca_file=str(path))


# ------------------------------------------------------------------ --skip-jwt-bearer-tokens, --extra-jwt-issuers


def _claims(issuer: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": "cli-user-1",
        "aud": "sidecar-dev",
        "iat": now,
        "exp": now + 300,
        "email": "carol@example.com",
        "email_verified": True,
        "groups": ["staff"],
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


async def _auth(base: str, token: str | None, **headers: str) -> aiohttp.ClientResponse:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as client, client.get(f"{base}/oauth2/auth", headers=headers) as resp:
        await resp.read()
        return resp


async def test_a_valid_bearer_jwt_is_forwarded_as_the_identity_it_names() -> None:
    async with stack(None, upstream="", skip_jwt_bearer_tokens="true") as st:
        resp = await _auth(st.base, st.provider.keys.sign(_claims(st.issuer)))
        assert resp.status == 202
        assert resp.headers["X-Auth-Request-Email"] == "carol@example.com"
        assert resp.headers["X-Auth-Request-Groups"] == "staff"


async def test_the_providers_own_access_token_is_accepted_as_a_bearer(store: Any) -> None:
    async with stack(store, skip_jwt_bearer_tokens="true", pass_access_token="true") as st, browser() as client:
        await sign_in(client, st.base)
        async with client.get(f"{st.base}/_demo/echo") as resp:
            headers = (await resp.json())["headers"]
        token = next(v for k, v in headers.items() if k.lower() == "x-forwarded-access-token")
        async with aiohttp.ClientSession() as cli:  # no cookie: the token alone
            async with cli.get(f"{st.base}/_demo/echo", headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
                seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
        assert seen["x-forwarded-user"] == "alice-sub-1"  # the dev access token names only the sub


def _foreign_key_token(issuer: str, kid: str) -> str:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(_claims(issuer), other, algorithm="RS256", headers={"kid": kid})


def _hostile_tokens(provider: DevProvider, issuer: str) -> dict[str, str]:
    sign, now = provider.keys.sign, int(time.time())
    good = sign(_claims(issuer))
    head, body, sig = good.split(".")
    tampered_sig = sig[:-4] + ("AAAA" if not sig.endswith("AAAA") else "BBBB")
    return {
        "expired": sign(_claims(issuer, exp=now - 600, iat=now - 900)),
        "not yet valid": sign(_claims(issuer, nbf=now + 600)),
        "issued in the future": sign(_claims(issuer, iat=now + 600)),
        "no exp": sign(_claims(issuer, exp=None)),
        "no iat": sign(_claims(issuer, iat=None)),
        "no sub": sign(_claims(issuer, sub=None)),
        "wrong audience": sign(_claims(issuer, aud="someone-else")),
        "unknown issuer": sign(_claims("https://evil.example")),
        "issuer with a path": sign(_claims(issuer + "/other")),
        "alg none": jwt.encode(_claims(issuer), None, algorithm="none"),
        "HS256 with a guessable secret": jwt.encode(_claims(issuer), "sidecar-dev-secret" * 2, algorithm="HS256"),
        "a key the provider does not publish": _foreign_key_token(issuer, provider.keys.current.kid),
        "tampered signature": f"{head}.{body}.{tampered_sig}",
        "claims swapped under a valid signature": f"{head}.{jwt.utils.base64url_encode(b'{}').decode()}.{sig}",
        "opaque": "not-a-jwt-at-all",
        "empty": "",
        "two parts": f"{head}.{body}",
        "huge": "a" * 4000 + "." + "b" * 3500 + ".c",  # just under the 8 KB header limit (larger: 400)
    }


async def test_every_invalid_bearer_gets_401_invalid_token_even_with_a_valid_cookie(store: Any) -> None:
    async with stack(store, upstream="", skip_jwt_bearer_tokens="true") as st, browser() as client:
        await sign_in(client, st.base, rd="/")
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 202  # the cookie alone is a session
        for what, token in _hostile_tokens(st.provider, st.issuer).items():
            async with client.get(f"{st.base}/oauth2/auth", headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 401, what
                challenge = resp.headers.get("WWW-Authenticate", "")  # "Bearer " alone is malformed (RFC 6750 3.1)
                assert challenge.startswith('Bearer error="invalid_request"' if not token else BEARER_401), what
                assert "X-Auth-Request-User" not in resp.headers, what


async def test_two_authorization_headers_are_refused() -> None:
    async with stack(None, upstream="", skip_jwt_bearer_tokens="true") as st:
        good = st.provider.keys.sign(_claims(st.issuer))
        async with aiohttp.ClientSession() as client:
            headers = [("Authorization", f"Bearer {good}"), ("Authorization", "Basic dXNlcjpwYXNz")]
            async with client.get(f"{st.base}/oauth2/auth", headers=headers) as resp:
                assert resp.status == 401  # not 400 at an auth subrequest: RFC 6750 3.1's invalid_request in a 401
                assert resp.headers["WWW-Authenticate"].startswith('Bearer error="invalid_request"')


async def test_bearer_identities_meet_the_email_and_group_rules() -> None:
    async with stack(None, upstream="", skip_jwt_bearer_tokens="true", allowed_group="admins") as st:
        sign = st.provider.keys.sign
        assert (await _auth(st.base, sign(_claims(st.issuer)))).status == 403  # staff only
        assert (await _auth(st.base, sign(_claims(st.issuer, groups=["admins"])))).status == 202
    async with stack(None, upstream="", skip_jwt_bearer_tokens="true", email_domain="example.org") as st:
        sign = st.provider.keys.sign
        assert (await _auth(st.base, sign(_claims(st.issuer)))).status == 403
        assert (await _auth(st.base, sign(_claims(st.issuer, email="d@example.org")))).status == 202
        unverified = sign(_claims(st.issuer, email="d@example.org", email_verified=False))
        assert (await _auth(st.base, unverified)).status == 403


async def test_without_the_option_a_bearer_is_not_an_identity() -> None:
    async with stack(None, upstream="") as st:
        resp = await _auth(st.base, st.provider.keys.sign(_claims(st.issuer)))
        assert resp.status == 401
        assert "Bearer" not in resp.headers.get("WWW-Authenticate", "")


async def test_an_extra_issuer_is_accepted_with_its_own_keys_and_audience() -> None:
    runner, other = await run_provider("127.0.0.1", free_port())
    try:
        extra = f"{other.issuer}=api-audience"
        async with stack(None, upstream="", skip_jwt_bearer_tokens="true", extra_jwt_issuers=extra) as st:
            # First, so that the extra issuer's keys are fetched for it (an unknown kid moments after a
            # fetch is "cannot tell yet", 503, not "invalid").
            forged = st.provider.keys.sign(_claims(other.issuer, aud="api-audience"))
            assert (await _auth(st.base, forged)).status == 401
            ok = other.keys.sign(_claims(other.issuer, aud="api-audience"))
            assert (await _auth(st.base, ok)).status == 202
            assert (await _auth(st.base, st.provider.keys.sign(_claims(st.issuer)))).status == 202
            refused = {
                "our client id is not that issuer's audience": other.keys.sign(_claims(other.issuer)),
                "its audience is not ours": st.provider.keys.sign(_claims(st.issuer, aud="api-audience")),
            }
            for what, token in refused.items():
                resp = await _auth(st.base, token)
                assert resp.status == 401, what
                assert resp.headers["WWW-Authenticate"] == BEARER_401, what
        async with stack(None, upstream="", skip_jwt_bearer_tokens="true") as st:
            assert (await _auth(st.base, other.keys.sign(_claims(other.issuer, aud="api-audience")))).status == 401
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("value", ["no-equals", "https://idp.example=", "=aud", "ftp://idp=aud"])
def test_bad_extra_jwt_issuers_stop_start_up(value: str) -> None:
    assert "--extra-jwt-issuers" in _problem(skip_jwt_bearer_tokens="true", extra_jwt_issuers=value)


def test_extra_jwt_issuers_without_the_bearer_option_stop_start_up() -> None:
    assert "--skip-jwt-bearer-tokens" in _problem(extra_jwt_issuers="https://idp.example=aud")


# ------------------------------------------------------------------ --api-route


async def test_api_routes_get_401_where_pages_get_a_redirect() -> None:
    async with stack(None, api_route=["^/api/", "^/v[0-9]+/"]) as st, aiohttp.ClientSession() as client:
        html = {"Accept": "text/html"}
        for path in ("/api/items", "/v2/things", "/api/"):
            async with client.get(st.base + path, headers=html, allow_redirects=False) as resp:
                assert resp.status == 401, path
        for path in ("/page", "/apix", "/x/api/"):
            async with client.get(st.base + path, headers=html, allow_redirects=False) as resp:
                assert resp.status == 302, path
                assert resp.headers["Location"].startswith("/oauth2/start?rd=")


@pytest.mark.parametrize("pattern", ["(", "[a-", "*x"])
def test_a_bad_api_route_regex_stops_start_up(pattern: str) -> None:
    assert "--api-route" in _problem(api_route=[pattern])


# ------------------------------------------------------------------ --proxy-prefix, --ping-path, --ready-path


async def test_every_endpoint_moves_under_the_proxy_prefix() -> None:
    overrides = {
        "proxy_prefix": "/sso",
        "ping_path": "/healthz",
        "ready_path": "/readyz",
        "redirect_url": "/sso/callback",
    }
    async with stack(None, **overrides) as st, browser() as client:
        for path in ("/healthz", "/readyz"):
            async with client.get(st.base + path) as resp:
                assert resp.status == 200 and await resp.text() == "OK\n", path
        for path in ("/ping", "/ready", "/oauth2/auth", "/oauth2/start"):
            async with client.get(st.base + path, allow_redirects=False) as resp:
                assert resp.status == 401, path  # now just paths of the app, behind sign-in
        async with client.get(f"{st.base}/page", headers={"Accept": "text/html"}, allow_redirects=False) as resp:
            assert resp.headers["Location"].startswith("/sso/start?rd=")
        async with client.get(f"{st.base}/sso/start", allow_redirects=False) as resp:
            assert (
                f"redirect_uri=http%3A%2F%2F127.0.0.1%3A{st.base.rsplit(':', 1)[1]}%2Fsso%2Fcallback"
                in (resp.headers["Location"])
            )
        resp = await sign_in(client, st.base, rd="/_demo/echo")
        assert resp.status == 200
        async with client.get(f"{st.base}/sso/auth") as resp:
            assert resp.status == 202
        async with client.get(f"{st.base}/sso/sign_in") as resp:
            assert "/sso/start?rd=" in await resp.text()


@pytest.mark.parametrize("value", ["oauth2", "/oauth2/", "//oauth2", "/a b", "/ü", "", "/x?y"])
@pytest.mark.parametrize("option", ["proxy_prefix", "ping_path", "ready_path"])
def test_bad_endpoint_paths_stop_start_up(option: str, value: str) -> None:
    assert f"--{option.replace('_', '-')}" in _problem(**{option: value})


# ------------------------------------------------------------------ relative --redirect-url


async def test_a_relative_redirect_url_is_built_from_the_requests_host_and_used_for_the_exchange() -> None:
    async with stack(None, redirect_url="/oauth2/callback") as st, browser() as client:
        async with client.get(
            f"{st.base}/oauth2/start", headers={"Host": "app.example.test:8443"}, allow_redirects=False
        ) as resp:
            assert "redirect_uri=http%3A%2F%2Fapp.example.test%3A8443%2Foauth2%2Fcallback" in resp.headers["Location"]
        resp = await sign_in(client, st.base, rd="/_demo/echo")  # the provider checks the exchange's redirect_uri
        assert resp.status == 200
        assert st.provider.stats()["token_calls"]["authorization_code"] == 1


async def test_a_forwarded_host_builds_the_callback_only_from_a_trusted_proxy() -> None:
    async with stack(None, redirect_url="/oauth2/callback", reverse_proxy="true") as st:
        async with aiohttp.ClientSession() as client:
            headers = {"X-Forwarded-Host": "public.example.com", "X-Forwarded-Proto": "https"}
            async with client.get(f"{st.base}/oauth2/start", headers=headers, allow_redirects=False) as resp:
                assert "redirect_uri=https%3A%2F%2Fpublic.example.com%2Foauth2%2Fcallback" in resp.headers["Location"]
    async with stack(None, redirect_url="/oauth2/callback", reverse_proxy="true", trusted_proxy="10.0.0.0/8") as st:
        async with aiohttp.ClientSession() as client:
            headers = {"X-Forwarded-Host": "evil.example.com"}
            async with client.get(f"{st.base}/oauth2/start", headers=headers, allow_redirects=False) as resp:
                assert "evil.example.com" not in resp.headers["Location"]


@pytest.mark.parametrize("value", ["oauth2/callback", "//evil.example/cb", "/cb?x=1", "ftp://x/cb"])
def test_bad_redirect_urls_stop_start_up(value: str) -> None:
    assert "--redirect-url" in _problem(redirect_url=value)


# ------------------------------------------------------------------ --real-client-ip-header


def _request(headers: list[tuple[str, str]]) -> web.Request:
    from multidict import CIMultiDict

    return make_mocked_request("GET", "/", headers=CIMultiDict(headers))


@pytest.mark.parametrize(
    ("header", "values", "expected"),
    [
        ("X-Real-IP", ["203.0.113.7"], "203.0.113.7"),
        ("X-Real-IP", ["2001:db8::1"], "2001:db8::1"),
        ("X-Real-IP", ["203.0.113.7:5555"], "203.0.113.7"),
        ("X-Real-IP", ["not-an-ip"], None),
        ("X-Real-IP", ["203.0.113.7, 198.51.100.1"], None),  # one proxy, one address
        ("X-Real-IP", ["203.0.113.7", "198.51.100.1"], None),
        ("X-ProxyUser-IP", ["198.51.100.9"], "198.51.100.9"),
        # X-Forwarded-For: the right-most address that is not a trusted proxy (127.0.0.0/8, 10.0.0.0/8 here)
        ("X-Forwarded-For", ["203.0.113.7"], "203.0.113.7"),
        ("X-Forwarded-For", ["1.2.3.4, 203.0.113.7"], "203.0.113.7"),  # 1.2.3.4 was the client's own word
        ("X-Forwarded-For", ["1.2.3.4, 203.0.113.7, 10.1.1.1, 127.0.0.1"], "203.0.113.7"),
        ("X-Forwarded-For", ["1.2.3.4", "203.0.113.7, 10.1.1.1"], "203.0.113.7"),
        ("X-Forwarded-For", ["10.1.1.1, 127.0.0.1"], None),
        ("X-Forwarded-For", ["1.2.3.4, garbage, 10.1.1.1"], None),
        ("X-Forwarded-For", ["[2001:db8::7]:443"], "2001:db8::7"),
    ],
)
def test_the_client_ip_comes_from_the_configured_header(header: str, values: list[str], expected: str | None) -> None:
    config = build_config(_settings(real_client_ip_header=header, trusted_proxy="127.0.0.0/8,10.0.0.0/8"))
    request = _request([(header, v) for v in values] + [("X-Other", "192.0.2.1")])
    assert forwarded_client_ip(request, config) == expected


async def test_the_client_ip_header_is_believed_only_from_a_trusted_proxy_with_reverse_proxy() -> None:
    """Through a real request: the per-client sign-in rate limit counts the client the header names."""
    for trusted, expected_limited in ((True, False), (False, True)):
        extra = {"reverse_proxy": "true"} if trusted else {}
        async with stack(None, signin_rate_limit="1", **extra) as st, aiohttp.ClientSession() as client:
            statuses = []
            for i in range(4):  # burst of two per client: four distinct claimed clients
                headers = {"X-Real-IP": f"203.0.113.{i + 1}"}
                async with client.get(f"{st.base}/oauth2/start", headers=headers, allow_redirects=False) as resp:
                    statuses.append(resp.status)
            assert (429 in statuses) is expected_limited, statuses


def test_a_bad_client_ip_header_name_stops_start_up() -> None:
    assert "--real-client-ip-header" in _problem(real_client_ip_header="X Real IP")


# ------------------------------------------------------------------ --cookie-domain as a list


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("app.example.com", "app.example.com"),
        ("x.app.example.com", "app.example.com"),
        ("X.App.Example.COM:8443", "app.example.com"),
        ("example.com", "example.com"),
        ("other.example.com", "example.com"),
        ("badexample.com", None),
        ("example.com.evil.org", None),
        ("evil.org", None),
        ("[::1]:80", None),
        ("", None),
    ],
)
def test_the_longest_cookie_domain_the_host_falls_under(host: str, expected: str | None) -> None:
    config = build_config(_settings(cookie_domain=["example.com", ".app.example.com"]))
    assert config.cookie_domains == ("app.example.com", "example.com")
    assert cookie_domain_for(config.cookie_domains, host) == expected


async def test_set_and_cleared_cookies_carry_the_domain_chosen_for_the_host() -> None:
    async with stack(None, cookie_domain=["example.com", "app.example.com"]) as st:
        async with aiohttp.ClientSession() as client:
            for host, domain in (("x.app.example.com", "app.example.com"), ("www.example.com", "example.com")):
                async with client.get(f"{st.base}/oauth2/start", headers={"Host": host}, allow_redirects=False) as resp:
                    cookie = resp.headers["Set-Cookie"]
                    assert f"Domain={domain}" in cookie, cookie
            async with client.get(
                f"{st.base}/oauth2/sign_out", headers={"Host": "other.org"}, allow_redirects=False
            ) as resp:
                assert "Domain=" not in resp.headers["Set-Cookie"]  # host-only, which the browser accepts


@pytest.mark.parametrize("value", ["exa mple.com", "-bad.com", "com", "."])
def test_a_bad_cookie_domain_stops_start_up(value: str) -> None:
    assert "--cookie-domain" in _problem(cookie_domain=[value])


# ------------------------------------------------------------------ --version


def test_version_prints_the_package_version_and_exits_0() -> None:
    from importlib.metadata import version

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "OAUTH2_PROXY_"))}
    proc = subprocess.run([sys.executable, "-m", "sidecar", "--version"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"sidecar {version('sidecar')}\n"


# ------------------------------------------------------------------ --banner, --footer, --custom-templates-dir


async def test_the_sign_in_page_carries_the_escaped_banner_and_footer() -> None:
    banner, footer = "<b>ACME</b> staff only & friends", "<script>alert(1)</script>"
    async with stack(None, banner=banner, footer=footer) as st, aiohttp.ClientSession() as client:
        async with client.get(f"{st.base}/oauth2/sign_in?rd=/x%27%3E%3Cscript%3E") as resp:
            page = await resp.text()
    assert "&lt;b&gt;ACME&lt;/b&gt; staff only &amp; friends" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>" not in page


async def test_custom_templates_are_used_for_the_sign_in_page(tmp_path: Path) -> None:
    (tmp_path / "sign_in.html").write_text("<main>$banner<a id=go href='$sign_in_url'>Go</a> back to $redirect</main>")
    async with stack(None, custom_templates_dir=str(tmp_path), banner="Hi") as st, aiohttp.ClientSession() as client:
        async with client.get(f"{st.base}/oauth2/sign_in?rd=/docs") as resp:
            page = await resp.text()
    assert page.startswith("<main><div class='banner'>Hi</div><a id=go href='/oauth2/start?rd=%2Fdocs'>Go</a>")
    assert page.endswith("back to /docs</main>")


def test_the_error_template_renders_with_links_built_by_the_sidecar(tmp_path: Path) -> None:
    (tmp_path / "error.html").write_text("[$status] $title: $message $actions$footer")
    pages = load_templates(str(tmp_path), "", "bye")
    text = pages.render("error", status="403", title="Denied", message="<not you>", actions=Html("<a href='/x'>x</a>"))
    assert text == "[403] Denied: &lt;not you&gt; <a href='/x'>x</a><div class='footer'>bye</div>"


# Operator and request text that must never become markup, nor a placeholder filled in a second time.
HOSTILE_TEXT = (
    "<script>alert(1)</script>",
    "\"'><img src=x onerror=alert(1)>",
    "&lt;b&gt; $title ${message}",
    "a\u202eb</div>",
)
ERROR_PAGES = [
    ("forbidden", 403, "Access denied"),
    ("expired", 400, "Sign-in expired"),
    ("refused", 403, "Sign-in refused"),
]


async def _branded_error_page(kind: str, hostile: str, **branding: str) -> str:
    """The HTML error page ``kind`` from a sidecar with ``branding``, reached with ``hostile`` request text: in
    the query (403 after sign-in, from a stricter sidecar sharing the store), the state, or the provider's error."""
    store = MemoryStore()
    async with stack(store) as st, browser() as client:
        if kind == "forbidden":
            assert (await sign_in(client, st.base, rd="/")).status == 200
            base = await st.add_sidecar(store, allowed_group="auditors", **branding)
            url, params = f"{base}/app/page", {"q": hostile}
        else:
            base = await st.add_sidecar(store, **branding)
            url = f"{base}/oauth2/callback"
            params = {"state": hostile, "code": hostile} if kind == "expired" else {"error": hostile, "state": "s"}
        async with client.get(url, params=params, headers={"Accept": "text/html"}, allow_redirects=False) as resp:
            assert resp.headers["Content-Type"].startswith("text/html")
            assert resp.status == dict((k, s) for k, s, _ in ERROR_PAGES)[kind]
            return await resp.text()


def _no_markup_from(hostile: str, page: str) -> None:
    assert hostile not in page and "<script" not in page and "<img" not in page and "b</div>" not in page


@pytest.mark.parametrize("hostile", HOSTILE_TEXT)
@pytest.mark.parametrize(("kind", "status", "title"), ERROR_PAGES)
async def test_error_pages_carry_the_escaped_banner_and_footer(
    kind: str, status: int, title: str, hostile: str
) -> None:
    banner, footer = f"ACME staff {hostile}", f"Help: {hostile}"
    page = await _branded_error_page(kind, hostile, banner=banner, footer=footer)
    assert f"<header class='banner'>{html.escape(banner)}</header><main><h1>{title}</h1>" in page
    assert page.endswith(f"<footer class='footer'>{html.escape(footer)}</footer></body></html>")
    assert "<ul class='actions'><li><a href='/oauth2/" in page  # the way on survives the template
    _no_markup_from(hostile, page)
    if kind == "refused":  # the provider's word is shown, escaped
        assert f"The identity provider said: {html.escape(hostile)}</p>" in page


@pytest.mark.parametrize("hostile", HOSTILE_TEXT)
@pytest.mark.parametrize(("kind", "status", "title"), ERROR_PAGES)
async def test_a_custom_error_template_is_used_for_every_error_page(
    tmp_path: Path, kind: str, status: int, title: str, hostile: str
) -> None:
    (tmp_path / "error.html").write_text(
        "<main>$banner<h2>[$status] $title</h2><p>$message</p><nav>$actions</nav>$footer</main>"
    )
    page = await _branded_error_page(kind, hostile, custom_templates_dir=str(tmp_path), banner=hostile, footer="bye")
    assert page.startswith(f"<main><div class='banner'>{html.escape(hostile)}</div><h2>[{status}] {title}</h2><p>")
    assert "</p><nav><ul class='actions'><li><a href='/oauth2/" in page
    assert page.endswith("</a></li></ul></nav><div class='footer'>bye</div></main>")
    _no_markup_from(hostile, page)
    if kind == "refused":
        assert f"The identity provider said: {html.escape(hostile)}</p>" in page
    if kind == "forbidden":  # the link back goes to the (encoded) page asked for, never the raw text
        assert "Sign in as someone else" in page
        assert "href='/oauth2/sign_out?rd=%2Foauth2%2Fstart%3Frd%3D%252Fapp%252Fpage%253Fq%253D" in page


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"sign_in.html": "<a href='/'>no link placeholder</a>"}, "$sign_in_url"),
        ({"sign_in.html": "$sign_in_url $usre"}, "$usre"),
        ({"error.html": "$title only"}, "$message"),
        ({"error.html": "$message costs $5"}, "'$'"),
        ({"sign_in.html": b"\xff\xfe$sign_in_url"}, "UTF-8"),
        ({"other.html": "$message"}, "neither"),
    ],
)
def test_bad_custom_templates_stop_start_up(tmp_path: Path, files: dict[str, Any], expected: str) -> None:
    for name, content in files.items():
        target = tmp_path / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    problem = _problem(custom_templates_dir=str(tmp_path))
    assert "--custom-templates-dir" in problem and expected in problem


def test_a_missing_or_unreadable_templates_dir_stops_start_up(tmp_path: Path) -> None:
    assert "--custom-templates-dir" in _problem(custom_templates_dir=str(tmp_path / "nope"))
    (tmp_path / "sign_in.html").mkdir()  # a directory where the file should be: cannot be read
    assert "cannot read" in _problem(custom_templates_dir=str(tmp_path))
