"""``acr_values`` at ``/oauth2/authorize`` (OIDC Core 3.1.2.1): the authentication context classes a client asks the
user's sign-in to meet, in order of preference.

The values are passed on to the grant's own upstream sign-in (the provider is the one that authenticates). Core
makes the request voluntary: a provider may answer with another class, or none. Here it is kept, fail-closed: a
client that names classes gets a grant only when the upstream ID token's ``acr`` is one of them; otherwise no grant
is made and the client gets ``unmet_authentication_requirements`` (OpenID Connect Unmet Authentication Requirements
1.0), so a client asking for two factors never receives tokens from a password-only sign-in without being told. A
client that does not care names none. The ``acr`` reached is also in the ID token the client gets (``id_token``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MAX_VALUES = 10
MAX_VALUE_CHARS = 256
UNMET = "unmet_authentication_requirements"
# One class reference: printable ASCII without spaces or quotes (URNs, URLs, "1", "phr", "urn:mace:...:bronze").
_VALUE = re.compile(r"[\x21\x23-\x26\x28-\x7e]{1,256}")


def parse_acr_values(text: str) -> str | None:
    """The ``acr_values`` parameter as its space-separated classes, normalised to single spaces; None when it is
    malformed (empty, too many or too long values, characters outside printable ASCII, quotes)."""
    values = text.split(" ")
    if not text or len(values) > MAX_VALUES or not all(_VALUE.fullmatch(v) for v in values):
        return None
    return " ".join(dict.fromkeys(values))


def unmet(claims: Mapping[str, Any], acr_values: str) -> str | None:
    """Why the upstream ID token ``claims`` do not meet the classes asked (``acr_values``), or None when they do."""
    acr = claims.get("acr")
    if not isinstance(acr, str) or not acr:
        return "the identity provider did not say how you signed in (no acr)"
    if acr not in acr_values.split(" "):
        return "the identity provider signed you in another way than the application asked"
    return None
