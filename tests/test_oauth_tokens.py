"""P/token and P/revoke over real HTTP, with grants made through OAuthServer (as the consent step does)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from sidecar.context import SERVICES
from sidecar.oauth.model import GRANT_TYPES, Client, Grant
from sidecar.oauth.service import OAUTH, OAuthServer
from sidecar.store import SessionStore
from tests.stack import Stack, browser, session_cookie, sign_in, stack

pytestmark = pytest.mark.timeout(60)

REDIRECT = "http://127.0.0.1:9/callback"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def server_of(st: Stack, index: int = 0) -> OAuthServer:
    return st.runners[index].app[OAUTH]


@dataclass
class Issued:
    grant: Grant
    code: str
    verifier: str
    client: Client


async def register(server: OAuthServer, method: str = "none", secret: str = "") -> Client:
    client = Client(
        client_id="c-" + secrets.token_hex(4),
        client_name="Test CLI",
        redirect_uris=(REDIRECT,),
        grant_types=GRANT_TYPES,
        token_endpoint_auth_method=method,
        secret_hash=hashlib.sha256(secret.encode()).hexdigest() if secret else None,
        created_at=time.time(),
        registered_from="127.0.0.1",
    )
    await server.store.put_client(client, 3600)
    return client


async def new_grant(
    st: Stack, path: str = "/mcp", client: Client | None = None, index: int = 0, base: str | None = None
) -> Issued:
    """A browser sign-in gives real upstream tokens; the grant is made on them as the consent step would."""
    base = base or st.sidecars[index]
    app = st.runners[index].app
    server = app[OAUTH]
    async with browser() as b:
        await sign_in(b, base)
        cookie = session_cookie(b)
    assert cookie
    svc = app[SERVICES]
    ref = svc.codec.load_session(cookie, time.time())
    session = await svc.sessions.load(ref)
    await svc.sessions.end(ref, session, "test")  # the grant's record is its own; the browser's is not needed
    client = client or await register(server)
    grant, key = await server.start_grant(
        session.identity,
        session.tokens,
        {"sub": session.identity.sub},
        client,
        resource=base + path,
        resource_path=path,
        scope="openid",
        client_ip="127.0.0.1",
        user_agent="test",
    )
    verifier, challenge = pkce()
    code = await server.issue_code(grant, key, REDIRECT, challenge)
    return Issued(grant, code, verifier, client)


async def post(base: str, path: str, data: Any, **kw: Any) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as http, http.post(base + path, data=data, **kw) as resp:
        body = await resp.json(content_type=None) if resp.content_length != 0 else {}
        return resp.status, body or {}, resp


async def redeem(base: str, issued: Issued, **extra: str) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    form = {
        "grant_type": "authorization_code",
        "code": issued.code,
        "redirect_uri": REDIRECT,
        "code_verifier": issued.verifier,
        "client_id": issued.client.client_id,
    }
    form.update(extra)
    return await post(base, "/oauth2/token", {k: v for k, v in form.items() if v != "<drop>"})


async def refresh(base: str, token: str, client_id: str, **extra: str) -> tuple[int, dict[str, Any], Any]:
    return await post(
        base, "/oauth2/token", {"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id, **extra}
    )


@asynccontextmanager
async def oauth_stack(store: SessionStore | None = None, **kw: Any) -> AsyncIterator[Stack]:
    async with stack(store, oauth_server="true", oauth_resource="/mcp,/api", **kw) as st:
        yield st


async def test_code_redeems_once_and_replay_ends_the_grant(store: SessionStore) -> None:
    async with oauth_stack(store) as st:
        issued = await new_grant(st)
        status, body, resp = await redeem(st.base, issued)
        assert status == 200, body
        assert resp.headers["Cache-Control"] == "no-store" and resp.headers["Pragma"] == "no-cache"
        assert body["token_type"] == "Bearer" and body["access_token"].startswith("sca.")
        assert body["refresh_token"].startswith("scr.") and 0 < body["expires_in"] <= 900
        status, again, _ = await redeem(st.base, issued)
        assert status == 400 and again["error"] == "invalid_grant"
        assert issued.code not in str(again)
        server = server_of(st)
        assert await server.store.get_grant(issued.grant.grant_id) is None  # the replay ended the grant
        status, body, _ = await refresh(st.base, body["refresh_token"], issued.client.client_id)
        assert status == 400 and body["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"code_verifier": "<drop>"}, "invalid_request"),  # PKCE is not optional
        ({"code_verifier": "x" * 43}, "invalid_grant"),  # wrong verifier
        ({"code_verifier": "short"}, "invalid_grant"),  # malformed verifier
        ({"redirect_uri": REDIRECT + "/"}, "invalid_grant"),
        ({"redirect_uri": REDIRECT.upper()}, "invalid_grant"),
        ({"redirect_uri": REDIRECT + "?x=1"}, "invalid_grant"),
        ({"redirect_uri": "<drop>"}, "invalid_grant"),
        ({"resource": "http://127.0.0.1:1/mcp"}, "invalid_target"),
        ({"code": "scc.AAAAAAAAAAAAAAAAAAAAAA." + "A" * 43}, "invalid_grant"),
        ({"code": "garbage"}, "invalid_grant"),
        ({"grant_type": "password"}, "unsupported_grant_type"),
    ],
)
async def test_code_redemption_refusals(change: dict[str, str], error: str) -> None:
    async with oauth_stack() as st:
        issued = await new_grant(st)
        status, body, resp = await redeem(st.base, issued, **change)
        assert status == 400 and body["error"] == error, body
        assert resp.headers["Cache-Control"] == "no-store"
        assert issued.verifier not in str(body) and issued.code not in str(body)


async def test_plain_pkce_verifier_equal_to_challenge_is_refused() -> None:
    """A client that used ``plain`` sends the challenge itself as the verifier: it never matches S256."""
    async with oauth_stack() as st:
        server = server_of(st)
        issued = await new_grant(st)
        plain = secrets.token_urlsafe(48)
        code = await server.issue_code(issued.grant, b"\x00" * 32, REDIRECT, plain)
        status, body, _ = await redeem(st.base, Issued(issued.grant, code, plain, issued.client))
        assert status == 400 and body["error"] == "invalid_grant"


async def test_client_authentication_and_body_rules() -> None:
    async with oauth_stack() as st:
        server = server_of(st)
        secret = "s3cret-" + secrets.token_hex(8)
        confidential = await register(server, "client_secret_basic", secret)
        issued = await new_grant(st, client=confidential)
        form = {"grant_type": "authorization_code", "code": issued.code, "redirect_uri": REDIRECT}
        form["code_verifier"] = issued.verifier
        # wrong secret, secret in the body for a basic client, no authentication at all
        bad = {"Authorization": basic(confidential.client_id, "wrong")}
        status, body, resp = await post(st.base, "/oauth2/token", form, headers=bad)
        assert status == 401 and body["error"] == "invalid_client" and "Basic" in resp.headers["WWW-Authenticate"]
        status, body, _ = await post(
            st.base, "/oauth2/token", {**form, "client_id": confidential.client_id, "client_secret": secret}
        )
        assert status == 400 and body["error"] == "invalid_client"  # no Basic sent: no challenge, so no 401
        status, body, _ = await post(st.base, "/oauth2/token", {**form, "client_id": confidential.client_id})
        assert status == 400 and body["error"] == "invalid_client"
        # JSON body, repeated parameter, oversize body
        status, body, _ = await post(st.base, "/oauth2/token", None, json=form)
        assert status == 400 and body["error"] == "invalid_request"
        status, body, _ = await post(st.base, "/oauth2/token", "grant_type=a&grant_type=b&client_id=x")
        assert status == 400 and body["error"] == "invalid_request"
        status, body, _ = await post(st.base, "/oauth2/token", {"grant_type": "x", "pad": "a" * 20000})
        assert status == 400 and body["error"] == "invalid_request"
        # the failed attempts above did not take the code: basic auth with the right secret redeems it
        good = {"Authorization": basic(confidential.client_id, secret)}
        status, body, _ = await post(st.base, "/oauth2/token", form, headers=good)
        assert status == 200, body
        # another client cannot refresh it
        other = await register(server)
        status, body2, _ = await refresh(st.base, body["refresh_token"], other.client_id)
        assert status == 400 and body2["error"] == "invalid_grant"


async def test_refresh_rotates_and_replay_kills_the_family(store: SessionStore) -> None:
    async with oauth_stack(store) as st:
        issued = await new_grant(st)
        _, first, _ = await redeem(st.base, issued)
        cid = issued.client.client_id
        status, second, resp = await refresh(st.base, first["refresh_token"], cid, resource=st.base + "/mcp/")
        assert status == 200 and resp.headers["Cache-Control"] == "no-store"
        assert second["refresh_token"] != first["refresh_token"]
        status, body, _ = await refresh(st.base, second["refresh_token"], cid, resource=st.base + "/api")
        assert status == 400 and body["error"] == "invalid_target"  # resource must be the grant's
        status, third, _ = await refresh(st.base, second["refresh_token"], cid)
        assert status == 200
        # The first refresh token again: the whole family ends, access tokens included.
        status, body, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 400 and body["error"] == "invalid_grant"
        status, body, _ = await refresh(st.base, third["refresh_token"], cid)
        assert status == 400 and body["error"] == "invalid_grant"
        async with aiohttp.ClientSession() as http:
            for tokens in (first, second, third):
                headers = {"Authorization": "Bearer " + tokens["access_token"]}
                async with http.get(st.base + "/mcp/x", headers=headers) as resp:
                    assert resp.status == 401
        server = server_of(st)
        assert await server.store.get_grant(issued.grant.grant_id) is None
        # the grant's upstream-token record went with it
        assert await server.sessions.store.user_sessions(_user_key(issued.grant.sub)) == []


def _user_key(sub: str) -> str:
    from sidecar.sessions import user_key

    return user_key(sub)


async def test_two_replicas_refresh_the_same_token_at_once_strict(redis_url: str) -> None:
    """With --oauth-refresh-reuse-seconds 0 a race is a replay (the window: test_oauth_refresh_reuse.py)."""
    from redis import asyncio as aioredis

    from sidecar.store import RedisStore

    client = aioredis.from_url(redis_url)
    shared = RedisStore(client)
    strict = {"oauth_refresh_reuse_seconds": "0"}
    try:
        async with oauth_stack(shared, **strict) as st:
            await st.add_sidecar(shared, oauth_server="true", oauth_resource="/mcp,/api", **strict)
            issued = await new_grant(st)
            _, tokens, _ = await redeem(st.base, issued)
            results = await asyncio.gather(
                *(refresh(base, tokens["refresh_token"], issued.client.client_id) for base in st.sidecars)
            )
            statuses = sorted(r[0] for r in results)
            assert statuses == [200, 400]
            assert [r[1]["error"] for r in results if r[0] == 400] == ["invalid_grant"]
            assert await server_of(st).store.get_grant(issued.grant.grant_id) is None  # the race ended the grant
    finally:
        await client.aclose()


async def test_refresh_after_upstream_session_ended_is_invalid_grant() -> None:
    async with oauth_stack() as st:
        issued = await new_grant(st)
        _, tokens, _ = await redeem(st.base, issued)
        server = server_of(st)
        await server.svc.sessions.end_all_for_user(issued.grant.sub)  # "sign out everywhere"
        status, body, _ = await refresh(st.base, tokens["refresh_token"], issued.client.client_id)
        assert status == 400 and body["error"] == "invalid_grant"
        assert await server.store.get_grant(issued.grant.grant_id) is None


async def test_revocation() -> None:
    async with oauth_stack() as st:
        issued = await new_grant(st)
        _, tokens, _ = await redeem(st.base, issued)
        cid = issued.client.client_id
        server = server_of(st)
        other = await register(server)
        # unknown and malformed tokens: 200; another client's token: 200 and untouched
        for token in ("nope", "sca.AAAAAAAAAAAAAAAAAAAAAA." + "A" * 43):
            status, _, _ = await post(st.base, "/oauth2/revoke", {"token": token, "client_id": cid})
            assert status == 200
        form = {"token": tokens["refresh_token"], "client_id": other.client_id, "token_type_hint": "refresh_token"}
        status, _, _ = await post(st.base, "/oauth2/revoke", form)
        assert status == 200 and await server.store.get_grant(issued.grant.grant_id) is not None
        status, body, _ = await post(st.base, "/oauth2/revoke", {"client_id": cid})
        assert status == 400 and body["error"] == "invalid_request"
        # an access token ends only itself
        form = {"token": tokens["access_token"], "client_id": cid, "token_type_hint": "access_token"}
        assert (await post(st.base, "/oauth2/revoke", form))[0] == 200
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": "Bearer " + tokens["access_token"]}
            async with http.get(st.base + "/mcp/x", headers=headers) as resp:
                assert resp.status == 401
        status, fresh, _ = await refresh(st.base, tokens["refresh_token"], cid)
        assert status == 200
        # a refresh token ends the grant
        assert (await post(st.base, "/oauth2/revoke", {"token": fresh["refresh_token"], "client_id": cid}))[0] == 200
        assert await server.store.get_grant(issued.grant.grant_id) is None
        status, body, _ = await refresh(st.base, fresh["refresh_token"], cid)
        assert status == 400 and body["error"] == "invalid_grant"


async def test_device_code_states() -> None:
    from dataclasses import replace

    from sidecar.oauth.model import DeviceAuthorization
    from sidecar.oauth.tokens import token_hash

    async with oauth_stack() as st:
        server = server_of(st)
        issued = await new_grant(st)
        cid = issued.client.client_id
        device_code = secrets.token_urlsafe(32)
        now = time.time()
        device = DeviceAuthorization(
            token_hash(device_code), "BCDFGHJK", cid, issued.grant.resource, "", now + 60, 5.0, "pending"
        )
        await server.store.put_device(device, 60)
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": device_code,
            "client_id": cid,
        }
        status, body, _ = await post(st.base, "/oauth2/token", form)
        assert status == 400 and body["error"] == "authorization_pending"
        status, body, _ = await post(st.base, "/oauth2/token", form)
        assert status == 400 and body["error"] == "slow_down"
        stored = await server.store.device_by_code_hash(device.device_code_hash)
        assert stored is not None and stored.interval == 10.0
        other = await register(server)
        status, body, _ = await post(st.base, "/oauth2/token", {**form, "client_id": other.client_id})
        assert status == 400 and body["error"] == "invalid_grant"
        # approved: one redemption only
        _, key = await _grant_key(st, issued)
        assert await server.approve_device(device, issued.grant, key)
        status, tokens, _ = await post(st.base, "/oauth2/token", form)
        assert status == 200 and tokens["access_token"].startswith("sca."), tokens
        status, body, _ = await post(st.base, "/oauth2/token", form)
        assert status == 400 and body["error"] == "invalid_grant"
        # denied and expired
        denied = replace(device, device_code_hash=token_hash("d2"), user_code="BCDFGHJL", status="denied")
        await server.store.put_device(denied, 60)
        status, body, _ = await post(st.base, "/oauth2/token", {**form, "device_code": "d2"})
        assert body["error"] == "access_denied"
        expired = replace(device, device_code_hash=token_hash("d3"), user_code="BCDFGHJM", expires_at=now - 1)
        await server.store.put_device(expired, 60)
        status, body, _ = await post(st.base, "/oauth2/token", {**form, "device_code": "d3"})
        assert body["error"] == "expired_token"
        status, body, _ = await post(st.base, "/oauth2/token", {**form, "device_code": "never"})
        assert body["error"] == "invalid_grant"


async def _grant_key(st: Stack, issued: Issued) -> tuple[Grant, bytes]:
    """The session key of a grant, opened the way the token endpoint does: from its code."""
    from sidecar.oauth import tokens as tk

    server = server_of(st)
    record, _ = await server.store.take_code(tk.token_hash(issued.code), issued.grant.grant_id)
    assert record is not None
    key = tk.unwrap_key(record.wrapped_key, issued.code)
    assert key is not None
    return issued.grant, key


async def test_unused_grant_record_lives_for_the_idle_timeout_not_the_browser_refresh_ttl(
    redis_url: str, raw_redis: Any
) -> None:
    """The dev provider gives no refresh_expires_in: the grant's upstream-token record must still live for
    --oauth-refresh-idle-timeout (60 days here), not --refresh-token-ttl (1 day here)."""
    import redis.asyncio as aioredis

    from sidecar.cookies import SessionRef
    from sidecar.store import RedisStore

    store = RedisStore(aioredis.from_url(redis_url))
    try:
        async with oauth_stack(
            store, refresh_token_ttl="24h", oauth_refresh_idle_timeout="1440h", session_store_type="redis"
        ) as st:
            st.provider.send_refresh_expires_in = False  # as Entra and many others: no refresh lifetime given
            issued = await new_grant(st)
            grant = await server_of(st).store.get_grant(issued.grant.grant_id)
            assert grant is not None
            record_key = SessionRef(sid=grant.session_sid, key=b"").store_key
            ttls = [await raw_redis.ttl(key) async for key in raw_redis.scan_iter(match=f"*{record_key}*")]
            assert ttls and min(ttls) > 50 * 86400, ttls
    finally:
        await store.close()
