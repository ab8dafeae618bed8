"""Reading the token endpoint's answers: a token response (RFC 6749 5.1) into a ``TokenSet``, the body of any
answer as a JSON object or nothing, and a ``Retry-After`` (RFC 9110 10.2.3). Pure functions: ``oidc`` does the
talking and decides what a failure means.

Providers differ in what they send: ``expires_in`` absent, zero, a string of digits ("3599", Entra ID) or absurd;
``refresh_expires_in`` (Keycloak; 0 for offline tokens); ``token_type`` "bearer" in lower case or left out. Odd
lifetimes are read as unknown and huge ones capped; anything that breaks the protocol is ProviderProtocolError.
"""

from __future__ import annotations

import email.utils
import json
import math
from typing import Any

import jwt

from .errors import ProviderProtocolError
from .models import TokenSet

MAX_LIFETIME = 365 * 86400.0  # a token lifetime the provider states is capped to this
RETRY_AFTER_MAX = 60  # a token endpoint's Retry-After is honoured up to this many seconds


def _jwt_exp(token: str) -> float | None:
    """The ``exp`` of an access token that happens to be a JWT (read, not trusted, for timing only)."""
    if token.count(".") != 2:
        return None
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return number(exp)


def number(value: Any) -> float | None:
    """A finite number from a JSON value (numbers, or digits in a string), else None. Booleans are not numbers."""
    if isinstance(value, str):
        # Some providers send digits as a string; anything longer than 15 digits is not a lifetime.
        value = int(value) if value.isascii() and value.isdigit() and len(value) <= 15 else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        return math.inf
    return number if not math.isnan(number) else None


def _lifetime(value: Any) -> float | None:
    """A stated lifetime in seconds: positive, finite after capping to ``MAX_LIFETIME``; None when absent,
    zero ("not told", Keycloak's offline tokens), negative or not a number."""
    seconds = number(value)
    if seconds is None or seconds <= 0:
        return None
    return min(seconds, MAX_LIFETIME)


def _optional_token(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ProviderProtocolError(f"token response {name} is not a string")
    return value


def token_set_from_response(body: dict[str, Any], now: float) -> TokenSet:
    """Read a token response (RFC 6749 5.1). Anything that breaks the protocol is ProviderProtocolError
    (502); odd lifetimes are read as unknown, huge ones capped. A missing ``expires_in`` stays unknown
    unless the access token is a JWT with an ``exp``."""
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise ProviderProtocolError("token response without access_token")
    token_type = body.get("token_type")
    if token_type is not None and (not isinstance(token_type, str) or token_type.lower() != "bearer"):
        raise ProviderProtocolError("token response token_type is not Bearer")
    access_in = _lifetime(body.get("expires_in"))
    if access_in is None:
        exp = _jwt_exp(access)
        access_expires = None if exp is None else min(exp, now + MAX_LIFETIME)
    else:
        access_expires = now + access_in
    refresh_in = _lifetime(body.get("refresh_expires_in"))
    return TokenSet(
        access_token=access,
        refresh_token=_optional_token(body, "refresh_token"),
        id_token=_optional_token(body, "id_token"),
        access_expires_at=access_expires,
        refresh_expires_at=None if refresh_in is None else now + refresh_in,
        issued_at=now,
    )


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header (RFC 9110 10.2.3: delta-seconds or an HTTP-date) as seconds from ``now``, at most
    ``RETRY_AFTER_MAX``; None when absent, unreadable or already past (then nothing is waited for)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value) if len(value) <= 10 else math.inf
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, OverflowError):
            return None
    return min(seconds, float(RETRY_AFTER_MAX)) if seconds > 0 else None


def json_object(text: str) -> dict[str, Any] | None:
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # ValueError: also integers too long to convert
        return None
    return body if isinstance(body, dict) else None
