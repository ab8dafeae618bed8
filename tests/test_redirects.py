"""The rd parameter: same origin exactly, whitelist entries with oauth2-proxy's meaning, and a
large family of spellings that browsers read differently from naive parsers."""

from __future__ import annotations

import pytest

from sidecar.rules import parse_host_rule
from sidecar.store import MemoryStore
from sidecar.urls import safe_redirect
from tests.stack import browser, stack

HERE = "app.test:8080"  # the request came to http://app.test:8080


def _rd(rd: str, *whitelist: str, scheme: str = "http", host: str = HERE) -> str:
    return safe_redirect(rd, scheme, host, tuple(parse_host_rule(w) for w in whitelist))


@pytest.mark.parametrize(
    "rd",
    [
        "/", "/a/b?c=d#e", "/%2e%2e/x", "/a//b", "http://app.test:8080/x", "HTTP://app.test:8080/x".lower(),
        "http://APP.test:8080/x",
        # encoded data in a query or fragment (mcp-remote's encodeURIComponent: scope=openid%20email)
        "/oauth2/authorize?scope=openid%20email&state=a%0Ab%5C", "/x#a%20b", "http://app.test:8080/x?q=%09%2F%2F",
    ],
)  # fmt: skip
def test_local_paths_and_the_same_origin_are_kept(rd: str) -> None:
    assert _rd(rd) == rd


OWN_HOST_TRICKS = [
    "http://app.test:8080.evil.example/",
    "http://app.test:8080@evil.example/",
    "http://app.test@evil.example/",
    "http://evil.example#@app.test:8080/",
    "http://evil.example?@app.test:8080/",
    "http://app.test:8080\\@evil.example/",
    "http://app.test/",  # same host, other port (80)
    "http://app.test:8081/",
    "http://app.test:08080/x".replace("08080", "8443"),
    "https://app.test:8080/",  # other scheme
    "http://app.test.:8080/",
    "http://app.test:8080:8080/",
    "http://app.test:/",
    "http://app.test:0/",
    "http://app.test:99999/",
    "http://app.test%2eevil.example/",
    "http://app%2etest:8080/",
    "http://app.test\u3002evil.example/",
    "http://[::1]:8080/",
    "http://127.0.0.1:8080/",
    "http://0x7f.0.0.1:8080/",
]
CLASSIC_TRICKS = [
    "//evil.example/",
    "///evil.example/",
    "/\\evil.example",
    "\\\\evil.example",
    "/%2F%2Fevil.example",
    "/%2f/evil.example",
    "/%5Cevil.example",
    "/%255C%255Cevil.example",
    "%2F%2Fevil.example",
    "/\t/evil.example",
    "/%09/evil.example",
    "/\n/evil.example",
    "/%0d%0a/evil.example",
    "/%2F%2Fevil.example?a=%20",
    "/%09/evil.example#x%20y",
    "/x?a b",
    "/x#a\tb",
    "/x?a=\r\nLocation:%20//evil",
    " /evil",
    "/ /evil",
    "https:evil.example",
    "https:/evil.example",
    "https:\\\\evil.example",
    "http:/\\evil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "evil.example",
    "ftp://app.test:8080/",
    "https://user:pw@evil.example/",
    "https://evil.example/",
    "http://evil.example\x00.app.test:8080/",
    "http://app.test:8080 /",
    "x" * 3000,
    "/" + "a" * 3000,
]


@pytest.mark.parametrize("rd", OWN_HOST_TRICKS + CLASSIC_TRICKS)
def test_hostile_redirects_fall_back_to_root(rd: str) -> None:
    assert _rd(rd) == "/", rd
    assert _rd(rd, "evil.example.org") == "/", rd


@pytest.mark.parametrize(
    ("entry", "kept", "refused"),
    [
        (
            "ok.test",
            ["https://ok.test/", "http://ok.test/", "https://ok.test:443/", "http://ok.test:80/x"],
            ["https://ok.test:8443/", "http://ok.test:443/", "https://a.ok.test/", "https://ok.test.evil/"],
        ),
        (
            "ok.test:8443",
            ["https://ok.test:8443/", "http://ok.test:8443/"],
            ["https://ok.test/", "https://ok.test:8444/", "https://a.ok.test:8443/"],
        ),
        (
            "ok.test:*",
            ["https://ok.test/", "https://ok.test:1/", "http://ok.test:65535/"],
            ["https://a.ok.test/", "https://ok.test.evil:1/", "https://xok.test/"],
        ),
        (
            ".ok.test",
            ["https://a.ok.test/", "https://a.b.ok.test/", "https://ok.test/"],
            [
                "https://a.ok.test:8443/",
                "https://xok.test/",
                "https://ok.test.evil.example/",
                "https://a.ok.test.evil/",
            ],
        ),
        (
            "*.ok.test",
            ["https://a.ok.test/", "https://a.b.ok.test/"],
            ["https://a.ok.test:8443/", "https://xok.test/", "https://ok.test.evil.example/"],
        ),
        (
            "*.ok.test:*",
            ["https://a.ok.test:8443/", "http://b.ok.test:1/"],
            ["https://xok.test:8443/", "https://ok.test.evil.example:8443/"],
        ),
    ],
)
def test_whitelist_entries_mean_what_oauth2_proxy_users_expect(entry: str, kept: list[str], refused: list[str]) -> None:
    for rd in kept:
        assert _rd(rd, entry) == rd, (entry, rd)
    for rd in refused + OWN_HOST_TRICKS[:6]:
        assert _rd(rd, entry) == "/", (entry, rd)


def test_same_origin_uses_the_default_port_of_the_request_scheme() -> None:
    assert _rd("https://app.test/x", scheme="https", host="app.test") == "https://app.test/x"
    assert _rd("https://app.test:443/x", scheme="https", host="app.test") == "https://app.test:443/x"
    assert _rd("https://app.test:8443/x", scheme="https", host="app.test") == "/"
    assert _rd("http://app.test/x", scheme="https", host="app.test") == "/"  # no downgrade
    assert _rd("http://app.test/x", scheme="http", host="app.test:evil") == "/"  # a bogus Host matches nothing


@pytest.mark.parametrize(
    "rd", ["http://127.0.0.1:{port}.evil.example/", "http://127.0.0.1:1/", "http://127.0.0.1/", "//evil.example"]
)
async def test_sign_in_never_lands_off_site(rd: str) -> None:
    async with stack(MemoryStore(), whitelist_domain="ok.test") as st, browser() as client:
        port = st.base.rsplit(":", 1)[1]
        async with client.get(f"{st.base}/oauth2/start", params={"rd": rd.format(port=port)}) as resp:
            assert resp.url.host == "127.0.0.1" and str(resp.url.port) == port and resp.url.path == "/"
