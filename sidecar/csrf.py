"""CSRF tokens of the browser path's own forms ("sign out everywhere"): an HMAC under the cookie secret of the
browser session id and what the form does, so a form built for another session, or for another action, does
not verify. The same-origin check (``handlers._same_origin``) stays in front; the token is what still holds
where a browser sends neither ``Origin`` nor ``Sec-Fetch-Site`` (older browsers) for a cross-site post."""

from __future__ import annotations

import base64
import hashlib
import hmac

from .config import Config

EVERYWHERE = "sign_out_everywhere"


def form_token(config: Config, sid: str, action: str, secret: bytes | None = None) -> str:
    key = secret if secret is not None else config.cookie_secrets[0]
    mac = hmac.new(key, f"sidecar.form.csrf\0{sid}\0{action}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def form_token_ok(config: Config, sid: str, action: str, presented: str) -> bool:
    """Any configured cookie secret may have made it (secret rotation)."""
    return (
        bool(presented)
        and len(presented) <= 100
        and any(
            hmac.compare_digest(form_token(config, sid, action, secret).encode(), presented.encode())
            for secret in config.cookie_secrets
        )
    )
