"""Shared fixtures: a real redis-server on a private port in a temp dir, started once per run."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from sidecar.store import MemoryStore, RedisStore, SessionStore
from tests.stack import free_port


def require(binary: str, package: str) -> str:
    """Never skip: a missing part fails the run and says what to install."""
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if path is None:
        pytest.fail(
            f"{binary} not found: install it with `apt-get install {package}` (make test does this as root)",
            pytrace=False,
        )
    return path


def start_redis(tmp: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    binary = require("redis-server", "redis-server")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail(f"redis-server did not start on port {port}", pytrace=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = start_redis(tmp_path_factory.mktemp("redis"), port)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


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
