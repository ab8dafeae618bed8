"""The grant store: clients, grants, codes, device authorizations and token records, in memory or Redis.

Every key has a TTL. The keys of one grant share the ``{grant_id}`` hash tag, so a refresh-token
rotation or a revocation is one atomic Lua script even on Redis Cluster. The per-user index of
grants (for the grants page, the per-user limit and sign-out everywhere) is a sorted set by last use.

INTERFACE CONTRACT (callers use only the ``GrantStore`` methods; both stores pass the same tests):
- Records are opaque to the store except what its scripts need: token records are bytes
  (``tokens.TokenRecord``), the rest are the ``model`` dataclasses.
- ``create_grant`` returns the *Grant objects* it ended to keep the user within ``max_per_user`` (least
  recently used first); the caller ends their session records (``OAuthServer.start_grant`` does).
- A grant's key lives ``ttl`` + ``PENDING_GRACE`` at creation (short: until its code or device approval is
  redeemed); every ``issue_tokens`` extends it to the refresh token's lifetime. Past ``ttl`` it is handed
  out once by ``take_abandoned`` (to one replica), which ends it with ``end_unredeemed`` unless tokens were
  issued meanwhile: the caller then revokes its upstream tokens.
- ``take_code``: the first call gets ``(code, True)``; later calls within the code's TTL ``(code, False)``:
  the caller ends the grant. Codes are deleted with their grant.
- ``put_device`` keeps the record ``DEVICE_GRACE`` past ``ttl`` so a late poll still learns ``expired_token``.
- ``poll_device`` records this poll and tells whether it came faster than the interval; if so the stored
  interval has already been raised by 5 s (RFC 8628 3.5 ``slow_down``).
- ``touch_grant`` records a use of the grant (resource guard; at most once a minute per grant is enough).

Redis layout (``<prefix>oa:``; ``G`` = ``{grant_id}``):
    g:G          hash   d = grant JSON, lu/lf/ua = last use, rt = current refresh hash, used = recent used ones
    k:G          zset   the grant's access-token and code keys, by expiry (revocation finds them here)
    at:G:<hash>  string access token record        rt:G:<hash>  string refresh token record (the current one)
    c:G:<hash>   string "0"|"1" (used) + code JSON
    ug:<user>    zset   grant ids by last use       cl:<id> string client JSON
    pg           zset   grant ids not yet redeemed, by the time they count as abandoned
    d:<hash>     string device authorization JSON   du:<user code> string the device code hash
    dc:<client>@<address>  zset   a client's live device authorizations from one address (bounded count)
    p:<key>      string short-lived state of the browser-facing endpoints
    cn           zset   unused client ids by expiry (their count is bounded across replicas); an unused
                        client's cl:<id> is "u:" + JSON until a user grants it access (``promote_client``)
    rl:<bucket>:<client>  hash  rate-limit token bucket of an unauthenticated endpoint (``limits.py``)
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, fields, replace
from typing import Any, Protocol, TypeVar

from redis.exceptions import RedisError

from ..errors import StoreUnavailable
from ..sessions import user_key
from ..store import RedisStore, SessionStore
from .model import AuthorizationCode, Client, DeviceAuthorization, Grant

T = TypeVar("T")
D = TypeVar("D")

USED_KEPT = 16  # refresh tokens of a grant remembered after rotation (replay detection), most recent first
USED_CHARS = 32  # of each used token's hash (128 bits)
DEVICE_GRACE = 60.0
SLOW_DOWN_STEP = 5.0  # RFC 8628 3.5
PENDING_GRACE = 600.0  # an unredeemed grant's key outlives its deadline by this much, so a sweep still reads it


class GrantStore(Protocol):
    # --- clients (RFC 7591) -------------------------------------------------------------------------
    async def put_client(self, client: Client, ttl: float) -> None: ...
    async def put_new_client(self, client: Client, ttl: float, max_new: int) -> bool:
        """Keep an anonymous registration for ``ttl`` (short) as *unused*; False (nothing stored) when
        ``max_new`` unused clients are alive already, counted across every replica."""
        ...

    async def promote_client(self, client_id: str, ttl: float) -> None:
        """A user granted the client access: from now on it lives ``ttl`` since its last use."""
        ...

    async def get_client(self, client_id: str) -> Client | None: ...
    async def touch_client(self, client_id: str, ttl: float) -> None:
        """Renew a used client's life; an unused one keeps its short one (anonymous use does not extend it)."""
        ...

    # --- grants ---------------------------------------------------------------------------------------
    async def create_grant(self, grant: Grant, ttl: float, max_per_user: int) -> list[Grant]:
        """Store a grant and index it under its user; returns the least recently used grants ended to stay
        within ``max_per_user`` (the caller ends their session records)."""
        ...

    async def get_grant(self, grant_id: str) -> Grant | None: ...
    async def user_grants(self, sub: str) -> list[Grant]:
        """The user's live grants, most recently used first."""
        ...

    async def touch_grant(self, grant_id: str, sub: str, now: float, client_ip: str) -> None: ...
    async def end_grant(self, grant_id: str) -> Grant | None:
        """Delete the grant and every token and code record of it, atomically; the ended grant or None."""
        ...

    async def end_user_grants(self, sub: str) -> list[Grant]: ...
    async def take_abandoned(self, now: float) -> list[str]:
        """Ids of grants whose code or device approval was due to be redeemed by ``now``; each id is handed
        to one caller only."""
        ...

    async def end_unredeemed(self, grant_id: str) -> Grant | None:
        """End the grant if it never issued tokens (atomically); the ended grant or None."""
        ...

    # --- tokens ---------------------------------------------------------------------------------------
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
    ) -> str:
        """Atomically: with ``used_refresh_hash`` None (first issue, after a code or device approval; refused
        as "unknown" once a refresh token exists) store both token records; else rotate: that refresh token
        must be the grant's current one. Returns "ok", "replayed" (it was current once: the whole grant is
        ended, RFC 9700 4.14.2) or "unknown" (no such grant or token: nothing changes). Updates last use."""
        ...

    async def report_replay(self, grant_id: str, refresh_hash: str) -> Grant | None:
        """A refresh token with no record: if it is one the grant rotated away, end the grant (RFC 9700
        4.14.2) and return it; else None and nothing changes."""
        ...

    async def access_record(self, grant_id: str, access_hash: str) -> bytes | None: ...
    async def refresh_record(self, grant_id: str, refresh_hash: str) -> bytes | None: ...
    async def revoke_access(self, grant_id: str, access_hash: str) -> None: ...

    # --- authorization codes --------------------------------------------------------------------------
    async def put_code(self, code_hash: str, code: AuthorizationCode, ttl: float) -> None: ...
    async def take_code(self, code_hash: str, grant_id: str) -> tuple[AuthorizationCode | None, bool]:
        """(code, first_use): the first call gets it; a later one gets (code, False) and the caller ends
        its grant (RFC 6749 4.1.2: a code used twice revokes what it issued)."""
        ...

    # --- device authorizations (RFC 8628) --------------------------------------------------------------
    async def put_device(self, device: DeviceAuthorization, ttl: float) -> bool:
        """False when the user code is taken (the caller draws another)."""
        ...

    async def reserve_device(self, client_id: str, device_code_hash: str, until: float, limit: int) -> bool:
        """Count a device authorization against its client until ``until``; False (nothing counted) when
        ``limit`` of the client's are alive already, across replicas (an anonymous client's storage bound)."""
        ...

    async def device_by_user_code(self, user_code: str) -> DeviceAuthorization | None: ...
    async def device_by_code_hash(self, device_code_hash: str) -> DeviceAuthorization | None: ...
    async def update_device(self, device: DeviceAuthorization, expected_status: str) -> bool:
        """Compare-and-set on status (approve, deny, redeem exactly once); the poll state (``last_poll_at``,
        ``interval``) stays as the store has it."""
        ...

    async def poll_device(self, device_code_hash: str, now: float) -> tuple[DeviceAuthorization | None, bool]:
        """The authorization and whether this poll came sooner than its interval after the previous one
        (then the stored interval is already 5 s longer: ``slow_down``); records this poll."""
        ...

    # --- short-lived state ----------------------------------------------------------------------------
    async def put_pending(self, key: str, blob: bytes, ttl: float) -> None: ...
    async def get_pending(self, key: str) -> bytes | None: ...
    async def take_pending(self, key: str) -> bytes | None: ...


# --- serialisation -----------------------------------------------------------------------------------------
def _dump(obj: Any) -> bytes:
    out = {}
    for name, value in asdict(obj).items():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        out[name] = value
    return json.dumps(out, separators=(",", ":")).encode()


def _load(cls: type[D], raw: bytes | str | None) -> D | None:
    """A dataclass from its JSON; None for anything unreadable (treated as absent, never a crash)."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            value = data[f.name]
            if f.type == "bytes":
                value = base64.b64decode(value)
            elif f.type.startswith("tuple"):
                value = tuple(value)
            elif f.type == "float":
                value = float(value)
            values[f.name] = value
        return cls(**values)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


# --- memory -----------------------------------------------------------------------------------------------
class MemoryGrantStore:
    """One process (the embedded default): same behaviour as Redis, every entry with an expiry."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._kv: dict[str, tuple[Any, float]] = {}
        self._writes = 0
        self._pending: dict[str, float] = {}  # grant id -> when it counts as abandoned

    def _get(self, key: str) -> Any:
        entry = self._kv.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._kv[key]
            return None
        return entry[0]

    def _set(self, key: str, value: Any, ttl: float) -> None:
        self._writes += 1
        if self._writes % 1000 == 0:
            now = self._clock()
            for k in [k for k, (_, exp) in self._kv.items() if exp <= now]:
                del self._kv[k]
        self._kv[key] = (value, self._clock() + ttl)

    def _keep_ttl(self, key: str, value: Any) -> None:
        entry = self._kv.get(key)
        if entry is not None:
            self._kv[key] = (value, entry[1])

    def _expire(self, key: str, ttl: float) -> None:
        entry = self._kv.get(key)
        if entry is not None:
            self._kv[key] = (entry[0], self._clock() + ttl)

    def _ttl(self, key: str) -> float:
        entry = self._kv.get(key)
        return 0.0 if entry is None else entry[1] - self._clock()

    async def put_client(self, client: Client, ttl: float) -> None:
        self._set("cl:" + client.client_id, client, ttl)

    async def put_new_client(self, client: Client, ttl: float, max_new: int) -> bool:
        now = self._clock()
        new: dict[str, float] = self._get("cn") or {}
        for client_id in [c for c, until in new.items() if until <= now]:
            del new[client_id]
        if len(new) >= max_new:
            return False
        new[client.client_id] = now + ttl
        self._set("cn", new, ttl)
        self._set("cl:" + client.client_id, client, ttl)
        return True

    async def promote_client(self, client_id: str, ttl: float) -> None:
        new = self._get("cn") or {}
        if new.pop(client_id, None) is not None:
            self._expire("cl:" + client_id, ttl)

    async def get_client(self, client_id: str) -> Client | None:
        found: Client | None = self._get("cl:" + client_id)
        return found

    async def touch_client(self, client_id: str, ttl: float) -> None:
        if self._get("cl:" + client_id) is not None and client_id not in (self._get("cn") or {}):
            self._expire("cl:" + client_id, ttl)

    # grants: "g:<id>" -> dict(grant=Grant, rt=str|None, used=list[str], tokens=set[str])
    async def create_grant(self, grant: Grant, ttl: float, max_per_user: int) -> list[Grant]:
        entry: dict[str, Any] = {"grant": grant, "rt": None, "used": [], "tokens": set()}
        self._set("g:" + grant.grant_id, entry, ttl + PENDING_GRACE)
        self._pending[grant.grant_id] = self._clock() + ttl
        index = self._get("ug:" + grant.sub) or {}
        index[grant.grant_id] = grant.last_used_at
        self._set("ug:" + grant.sub, index, max(self._ttl("ug:" + grant.sub), grant.expires_at - self._clock()))
        return await self._evict(grant, max_per_user)

    async def _evict(self, grant: Grant, max_per_user: int) -> list[Grant]:
        index = self._get("ug:" + grant.sub) or {}
        for gid in [g for g in index if self._get("g:" + g) is None]:
            del index[gid]
        older = sorted((score, gid) for gid, score in index.items() if gid != grant.grant_id)
        ended = []
        for _, gid in older[: max(0, len(index) - max_per_user)]:
            gone = await self.end_grant(gid)
            if gone is not None:
                ended.append(gone)
        return ended

    async def get_grant(self, grant_id: str) -> Grant | None:
        entry = self._get("g:" + grant_id)
        return None if entry is None else entry["grant"]

    async def user_grants(self, sub: str) -> list[Grant]:
        index = self._get("ug:" + sub) or {}
        found = [g for g in [await self.get_grant(gid) for gid in index] if g is not None]
        return sorted(found, key=lambda g: g.last_used_at, reverse=True)

    async def touch_grant(self, grant_id: str, sub: str, now: float, client_ip: str) -> None:
        entry = self._get("g:" + grant_id)
        if entry is None:
            return
        entry["grant"] = replace(entry["grant"], last_used_at=now, last_used_from=client_ip)
        index = self._get("ug:" + sub)
        if index is not None and grant_id in index:
            index[grant_id] = now

    async def end_grant(self, grant_id: str) -> Grant | None:
        entry = self._get("g:" + grant_id)
        if entry is None:
            return None
        for key in entry["tokens"]:
            self._kv.pop(key, None)
        if entry["rt"]:
            self._kv.pop(f"rt:{grant_id}:{entry['rt']}", None)
        del self._kv["g:" + grant_id]
        grant: Grant = entry["grant"]
        index = self._get("ug:" + grant.sub)
        if index is not None:
            index.pop(grant_id, None)
        return grant

    async def end_user_grants(self, sub: str) -> list[Grant]:
        index = self._get("ug:" + sub) or {}
        ended = [g for g in [await self.end_grant(gid) for gid in list(index)] if g is not None]
        self._kv.pop("ug:" + sub, None)
        return ended

    async def take_abandoned(self, now: float) -> list[str]:
        due = [gid for gid, at in self._pending.items() if at <= now]
        for gid in due:
            del self._pending[gid]
        return due

    async def end_unredeemed(self, grant_id: str) -> Grant | None:
        entry = self._get("g:" + grant_id)
        if entry is None or entry["rt"] is not None:
            return None
        return await self.end_grant(grant_id)

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
    ) -> str:
        entry = self._get("g:" + grant_id)
        if entry is None:
            return "unknown"
        if used_refresh_hash is None:
            if entry["rt"] is not None:
                return "unknown"
        elif entry["rt"] != used_refresh_hash:
            if used_refresh_hash[:USED_CHARS] in entry["used"]:
                await self.end_grant(grant_id)
                return "replayed"
            return "unknown"
        else:
            self._kv.pop(f"rt:{grant_id}:{used_refresh_hash}", None)
            entry["used"] = [used_refresh_hash[:USED_CHARS], *entry["used"]][:USED_KEPT]
        self._set(f"at:{grant_id}:{access_hash}", access_record, access_ttl)
        self._set(f"rt:{grant_id}:{refresh_hash}", refresh_record, refresh_ttl)
        entry["rt"] = refresh_hash
        entry["tokens"] = {k for k in entry["tokens"] if self._get(k) is not None} | {f"at:{grant_id}:{access_hash}"}
        grant = entry["grant"]
        entry["grant"] = replace(grant, last_used_at=now, last_used_from=client_ip, user_agent=user_agent)
        self._expire("g:" + grant_id, max(refresh_ttl, access_ttl))
        index = self._get("ug:" + grant.sub)
        if index is not None and grant_id in index:
            index[grant_id] = now
        return "ok"

    async def report_replay(self, grant_id: str, refresh_hash: str) -> Grant | None:
        entry = self._get("g:" + grant_id)
        if entry is None or refresh_hash[:USED_CHARS] not in entry["used"]:
            return None
        return await self.end_grant(grant_id)

    async def access_record(self, grant_id: str, access_hash: str) -> bytes | None:
        found: bytes | None = self._get(f"at:{grant_id}:{access_hash}")
        return found

    async def refresh_record(self, grant_id: str, refresh_hash: str) -> bytes | None:
        found: bytes | None = self._get(f"rt:{grant_id}:{refresh_hash}")
        return found

    async def revoke_access(self, grant_id: str, access_hash: str) -> None:
        self._kv.pop(f"at:{grant_id}:{access_hash}", None)

    async def put_code(self, code_hash: str, code: AuthorizationCode, ttl: float) -> None:
        entry = self._get("g:" + code.grant_id)
        if entry is None:
            return
        key = f"c:{code.grant_id}:{code_hash}"
        self._set(key, [code, False], ttl)
        entry["tokens"].add(key)

    async def take_code(self, code_hash: str, grant_id: str) -> tuple[AuthorizationCode | None, bool]:
        found = self._get(f"c:{grant_id}:{code_hash}")
        if found is None:
            return None, False
        first = not found[1]
        found[1] = True
        return found[0], first

    async def put_device(self, device: DeviceAuthorization, ttl: float) -> bool:
        if self._get("du:" + device.user_code) is not None:
            return False
        self._set("du:" + device.user_code, device.device_code_hash, ttl + DEVICE_GRACE)
        self._set("d:" + device.device_code_hash, device, ttl + DEVICE_GRACE)
        return True

    async def reserve_device(self, client_id: str, device_code_hash: str, until: float, limit: int) -> bool:
        now = self._clock()
        live = {h: t for h, t in (self._get("dc:" + client_id) or {}).items() if t > now}
        if len(live) >= limit:
            return False
        live[device_code_hash] = until
        self._set("dc:" + client_id, live, until - now)
        return True

    async def device_by_user_code(self, user_code: str) -> DeviceAuthorization | None:
        code_hash = self._get("du:" + user_code)
        return None if code_hash is None else await self.device_by_code_hash(code_hash)

    async def device_by_code_hash(self, device_code_hash: str) -> DeviceAuthorization | None:
        found: DeviceAuthorization | None = self._get("d:" + device_code_hash)
        return found

    async def update_device(self, device: DeviceAuthorization, expected_status: str) -> bool:
        current = self._get("d:" + device.device_code_hash)
        if current is None or current.status != expected_status:
            return False
        self._keep_ttl(
            "d:" + device.device_code_hash,
            replace(device, last_poll_at=current.last_poll_at, interval=current.interval),
        )
        return True

    async def poll_device(self, device_code_hash: str, now: float) -> tuple[DeviceAuthorization | None, bool]:
        current: DeviceAuthorization | None = self._get("d:" + device_code_hash)
        if current is None:
            return None, False
        too_fast = current.last_poll_at > 0 and now - current.last_poll_at < current.interval
        interval = current.interval + SLOW_DOWN_STEP if too_fast else current.interval
        current = replace(current, last_poll_at=now, interval=interval)
        self._keep_ttl("d:" + device_code_hash, current)
        return current, too_fast

    async def put_pending(self, key: str, blob: bytes, ttl: float) -> None:
        self._set("p:" + key, blob, ttl)

    async def get_pending(self, key: str) -> bytes | None:
        found: bytes | None = self._get("p:" + key)
        return found

    async def take_pending(self, key: str) -> bytes | None:
        found: bytes | None = self._get("p:" + key)
        self._kv.pop("p:" + key, None)
        return found


# --- Redis ------------------------------------------------------------------------------------------------
# Every script touches only keys of one grant (one {grant_id} slot) or one single key. Keys built inside
# a script (the grant's token records) share the declared keys' hash tag, so Cluster routes them with them.
#
# Ends a grant. KEYS g, k; ARGV key prefix, "{gid}". Returns the grant JSON or nil.
_END_BODY = """
local function end_grant(g, k, pre, tag)
  local d = redis.call('HGET', g, 'd')
  if not d then return nil end
  local rt = redis.call('HGET', g, 'rt')
  if rt then redis.call('DEL', pre .. 'rt:' .. tag .. ':' .. rt) end
  for _, m in ipairs(redis.call('ZRANGE', k, 0, -1)) do redis.call('DEL', pre .. m) end
  redis.call('DEL', g, k)
  return d
end
"""
_END = _END_BODY + "return end_grant(KEYS[1], KEYS[2], ARGV[1], ARGV[2])"
# The same, only for a grant that never issued tokens (an abandoned code or device approval).
_END_UNREDEEMED = (
    _END_BODY
    + """
if redis.call('HEXISTS', KEYS[1], 'rt') == 1 then return nil end
return end_grant(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
"""
)
# Issue or rotate. KEYS g, k, access key, new refresh key, used refresh key (or the new one again);
# ARGV access record, access ttl ms, refresh record, refresh ttl ms, used hash or "", now, client ip,
# user agent, grant ttl ms, prefix, "{gid}", access member, access expiry, new refresh hash, kept, chars.
_ISSUE = (
    _END_BODY
    + """
if redis.call('HEXISTS', KEYS[1], 'd') == 0 then return {'unknown'} end
local used = ARGV[5]
local cur = redis.call('HGET', KEYS[1], 'rt')
if used == '' then
  if cur then return {'unknown'} end
elseif cur ~= used then
  local old = redis.call('HGET', KEYS[1], 'used') or ''
  if string.find(' ' .. old .. ' ', ' ' .. string.sub(used, 1, tonumber(ARGV[16])) .. ' ', 1, true) then
    return {'replayed', end_grant(KEYS[1], KEYS[2], ARGV[10], ARGV[11])}
  end
  return {'unknown'}
else
  redis.call('DEL', KEYS[5])
  local old = redis.call('HGET', KEYS[1], 'used') or ''
  local list = string.sub(used, 1, tonumber(ARGV[16]))
  local n = 1
  for h in string.gmatch(old, '%S+') do
    if n >= tonumber(ARGV[15]) then break end
    list = list .. ' ' .. h
    n = n + 1
  end
  redis.call('HSET', KEYS[1], 'used', list)
end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4])
redis.call('HSET', KEYS[1], 'rt', ARGV[14], 'lu', ARGV[6], 'lf', ARGV[7], 'ua', ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[13], ARGV[12])
redis.call('PEXPIRE', KEYS[1], ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[9])
return {'ok'}
"""
)
# A grant's token or code record, registered for revocation. KEYS g, k, record; ARGV value, ttl ms, member,
# expiry. Nothing when the grant is gone.
_PUT_MEMBER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""
# KEYS code. Returns {first_use, json} or nil; marks it used (keeps its TTL).
_TAKE_CODE = """
local v = redis.call('GET', KEYS[1])
if not v then return nil end
if string.sub(v, 1, 1) == '1' then return {0, string.sub(v, 2)} end
redis.call('SET', KEYS[1], '1' .. string.sub(v, 2), 'KEEPTTL')
return {1, string.sub(v, 2)}
"""
# KEYS g, k; ARGV prefix, "{gid}", used hash (cut). Ends the grant when the hash is one it rotated away.
_REPLAY = (
    _END_BODY
    + """
local old = redis.call('HGET', KEYS[1], 'used') or ''
if string.find(' ' .. old .. ' ', ' ' .. ARGV[3] .. ' ', 1, true) then
  return end_grant(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
end
return nil
"""
)
# KEYS g; ARGV now, client ip.
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'lu', ARGV[1], 'lf', ARGV[2])
return 1
"""
# KEYS user index; ARGV score, member, ttl ms. Adds (or moves) a grant; the index outlives its grants.
_INDEX = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""
# KEYS device; ARGV new JSON, expected status.
_DEVICE_CAS = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local cur = cjson.decode(v)
if cur['status'] ~= ARGV[2] then return 0 end
local new = cjson.decode(ARGV[1])
new['last_poll_at'] = cur['last_poll_at']
new['interval'] = cur['interval']
redis.call('SET', KEYS[1], cjson.encode(new), 'KEEPTTL')
return 1
"""
# KEYS device; ARGV now, step. Returns {json after, too_fast}.
_DEVICE_POLL = """
local v = redis.call('GET', KEYS[1])
if not v then return nil end
local cur = cjson.decode(v)
local now = tonumber(ARGV[1])
local prev = tonumber(cur['last_poll_at']) or 0
local fast = 0
if prev > 0 and now - prev < tonumber(cur['interval']) then
  fast = 1
  cur['interval'] = tonumber(cur['interval']) + tonumber(ARGV[2])
end
cur['last_poll_at'] = now
local out = cjson.encode(cur)
redis.call('SET', KEYS[1], out, 'KEEPTTL')
return {out, fast}
"""
_TAKE = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('DEL', KEYS[1]) end
return v
"""


# Unused clients (anonymous registrations no user has granted yet): their record starts with _UNUSED and
# lives the short TTL; ``cn`` counts them (zset: client id by expiry) across replicas.
_UNUSED = b"u:"
# A bounded set of live members (unused clients; a client's device authorizations). KEYS the zset (member by
# expiry); ARGV now, max, member, expiry, ttl ms. 1 when the member was added, 0 when the set is full.
_COUNT_NEW = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[5]) then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return 1
"""
# KEYS client; ARGV ttl ms. An unused client becomes used (1), or nothing (0).
_PROMOTE = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 2) ~= 'u:' then return 0 end
redis.call('SET', KEYS[1], string.sub(v, 3), 'PX', ARGV[1])
return 1
"""
# KEYS client; ARGV ttl ms. Renews a used client only.
_TOUCH_CLIENT = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 2) == 'u:' then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[1])
"""


class RedisGrantStore:
    """Many replicas on one Redis (single node, Sentinel or Cluster), sharing the session store's client."""

    def __init__(self, client: Any, prefix: str = "sc:") -> None:
        self._r = client
        self._p = prefix + "oa:"
        self._end = client.register_script(_END)
        self._end_unredeemed = client.register_script(_END_UNREDEEMED)
        self._issue = client.register_script(_ISSUE)
        self._put_member = client.register_script(_PUT_MEMBER)
        self._take_code = client.register_script(_TAKE_CODE)
        self._touch = client.register_script(_TOUCH)
        self._replay = client.register_script(_REPLAY)
        self._index = client.register_script(_INDEX)
        self._device_cas = client.register_script(_DEVICE_CAS)
        self._device_poll = client.register_script(_DEVICE_POLL)
        self._take = client.register_script(_TAKE)
        self._count_new = client.register_script(_COUNT_NEW)
        self._promote = client.register_script(_PROMOTE)
        self._touch_client = client.register_script(_TOUCH_CLIENT)

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
        await self._call(self._r.set(self._p + "cl:" + client.client_id, _dump(client), px=_ms(ttl)))

    async def put_new_client(self, client: Client, ttl: float, max_new: int) -> bool:
        now = time.time()
        args = [repr(now), max_new, client.client_id, repr(now + ttl), _ms(ttl)]
        if not await self._call(self._count_new(keys=[self._p + "cn"], args=args)):
            return False
        value = _UNUSED + _dump(client)
        await self._call(self._r.set(self._p + "cl:" + client.client_id, value, px=_ms(ttl)))
        return True

    async def promote_client(self, client_id: str, ttl: float) -> None:
        if await self._call(self._promote(keys=[self._p + "cl:" + client_id], args=[_ms(ttl)])):
            await self._call(self._r.zrem(self._p + "cn", client_id))

    async def get_client(self, client_id: str) -> Client | None:
        raw = await self._call(self._r.get(self._p + "cl:" + client_id))
        return _load(Client, raw[len(_UNUSED) :] if raw is not None and raw.startswith(_UNUSED) else raw)

    async def touch_client(self, client_id: str, ttl: float) -> None:
        await self._call(self._touch_client(keys=[self._p + "cl:" + client_id], args=[_ms(ttl)]))

    # grants
    async def create_grant(self, grant: Grant, ttl: float, max_per_user: int) -> list[Grant]:
        mapping = {
            "d": _dump(grant),
            "lu": repr(grant.last_used_at),
            "lf": grant.last_used_from,
            "ua": grant.user_agent,
        }
        await self._call(self._r.hset(self._g(grant.grant_id), mapping=mapping))
        await self._call(self._r.pexpire(self._g(grant.grant_id), _ms(ttl + PENDING_GRACE)))
        await self._call(self._r.zadd(self._p + "pg", {grant.grant_id: time.time() + ttl}))
        await self._call(self._r.pexpire(self._p + "pg", _ms(ttl + PENDING_GRACE)))  # each new grant extends it
        index_ttl = _ms(max(ttl, grant.expires_at - time.time()))
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
        grant = _load(Grant, raw[0])
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
        grant = _load(Grant, raw)
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
        grant = _load(Grant, raw)
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
    ) -> str:
        tag = "{" + grant_id + "}"
        access_member = f"at:{tag}:{access_hash}"
        keys = [
            self._g(grant_id),
            self._k(grant_id),
            self._p + access_member,
            f"{self._p}rt:{tag}:{refresh_hash}",
            f"{self._p}rt:{tag}:{used_refresh_hash or refresh_hash}",
        ]
        args = [
            access_record,
            _ms(access_ttl),
            refresh_record,
            _ms(refresh_ttl),
            used_refresh_hash or "",
            repr(now),
            client_ip,
            user_agent,
            _ms(max(access_ttl, refresh_ttl)),
            self._p,
            tag,
            access_member,
            repr(now + access_ttl),
            refresh_hash,
            USED_KEPT,
            USED_CHARS,
        ]
        result = await self._call(self._issue(keys=keys, args=args))
        outcome = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        if outcome == "replayed":
            grant = _load(Grant, result[1] if len(result) > 1 else None)
            if grant is not None:
                await self._call(self._r.zrem(self._u(grant.sub), grant_id))
        elif outcome == "ok":
            grant = _load(Grant, await self._call(self._r.hget(self._g(grant_id), "d")))
            if grant is not None:
                await self._call(self._r.zadd(self._u(grant.sub), {grant_id: now}, xx=True))
        return outcome

    async def report_replay(self, grant_id: str, refresh_hash: str) -> Grant | None:
        keys = [self._g(grant_id), self._k(grant_id)]
        args = [self._p, "{" + grant_id + "}", refresh_hash[:USED_CHARS]]
        grant = _load(Grant, await self._call(self._replay(keys=keys, args=args)))
        if grant is not None:
            await self._call(self._r.zrem(self._u(grant.sub), grant_id))
        return grant

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
        args = [b"0" + _dump(code), _ms(ttl), member, repr(time.time() + ttl)]
        await self._call(self._put_member(keys=keys, args=args))

    async def take_code(self, code_hash: str, grant_id: str) -> tuple[AuthorizationCode | None, bool]:
        raw = await self._call(self._take_code(keys=[f"{self._p}c:{{{grant_id}}}:{code_hash}"]))
        if raw is None:
            return None, False
        return _load(AuthorizationCode, raw[1]), bool(raw[0])

    # devices
    async def put_device(self, device: DeviceAuthorization, ttl: float) -> bool:
        px = _ms(ttl + DEVICE_GRACE)
        if not await self._call(
            self._r.set(self._p + "du:" + device.user_code, device.device_code_hash, nx=True, px=px)
        ):
            return False
        await self._call(self._r.set(self._p + "d:" + device.device_code_hash, _dump(device), px=px))
        return True

    async def reserve_device(self, client_id: str, device_code_hash: str, until: float, limit: int) -> bool:
        now = time.time()
        args = [repr(now), limit, device_code_hash, repr(until), _ms(until - now)]
        return bool(await self._call(self._count_new(keys=[self._p + "dc:" + client_id], args=args)))

    async def device_by_user_code(self, user_code: str) -> DeviceAuthorization | None:
        code_hash = await self._call(self._r.get(self._p + "du:" + user_code))
        return None if code_hash is None else await self.device_by_code_hash(code_hash.decode())

    async def device_by_code_hash(self, device_code_hash: str) -> DeviceAuthorization | None:
        return _load(DeviceAuthorization, await self._call(self._r.get(self._p + "d:" + device_code_hash)))

    async def update_device(self, device: DeviceAuthorization, expected_status: str) -> bool:
        keys = [self._p + "d:" + device.device_code_hash]
        return bool(await self._call(self._device_cas(keys=keys, args=[_dump(device), expected_status])))

    async def poll_device(self, device_code_hash: str, now: float) -> tuple[DeviceAuthorization | None, bool]:
        raw = await self._call(
            self._device_poll(keys=[self._p + "d:" + device_code_hash], args=[repr(now), SLOW_DOWN_STEP])
        )
        if raw is None:
            return None, False
        return _load(DeviceAuthorization, raw[0]), bool(raw[1])

    # pending
    async def put_pending(self, key: str, blob: bytes, ttl: float) -> None:
        await self._call(self._r.set(self._p + "p:" + key, blob, px=_ms(ttl)))

    async def get_pending(self, key: str) -> bytes | None:
        return await self._call(self._r.get(self._p + "p:" + key))

    async def take_pending(self, key: str) -> bytes | None:
        return await self._call(self._take(keys=[self._p + "p:" + key]))


def grant_store_for(sessions_store: SessionStore) -> GrantStore:
    """The grant store beside the session store: the same Redis connection (and prefix), or memory."""
    if isinstance(sessions_store, RedisStore):
        return RedisGrantStore(sessions_store.client, sessions_store.prefix)
    return MemoryGrantStore()
