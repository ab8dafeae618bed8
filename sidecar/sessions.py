"""Session lifecycle on top of a store: create, load, save (compare-and-set), end.

Records are encrypted with the key from the cookie before they reach the store.
Loaded sessions are cached per process for at most ``--session-cache-ttl``
(under one second), keyed by store key and checked against the stored version,
so the hot path rarely touches Redis or decrypts, yet a sign-out on any
replica is honoured everywhere within that time.

Every write of a record (sign-in and each refresh) also extends the indexes
that find it (the user's, and the provider session's ``sid``) to at least the
record's own lifetime: with a sliding refresh lifetime a session can outlive
its first TTL many times, and "sign out everywhere" and back-channel logout
must still find it.

When a hot session's cached copy expires, the requests that find it stale together
share one store read (``_refills``, one task per store key): one Redis GET per
session per cache period and worker, however many requests are in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from . import crypto, metrics
from .config import Config
from .cookies import SessionRef
from .errors import SessionGone
from .models import Identity, Session, TokenSet
from .stepup import session_fields
from .store import SessionStore

_TOUCH_EVERY = 60.0  # write "last active" at most once a minute per session
_CACHE_LIMIT = 20_000


def _retrieved(task: asyncio.Task[Session]) -> None:
    """Mark a refill's failure as seen even when every request that waited for it went away."""
    if not task.cancelled():
        task.exception()


def user_key(sub: str) -> str:
    """The per-user index key: a hash, so Redis holds no raw subject ids."""
    return hashlib.sha256(sub.encode()).hexdigest()[:32]


def provider_sid_key(sid: str) -> str:
    return hashlib.sha256(b"sid:" + sid.encode()).hexdigest()[:32]


class Sessions:
    def __init__(
        self,
        store: SessionStore,
        config: Config,
        clock: Callable[[], float] = time.time,
        *,
        index_provider_sid: bool = True,
    ) -> None:
        """``index_provider_sid=False``: back-channel logout by the provider's ``sid`` does not reach these
        sessions (the upstream tokens of CLI/MCP grants, which outlive a browser sign-out; by ``sub`` it does)."""
        self._index_provider_sid = index_provider_sid
        self.store = store
        self._config = config
        self._clock = clock
        self._cache: dict[str, tuple[Session, float]] = {}
        self._refills: dict[str, asyncio.Task[Session]] = {}  # store key -> the one read in flight
        # Store keys that ended or were rewritten here while their refill was in flight: what that refill read
        # may be older than the change (a sign-out's DEL after its GET), so it answers its waiters, uncached.
        self._overtaken: set[str] = set()
        self._cache_ttl = float(config.session_cache_ttl)
        # Told the store key of a session that ended or was rewritten in this process (the decision cache
        # drops its answers for it at once, instead of when it next finds them stale).
        self.on_change: list[Callable[[str], None]] = []

    def record_ttl(self, session: Session, now: float) -> float:
        """Redis TTL: the refresh-token lifetime (provider's word, else --refresh-token-ttl)."""
        expires = session.tokens.refresh_expires_at
        if expires is not None:
            return max(1.0, expires - now)
        return float(self._config.refresh_token_ttl)

    def _stored_tokens(self, tokens: TokenSet) -> TokenSet:
        """The ID token is kept only when sign-out needs it as id_token_hint: it is the largest part."""
        return tokens if self._config.oidc_logout_id_token_hint else replace(tokens, id_token=None)

    async def create(self, identity: Identity, tokens: TokenSet, claims: dict[str, Any]) -> tuple[SessionRef, Session]:
        now = self._clock()
        ref = SessionRef.new()  # a fresh id at every sign-in, never the browser's old one
        provider_sid = claims.get("sid")  # the provider's session id, for back-channel logout
        session = Session(
            identity=identity,
            tokens=self._stored_tokens(tokens),
            created_at=now,
            signed_in_at=now,
            version=1,
            last_active=now,
            provider_sid=provider_sid if isinstance(provider_sid, str) and provider_sid else None,
            **session_fields(claims, now),  # auth_time, acr, amr of this interactive sign-in
        )
        blob = crypto.encrypt(ref.key, session.to_bytes(), ref.store_key.encode())
        ttl = self.record_ttl(session, now)
        await self.store.create(ref.store_key, blob, ttl, now, user_key(identity.sub))
        await self._index_provider_session(ref.store_key, session, ttl)
        metrics.SESSIONS_CREATED.inc()
        return ref, session

    async def load(self, ref: SessionRef) -> Session:
        """The session behind a cookie, from cache when fresh; raises SessionGone when absent or over its limits."""
        hit = self._cache.get(ref.store_key)
        mono = time.monotonic()
        if hit is not None and mono - hit[1] < self._cache_ttl:
            return hit[0]
        refill = self._refills.get(ref.store_key)
        if refill is None:
            refill = self._refills[ref.store_key] = asyncio.ensure_future(self._refill(ref, hit[0] if hit else None))
            refill.add_done_callback(_retrieved)
        # shield: a request that goes away does not cancel the read the others wait for
        return await asyncio.shield(refill)

    async def _refill(self, ref: SessionRef, cached: Session | None) -> Session:
        """The one store read shared by every request that found this session stale at the same time.

        Its outcome (the session, SessionGone, StoreUnavailable...) goes to all of them; the entry is
        gone as soon as it finishes, so a failure is not remembered: the next request reads again."""
        try:
            return await self._load_from_store(ref, cached)
        finally:
            if self._refills.get(ref.store_key) is asyncio.current_task():
                del self._refills[ref.store_key]
                self._overtaken.discard(ref.store_key)

    async def load_fresh(self, ref: SessionRef) -> Session:
        """Bypass the cache: the refresh logic must see what is stored right now."""
        return await self._load_from_store(ref, None)

    async def _load_from_store(self, ref: SessionRef, cached: Session | None) -> Session:
        record = await self.store.load(ref.store_key)
        if record is None:
            self._cache.pop(ref.store_key, None)
            self._changed(ref.store_key)
            raise SessionGone("no such session")
        if cached is not None and cached.version == record.version:
            session = replace(cached, last_active=record.last_active)
        else:
            plain = crypto.decrypt(ref.key, record.blob, ref.store_key.encode())
            try:
                session = Session.from_bytes(plain, record.version, record.last_active)
            except ValueError:
                raise SessionGone("unreadable session record") from None
        now = self._clock()
        if session.expired(now, self._config.cookie_expire, self._config.session_idle_timeout):
            await self.end(ref, session, reason="expired")
            raise SessionGone("session is past its lifetime or idle timeout")
        if now - session.last_active >= _TOUCH_EVERY:
            await self.store.touch(ref.store_key, now)
            session = replace(session, last_active=now)
        if ref.store_key not in self._overtaken:
            self._remember(ref.store_key, session)
        return session

    def is_cached(self, key: str, session: Session) -> bool:
        """``session`` is the very object this process's cache holds for ``key`` (whatever its age)."""
        hit = self._cache.get(key)
        return hit is not None and hit[0] is session

    def cache_deadline(self, key: str, session: Session) -> float | None:
        """When the cached ``session`` stops being served from cache (``time.monotonic()``); None when the cache
        does not hold this very object."""
        hit = self._cache.get(key)
        if hit is None or hit[0] is not session:
            return None
        return hit[1] + self._cache_ttl

    def _changed(self, key: str) -> None:
        if key in self._refills:
            self._overtaken.add(key)
        for tell in self.on_change:
            tell(key)

    def _remember(self, key: str, session: Session) -> None:
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (session, time.monotonic())

    async def save(self, ref: SessionRef, session: Session) -> Session:
        """Compare-and-set on ``session.version``; raises VersionConflict when someone wrote first."""
        now = self._clock()
        session = replace(session, tokens=self._stored_tokens(session.tokens))
        blob = crypto.encrypt(ref.key, session.to_bytes(), ref.store_key.encode())
        ttl = self.record_ttl(session, now)
        version = await self.store.save(ref.store_key, blob, session.version, ttl)
        saved = replace(session, version=version)
        self._remember(ref.store_key, saved)
        self._changed(ref.store_key)
        await self._keep_indexes(ref.store_key, saved, ttl)
        return saved

    async def _keep_indexes(self, key: str, session: Session, ttl: float) -> None:
        """The record's TTL just moved: its indexes must live at least as long, or logout would miss it."""
        await self.store.index(user_key(session.identity.sub), key, ttl)
        await self._index_provider_session(key, session, ttl)

    async def _index_provider_session(self, key: str, session: Session, ttl: float) -> None:
        if session.provider_sid and self._index_provider_sid:
            await self.store.index(provider_sid_key(session.provider_sid), key, ttl)

    async def end(self, ref: SessionRef, session: Session | None, reason: str) -> None:
        self._cache.pop(ref.store_key, None)
        self._changed(ref.store_key)
        await self.store.delete(ref.store_key, user_key(session.identity.sub) if session else None)
        metrics.SESSIONS_DELETED.labels(reason=reason).inc()

    async def end_users_session(self, sub: str, key: str, reason: str = "ended_from_account_page") -> None:
        """End one session of the user's index by its store key (the account page holds no cookie for it)."""
        self._cache.pop(key, None)
        self._changed(key)
        await self.store.delete(key, user_key(sub))
        metrics.SESSIONS_DELETED.labels(reason=reason).inc()

    async def end_all_for_user(self, sub: str, reason: str = "signed_out_everywhere") -> int:
        """Sign a user out everywhere (every browser, every CLI client)."""
        return await self._end_indexed(user_key(sub), reason)

    async def end_provider_session(self, sid: str) -> int:
        """End the sessions made from one provider session (back-channel logout by ``sid``)."""
        return await self._end_indexed(provider_sid_key(sid), "backchannel_logout")

    async def _end_indexed(self, index: str, reason: str) -> int:
        keys = await self.store.user_sessions(index)
        for key in keys:
            self._cache.pop(key, None)
            self._changed(key)
            await self.store.delete(key, index)
        metrics.SESSIONS_DELETED.labels(reason=reason).inc(len(keys))
        return len(keys)
