"""The Redis store against real Sentinel and Cluster topologies, built from the sidecar's settings.

Each topology runs the store's whole protocol through ``redis_store(config)``
(the code path production uses); Sentinel also survives a master crash: once
the Sentinel promotes the replica, the same store object works again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from sidecar.config import Config, build_config
from sidecar.errors import StoreUnavailable, VersionConflict
from sidecar.store import RedisStore, StoredRecord, redis_store
from tests.redis_procs import ClusterTopology, SentinelTopology, cluster_topology, sentinel_topology
from tests.stack import free_port, sidecar_settings

pytestmark = pytest.mark.timeout(60)

DUMMY_ISSUER = "http://127.0.0.1:9"  # never contacted: only the store is built


def topology_config(**topology: Any) -> Config:
    settings = sidecar_settings(DUMMY_ISSUER, free_port())
    return build_config(settings | {"session_store_type": "redis", "redis_timeout": "1s", **topology})


def sentinel_config(topo: SentinelTopology, db: int = 0) -> Config:
    return topology_config(
        redis_use_sentinel="true",
        redis_sentinel_master_name=topo.master_name,
        redis_sentinel_connection_urls=[topo.sentinel_url],
        # The master is found through the Sentinel; this URL only carries credentials and the db.
        redis_connection_url=f"redis://127.0.0.1:1/{db}",
    )


def cluster_config(topo: ClusterTopology) -> Config:
    return topology_config(redis_use_cluster="true", redis_cluster_connection_urls=",".join(topo.urls))


@asynccontextmanager
async def opened(client: Any) -> AsyncIterator[Any]:
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def store_for(config: Config) -> AsyncIterator[RedisStore]:
    store = redis_store(config)
    try:
        yield store
    finally:
        await store.close()


def uid(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


async def assert_pttl(raw: Any, key: str, ttl: float) -> int:
    pttl = int(await raw.pttl(key))
    assert 0 < pttl <= int(ttl * 1000), f"PTTL of {key} is {pttl}, want (0, {int(ttl * 1000)}]"
    assert pttl > int(ttl * 1000) - 5000, f"PTTL of {key} is {pttl}, far below {int(ttl * 1000)}"
    return pttl


async def exercise_protocol(store: RedisStore, raw: Any, keys: tuple[str, str] | None = None) -> None:
    """Every operation of the store protocol, checked against what Redis really holds."""
    key, other = keys or (uid("sess"), uid("sess"))
    user = uid("user")
    now = time.time()

    # create / load / version, with the record TTL and the user index
    await store.create(key, b"blob-1", 60, now, user)
    assert await store.load(key) == StoredRecord(b"blob-1", 1, float(int(now)))
    assert await store.version(key) == 1
    await assert_pttl(raw, "sc:s:" + key, 60)
    assert int(await raw.pttl("sc:u:" + user)) > 0, "the user index must expire too"
    assert await store.load(uid("missing")) is None
    assert await store.version(uid("missing")) is None

    # save is compare-and-set: the right version wins once and resets the TTL; a stale one conflicts
    assert await store.save(key, b"blob-2", 1, 30) == 2
    await assert_pttl(raw, "sc:s:" + key, 30)
    with pytest.raises(VersionConflict):
        await store.save(key, b"stale", 1, 30)
    with pytest.raises(VersionConflict):
        await store.save(uid("missing"), b"ghost", 1, 30)
    loaded = await store.load(key)
    assert loaded is not None and (loaded.blob, loaded.version) == (b"blob-2", 2)

    # touch updates last-active only, keeps version and TTL, never recreates a missing record
    await store.touch(key, now + 100)
    touched = await store.load(key)
    assert touched == StoredRecord(b"blob-2", 2, float(int(now + 100)))
    await assert_pttl(raw, "sc:s:" + key, 30)
    ghost = uid("missing")
    await store.touch(ghost, now)
    assert await raw.exists("sc:s:" + ghost) == 0

    # user_sessions / delete
    await store.create(other, b"blob-other", 60, now, user)
    assert await store.user_sessions(user) == sorted([key, other])
    assert await store.user_sessions(uid("nobody")) == []
    await store.delete(key, user)
    assert await store.load(key) is None
    assert await store.user_sessions(user) == [other]
    await store.delete(other)  # without a user: the record goes, the index is left alone
    assert await store.load(other) is None

    # sign-in states are single-use
    state = uid("state")
    assert await store.claim_state(state, 600)
    await assert_pttl(raw, "sc:st:" + state, 600)
    assert not await store.claim_state(state, 600)
    assert await store.claim_state(uid("never-issued"), 600)

    # refresh lock: one owner; extend and release by the owner only; expiry lets another in
    lock = uid("sess")
    assert await store.acquire_lock(lock, "owner-a", 10)
    assert await store.lock_held(lock)
    assert not await store.acquire_lock(lock, "owner-b", 10)
    assert not await store.extend_lock(lock, "owner-b", 60)
    await assert_pttl(raw, "sc:l:" + lock, 10)
    assert await store.extend_lock(lock, "owner-a", 60)
    assert int(await raw.pttl("sc:l:" + lock)) > 10_000
    await store.release_lock(lock, "owner-b")
    assert await store.lock_held(lock), "a stranger released the lock"
    assert await raw.get("sc:l:" + lock) == b"owner-a"
    await store.release_lock(lock, "owner-a")
    assert not await store.lock_held(lock)
    assert not await store.extend_lock(lock, "owner-a", 10), "extended a released lock"

    assert await store.acquire_lock(lock, "owner-b", 0.3)
    assert not await store.acquire_lock(lock, "owner-a", 10)
    await asyncio.sleep(0.45)
    assert not await store.lock_held(lock)
    assert await store.acquire_lock(lock, "owner-a", 10), "an expired lock kept others out"
    await store.release_lock(lock, "owner-a")

    # refresh outcomes
    token = uid("tokenhash")
    await store.put_outcome(token, b"encrypted-outcome", 30)
    await assert_pttl(raw, "sc:o:" + token, 30)
    assert await store.get_outcome(token) == b"encrypted-outcome"
    assert await store.get_outcome(uid("tokenhash")) is None

    await store.ping()


# --- Sentinel ---------------------------------------------------------------------------------


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelTopology]:
    with sentinel_topology(tmp_path) as topo:
        yield topo


async def test_sentinel_store_protocol(sentinel: SentinelTopology) -> None:
    config = sentinel_config(sentinel, db=2)
    assert sentinel.master is not None
    async with (
        store_for(config) as store,
        opened(aioredis.Redis(port=sentinel.master.port, db=2)) as raw,
    ):
        await exercise_protocol(store, raw)
        # The store really wrote to the master the Sentinel hands out, in the db its URL names.
        assert await raw.dbsize() > 0
        async with opened(aioredis.Redis(port=sentinel.master.port, db=0)) as db0:
            assert await db0.dbsize() == 0


async def test_sentinel_failover_store_follows_the_new_master(sentinel: SentinelTopology) -> None:
    assert sentinel.master is not None and sentinel.replica is not None
    config = sentinel_config(sentinel)
    async with store_for(config) as store:
        key, user = uid("sess"), uid("user")
        await store.create(key, b"before-failover", 300, time.time(), user)
        async with opened(aioredis.Redis(port=sentinel.master.port)) as master:
            assert await master.execute_command("WAIT", 1, 5000) == 1, "replica did not acknowledge the write"

        sentinel.master.kill()
        started = time.monotonic()
        deadline = started + 20
        outages = 0
        while True:
            try:
                await store.ping()
                if sentinel.master_addr() == ("127.0.0.1", sentinel.replica.port):
                    break
            except StoreUnavailable:
                outages += 1  # expected while the Sentinel has not promoted the replica yet
            assert time.monotonic() < deadline, f"store did not recover within 20 s ({outages} outages)"
            await asyncio.sleep(0.2)
        new_master = sentinel.wait_promoted(timeout=max(1.0, deadline - time.monotonic()))
        assert new_master == sentinel.replica.port
        assert outages > 0, "the store never noticed the master was gone"

        # The record replicated before the crash is there, and the store writes to the new master.
        record = await store.load(key)
        assert record is not None and (record.blob, record.version) == (b"before-failover", 1)
        assert await store.save(key, b"after-failover", 1, 300) == 2
        async with opened(aioredis.Redis(port=new_master)) as raw:
            assert (await raw.get("sc:s:" + key)).endswith(b"|after-failover")
            await exercise_protocol(store, raw)


# --- Cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    with cluster_topology(tmp_path_factory.mktemp("cluster")) as topo:
        yield topo


async def test_cluster_store_protocol(cluster: ClusterTopology) -> None:
    config = cluster_config(cluster)
    assert len(config.redis_cluster_connection_urls) == 3
    async with (
        store_for(config) as store,
        opened(RedisCluster(host="127.0.0.1", port=cluster.procs[0].port)) as raw,
    ):
        await raw.initialize()
        # Two session keys owned by different masters, so the protocol crosses nodes.
        owners: dict[int, str] = {}
        while len(owners) < 2:
            candidate = uid("sess")
            owners.setdefault(raw.get_node_from_key("sc:s:" + candidate).port, candidate)
        first, second = owners.values()
        await exercise_protocol(store, raw, (first, second))

        # Every node of the cluster ended up holding some of the store's keys' slots.
        await store.create(first, b"x", 60, time.time(), "someone")
        await store.create(second, b"y", 60, time.time(), "someone")
        holders = {raw.get_node_from_key(k).port for k in ("sc:s:" + first, "sc:s:" + second)}
        assert len(holders) == 2
        for port in holders:
            async with opened(aioredis.Redis(port=port)) as node:
                assert await node.dbsize() > 0


async def test_cluster_store_survives_a_seed_node_being_down(cluster: ClusterTopology) -> None:
    """Startup nodes are only seeds: a dead first URL must not keep the store from the cluster."""
    dead = f"redis://127.0.0.1:{free_port()}"
    config = topology_config(redis_use_cluster="true", redis_cluster_connection_urls=[dead, *cluster.urls])
    async with store_for(config) as store:
        key = uid("sess")
        await store.create(key, b"seeded", 60, time.time(), uid("user"))
        assert (await store.load(key)) is not None
        await store.ping()
