"""Rate limits of the authorization server's unauthenticated endpoints, shared by every worker and replica.

``/oauth2/register``, ``/oauth2/device_authorization``, ``/oauth2/token``, ``/oauth2/revoke`` and
``/oauth2/authorize`` with a client-metadata URL not yet fetched answer anyone. A limit kept in one process
lets N workers take N times the load, so with the Redis session store the buckets live in Redis (a token
bucket per endpoint and client address, one Lua script: refill, spend, answer the wait); with the memory
store (one process) they stay in process memory (``ratelimit.RateLimiter``). A client address is bucketed
as ``ratelimit.client_key`` does (an IPv6 /64 counts as one client).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from aiohttp import web
from redis.exceptions import RedisError

from ..context import view_of
from ..errors import StoreUnavailable
from ..ratelimit import RateLimiter, client_key, retry_after
from ..store import RedisStore, SessionStore
from . import cimd
from .service import OAUTH

# KEYS bucket; ARGV now (s), refill rate (tokens/s), burst, ttl ms. Returns the wait in seconds (0: allowed).
_TAKE = """
local b = redis.call('HMGET', KEYS[1], 't', 'at')
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return tostring(wait)
"""


class SharedLimiter(Protocol):
    async def take(self, bucket: str, client: str, per_minute: float) -> float:
        """Spend one request of ``client`` on ``bucket`` (burst twice ``per_minute``); the seconds to wait, 0
        when allowed. ``per_minute`` 0 turns the limit off."""
        ...


class LocalLimiter:
    """One process: a ``RateLimiter`` per bucket."""

    def __init__(self) -> None:
        self._limiters: dict[str, RateLimiter] = {}

    async def take(self, bucket: str, client: str, per_minute: float) -> float:
        limiter = self._limiters.setdefault(bucket, RateLimiter())
        return limiter.take(client, per_minute, 2 * per_minute, time.monotonic())


class RedisLimiter:
    """Every worker and replica on one Redis: one bucket per endpoint and client address."""

    def __init__(self, client: Any, prefix: str) -> None:
        self._prefix = prefix + "oa:rl:"
        self._take = client.register_script(_TAKE)

    async def take(self, bucket: str, client: str, per_minute: float) -> float:
        if per_minute <= 0:
            return 0.0
        rate, burst = per_minute / 60.0, 2 * per_minute
        ttl_ms = int((burst / rate + 1) * 1000)  # a full refill later the bucket is full again: forget it
        key = f"{self._prefix}{bucket}:{client_key(client)}"
        try:
            wait = await self._take(keys=[key], args=[repr(time.time()), repr(rate), repr(burst), ttl_ms])
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
        return float(wait)


def limiter_for(sessions_store: SessionStore) -> SharedLimiter:
    """Beside the session store: the same Redis connection and prefix, or process memory."""
    if isinstance(sessions_store, RedisStore):
        return RedisLimiter(sessions_store.client, sessions_store.prefix)
    return LocalLimiter()


LIMITER = web.AppKey("oauth_shared_limiter", SharedLimiter)


async def too_many(request: web.Request, bucket: str, per_minute: float, what: str) -> web.Response | None:
    """A 429 OAuth error answer (RFC 6749 5.2 shape, ``Retry-After``) when this client is over the limit."""
    wait = await request.app[LIMITER].take(bucket, view_of(request).client_ip, per_minute)
    if not wait:
        return None
    body = {"error": "too_many_requests", "error_description": f"too many {what} from this address; try again later"}
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache", "Retry-After": retry_after(wait)}
    return web.json_response(body, status=429, headers=headers)


async def new_document_wait(request: web.Request, client_id: str) -> float:
    """A client metadata URL neither cached nor being fetched costs a fetch: those are limited per client
    address (``--signin-rate-limit``), so a flood of new URLs cannot take the fetch slots known clients need."""
    config = request.app[OAUTH].config
    if not (config.oauth_client_metadata_documents and cimd.is_metadata_url(client_id)):
        return 0.0
    if not request.app[cimd.DOCUMENTS].would_fetch(client_id):
        return 0.0
    return await request.app[LIMITER].take("documents", view_of(request).client_ip, float(config.signin_rate_limit))
