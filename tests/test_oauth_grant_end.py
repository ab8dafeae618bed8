"""Every way a CLI/MCP grant ends (sign out everywhere included) revokes its upstream refresh token at the
provider (as a browser sign-out does) and deletes the record holding it, against each real-provider quirk of
the dev provider: the proof is the provider's own count of live refresh tokens, and the records in Redis."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.oauth.service import OAUTH, PENDING_GRANT_TTL
from sidecar.oidc import NOT_REVOKED_NO_ENDPOINT, REVOKED
from sidecar.store import RedisStore
from tests.provider_quirks import each_quirk
from tests.stack import Stack, browser, sign_in, sign_out_everywhere
from tests.test_oauth_authorize import code_flow, oauth_stack, redeem, register

JSON = {"Accept": "application/json"}


async def _grant(st: Stack, browser_client: aiohttp.ClientSession) -> tuple[str, dict[str, Any]]:
    """A new DCR client authorized through the browser flow (its own upstream sign-in), its code redeemed."""
    reg = await register(st.base)
    query, verifier = await code_flow(st.base, reg["client_id"], browser_client)
    status, tokens = await redeem(st.base, reg["client_id"], query["code"][0], verifier)
    assert status == 200, tokens
    return reg["client_id"], tokens


async def _post(url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(url, data=form) as resp:
        return resp.status, (await resp.json()) if resp.content_type == "application/json" else {}


@each_quirk()
async def test_every_way_a_grant_ends_revokes_its_upstream_refresh_token(
    quirk: dict[str, Any], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.events")
    raw = aioredis.from_url(redis_url)
    store = RedisStore(aioredis.from_url(redis_url), prefix="ge:")
    try:
        async with oauth_stack(store, oauth_grants_per_user="2") as st, browser() as alice:
            st.provider.config(quirk)
            revokes = quirk.get("revocation_endpoint", True)
            server = st.runners[0].app[OAUTH]
            await sign_in(alice, st.base)
            expected = {"live": 1, "records": 1}  # the browser session's

            async def check(how: str) -> None:
                records = len([k async for k in raw.scan_iter(match="ge:s:*")])
                live = st.provider.live_refresh_tokens().get("alice", 0)
                assert (live, records) == (expected["live"], expected["records"]), how

            def started() -> None:
                expected["live"] += 1
                expected["records"] += 1

            def ended() -> None:
                expected["records"] -= 1
                expected["live"] -= 1 if revokes else 0

            # The client revokes its refresh token (RFC 7009).
            client_id, tokens = await _grant(st, alice)
            started()
            await check("grant made")
            form = {"token": tokens["refresh_token"], "client_id": client_id}
            assert (await _post(f"{st.base}/oauth2/revoke", form))[0] == 200
            ended()
            await check("client revoke")

            # The user revokes it on the grants page.
            await _grant(st, alice)
            started()
            async with alice.get(f"{st.base}/oauth2/grants", headers=JSON) as resp:
                listing = await resp.json()
            form = {"csrf": listing["csrf"], "grant_id": listing["grants"][0]["grant_id"]}
            async with alice.post(
                f"{st.base}/oauth2/grants/revoke", data=form, headers={"Origin": st.base, **JSON}
            ) as resp:
                assert resp.status == 200
            ended()
            await check("grants page")

            # A rotated-away refresh token comes back (RFC 9700 4.14.2) after its successor was used (before,
            # within --oauth-refresh-reuse-seconds, it would be a retry: test_oauth_refresh_reuse.py).
            client_id, tokens = await _grant(st, alice)
            started()
            form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id}
            status, rotated = await _post(f"{st.base}/oauth2/token", form)
            assert status == 200
            successor = {**form, "refresh_token": rotated["refresh_token"]}
            assert (await _post(f"{st.base}/oauth2/token", successor))[0] == 200
            status, body = await _post(f"{st.base}/oauth2/token", form)
            assert (status, body["error"]) == (400, "invalid_grant")
            ended()
            await check("refresh replay")

            # A code redeemed twice (RFC 6749 4.1.2).
            reg = await register(st.base)
            query, verifier = await code_flow(st.base, reg["client_id"], alice)
            started()
            assert (await redeem(st.base, reg["client_id"], query["code"][0], verifier))[0] == 200
            assert (await redeem(st.base, reg["client_id"], query["code"][0], verifier))[0] == 400
            ended()
            await check("code replay")

            # A code never redeemed: the sweep ends its grant once it counts as abandoned.
            reg = await register(st.base)
            await code_flow(st.base, reg["client_id"], alice)
            started()
            await check("code issued")
            assert await server.end_abandoned_grants(now=time.time() + 60) == 0  # not yet
            assert await server.end_abandoned_grants(now=time.time() + PENDING_GRANT_TTL + 1) == 1
            ended()
            await check("abandoned code")

            # The per-user limit (2 here) ends the least recently used grant.
            for _ in range(2):
                await _grant(st, alice)
                started()
            await _grant(st, alice)
            started()
            ended()
            await check("per-user limit")
            assert await server.end_abandoned_grants(now=time.time() + PENDING_GRANT_TTL + 1) == 0  # redeemed ones live
            await check("sweep leaves redeemed grants")

            # Sign out everywhere: the two grants left and the browser session itself.
            assert await sign_out_everywhere(alice, st.base, headers={"Origin": st.base}) == 302
            for _ in range(3):
                ended()
            await check("sign out everywhere")

            said = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "oauth_grant_ended"]
            reasons = sorted(f["reason"] for f in said)
            assert reasons == sorted(
                ["revoked_by_client", "revoked_by_user", "refresh_replay", "code_replay", "abandoned", "limit"]
                + ["signed_out_everywhere"] * 2
            )
            assert {f["upstream_refresh_token"] for f in said} == {REVOKED if revokes else NOT_REVOKED_NO_ENDPOINT}
            if not revokes:
                assert st.provider.stats()["revoke_calls"] == 0  # never a POST to an endpoint discovery did not name
    finally:
        await store.close()
        await raw.aclose()
