"""The grant store in one process (the embedded default): the same promises as Redis
(``store_contract.py``), every entry with an expiry, for a single worker and for tests."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .model import AuthorizationCode, Client, DeviceAuthorization, Grant
from .store_contract import DEVICE_GRACE, PENDING_GRACE, SLOW_DOWN_STEP, USED_CHARS, USED_KEPT
from .unused_pool import victim_network


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

    async def put_new_client(
        self, client: Client, network: str, ttl: float, max_new: int, per_network: int
    ) -> str | None:
        now = self._clock()
        pool: dict[str, tuple[float, str]] = self._get("cn") or {}  # unused client id -> (expiry, network)
        for client_id in [c for c, (until, _) in pool.items() if until <= now]:
            del pool[client_id]
        counts = Counter(net for _, net in pool.values())
        victim_net = victim_network(counts, network, len(pool), max_new, per_network)
        victim = None
        if victim_net is not None:
            victim = min((c for c, (_, net) in pool.items() if net == victim_net), key=lambda c: pool[c][0])
            del pool[victim]
            self._kv.pop("cl:" + victim, None)  # in the pool, so still unused
        pool[client.client_id] = (now + ttl, network)
        self._set("cn", pool, ttl)
        self._set("cl:" + client.client_id, client, ttl)
        return victim

    async def promote_client(self, client_id: str, ttl: float) -> bool:
        pool = self._get("cn") or {}
        if pool.pop(client_id, None) is not None:
            self._expire("cl:" + client_id, ttl)
        return self._get("cl:" + client_id) is not None

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
        if entry.get("ru"):
            self._kv.pop(f"ru:{grant_id}:{entry['ru']}", None)
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
        reuse_answer: bytes = b"",
        reuse_window: float = 0.0,
    ) -> str:
        entry = self._get("g:" + grant_id)
        if entry is None:
            return "unknown"
        if used_refresh_hash is None:
            if entry["rt"] is not None:
                return "unknown"
        elif entry["rt"] != used_refresh_hash:
            if reuse_window > 0 and self._get(f"ru:{grant_id}:{used_refresh_hash}") is not None:
                return "again"
            if used_refresh_hash[:USED_CHARS] in entry["used"]:
                await self.end_grant(grant_id)
                return "replayed"
            return "unknown"
        else:
            self._kv.pop(f"rt:{grant_id}:{used_refresh_hash}", None)
            entry["used"] = [used_refresh_hash[:USED_CHARS], *entry["used"]][:USED_KEPT]
            if entry.get("ru"):  # only the latest rotation can be retried
                self._kv.pop(f"ru:{grant_id}:{entry['ru']}", None)
            entry["ru"] = None
            if reuse_window > 0 and reuse_answer:
                self._set(f"ru:{grant_id}:{used_refresh_hash}", reuse_answer, reuse_window)
                entry["ru"] = used_refresh_hash
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

    async def reused_rotation(self, grant_id: str, refresh_hash: str) -> bytes | None:
        found: bytes | None = self._get(f"ru:{grant_id}:{refresh_hash}")
        return found

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
