"""Valid sessions without a browser: real sign-ins, and large populations written with the sidecar's own code.

A real sign-in (the sidecar's own OIDC client against the dev provider) gives one genuine
token response (RS256 JWT access token, opaque refresh token, RS256 ID token). Bulk sessions
reuse its exact shape and lengths with fresh random parts per user (ids, signatures, refresh
token), so compression and encryption sizes match real records; they are written by
``Sessions.create`` on a ``RedisStore``, so whatever the sidecar stores is what is measured.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import os
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import redis.asyncio as aioredis

from sidecar.config import build_config
from sidecar.cookies import CookieCodec
from sidecar.models import Identity, TokenSet
from sidecar.oidc import OidcClient, Pkce
from sidecar.policy import identity_from_claims
from sidecar.sessions import Sessions
from sidecar.store import RedisStore

from .procs import CLIENT_ID, CLIENT_SECRET, COOKIE_SECRET


def bench_config(issuer: str, redis_url: str) -> Any:
    return build_config(
        {
            "oidc_issuer_url": issuer,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_url": "http://127.0.0.1:1/oauth2/callback",
            "cookie_secret": COOKIE_SECRET,
            "session_store_type": "redis",
            "redis_connection_url": redis_url,
            "email_domain": "*",
        }
    )


def codec() -> CookieCodec:
    return CookieCodec((COOKIE_SECRET.encode(),), 604800.0)


async def sign_in(base: str) -> str:
    """The browser round trip (start -> provider auto-login -> callback); returns the session cookie."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        async with client.get(f"{base}/oauth2/start", params={"rd": "/ping"}) as resp:
            await resp.read()
        for cookie in client.cookie_jar:
            if cookie.key == "_sidecar":
                return cookie.value
    raise RuntimeError(f"sign-in at {base} gave no session cookie")


@dataclass(frozen=True)
class SignIn:
    """One real sign-in's result, as the sidecar's callback sees it."""

    identity: Identity
    tokens: TokenSet
    claims: dict[str, Any]


async def real_sign_in(issuer: str, redis_url: str) -> SignIn:
    """A genuine authorization-code round trip with the sidecar's own OIDC client (PKCE, ID token checked)."""
    config = bench_config(issuer, redis_url)
    async with aiohttp.ClientSession() as http:
        oidc = OidcClient(config, http)
        state, nonce, pkce = secrets.token_urlsafe(32), secrets.token_urlsafe(32), Pkce.new()
        async with http.get(await oidc.authorize_url(state, nonce, pkce), allow_redirects=False) as resp:
            location = resp.headers["Location"]
        code = parse_qs(urlsplit(location).query)["code"][0]
        tokens = await oidc.exchange_code(code, pkce.verifier)
        claims = await oidc.validate_id_token(tokens.id_token or "", nonce=nonce)
    return SignIn(identity_from_claims(claims, config), tokens, claims)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _random_like(text: str) -> str:
    """A random URL-safe string of the same length."""
    return _b64(os.urandom(len(text)))[: len(text)]


def _jwt_like(token: str, changes: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Same header, claims with ``changes``, a random signature of the original length."""
    header, payload, signature = token.split(".")
    claims = {**json.loads(_unb64(payload)), **changes}
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{header}.{body}.{_random_like(signature)}", claims


class Synthesizer:
    """Per-user variants of one real sign-in: distinct subject, email, ids, signatures, refresh token."""

    def __init__(self, template: SignIn) -> None:
        self.t = template

    def make(self, i: int) -> tuple[Identity, TokenSet, dict[str, Any]]:
        t, now = self.t, int(time.time())
        sub = f"user-{i:07d}-{secrets.token_hex(4)}"
        email = f"user{i:07d}@example.com"
        name = f"User {i:07d}"
        access, _ = _jwt_like(
            t.tokens.access_token,
            {
                "sub": sub,
                "iat": now,
                "exp": now + 3600,
                "jti": _random_like(str(_claim(t.tokens.access_token, "jti"))),
            },
        )
        changes: dict[str, Any] = {
            "sub": sub,
            "email": email,
            "name": name,
            "preferred_username": f"user{i:07d}",
            "iat": now,
            "exp": now + 300,
            "auth_time": now,
        }
        if "nonce" in t.claims:
            changes["nonce"] = _random_like(str(t.claims["nonce"]))
        id_token, claims = _jwt_like(t.tokens.id_token or "", changes)
        identity = replace(t.identity, sub=sub, user=email, email=email, preferred_username=f"user{i:07d}")
        tokens = replace(
            t.tokens,
            access_token=access,
            id_token=id_token,
            refresh_token=_random_like(t.tokens.refresh_token or "x" * 43),
            access_expires_at=now + 3600.0,
            refresh_expires_at=now + 86400.0,
            issued_at=float(now),
        )
        return identity, tokens, claims


def _claim(token: str, name: str) -> Any:
    return json.loads(_unb64(token.split(".")[1])).get(name, "")


async def populate(
    issuer: str, redis_url: str, template: SignIn, count: int, first: int = 0, concurrency: int = 64
) -> list[str]:
    """Write ``count`` sessions with ``Sessions.create``; returns their cookies, in order."""
    client = aioredis.from_url(redis_url, max_connections=concurrency + 4)
    sessions = Sessions(RedisStore(client), bench_config(issuer, redis_url))
    synth, cc = Synthesizer(template), codec()
    cookies: list[str] = [""] * count
    try:

        async def one(k: int) -> None:
            ref, _ = await sessions.create(*synth.make(first + k))
            cookies[k] = cc.dump_session(ref)

        for start in range(0, count, concurrency):
            await asyncio.gather(*(one(k) for k in range(start, min(count, start + concurrency))))
    finally:
        await client.aclose()
    return cookies


def _populate_part(args: tuple[str, str, SignIn, int, int]) -> list[str]:
    issuer, redis_url, template, count, first = args
    import uvloop

    return uvloop.run(populate(issuer, redis_url, template, count, first))


def populate_many(
    issuer: str, redis_url: str, template: SignIn, count: int, first: int = 0, processes: int | None = None
) -> list[str]:
    """``populate`` split over forked processes (the work is CPU bound in Python); call it outside any event loop."""
    processes = max(1, min(processes or os.cpu_count() or 1, count // 1000 or 1))
    share = -(-count // processes)
    parts = [(issuer, redis_url, template, min(share, count - k * share), first + k * share) for k in range(processes)]
    if processes == 1:
        return _populate_part(parts[0])
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes) as pool:
        return [cookie for part in pool.map(_populate_part, parts) for cookie in part]


async def _make_grants(issuer: str, redis_url: str, template: SignIn, count: int) -> None:
    """``count`` OAuth grants as the sidecar makes them (``OAuthServer``: the upstream-token session record,
    the grant, its per-user index, then the first access and refresh token), one user and client each."""
    from sidecar.context import Services
    from sidecar.oauth.model import GRANT_TYPES, Client
    from sidecar.oauth.service import OAuthServer
    from sidecar.oauth.store import grant_store_for
    from sidecar.refresh import Refresher

    config = bench_config(issuer, redis_url).replace(oauth_server=True, oauth_resource=("/mcp",))
    store = RedisStore(aioredis.from_url(redis_url))
    synth = Synthesizer(template)
    try:
        async with aiohttp.ClientSession() as http:
            sessions = Sessions(store, config)
            oidc = OidcClient(config, http)
            svc = Services(config, codec(), sessions, Refresher(sessions, oidc, config), oidc, http)
            server = OAuthServer(config, grant_store_for(store), svc)
            client = Client("bench-client", "bench", ("http://127.0.0.1/cb",), GRANT_TYPES, "none", None, 0.0, "")
            await server.store.put_client(client, 3600)
            for i in range(count):
                identity, tokens, claims = synth.make(i)
                grant, key = await server.start_grant(
                    identity, tokens, claims, client, "http://127.0.0.1:4180/mcp", "/mcp", "openid", "127.0.0.1", "cli"
                )
                issued = await server.issue_tokens(grant, key, None, "127.0.0.1", "cli")
                if isinstance(issued, str):
                    raise RuntimeError(f"issuing a grant's first tokens failed: {issued}")
    finally:
        await store.close()


def make_grants(issuer: str, redis_url: str, template: SignIn, count: int) -> None:
    asyncio.run(_make_grants(issuer, redis_url, template, count))
