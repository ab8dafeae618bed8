"""The scope vocabulary of the authorization server and its one parser.

Shared by the endpoints that read a ``scope`` (authorize, device authorization, registration, client
metadata documents) and by discovery, so none of them imports another for it.
"""

from __future__ import annotations

SCOPES = ("openid", "profile", "email", "offline_access")
MAX_SCOPE_CHARS = 500


def parse_scope(text: str | None, allowed: str = "") -> str | None:
    """The scope in canonical order; None for a scope outside the vocabulary (or outside ``allowed``, the
    client's registered scope, when it has one). Empty or absent means all that is allowed."""
    vocabulary = [s for s in SCOPES if not allowed or s in allowed.split(" ")]
    if text is None or not text.strip():
        return " ".join(vocabulary)
    if len(text) > MAX_SCOPE_CHARS:
        return None
    asked = set(text.split(" ")) - {""}
    if not asked <= set(vocabulary):
        return None
    return " ".join(s for s in vocabulary if s in asked)
