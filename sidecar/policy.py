"""Who the user is (claims -> Identity) and whether they may pass (email domains, groups)."""

from __future__ import annotations

from typing import Any

from .errors import TokenValidationError
from .models import Identity

MAX_GROUPS = 200
MAX_CLAIM_CHARS = 256


def _clean(value: Any) -> str:
    """A claim value fit for an HTTP header: control characters removed, length capped."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return "".join(ch for ch in text if ch >= " " and ch != "\x7f")[:MAX_CLAIM_CHARS]


def identity_from_claims(claims: dict[str, Any], config: Any) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenValidationError("ID token has no sub")
    if claims.get("email_verified") is False and not config.insecure_oidc_allow_unverified_email:
        email = ""
    else:
        email = _clean(claims.get(config.oidc_email_claim))
    raw_groups = claims.get(config.oidc_groups_claim) or []
    if isinstance(raw_groups, str):
        raw_groups = [raw_groups]
    groups = tuple(g for g in (_clean(g) for g in raw_groups[:MAX_GROUPS] if isinstance(raw_groups, list)) if g)
    preferred = _clean(claims.get("preferred_username"))
    user = _clean(claims.get(config.user_id_claim)) if config.user_id_claim != "sub" else ""
    return Identity(
        sub=_clean(sub),
        user=user or email or _clean(sub),
        email=email,
        groups=groups,
        preferred_username=preferred,
    )


def is_allowed(identity: Identity, config: Any) -> bool:
    """Email-domain and group rules; both must pass."""
    domains = config.email_domain
    if "*" not in domains:
        domain = identity.email.rpartition("@")[2].lower()
        if not identity.email or domain not in {d.lower().lstrip("@") for d in domains}:
            return False
    allowed = config.allowed_group
    return not allowed or bool(set(allowed) & set(identity.groups))
