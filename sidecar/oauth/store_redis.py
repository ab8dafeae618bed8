"""The grant store on Redis (single node, Sentinel or Cluster): many replicas share one, on the session
store's connection. The promises are in ``store_contract.py``; the Lua scripts in ``store_scripts.py``.

Redis layout (``<prefix>oa:``; ``G`` = ``{grant_id}``):
    g:G          hash   d = grant JSON, lu/lf/ua = last use, rt = current refresh hash, used = recent used ones
    k:G          zset   the grant's access-token and code keys, by expiry (revocation finds them here)
    ru:G:<hash>  string the latest rotation's answer, sealed under the used refresh token (``refresh_reuse.py``),
                 for --oauth-refresh-reuse-seconds; g:G field ru names it
    at:G:<hash>  string access token record        rt:G:<hash>  string refresh token record (the current one)
    c:G:<hash>   string "0"|"1" (used) + code JSON
    ug:<user>    zset   grant ids by last use       cl:<id> string client JSON
    pg           zset   grant ids not yet redeemed, by the time they count as abandoned
    d:<hash>     string device authorization JSON   du:<user code> string the device code hash
    dc:<client>@<address>  zset   a client's live device authorizations from one address (bounded count)
    p:<key>      string short-lived state of the browser-facing endpoints
    {cn}...      the pool of unused clients, per network (``store_scripts.py``; ``unused_pool.py``); an
                 unused client's cl:<id> is "u:" + JSON until a user grants it access (``promote_client``)
    rl:<bucket>:<client>  hash  rate-limit token bucket of an unauthenticated endpoint (``limits.py``)
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any, TypeVar

from redis.exceptions import RedisError

from ..errors import StoreUnavailable
from ..sessions import user_key
from . import store_scripts as lua
from .model import AuthorizationCode, Client, DeviceAuthorization, Grant
from .store_contract import DEVICE_GRACE, PENDING_GRACE, SLOW_DOWN_STEP, USED_CHARS, USED_KEPT, dump, load, millis

T = TypeVar("T")


class RedisGrantStore:
    """Many replicas on one Redis (single node, Sentinel or Cluster), sharing the session store's client."""

    def __init__(self, client: Any, prefix: str = "sc:") -> None:
        self._r = client
        self._p = prefix + "oa:"
        self._end = client.register_script(lua.END)
        self._end_unredeemed = client.register_script(lua.END_UNREDEEMED)
        self._issue = client.register_script(lua.ISSUE)
        self._put_member = client.register_script(lua.PUT_MEMBER)
        self._take_code = client.register_script(lua.TAKE_CODE)
        self._touch = client.register_script(lua.TOUCH)
        self._replay = client.register_script(lua.REPLAY)
        self._index = client.register_script(lua.INDEX)
        self._device_cas = client.register_script(lua.DEVICE_CAS)
        self._device_poll = client.register_script(lua.DEVICE_POLL)
        self._take = client.register_script(lua.TAKE)
        self._count_new = client.register_script(lua.COUNT_NEW)
        self._pool_admit = client.register_script(lua.POOL_ADMIT)
        self._pool_leave = client.register_script(lua.POOL_LEAVE)
        self._drop_unused = client.register_script(lua.DROP_UNUSED)
        self._pool = [self._p + "{cn}", self._p + "{cn}:w", self._p + "{cn}:h"]  # one slot: the {cn} tag
        self._pool_net = self._p + "{cn}:n:"
        self._promote = client.register_script(lua.PROMOTE)
        self._touch_client = client.register_script(lua.TOUCH_CLIENT)

    async def _call(self, op: Awaitable[T]) -> T:
        try:
            return await op
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc

    def _g(self, grant_id: str) -> str:
        return f"{self._p}g:{{{grant_id}}}"

    def _k(self, grant_id: str) -> str:
        return f"{self._p}k:{{{grant_id}}}"

    def _u(self, sub: str) -> str:
        return f"{self._p}ug:{user_key(sub)}"

    # clients
    async def put_client(self, client: Client, ttl: float) -> None:
        await self._call(self._r.set(self._p + "cl:" + client.client_id, dump(client), px=millis(ttl)))

    async def put_new_client(
        self, client: Client, network: str, ttl: float, max_new: int, per_network: int
    ) -> str | None:
        now = time.time()
        args = [
            repr(now),
            max_new,
            per_network,
            client.client_id,
            repr(now + ttl),
            millis(ttl),
            network,
            self._pool_net,
        ]
        # The record first: once the pool counts a client, a concurrent registration (another worker or
        # replica) may forget it at once, and its record must exist then to be deleted with it.
        value = lua.UNUSED + dump(client)
        await self._call(self._r.set(self._p + "cl:" + client.client_id, value, px=millis(ttl)))
        evicted = await self._call(self._pool_admit(keys=self._pool, args=args))
        if evicted:
            evicted = evicted.decode() if isinstance(evicted, bytes) else str(evicted)
            await self._call(self._drop_unused(keys=[self._p + "cl:" + evicted]))
        return evicted or None

    async def promote_client(self, client_id: str, ttl: float) -> bool:
        promoted = await self._call(self._promote(keys=[self._p + "cl:" + client_id], args=[millis(ttl)]))
        if promoted == 1:
            await self._call(self._pool_leave(keys=self._pool, args=[client_id, self._pool_net]))
        return bool(promoted)

    async def get_client(self, client_id: str) -> Client | None:
        raw = await self._call(self._r.get(self._p + "cl:" + client_id))
        return load(Client, raw[len(lua.UNUSED) :] if raw is not None and raw.startswith(lua.UNUSED) else raw)

    async def touch_client(self, client_id: str, ttl: float) -> None:
        await self._call(self._touch_client(keys=[self._p + "cl:" + client_id], args=[millis(ttl)]))

    # grants
    async def create_grant(self, grant: Grant, ttl: float, max_per_user: int) -> list[Grant]:
        mapping = {
            "d": dump(grant),
            "lu": repr(grant.last_used_at),
            "lf": grant.last_used_from,
            "ua": grant.user_agent,
        }
        await self._call(self._r.hset(self._g(grant.grant_id), mapping=mapping))
        await self._call(self._r.pexpire(self._g(grant.grant_id), millis(ttl + PENDING_GRACE)))
        await self._call(self._r.zadd(self._p + "pg", {grant.grant_id: time.time() + ttl}))
        await self._call(self._r.pexpire(self._p + "pg", millis(ttl + PENDING_GRACE)))  # each new grant extends it
        index_ttl = millis(max(ttl, grant.expires_at - time.time()))
        await self._call(
            self._index(keys=[self._u(grant.sub)], args=[repr(grant.last_used_at), grant.grant_id, index_ttl])
        )
        return await self._evict(grant, max_per_user)

    async def _live_ids(self, sub: str) -> list[str]:
        """The user's grant ids, least recently used first; ids whose grant expired are dropped here."""
        ids = [m.decode() for m in await self._call(self._r.zrange(self._u(sub), 0, -1))]
        live = []
        for gid in ids:
            if await self._call(self._r.exists(self._g(gid))):
                live.append(gid)
            else:
                await self._call(self._r.zrem(self._u(sub), gid))
        return live

    async def _evict(self, grant: Grant, max_per_user: int) -> list[Grant]:
        live = await self._live_ids(grant.sub)
        older = [gid for gid in live if gid != grant.grant_id]
        ended = []
        for gid in older[: max(0, len(live) - max_per_user)]:
            gone = await self.end_grant(gid)
            if gone is not None:
                ended.append(gone)
        return ended

    async def get_grant(self, grant_id: str) -> Grant | None:
        raw = await self._call(self._r.hmget(self._g(grant_id), ["d", "lu", "lf", "ua"]))
        grant = load(Grant, raw[0])
        if grant is None:
            return None
        try:
            last = float(raw[1]) if raw[1] else grant.last_used_at
        except ValueError:
            last = grant.last_used_at
        return replace(
            grant,
            last_used_at=last,
            last_used_from=raw[2].decode() if raw[2] else grant.last_used_from,
            user_agent=raw[3].decode() if raw[3] else grant.user_agent,
        )

    async def user_grants(self, sub: str) -> list[Grant]:
        found = [g for g in [await self.get_grant(gid) for gid in await self._live_ids(sub)] if g is not None]
        return sorted(found, key=lambda g: g.last_used_at, reverse=True)

    async def touch_grant(self, grant_id: str, sub: str, now: float, client_ip: str) -> None:
        if await self._call(self._touch(keys=[self._g(grant_id)], args=[repr(now), client_ip])):
            await self._call(self._r.zadd(self._u(sub), {grant_id: now}, xx=True))

    async def end_grant(self, grant_id: str) -> Grant | None:
        raw = await self._call(
            self._end(keys=[self._g(grant_id), self._k(grant_id)], args=[self._p, "{" + grant_id + "}"])
        )
        grant = load(Grant, raw)
        if grant is not None:
            await self._call(self._r.zrem(self._u(grant.sub), grant_id))
        return grant

    async def end_user_grants(self, sub: str) -> list[Grant]:
        ended = [g for g in [await self.end_grant(gid) for gid in await self._live_ids(sub)] if g is not None]
        await self._call(self._r.delete(self._u(sub)))
        return ended

    async def take_abandoned(self, now: float) -> list[str]:
        due = await self._call(self._r.zrangebyscore(self._p + "pg", "-inf", repr(now), start=0, num=200))
        # ZREM answers 1 to one replica only: that one ends the grant.
        return [m.decode() for m in due if await self._call(self._r.zrem(self._p + "pg", m))]

    async def end_unredeemed(self, grant_id: str) -> Grant | None:
        raw = await self._call(
            self._end_unredeemed(keys=[self._g(grant_id), self._k(grant_id)], args=[self._p, "{" + grant_id + "}"])
        )
        grant = load(Grant, raw)
        if grant is not None:
            await self._call(self._r.zrem(self._u(grant.sub), grant_id))
        return grant

    # tokens
    async def issue_tokens(
        self,
        grant_id: str,
        access_hash: str,
        access_record: bytes,
        access_ttl: float,
        refresh_hash: str,
        refresh_record: bytes,
        refresh_ttl: float,
        used_refresh_hash: str | None,
        now: float,
        client_ip: str,
        user_agent: str,
        reuse_answer: bytes = b"",
        reuse_window: float = 0.0,
    ) -> str:
        tag = "{" + grant_id + "}"
        access_member = f"at:{tag}:{access_hash}"
        keys = [
            self._g(grant_id),
            self._k(grant_id),
            self._p + access_member,
            f"{self._p}rt:{tag}:{refresh_hash}",
            f"{self._p}rt:{tag}:{used_refresh_hash or refresh_hash}",
            f"{self._p}ru:{tag}:{used_refresh_hash or refresh_hash}",
        ]
        args = [
            access_record,
            millis(access_ttl),
            refresh_record,
            millis(refresh_ttl),
            used_refresh_hash or "",
            repr(now),
            client_ip,
            user_agent,
            millis(max(access_ttl, refresh_ttl)),
            self._p,
            tag,
            access_member,
            repr(now + access_ttl),
            refresh_hash,
            USED_KEPT,
            USED_CHARS,
            reuse_answer,
            millis(reuse_window) if reuse_window > 0 and reuse_answer else 0,
        ]
        result = await self._call(self._issue(keys=keys, args=args))
        outcome = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        if outcome == "replayed":
            grant = load(Grant, result[1] if len(result) > 1 else None)
            if grant is not None:
                await self._call(self._r.zrem(self._u(grant.sub), grant_id))
        elif outcome == "ok":
            grant = load(Grant, await self._call(self._r.hget(self._g(grant_id), "d")))
            if grant is not None:
                await self._call(self._r.zadd(self._u(grant.sub), {grant_id: now}, xx=True))
        return outcome

    async def report_replay(self, grant_id: str, refresh_hash: str) -> Grant | None:
        keys = [self._g(grant_id), self._k(grant_id)]
        args = [self._p, "{" + grant_id + "}", refresh_hash[:USED_CHARS]]
        grant = load(Grant, await self._call(self._replay(keys=keys, args=args)))
        if grant is not None:
            await self._call(self._r.zrem(self._u(grant.sub), grant_id))
        return grant

    async def reused_rotation(self, grant_id: str, refresh_hash: str) -> bytes | None:
        return await self._call(self._r.get(f"{self._p}ru:{{{grant_id}}}:{refresh_hash}"))

    async def access_record(self, grant_id: str, access_hash: str) -> bytes | None:
        return await self._call(self._r.get(f"{self._p}at:{{{grant_id}}}:{access_hash}"))

    async def refresh_record(self, grant_id: str, refresh_hash: str) -> bytes | None:
        return await self._call(self._r.get(f"{self._p}rt:{{{grant_id}}}:{refresh_hash}"))

    async def revoke_access(self, grant_id: str, access_hash: str) -> None:
        await self._call(self._r.delete(f"{self._p}at:{{{grant_id}}}:{access_hash}"))

    # codes
    async def put_code(self, code_hash: str, code: AuthorizationCode, ttl: float) -> None:
        member = f"c:{{{code.grant_id}}}:{code_hash}"
        keys = [self._g(code.grant_id), self._k(code.grant_id), self._p + member]
        args = [b"0" + dump(code), millis(ttl), member, repr(time.time() + ttl)]
        await self._call(self._put_member(keys=keys, args=args))

    async def take_code(self, code_hash: str, grant_id: str) -> tuple[AuthorizationCode | None, bool]:
        raw = await self._call(self._take_code(keys=[f"{self._p}c:{{{grant_id}}}:{code_hash}"]))
        if raw is None:
            return None, False
        return load(AuthorizationCode, raw[1]), bool(raw[0])

    # devices
    async def put_device(self, device: DeviceAuthorization, ttl: float) -> bool:
        px = millis(ttl + DEVICE_GRACE)
        if not await self._call(
            self._r.set(self._p + "du:" + device.user_code, device.device_code_hash, nx=True, px=px)
        ):
            return False
        await self._call(self._r.set(self._p + "d:" + device.device_code_hash, dump(device), px=px))
        return True

    async def reserve_device(self, client_id: str, device_code_hash: str, until: float, limit: int) -> bool:
        now = time.time()
        args = [repr(now), limit, device_code_hash, repr(until), millis(until - now)]
        return bool(await self._call(self._count_new(keys=[self._p + "dc:" + client_id], args=args)))

    async def device_by_user_code(self, user_code: str) -> DeviceAuthorization | None:
        code_hash = await self._call(self._r.get(self._p + "du:" + user_code))
        return None if code_hash is None else await self.device_by_code_hash(code_hash.decode())

    async def device_by_code_hash(self, device_code_hash: str) -> DeviceAuthorization | None:
        return load(DeviceAuthorization, await self._call(self._r.get(self._p + "d:" + device_code_hash)))

    async def update_device(self, device: DeviceAuthorization, expected_status: str) -> bool:
        keys = [self._p + "d:" + device.device_code_hash]
        return bool(await self._call(self._device_cas(keys=keys, args=[dump(device), expected_status])))

    async def poll_device(self, device_code_hash: str, now: float) -> tuple[DeviceAuthorization | None, bool]:
        raw = await self._call(
            self._device_poll(keys=[self._p + "d:" + device_code_hash], args=[repr(now), SLOW_DOWN_STEP])
        )
        if raw is None:
            return None, False
        return load(DeviceAuthorization, raw[0]), bool(raw[1])

    # pending
    async def put_pending(self, key: str, blob: bytes, ttl: float) -> None:
        await self._call(self._r.set(self._p + "p:" + key, blob, px=millis(ttl)))

    async def get_pending(self, key: str) -> bytes | None:
        return await self._call(self._r.get(self._p + "p:" + key))

    async def take_pending(self, key: str) -> bytes | None:
        return await self._call(self._take(keys=[self._p + "p:" + key]))
