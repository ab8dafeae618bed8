"""Shared fixtures: a real redis-server on a private port in a temp dir, started once per run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from sidecar.store import MemoryStore, RedisStore, SessionStore
from tests.redis_procs import start_server
from tests.stack import free_port


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real redis-server for the run, on a private port with a temp dir."""
    port = free_port()
    proc = start_server("redis", tmp_path_factory.mktemp("redis"), port)
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop()


@pytest.fixture
async def redis_url(redis_server: str) -> AsyncIterator[str]:
    client = aioredis.from_url(redis_server)
    await client.flushdb()
    await client.aclose()
    yield redis_server


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_server: str) -> AsyncIterator[SessionStore]:
    """Behaviour tests run against both stores."""
    if request.param == "memory":
        yield MemoryStore()
        return
    client = aioredis.from_url(redis_server)
    await client.flushdb()
    redis_store = RedisStore(client)
    yield redis_store
    await redis_store.close()
