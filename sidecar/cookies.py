"""Sign and read the session cookie and the per-attempt sign-in (CSRF) cookies.

The session cookie carries only a random session id and the key that opens the
session's record, signed with itsdangerous (HMAC-SHA256). Several secrets may
be configured: the first signs, all verify, so secrets can be rotated.

A sign-in attempt cookie carries the whole pending sign-in (PKCE verifier,
nonce, where to return), AES-GCM encrypted under a key derived from the cookie
secret and bound to its ``state``, then signed and timestamped. Nothing is
stored server-side until the callback, so anonymous ``/oauth2/start`` floods
cost no store memory.

Replicas' clocks differ a little: a cookie signed "in the future" by up to
``CLOCK_LEEWAY`` seconds is accepted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from itsdangerous import BadData, URLSafeTimedSerializer

from . import crypto
from .errors import InvalidCookie, InvalidState

SID_BYTES = 32  # 256-bit session ids
MAX_COOKIE_CHARS = 4096
# What a Cookie header trims around names and values: SP and HTAB (RFC 6265 5.2, as browsers), never str.strip()'s
# other Unicode spaces: Chromium keeps "\u00a0_sidecar" a cookie of its own, which must not read as "_sidecar".
WSP = " \t"
CLOCK_LEEWAY = 60.0  # seconds a cookie may appear signed in the future (another replica's clock)
_CACHE_LIMIT = 10_000


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _attempt_key(secret: bytes) -> bytes:
    """A key only for sign-in attempt cookies, derived so it never equals the signing secret."""
    return HKDF(algorithm=hashes.SHA256(), length=crypto.KEY_BYTES, salt=None, info=b"sidecar sign-in attempt").derive(
        secret
    )


def _check_age(signed_at: float, now: float, max_age: float) -> bool:
    """Fresh enough, and not signed further in the future than a replica's clock may be ahead."""
    age = now - signed_at
    return -CLOCK_LEEWAY <= age <= max_age


@dataclass(frozen=True)
class SignInAttempt:
    """One pending sign-in, carried by its own cookie until the callback."""

    state: str
    verifier: str
    nonce: str
    rd: str
    redirect_uri: str = ""  # sent in the authorize request, so the code exchange sends the very same; "" = configured
    max_age: int | None = None  # asked of the provider: the ID token must then prove a sign-in this recent
    # "" for a browser sign-in; "kind:id" hands the tokens to ``Services.sign_in_finishers[kind]`` instead
    # (``sidecar.oauth``: the upstream tokens of a CLI/MCP grant), and no browser session is made.
    purpose: str = ""

    def __repr__(self) -> str:  # the verifier and nonce are secrets of this attempt
        return (
            f"SignInAttempt(state=..., verifier=..., nonce=..., rd=..., redirect_uri=..., max_age={self.max_age}, "
            f"purpose={self.purpose.partition(':')[0]!r})"
        )


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
        self._attempt_keys = tuple(_attempt_key(secret) for secret in secrets)  # first encrypts, all decrypt
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
            payload, signed_at = self._session.loads(value, return_timestamp=True)
            sid, key_text = str(payload).split(".")
            key = _unb64(key_text)
        except (BadData, ValueError, TypeError) as exc:
            raise InvalidCookie("session cookie failed verification") from exc
        if not _check_age(signed_at.timestamp(), now, self._max_age):
            raise InvalidCookie("session cookie expired or signed too far in the future")
        if len(key) != crypto.KEY_BYTES or len(sid) < 43:
            raise InvalidCookie("session cookie has the wrong shape")
        ref = SessionRef(sid=sid, key=key)
        if len(self._verified) >= _CACHE_LIMIT:
            self._verified.pop(next(iter(self._verified)))  # the oldest entry
        self._verified[value] = (ref, signed_at.timestamp())
        return ref

    def forget(self, value: str) -> None:
        self._verified.pop(value, None)

    def session_valid_until(self, value: str) -> float | None:
        """When a session cookie verified here stops being accepted (its signature's age limit); None when
        it is not one this codec has verified."""
        hit = self._verified.get(value)
        return None if hit is None else hit[1] + self._max_age

    def dump_attempt(self, attempt: SignInAttempt) -> str:
        """Encrypt (bound to the state) and sign a pending sign-in for its cookie."""
        fields: list[str | int | None] = [attempt.verifier, attempt.nonce, attempt.rd, attempt.redirect_uri]
        if attempt.max_age is not None or attempt.purpose:
            fields.append(attempt.max_age)
        if attempt.purpose:
            fields.append(attempt.purpose)
        plain = json.dumps(fields, separators=(",", ":")).encode()
        sealed = crypto.encrypt(self._attempt_keys[0], plain, _attempt_context(attempt.state))
        return self._state.dumps(_b64(sealed))

    def attempt_signed_at(self, value: str) -> float | None:
        """When an attempt cookie was made, if it is ours; used to keep only the newest few."""
        if len(value) > MAX_COOKIE_CHARS:
            return None
        try:
            _, signed_at = self._state.loads(value, return_timestamp=True)
        except BadData:
            return None
        return float(signed_at.timestamp())

    def load_attempt(self, value: str | None, state: str, now: float, max_age: float) -> SignInAttempt:
        """The pending sign-in for this state: the cookie must exist, be ours, be fresh and name this state."""
        if not value:
            raise InvalidState("no sign-in cookie for this state")
        if len(value) > MAX_COOKIE_CHARS:
            raise InvalidState("sign-in cookie too large")
        try:
            sealed_text, signed_at = self._state.loads(value, return_timestamp=True)
            sealed = _unb64(str(sealed_text))
        except (BadData, ValueError, TypeError) as exc:
            raise InvalidState("sign-in cookie failed verification") from exc
        if not _check_age(signed_at.timestamp(), now, max_age):
            raise InvalidState("sign-in cookie expired or signed too far in the future")
        return SignInAttempt(state, *self._open_attempt(sealed, state))

    def _open_attempt(self, sealed: bytes, state: str) -> tuple[str, str, str, str, int | None, str]:
        """Decrypt with each configured secret's key; the state is bound in, so another state's cookie fails."""
        for key in self._attempt_keys:
            try:
                fields = json.loads(crypto.decrypt(key, sealed, _attempt_context(state)))
            except (InvalidCookie, ValueError):
                continue
            if not isinstance(fields, list) or not 4 <= len(fields) <= 6:
                continue
            if not all(isinstance(f, str) for f in fields[:4]):
                continue
            max_age = fields[4] if len(fields) >= 5 else None
            purpose = fields[5] if len(fields) == 6 else ""
            age_ok = max_age is None or (isinstance(max_age, int) and not isinstance(max_age, bool) and max_age >= 0)
            if age_ok and isinstance(purpose, str):
                return fields[0], fields[1], fields[2], fields[3], max_age, purpose
        raise InvalidState("state does not match its sign-in cookie")


def _attempt_context(state: str) -> bytes:
    return b"sidecar.attempt|" + state.encode()


def without_sidecar_cookies(header: str, cookie_name: str) -> str:
    """A ``Cookie`` header without the session cookie and every ``<name>_*`` cookie of the sidecar
    (sign-in attempts), the app's own cookies kept as they were: the session cookie is a complete
    credential. The same rule as the shipped nginx config."""
    kept = []
    own = cookie_name + "_"
    for part in header.split(";"):
        name = part.split("=", 1)[0].strip(WSP)
        if name == cookie_name or name.startswith(own):
            continue
        kept.append(part.strip(WSP))
    return "; ".join(p for p in kept if p)


def state_cookie_suffix(state: str) -> str:
    """Each sign-in attempt has its own CSRF cookie name, so parallel tabs do not clash."""
    return hashlib.sha256(state.encode()).hexdigest()[:16]


def cookie_domain_for(domains: tuple[str, ...], host: str) -> str | None:
    """The Domain attribute for a request to ``host``: the first (longest) configured domain the host
    falls under, at a label boundary (``app.example.com`` is under ``example.com``, ``badexample.com``
    is not); None when none fits, which makes a host-only cookie a browser would accept."""
    name = host.strip().lower()
    if name.startswith("["):
        return None  # an IPv6 literal is under no domain
    name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    name = name.rstrip(".")
    for domain in domains:
        if name == domain or name.endswith("." + domain):
            return domain
    return None
