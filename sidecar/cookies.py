"""Sign and read the session cookie and the per-attempt sign-in (CSRF) cookies.

The session cookie carries only a random session id and the key that opens the
session's record, signed with itsdangerous (HMAC-SHA256). Several secrets may
be configured: the first signs, all verify, so secrets can be rotated.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from functools import cached_property

from itsdangerous import BadData, URLSafeTimedSerializer

from . import crypto
from .errors import InvalidCookie, InvalidState

SID_BYTES = 32  # 256-bit session ids
MAX_COOKIE_CHARS = 4096
_CACHE_LIMIT = 10_000


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class SessionRef:
    """What the cookie proves: which record, and the key that opens it."""

    sid: str
    key: bytes

    @cached_property
    def store_key(self) -> str:
        """Where the record lives; a hash, so a Redis dump does not reveal live session ids."""
        return _b64(hashlib.sha256(self.sid.encode()).digest()[:15])  # 120 bits: ample for a lookup key

    @classmethod
    def new(cls) -> SessionRef:
        return cls(sid=_b64(os.urandom(SID_BYTES)), key=crypto.new_key())


class CookieCodec:
    """Signs and verifies cookie values; verified session cookies are memoised per process."""

    def __init__(self, secrets: tuple[bytes, ...], max_age: float) -> None:
        # itsdangerous signs with the last secret and verifies with all of them.
        keys = list(reversed(secrets))
        self._session = URLSafeTimedSerializer(
            keys, salt="sidecar.session", signer_kwargs={"digest_method": hashlib.sha256}
        )
        self._state = URLSafeTimedSerializer(
            keys, salt="sidecar.state", signer_kwargs={"digest_method": hashlib.sha256}
        )
        self._max_age = max_age
        self._verified: dict[str, tuple[SessionRef, float]] = {}

    def dump_session(self, ref: SessionRef) -> str:
        return self._session.dumps(f"{ref.sid}.{_b64(ref.key)}")

    def load_session(self, value: str, now: float) -> SessionRef:
        """Verify a session cookie; raises InvalidCookie for anything forged or malformed."""
        hit = self._verified.get(value)
        if hit is not None and now - hit[1] < self._max_age:
            return hit[0]
        if len(value) > MAX_COOKIE_CHARS:
            raise InvalidCookie("session cookie too large")
        try:
            payload, signed_at = self._session.loads(value, max_age=int(self._max_age), return_timestamp=True)
            sid, key_text = str(payload).split(".")
            key = _unb64(key_text)
        except (BadData, ValueError, TypeError) as exc:
            raise InvalidCookie("session cookie failed verification") from exc
        if len(key) != crypto.KEY_BYTES or len(sid) < 43:
            raise InvalidCookie("session cookie has the wrong shape")
        ref = SessionRef(sid=sid, key=key)
        if len(self._verified) >= _CACHE_LIMIT:
            self._verified.pop(next(iter(self._verified)))  # the oldest entry
        self._verified[value] = (ref, signed_at.timestamp())
        return ref

    def forget(self, value: str) -> None:
        self._verified.pop(value, None)

    def dump_state(self, state: str) -> str:
        return self._state.dumps(state)

    def check_state(self, value: str | None, state: str, max_age: float) -> None:
        """The CSRF cookie for this attempt must exist, be ours, be fresh and name this state."""
        if not value:
            raise InvalidState("no sign-in cookie for this state")
        try:
            signed = self._state.loads(value, max_age=int(max_age))
        except BadData as exc:
            raise InvalidState("sign-in cookie failed verification") from exc
        if not hmac.compare_digest(str(signed), state):
            raise InvalidState("state does not match its sign-in cookie")


def state_cookie_suffix(state: str) -> str:
    """Each sign-in attempt has its own CSRF cookie name, so parallel tabs do not clash."""
    return hashlib.sha256(state.encode()).hexdigest()[:16]
