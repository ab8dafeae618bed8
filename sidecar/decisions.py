"""The per-process cache of ``/oauth2/auth`` answers: a hot session's 202 at memory speed.

For one session the decision reads only a few inputs: the Cookie header, the auth-url's raw query,
whether the socket peer is a trusted front, and the headers a front sets about the original request
(``X-Original-*``, ``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``, ``Host``, the real-client-IP header).
The key is every one of them, raw, so whichever of those headers a front's table tells the decision to
believe, two requests with one key get one answer. The value is the whole 202: its header block (status
line and framing are added per request) and the header multidict for aiohttp.

An entry is used only while all of these hold, and is dropped as soon as one fails:

- this process's session cache still holds the very ``Session`` object the answer was made from
  (a sign-out, refresh, session end or cache refill in this process replaces or drops it), so an
  entry never outlives the session-cache period; a sign-out on another replica is seen here at most
  ``--session-cache-ttl`` later, exactly as for the session cache;
- it is before the moment the access token is due for refresh, the session reaches its lifetime or
  idle limit, the cookie's signature expires, or the session's ``auth_time`` becomes too old for the
  step-up ``max_age`` (auth-url or ``--fresh-auth-route``) that the answer was checked against.

Only 202s are kept. Nothing is kept for a request without the session cookie, with it twice, with two
Cookie headers, or with ``Authorization`` (a bearer token decides then, not the cookie). The table is
bounded in entries and in bytes; the oldest go first, and expired ones are swept as new ones come in.
A key is kept only the second time it is seen (a set of recent key hashes remembers the first): a
stream of one-off keys (a new URI per request) then costs a hash, not an entry, and pushes nothing out.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from multidict import CIMultiDict

from . import metrics
from .config import Config
from .cookies import SessionRef
from .fronts import FAMILY
from .models import Session
from .sessions import Sessions

MAX_ENTRIES = 10_000
MAX_BYTES = 16 * 1024 * 1024
_ENTRY_OVERHEAD = 400  # the entry object, its table and index slots, roughly
_ITEM_OVERHEAD = 40  # a multidict item beside its strings (its entry, the name's hash)
_KEY_PREFIXES = ("x-forwarded-", "x-original-")
# Every header some front's table reads about the original request (fronts.FAMILY: method overrides,
# X-Host, X-Rewrite-URL, X-Envoy-Original-Path, Front-End-Https...) is part of the key, whichever front is
# configured, so no input the decision may read is left out.
_KEY_NAMES = frozenset({"host", "forwarded", "x-real-ip", *(name.lower() for name in FAMILY)})

Key = tuple[str, ...]


@dataclass(slots=True)
class Decision:
    """One cached 202."""

    headers: CIMultiDict[str]  # for aiohttp (the main listener); never changed (aiohttp copies it)
    block: bytes | None  # "Name: value\r\n" for each header, for the lean listener (built at its first hit)
    deadline: float  # time.monotonic()
    store_key: str
    ref: SessionRef
    session: Session
    forwarded_ip: str | None  # the client a trusted front names (the access line), None: the peer itself
    size: int

    def header_block(self) -> bytes:
        if self.block is None:
            text = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
            self.block = text.encode("utf-8", "surrogateescape")
        return self.block


def header_lists(headers: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """A multidict's header names and values as sent, in order, for ``request_key``. multidict 7 lists a repeated
    name once in ``keys()`` but every value in ``values()``: the names then come from ``items()``, so that two
    Cookie lines are seen as two (not cached) and every value stays beside its own name."""
    names = list(headers.keys())
    values = list(headers.values())
    if len(names) != len(values):
        names = [name for name, _ in headers.items()]
    return names, values


def request_key(
    method: str, names: Iterable[str], values: Sequence[str], raw_query: str, trusted: bool, config: Config
) -> Key | None:
    """The cache key of an auth request: its method (a front may ask with the original one), its headers
    (``names`` and ``values`` as sent, in order), the raw query; None when it may not be cached. ``trusted``:
    the socket peer is a trusted front (it decides whether tokens are answered). Laid out as (Cookie header,
    query, trust, method, name, name..., value, value...), the other names the decision may read lower-case
    (``key_names``).

    Every miss pays this. A front sends the same header names in the same order on every request, so what
    the names say (``_Plan``: where the Cookie header is, which headers the decision may read, or that the
    request is not cacheable) is worked out once per sequence of names and looked up by it after that: a
    tuple, a hash and a dict probe, then the values picked in C, where a Python loop over the headers cost
    three times as much."""
    if _current[0] is not config:
        _current[:] = _settings(config)
    _, plans, cookie_prefix = _current
    seen = tuple(names)
    plan = plans.get(seen)
    if plan is None:
        plan = plans.make(seen)
    if plan is _NOT_CACHED:
        return None  # no Cookie header, or two (which one a reader believes is not ours to guess); Authorization...
    cookie = values[plan.cookie]
    if cookie.count(cookie_prefix) != 1:
        return None  # no session cookie, or it twice (or a look-alike name: not worth the doubt)
    return (cookie, raw_query, "t" if trusted else "u", method, *plan.kinds, *plan.pick(values))


def key_names(key: Key) -> Key:
    """The lower-case names of the headers in a ``request_key`` key but the Cookie header."""
    return key[4 : 4 + (len(key) - 4) // 2]


def key_trusted(key: Key) -> bool:
    """Whether a ``request_key`` key was made for a trusted front's request."""
    return key[2] == "t"


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one sequence of header names means to the key: the Cookie header's index, the lower-case names
    of the headers the decision may read (in order) and how to pick their values."""

    cookie: int
    kinds: tuple[str, ...]
    pick: Callable[[Sequence[str]], tuple[str, ...]]


_NOT_CACHED = _Plan(-1, (), lambda values: ())


def _picker(indexes: list[int]) -> Callable[[Sequence[str]], tuple[str, ...]]:
    """The values at ``indexes``, always as a tuple (``itemgetter`` of one index returns the value itself)."""
    if len(indexes) > 1:
        return itemgetter(*indexes)
    if indexes:
        at = indexes[0]
        return lambda values: (values[at],)
    return lambda values: ()


class _Plans(dict[tuple[str, ...], _Plan]):
    """Sequence of header names as sent -> its ``_Plan``, for one --real-client-ip-header. Bounded: at most
    ``_MAX_PLANS`` sequences, of at most ``_MAX_PLAN_CHARS`` characters of names each; past that (a client
    inventing names or orders) a plan is worked out per request and not kept, which is only slower."""

    def __init__(self, client_ip_header: str) -> None:
        super().__init__()
        self.client_ip_header = client_ip_header
        self.kinds: dict[str, str] = {}  # name as sent -> _name_kind(), at most _MAX_NAMES of _MAX_NAME_CHARS
        self.kind_tuples: dict[tuple[str, ...], tuple[str, ...]] = {}  # one object per kinds tuple

    def make(self, names: tuple[str, ...]) -> _Plan:
        kinds = [self._kind(name) for name in names]
        if kinds.count(_COOKIE) != 1 or _REFUSED in kinds:
            plan = _NOT_CACHED
        else:
            picked = [i for i, kind in enumerate(kinds) if kind and kind is not _COOKIE]
            read = tuple(kinds[i] for i in picked)
            read = self.kind_tuples.setdefault(read, read) if len(self.kind_tuples) < _MAX_PLANS else read
            plan = _Plan(kinds.index(_COOKIE), read, _picker(picked))
        if len(self) < _MAX_PLANS and sum(map(len, names)) <= _MAX_PLAN_CHARS:
            self[names] = plan
        return plan

    def _kind(self, name: str) -> str:
        kind = self.kinds.get(name)
        if kind is None:
            kind = _name_kind(name, self.client_ip_header)
            if len(self.kinds) < _MAX_NAMES and len(name) <= _MAX_NAME_CHARS:
                self.kinds[name] = kind
        return kind


def _settings(config: Config) -> list[Any]:
    """What ``request_key`` reads from ``config``, worked out once per config object: the config itself, the
    plans for its --real-client-ip-header, and "<cookie name>=" to count."""
    client_ip_header = config.real_client_ip_header.lower()
    plans = _tables.get(client_ip_header)
    if plans is None:
        plans = _tables[client_ip_header] = _Plans(client_ip_header)
    return [config, plans, config.cookie_name + "="]


_COOKIE = "\0cookie"
_REFUSED = "\0refused"
_MAX_NAMES = 2048  # header names whose kind is remembered, per --real-client-ip-header
_MAX_NAME_CHARS = 64  # a longer name's kind is worked out each time (2,048 names of 7,000 characters held ~29 MB)
_MAX_PLANS = 1024  # sequences of header names remembered, per --real-client-ip-header
_MAX_PLAN_CHARS = 2048  # longer sequences of names are never remembered (fronts send 250-700; ~6 MB at the bound)
_tables: dict[str, _Plans] = {}  # --real-client-ip-header -> its plans
_current: list[Any] = [None]  # _settings() of the config last used
_NAME_CHARS = re.compile(r"[A-Za-z0-9-]+")


def _name_kind(name: str, client_ip_header: str) -> str:
    """What a header name is to the key: its lower-case form (a name the decision may read), "" (one it never
    reads), ``_COOKIE``, or ``_REFUSED`` (Authorization, or a name with anything but A-Z, a-z, 0-9 and "-":
    X_Forwarded_Uri, X.Auth.Request.User, a Kelvin sign for a K; the full decision refuses those spellings,
    ``fronts.refuse_aliases``, so a request carrying one is never answered from the table)."""
    if not _NAME_CHARS.fullmatch(name):
        return _REFUSED
    lower = name.lower()
    if lower == "cookie":
        return _COOKIE
    if lower == "authorization":
        return _REFUSED
    if lower.startswith(_KEY_PREFIXES) or lower in _KEY_NAMES or lower == client_ip_header:
        return sys.intern(lower)
    return ""


def entry_size(key: Key, headers: CIMultiDict[str]) -> int:
    """What an entry really holds, in bytes: every string as an object (a header name of 15 characters is
    some 60 bytes; an astral character 4, an undecodable byte 2), the key's tuple, the multidict's items and
    the lean listener's block (UTF-8). Counting characters let hostile keys (many tiny headers, astral
    characters) hold several times ``max_bytes``."""
    size = _ENTRY_OVERHEAD + sys.getsizeof(key) + sum(map(sys.getsizeof, key))
    for name, value in headers.items():
        text = len(name) + len(value) if value.isascii() else len(name) + len(value.encode("utf-8", "surrogateescape"))
        size += _ITEM_OVERHEAD + 2 * sys.getsizeof(name) + sys.getsizeof(value) + text + 4
    return size


class DecisionCache:
    """Cached 202s by request key; see the module docstring for when an entry is used."""

    def __init__(
        self, sessions: Sessions, config: Config, *, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES
    ) -> None:
        self._sessions = sessions
        self._config = config
        self._ttl = float(config.session_cache_ttl)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, Decision] = OrderedDict()  # oldest first, popped in O(1)
        self._keys_of: dict[str, dict[Key, None]] = {}  # store key -> its entries' keys (an ordered set)
        self._seen: set[int] = set()  # hashes of keys seen once: the admission check
        self.bytes = 0
        sessions.on_change.append(self.drop_session)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> Decision | None:
        """The entry for ``key`` if it may still answer; a stale one is dropped."""
        entry = self._entries.get(key)
        if entry is None:
            metrics.DECISION_CACHE.add("miss")
            return None
        if time.monotonic() < entry.deadline and self._sessions.is_cached(entry.store_key, entry.session):
            metrics.DECISION_CACHE.add("hit")
            return entry
        self._drop(key)
        metrics.DECISION_CACHE.add("miss")
        return None

    def admit(self, key: Key) -> bool:
        """Whether an answer for ``key`` should be kept: the second time the key is seen, not the first."""
        seen = hash(key)
        if seen in self._seen:
            return True
        if len(self._seen) >= 4 * self.max_entries:
            self._seen.clear()
        self._seen.add(seen)
        return False

    def put(
        self,
        key: Key,
        headers: CIMultiDict[str],
        ref: SessionRef,
        session: Session,
        *,
        max_age: int | None,
        cookie_until: float | None,
        forwarded_ip: str | None,
    ) -> None:
        """Keep a 202 made from ``session`` (the object the session cache holds) for ``key``. ``max_age``: the
        step-up age the answer was checked against; ``cookie_until``: when the cookie's signature expires."""
        mono, now = time.monotonic(), time.time()
        cached_until = self._sessions.cache_deadline(ref.store_key, session)
        if cached_until is None:
            return  # not the session cache's copy (a bearer token, a refresh that failed over): never kept
        until = self._valid_until(session, now, max_age, cookie_until)
        if until <= now:
            return
        deadline = min(cached_until, mono + (until - now))
        size = entry_size(key, headers)
        if size > self.max_bytes // 4:
            return  # one answer may not crowd out the rest
        self._drop(key)
        self._sweep(mono)
        entry = Decision(headers, None, deadline, ref.store_key, ref, session, forwarded_ip, size)
        self._entries[key] = entry
        self._keys_of.setdefault(ref.store_key, {})[key] = None
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _valid_until(self, session: Session, now: float, max_age: int | None, cookie_until: float | None) -> float:
        """Wall-clock time until which nothing but a store change could alter this answer."""
        config = self._config
        limits = [now + self._ttl]
        tokens = session.tokens
        if tokens.access_expires_at is not None:
            # Session.needs_refresh turns true at expires - early: the decision must run again then
            early = min(float(config.refresh_skew), max(0.0, tokens.access_expires_at - tokens.issued_at) / 2)
            limits.append(tokens.access_expires_at - early)
        if config.cookie_refresh:
            limits.append(tokens.issued_at + float(config.cookie_refresh))
        if config.cookie_expire:
            limits.append(session.created_at + float(config.cookie_expire))
        if config.session_idle_timeout:
            limits.append((session.last_active or session.created_at) + float(config.session_idle_timeout))
        if cookie_until is not None:
            limits.append(cookie_until)
        if max_age is not None:
            # stepup.is_stale compares whole seconds: stale from floor(auth_time) + max_age + 1 on
            limits.append(math.floor(session.auth_time) + max_age + 1)
        return min(limits)

    def _sweep(self, mono: float) -> None:
        """Drop a few expired entries from the old end, so the table follows the sessions in use."""
        for _ in range(2):
            if not self._entries:
                return
            oldest, entry = next(iter(self._entries.items()))
            if entry.deadline > mono:
                return
            self._drop(oldest)

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.bytes -= entry.size
        keys = self._keys_of.get(entry.store_key)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._keys_of[entry.store_key]

    def drop_session(self, store_key: str) -> None:
        """A session ended or was rewritten (sign-out, refresh, expiry) in this process: its answers go now."""
        for key in list(self._keys_of.get(store_key, ())):
            self._drop(key)


STATUS_202 = {(1, 1): b"HTTP/1.1 202 Accepted\r\n", (1, 0): b"HTTP/1.0 202 Accepted\r\n"}
