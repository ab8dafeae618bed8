"""The dev provider's switches for behaviours of real providers, one table shared by the refresh, logout and
grant-end tests so each of them runs against every quirk."""

from __future__ import annotations

from typing import Any

import pytest

QUIRKS: dict[str, dict[str, Any]] = {
    "plain": {},
    "rotating": {"rotate_refresh_tokens": True, "reuse_detection": True},
    "no-rotation": {"rotate_refresh_tokens": False, "return_same_refresh_token": True},
    "invalid-request": {"unknown_refresh_error": "invalid_request"},
    "no-revocation-endpoint": {"revocation_endpoint": False},
    "logout-token-without-exp": {"logout_token_exp": False},
    "no-expires-in-no-id-token-on-refresh": {"send_expires_in": False, "send_id_token_on_refresh": False},
    # ES256 keys, the client secret taken only in the form, no RFC 9207 iss (each common among real providers)
    "es256-secret-in-form-no-iss": {"signing_alg": "ES256", "client_auth": "post", "send_iss": False},
}


def each_quirk() -> pytest.MarkDecorator:
    """``@each_quirk()``: a test taking ``quirk`` (the provider's settings) runs once per entry."""
    return pytest.mark.parametrize("quirk", list(QUIRKS.values()), ids=list(QUIRKS))
