"""Client ID Metadata Documents (``--oauth-client-metadata-documents``) over real HTTPS.

A document server runs on loopback with TLS under a CA made here (``cryptography``); sidecars trust that CA
with ``--oauth-client-metadata-ca-file`` and, where the test needs the loopback server reachable, list its
host in ``--oauth-client-metadata-hosts``. The server counts the requests it gets, so a refusal can be shown
to have happened before any fetch, and a flood to have cost one. Hostile families: URL spellings and
special-use addresses, redirects, size, content type and encoding, client_id mismatch, bad redirect URIs,
secrets and other auth methods, slowness, TLS names, floods; the options that must be refused.
"""

from __future__ import annotations

import asyncio
import datetime
import html
import ipaddress
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.config import build_config
from sidecar.errors import ConfigError
from sidecar.oauth.cimd import MAX_CACHE, MIN_CACHE, cache_seconds, public_address
from sidecar.store import SessionStore
from tests.stack import Stack, browser, sidecar_settings
from tests.test_oauth_authorize import (
    REDIRECT,
    approve,
    authorize_params,
    consent_page,
    oauth_stack,
    pkce,
    redeem,
)

DEVICE = "urn:ietf:params:oauth:grant-type:device_code"

# --- a TLS document server on loopback ------------------------------------------------------------------------


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def make_ca_and_leaf(tmp: Path, sans: list[x509.GeneralName]) -> tuple[Path, Path, Path]:
    """A CA certificate file and a leaf certificate and key it signed for ``sans``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("cimd test CA"))
        .issuer_name(_name("cimd test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("cimd test server"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "leaf.pem", tmp / "leaf.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_file, cert_file, key_file


Behaviour = Callable[["DocServer", web.Request], Awaitable[web.StreamResponse]]


@dataclass
class DocServer:
    base: str  # https://127.0.0.1:PORT
    ca_file: str
    hits: Counter[str] = field(default_factory=Counter)
    routes: dict[str, Behaviour] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return self.base + path

    def document(self, path: str, **changes: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "client_id": self.url(path),
            "client_name": "Doc <i>Client</i>",
            "redirect_uris": [REDIRECT],
            "grant_types": ["authorization_code", "refresh_token", DEVICE],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }
        doc.update(changes)
        return {k: v for k, v in doc.items() if v is not None}


def serve_json(body: Any, content_type: str = "application/json", **headers: str) -> Behaviour:
    async def handler(server: DocServer, request: web.Request) -> web.StreamResponse:
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(text=text, content_type=content_type, headers=headers)

    return handler


def document(delay: float = 0.0, headers: dict[str, str] | None = None, **changes: Any) -> Behaviour:
    """The server's own good document for the requested path (client_id = its URL), with ``changes``."""

    async def handler(server: DocServer, request: web.Request) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        return web.json_response(server.document(request.path, **changes), headers=headers or {})

    return handler


@asynccontextmanager
async def doc_server(tmp: Path, sans: list[x509.GeneralName] | None = None) -> AsyncIterator[DocServer]:
    import ssl

    ca_file, cert_file, key_file = make_ca_and_leaf(tmp, sans or [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    server = DocServer(base="", ca_file=str(ca_file))

    async def dispatch(request: web.Request) -> web.StreamResponse:
        server.hits[request.path] += 1
        behaviour = server.routes.get(request.path)
        if behaviour is None:
            raise web.HTTPNotFound()
        return await behaviour(server, request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.base = f"https://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


def cimd_settings(docs: DocServer, hosts: str | None = "127.0.0.1", **extra: str) -> dict[str, str]:
    settings = {"oauth_client_metadata_documents": "true", "oauth_client_metadata_ca_file": docs.ca_file, **extra}
    if hosts is not None:
        settings["oauth_client_metadata_hosts"] = hosts
    return settings


async def authorize_page(base: str, client_id: str) -> tuple[int, str]:
    """GET /authorize without a browser session: an error page, or the redirect to sign in (client accepted)."""
    _, challenge = pkce()
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{base}/oauth2/authorize", params=authorize_params(client_id, challenge), allow_redirects=False
        ) as resp:
            return resp.status, html.unescape(await resp.text())


UNKNOWN = "not registered"


async def refused(base: str, client_id: str, reason: str) -> None:
    status, text = await authorize_page(base, client_id)
    assert status == 400, (client_id, status, text)
    assert reason in text, (client_id, text)
    if reason != UNKNOWN:  # not an https URL: an unknown registered client, never a document
        assert "client metadata document was not accepted" in text, (client_id, text)


# --- pure checks ----------------------------------------------------------------------------------------------

PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e", "::ffff:93.184.216.34"]
SPECIAL = [
    "127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "0.0.0.0", "100.64.0.1",
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1", "192.0.0.8",
    "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "ff02::1", "fec0::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "64:ff9b::7f00:1", "64:ff9b::a00:1",
    "2002:7f00:1::1", "2002:a00:1::", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "not-an-ip", "",
]  # fmt: skip


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_may_be_fetched_from(address: str) -> None:
    assert public_address(address)


@pytest.mark.parametrize("address", SPECIAL)
def test_special_use_addresses_are_refused_including_ipv4_inside_ipv6(address: str) -> None:
    assert not public_address(address)


def test_cache_lifetime_follows_max_age_within_bounds() -> None:
    assert cache_seconds("") == 3600
    assert cache_seconds("public, max-age=7200") == 7200
    assert cache_seconds("max-age=5") == MIN_CACHE
    assert cache_seconds("max-age=99999999") == MAX_CACHE
    assert cache_seconds("no-store") == cache_seconds("no-cache, max-age=9000") == MIN_CACHE
    assert cache_seconds("max-age=-1") == cache_seconds("max-age=abc") == 3600


# --- options ----------------------------------------------------------------------------------------------------


def _config(tmp_path: Path, **extra: str) -> Any:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    extra = {k: v.replace("JUNK", str(tmp_path / "junk.pem")) for k, v in extra.items()}
    return build_config(sidecar_settings("http://127.0.0.1:1", 4180, **extra))


ON = {"oauth_client_metadata_documents": "true"}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"oauth_client_metadata_hosts": "clients.example.com"}, "--oauth-client-metadata-hosts: only used with"),
        ({"oauth_client_metadata_ca_file": "JUNK"}, "--oauth-client-metadata-ca-file: only used with"),
        ({**ON, "oauth_server": "false", "oauth_resource": ""}, "only used with --oauth-server"),
        ({**ON, "oauth_client_metadata_hosts": "Clients.Example.com"}, "not a lower-case"),
        ({**ON, "oauth_client_metadata_hosts": "[0:0::1]"}, "not a lower-case"),
        ({**ON, "oauth_client_metadata_hosts": "::1"}, "not a lower-case"),
        ({**ON, "oauth_client_metadata_hosts": "bad host"}, "not a lower-case"),
        ({**ON, "oauth_client_metadata_hosts": "example.com."}, "not a lower-case"),
        ({**ON, "oauth_client_metadata_ca_file": "/nonexistent/ca.pem"}, "cannot load"),
        ({**ON, "oauth_client_metadata_ca_file": "JUNK"}, "cannot load"),
    ],
)
def test_client_metadata_options_are_refused_when_they_would_be_ignored_or_are_malformed(
    tmp_path: Path, extra: dict[str, str], needle: str
) -> None:
    base = {"oauth_server": "true", "oauth_resource": "/mcp"}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        _config(tmp_path, **{**base, **extra})


def test_client_metadata_options_accepted_with_the_switch(tmp_path: Path) -> None:
    ca_file, _, _ = make_ca_and_leaf(tmp_path, [x509.DNSName("x.example")])
    config = _config(
        tmp_path,
        oauth_server="true",
        oauth_resource="/mcp",
        oauth_client_metadata_documents="true",
        oauth_client_metadata_hosts="clients.example.com,10.0.0.5,[fd00::5]",
        oauth_client_metadata_ca_file=str(ca_file),
    )
    assert config.oauth_client_metadata_hosts == ("clients.example.com", "10.0.0.5", "[fd00::5]")
    assert config.oauth_client_metadata_ssl is not None


# --- the whole flow -------------------------------------------------------------------------------------------


async def test_metadata_advertises_documents_only_when_turned_on(tmp_path: Path) -> None:
    async with doc_server(tmp_path) as docs:
        async with oauth_stack() as off, oauth_stack(**cimd_settings(docs)) as on:
            for st, expected in ((off, False), (on, True)):
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{st.base}/.well-known/oauth-authorization-server") as resp:
                        assert (await resp.json())["client_id_metadata_document_supported"] is expected


async def test_code_flow_with_a_metadata_document_client(store: SessionStore, tmp_path: Path) -> None:
    async with doc_server(tmp_path) as docs, oauth_stack(store, **cimd_settings(docs)) as st, browser() as client:
        docs.routes["/client.json"] = document()
        docs.routes["/other.json"] = document()
        client_id = docs.url("/client.json")
        verifier, challenge = pkce()
        page = await consent_page(client, st.base, authorize_params(client_id, challenge, state="s1"))
        text = html.unescape(page)
        host = urlsplit(docs.base).netloc
        assert re.search(f"The application at <strong[^>]*>{re.escape(host)}</strong>, which calls itself", page)
        assert "Doc &lt;i&gt;Client&lt;/i&gt;" in page and "<i>Client" not in page
        assert "not verified" in text and client_id in text
        location = await approve(client, st.base, page)
        query = parse_qs(urlsplit(location).query)
        assert query["state"] == ["s1"] and query["iss"] == [st.base]
        code = query["code"][0]
        # the code is bound to this client_id: another document's client cannot redeem it
        status, body = await redeem(st.base, docs.url("/other.json"), code, verifier)
        assert status == 400 and body["error"] == "invalid_grant"
        verifier2, challenge2 = pkce()
        page = await consent_page(client, st.base, authorize_params(client_id, challenge2))
        query = parse_qs(urlsplit(await approve(client, st.base, page)).query)
        status, tokens = await redeem(st.base, client_id, query["code"][0], verifier2)
        assert status == 200, tokens
        # a public client: refresh with the client_id alone; a secret is refused
        form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{st.base}/oauth2/token", data={**form, "client_secret": "x"}) as resp:
                assert resp.status == 400 and (await resp.json())["error"] == "invalid_client"
            async with http.post(f"{st.base}/oauth2/token", data=form) as resp:
                assert resp.status == 200, await resp.text()
        async with client.get(f"{st.base}/oauth2/grants", headers={"Accept": "application/json"}) as resp:
            assert client_id in await resp.text()
        assert docs.hits["/client.json"] == 1  # one fetch for authorize, consent, grant and token requests


async def test_device_flow_accepts_a_metadata_document_client(tmp_path: Path) -> None:
    async with doc_server(tmp_path) as docs, oauth_stack(**cimd_settings(docs)) as st:
        docs.routes["/device.json"] = document(redirect_uris=None, grant_types=[DEVICE])
        form = {"client_id": docs.url("/device.json"), "scope": "openid"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{st.base}/oauth2/device_authorization", data=form) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["user_code"]
            docs.routes["/nodevice.json"] = document(grant_types=["authorization_code"])
            form["client_id"] = docs.url("/nodevice.json")
            async with http.post(f"{st.base}/oauth2/device_authorization", data=form) as resp:
                assert resp.status == 400 and (await resp.json())["error"] == "unauthorized_client"


async def test_switched_off_an_https_client_id_is_unknown_and_never_fetched(tmp_path: Path) -> None:
    async with doc_server(tmp_path) as docs, oauth_stack() as st:
        docs.routes["/client.json"] = document()
        status, text = await authorize_page(st.base, docs.url("/client.json"))
        assert status == 400 and "not registered" in text
        form = {"grant_type": "refresh_token", "refresh_token": "x", "client_id": docs.url("/client.json")}
        async with aiohttp.ClientSession() as http, http.post(f"{st.base}/oauth2/token", data=form) as resp:
            assert resp.status == 400
        assert docs.hits["/client.json"] == 0


# --- hostile URLs: refused before any fetch -------------------------------------------------------------------

_MAPPED = str(ipaddress.IPv6Address("::ffff:127.0.0.1"))  # the running Python's canonical spelling
_OTHER_MAPPED = "::ffff:7f00:1" if _MAPPED == "::ffff:127.0.0.1" else "::ffff:127.0.0.1"
URL_FAMILIES = [
    ("http://{hp}/client.json", UNKNOWN),
    ("HTTPS://{hp}/client.json", UNKNOWN),
    ("https:/{hp}/client.json", UNKNOWN),
    ("//{hp}/client.json", UNKNOWN),
    ("https://{hp}", "needs a path"),
    ("https://{hp}/", "needs a path"),
    ("https://{hp}/a/../client.json", "needs a path"),
    ("https://{hp}/./client.json", "needs a path"),
    ("https://{hp}/%2e%2e/client.json", "needs a path"),
    ("https://{hp}/client.json?x=1", "query or fragment"),
    ("https://{hp}/client.json#f", "query or fragment"),
    ("https://user@{hp}/client.json", "user info"),
    ("https://user:pw@{hp}/client.json", "user info"),
    ("https://{hp}/client json", "characters"),
    ("https://{hp}/clïent.json", "characters"),
    ("https://{hp}\\@evil.example/client.json", "characters"),
    ("https://127.0.0.1:0/client.json", "port"),
    ("https://127.0.0.1:99999/client.json", "port"),
    ("https://127.0.0.1:0443/client.json", "port"),
    ("https://127.0.0.1:/client.json", "port"),
    ("https://EXAMPLE.com/client.json", "lower-case"),
    ("https://example.com./client.json", "lower-case"),
    (f"https://[{_OTHER_MAPPED}]/client.json", "canonical"),
    ("https://[0:0::1]/client.json", "canonical"),
    ("https://[fe80::1%25eth0]/client.json", "canonical"),
]
ADDRESS_FAMILIES = [
    "https://{hp}/client.json",  # the document server itself, on loopback, not listed
    "https://localhost:{port}/client.json",
    "https://127.1.2.3/client.json",
    "https://10.0.0.1/client.json",
    "https://172.16.0.1/client.json",
    "https://192.168.0.1/client.json",
    "https://169.254.169.254/latest/meta-data",
    "https://0.0.0.0/client.json",
    "https://100.64.0.1/client.json",
    "https://224.0.0.1/client.json",
    "https://255.255.255.255/client.json",
    "https://[::1]:{port}/client.json",
    "https://[::]/client.json",
    f"https://[{_MAPPED}]/client.json",
    "https://[fe80::1]/client.json",
    "https://[fd00::1]/client.json",
    "https://[64:ff9b::7f00:1]/client.json",
    "https://[2002:7f00:1::1]/client.json",
]
NUMERIC_SPELLINGS = [
    "https://2130706433/client.json",
    "https://0177.0.0.1/client.json",
    "https://0x7f.0.0.1/client.json",
    "https://0x7f000001/client.json",
    "https://127.1/client.json",
    "https://127.0.1/client.json",
    "https://017700000001/client.json",
    "https://10.0.0.010/client.json",
]


async def test_hostile_client_id_urls_are_refused_before_any_fetch(tmp_path: Path) -> None:
    async with doc_server(tmp_path) as docs, oauth_stack(**cimd_settings(docs, hosts=None)) as st:
        docs.routes["/client.json"] = document()
        hp, port = urlsplit(docs.base).netloc, str(urlsplit(docs.base).port)
        for pattern, reason in URL_FAMILIES:
            await refused(st.base, pattern.format(hp=hp, port=port), reason)
        for pattern in ADDRESS_FAMILIES:
            await refused(st.base, pattern.format(hp=hp, port=port), "private or special-use address")
        for url in NUMERIC_SPELLINGS:
            await refused(st.base, url, "four decimal numbers")
        assert sum(docs.hits.values()) == 0


async def test_only_listed_hosts_are_fetched_from(tmp_path: Path) -> None:
    async with doc_server(tmp_path) as docs, oauth_stack(**cimd_settings(docs, hosts="clients.example.com")) as st:
        docs.routes["/client.json"] = document()
        await refused(st.base, docs.url("/client.json"), "not accepted here")
        await refused(st.base, "https://10.0.0.1/client.json", "not accepted here")
        assert sum(docs.hits.values()) == 0


# --- hostile answers from a listed host ---------------------------------------------------------------------------


async def _big(server: DocServer, request: web.Request) -> web.StreamResponse:
    doc = server.document(request.path, client_uri="https://a.example/" + "x" * 6000)
    return web.json_response(doc)


async def _big_chunked(server: DocServer, request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b'{"client_id": "' + server.url(request.path).encode() + b'", "x": "')
    for _ in range(100):
        await response.write(b"y" * 1024)
    await response.write(b'"}')
    await response.write_eof()
    return response


async def _gzip(server: DocServer, request: web.Request) -> web.StreamResponse:
    import gzip

    body = gzip.compress(json.dumps(server.document(request.path)).encode())
    return web.Response(body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})


async def _redirect(server: DocServer, request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(server.url("/client.json"))


async def _teapot(server: DocServer, request: web.Request) -> web.StreamResponse:
    return web.json_response(server.document(request.path), status=203)


def _mismatch(variant: Callable[[str], str]) -> Behaviour:
    async def handler(server: DocServer, request: web.Request) -> web.StreamResponse:
        return web.json_response(server.document(request.path, client_id=variant(server.url(request.path))))

    return handler


HOSTILE_ANSWERS: list[tuple[str, Behaviour, str]] = [
    ("/redirect.json", _redirect, "redirects"),
    ("/missing.json", lambda s, r: _raise404(), "HTTP 404"),
    ("/error.json", lambda s, r: _raise500(), "HTTP 500"),
    ("/partial.json", _teapot, "HTTP 203"),
    ("/big.json", _big, "larger than 5 KiB"),
    ("/chunked.json", _big_chunked, "larger than 5 KiB"),
    ("/gzip.json", _gzip, "may not be compressed"),
    ("/text.json", serve_json({"client_id": "x"}, "text/plain"), "not application/json"),
    ("/html.json", serve_json("<html></html>", "text/html"), "not application/json"),
    ("/notjson.json", serve_json("{nope"), "not JSON"),
    ("/array.json", serve_json([1, 2]), "JSON object"),
    ("/dup.json", serve_json('{"client_id": "a", "client_id": "b"}'), "repeats a member"),
    ("/mismatch1.json", _mismatch(lambda url: url + "/"), "client_id is not its URL"),
    ("/mismatch2.json", _mismatch(lambda url: url.replace("/mismatch2", "/Mismatch2")), "client_id is not its URL"),
    ("/mismatch3.json", _mismatch(lambda url: "https://other.example/mismatch3.json"), "client_id is not its URL"),
    ("/mismatch5.json", _mismatch(lambda url: url.replace("https://", "HTTPS://")), "client_id is not its URL"),
    ("/mismatch6.json", _mismatch(lambda url: url + "?"), "client_id is not its URL"),
    ("/mismatch4.json", serve_json({"client_name": "no id", "redirect_uris": [REDIRECT]}), "client_id is not its URL"),
    ("/secret.json", document(client_secret="s3cret"), "client secret"),
    ("/secret2.json", document(client_secret_expires_at=0), "client secret"),
    ("/basic.json", document(token_endpoint_auth_method="client_secret_basic"), "only public clients"),
    ("/post.json", document(token_endpoint_auth_method="client_secret_post"), "only public clients"),
    ("/pkjwt.json", document(token_endpoint_auth_method="private_key_jwt"), "private_key_jwt is not supported"),
    ("/redir1.json", document(redirect_uris=["javascript:alert(1)"]), "invalid"),
    ("/redir2.json", document(redirect_uris=["http://evil.example/cb"]), "invalid"),
    ("/redir3.json", document(redirect_uris=["https://app.example/cb#x"]), "invalid"),
    ("/redir4.json", document(redirect_uris=["myapp:/cb"]), "invalid"),
    ("/redir4b.json", document(redirect_uris=["com.example.app://host/cb"]), "invalid"),
    ("/name1.json", document(client_name="Backup tool \u202eelgoog.www"), "invisible"),
    ("/redir5.json", document(redirect_uris=[]), "invalid"),
    ("/redir6.json", document(redirect_uris="http://127.0.0.1:8123/cb"), "invalid"),
    ("/grants.json", document(grant_types=["client_credentials"]), "invalid"),
    ("/name.json", document(client_name={"en": "x"}), "invalid"),
    ("/scope.json", document(scope="admin"), "invalid"),
]


async def _raise404() -> web.StreamResponse:
    raise web.HTTPNotFound()


async def _raise500() -> web.StreamResponse:
    raise web.HTTPInternalServerError()


async def test_hostile_documents_from_a_listed_host_are_refused(tmp_path: Path) -> None:
    async with doc_server(tmp_path) as docs, oauth_stack(**cimd_settings(docs)) as st:
        for path, behaviour, _ in HOSTILE_ANSWERS:
            docs.routes[path] = behaviour
        docs.routes["/client.json"] = document()
        for path, _, reason in HOSTILE_ANSWERS:
            await refused(st.base, docs.url(path), reason)
            assert docs.hits[path] == 1, path
        assert docs.hits["/client.json"] == 0  # the redirect was not followed
        # a refused document is no client at the token endpoint either
        form = {"grant_type": "refresh_token", "refresh_token": "scr.x.y", "client_id": docs.url("/pkjwt.json")}
        async with aiohttp.ClientSession() as http, http.post(f"{st.base}/oauth2/token", data=form) as resp:
            assert resp.status == 400 and (await resp.json())["error"] == "invalid_client"


async def test_tls_is_verified_against_the_url_host(tmp_path: Path) -> None:
    # the certificate names 127.0.0.1 only: localhost (listed, resolving to loopback) fails verification
    async with doc_server(tmp_path) as docs, oauth_stack(**cimd_settings(docs, hosts="localhost,127.0.0.1")) as st:
        docs.routes["/client.json"] = document()
        port = urlsplit(docs.base).port
        await refused(st.base, f"https://localhost:{port}/client.json", "could not be fetched")
    # a CA the sidecar does not trust
    (tmp_path / "other").mkdir()
    async with doc_server(tmp_path / "other") as docs:
        async with oauth_stack(oauth_client_metadata_documents="true", oauth_client_metadata_hosts="127.0.0.1") as st:
            docs.routes["/client.json"] = document()
            await refused(st.base, docs.url("/client.json"), "could not be fetched")


async def test_a_listed_host_name_is_resolved_and_fetched_with_its_name(tmp_path: Path) -> None:
    sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    async with doc_server(tmp_path, sans) as docs, oauth_stack(**cimd_settings(docs, hosts="localhost")) as st:
        url = f"https://localhost:{urlsplit(docs.base).port}/client.json"
        docs.routes["/client.json"] = serve_json(docs.document("/client.json", client_id=url))
        status, text = await authorize_page(st.base, url)
        assert status == 302, text  # accepted: on to the sign-in
        assert docs.hits["/client.json"] == 1


async def test_a_slow_server_times_out_in_five_seconds_and_the_failure_is_held(tmp_path: Path) -> None:
    async with doc_server(tmp_path) as docs, oauth_stack(**cimd_settings(docs)) as st:
        docs.routes["/slow.json"] = document(delay=6.5)
        started = time.monotonic()
        await refused(st.base, docs.url("/slow.json"), "did not answer in time")
        assert 4.5 < time.monotonic() - started < 7.5
        started = time.monotonic()
        await refused(st.base, docs.url("/slow.json"), "did not answer in time")
        assert time.monotonic() - started < 1.0  # held: no second fetch
        assert docs.hits["/slow.json"] == 1


# --- floods ---------------------------------------------------------------------------------------------------


async def test_a_flood_of_authorize_requests_for_one_url_costs_one_fetch(tmp_path: Path) -> None:
    async with doc_server(tmp_path) as docs, oauth_stack(**cimd_settings(docs)) as st:
        docs.routes["/client.json"] = document(delay=0.3)
        docs.routes["/broken.json"] = lambda s, r: _raise404()
        good = await asyncio.gather(*(authorize_page(st.base, docs.url("/client.json")) for _ in range(30)))
        assert all(status == 302 for status, _ in good)
        bad = await asyncio.gather(*(authorize_page(st.base, docs.url("/broken.json")) for _ in range(30)))
        assert all(status == 400 and "HTTP 404" in text for status, text in bad)
        for _ in range(10):  # afterwards: from the cache (and the failure hold)
            assert (await authorize_page(st.base, docs.url("/client.json")))[0] == 302
            assert (await authorize_page(st.base, docs.url("/broken.json")))[0] == 400
        assert docs.hits["/client.json"] == 1 and docs.hits["/broken.json"] == 1


async def test_cache_control_max_age_is_respected_within_bounds(tmp_path: Path) -> None:
    from sidecar.oauth.cimd import DOCUMENTS, MetadataDocuments

    async with doc_server(tmp_path) as docs, oauth_stack(**cimd_settings(docs)) as st:
        docs.routes["/short.json"] = document(headers={"Cache-Control": "max-age=1"})
        docs.routes["/long.json"] = document(headers={"Cache-Control": "max-age=7200"})
        now = [1000.0]
        documents = _app_of(st)[DOCUMENTS]
        assert isinstance(documents, MetadataDocuments)
        documents._clock = lambda: now[0]  # the cache's clock only; the fetches are real
        for path in ("/short.json", "/long.json"):
            assert (await authorize_page(st.base, docs.url(path)))[0] == 302
        now[0] += 299  # max-age=1 is raised to the 5 minute floor
        for path in ("/short.json", "/long.json"):
            assert (await authorize_page(st.base, docs.url(path)))[0] == 302
        assert docs.hits == Counter({"/short.json": 1, "/long.json": 1})
        now[0] += 2
        assert (await authorize_page(st.base, docs.url("/short.json")))[0] == 302
        assert docs.hits["/short.json"] == 2
        now[0] += 7200
        assert (await authorize_page(st.base, docs.url("/long.json")))[0] == 302
        assert docs.hits["/long.json"] == 2


def _app_of(st: Stack) -> web.Application:
    return st.runners[0].app


async def test_new_document_urls_are_limited_per_address_known_ones_and_garbage_cost_nothing(tmp_path: Path) -> None:
    async with doc_server(tmp_path) as docs, oauth_stack(**cimd_settings(docs, signin_rate_limit="2")) as st:
        for i in range(6):
            docs.routes[f"/c{i}.json"] = document()
        statuses = [(await authorize_page(st.base, docs.url(f"/c{i}.json")))[0] for i in range(6)]
        assert statuses == [302] * 4 + [429] * 2  # burst: twice --signin-rate-limit, then no fetch
        assert docs.hits[("/c4.json")] == 0 and docs.hits["/c5.json"] == 0
        assert (await authorize_page(st.base, docs.url("/c0.json")))[0] == 302  # cached: no fetch, no limit
        assert (await authorize_page(st.base, "https://127.0.0.1/../x.json"))[0] == 400  # refused before a fetch
