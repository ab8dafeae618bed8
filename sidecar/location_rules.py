"""Per-location rules on ``/oauth2/auth``: oauth2-proxy's ``allowed_groups``, ``allowed_emails`` and
``allowed_email_domains`` query parameters, and ``max_age`` (a sign-in at most that many seconds old).

One shared sidecar behind ingress-nginx restricts each app through its ``auth-url``
(``.../oauth2/auth?allowed_groups=admins``). They narrow the global rules, never widen them:
every parameter given must pass (any listed value passes it). A parameter the sidecar does not
know, or one given empty, is a misconfigured ``auth-url``: it is refused (403, logged as an
error naming it) rather than read as "no restriction".

``routed_host=$host`` (``fronts``) is not a rule: it ends the auth-url, and it and everything after it (nginx's
``$host``, which may hold ``&``) are left out here. Spelt any other way (percent-encoded, without ``=``) it is
a misconfigured auth-url like any other.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qsl

from .errors import ConfigError
from .fronts import ROUTED_HOST, split_routed
from .models import Identity
from .policy import email_domain
from .rules import DomainRule, parse_domain_rule
from .stepup import parse_max_age

PARAMETERS = ("allowed_groups", "allowed_emails", "allowed_email_domains", "max_age")
_LISTS = PARAMETERS[:3]
MAX_QUERY_CHARS = 4096


@dataclass(frozen=True)
class LocationRules:
    groups: frozenset[str] | None = None
    emails: frozenset[str] | None = None  # lower-cased
    domains: tuple[DomainRule, ...] | None = None
    max_age: int | None = None  # this location needs a sign-in at most this many seconds old (stepup.py)
    problem: str | None = None  # set when the query is not understood: nobody passes

    def allows(self, identity: Identity) -> bool:
        if self.problem is not None:
            return False
        if self.groups is not None and self.groups.isdisjoint(identity.groups):
            return False
        if self.emails is not None and identity.email.lower() not in self.emails:
            return False
        if self.domains is not None:
            domain = email_domain(identity.email)
            if domain is None or not any(rule.allows(domain) for rule in self.domains):
                return False
        return True


def _values(pairs: list[tuple[str, str]], name: str) -> list[str] | None:
    raw = [value for key, value in pairs if key == name]
    if not raw:
        return None
    items = [item.strip() for value in raw for item in value.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{name} is given but empty")
    return items


def _max_age(pairs: list[tuple[str, str]]) -> int | None:
    """``max_age=N``: once, a non-negative whole number of seconds; anything else is a misconfigured auth-url."""
    raw = [value for key, value in pairs if key == "max_age"]
    if not raw:
        return None
    number = parse_max_age(raw[0].strip()) if len(raw) == 1 else None
    if number is None:
        raise ConfigError("max_age must be given once, as a whole number of seconds")
    return number


@lru_cache(maxsize=512)
def location_rules(query: str) -> LocationRules:
    """The rules of one ``auth-url`` query string; parsed once per distinct string."""
    if len(query) > MAX_QUERY_CHARS:
        return LocationRules(problem="query string too long")
    query = split_routed(query)[0]
    if not query:
        return LocationRules()
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, max_num_fields=50)
    except ValueError:
        return LocationRules(problem="query string is malformed")
    for key, _ in pairs:
        if key == ROUTED_HOST:
            return LocationRules(problem=f"{ROUTED_HOST} must be the auth-url's last parameter, as {ROUTED_HOST}=$host")
        if key not in PARAMETERS:
            close = difflib.get_close_matches(key, PARAMETERS, n=1, cutoff=0.7)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return LocationRules(problem=f"unknown parameter {key[:60]!r}{hint}")
    try:
        groups, emails, domains = (_values(pairs, name) for name in _LISTS)
        return LocationRules(
            max_age=_max_age(pairs),
            groups=frozenset(groups) if groups is not None else None,
            emails=frozenset(e.lower() for e in emails) if emails is not None else None,
            domains=tuple(parse_domain_rule(d, "allowed_email_domains") for d in domains) if domains else None,
        )
    except ConfigError as exc:
        return LocationRules(problem=str(exc).removeprefix("--"))
