"""Sessions, token sets and identities: plain values with expiry checks that take ``now``.

Nothing here does I/O or reads the clock, so every expiry rule is testable
without sleeping.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Identity:
    """Who the user is, as forwarded to the app."""

    sub: str
    user: str
    email: str = ""
    groups: tuple[str, ...] = ()
    preferred_username: str = ""


@dataclass(frozen=True)
class TokenSet:
    """What the provider's token endpoint gave us. ``None`` expiry means "not told"."""

    access_token: str
    refresh_token: str | None = None
    id_token: str | None = None
    access_expires_at: float | None = None
    refresh_expires_at: float | None = None
    issued_at: float = 0.0

    def merged_over(self, old: TokenSet) -> TokenSet:
        """This refresh result on top of the previous set. Each token the answer leaves out is kept
        on its own: a missing refresh token keeps the old one (with its expiry unless a new one is
        told), and a missing ID token keeps the old one even when the refresh token rotated, since
        sign-out still needs it as ``id_token_hint``."""
        merged = replace(self, id_token=self.id_token or old.id_token)
        if self.refresh_token:
            return merged
        return replace(
            merged,
            refresh_token=old.refresh_token,
            refresh_expires_at=self.refresh_expires_at or old.refresh_expires_at,
        )


@dataclass(frozen=True)
class Session:
    """One signed-in user's server-side record. The cookie only holds its id and key."""

    identity: Identity
    tokens: TokenSet
    created_at: float = 0.0
    signed_in_at: float = 0.0  # last interactive sign-in
    refreshed_at: float | None = None
    refresh_count: int = 0
    version: int = 0  # bumped by every store write; compare-and-set guards it
    last_active: float = 0.0  # kept by the store next to the record, not inside it
    provider_sid: str | None = None  # the ID token's ``sid``: every save keeps its back-channel index alive
    # The last interactive sign-in, from the ID token (the callback time when it has none); a refresh
    # never moves it. Step-up routes compare it with their max_age (see stepup.py).
    auth_time: float = 0.0
    acr: str | None = None
    amr: tuple[str, ...] = ()
    # Refused refreshes in a row, and no refresh is tried before ``retry_at`` (see refresh.py): kept in the
    # record so every replica backs off alike.
    refusals: int = 0
    retry_at: float | None = None
    # What is derived from this object and worth keeping while it is in use (the identity headers, the access
    # line's user part): memoised on the object, so it lives and dies with it. A process-wide table keyed by
    # ``id(session)`` kept every stale copy alive (a new object at each cache refill and refresh). Not a field
    # of the record: not compared, not stored, not copied by ``replace``.
    derived: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def needs_refresh(self, now: float, skew: float, max_age: float) -> bool:
        """True when the access token is expired, about to expire, or older than ``max_age``."""
        expires = self.tokens.access_expires_at
        if expires is not None:
            # A token that lives shorter than the skew would be refreshed on every request:
            # never refresh earlier than half-way through its life.
            early = min(skew, max(0.0, expires - self.tokens.issued_at) / 2)
            if now >= expires - early:
                return True
        return bool(max_age) and now - self.tokens.issued_at >= max_age

    def access_token_valid(self, now: float) -> bool:
        expires = self.tokens.access_expires_at
        return expires is None or now < expires

    def backing_off(self, now: float) -> bool:
        """A refresh was refused lately and may not be tried again yet."""
        return self.refusals > 0 and self.retry_at is not None and now < self.retry_at

    def can_refresh(self, now: float) -> bool:
        expires = self.tokens.refresh_expires_at
        return bool(self.tokens.refresh_token) and (expires is None or now < expires)

    def expired(self, now: float, max_lifetime: float, idle_timeout: float) -> bool:
        """Server-side session limits, independent of any store TTL."""
        if max_lifetime and now - self.created_at >= max_lifetime:
            return True
        return bool(idle_timeout) and now - (self.last_active or self.created_at) >= idle_timeout

    def to_bytes(self) -> bytes:
        """A compact positional encoding: every stored byte counts when Redis holds many sessions."""
        i, t = self.identity, self.tokens
        row = [
            5, i.sub, i.user, i.email, list(i.groups), i.preferred_username,
            _pack_token(t.access_token), t.refresh_token, _pack_token(t.id_token),
            _t(t.access_expires_at), _t(t.refresh_expires_at),
            _t(t.issued_at), _t(self.created_at), _t(self.signed_in_at), _t(self.refreshed_at), self.refresh_count,
            self.provider_sid, _t(self.auth_time), self.acr, list(self.amr),
        ]  # fmt: skip
        if self.refusals or self.retry_at is not None:
            # Only a record with refused refreshes needs format 6: others stay readable by replicas not yet
            # upgraded during a rolling update.
            row = [_FORMAT, *row[1:], self.refusals, _t(self.retry_at)]
        return json.dumps(row, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, version: int, last_active: float) -> Session:
        """Raises ValueError for anything that is not a record of this format."""
        try:
            row = json.loads(raw)
            if not isinstance(row, list) or row[0] not in _READABLE_FORMATS:
                raise ValueError("unknown session record format")
            if row[0] == 3:  # written before the provider sid was kept: it has none
                row = [*row, None]
            if row[0] in (3, 4):  # written before auth_time was kept: the sidecar's own sign-in time stands in
                row = [*row, row[13], None, []]
            if row[0] in (3, 4, 5):  # written before refused refreshes were counted: none were
                row = [*row, 0, None]
            (_, sub, user, email, groups, preferred, access, refresh, id_token, access_exp, refresh_exp,
             issued, created, signed_in, refreshed, count, provider_sid, auth_time, acr, amr,
             refusals, retry_at) = row  # fmt: skip
            return cls(
                identity=Identity(sub=sub, user=user, email=email, groups=tuple(groups), preferred_username=preferred),
                tokens=TokenSet(access_token=_unpack_token(access) or "", refresh_token=refresh,
                                id_token=_unpack_token(id_token), access_expires_at=_from_t(access_exp),
                                refresh_expires_at=_from_t(refresh_exp), issued_at=_from_t(issued) or 0.0),
                created_at=_from_t(created) or 0.0, signed_in_at=_from_t(signed_in) or 0.0,
                refreshed_at=_from_t(refreshed), refresh_count=count,
                version=version, last_active=last_active, provider_sid=provider_sid,
                auth_time=_from_t(auth_time) or 0.0, acr=acr, amr=tuple(amr),
                refusals=int(refusals), retry_at=_from_t(retry_at),
            )  # fmt: skip
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise ValueError("malformed session record") from exc


_FORMAT = 6  # bump when the positional layout changes
# 3 lacks the provider sid and what 4 lacks; 4 lacks auth_time, acr, amr and what 5 lacks; 5 lacks the refusals
_READABLE_FORMATS = (3, 4, 5, 6)


def _b64decode(part: str) -> str | None:
    try:
        text = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return text if _b64encode(text) == part else None  # only what re-encodes to the very same text


def _b64encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _pack_token(token: str | None) -> str | list[str] | None:
    """A JWT's header and payload stored as the JSON text they encode: it compresses about 70
    bytes better than its base64 form. Anything that would not round-trip exactly stays as it is."""
    if token is None or token.count(".") != 2:
        return token
    header, payload, signature = token.split(".")
    plain_header, plain_payload = _b64decode(header), _b64decode(payload)
    if plain_header is None or plain_payload is None:
        return token
    return [plain_header, plain_payload, signature]


def _unpack_token(value: str | list[str] | None) -> str | None:
    if isinstance(value, list):
        header, payload, signature = value
        return f"{_b64encode(header)}.{_b64encode(payload)}.{signature}"
    return value


def _t(value: float | None) -> int | None:
    """Times in tenths of a second: precise enough for expiry, and every digit costs Redis memory."""
    return None if value is None else round(value * 10)


def _from_t(value: int | None) -> float | None:
    return None if value is None else value / 10
