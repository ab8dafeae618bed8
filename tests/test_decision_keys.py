"""The decision cache's key, differentially: the plan-per-name-sequence key (``decisions.request_key``) against
the per-header loop it replaced (5b0a702), over hostile header sets parsed by the real listeners.

The key may change its layout, never what it tells apart: for every pair of requests, the new keys are equal
exactly when the old ones are. A pair the new key calls equal and the old one different is an answer
decided for other inputs (``X-Pad: /public`` then ``X-Original-URI: /admin`` keyed as ``/public``).

The new keys are the ones the running stack looks up (main listener with its hit-first parser, the lean
listener), noted as the real ``DecisionCache.get`` is called; the old keys are computed from the very bytes
as aiohttp's and llhttp's own parsers read them. Then the same requests, pipelined on one connection after the
cache holds their entries, must each get the answer they get alone (no key handed to the wrong request).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httptools
import pytest
from aiohttp.http import HttpRequestParser  # the one aiohttp's server uses (llhttp, in C)

from sidecar import decisions
from sidecar.config import Config
from sidecar.decisions import _COOKIE, _REFUSED, _name_kind
from sidecar.fronts import FAMILY
from sidecar.store import MemoryStore
from tests.stack import Stack, stack
from tests.test_auth_listener import auth_listener as lean
from tests.test_auth_listener import comparable, exchange, header
from tests.test_decisions import TOKENS as _TOKENS
from tests.test_decisions import _signed_in, port_of, svc_of

TOKENS: dict[str, Any] = dict(_TOKENS)

# -- the oracle: 5b0a702's request_key, over (name, value) pairs as the listener parsed them ------------------


def old_request_key(
    method: str, items: Iterable[tuple[str, str]], raw_query: str, trusted: bool, config: Config
) -> Any:
    """``request_key`` as it was before the plans (one pass over the pairs, no table kept)."""
    client_ip_header = config.real_client_ip_header.lower()
    cookie: str | None = None
    picked: list[str] = []
    for name, value in items:
        kind = _name_kind(name, client_ip_header)
        if not kind:
            continue
        if kind is _COOKIE:
            if cookie is not None:
                return None
            cookie = value
        elif kind is _REFUSED:
            return None
        else:
            picked += (kind, value)
    if cookie is None or cookie.count(config.cookie_name + "=") != 1:
        return None
    return (cookie, raw_query, "t" if trusted else "u", method, *picked)


class _Protocol:
    transport = None

    def _reading_paused(self) -> bool:
        return False


def aiohttp_parsed(data: bytes) -> tuple[str, list[tuple[str, str]], str]:
    """What aiohttp's own request parser (the main listener's) makes of ``data``: method, header lines, query."""
    protocol: Any = _Protocol()
    parser = HttpRequestParser(protocol, asyncio.get_running_loop(), 2**16, max_line_size=8190, max_field_size=8190)
    messages, _, _ = parser.feed_data(data)
    message = messages[0][0]
    return message.method, list(message.headers.items()), message.url.raw_query_string


class _Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.lines.append(
            (name.decode("utf-8", "surrogateescape"), value.strip(b" \t").decode("utf-8", "surrogateescape"))
        )


def llhttp_parsed(data: bytes) -> tuple[str, list[tuple[str, str]], str]:
    """What llhttp (the lean listener's parser) makes of ``data``, decoded as that listener decodes it."""
    lines = _Lines()
    parser = httptools.HttpRequestParser(lines)
    parser.feed_data(data)
    return parser.get_method().decode(), lines.lines, lines.url.decode("ascii", "surrogateescape").partition("?")[2]


# -- hostile header sets -------------------------------------------------------------------------------------

# Names the decision reads (fronts.FAMILY, Host, X-Real-IP, the client-IP header), in several spellings, names
# it never reads, and the same few values moved between them: a key that pairs a value with the wrong name, or
# folds two spellings the decision reads differently, makes two of these requests one.
NAMES = [
    *FAMILY,
    "X-Original-URI",
    "x-original-uri",
    "X-ORIGINAL-URI",
    "X-Pad",
    "x-pad",
    "Accept",
    "X-Forwarded-For",
    "X-Real-IP",
    "X-Request-Id",
    "X_Original_URI",
    "X-ProxyUser-IP",
    "X-Forwarded-Anything",
]
VALUES = ["/public", "/admin", "GET", "DELETE", "203.0.113.9", "https", "app.example", ""]


def family(cookie: str, count: int, seed: int, cookie_name: str = "_sidecar") -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    sets: list[list[tuple[str, str]]] = [
        # hand-made confusions: the same values under swapped names, a repeat before a read header
        [("X-Pad", "1"), ("X-Pad", "/public"), ("X-Original-URI", "/admin")],
        [("X-Pad", "1"), ("X-Pad", "/admin"), ("X-Original-URI", "/public")],
        [("X-Pad", "/admin"), ("X-Original-URI", "/public")],
        [("X-Pad", "/public"), ("X-Original-URI", "/admin")],
        [("Accept", "a"), ("accept", "b"), ("X-Original-URI", "/admin"), ("X-Forwarded-Uri", "/admin")],
        [("Accept", "a"), ("accept", "/admin"), ("X-Original-URI", "b")],
        [("x-original-uri", "/admin")],
        [("X-Original-URI", "/admin")],
        [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", "10.0.0.1")],
        [("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "203.0.113.9")],
    ]
    for _ in range(count):
        lines = [(_spelled(rng, rng.choice(NAMES)), rng.choice(VALUES)) for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.3:  # a repeated line of one name, in another case
            name, value = rng.choice(lines)
            lines.insert(rng.randrange(len(lines) + 1), (rng.choice([name.lower(), name.upper()]), rng.choice(VALUES)))
        sets.append(lines)
    out = []
    for lines in sets:
        at = rng.randrange(len(lines) + 1)  # the Cookie header anywhere, as a front may place it
        out.append([("Host", "app.example"), *lines[:at], ("Cookie", f"{cookie_name}={cookie}"), *lines[at:]])
    return out


def _spelled(rng: random.Random, name: str) -> str:
    """The name as sent, or in another case (a header name's case is no part of what it names)."""
    return rng.choice([name, name, name.lower(), name.upper(), name.swapcase()])


def head(lines: list[tuple[str, str]], query: str = "") -> bytes:
    return (f"GET /oauth2/auth{query} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in lines) + "\r\n").encode()


# -- the running stack ---------------------------------------------------------------------------------------


@pytest.fixture
async def st() -> AsyncIterator[Stack]:
    async with stack(MemoryStore(), reverse_proxy="true", trusted_proxy="127.0.0.1/32", **TOKENS) as s:
        yield s


def noting(st: Stack, index: int = 0) -> tuple[list[Any], Callable[[], None]]:
    """Note every key the running decision cache is asked for (the real lookup runs); and how to stop."""
    cache = svc_of(st, index).decisions
    assert cache is not None
    seen: list[Any] = []
    real = cache.get

    def get(key: Any) -> Any:
        seen.append(key)
        return real(key)

    cache.get = get  # type: ignore[method-assign]
    return seen, lambda: delattr(cache, "get")


def same_partition(new: list[Any], old: list[Any]) -> list[tuple[int, int]]:
    """The pairs (i, j) on which the two key lists disagree about equality (None: not cacheable)."""
    return [
        (i, j)
        for i in range(len(new))
        for j in range(i, len(new))
        if (new[i] == new[j]) != (old[i] == old[j]) or (new[i] is None) != (old[i] is None)
    ]


async def keys_on(port: int, requests: list[bytes], seen: list[Any]) -> list[Any]:
    """Each request on its own connection; the key the listener looked up for it (None: it looked none up)."""
    keys = []
    for data in requests:
        before = len(seen)
        got = await exchange(port, data)
        assert got, data
        assert len(seen) - before <= 1, data  # one lookup per request, never a second
        keys.append(seen[before] if len(seen) > before else None)
    return keys


async def test_new_keys_tell_apart_exactly_what_the_old_keys_did_on_both_listeners() -> None:
    """Each request of the family on its own connection, to each listener: once with every plan new, once with
    every plan remembered, once with the table of plans full (a client inventing name sequences, names too
    long to keep) so that every plan is worked out anew. The app has a client-IP header of its own, so the
    table it fills is its own."""
    settings: dict[str, Any] = {
        "reverse_proxy": "true",
        "trusted_proxy": "127.0.0.1/32",
        "real_client_ip_header": "X-Keys-Test-IP",
    }
    async with stack(MemoryStore(), **settings, **TOKENS) as st:
        cookie = await _signed_in(st)
        config = st.configs[0]
        queries = ("", "?max_age=3600", "?allowed_groups=admins")
        sets = family(cookie, 150, 20)
        long_name = "X-Forwarded-" + "n" * (decisions._MAX_PLAN_CHARS + 10)  # a read name too long for a plan
        sets += [[("Host", "a"), ("Cookie", f"_sidecar={cookie}"), (long_name, uri)] for uri in ("/admin", "/public")]
        sets += [[("Host", "a"), ("X-Keys-Test-IP", ip), ("Cookie", f"_sidecar={cookie}")] for ip in ("1.2.3.4", "")]
        requests = [head(lines, queries[n % 3]) for n, lines in enumerate(sets)]
        seen, stop = noting(st)
        try:
            async with lean(st) as lean_port:
                for port, parse in ((port_of(st.base), aiohttp_parsed), (lean_port, llhttp_parsed)):
                    for phase in ("new", "remembered", "table full"):
                        if phase == "table full":
                            flood = [
                                head([("Host", "a"), (f"X-Flood-{i}", "1"), ("Cookie", f"_sidecar={cookie}")])
                                for i in range(decisions._MAX_PLANS)
                            ]
                            await keys_on(port, flood, seen)
                            assert len(decisions._tables["x-keys-test-ip"]) == decisions._MAX_PLANS
                        new = await keys_on(port, requests, seen)
                        old = [old_request_key(*parse(data), True, config) for data in requests]
                        assert sum(key is not None for key in old) > len(requests) // 3
                        wrong = same_partition(new, old)
                        assert not wrong, (phase, [(requests[i], requests[j]) for i, j in wrong[:3]])
        finally:
            stop()


def answers_family(cookies: list[str], forged: str) -> list[bytes]:
    """Requests whose answers differ (two users, 202/400/401, tokens or not): a key handed to the wrong one,
    or an answer kept under another request's key, shows as an answer that is not the request's own."""
    out = []
    for n, cookie in enumerate([*cookies, forged]):
        for lines in (
            [("X-Original-URI", "/admin")],
            [("X-Pad", "/public"), ("X-Pad", "/x"), ("X-Original-URI", "/admin")],
            [("X-Original-URI", "/public"), ("X-Forwarded-Uri", "/admin")],  # disagree: 400
            [("x-original-uri", "/public"), ("X-Forwarded-Uri", "/public")],
            [("X_Original_URI", "/admin")],  # another spelling: 400, never cached
            [("X-Original-URI", "/\xff")],  # refused (400) before the decision: a key computed, never used
            [("Cookie", "app=1")],  # a second Cookie line: decided, never cached
        ):
            at = n % (len(lines) + 1)
            out.append(head([("Host", "app.example"), *lines[:at], ("Cookie", f"_sidecar={cookie}"), *lines[at:]]))
    return out


async def alone(port: int, data: bytes) -> Any:
    got = await exchange(port, data)
    assert got, data
    return comparable(got[0])


async def test_pipelined_requests_get_their_own_answers_whatever_the_cache_holds(st: Stack) -> None:
    """Each request alone first (its own answer, three times so its key is kept), then all of them in one
    write, three times, between requests aiohttp answers itself (a body, another path): every pipelined answer
    is the request's own, and afterwards every request alone still gets its own."""
    cookies = [await _signed_in(st), await _signed_in(st)]
    forged = cookies[0][:-4] + ("AAAA" if not cookies[0].endswith("AAAA") else "BBBB")
    requests = answers_family(cookies, forged)
    main = port_of(st.base)
    async with lean(st) as lean_port:
        for port in (main, lean_port):
            own = [await alone(port, data) for data in requests]
            assert {answer[0] for answer in own} == {202, 400, 401}
            assert (
                len({repr(answer) for answer in own if answer[0] == 202}) >= 4
            )  # two users, with and without the cookie
            for data, answer in zip(requests, own, strict=True):
                assert [await alone(port, data) for _ in range(2)] == [answer] * 2, data
            # aiohttp's own requests between the auth requests on the main listener (the lean one serves only those)
            between = [b"GET /ping HTTP/1.1\r\nHost: a\r\n\r\n", head([("Host", "a")]).replace(b"GET", b"POST")[:-2]]
            between[1] += b"Content-Length: 2\r\n\r\nab"
            for rotation in range(3):
                order = requests[rotation:] + requests[:rotation]
                batch, expect = b"", []
                for i, data in enumerate(order):
                    batch += data
                    expect.append(own[requests.index(data)])
                    if port == main and i % 3 == rotation:
                        batch += between[i % 2]
                        expect.append(None)
                got = await exchange(port, batch, count=len(expect))
                assert len(got) == len(expect), rotation
                for n, (answer, wanted) in enumerate(zip(got, expect, strict=True)):
                    if wanted is not None:
                        assert comparable(answer) == wanted, (rotation, n)
            assert [await alone(port, data) for data in requests] == own


async def test_a_key_left_by_a_request_refused_before_the_decision_is_never_the_next_ones(st: Stack) -> None:
    """The main listener's parser keeps the key of a request that missed for its decision (``hits.handed_key``).
    A request refused before its decision runs (undecodable bytes in a header the sidecar reads: 400 in the
    handler's wrapper) leaves that key unused; the request behind it on the connection, which the parser did not
    look at, must get its own key: else its 202 is kept under the refused request's key and answers it."""
    cookies = [await _signed_in(st), await _signed_in(st)]
    main = port_of(st.base)
    refused = head([("Host", "a"), ("X-Original-URI", "/\xff"), ("Cookie", f"_sidecar={cookies[0]}")])
    others = [
        head([("Host", "a"), ("X-Original-URI", "/x"), ("Cookie", f"_sidecar={cookies[1]}")]),
        head([("Host", "a"), ("Cookie", f"_sidecar={cookies[1]}"), ("Connection", "close")]),  # not looked at first
    ]
    own = [await alone(main, data) for data in (refused, *others)]
    assert [answer[0] for answer in own] == [400, 202, 202]
    for other, wanted in zip(others, own[1:], strict=True):
        for _ in range(3):
            got = await exchange(main, refused + other, count=2)
            assert [comparable(answer) for answer in got] == [own[0], wanted]
        assert await alone(main, refused) == own[0]
        assert await alone(main, other) == wanted


async def test_two_sidecars_in_one_process_key_each_request_by_their_own_settings() -> None:
    """The key's settings are worked out per config (the last one used is remembered) and its plans per
    --real-client-ip-header: two apps in one process, one trusting its front with the default client-IP header,
    the other trusting nothing with X-ProxyUser-IP and another cookie name, asked in turn about the same header
    sets, each key what the old loop gives under that app's own settings."""
    from sidecar.auth_listener import AuthListener
    from tests.stack import browser, session_cookie, sign_in

    settings: dict[str, Any] = {"reverse_proxy": "true", "trusted_proxy": "127.0.0.1/32", **TOKENS}
    async with stack(MemoryStore(), **settings) as st:
        other = await st.add_sidecar(cookie_name="_other", real_client_ip_header="X-ProxyUser-IP", **TOKENS)
        cookie = await _signed_in(st)
        async with browser() as client:
            await sign_in(client, other)
            other_cookie = session_cookie(client, "_other")
        assert other_cookie
        apps = [
            (0, port_of(st.base), aiohttp_parsed, family(cookie, 40, 7)),
            (1, port_of(other), aiohttp_parsed, family(other_cookie, 40, 7, "_other")),
        ]
        listener = AuthListener(st.runners[1].app, st.configs[1])
        sock = socket.create_server(("127.0.0.1", 0))
        await listener.start(sock)
        apps.append((1, int(sock.getsockname()[1]), llhttp_parsed, apps[1][3]))
        noted = [noting(st, 0), noting(st, 1)]
        try:
            new: list[list[Any]] = [[] for _ in apps]
            old: list[list[Any]] = [[] for _ in apps]
            for i in range(len(apps[0][3])):  # in turn: each request to every app before the next
                for n, (index, port, parse, requests) in enumerate(apps):
                    data = head(requests[i])
                    new[n] += await keys_on(port, [data], noted[index][0])
                    old[n].append(old_request_key(*parse(data), index == 0, st.configs[index]))
            for n in range(len(apps)):
                assert sum(key is not None for key in old[n]) > 10, n
                assert not same_partition(new[n], old[n]), n
                assert all(key is None or key[2] == ("t" if apps[n][0] == 0 else "u") for key in new[n])
        finally:
            for _, stop in noted:
                stop()
            await asyncio.wait_for(listener.drain(), 5)


REQUEST_IDS = [
    "X-Request-Id: \r\n",  # empty
    "X-Request-Id: \r\nX-Request-Id: second-1\r\n",  # empty first: the decision reads the first
    "x-request-id: first-2\r\nX-REQUEST-ID: second-2\r\n",
    "X-Request-Id:r3\r\n",
    "X-Request-Id: \t r4 \t\r\n",
    f"X-Request-Id: {'a' * 64}\r\n",  # the longest id echoed
    f"X-Request-Id: {'b' * 65}\r\n",  # one over: not echoed
    f"X-Request-Id: {'c' * 8000}\r\n",
    "X-Request-Id: a/b\r\n",
    "X-Request-Id: a\tb\r\n",
    "X-Request-Id-X: r5\r\nX-Request: r6\r\n",  # other names: none
]


@pytest.mark.parametrize("listener", ["main", "lean"])
async def test_a_hit_echoes_the_request_id_the_decision_echoes(st: Stack, listener: str) -> None:
    """The request id a hit answers with (the lean listener notes it as it parses, the main one reads aiohttp's
    headers) is the one the decided answer has, for repeats, case, spacing, empty, invalid and over-long ids."""
    from tests.test_decisions import lookups

    cookie = await _signed_in(st)
    async with lean(st) as lean_port:
        port = port_of(st.base) if listener == "main" else lean_port
        for n, lines in enumerate(REQUEST_IDS):
            data = f"GET /oauth2/auth HTTP/1.1\r\nHost: a\r\nX-Original-URI: /rid/{listener}/{n}\r\n{lines}"
            data += f"Cookie: _sidecar={cookie}\r\n\r\n"
            before = lookups()["hit"]
            answers = [(await exchange(port, data.encode()))[0] for _ in range(4)]  # decided, kept, then hits
            assert lookups()["hit"] - before == 2, lines[:40]
            ids = [header(got, "X-Request-Id") for got in answers]
            assert [got[0] for got in answers] == [202] * 4 and len(set(ids)) == 1, (lines[:40], ids)
            assert len({repr(comparable(got)) for got in answers}) == 1


async def test_long_header_names_are_not_remembered_by_the_key() -> None:
    """The key remembers what each header name is (2,048 names) and each name sequence's plan (1,024 sequences
    of up to 4,096 characters). A name's kind was kept whatever its length: 2,048 requests without a cookie,
    each with one new 7,000-character name, made a process hold ~29 MB (the names and multidict's lower-case
    copies) for good, more than the decision cache's own 16 MB bound. Long names are worked out each time
    instead, and still keyed as they were."""
    settings: dict[str, Any] = {
        "reverse_proxy": "true",
        "trusted_proxy": "127.0.0.1/32",
        "real_client_ip_header": "X-Long-Kinds-IP",
    }
    async with stack(MemoryStore(), **settings, **TOKENS) as st:
        cookie = await _signed_in(st)
        table = decisions._tables.setdefault("x-long-kinds-ip", decisions._Plans("x-long-kinds-ip"))
        seen, stop = noting(st)
        try:
            async with lean(st) as lean_port:
                for port in (port_of(st.base), lean_port):
                    for i in range(30):
                        name = f"X-Long-{port}-{i}-" + "n" * 7000
                        got = await exchange(port, head([("Host", "a"), (name, "1")]))
                        assert got[0][0] == 401
                    # and a read name that long is still keyed, its value with it
                    long_read = "X-Forwarded-" + "n" * 7000
                    requests = [head([("Host", "a"), (long_read, v), ("Cookie", f"_sidecar={cookie}")]) for v in "ab"]
                    new = await keys_on(port, requests, seen)
                    assert None not in new and new[0] != new[1] and new[0][-1] == "a"
        finally:
            stop()
        assert sum(map(len, table.kinds)) < 1000  # the short names only (Host, Cookie...)
