"""What ending a CLI/MCP grant does upstream: revoke its upstream refresh token, as a browser sign-out does,
and delete the session record that holds it; and the sweep that ends grants whose code or device approval
was never redeemed.

A grant can end without its client (the grants page, the per-user limit, a replayed refresh token, an
abandoned code), so the record is opened with the server's own copy of its key (``Grant.sealed_key``,
sealed under ``tokens.grant_wrapping_key``). The upstream refresh token is usually an ``offline_access``
one that lives for months at the provider: deleting our copy alone would leave it valid there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..cookies import SessionRef
from ..errors import InvalidCookie, SessionGone, StoreUnavailable
from ..oidc import NOT_REVOKED_FAILED, OidcClient
from ..sessions import Sessions, user_key
from . import tokens as tk
from .model import Grant

SWEEP_EVERY = 60.0  # how often each worker looks for abandoned grants (one ZRANGEBYSCORE)

log = logging.getLogger("sidecar.oauth")


def seal_for_server(secrets: tuple[bytes, ...], grant_id: str, session_key: bytes) -> bytes:
    """The grant's session key, sealed under the newest cookie secret (``Grant.sealed_key``)."""
    return tk.seal(tk.grant_wrapping_key(secrets[0], grant_id), session_key)


def _open(secrets: tuple[bytes, ...], grant: Grant) -> bytes | None:
    """The session key from ``Grant.sealed_key``; any configured cookie secret opens it (rotation)."""
    if not grant.sealed_key:
        return None  # a grant made before keys were sealed for the server
    for secret in secrets:
        key = tk.unseal(tk.grant_wrapping_key(secret, grant.grant_id), grant.sealed_key)
        if key is not None:
            return key
    return None


async def end_upstream(sessions: Sessions, oidc: OidcClient, secrets: tuple[bytes, ...], grant: Grant) -> str:
    """Revoke the grant's upstream refresh token and delete its record; what happened to the token, for the
    log line ("none" when the record was already gone or held none)."""
    ref = SessionRef(sid=grant.session_sid, key=_open(secrets, grant) or b"")
    outcome = "none"
    if ref.key:
        try:
            session = await sessions.load_fresh(ref)
        except (SessionGone, InvalidCookie):
            session = None
        except StoreUnavailable:
            session, outcome = None, NOT_REVOKED_FAILED
        if session is not None and session.tokens.refresh_token:
            outcome = await oidc.revoke(session.tokens.refresh_token, "refresh_token")
    await sessions.store.delete(ref.store_key, user_key(grant.sub))
    return outcome


async def sweep_forever(sweep: Callable[[], Awaitable[int]]) -> None:
    """Run ``sweep`` every ``SWEEP_EVERY`` seconds until cancelled; a failing store only delays it."""
    while True:
        await asyncio.sleep(SWEEP_EVERY)
        try:
            await sweep()
        except StoreUnavailable:
            log.warning("could not sweep abandoned grants; the store is unavailable")
        except Exception:  # noqa: BLE001 - the next sweep must still run
            log.exception("sweeping abandoned grants failed")
