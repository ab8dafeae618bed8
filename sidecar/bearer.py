"""``--skip-jwt-bearer-tokens``: API clients and CLIs authenticate with the provider's own JWTs.

An ``Authorization: Bearer <JWT>`` is checked like an ID token is at sign-in (the issuer's
published keys, the allowed algorithms, ``iss``, an accepted ``aud``, ``exp``/``nbf``/``iat``),
reusing ``OidcClient``'s verification, one client per issuer so each issuer's discovery and key
set are fetched and cached apart. A valid token becomes a session-like value that the usual
email and group rules then judge. A bearer that is present but not valid is a 401 with
``WWW-Authenticate: Bearer error="invalid_token"`` (RFC 6750): it never falls back to the
cookie or to anonymous, so a client learns its token is bad instead of being sent to a page.
"""

from __future__ import annotations

import logging
import time

import aiohttp
import jwt
from aiohttp import web

from .config import Config
from .errors import TokenValidationError
from .models import Session, TokenSet
from .oidc import OidcClient
from .policy import identity_from_claims
from .token_response import number

log = logging.getLogger("sidecar.bearer")

MAX_BEARER_CHARS = 16384


def bearer_token(request: web.Request) -> str | None:
    """The JWT of an ``Authorization: Bearer`` header; "" for a Bearer header that holds no usable
    token (it is still refused); None when the request carries no bearer at all."""
    values = request.headers.getall("Authorization", [])
    bearers = [v for v in values if v[:7].lower() == "bearer " or v.strip().lower() == "bearer"]
    if not bearers:
        return None
    if len(values) != 1:
        return ""  # two Authorization headers: which one would the app believe?
    token = bearers[0][7:].strip()
    if not token or len(token) > MAX_BEARER_CHARS or token.count(".") != 2 or not token.isascii():
        return ""
    return token


def invalid_token() -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"', "Cache-Control": "no-store"},
        text="401 Unauthorized: invalid bearer token\n",
    )


class BearerVerifier:
    """One ``OidcClient`` per accepted issuer: the main provider (audience ``--client-id``) and each
    ``--extra-jwt-issuers`` ``issuer=audience`` pair."""

    def __init__(self, config: Config, http: aiohttp.ClientSession, primary: OidcClient) -> None:
        self._config = config
        self._by_issuer: dict[str, OidcClient] = {config.oidc_issuer_url.rstrip("/"): primary}
        for issuer, audience in config.jwt_issuers:
            extra = config.replace(oidc_issuer_url=issuer, client_id=audience, oidc_extra_audience=())
            self._by_issuer[issuer.rstrip("/")] = OidcClient(extra, http)

    async def session_for(self, token: str) -> Session:
        """A session-like value for a valid token; raises ``web.HTTPUnauthorized`` (invalid_token) else.
        A provider we cannot reach right now propagates as ProviderUnavailable (503), not as invalid."""
        client = self._by_issuer.get(_claimed_issuer(token).rstrip("/"))
        if client is None:
            raise _refused("issuer not accepted")
        try:
            claims = await client.validate_bearer_token(token)
            identity = identity_from_claims(claims, self._config)
        except TokenValidationError as exc:
            raise _refused(str(exc)) from None
        now = time.time()
        tokens = TokenSet(
            access_token=token,
            access_expires_at=number(claims.get("exp")),
            issued_at=number(claims.get("iat")) or now,
        )
        return Session(identity=identity, tokens=tokens, created_at=now, signed_in_at=now, last_active=now)


def _claimed_issuer(token: str) -> str:
    """The ``iss`` the token claims, read before any check only to choose whose keys to check it with."""
    try:
        issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except (jwt.PyJWTError, ValueError, TypeError):
        return ""
    return issuer if isinstance(issuer, str) else ""


def _refused(reason: str) -> web.HTTPUnauthorized:
    log.info("bearer token refused", extra={"fields": {"reason": reason}})
    return invalid_token()
