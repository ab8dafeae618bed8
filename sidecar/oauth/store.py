"""The grant store: clients, grants, codes, device authorizations and token records, in memory or Redis.

Every key has a TTL. The keys of one grant share the ``{grant_id}`` hash tag, so a refresh-token
rotation or a revocation is one atomic Lua script even on Redis Cluster. The per-user index of
grants (for the grants page, the per-user limit and sign-out everywhere) is a sorted set by last use.

INTERFACE CONTRACT (filled in by the store's implementer; callers use only these methods):
"""

from __future__ import annotations

from typing import Protocol

from .model import AuthorizationCode, Client, DeviceAuthorization, Grant


class GrantStore(Protocol):
    # --- clients (RFC 7591) -------------------------------------------------------------------------
    async def put_client(self, client: Client, ttl: float) -> None: ...
    async def get_client(self, client_id: str) -> Client | None: ...
    async def touch_client(self, client_id: str, ttl: float) -> None: ...

    # --- grants ---------------------------------------------------------------------------------------
    async def create_grant(self, grant: Grant, ttl: float, max_per_user: int) -> list[str]:
        """Store a grant and index it under its user; returns the ids of the least recently used grants
        ended to stay within ``max_per_user`` (the caller ends their session records)."""
        ...

    async def get_grant(self, grant_id: str) -> Grant | None: ...
    async def user_grants(self, sub: str) -> list[Grant]: ...
    async def end_grant(self, grant_id: str) -> Grant | None:
        """Delete the grant and every token and code record of it, atomically; the ended grant or None."""
        ...

    async def end_user_grants(self, sub: str) -> list[Grant]: ...

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
        """Atomically: with ``used_refresh_hash`` None (first issue, after a code or device approval) store
        both token records; else rotate: that refresh token must be the grant's current one. Returns
        "ok", "replayed" (it was current once: the whole grant is ended, RFC 9700 4.14.2) or "unknown"
        (no such grant or token: nothing changes). Updates the grant's last use."""
        ...

    async def access_record(self, grant_id: str, access_hash: str) -> bytes | None: ...
    async def refresh_record(self, grant_id: str, refresh_hash: str) -> bytes | None: ...
    async def revoke_access(self, grant_id: str, access_hash: str) -> None: ...

    # --- authorization codes --------------------------------------------------------------------------
    async def put_code(self, code_hash: str, code: AuthorizationCode, ttl: float) -> None: ...
    async def take_code(self, code_hash: str) -> tuple[AuthorizationCode | None, bool]:
        """(code, first_use): the first call gets it; a later one gets (code, False) and the caller ends
        its grant (RFC 6749 4.1.2: a code used twice revokes what it issued)."""
        ...

    # --- device authorizations (RFC 8628) --------------------------------------------------------------
    async def put_device(self, device: DeviceAuthorization, ttl: float) -> bool:
        """False when the user code is taken (the caller draws another)."""
        ...

    async def device_by_user_code(self, user_code: str) -> DeviceAuthorization | None: ...
    async def device_by_code_hash(self, device_code_hash: str) -> DeviceAuthorization | None: ...
    async def update_device(self, device: DeviceAuthorization, expected_status: str) -> bool:
        """Compare-and-set on status (approve, deny, redeem exactly once)."""
        ...

    async def poll_device(self, device_code_hash: str, now: float) -> tuple[DeviceAuthorization | None, float]:
        """The authorization and the time of the previous poll (for ``slow_down``), recording this one."""
        ...

    # --- short-lived state ----------------------------------------------------------------------------
    async def put_pending(self, key: str, blob: bytes, ttl: float) -> None: ...
    async def get_pending(self, key: str) -> bytes | None: ...
    async def take_pending(self, key: str) -> bytes | None: ...
