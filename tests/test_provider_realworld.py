"""What real providers send that the other provider tests do not: logout tokens typed or shaped the way
different providers write them, ``Retry-After`` on a rate-limited token endpoint, and ID tokens signed with
the algorithms and key sets real providers use (ES256, PS256, EdDSA, a key set whose keys carry no ``kid``).
Real HTTP against the dev provider and a started sidecar; one stack shared by the cases of a test."""

from __future__ import annotations

import time
import uuid
from typing import Any

import aiohttp
import jwt

from sidecar.oidc import BACKCHANNEL_EVENT
from tests.stack import Stack, browser, sign_in, stack


def _logout_claims(st: Stack, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": st.issuer,
        "aud": "sidecar-dev",
        "iat": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "sub": "alice-sub-1",
        "events": {BACKCHANNEL_EVENT: {}},
        **changes,
    }
    return {k: v for k, v in claims.items() if v is not None}


def _signed(st: Stack, claims: dict[str, Any], **header: Any) -> str:
    """Signed with the provider's current key, with these extra header fields (``typ``)."""
    key = st.provider.keys.current
    return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid, **header})


async def _post_logout(base: str, token: str) -> int:
    async with aiohttp.ClientSession() as idp:
        async with idp.post(f"{base}/oauth2/backchannel_logout", data={"logout_token": token}) as resp:
            await resp.read()
            return resp.status


async def _auth(client: aiohttp.ClientSession, base: str) -> int:
    async with client.get(f"{base}/oauth2/auth") as resp:
        return resp.status


# Each refused with 400, the session untouched (OIDC Back-Channel Logout 1.0, 2.4 and 2.6).
REFUSED_LOGOUT_TOKENS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("event value a string", {"events": {BACKCHANNEL_EVENT: "logout"}}, {}),
    ("event value null", {"events": {BACKCHANNEL_EVENT: None}}, {}),
    ("event value a list", {"events": {BACKCHANNEL_EVENT: []}}, {}),
    ("event value true", {"events": {BACKCHANNEL_EVENT: True}}, {}),
    ("events a list", {"events": [BACKCHANNEL_EVENT]}, {}),
    ("another event only", {"events": {"http://schemas.openid.net/event/other": {}}}, {}),
    ("typed as an access token", {}, {"typ": "at+jwt"}),
    ("typed as an access token, media type", {}, {"typ": "application/at+jwt"}),
    ("typed as a security event", {}, {"typ": "secevent+jwt"}),
    ("typed as an ID token", {}, {"typ": "id_token+jwt"}),
    ("typ not a string", {}, {"typ": 1}),
    ("nonce present", {"nonce": "n-1"}, {}),
    ("neither sub nor sid", {"sub": None}, {}),
]
# Accepted: explicit typing in its spellings, no typ (tokens from before the 2023 errata), sub only, sid only.
ACCEPTED_TYPS: list[str | None] = ["logout+jwt", "application/logout+jwt", "Logout+JWT", "JWT", None]


async def test_logout_tokens_shaped_like_other_tokens_are_refused_and_every_real_format_accepted() -> None:
    async with stack(provider_kw={"send_sid": True}) as st, browser() as client:
        await sign_in(client, st.base)
        for name, changes, header in REFUSED_LOGOUT_TOKENS:
            token = _signed(st, _logout_claims(st, **changes), **header)
            assert await _post_logout(st.base, token) == 400, name
            assert await _auth(client, st.base) == 202, name
        for typ in ACCEPTED_TYPS:
            header = {} if typ is None else {"typ": typ}
            assert await _post_logout(st.base, _signed(st, _logout_claims(st), **header)) == 200, typ
            assert await _auth(client, st.base) == 401, typ
            await sign_in(client, st.base)
        # sid only (no sub): ends the provider session it names, and no other
        async with browser() as other:
            await sign_in(other, st.base)
            sid = list(st.provider._families)[-2]  # the provider session of `client`'s last sign-in
            assert await _post_logout(st.base, _signed(st, _logout_claims(st, sub=None, sid=sid))) == 200
            assert await _auth(client, st.base) == 401
            assert await _auth(other, st.base) == 202
