"""What the app receives through the proxy (``sidecar/forward.py``): each name once with ``Host`` first, the
client's repeated names joined in order, the sidecar's identity and X-Forwarded-* headers its alone, on a miss
and on a decision-cache hit; and the upstream client's one-copy hand-over used only where it matches aiohttp."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from sidecar import upstream_client
from sidecar.config import build_config
from sidecar.forward import Forwarded
from tests.stack import sidecar_settings
from tests.test_auth_listener import exchange, header
from tests.test_hits import req
from tests.test_proxy_cache import FORGED, _proxy_entries, _send, _signed_in

# Sidecar-owned names in hostile spellings, on top of FORGED: never seen by the app with the client's value.
SPELLINGS = [
    ("x-forwarded-for", "6.6.6.6"),
    ("X_Forwarded_For", "6.6.6.7"),
    ("X-FORWARDED-PROTO", "gopher"),
    ("x-forwarded-host", "evil.test"),
    ("X-FORWARDED-USER", "mallory"),
    ("x_auth_request_email", "mallory@evil.test"),
    ("X-Auth-Request-Groups", "admins"),
    ("X-Forwarded-Access-Token", "forged-token"),
]


def _names(header_list: list[tuple[str, str]]) -> list[str]:
    return [name.lower() for name, _ in header_list]


def _check_what_the_app_saw(seen: dict[str, Any], host: str) -> None:
    header_list: list[tuple[str, str]] = seen["header_list"]
    names = _names(header_list)
    assert header_list[0] == ("Host", host)  # the client's Host, first, as aiohttp's own loop put it
    assert len(names) == len(set(names)), f"a name twice: {header_list}"
    values = dict((name.lower(), value) for name, value in header_list)
    assert values["x-custom"] == "a, b, c"  # three spellings, one field line, in the order sent
    assert values["x-forwarded-user"] == values["x-auth-request-user"] == "alice@example.com"
    assert values["x-forwarded-proto"] == "http" and values["x-forwarded-host"] == host
    text = repr(header_list)
    for forged in ("mallory", "forged-token", "/admin", "6.6.6.", "gopher", "evil.test", "X_Forwarded", "x_auth"):
        assert forged not in text, (forged, header_list)
    assert not {"connection", "keep-alive", "te", "upgrade", "user-agent"} & set(names)


async def test_the_app_sees_each_name_once_host_first_and_nothing_forged_on_a_miss_and_on_hits() -> None:
    async with _signed_in() as (st, up, _, cookie):
        host = st.base.split("//", 1)[1]
        header = f"theme=dark; _sidecar={cookie}"
        sent = [("Cookie", header), ("X-Custom", "a"), ("x-custom", "b"), ("X-CUSTOM", "c"), ("Accept", "text/x")]
        sent += [*FORGED.items(), *SPELLINGS, ("Keep-Alive", "timeout=5"), ("TE", "trailers")]
        up.seen.clear()
        for _ in range(4):  # the first two decide in full, then decision-cache hits
            assert await _send(st.base, "/app/page", sent) == 200
        assert _proxy_entries(st) == [header]
        assert len(up.seen) == 4
        for seen in up.seen:
            _check_what_the_app_saw(seen, host)
            assert dict(seen["header_list"])["Cookie"] == "theme=dark"
            assert dict(seen["header_list"])["Accept"] == "text/x"
        assert all(seen["header_list"] == up.seen[0]["header_list"] for seen in up.seen)


async def test_several_cookie_headers_in_any_spelling_are_one_cookie_line_without_the_sidecars() -> None:
    async with _signed_in() as (st, up, _, cookie):
        host = st.base.split("//", 1)[1]
        sent = [("Cookie", f"_sidecar={cookie}; lang=en"), ("cookie", "theme=dark"), ("COOKIE", "x=1")]
        sent += [("X-Custom", "a"), ("x-custom", "b"), ("X-CUSTOM", "c"), *SPELLINGS]
        up.seen.clear()
        for _ in range(3):  # two Cookie headers: never kept in the decision cache, decided in full each time
            assert await _send(st.base, "/app", sent, body=b"payload", method="POST") == 200
        assert _proxy_entries(st) == []
        for seen in up.seen:
            _check_what_the_app_saw(seen, host)
            values = dict(seen["header_list"])
            assert values["Cookie"] == "lang=en; theme=dark; x=1"  # "; ", never ", " (RFC 9113 8.2.3)
            assert values["Content-Length"] == "7"
            assert cookie not in repr(seen["header_list"])


async def test_a_connection_listed_header_is_dropped_in_every_spelling() -> None:
    async with _signed_in() as (st, up, _, cookie):
        sent = [("Cookie", f"_sidecar={cookie}"), ("X-Secret-Hop", "1"), ("x-secret-hop", "2"), ("X-Kept", "k")]
        up.seen.clear()
        # _send's own "Connection: close" is joined by the server with this one
        assert await _send(st.base, "/app", [*sent, ("Connection", "X-SECRET-HOP")]) == 200
        names = _names(up.seen[0]["header_list"])
        assert "x-secret-hop" not in names and "x-kept" in names


def _client(**settings: Any) -> aiohttp.ClientSession:
    return upstream_client.upstream_client(build_config(sidecar_settings("http://127.0.0.1:1", 1, **settings)))


async def test_the_one_copy_hand_over_is_used_only_where_it_gives_what_aiohttps_own_merge_gives() -> None:
    client = _client()
    try:
        stock = aiohttp.ClientSession._prepare_headers.__get__(client)
        assert client._prepare_headers is not stock  # installed: it matched aiohttp's merge at start-up
        forwarded = Forwarded(Host="app:1")
        forwarded.update({"X-A": "1", "Cookie": "c=1", "X-Forwarded-User": "u"})
        made = client._prepare_headers(forwarded)
        assert type(made) is Forwarded and made is not forwarded  # a copy: the caller's stays untouched
        assert [*made.items()] == [*stock(forwarded).items()]
        plain = CIMultiDict([("X-A", "1"), ("x-a", "2")])  # anything else: aiohttp's own merge, its outcome
        assert [*client._prepare_headers(plain).items()] == [*stock(plain).items()]

        def reorders(headers: Any) -> CIMultiDict[str]:
            return CIMultiDict(reversed([*stock(headers).items()]))

        def fails(headers: Any) -> CIMultiDict[str]:
            raise TypeError("an aiohttp this was not written for")

        assert upstream_client.same_merge(client, upstream_client._copy_forwarded(stock))
        assert not upstream_client.same_merge(client, reorders)
        assert not upstream_client.same_merge(client, fails)
    finally:
        await client.close()
    with_defaults = aiohttp.ClientSession(headers={"X-Default": "1"})
    try:  # a session with default headers: a copy would leave them out, so aiohttp's own merge stays
        merge = upstream_client._copy_forwarded(with_defaults._prepare_headers)
        assert not upstream_client.same_merge(with_defaults, merge)
    finally:
        await with_defaults.close()


async def test_the_request_class_copies_only_what_aiohttps_loop_would_make_the_same() -> None:
    class HostLast(upstream_client._UpstreamRequest):
        def update_headers(self, headers: Any) -> None:
            super().update_headers(headers)
            host = self.headers.popone("Host")
            self.headers["Host"] = host  # the same headers, Host moved last: another request on the wire

    loop = asyncio.get_running_loop()
    assert upstream_client.same_auto_headers(loop)
    assert not upstream_client.same_auto_headers(loop, HostLast)


@pytest.mark.parametrize("kind", ["websocket"])
async def test_a_websocket_through_the_proxy_still_gets_the_sidecars_headers_only(kind: str) -> None:
    async with _signed_in() as (st, up, client, cookie):
        up.seen.clear()
        headers = {"X-Forwarded-User": "mallory", "x_auth_request_user": "mallory", "X-Custom": "a"}
        async with client.ws_connect(st.base.replace("http", "ws", 1) + "/ws", headers=headers) as ws:
            await ws.send_str("ping")
            assert (await ws.receive()).data == "ping"
        seen = up.seen[0]["header_list"]
        values = dict((name.lower(), value) for name, value in seen)
        assert values["x-forwarded-user"] == "alice@example.com" and "mallory" not in repr(seen)
        assert values["x-custom"] == "a" and values["upgrade"].lower() == "websocket", kind


async def test_proxied_requests_and_auth_hits_pipelined_on_one_connection_keep_their_order() -> None:
    """A batch whose first request is not ``/oauth2/auth`` goes to aiohttp whole (``hits.HitFirst``): every
    answer in request order, each its own request's, the hits after it included."""
    async with _signed_in() as (st, up, _, cookie):
        port = int(st.base.rsplit(":", 1)[1])
        for i in range(3):  # the auth key is kept from its second sight: hits from here on
            assert (await exchange(port, req(i, cookie).encode()))[0][0] == 202

        def proxied(i: int) -> str:
            return f"GET /p{i} HTTP/1.1\r\nHost: app.example\r\nCookie: _sidecar={cookie}\r\n\r\n"

        plan = ["proxy", "auth", "auth", "proxy", "auth", "lookalike", "proxy"]
        for rotation in range(len(plan)):
            order = plan[rotation:] + plan[:rotation]
            texts = {
                "proxy": proxied,
                "auth": lambda i: req(i, cookie),
                "lookalike": lambda i: req(i, cookie).replace("/oauth2/auth ", "/oauth2/authx "),
            }
            data = "".join(texts[kind](i) for i, kind in enumerate(order))
            answers = await exchange(port, data.encode(), count=len(order))
            assert len(answers) == len(order), rotation
            for i, (kind, got) in enumerate(zip(order, answers, strict=True)):
                if kind == "proxy":
                    assert got[0] == 200 and f'"/p{i}"' in got[2].decode(), (rotation, i, got)
                elif kind == "auth":
                    assert (got[0], header(got, "X-Request-Id")) == (202, f"r{i}"), (rotation, i, got)
                else:  # starts like the auth path, is not it: the proxy's, forwarded as it came
                    assert got[0] == 200 and b'"/oauth2/authx"' in got[2], (rotation, i, got)
