"""Where session records, sign-in states, refresh locks and refresh outcomes live.

``SessionStore`` is the protocol; ``MemoryStore`` serves one process (the
embedded default) and ``RedisStore`` serves many replicas. Both pass the same
conformance tests. Stores only move opaque bytes: records arrive here already
encrypted. Every Redis failure becomes ``StoreUnavailable`` so the web layer
answers 503 and never mistakes an outage for a signed-out user.

Pending sign-ins live in the browser's (encrypted) attempt cookie, not here:
only a callback carrying a valid attempt cookie writes a small "used" marker.
Every short-lived key (markers, locks, outcomes) has a shorter TTL than any
session, so Redis' ``volatile-ttl`` eviction drops them before sessions. The
memory store caps its short-lived entries for the same reason.

Redis layout (``sc:`` prefix; one key per operation so Cluster works):
    sc:s:<store key>   string  "<version>|<last active>|<ciphertext>"  TTL = refresh-token lifetime
    sc:u:<index hash>  hash  store keys of one user's sessions, or of one provider session (sid)
    sc:st:<state hash> string  "used" marker of a sign-in state       SET NX, TTL = the attempt's remaining life
    sc:l:<store key>   string  refresh lock owner token             PX, extended while held
    sc:o:<token hash>  string  encrypted outcome of a refresh        TTL seconds
    sc:once:<hash>     string  a logout token's jti, seen once       SET NX, TTL = minutes
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from . import metrics
from .config import Config
from .errors import StoreUnavailable, VersionConflict

T = TypeVar("T")

MEMORY_SHORT_LIVED_CAP = 100_000  # used-state markers, and refresh outcomes, kept by the memory store


@dataclass(frozen=True)
class StoredRecord:
    blob: bytes
    version: int
    last_active: float


class SessionStore(Protocol):
    """What the session and refresh logic needs from storage."""

    async def load(self, key: str) -> StoredRecord | None: ...
    async def version(self, key: str) -> int | None: ...
    async def create(self, key: str, blob: bytes, ttl: float, now: float, user: str) -> None: ...
    async def save(self, key: str, blob: bytes, expected_version: int, ttl: float) -> int: ...
    async def touch(self, key: str, now: float) -> None: ...
    async def delete(self, key: str, user: str | None = None) -> None: ...
    async def user_sessions(self, user: str) -> list[str]: ...
    async def index(self, user: str, key: str, ttl: float) -> None: ...
    async def claim_state(self, state: str, ttl: float) -> bool: ...
    async def acquire_lock(self, key: str, owner: str, ttl: float) -> bool: ...
    async def extend_lock(self, key: str, owner: str, ttl: float) -> bool: ...
    async def release_lock(self, key: str, owner: str) -> None: ...
    async def lock_held(self, key: str) -> bool: ...
    async def put_outcome(self, token_hash: str, blob: bytes, ttl: float) -> None: ...
    async def get_outcome(self, token_hash: str) -> bytes | None: ...
    async def remember_once(self, key: str, ttl: float) -> bool: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


class MemoryStore:
    """In-process store for one process: the embedded default and single-instance installs."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records: dict[str, tuple[StoredRecord, float]] = {}
        self._users: dict[str, set[str]] = {}
        self._values: dict[str, tuple[Any, float]] = {}  # refresh locks (at most one per session)
        self._outcomes: dict[str, tuple[Any, float]] = {}  # refresh outcomes
        self._markers: dict[str, tuple[Any, float]] = {}  # used sign-in states
        self._writes = 0

    def _live(self, table: dict[str, tuple[T, float]], key: str) -> T | None:
        entry = table.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del table[key]
            return None
        return entry[0]

    def _sweep(self) -> None:
        """Drop expired entries now and then, so memory stays flat."""
        self._writes += 1
        if self._writes % 1000:
            return
        self._drop_expired(self._records, self._values, self._outcomes, self._markers)

    def _drop_expired(self, *tables: dict[str, tuple[Any, float]]) -> None:
        now = self._clock()
        for table in tables:
            for key in [k for k, (_, exp) in table.items() if exp <= now]:
                del table[key]

    def _put_bounded(self, table: dict[str, tuple[Any, float]], key: str, value: Any, ttl: float) -> None:
        """Short-lived entries never grow without bound: past the cap, expired ones go, then the oldest."""
        if key not in table and len(table) >= MEMORY_SHORT_LIVED_CAP:
            self._drop_expired(table)
            while len(table) >= MEMORY_SHORT_LIVED_CAP:
                del table[next(iter(table))]
        table[key] = (value, self._clock() + ttl)

    async def load(self, key: str) -> StoredRecord | None:
        return self._live(self._records, key)

    async def version(self, key: str) -> int | None:
        record = self._live(self._records, key)
        return None if record is None else record.version

    async def create(self, key: str, blob: bytes, ttl: float, now: float, user: str) -> None:
        self._sweep()
        self._records[key] = (StoredRecord(blob, 1, now), self._clock() + ttl)
        self._users.setdefault(user, set()).add(key)

    async def save(self, key: str, blob: bytes, expected_version: int, ttl: float) -> int:
        record = self._live(self._records, key)
        if record is None or record.version != expected_version:
            raise VersionConflict("session record changed or is gone")
        self._records[key] = (StoredRecord(blob, expected_version + 1, record.last_active), self._clock() + ttl)
        return expected_version + 1

    async def touch(self, key: str, now: float) -> None:
        entry = self._records.get(key)
        if entry is not None:
            record, expiry = entry
            self._records[key] = (StoredRecord(record.blob, record.version, now), expiry)

    async def delete(self, key: str, user: str | None = None) -> None:
        self._records.pop(key, None)
        self._values.pop("l:" + key, None)
        if user is not None and user in self._users:
            self._users[user].discard(key)

    async def user_sessions(self, user: str) -> list[str]:
        return [k for k in self._users.get(user, ()) if self._live(self._records, k) is not None]

    async def index(self, user: str, key: str, ttl: float) -> None:
        self._users.setdefault(user, set()).add(key)

    async def claim_state(self, state: str, ttl: float) -> bool:
        if self._live(self._markers, state) is not None:
            return False
        self._put_bounded(self._markers, state, True, ttl)
        return True

    async def acquire_lock(self, key: str, owner: str, ttl: float) -> bool:
        if self._live(self._values, "l:" + key) is not None:
            return False
        self._values["l:" + key] = (owner, self._clock() + ttl)
        return True

    async def extend_lock(self, key: str, owner: str, ttl: float) -> bool:
        if self._live(self._values, "l:" + key) != owner:
            return False
        self._values["l:" + key] = (owner, self._clock() + ttl)
        return True

    async def release_lock(self, key: str, owner: str) -> None:
        if self._live(self._values, "l:" + key) == owner:
            del self._values["l:" + key]

    async def lock_held(self, key: str) -> bool:
        return self._live(self._values, "l:" + key) is not None

    async def put_outcome(self, token_hash: str, blob: bytes, ttl: float) -> None:
        self._sweep()
        self._put_bounded(self._outcomes, token_hash, blob, ttl)

    async def get_outcome(self, token_hash: str) -> bytes | None:
        return self._live(self._outcomes, token_hash)

    async def remember_once(self, key: str, ttl: float) -> bool:
        """True the first time ``key`` is seen within ``ttl`` seconds (replay detection), else False."""
        if self._live(self._values, "once:" + key) is not None:
            return False
        self._sweep()
        self._values["once:" + key] = (True, self._clock() + ttl)
        return True

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


# A record is one string "<version>|<last active>|<ciphertext>": a Redis hash with a value over
# 64 bytes leaves the compact listpack encoding and costs ~300 bytes more per session.
#
# KEYS[1] record; ARGV expected version, ciphertext, ttl ms. Returns the new version,
# -1 when the record is gone, -2 when someone else wrote first.
_CAS_SAVE = """
local cur = redis.call('GET', KEYS[1])
if not cur then return -1 end
local p1 = string.find(cur, '|', 1, true)
local p2 = string.find(cur, '|', p1 + 1, true)
local v = tonumber(string.sub(cur, 1, p1 - 1))
if v ~= tonumber(ARGV[1]) then return -2 end
redis.call('SET', KEYS[1], (v + 1) .. string.sub(cur, p1, p2) .. ARGV[2], 'PX', ARGV[3])
return v + 1
"""
# KEYS[1] record; ARGV now. Rewrites only the last-active field, keeps the TTL, never recreates.
_TOUCH = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local p1 = string.find(cur, '|', 1, true)
local p2 = string.find(cur, '|', p1 + 1, true)
redis.call('SET', KEYS[1], string.sub(cur, 1, p1) .. ARGV[1] .. string.sub(cur, p2), 'KEEPTTL')
return 1
"""
# KEYS[1] index; ARGV store key, ttl ms. A small hash stays in Redis' compact listpack encoding
# (a set of strings does not before Redis 7.2); the index lives as long as its longest session.
_INDEX = """
redis.call('HSET', KEYS[1], ARGV[1], '1')
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""
# KEYS[1] lock; ARGV owner token (, ttl ms). Only the owner may extend or release.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _hostports(urls: tuple[str, ...]) -> list[tuple[str, int]]:
    out = []
    for url in urls:
        parts = urlsplit(url if "//" in url else "redis://" + url)
        out.append((parts.hostname or "127.0.0.1", parts.port or 6379))
    return out


def redis_store(config: Config) -> RedisStore:
    """A RedisStore on a single node, Sentinel or Cluster, from the settings (redis-py's own support)."""
    timeouts: dict[str, Any] = {"socket_timeout": config.redis_timeout, "socket_connect_timeout": config.redis_timeout}
    if config.redis_use_cluster:
        first = config.redis_cluster_connection_urls[0]
        parts = urlsplit(first if "//" in first else "redis://" + first)
        nodes = [ClusterNode(h, p) for h, p in _hostports(config.redis_cluster_connection_urls)]
        return RedisStore(
            RedisCluster(
                startup_nodes=nodes,
                username=parts.username,
                password=parts.password,
                ssl=parts.scheme == "rediss",
                **timeouts,
            )
        )
    if config.redis_use_sentinel:
        master = urlsplit(config.redis_connection_url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
            _hostports(config.redis_sentinel_connection_urls),
            sentinel_kwargs={"password": config.redis_sentinel_password or None, **timeouts},
            **timeouts,
        )
        client = sentinel.master_for(
            config.redis_sentinel_master_name,
            username=master.username,
            password=master.password,
            db=int(master.path.strip("/") or 0),
            ssl=master.scheme == "rediss",
            **timeouts,
        )
        # The Sentinel clients are not owned by the master client: the store closes them too.
        return RedisStore(client, also_close=tuple(sentinel.sentinels))
    return RedisStore(aioredis.from_url(config.redis_connection_url, **timeouts))


class RedisStore:
    """Store for many replicas sharing Redis (single node, Sentinel or Cluster)."""

    def __init__(self, client: Any, prefix: str = "sc:", also_close: tuple[Any, ...] = ()) -> None:
        self._r = client
        self._also_close = also_close
        self._p = prefix
        self._cas = client.register_script(_CAS_SAVE)
        self._touch = client.register_script(_TOUCH)
        self._index = client.register_script(_INDEX)
        self._extend = client.register_script(_EXTEND)
        self._release = client.register_script(_RELEASE)

    @property
    def client(self) -> Any:
        """The Redis client (single node, Sentinel master or Cluster): the OAuth grant store shares it."""
        return self._r

    @property
    def prefix(self) -> str:
        return self._p

    async def _call(self, op: Awaitable[T], name: str = "other") -> T:
        started = time.monotonic()
        try:
            return await op
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
        finally:
            metrics.store_call(name, time.monotonic() - started)

    async def load(self, key: str) -> StoredRecord | None:
        raw = await self._call(self._r.get(self._p + "s:" + key), "load")
        if raw is None:
            return None
        version, active, blob = raw.split(b"|", 2)
        return StoredRecord(blob, int(version), float(active))

    async def version(self, key: str) -> int | None:
        head = await self._call(self._r.getrange(self._p + "s:" + key, 0, 20), "version")
        return int(head.split(b"|", 1)[0]) if head else None

    async def create(self, key: str, blob: bytes, ttl: float, now: float, user: str) -> None:
        await self._call(self._r.set(self._p + "s:" + key, b"1|%d|" % int(now) + blob, px=_ms(ttl)), "create")
        await self.index(user, key, ttl)

    async def save(self, key: str, blob: bytes, expected_version: int, ttl: float) -> int:
        result = await self._call(
            self._cas(keys=[self._p + "s:" + key], args=[expected_version, blob, _ms(ttl)]), "save"
        )
        if int(result) < 0:
            raise VersionConflict("session record changed or is gone")
        return int(result)

    async def touch(self, key: str, now: float) -> None:
        await self._call(self._touch(keys=[self._p + "s:" + key], args=[int(now)]), "touch")

    async def delete(self, key: str, user: str | None = None) -> None:
        await self._call(self._r.delete(self._p + "s:" + key))
        if user is not None:
            await self._call(self._r.hdel(self._p + "u:" + user, key))

    async def user_sessions(self, user: str) -> list[str]:
        members = await self._call(self._r.hkeys(self._p + "u:" + user))
        return sorted(m.decode() for m in members)

    async def index(self, user: str, key: str, ttl: float) -> None:
        await self._call(self._index(keys=[self._p + "u:" + user], args=[key, _ms(ttl)]), "index")

    async def claim_state(self, state: str, ttl: float) -> bool:
        # SET NX: exactly one callback can use a state, even across replicas.
        return bool(await self._call(self._r.set(self._p + "st:" + state, b"1", nx=True, px=_ms(ttl)), "claim_state"))

    async def acquire_lock(self, key: str, owner: str, ttl: float) -> bool:
        return bool(await self._call(self._r.set(self._p + "l:" + key, owner, nx=True, px=_ms(ttl)), "lock"))

    async def extend_lock(self, key: str, owner: str, ttl: float) -> bool:
        return bool(await self._call(self._extend(keys=[self._p + "l:" + key], args=[owner, _ms(ttl)])))

    async def release_lock(self, key: str, owner: str) -> None:
        await self._call(self._release(keys=[self._p + "l:" + key], args=[owner]))

    async def lock_held(self, key: str) -> bool:
        return bool(await self._call(self._r.exists(self._p + "l:" + key)))

    async def put_outcome(self, token_hash: str, blob: bytes, ttl: float) -> None:
        await self._call(self._r.set(self._p + "o:" + token_hash, blob, px=_ms(ttl)))

    async def get_outcome(self, token_hash: str) -> bytes | None:
        return await self._call(self._r.get(self._p + "o:" + token_hash))

    async def remember_once(self, key: str, ttl: float) -> bool:
        """SET NX PX: exactly one caller, on any replica, sees True for ``key`` within ``ttl``."""
        return bool(await self._call(self._r.set(self._p + "once:" + key, b"1", nx=True, px=_ms(ttl)), "once"))

    async def ping(self) -> None:
        await self._call(self._r.ping())

    async def close(self) -> None:
        for client in (self._r, *self._also_close):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


def make_store(config: Config) -> SessionStore:
    if config.session_store_type == "redis":
        return redis_store(config)
    return MemoryStore()
