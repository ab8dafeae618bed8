"""What a grant store promises (clients, grants, codes, device authorizations, token records), and how
records are encoded: ``store_memory.py`` and ``store_redis.py`` keep these promises; ``store.py`` picks one.

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
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, fields
from typing import Any, Protocol, TypeVar

from .model import AuthorizationCode, Client, DeviceAuthorization, Grant

D = TypeVar("D")

USED_KEPT = 16  # refresh tokens of a grant remembered after rotation (replay detection), most recent first
USED_CHARS = 32  # of each used token's hash (128 bits)
DEVICE_GRACE = 60.0
SLOW_DOWN_STEP = 5.0  # RFC 8628 3.5
PENDING_GRACE = 600.0  # an unredeemed grant's key outlives its deadline by this much, so a sweep still reads it


class GrantStore(Protocol):
    # --- clients (RFC 7591) -------------------------------------------------------------------------
    async def put_client(self, client: Client, ttl: float) -> None: ...
    async def put_new_client(
        self, client: Client, network: str, ttl: float, max_new: int, per_network: int
    ) -> str | None:
        """Keep an anonymous registration for ``ttl`` (short) as *unused*, counted against ``network``; always
        kept. To stay within ``per_network`` unused clients per network and ``max_new`` in all (counted across
        every replica), it first forgets one unused client (``unused_pool.victim_network`` says whose: the
        oldest of that network) and returns its id; None when there was room."""
        ...

    async def promote_client(self, client_id: str, ttl: float) -> bool:
        """A user granted the client access: from now on it lives ``ttl`` since its last use. False when the
        client is gone (the unused pool forgot it since it was read): no grant may be made for it then."""
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
        reuse_answer: bytes = b"",
        reuse_window: float = 0.0,
    ) -> str:
        """Atomically: with ``used_refresh_hash`` None (first issue, after a code or device approval; refused
        as "unknown" once a refresh token exists) store both token records; else rotate: that refresh token
        must be the grant's current one. Returns "ok", "replayed" (it was current once: the whole grant is
        ended, RFC 9700 4.14.2) or "unknown" (no such grant or token: nothing changes). Updates last use.
        A rotation with ``reuse_window`` > 0 (the caller bounds it by the new tokens' ttls, so the answer never
        outlives its tokens or the grant) also keeps ``reuse_answer`` that long under the used hash
        (``reused_rotation``) and forgets the previous rotation's; presenting that used hash again while its
        answer is kept returns "again" and changes nothing (the caller answers with the kept one)."""
        ...

    async def reused_rotation(self, grant_id: str, refresh_hash: str) -> bytes | None:
        """The sealed answer of the rotation that used ``refresh_hash``, while it is the grant's latest and
        within its window; None otherwise (gone with the grant, the window, or the next rotation)."""
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
def dump(obj: Any) -> bytes:
    out = {}
    for name, value in asdict(obj).items():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        out[name] = value
    return json.dumps(out, separators=(",", ":")).encode()


def load(cls: type[D], raw: bytes | str | None) -> D | None:
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


def millis(seconds: float) -> int:
    return max(1, int(seconds * 1000))
