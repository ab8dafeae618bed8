"""Step-up by authentication age: some routes need a recent interactive sign-in, not a refreshed token.

A session keeps the ``auth_time`` of its last interactive sign-in (from the ID token; the
callback time when the token has none). A refresh never moves it, so a long-lived session that
lives on refresh tokens grows "old" while its access token stays new. On a route that asks for a
fresh sign-in (``--fresh-auth-route DURATION=REGEX``, or ``/oauth2/auth?max_age=N`` per
location) an older session is not ended: browsers are sent to sign in again with ``max_age``
(OIDC Core 3.1.2.1), so the provider re-authenticates, and other clients get the RFC 9470
challenge. After such a sign-in the ID token must prove it (OIDC Core 3.1.3.7): an ``auth_time``
no older than asked, or the callback refuses with a page rather than sending the browser around
again.

Everything here is pure and takes ``now``: the rules are testable without sleeping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web

from .errors import ConfigError
from .rules import Route, parse_route

# How much older than asked an ``auth_time`` may be at the callback: the provider's clock and
# ours differ a little, and the browser takes a moment from the provider's login to our callback.
CALLBACK_LEEWAY = 5.0
MAX_AGE_LIMIT = 10 * 366 * 86400  # a max_age beyond ten years is a mistake, not a policy
_MAX_DIGITS = 10


@dataclass(frozen=True)
class FreshRoute:
    """``--fresh-auth-route DURATION=[METHOD=|METHOD!=]REGEX``: on matching requests the session's last
    interactive sign-in must be at most ``max_age`` whole seconds old."""

    max_age: int
    route: Route

    def matches(self, method: str, path: str) -> bool:
        return self.route.matches(method, path)


def parse_fresh_route(text: str, option: str, parse_duration: Callable[[str], float]) -> FreshRoute:
    """``5m=^/admin/`` or ``300=POST=^/settings/password``. The regex part is a route rule exactly
    like ``--skip-auth-route`` (never split); the duration is rounded up to whole seconds, at least 1:
    ``max_age=0`` would ask for a sign-in newer than the request itself, a loop."""
    duration_text, sep, route_text = text.partition("=")
    if not sep or not duration_text.strip():
        raise ConfigError(f"--{option}: expected DURATION=REGEX (e.g. 5m=^/admin/), got {text!r}")
    try:
        seconds = parse_duration(duration_text)
    except ValueError as exc:
        raise ConfigError(f"--{option}: {exc} in {text!r}") from None
    if not math.isfinite(seconds) or seconds < 1 or seconds > MAX_AGE_LIMIT:
        raise ConfigError(f"--{option}: the duration must be between 1s and ten years, got {duration_text!r}")
    return FreshRoute(max_age=math.ceil(seconds), route=parse_route(route_text, option))


def required_max_age(rules: Iterable[FreshRoute], method: str, path: str) -> int | None:
    """The strictest ``max_age`` of the rules matching this request (a normalised path), or None. A HEAD is
    also judged as the GET it is (applications answer it with their GET handler, headers and side effects
    alike), so a ``GET=`` rule is not passed by asking for the same page with HEAD; and the path in every
    spelling an application may take for it (``_aliases``)."""
    methods = (method, "GET") if method == "HEAD" else (method,)
    paths = _aliases(path)
    ages = [rule.max_age for rule in rules if any(rule.matches(m, p) for m in methods for p in paths)]
    return min(ages) if ages else None


def _aliases(path: str) -> tuple[str, ...]:
    """The spellings of ``path`` an application may serve as the same page: many route without regard to case
    (Express, ASP.NET, IIS) or to a trailing slash (Express, Starlette's redirect_slashes). A step-up rule is
    only ever made stricter by them, so ``^/admin/x$`` also holds for ``/Admin/X`` and ``/admin/x/``."""
    found = {path, path.lower()}
    for item in tuple(found):
        found.add(item[:-1] if item.endswith("/") and len(item) > 1 else item + "/")
    return tuple(found)


def parse_max_age(value: str) -> int | None:
    """A ``max_age`` query value: a non-negative integer of plain ASCII digits, else None (refused)."""
    if not value or len(value) > _MAX_DIGITS or not value.isascii() or not value.isdigit():
        return None
    number = int(value)
    return number if number <= MAX_AGE_LIMIT else None


def is_stale(auth_time: float, max_age: float, now: float) -> bool:
    """True when the last interactive sign-in is more than ``max_age`` whole seconds ago.

    ``auth_time`` is whole seconds (OIDC Core), so both sides are compared as whole seconds: a
    sign-in at 100.9 reported as 100 is not stale at 101.05 under a 1 s rule."""
    return math.floor(now) - math.floor(auth_time) > max_age


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def session_fields(claims: Mapping[str, Any], now: float) -> dict[str, Any]:
    """``auth_time``, ``acr`` and ``amr`` for a new session, from validated ID token claims.

    An ``auth_time`` that is absent or not a number is replaced by ``now`` (the callback time);
    one in the future (another clock) is clamped to ``now``, so a session never looks fresher than
    its sign-in."""
    auth_time = _number(claims.get("auth_time"))
    acr = claims.get("acr")
    amr = claims.get("amr")
    return {
        "auth_time": now if auth_time is None else min(auth_time, now),
        "acr": acr if isinstance(acr, str) and 0 < len(acr) <= 256 else None,
        "amr": tuple(m for m in amr if isinstance(m, str) and 0 < len(m) <= 64)[:16] if isinstance(amr, list) else (),
    }


def callback_problem(claims: Mapping[str, Any], max_age: int, now: float) -> str | None:
    """Why an ID token does not answer a sign-in that asked for ``max_age`` (OIDC Core 3.1.3.7), or None.

    The token must carry a numeric ``auth_time`` at most ``max_age`` (plus ``CALLBACK_LEEWAY``)
    seconds old: a provider that ignored ``max_age`` and answered from its old session fails here."""
    auth_time = _number(claims.get("auth_time"))
    if auth_time is None:
        return "the identity provider did not say when you signed in (no auth_time)"
    if now - auth_time > max_age + CALLBACK_LEEWAY:
        return "the identity provider did not ask you to sign in again"
    return None


def challenge(max_age: int) -> str:
    """The RFC 9470 section 3 ``WWW-Authenticate`` value."""
    return (
        'Bearer error="insufficient_user_authentication", '
        f'error_description="A more recent authentication is required", max_age={max_age}'
    )


def unauthorized(max_age: int) -> web.Response:
    """401 for a client that must sign in again more recently. The session is not ended: no cookie is cleared."""
    return web.Response(
        status=401,
        headers={"WWW-Authenticate": challenge(max_age), "Cache-Control": "no-store"},
        text="401 Unauthorized: a more recent sign-in is required for this page\n",
    )


def start_url(prefix: str, max_age: int, rd: str) -> str:
    """Where a browser goes to sign in again: ``<prefix>/start`` with ``max_age`` and the page to return to."""
    return f"{prefix}/start?max_age={max_age}&rd={quote(rd, safe='')}"
