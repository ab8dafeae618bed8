"""Who the user is (claims -> Identity) and whether they may pass (email domains, groups).

Claims are checked strictly and never trimmed before a rule sees them: a value that is not
what it should be (an address with two ``@``, a group that is an object, an overlong name)
is left out, so a rule can only fail closed. Only what goes into headers is capped.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .config import Config
from .errors import TokenValidationError
from .models import Identity
from .rules import valid_hostname

MAX_GROUPS = 1000
MAX_GROUP_CHARS = 1024
MAX_HEADER_CLAIM_CHARS = 256  # user and preferred_username exist only for headers
MAX_EMAIL_CHARS = 254  # RFC 5321 path limit
_LOCAL_FORBIDDEN = set(' "(),:;<>[\\]')


def _printable(text: str) -> bool:
    return all(ch >= " " and ch != "\x7f" and not ("\x80" <= ch <= "\x9f") for ch in text)


def email_domain(address: Any) -> str | None:
    """The lower-cased domain of a well-formed address, else None.

    Exactly one ``@``, a plain local part, an ASCII DNS domain, nothing invisible, at most 254
    characters: anything else is not an address any domain rule should reason about."""
    if not isinstance(address, str) or not 3 <= len(address) <= MAX_EMAIL_CHARS or address.count("@") != 1:
        return None
    local, domain = address.split("@")
    if not local or len(local) > 64 or not _printable(local) or _LOCAL_FORBIDDEN & set(local):
        return None
    if any(ch.isspace() for ch in local):
        return None
    domain = domain.lower()
    return domain if valid_hostname(domain) else None


def _header_text(value: Any) -> str:
    """A claim fit for a header as it is, or "" (never altered into something else)."""
    if isinstance(value, str) and value and len(value) <= MAX_HEADER_CLAIM_CHARS and _printable(value):
        return value
    return ""


def _groups(raw: Any) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return tuple(
        g for g in items[:MAX_GROUPS] if isinstance(g, str) and 0 < len(g) <= MAX_GROUP_CHARS and _printable(g)
    )


def email_verified(claims: dict[str, Any]) -> bool:
    """Only the JSON boolean ``true`` verifies; ``"false"``, ``"true"``, 1 do not. A provider that
    sends no ``email_verified`` at all (Entra ID, many enterprise IdPs) makes no claim either way,
    and its emails are taken as it asserts them, as oauth2-proxy does."""
    return "email_verified" not in claims or claims["email_verified"] is True


def identity_from_claims(claims: dict[str, Any], config: Config) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 255 or not _printable(sub):
        raise TokenValidationError("ID token has no usable sub")
    claimed = claims.get(config.oidc_email_claim)
    trusted = email_verified(claims) or config.insecure_oidc_allow_unverified_email
    email = claimed if isinstance(claimed, str) and trusted and email_domain(claimed) is not None else ""
    user = _header_text(claims.get(config.user_id_claim)) if config.user_id_claim != "sub" else ""
    return Identity(
        sub=sub,
        user=user or email or _header_text(sub),
        email=email,
        groups=_groups(claims.get(config.oidc_groups_claim)),
        preferred_username=_header_text(claims.get("preferred_username")),
    )


@lru_cache(maxsize=4096)
def _domain_of(address: str) -> str | None:
    """Checked again on every decision, not only at sign-in: records made before a rule tightened
    must not keep passing; the cache keeps that off the hot path."""
    return email_domain(address)


def is_allowed(identity: Identity, config: Config) -> bool:
    """Email-domain and group rules; both must pass."""
    if not any(rule.domain == "*" for rule in config.email_domains):
        domain = _domain_of(identity.email)
        if domain is None or not any(rule.allows(domain) for rule in config.email_domains):
            return False
    allowed = config.allowed_group
    return not allowed or not set(allowed).isdisjoint(identity.groups)


def why_denied(identity: Identity, config: Config) -> str | None:
    """For the log line of a denial: ``email_domain`` or ``group`` (the first rule that fails), None if allowed."""
    if not any(rule.domain == "*" for rule in config.email_domains):
        domain = _domain_of(identity.email)
        if domain is None or not any(rule.allows(domain) for rule in config.email_domains):
            return "email_domain"
    allowed = config.allowed_group
    return "group" if allowed and set(allowed).isdisjoint(identity.groups) else None
