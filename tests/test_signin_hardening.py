"""Sessions and sign-in hardening: index lifetimes, anonymous floods, attempt cookies, callback input,
clock skew between replicas, and a cross-site-proof "sign out everywhere". Real Redis, real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import aiohttp
import redis.asyncio as aioredis
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from yarl import URL

from sidecar.models import Identity, Session, TokenSet
from sidecar.oidc import BACKCHANNEL_EVENT
from sidecar.sessions import user_key
from sidecar.store import MEMORY_SHORT_LIVED_CAP, MemoryStore, RedisStore
from tests.redis_procs import start_server
from tests.stack import COOKIE_SECRET, Stack, browser, free_port, session_cookie, sign_in, sign_out_everywhere, stack


def _client(ip: str = "127.0.0.1", jar: aiohttp.CookieJar | None = None) -> aiohttp.ClientSession:
    """A browser whose connections come from ``ip`` (any 127.x address is loopback): one client per address."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(ip, 0)),
        cookie_jar=jar if jar is not None else aiohttp.CookieJar(unsafe=True),
    )


async def _status(client: aiohttp.ClientSession, url: str, **kw: Any) -> int:
    async with client.get(url, allow_redirects=False, **kw) as resp:
        await resp.read()
        return resp.status


async def _start(client: aiohttp.ClientSession, base: str, rd: str = "/x") -> tuple[int, str]:
    """(status, provider authorize URL) of one /oauth2/start, not followed."""
    async with client.get(f"{base}/oauth2/start", params={"rd": rd}, allow_redirects=False) as resp:
        return resp.status, resp.headers.get("Location", "")


async def _callback_url(client: aiohttp.ClientSession, authorize: str) -> str:
    async with client.get(authorize, allow_redirects=False) as resp:
        assert resp.status == 302
        return resp.headers["Location"]


def _logout_token(st: Stack, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": st.issuer, "aud": "sidecar-dev", "iat": now, "exp": now + 120, "jti": uuid.uuid4().hex}
    body["events"] = {BACKCHANNEL_EVENT: {}}
    return st.provider.keys.sign({**body, **claims})


# ---------------------------------------------------------------- 1. index lifetimes


async def test_sliding_sessions_stay_reachable_by_logout_after_their_first_ttl(redis_url: str) -> None:
    """Refresh lifetime 4 s, sliding: sessions live on past the indexes' first TTL and logout still finds them.
    (2 s was too short on a loaded machine: three sign-ins could outlast the first browser's refresh token.)"""
    store = RedisStore(aioredis.from_url(redis_url))
    provider = {"access_token_ttl": 2, "refresh_token_ttl": 4, "rotate_refresh_tokens": True, "send_sid": True}
    try:
        async with (
            stack(store, provider_kw=provider) as st,
            browser() as laptop,
            browser() as phone,
            browser() as tablet,
        ):
            for client in (laptop, phone, tablet):
                await sign_in(client, st.base)
            for _ in range(20):  # 8 s: twice the lifetime every index got at sign-in
                for client in (laptop, phone, tablet):
                    assert await _status(client, f"{st.base}/oauth2/auth") == 202
                await asyncio.sleep(0.4)
            assert st.provider.stats()["token_calls"]["refresh_token"] >= 6
            raw = aioredis.from_url(redis_url)
            assert await raw.pttl("sc:u:" + user_key("alice-sub-1")) > 0
            await raw.aclose()
            laptop_sid = next(iter(st.provider._families))  # the provider session of the first sign-in
            async with aiohttp.ClientSession() as idp:
                token = _logout_token(st, sid=laptop_sid)
                async with idp.post(f"{st.base}/oauth2/backchannel_logout", data={"logout_token": token}) as resp:
                    assert resp.status == 200
            assert await _status(laptop, f"{st.base}/oauth2/auth") == 401
            assert await _status(tablet, f"{st.base}/oauth2/auth") == 202
            assert await sign_out_everywhere(phone, st.base) == 302
            assert await _status(tablet, f"{st.base}/oauth2/auth") == 401
    finally:
        await store.close()


def test_records_keep_the_provider_sid_and_older_records_stay_readable() -> None:
    session = Session(identity=Identity(sub="s", user="u"), tokens=TokenSet(access_token="a"), provider_sid="p-1")
    assert Session.from_bytes(session.to_bytes(), 1, 0.0).provider_sid == "p-1"
    old = b'[3,"s","u","",[],"","a",null,null,null,null,0,0,0,null,0]'  # written before the sid was kept
    restored = Session.from_bytes(old, 2, 0.0)
    assert restored.identity.sub == "s" and restored.provider_sid is None


# ---------------------------------------------------------------- 2. anonymous floods


async def test_anonymous_floods_store_nothing_and_every_session_survives_a_small_redis(tmp_path: Path) -> None:
    port = free_port()
    proc = start_server("small", tmp_path, port, "--maxmemory-policy", "volatile-ttl")
    url = f"redis://127.0.0.1:{port}/0"
    raw = aioredis.from_url(url)
    store = RedisStore(aioredis.from_url(url))
    try:
        async with stack(store) as st:
            users = [browser() for _ in range(20)]
            for client in users:
                await sign_in(client, st.base)
            used = (await raw.info("memory"))["used_memory"]
            await raw.config_set("maxmemory", str(used + 1024 * 1024))  # 1 MB beyond the 20 sessions
            keys_before = await raw.dbsize()

            async def flood(ip: str) -> None:
                async with _client(ip) as attacker:
                    for _ in range(20):
                        status, _ = await _start(attacker, st.base)
                        assert status == 302
                    for i in range(20):
                        state = f"bogus-{ip}-{i}"
                        assert await _status(attacker, f"{st.base}/oauth2/callback?state={state}&code=c") == 400

            for batch in range(0, 50, 10):  # 1000 starts, 1000 callbacks, from 50 clients
                await asyncio.gather(*(flood(f"127.0.2.{i}") for i in range(batch + 1, batch + 11)))
            assert await raw.dbsize() == keys_before  # not one key for anonymous traffic

            async def markers(ip: str) -> None:  # genuine attempt cookies, made-up codes: one small marker each
                iss = quote(st.issuer, safe="")  # the provider names itself (RFC 9207): as it would
                async with _client(ip) as attacker:
                    for _ in range(8):
                        _, authorize = await _start(attacker, st.base)
                        state = dict(parse_qsl(urlsplit(authorize).query))["state"]
                        made_up = f"{st.base}/oauth2/callback?state={state}&code=made-up&iss={iss}"
                        assert await _status(attacker, made_up) == 403

            for batch in range(0, 50, 10):
                await asyncio.gather(*(markers(f"127.0.3.{i}") for i in range(batch + 1, batch + 11)))
            for client in users:
                assert await _status(client, f"{st.base}/oauth2/auth") == 202
                await client.close()
    finally:
        await store.close()
        await raw.aclose()
        proc.stop()


async def test_sign_in_endpoints_are_rate_limited_per_client() -> None:
    async with stack(MemoryStore()) as st, _client("127.0.4.1") as greedy, _client("127.0.4.2") as other:
        statuses = [(await _start(greedy, st.base))[0] for _ in range(60)]
        assert statuses == [302] * 60  # the burst
        for path in ("/oauth2/start", "/oauth2/callback?state=s&code=c"):
            async with greedy.get(st.base + path, allow_redirects=False) as resp:
                assert resp.status == 429
                assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert (await _start(other, st.base))[0] == 302  # another client is not affected


async def test_memory_store_caps_its_short_lived_entries() -> None:
    memory = MemoryStore()
    for i in range(MEMORY_SHORT_LIVED_CAP + 500):
        assert await memory.claim_state(f"m{i}", 600)
        await memory.put_outcome(f"o{i}", b"x", 600)
    assert len(memory._markers) <= MEMORY_SHORT_LIVED_CAP
    assert len(memory._outcomes) <= MEMORY_SHORT_LIVED_CAP
    assert not await memory.claim_state(f"m{MEMORY_SHORT_LIVED_CAP + 499}", 600)  # the newest are kept


async def test_attempt_cookie_is_sealed_and_bound_to_its_state() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        async with client.get(f"{st.base}/oauth2/start", allow_redirects=False) as resp:
            authorize = resp.headers["Location"]
            value = next(c for c in resp.cookies.values() if "_csrf_" in c.key).value
        query = dict(parse_qsl(urlsplit(authorize).query))
        assert query["nonce"] not in value and query["state"] not in value
        callback = await _callback_url(client, authorize)
        other_state = await _callback_url(client, (await _start(client, st.base))[1])
        # this attempt's cookie under the other attempt's name: refused, and the provider is not called
        other = dict(parse_qsl(urlsplit(other_state).query))["state"]
        from sidecar.cookies import state_cookie_suffix

        swapped = {f"_sidecar_csrf_{state_cookie_suffix(other)}": value}
        async with aiohttp.ClientSession(cookies=swapped) as thief:
            assert await _status(thief, other_state) == 400
        assert st.provider.stats()["token_calls"]["authorization_code"] == 0
        # the pending sign-in travels in the cookie: a replica with a store of its own can finish it
        replica = await st.add_sidecar(MemoryStore(), redirect_url=f"{st.base}/oauth2/callback")
        assert await _status(client, callback.replace(st.base, replica)) == 302


# ---------------------------------------------------------------- 3. attempt cookies


def _cookie_header(jar: aiohttp.CookieJar, base: str) -> str:
    return "; ".join(f"{k}={m.value}" for k, m in jar.filter_cookies(URL(base)).items())


async def test_two_hundred_starts_leave_a_small_cookie_header_and_sign_in_works() -> None:
    jar = aiohttp.CookieJar(unsafe=True)
    async with stack(MemoryStore()) as st:
        for i in range(200):  # one browser; it moves between networks so the rate limit is not what bounds this
            async with _client(f"127.0.5.{i // 40 + 1}", jar) as client:
                assert (await _start(client, st.base))[0] == 302
        attempts = [k for k in jar.filter_cookies(URL(st.base)) if "_csrf_" in k]
        assert 1 <= len(attempts) <= 5
        assert len(_cookie_header(jar, st.base)) < 2048
        async with _client("127.0.5.99", jar) as client:
            resp = await sign_in(client, st.base)
            assert resp.status == 200 and session_cookie(client) is not None
        # at the callback only attempts young enough to be other tabs still signing in are kept
        assert len([k for k in jar.filter_cookies(URL(st.base)) if "_csrf_" in k]) <= 4


# ---------------------------------------------------------------- 4. callback input


async def test_repeated_or_empty_callback_parameters_are_refused_before_the_provider() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        callback = await _callback_url(client, (await _start(client, st.base))[1])
        base, query = callback.split("?", 1)
        pairs = parse_qsl(query)
        good = dict(pairs)
        variants = [
            [*pairs, ("state", "other")],
            [*pairs, ("state", good["state"])],
            [*pairs, ("code", "other")],
            [*pairs, ("code", good["code"])],
            [*pairs, ("iss", good["iss"])],
            [*pairs, ("iss", "https://evil.example")],
            [("state", good["state"]), ("state", good["state"]), ("code", good["code"])],
            [(k, "" if k == "state" else v) for k, v in pairs],
            [(k, "" if k == "code" else v) for k, v in pairs],
            [(k, "" if k == "iss" else v) for k, v in pairs],
            [("code", good["code"]), ("iss", good["iss"])],
        ]
        for variant in variants:
            assert await _status(client, f"{base}?{urlencode(variant)}") == 400, variant
        assert st.provider.stats()["token_calls"]["authorization_code"] == 0
        assert await _status(client, callback) == 302  # the untouched callback still works
        assert st.provider.stats()["token_calls"]["authorization_code"] == 1


# ---------------------------------------------------------------- 5. clock skew


def _signed_ahead(salt: str, payload: str, seconds: int) -> str:
    """Sign like a replica whose clock is ``seconds`` ahead of this one."""

    class Ahead(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) + seconds

    serializer = URLSafeTimedSerializer(
        COOKIE_SECRET, salt=salt, signer=Ahead, signer_kwargs={"digest_method": hashlib.sha256}
    )
    return serializer.dumps(payload)


def _unsigned(salt: str, value: str) -> str:
    serializer = URLSafeTimedSerializer(COOKIE_SECRET, salt=salt, signer_kwargs={"digest_method": hashlib.sha256})
    return str(serializer.loads(value))


async def test_cookies_signed_by_a_replica_slightly_ahead_are_accepted() -> None:
    async with stack(MemoryStore()) as st, browser() as client:
        await sign_in(client, st.base)
        payload = _unsigned("sidecar.session", session_cookie(client) or "")
        for ahead, expected in ((1, 202), (5, 202), (55, 202), (300, 401), (86400, 401)):
            cookie = {"_sidecar": _signed_ahead("sidecar.session", payload, ahead)}
            async with aiohttp.ClientSession(cookies=cookie) as other:
                assert await _status(other, f"{st.base}/oauth2/auth") == expected, ahead
        for ahead, expected in ((2, 302), (50, 302), (400, 400)):
            async with browser() as signer:
                async with signer.get(f"{st.base}/oauth2/start", allow_redirects=False) as resp:
                    authorize = resp.headers["Location"]
                    attempt = next(c for c in resp.cookies.values() if "_csrf_" in c.key)
                callback = await _callback_url(signer, authorize)
                resigned = {
                    attempt.key: _signed_ahead("sidecar.state", _unsigned("sidecar.state", attempt.value), ahead)
                }
                async with aiohttp.ClientSession(cookies=resigned) as other:
                    assert await _status(other, callback) == expected, ahead


# ---------------------------------------------------------------- 6. sign out everywhere


async def test_sign_out_everywhere_needs_a_same_origin_post() -> None:
    async with stack(MemoryStore()) as st, browser() as laptop, browser() as phone:
        await sign_in(laptop, st.base)
        await sign_in(phone, st.base)
        everywhere = f"{st.base}/oauth2/sign_out?everywhere=true"
        for value in ("true", "1", "yes", "TRUE"):
            async with laptop.get(f"{st.base}/oauth2/sign_out?everywhere={value}", allow_redirects=False) as resp:
                assert resp.status == 200
                page = await resp.text()
                assert "method='post'" in page and "everywhere=true" in page
        host = urlsplit(st.base).netloc
        cross_site = [
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Origin": f"https://{host}"},  # another scheme is another origin
            {"Origin": "http://127.0.0.1:1"},  # another port
            {"Origin": f"http://{host}.evil.example"},
            {"Origin": "garbage"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
            {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
            {"Origin": "null", "Sec-Fetch-Site": "same-site"},
            {"Origin": "null", "Sec-Fetch-Site": "garbage"},
            {"Origin": st.base, "Sec-Fetch-Site": "cross-site"},
        ]
        for headers in cross_site:
            async with laptop.post(everywhere, headers=headers, allow_redirects=False) as resp:
                assert resp.status == 403, headers
            async with laptop.post(f"{st.base}/oauth2/sign_out", headers=headers, allow_redirects=False) as resp:
                assert resp.status == 403, headers
        for client in (laptop, phone):  # nothing above ended anything
            assert await _status(client, f"{st.base}/oauth2/auth") == 202
        assert await sign_out_everywhere(laptop, st.base, headers={"Origin": st.base}) == 302
        assert await _status(phone, f"{st.base}/oauth2/auth") == 401
        await sign_in(phone, st.base)
        await sign_in(laptop, st.base)
        async with phone.get(f"{st.base}/oauth2/sign_out?everywhere=true") as resp:
            token = re.search(r"name='csrf' value='([^']*)'", await resp.text())
        assert token
        fetch = {"Sec-Fetch-Site": "same-origin"}
        form = {"everywhere": "true", "csrf": token.group(1)}
        async with phone.post(f"{st.base}/oauth2/sign_out", data=form, headers=fetch, allow_redirects=False) as resp:
            assert resp.status == 302
        assert await _status(laptop, f"{st.base}/oauth2/auth") == 401
