"""Anonymous load on the authorization server: what it may store, and limits shared by every worker.

The flood runs against a real redis-server with a small ``maxmemory`` and the shipped eviction policy
(``volatile-ttl``, deploy/kubernetes/redis): thousands of anonymous registrations from many addresses (each
connection really comes from its own 127.x address), sent to two sidecars sharing the Redis, must leave
every signed-in user signed in and evict nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from sidecar.store import RedisStore
from tests.redis_procs import start_server
from tests.stack import browser, free_port, sign_in, stack
from tests.test_signin_hardening import _client

OAUTH = {"oauth_server": "true", "oauth_resource": "/mcp"}
DEVICE = "urn:ietf:params:oauth:grant-type:device_code"


async def _register(http: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> int:
    async with http.post(f"{base}/oauth2/register", json=body) as resp:
        await resp.read()
        if resp.status == 429:
            assert int(resp.headers["Retry-After"]) >= 1
        return resp.status


async def _register_json(http: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(f"{base}/oauth2/register", json=body) as resp:
        return resp.status, await resp.json()


async def test_registration_flood_keeps_every_session_on_a_small_redis(tmp_path: Path) -> None:
    port = free_port()
    proc = start_server("small", tmp_path, port, "--maxmemory-policy", "volatile-ttl")
    url = f"redis://127.0.0.1:{port}/0"
    raw = aioredis.from_url(url)
    stores = [RedisStore(aioredis.from_url(url)), RedisStore(aioredis.from_url(url))]
    try:
        async with stack(stores[0], **OAUTH) as st:
            second = await st.add_sidecar(stores[1], **OAUTH)  # another replica (own limiter, own connection)
            users = [browser() for _ in range(20)]
            for user in users:
                await sign_in(user, st.base)
            used = (await raw.info("memory"))["used_memory"]
            await raw.config_set("maxmemory", str(used + 8 * 1024 * 1024))  # the flood would need ~40 MB before
            largest = {  # just under the 4 KiB kept per registration
                "redirect_uris": ["https://app.example.com/" + "a" * 1700, "http://127.0.0.1:9/" + "b" * 1700],
                "client_name": "n" * 200,
                "token_endpoint_auth_method": "none",
                "padding": "p" * 9000,  # unknown members are not kept
            }
            huge = {**largest, "redirect_uris": [f"https://app.example.com/{i}/" + "c" * 1900 for i in range(7)]}
            statuses: dict[int, int] = {}

            async def flood(ip: str) -> None:
                async with _client(ip) as attacker:
                    for i in range(20):  # the burst of --oauth-registration-rate-limit, split over two replicas
                        base = (st.base, second)[i % 2]
                        status = await _register(attacker, base, huge if i % 5 == 0 else largest)
                        statuses[status] = statuses.get(status, 0) + 1
                    assert await _register(attacker, st.base, largest) == 429  # shared: 20, not 2 x 20

            for batch in range(0, 150, 15):  # 3,000 registrations (and 150 over the rate) from 150 networks (/24)
                await asyncio.gather(*(flood(f"127.5.{i}.1") for i in range(batch + 1, batch + 16)))
            # 400: over 4 KiB. Every other one is kept: a full pool forgets the oldest unused client of the
            # network holding the most (unused_pool.py) rather than refusing everyone.
            assert statuses == {201: 2400, 400: 600}, statuses
            stats = await raw.info("stats")
            assert stats["evicted_keys"] == 0
            keys = [k async for k in raw.scan_iter(match="sc:oa:cl:*", count=1000)]
            assert len(keys) == 1000  # --oauth-unused-clients-max, across both replicas
            held = [int(n) for _, n in await raw.zrange("sc:oa:{cn}:h", 0, -1, withscores=True)]
            assert sum(held) == 1000 and len(held) == 150 and max(held) - min(held) <= 1, held  # an even split
            for key in keys[:50]:
                assert 0 < await raw.pttl(key) <= 3_600_000  # unused: one hour at most
                assert len(await raw.get(key) or b"") <= 4 * 1024 + 2
            for user in users:
                for base in (st.base, second):
                    async with user.get(f"{base}/oauth2/auth") as resp:
                        assert resp.status == 202
                await user.close()
    finally:
        for store in stores:
            await store.close()
        await raw.aclose()
        proc.stop()


async def test_unauthenticated_endpoints_share_their_limits_across_replicas(redis_url: str) -> None:
    stores = [RedisStore(aioredis.from_url(redis_url)), RedisStore(aioredis.from_url(redis_url))]
    limits = {"oauth_registration_rate_limit": "2", "oauth_token_rate_limit": "2", "signin_rate_limit": "2"}
    try:
        async with stack(stores[0], **OAUTH, **limits) as st, _client("127.0.6.1") as one, _client("127.0.6.2") as two:
            other = await st.add_sidecar(stores[1], **OAUTH, **limits)
            bases = (st.base, other)
            body = {"grant_types": [DEVICE], "token_endpoint_auth_method": "none"}
            created = [await _register(one, bases[i % 2], body) for i in range(6)]
            assert created == [201] * 4 + [429] * 2  # burst 4 in all, not 4 per replica
            assert await _register(two, other, body) == 201  # another address has its own bucket
            for path, form in [
                ("/oauth2/token", {"grant_type": "refresh_token", "refresh_token": "x", "client_id": "nobody"}),
                ("/oauth2/device_authorization", {"client_id": "nobody"}),
            ]:
                got = []
                for i in range(6):
                    async with one.post(bases[i % 2] + path, data=form) as resp:
                        got.append(resp.status)
                        if resp.status == 429:
                            assert (await resp.json())["error"] == "too_many_requests"
                assert got[4:] == [429, 429] and 429 not in got[:4], (path, got)
            _, device_client = await _register_json(two, other, body)
            answers = []
            for i in range(22):  # one client's device codes from 22 addresses: each address has its own count
                async with _client(f"127.0.7.{i + 1}") as somewhere:
                    form = {"client_id": device_client["client_id"]}
                    async with somewhere.post(bases[i % 2] + "/oauth2/device_authorization", data=form) as resp:
                        answers.append(resp.status)
            assert answers == [200] * 22
    finally:
        for store in stores:
            await store.close()


async def test_one_address_cannot_lock_a_clients_other_users_out_of_the_device_flow(redis_url: str) -> None:
    """A client id is no secret (a metadata document's URL is public): one address asking for device codes of
    someone else's client, through two replicas, fills only its own count (20 waiting), never the client's."""
    stores = [RedisStore(aioredis.from_url(redis_url), prefix="lock:") for _ in range(2)]
    limits = {"signin_rate_limit": "100"}  # the per-address request rate is not what is tested here
    try:
        async with (
            stack(stores[0], **OAUTH, **limits) as st,
            _client("127.0.8.1") as owner,
            _client("127.0.8.2") as attacker,
        ):
            other = await st.add_sidecar(stores[1], **OAUTH, **limits)
            bases = (st.base, other)
            body = {"grant_types": [DEVICE], "token_endpoint_auth_method": "none", "client_name": "Team CLI"}
            _, victim = await _register_json(owner, st.base, body)
            form = {"client_id": victim["client_id"]}
            answers = []
            for i in range(24):
                async with attacker.post(bases[i % 2] + "/oauth2/device_authorization", data=form) as resp:
                    answers.append(resp.status)
            assert answers == [200] * 20 + [429] * 4, answers  # the attacker's own bound, across both replicas
            for address in ("127.0.8.3", "127.0.8.4", "127.0.8.5"):  # the client's real users, elsewhere
                async with _client(address) as user:
                    for base in bases:
                        async with user.post(base + "/oauth2/device_authorization", data=form) as resp:
                            assert resp.status == 200, (address, resp.status)
                            assert (await resp.json())["user_code"]
    finally:
        for store in stores:
            await store.close()
