"""Session lifecycle: fresh ids, limits, sign-out honoured by every replica, outages, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.context import SERVICES
from sidecar.cookies import CookieCodec
from sidecar.models import Identity, Session, TokenSet
from sidecar.store import RedisStore, SessionStore
from tests.stack import COOKIE_SECRET, app_token, browser, session_cookie, sign_in, sign_out_everywhere, stack


def _session(**changes: object) -> Session:
    base = Session(
        identity=Identity(sub="s", user="u"), tokens=TokenSet(access_token="a"), created_at=1000.0, last_active=1000.0
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_expiry_rules_take_now_as_an_argument() -> None:
    s = _session(tokens=TokenSet(access_token="a", access_expires_at=2000.0, issued_at=1000.0))
    assert not s.needs_refresh(1900.0, skew=30, max_age=0)
    assert s.needs_refresh(1971.0, skew=30, max_age=0)
    assert s.needs_refresh(1500.0, skew=30, max_age=300)  # --cookie-refresh age
    short = _session(tokens=TokenSet(access_token="a", access_expires_at=1020.0, issued_at=1000.0))
    assert not short.needs_refresh(1005.0, skew=30, max_age=0)  # a 20 s token is not refreshed at once
    assert short.needs_refresh(1010.0, skew=30, max_age=0)  # but half-way through its life
    unknown = _session(tokens=TokenSet(access_token="a", issued_at=1000.0))
    assert not unknown.needs_refresh(10**9, skew=30, max_age=0)  # unknown lifetime: never invented
    assert s.expired(1000.0 + 86400, max_lifetime=86400, idle_timeout=0)
    assert s.expired(1000.0 + 3600, max_lifetime=0, idle_timeout=3600)
    assert not s.expired(1000.0 + 3599, max_lifetime=86400, idle_timeout=3600)


async def test_every_sign_in_gets_a_new_session_id_and_the_old_one_dies(store: SessionStore) -> None:
    async with stack(store) as st, browser() as client:
        await sign_in(client, st.base)
        first = session_cookie(client) or ""
        await sign_in(client, st.base)
        second = session_cookie(client) or ""
        codec = CookieCodec((COOKIE_SECRET.encode(),), 3600)
        assert codec.load_session(first, time.time()).sid != codec.load_session(second, time.time()).sid
        async with aiohttp.ClientSession(cookies={"_sidecar": first}) as old:
            async with old.get(f"{st.base}/oauth2/auth") as resp:
                assert resp.status == 401


async def test_cookie_attributes() -> None:
    async with stack(None, cookie_secure="true", cookie_domain="127.0.0.1") as st, aiohttp.ClientSession() as client:
        async with client.get(f"{st.base}/oauth2/start", allow_redirects=False) as resp:
            authorize = resp.headers["Location"]
            csrf = resp.headers["Set-Cookie"]
        assert "HttpOnly" in csrf and "Secure" in csrf and "SameSite=Lax" in csrf
        async with client.get(authorize, allow_redirects=False) as resp:
            callback = resp.headers["Location"]
        cookie_header = csrf.split(";")[0]
        async with client.get(callback, allow_redirects=False, headers={"Cookie": cookie_header}) as resp:
            assert resp.status == 302
            set_cookies = resp.headers.getall("Set-Cookie")
        session = next(c for c in set_cookies if c.startswith("_sidecar="))
        for attribute in ("HttpOnly", "Secure", "SameSite=Lax", "Max-Age=604800", "Path=/"):
            assert attribute in session


async def test_idle_timeout_and_absolute_lifetime_are_enforced_server_side(store: SessionStore) -> None:
    async with stack(store, session_idle_timeout="2m", session_cache_ttl="0") as st, browser() as client:
        await sign_in(client, st.base)
        sessions = st.runners[0].app[SERVICES].sessions
        start = time.time()
        for offset in (0, 59, 118, 177):  # used within every idle window: "last active" moves on, never expires
            sessions._clock = lambda offset=offset: start + offset  # type: ignore[misc]
            async with client.get(f"{st.base}/oauth2/auth") as resp:
                assert resp.status == 202, offset
        sessions._clock = lambda: start + 177 + 121  # type: ignore[misc]
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 401
    async with stack(store, cookie_expire="3s", session_idle_timeout="0") as st, browser() as client:
        # The cookie is signed during sign_in with a whole-second timestamp (itsdangerous), so it is refused
        # between 2 and 3 s after it was signed: after before+2 at the earliest, after signed+3 at the latest.
        before = time.monotonic()
        await sign_in(client, st.base)
        signed = time.monotonic()
        used = 0
        while time.monotonic() - before < 1.7:  # inside the shortest lifetime even on a loaded machine
            async with client.get(f"{st.base}/oauth2/auth") as resp:
                assert resp.status == 202
            used += 1
            await asyncio.sleep(0.3)
        assert used >= 1
        await asyncio.sleep(max(0.0, signed + 3.3 - time.monotonic()))
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 401


async def test_sign_out_on_one_replica_is_honoured_by_every_replica_within_one_second(redis_url: str) -> None:
    stores = [RedisStore(aioredis.from_url(redis_url)) for _ in range(2)]
    try:
        async with stack(stores[0]) as st, browser() as client:
            second = await st.add_sidecar(stores[1])
            await sign_in(client, st.base)
            cookie = {"_sidecar": session_cookie(client) or ""}
            async with aiohttp.ClientSession(cookies=cookie) as other:
                async with other.get(f"{second}/oauth2/auth") as resp:
                    assert resp.status == 202  # now cached on the second replica
                async with client.get(f"{st.base}/oauth2/sign_out", allow_redirects=False) as resp:
                    assert resp.status == 302
                await asyncio.sleep(1.0)
                async with other.get(f"{second}/oauth2/auth") as resp:
                    assert resp.status == 401
    finally:
        for s in stores:
            await s.close()


async def test_redis_outage_answers_503_and_signs_nobody_out(redis_url: str) -> None:
    store = RedisStore(aioredis.from_url(redis_url))
    async with stack(store, session_cache_ttl="0") as st, browser() as client:
        await sign_in(client, st.base)
        services = st.runners[0].app[SERVICES]
        working = services.sessions.store
        services.sessions.store = RedisStore(aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2))
        try:
            async with client.get(f"{st.base}/oauth2/auth") as resp:
                assert resp.status == 503
            async with client.get(f"{st.base}/_demo/echo") as resp:
                assert resp.status == 503 and resp.headers["Retry-After"]
            async with client.get(f"{st.base}/ready") as resp:
                assert resp.status == 503
            assert session_cookie(client) is not None  # the cookie was not cleared
        finally:
            await services.sessions.store.close()
            services.sessions.store = working
        async with client.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 202
    await store.close()


async def test_logs_never_contain_tokens_cookies_or_secrets(
    store: SessionStore, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        stack(
            store,
            request_logging="true",
            pass_access_token="true",
            provider_kw={"access_token_ttl": 1},
            refresh_skew="0s",
        ) as st,
        browser() as client,
    ):
        await sign_in(client, st.base)
        token = await app_token(client, st.base) or "missing"
        await asyncio.sleep(1.1)
        new_token = await app_token(client, st.base) or "missing"
        assert token != new_token
        st.provider.inject_fault("500", count=-1)
        await asyncio.sleep(1.1)
        async with client.get(f"{st.base}/_demo/echo?code=abc") as resp:
            assert resp.status == 503
        cookie = session_cookie(client) or ""
        async with client.get(f"{st.base}/oauth2/sign_out"):
            pass
    access_lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert sum(1 for line in access_lines if line["msg"] == "request") >= 6  # one JSON line per request
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    text += "\n" + json.dumps(access_lines)
    assert "request" in text  # access lines were written
    for secret in (token, new_token, cookie, cookie.split(".")[0], COOKIE_SECRET, "sidecar-dev-secret"):
        assert secret not in text


def _logout_token(st: object, **changes: object) -> str:
    import time
    import uuid

    from sidecar.oidc import BACKCHANNEL_EVENT

    claims = {
        "iss": st.issuer,
        "aud": "sidecar-dev",
        "iat": int(time.time()),
        "exp": int(time.time()) + 120,
        "jti": uuid.uuid4().hex,  # type: ignore[attr-defined]
        "sub": "alice-sub-1",
        "events": {BACKCHANNEL_EVENT: {}},
    }
    claims.update(changes)
    return st.provider.keys.sign({k: v for k, v in claims.items() if v is not None})  # type: ignore[attr-defined]


async def test_backchannel_logout_ends_every_session_of_the_user(store: SessionStore) -> None:
    async with stack(store) as st, browser() as laptop, browser() as phone:
        await sign_in(laptop, st.base)
        await sign_in(phone, st.base)
        async with aiohttp.ClientSession() as idp:
            for bad in (
                _logout_token(st, events=None),
                _logout_token(st, nonce="n"),
                _logout_token(st, aud="other"),
                _logout_token(st, sub=None),
                "not-a-jwt",
            ):
                async with idp.post(f"{st.base}/oauth2/backchannel_logout", data={"logout_token": bad}) as resp:
                    assert resp.status == 400
            async with laptop.get(f"{st.base}/oauth2/auth") as resp:
                assert resp.status == 202  # nothing was ended by the bad tokens
            async with idp.post(
                f"{st.base}/oauth2/backchannel_logout", data={"logout_token": _logout_token(st)}
            ) as resp:
                assert resp.status == 200
        for client in (laptop, phone):
            async with client.get(f"{st.base}/oauth2/auth") as resp:
                assert resp.status == 401


async def test_sign_out_everywhere(store: SessionStore) -> None:
    async with stack(store) as st, browser() as laptop, browser() as phone:
        await sign_in(laptop, st.base)
        await sign_in(phone, st.base)
        assert await sign_out_everywhere(laptop, st.base) == 302
        async with phone.get(f"{st.base}/oauth2/auth") as resp:
            assert resp.status == 401


def test_records_round_trip_every_token_shape_exactly() -> None:
    import base64

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    jwt_like = b64(b'{"alg":"RS256"}') + "." + b64('{"sub":"ä","n":1}'.encode()) + "." + b64(b"\x00" * 64)
    padded = b64(b'{"a":1}') + "=." + b64(b'{"b":2}') + ".sig"  # not canonical base64url: kept verbatim
    binary = b64(b"\xff\xfe") + "." + b64(b"\x80") + ".x"  # not text
    for token in (jwt_like, padded, binary, "opaque-token", "a.b", "..", "a.b.c"):
        session = _session(tokens=TokenSet(access_token=token, id_token=token, refresh_token="r"))
        again = Session.from_bytes(session.to_bytes(), version=3, last_active=5.0)
        assert again.tokens.access_token == token and again.tokens.id_token == token
        assert again.version == 3 and again.last_active == 5.0 and again.identity == session.identity
    plain = _session(tokens=TokenSet(access_token="a", refresh_token="r"))
    assert json.loads(plain.to_bytes())[0] == 5  # no refused refresh: readable by replicas not yet upgraded
    refused = replace(plain, refusals=2, retry_at=1234.5)
    assert json.loads(refused.to_bytes())[0] == 6
    again = Session.from_bytes(refused.to_bytes(), 1, 0.0)
    assert (again.refusals, again.retry_at) == (2, 1234.5) and again.backing_off(1234.0)
    assert not again.backing_off(1234.5)
    with pytest.raises(ValueError):
        Session.from_bytes(json.dumps([6, *json.loads(refused.to_bytes())[1:-2]]).encode(), 1, 0.0)
    with pytest.raises(ValueError):
        Session.from_bytes(b'[1,"old format"]', 1, 0.0)
    with pytest.raises(ValueError):
        Session.from_bytes(b"not json", 1, 0.0)
