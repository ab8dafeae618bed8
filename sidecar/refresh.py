"""Keep a session's access token fresh: one refresh per session, in the process and across replicas.

The chain for a session whose token needs renewing:

1. in-process single-flight: concurrent requests share one task (``_inflight``);
2. cross-replica lock in the store (set-if-absent, random owner, extended while
   the provider call runs); replicas that lose wait for the record's version to move;
3. under the lock, reload the record and refresh only if it still needs it;
4. before calling the provider, look for a kept outcome of this very refresh
   token, so a token the provider already rotated is never presented twice;
5. save with compare-and-set, retrying transient store failures, never leaving the
   consumed token as the stored one.

A dead grant ends the session; a failing provider or store never does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import replace
from typing import Any

from . import crypto, metrics
from .cookies import SessionRef
from .errors import (
    InvalidGrant,
    ProviderUnavailable,
    RefreshBusy,
    SessionGone,
    StoreUnavailable,
    TokenValidationError,
    VersionConflict,
)
from .models import Session
from .oidc import OidcClient
from .policy import identity_from_claims
from .sessions import Sessions

log = logging.getLogger("sidecar.refresh")

OUTCOME_TTL = 300.0  # how long a late caller holding a consumed token can still find its successor
_POLL = 0.02  # how often a waiting replica looks for the new record (one small GETRANGE)


def outcome_key(refresh_token: str, version: int) -> str:
    """Names one refresh: this token, presented for this version of the record. A provider that
    does not rotate hands out the same token again, so the version keeps old outcomes from matching."""
    return hashlib.sha256(f"{version}:{refresh_token}".encode()).hexdigest()


class Refresher:
    def __init__(self, sessions: Sessions, oidc: OidcClient, config: Any) -> None:
        self._sessions = sessions
        self._store = sessions.store
        self._oidc = oidc
        self._config = config
        self._inflight: dict[str, asyncio.Future[Session]] = {}
        self._kept: dict[str, tuple[Session, float]] = {}  # outcomes whose save is still pending
        retries = int(config.provider_retries)
        # Outlive the slowest provider call it guards (timeouts + backoff), and extend while held.
        self.lock_ttl = float(config.provider_timeout) * (retries + 1) + 0.1 * 2 ** (retries + 1) + 5.0

    async def fresh(self, ref: SessionRef, session: Session) -> Session:
        """The session with a usable access token; raises SessionGone, RefreshBusy or ProviderUnavailable."""
        now = time.time()
        if not session.needs_refresh(now, self._config.refresh_skew, self._config.cookie_refresh):
            return session
        if not session.can_refresh(now):
            if session.access_token_valid(now):
                return session  # nothing to refresh with, but the current token still works
            await self._sessions.end(ref, session, reason="expired")
            raise SessionGone("access token expired and there is no usable refresh token")
        try:
            return await self._join(ref, session)
        except (ProviderUnavailable, StoreUnavailable, RefreshBusy):
            if session.access_token_valid(time.time()):
                return session  # still good for a little while: serve it and retry next time
            raise

    async def _join(self, ref: SessionRef, session: Session) -> Session:
        key = ref.store_key
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._refresh_across_replicas(ref, session))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._inflight.pop(key, None) if self._inflight.get(key) is t else None)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # consumed: no "never retrieved" noise
        else:
            metrics.REFRESH_JOINED.inc()
        try:
            # shield: a client that goes away must not cancel the refresh others are waiting on
            return await asyncio.wait_for(asyncio.shield(task), timeout=self._config.refresh_wait_timeout)
        except TimeoutError:
            raise RefreshBusy("waited too long for a token refresh") from None

    async def _refresh_across_replicas(self, ref: SessionRef, seen: Session) -> Session:
        key, owner = ref.store_key, secrets.token_hex(16)
        deadline = time.monotonic() + float(self._config.refresh_wait_timeout)
        while True:
            if await self._store.acquire_lock(key, owner, self.lock_ttl):
                try:
                    return await self._refresh_locked(ref, owner)
                finally:
                    try:
                        await self._store.release_lock(key, owner)
                    except StoreUnavailable:
                        log.warning("could not release refresh lock; it expires by itself")
            metrics.LOCK_WAITS.inc()
            started = time.monotonic()
            try:
                result = await self._wait_for_other(ref, seen, deadline)
            finally:
                metrics.LOCK_WAIT_SECONDS.observe(time.monotonic() - started)
            if result is not None:
                return result

    async def _wait_for_other(self, ref: SessionRef, seen: Session, deadline: float) -> Session | None:
        """Wait for another replica's refresh: its new record, or its lock going away (None)."""
        while time.monotonic() < deadline:
            await asyncio.sleep(_POLL)
            version = await self._store.version(ref.store_key)
            if version is None:
                raise SessionGone("session ended during refresh")
            if version > seen.version:
                current = await self._sessions.load_fresh(ref)
                if not current.needs_refresh(time.time(), self._config.refresh_skew, self._config.cookie_refresh):
                    return current
                seen = current
            if not await self._store.lock_held(ref.store_key):
                return None
        raise RefreshBusy("another replica's refresh took too long")

    async def _refresh_locked(self, ref: SessionRef, owner: str) -> Session:
        current = await self._sessions.load_fresh(ref)
        consumed = current.tokens.refresh_token
        if consumed:
            # A refresh of exactly this record may already have happened with its save lost:
            # use that outcome rather than present the (possibly rotated) token again.
            known = await self._known_outcome(ref, outcome_key(consumed, current.version))
            if known is not None:
                current = await self._save(ref, replace(known, version=current.version), consumed)
        now = time.time()
        if not current.needs_refresh(now, self._config.refresh_skew, self._config.cookie_refresh):
            return current  # another replica (or a kept outcome) made it fresh
        consumed = current.tokens.refresh_token
        if not consumed:
            raise SessionGone("no refresh token")
        key = outcome_key(consumed, current.version)
        keeper = asyncio.ensure_future(self._keep_lock(ref.store_key, owner))
        started = time.monotonic()
        try:
            tokens = await self._oidc.refresh(consumed)
        except InvalidGrant:
            metrics.REFRESHES.labels(outcome="invalid_grant").inc()
            await self._sessions.end(ref, current, reason="invalid_grant")
            raise SessionGone("the provider refused the refresh token") from None
        except ProviderUnavailable as exc:
            outcome = "timeout" if "timed out" in str(exc) else "provider_error"
            metrics.REFRESHES.labels(outcome=outcome).inc()
            raise
        finally:
            keeper.cancel()
            metrics.REFRESH_SECONDS.observe(time.monotonic() - started)
        updated = await self._apply(ref, current, tokens)
        await self._keep_outcome(ref, key, updated)
        metrics.REFRESHES.labels(outcome="ok").inc()
        return await self._save(ref, updated, consumed, key)

    async def _apply(self, ref: SessionRef, current: Session, tokens: Any) -> Session:
        """Merge the new tokens; a new ID token must be valid and for the same subject."""
        tokens = tokens.merged_over(current.tokens)
        identity = current.identity
        if tokens.id_token and tokens.id_token != current.tokens.id_token:
            try:
                claims = await self._oidc.validate_id_token(tokens.id_token, nonce=None)
            except TokenValidationError:
                await self._sessions.end(ref, current, reason="invalid_id_token")
                raise SessionGone("refreshed ID token failed validation") from None
            except ProviderUnavailable:
                # JWKS unreachable: the tokens themselves came from the token endpoint and may already be
                # rotated, so keep them; the identity is re-checked at the next refresh.
                log.warning("could not validate the refreshed ID token now; identity kept")
                return replace(
                    current, tokens=tokens, refreshed_at=time.time(), refresh_count=current.refresh_count + 1
                )
            if claims.get("sub") != current.identity.sub:
                await self._sessions.end(ref, current, reason="subject_changed")
                raise SessionGone("refreshed ID token names another subject")
            identity = identity_from_claims(claims, self._config)
        return replace(
            current,
            tokens=tokens,
            identity=identity,
            refreshed_at=time.time(),
            refresh_count=current.refresh_count + 1,
        )

    async def _known_outcome(self, ref: SessionRef, digest: str) -> Session | None:
        kept = self._kept.get(digest)
        if kept is not None and kept[1] > time.monotonic():
            return kept[0]
        blob = await self._store.get_outcome(digest)
        if blob is None:
            return None
        plain = crypto.decrypt(ref.key, blob, digest.encode())
        return Session.from_bytes(plain, 0, 0.0)

    async def _keep_outcome(self, ref: SessionRef, digest: str, updated: Session) -> None:
        """Remember the result under the consumed token before saving, in the process and the store."""
        self._kept[digest] = (updated, time.monotonic() + OUTCOME_TTL)
        for stale in [d for d, (_, exp) in self._kept.items() if exp <= time.monotonic()]:
            del self._kept[stale]
        try:
            await self._store.put_outcome(
                digest, crypto.encrypt(ref.key, updated.to_bytes(), digest.encode()), OUTCOME_TTL
            )
        except StoreUnavailable:
            log.warning("could not keep refresh outcome in the store; kept in process")

    async def _save(self, ref: SessionRef, updated: Session, consumed: str, key: str | None = None) -> Session:
        """Compare-and-set with retries; the consumed refresh token must never stay stored."""
        delay = 0.05
        deadline = time.monotonic() + float(self._config.refresh_wait_timeout)
        while True:
            try:
                saved = await self._sessions.save(ref, updated)
                if key is not None:
                    self._kept.pop(key, None)
                return saved
            except VersionConflict:
                latest = await self._sessions.load_fresh(ref)  # SessionGone if signed out meanwhile
                if latest.tokens.refresh_token != consumed:
                    return latest  # someone stored newer tokens; theirs win
                updated = replace(updated, version=latest.version)
            except StoreUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def _keep_lock(self, key: str, owner: str) -> None:
        """Extend the lock while the provider call runs, so a slow provider never lets a second replica in."""
        while True:
            await asyncio.sleep(self.lock_ttl / 3)
            try:
                if not await self._store.extend_lock(key, owner, self.lock_ttl):
                    log.warning("refresh lock lost while refreshing")
                    return
            except StoreUnavailable:
                continue
