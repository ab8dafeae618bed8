"""Keep a session's access token fresh: one refresh per session, in the process and across replicas.

The chain for a session whose token needs renewing:

1. in-process single-flight: concurrent requests share one task (``_inflight``) and one
   ``Budget`` (``--refresh-wait-timeout``, started once per refresh) from which everything that
   waits is paid: each caller's wait, the wait for another replica's lock, and the save's
   retries of a failing store;
2. cross-replica lock in the store (set-if-absent, random owner), extended from the moment it
   is taken until the save is done; replicas that lose wait for the record's version to move;
3. under the lock, reload the record and refresh only if it still needs it;
4. before calling the provider, look for a kept outcome of this very refresh token, so a
   token the provider already rotated is never presented twice;
5. the moment the provider answers, keep the new tokens under the consumed token's outcome key
   (in the process and the store) BEFORE anything that can take time or fail: validating the
   new ID token may fetch the JWKS. Then validate, then save with compare-and-set, never
   leaving the consumed token as the stored one.

What each provider answer does (told apart by exception class and RFC 6749 5.2 error code,
never by message text; the token endpoint's refusals are classified in ``oidc``):

==========================================  ===========================  ===============================
answer                                      session record               the request
==========================================  ===========================  ===============================
new tokens                                  saved                        served with them
``invalid_grant``                           deleted                      sign in again
``invalid_scope`` (the grant can never be   judged dead at once          current token while it is
refreshed again)                                                         valid, then sign in again
any other error code (``invalid_request``,  backs off; judged dead when  current token while valid,
an unknown code)                            refused again after it       then sign in again
an empty or non-JSON 4xx (often a firewall  backs off, never judged      current token while valid,
or a proxy in front of the provider)        dead by count                then sign in again
``invalid_client``, ``unauthorized_client``, backs off, never judged dead: current token while valid,
``unsupported_grant_type``, bare 401        fixing the client's          then sign in again
(logged at ERROR naming the cause)          configuration revives it
timeout, 5xx, 429, unreachable, a signing   kept, no back-off            current token while valid,
key not fetchable yet, ``server_error``,                                 else 504 / 503: retry
``temporarily_unavailable``
a malformed answer (not JSON, no token)     kept                         current token while valid, else 502
new ID token invalid, or another subject    deleted                      sign in again
==========================================  ===========================  ===============================

**Refusals back off.** A refused refresh is counted in the record (``refusals``) with the time before
which no refresh is tried again (``retry_at``: ``REFUSAL_BACKOFF`` doubled per refusal, at most
``REFUSAL_BACKOFF_MAX``), so every replica leaves the provider alone and a dead refresh token is not
presented on every request. A refusal judged dead (``invalid_scope``, or a refusal with an error code
seen ``REFUSALS_TO_END`` times in a row) ends the session at once when its access token has expired;
while the token is still valid its refresh token is dropped instead, so it is served until it expires
and the session then ends. Client refusals (the client's configuration) and refusals without an error
code are never judged dead by count; the refresh token's own known lifetime still ends the session
(``can_refresh``). A successful refresh clears the count. The state is typed (``ProviderRefused``), never
read from message text.

A refusal never leaves anyone stuck: once the access token has expired the browser is sent to
sign in (and that sign-in replaces the record). A failing provider or store never ends a session.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, replace

from . import crypto, logs, metrics
from .config import Config
from .cookies import SessionRef
from .errors import (
    InvalidGrant,
    ProviderError,
    ProviderProtocolError,
    ProviderRefused,
    ProviderTimeout,
    ProviderUnavailable,
    RefreshBusy,
    SessionGone,
    StoreUnavailable,
    TokenValidationError,
    VersionConflict,
)
from .models import Session, TokenSet
from .oidc import OidcClient
from .policy import identity_from_claims
from .sessions import Sessions

log = logging.getLogger("sidecar.refresh")

OUTCOME_TTL = 300.0  # how long a late caller holding a consumed token can still find its successor
REFUSAL_BACKOFF = 5.0  # no refresh is tried this long after a refusal (doubled after each further one)
REFUSAL_BACKOFF_MAX = 300.0
REFUSALS_TO_END = 2  # a grant refusal (not the client's configuration) seen this often in a row: the grant is dead
_POLL = 0.02  # how often a waiting replica looks for the new record (one small GETRANGE)


def outcome_key(refresh_token: str, version: int) -> str:
    """Names one refresh: this token, presented for this version of the record. A provider that
    does not rotate hands out the same token again, so the version keeps old outcomes from matching."""
    return hashlib.sha256(f"{version}:{refresh_token}".encode()).hexdigest()


@dataclass(frozen=True)
class Budget:
    """The one ``--refresh-wait-timeout`` of one refresh, started when the refresh starts. Every wait
    of that refresh spends from it, so no path can add up several timeouts."""

    deadline: float  # time.monotonic()

    @classmethod
    def starting_now(cls, seconds: float) -> Budget:
        return cls(time.monotonic() + seconds)

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def spent(self) -> bool:
        return time.monotonic() >= self.deadline


def _outcome_label(exc: ProviderError) -> str:
    """A fixed metrics label per failure class."""
    if isinstance(exc, ProviderTimeout):
        return "timeout"
    if isinstance(exc, ProviderRefused):
        return "refused"
    if isinstance(exc, ProviderProtocolError):
        return "protocol_error"
    return "provider_error"


class Refresher:
    def __init__(self, sessions: Sessions, oidc: OidcClient, config: Config) -> None:
        self._sessions = sessions
        self._store = sessions.store
        self._oidc = oidc
        self._config = config
        self._inflight: dict[str, tuple[asyncio.Future[Session], Budget]] = {}
        self._kept: dict[str, tuple[Session, float]] = {}  # outcomes whose save is still pending
        retries = int(config.provider_retries)
        # Outlive the slowest provider call it guards (timeouts + backoff); extended while held anyway.
        self.lock_ttl = float(config.provider_timeout) * (retries + 1) + 0.1 * 2 ** (retries + 1) + 5.0

    async def fresh(self, ref: SessionRef, session: Session) -> Session:
        """The session with a usable access token; raises SessionGone, RefreshBusy or a ProviderError."""
        now = time.time()
        if not session.needs_refresh(now, self._config.refresh_skew, self._config.cookie_refresh):
            return session
        if not session.can_refresh(now):
            if session.access_token_valid(now):
                return session  # nothing to refresh with, but the current token still works
            await self._sessions.end(ref, session, reason="expired")
            raise SessionGone("access token expired and there is no usable refresh token")
        if session.backing_off(now):
            return self._after_refusal(session)  # no provider call: a refresh was refused moments ago
        try:
            return await self._join(ref, session)
        except ProviderRefused:
            return self._after_refusal(session)
        except (ProviderUnavailable, ProviderProtocolError, StoreUnavailable, RefreshBusy):
            if session.access_token_valid(time.time()):
                return session  # still good for a little while: serve it and retry next time
            raise

    @staticmethod
    def _after_refusal(session: Session) -> Session:
        """The provider refused the refresh (not invalid_grant), now or moments ago: the current token is
        served while it lasts, then the user signs in again (``_record_refusal`` decided about the record)."""
        if session.access_token_valid(time.time()):
            return session
        raise SessionGone("the provider refused to refresh the session") from None

    async def _join(self, ref: SessionRef, session: Session) -> Session:
        key = ref.store_key
        entry = self._inflight.get(key)
        if entry is None:
            budget = Budget.starting_now(float(self._config.refresh_wait_timeout))
            task: asyncio.Future[Session] = asyncio.ensure_future(self._refresh_across_replicas(ref, session, budget))
            self._inflight[key] = (task, budget)
            task.add_done_callback(lambda t: self._forget_inflight(key, t))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # consumed: no "never retrieved" noise
        else:
            task, budget = entry
            metrics.REFRESH_JOINED.inc()
        try:
            # shield: a client that goes away must not cancel the refresh others are waiting on
            return await asyncio.wait_for(asyncio.shield(task), timeout=budget.left())
        except TimeoutError:
            raise RefreshBusy("waited too long for a token refresh") from None

    def _forget_inflight(self, key: str, task: asyncio.Future[Session]) -> None:
        entry = self._inflight.get(key)
        if entry is not None and entry[0] is task:
            del self._inflight[key]

    async def _refresh_across_replicas(self, ref: SessionRef, seen: Session, budget: Budget) -> Session:
        key, owner = ref.store_key, secrets.token_hex(16)
        while True:
            if await self._store.acquire_lock(key, owner, self.lock_ttl):
                # Held from here until the save is done: the outcome is not safe before that.
                keeper = asyncio.ensure_future(self._keep_lock(key, owner))
                try:
                    return await self._refresh_locked(ref, budget)
                finally:
                    keeper.cancel()
                    try:
                        await self._store.release_lock(key, owner)
                    except StoreUnavailable:
                        log.warning("could not release refresh lock; it expires by itself")
            metrics.LOCK_WAITS.inc()
            started = time.monotonic()
            try:
                result = await self._wait_for_other(ref, seen, budget)
            finally:
                metrics.LOCK_WAIT_SECONDS.observe(time.monotonic() - started)
            if result is not None:
                return result

    async def _wait_for_other(self, ref: SessionRef, seen: Session, budget: Budget) -> Session | None:
        """Wait for another replica's refresh: its new record, or its lock going away (None)."""
        while not budget.spent():
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

    async def _refresh_locked(self, ref: SessionRef, budget: Budget) -> Session:
        current = await self._sessions.load_fresh(ref)
        if current.backing_off(time.time()):  # another replica's refresh was just refused
            raise ProviderRefused("refresh refused moments ago; not asked again yet")
        consumed = current.tokens.refresh_token
        if consumed:
            # A refresh of exactly this record may already have happened with its save lost:
            # use that outcome rather than present the (possibly rotated) token again.
            known = await self._known_outcome(ref, outcome_key(consumed, current.version))
            if known is not None:
                current = await self._save(ref, replace(known, version=current.version), consumed, budget)
        if not current.needs_refresh(time.time(), self._config.refresh_skew, self._config.cookie_refresh):
            return current  # another replica (or a kept outcome) made it fresh
        consumed = current.tokens.refresh_token
        if not consumed:
            raise SessionGone("no refresh token")
        key = outcome_key(consumed, current.version)
        tokens = await self._call_provider(ref, current, consumed)
        provisional = replace(
            current,
            tokens=tokens.merged_over(current.tokens),
            refreshed_at=time.time(),
            refresh_count=current.refresh_count + 1,
            refusals=0,
            retry_at=None,
        )
        await self._keep_outcome(ref, key, provisional)  # first: the consumed token's successor is safe
        updated = await self._check_identity(ref, current, provisional)
        if updated is not provisional:
            await self._keep_outcome(ref, key, updated)
        metrics.REFRESHES.labels(outcome="ok").inc()
        return await self._save(ref, updated, consumed, budget, key)

    async def _call_provider(self, ref: SessionRef, current: Session, consumed: str) -> TokenSet:
        """The refresh grant; a dead grant ends the session here, every other failure is raised as is."""
        started, outcome = time.monotonic(), "ok"
        try:
            return await self._oidc.refresh(consumed)
        except InvalidGrant:
            outcome = "invalid_grant"
            metrics.REFRESHES.labels(outcome=outcome).inc()
            await self._sessions.end(ref, current, reason="invalid_grant")
            raise SessionGone("the provider refused the refresh token") from None
        except ProviderError as exc:
            outcome = _outcome_label(exc)
            metrics.REFRESHES.labels(outcome=outcome).inc()
            if isinstance(exc, ProviderRefused):
                await self._record_refusal(ref, current, exc)
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            elapsed = time.monotonic() - started
            metrics.REFRESH_SECONDS.observe(elapsed)
            fields = {**logs.who(current.identity), "outcome": outcome, "provider_latency_ms": round(elapsed * 1000, 1)}
            logs.event("refresh", fields, logging.INFO if outcome == "ok" else logging.WARNING)

    async def _record_refusal(self, ref: SessionRef, current: Session, exc: ProviderRefused) -> None:
        """Count the refusal in the record and back off (see the module docstring); a refusal judged dead
        ends the session (SessionGone), or drops its refresh token while its access token still works.
        A store that fails here only loses the back-off: it never signs anyone out."""
        now, refusals = time.time(), current.refusals + 1
        # Only a refusal the provider classified (an RFC 6749 error code) counts towards "dead": an empty or
        # non-JSON 4xx is as often a firewall, a load balancer or a maintenance page in front of the provider
        # as the provider itself, and a passing condition must never end a valid session.
        classified = exc.error_code is not None and not exc.misconfigured
        dead = exc.permanent or (classified and refusals >= REFUSALS_TO_END)
        if dead and not current.access_token_valid(now):
            await self._sessions.end(ref, current, reason="refresh_refused")
            raise SessionGone("the provider refused the refresh token again") from None
        if dead:
            # The record then lives (store TTL) only as long as the access token it still serves.
            tokens = replace(current.tokens, refresh_token=None, refresh_expires_at=current.tokens.access_expires_at)
            updated = replace(current, tokens=tokens, refusals=refusals, retry_at=None)
        else:
            wait = min(REFUSAL_BACKOFF * 2 ** (refusals - 1), REFUSAL_BACKOFF_MAX)
            updated = replace(current, refusals=refusals, retry_at=now + wait)
        try:
            await self._sessions.save(ref, updated)
        except (VersionConflict, StoreUnavailable) as err:
            log.warning("could not record the refused refresh", extra={"fields": {"error": type(err).__name__}})

    async def _check_identity(self, ref: SessionRef, current: Session, provisional: Session) -> Session:
        """A new ID token must be valid and for the same subject; it then renews the identity. One that
        cannot be checked now (JWKS unreachable or its key not fetchable yet) keeps the identity: the
        tokens came from the token endpoint and may already be rotated, so they are kept either way."""
        id_token = provisional.tokens.id_token
        if not id_token or id_token == current.tokens.id_token:
            return provisional
        try:
            claims = await self._oidc.validate_id_token(id_token, nonce=None)
        except TokenValidationError:
            await self._sessions.end(ref, current, reason="invalid_id_token")
            raise SessionGone("refreshed ID token failed validation") from None
        except ProviderError:
            log.warning("could not validate the refreshed ID token now; identity kept")
            return provisional
        if claims.get("sub") != current.identity.sub:
            await self._sessions.end(ref, current, reason="subject_changed")
            raise SessionGone("refreshed ID token names another subject")
        return replace(provisional, identity=identity_from_claims(claims, self._config))

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

    async def _save(
        self, ref: SessionRef, updated: Session, consumed: str, budget: Budget, key: str | None = None
    ) -> Session:
        """Compare-and-set, retrying a failing store while the budget lasts; the consumed refresh token
        must never stay stored. Should the budget run out, the kept outcome still holds the new tokens."""
        delay = 0.05
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
                if budget.left() < delay:
                    raise
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def _keep_lock(self, key: str, owner: str) -> None:
        """Extend the lock from the moment it is taken until the save is done (the caller cancels this),
        so a slow provider, JWKS fetch or store never lets a second replica in before the outcome is safe."""
        while True:
            await asyncio.sleep(self.lock_ttl / 3)
            try:
                if not await self._store.extend_lock(key, owner, self.lock_ttl):
                    log.warning("refresh lock lost while refreshing")
                    return
            except StoreUnavailable:
                continue
