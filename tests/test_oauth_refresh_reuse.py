"""--oauth-refresh-reuse-seconds over real HTTP: a retry of the latest rotation gets its answer again; every
other presentation of a rotated refresh token is still a replay that ends the grant (RFC 9700 4.14.2)."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import aiohttp
import pytest

from sidecar.oauth import tokens as tk
from sidecar.store import SessionStore
from tests.stack import Stack
from tests.test_oauth_tokens import Issued, new_grant, oauth_stack, post, redeem, refresh, register, server_of

pytestmark = pytest.mark.timeout(60)


async def bearer_status(st: Stack, access_token: str) -> int:
    headers = {"Authorization": "Bearer " + access_token}
    async with aiohttp.ClientSession() as http, http.get(st.base + "/mcp/x", headers=headers) as resp:
        return resp.status


def same_answer(bodies: list[dict[str, Any]]) -> bool:
    """The same tokens; expires_in counts from each response, so a retry's is up to a few seconds less."""
    fields = ("access_token", "refresh_token", "scope", "token_type")
    lifetimes = [b["expires_in"] for b in bodies]
    return max(lifetimes) - min(lifetimes) <= 2 and all(all(b[f] == bodies[0][f] for f in fields) for b in bodies)


async def granted(st: Stack, base: str | None = None) -> tuple[Issued, dict[str, Any]]:
    issued = await new_grant(st)
    status, tokens, _ = await redeem(base or st.base, issued)
    assert status == 200
    return issued, tokens


async def assert_ended(st: Stack, issued: Issued, *answers: dict[str, Any]) -> None:
    """The grant is gone and none of the tokens of ``answers`` works any more."""
    assert await server_of(st).store.get_grant(issued.grant.grant_id) is None
    for answer in answers:
        assert await bearer_status(st, answer["access_token"]) == 401
        status, body, _ = await refresh(st.base, answer["refresh_token"], issued.client.client_id)
        assert status == 400 and body["error"] == "invalid_grant"


async def test_concurrent_refreshes_with_one_token_get_one_answer(
    store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with oauth_stack(store) as st:  # the default window: 10 s
        assert st.configs[0].oauth_refresh_reuse_seconds == 10
        issued, first = await granted(st)
        cid = issued.client.client_id
        results = await asyncio.gather(*(refresh(st.base, first["refresh_token"], cid) for _ in range(5)))
        assert [r[0] for r in results] == [200] * 5
        bodies = [r[1] for r in results]
        assert same_answer(bodies) and bodies[0]["refresh_token"] != first["refresh_token"]
        assert all(b["id_token"] for b in bodies)  # an openid grant: each answer carries an ID token
        assert all(r[2].headers["Cache-Control"] == "no-store" for r in results)
        second = bodies[0]
        assert await bearer_status(st, second["access_token"]) == 200
        # a retry whose answer was lost, sequential this time, with the grant's resource named: the same answer
        status, again, _ = await refresh(st.base, first["refresh_token"], cid, resource=st.base + "/mcp")
        assert status == 200 and same_answer([second, again])
        retried = [r for r in caplog.records if r.getMessage() == "oauth_refresh_retried"]
        assert len(retried) == 5  # the 4 racing losers (found no record, or were told "again") and this retry
        assert not [r for r in caplog.records if first["refresh_token"] in r.getMessage() + str(vars(r))]
        # only one branch: the kept answer's refresh token is the one that works, and it rotates normally
        status, third, _ = await refresh(st.base, second["refresh_token"], cid)
        assert status == 200 and third["refresh_token"] != second["refresh_token"]
        # the family moved on: the first token, even within the window, is a replay and ends everything
        status, body, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 400 and body["error"] == "invalid_grant"
        await assert_ended(st, issued, second, third)


@pytest.mark.parametrize(
    "variant",
    ["another client", "another resource", "a wider scope", "a confidential client without its secret"],
)
async def test_a_retry_that_is_not_the_same_request_is_a_replay(variant: str) -> None:
    async with oauth_stack() as st:
        server = server_of(st)
        if variant == "a confidential client without its secret":
            client = await register(server, "client_secret_post", "s3cret")
            issued = await new_grant(st, client=client)
            _, first, _ = await redeem(st.base, issued, client_secret="s3cret")
            status, second, _ = await refresh(st.base, first["refresh_token"], client.client_id, client_secret="s3cret")
            assert status == 200
            status, body, _ = await refresh(st.base, first["refresh_token"], client.client_id)
            assert status == 400 and body["error"] == "invalid_client"  # never reaches the token at all
            status, again, _ = await refresh(st.base, first["refresh_token"], client.client_id, client_secret="s3cret")
            assert status == 200 and same_answer([second, again])  # the real client's retry still works
            return
        issued, first = await granted(st)
        cid = issued.client.client_id
        status, second, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 200
        if variant == "another client":
            other = await register(server)
            status, body, _ = await refresh(st.base, first["refresh_token"], other.client_id)
        elif variant == "another resource":
            status, body, _ = await refresh(st.base, first["refresh_token"], cid, resource=st.base + "/api")
        else:
            status, body, _ = await refresh(st.base, first["refresh_token"], cid, scope="openid email")
        assert status == 400 and body["error"] == "invalid_grant"
        assert "refresh_token" not in body and "access_token" not in body
        await assert_ended(st, issued, second)


async def test_hostile_tokens_within_the_window_change_nothing() -> None:
    async with oauth_stack() as st:
        issued, first = await granted(st)
        cid = issued.client.client_id
        status, second, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 200
        gid = issued.grant.grant_id
        old_secret = first["refresh_token"].rsplit(".", 1)[1]
        for forged in (
            f"scr.{gid}." + "A" * 43,  # the grant's id, a guessed secret
            f"scr.{gid}.{old_secret[::-1]}",
            f"sca.{gid}.{old_secret}",  # the old secret as another kind
            first["access_token"],
        ):
            status, body, _ = await refresh(st.base, forged, cid)
            assert status == 400 and body["error"] == "invalid_grant"
            assert "access_token" not in body
        assert await server_of(st).store.get_grant(gid) is not None
        status, again, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 200 and same_answer([second, again])


@pytest.mark.parametrize("ending", ["client revokes", "sign out everywhere"])
async def test_a_retry_after_the_grant_ended_is_refused(ending: str) -> None:
    async with oauth_stack() as st:
        issued, first = await granted(st)
        cid = issued.client.client_id
        status, second, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 200
        if ending == "client revokes":
            status, _, _ = await post(st.base, "/oauth2/revoke", {"token": second["refresh_token"], "client_id": cid})
            assert status == 200
        else:
            await server_of(st).svc.sessions.end_all_for_user(issued.grant.sub)
        status, body, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 400 and body["error"] == "invalid_grant"
        assert "access_token" not in body
        await assert_ended(st, issued, second)


async def test_after_the_window_the_old_token_is_a_replay() -> None:
    async with oauth_stack(oauth_refresh_reuse_seconds="1") as st:
        issued, first = await granted(st)
        cid = issued.client.client_id
        status, second, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 200
        await asyncio.sleep(1.3)
        status, body, _ = await refresh(st.base, first["refresh_token"], cid)
        assert status == 400 and body["error"] == "invalid_grant"
        await assert_ended(st, issued, second)


async def test_window_zero_is_strict(store: SessionStore) -> None:
    async with oauth_stack(store, oauth_refresh_reuse_seconds="0") as st:
        issued, first = await granted(st)
        cid = issued.client.client_id
        results = await asyncio.gather(*(refresh(st.base, first["refresh_token"], cid) for _ in range(2)))
        assert sorted(r[0] for r in results) == [200, 400]
        assert [r[1]["error"] for r in results if r[0] == 400] == ["invalid_grant"]
        await assert_ended(st, issued, *[r[1] for r in results if r[0] == 200])


async def test_two_replicas_racing_rotate_once_and_redis_keeps_no_token_in_clear(redis_url: str) -> None:
    from redis import asyncio as aioredis

    from sidecar.store import RedisStore

    client = aioredis.from_url(redis_url)
    shared = RedisStore(client)
    try:
        async with oauth_stack(shared) as st:
            await st.add_sidecar(shared, oauth_server="true", oauth_resource="/mcp,/api")
            issued, first = await granted(st)
            cid, gid = issued.client.client_id, issued.grant.grant_id
            results = await asyncio.gather(
                *(refresh(st.sidecars[i % 2], first["refresh_token"], cid) for i in range(6))
            )
            assert [r[0] for r in results] == [200] * 6
            second = results[0][1]
            assert same_answer([r[1] for r in results])
            # exactly one rotation: one refresh record, two access tokens (the code's and the rotation's)
            assert len(await client.keys(f"*oa:rt:{{{gid}}}:*")) == 1
            assert len(await client.keys(f"*oa:at:{{{gid}}}:*")) == 2
            kept = await client.keys(f"*oa:ru:{{{gid}}}:*")
            assert [k.decode().rsplit(":", 1)[1] for k in kept] == [tk.token_hash(first["refresh_token"])]
            assert 0 < await client.pttl(kept[0]) <= 10_000
            # a dump of Redis: no token, token secret or its base64 anywhere in any value
            secrets_ = [first["refresh_token"], second["refresh_token"], second["access_token"]]
            needles = [s.encode() for s in secrets_] + [s.rsplit(".", 1)[1].encode() for s in secrets_]
            needles += [base64.b64encode(s.encode()) for s in secrets_]
            dump = b""
            for key in await client.keys("*"):
                kind = (await client.type(key)).decode()
                if kind == "string":
                    dump += key + b"=" + (await client.get(key) or b"")
                elif kind == "hash":
                    dump += key + b"=" + b"".join(k + v for k, v in (await client.hgetall(key)).items())
                elif kind == "zset":
                    dump += key + b"=" + b"".join(await client.zrange(key, 0, -1))
                else:
                    dump += key
            assert b"oa:ru:" in dump
            assert not [n for n in needles if n in dump]
            # the new refresh token works on either replica; then the old one is a replay on the other
            status, third, _ = await refresh(st.sidecars[1], second["refresh_token"], cid)
            assert status == 200
            kept = await client.keys(f"*oa:ru:{{{gid}}}:*")  # only the latest rotation's answer is kept
            assert [k.decode().rsplit(":", 1)[1] for k in kept] == [tk.token_hash(second["refresh_token"])]
            status, body, _ = await refresh(st.sidecars[0], first["refresh_token"], cid)
            assert status == 400 and body["error"] == "invalid_grant"
            await assert_ended(st, issued, second, third)
    finally:
        await client.aclose()
