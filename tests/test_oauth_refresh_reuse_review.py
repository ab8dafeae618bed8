"""Hostile review of --oauth-refresh-reuse-seconds over real HTTP: a kept rotation answer must never hand out
a token that no longer works, nor claim more lifetime than its tokens have left."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest

from sidecar.oauth import id_token
from sidecar.store import SessionStore
from tests.test_oauth_refresh_reuse import assert_ended, bearer_status, granted
from tests.test_oauth_tokens import oauth_stack, post, refresh, server_of

pytestmark = pytest.mark.timeout(60)


def claims(jwt: str) -> dict[str, Any]:
    payload = jwt.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


async def test_a_retry_never_outlives_the_kept_access_token(store: SessionStore) -> None:
    """Access tokens of 10 s, a window of 30 s: a retry gets what is left of the lifetime, and once the access
    token has expired the kept answer is gone (the old token is then a replay), never an expired token."""
    async with oauth_stack(store, oauth_access_token_ttl="10", oauth_refresh_reuse_seconds="30") as st:
        issued, first = await granted(st)
        cid = issued.client.client_id
        status, second, _ = await refresh(st.base, first["refresh_token"], cid)
        rotated_at = time.time()
        assert status == 200 and second["expires_in"] == 10
        await asyncio.sleep(2.2)
        status, again, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 200 and again["access_token"] == second["access_token"]
        assert again["refresh_token"] == second["refresh_token"]
        assert again["expires_in"] <= 8  # not the full 10 s again: expires_in counts from this response
        # the re-minted ID token: its exp from what is left (never less than 60 s: id_token.py), the same
        # at_hash, auth_time and subject as the rotation's own ID token, no nonce on a refresh
        kept, retried = claims(second["id_token"]), claims(again["id_token"])
        assert retried["exp"] - retried["iat"] == max(60, again["expires_in"])
        assert retried["at_hash"] == id_token.at_hash(again["access_token"]) == kept["at_hash"]
        assert (retried["auth_time"], retried["sub"], retried["aud"]) == (kept["auth_time"], kept["sub"], kept["aud"])
        assert "nonce" not in retried and "nonce" not in kept
        assert await bearer_status(st, again["access_token"]) == 200
        await asyncio.sleep(max(0.0, rotated_at + 10.5 - time.time()))
        assert await bearer_status(st, second["access_token"]) == 401  # the kept access token has expired
        status, body, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 400 and body["error"] == "invalid_grant"
        assert "access_token" not in body
        await assert_ended(st, issued, second)


@pytest.mark.parametrize("revoked", ["the kept access token", "the kept refresh token"])
async def test_a_retry_after_the_client_revoked_the_kept_answer_is_a_replay(store: SessionStore, revoked: str) -> None:
    """RFC 7009: once the client revoked a token of the answer, that answer is not given again: the old
    refresh token is then a replay (whoever holds it after the client got the answer is not the client)."""
    async with oauth_stack(store) as st:
        issued, first = await granted(st)
        cid = issued.client.client_id
        status, second, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 200
        token = second["access_token"] if revoked == "the kept access token" else second["refresh_token"]
        status, _, _ = await post(st.base, "/oauth2/revoke", {"token": token, "client_id": cid})
        assert status == 200
        assert await bearer_status(st, second["access_token"]) == 401
        status, body, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 400 and body["error"] == "invalid_grant"
        assert "access_token" not in body
        await assert_ended(st, issued, second)
        assert await server_of(st).store.get_grant(issued.grant.grant_id) is None


async def test_the_kept_answer_in_redis_never_outlives_the_grant_or_its_tokens(redis_url: str) -> None:
    """A 60 s window, access tokens of 30 s: the kept answer's TTL stays within the new access token's, the new
    refresh token's and the grant's own (no sealed answer left behind its tokens or its grant)."""
    from redis import asyncio as aioredis

    from sidecar.store import RedisStore

    client = aioredis.from_url(redis_url)
    try:
        kw = {"oauth_refresh_reuse_seconds": "60", "oauth_access_token_ttl": "30"}
        async with oauth_stack(RedisStore(client), **kw) as st:
            issued, first = await granted(st)
            gid = issued.grant.grant_id
            status, second, _ = await refresh(st.base, first["refresh_token"], issued.client.client_id)
            assert status == 200
            [kept] = await client.keys(f"*oa:ru:{{{gid}}}:*")
            [grant_key] = await client.keys(f"*oa:g:{{{gid}}}")
            [new_refresh] = await client.keys(f"*oa:rt:{{{gid}}}:*")
            access = [await client.pttl(k) for k in await client.keys(f"*oa:at:{{{gid}}}:*")]
            kept_ttl = await client.pttl(kept)
            assert 0 < kept_ttl <= min(await client.pttl(grant_key), await client.pttl(new_refresh), max(access))
            assert kept_ttl <= 30_000 and second["expires_in"] == 30
    finally:
        await client.aclose()


def test_a_sealed_rotation_opens_only_with_its_own_old_token() -> None:
    """AES-GCM under HKDF(old token): a fresh random nonce per seal, nothing opens it but that very token, and
    any change to the blob (flipped, cut, emptied, another seal's nonce) reads as no answer (then a replay)."""
    from sidecar.oauth import refresh_reuse as reuse
    from sidecar.oauth import tokens as tk
    from sidecar.oauth.model import IssuedTokens

    gid = tk.new_grant_id()
    old, other = tk.mint(tk.REFRESH, gid), tk.mint(tk.REFRESH, gid)
    issued = IssuedTokens(tk.mint(tk.ACCESS, gid), tk.mint(tk.REFRESH, gid), 900, "openid", "https://r/mcp")
    rotation = reuse.Rotation("c-1", "https://r/mcp", "openid", b"k" * 32, issued, issued_at=time.time())
    one, two = reuse.seal(rotation, old), reuse.seal(rotation, old)
    assert one[:12] != two[:12] and one != two  # never the same nonce twice under one key
    assert reuse.unseal(one, old) == rotation == reuse.unseal(two, old)
    assert issued.access_token.encode() not in one and issued.refresh_token.encode() not in one
    assert old.encode() not in one and tk.token_hash(old).encode() not in one
    hostile = [
        one[:-1],
        one[:12],
        b"",
        one[:12] + bytes([one[12] ^ 1]) + one[13:],
        two[:12] + one[12:],
        one + b"\x00",
    ]
    assert all(reuse.unseal(blob, old) is None for blob in hostile)
    for token in (other, old[:-1] + ("A" if old[-1] != "A" else "B"), old.upper(), "", tk.token_hash(old)):
        assert reuse.unseal(one, token) is None
    assert reuse.still_valid(rotation, rotation.issued_at + 900) is None
    assert reuse.still_valid(rotation, rotation.issued_at + 899.5) is None  # under a second left: no answer
    left = reuse.still_valid(rotation, rotation.issued_at + 0.5)
    assert left is not None and left.expires_in == 899 and left.access_token == issued.access_token
