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
import re
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


# RFC 6750 2.1: the credentials of "Bearer" are one b64token (RFC 7235 token68); anything else is malformed.
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*")


class MalformedAuthorization(web.HTTPBadRequest):
    """RFC 6750 3.1 ``invalid_request``: two ``Authorization`` headers, or a Bearer one whose credentials are not
    one b64token. A 400, except where one cannot be given: an auth subrequest (``/oauth2/auth``, the auth
    listener) raises ``unauthorized`` instead (401, the same challenge), since nginx's ``auth_request`` turns any
    status but 2xx, 401 and 403 into a 500 for the client. Its challenge still says invalid_request, not
    invalid_token: a client told its token is bad would refresh it and send the same malformed request again.
    ``params``: challenge parameters before the error (``resource_metadata``); ``headers``: added to both."""

    def __init__(self, reason: str, params: str = "", headers: dict[str, str] | None = None) -> None:
        challenge = f'Bearer {params}{", " if params else ""}error="invalid_request", error_description="{reason}"'
        fields = {"WWW-Authenticate": challenge, "Cache-Control": "no-store", **(headers or {})}
        super().__init__(headers=fields, text=f"400 Bad Request: {reason}\n")
        self.unauthorized = web.HTTPUnauthorized(headers=fields, text=f"401 Unauthorized: {reason}\n")


def bearer_credentials(request: web.Request) -> str | None:
    """The token of the request's one ``Authorization: Bearer`` header; None when no header names the Bearer
    scheme (another scheme, or none: the cookie decides). Raises ``ValueError`` (why, no secret in it) for a
    malformed one (RFC 6750 3.1 ``invalid_request``): more than one ``Authorization`` header (which would the
    app believe?), or credentials that are not a single b64token (empty, spaces, commas, non-ASCII)."""
    values = request.headers.getall("Authorization", [])
    bearers = [v for v in values if v[:7].lower() == "bearer " or v.strip().lower() == "bearer"]
    if not bearers:
        return None
    if len(values) != 1:
        raise ValueError("more than one Authorization header")
    token = bearers[0][7:].strip(" \t")
    if not _TOKEN68.fullmatch(token):
        raise ValueError("the Bearer credentials are not one token (RFC 6750 2.1)")
    return token


def bearer_token(request: web.Request) -> str | None:
    """The JWT of an ``Authorization: Bearer`` header; "" for a well-formed Bearer token that cannot be a JWT
    (it is refused: invalid_token); None when the request carries no bearer at all. Raises
    ``MalformedAuthorization`` for a malformed header (``bearer_credentials``)."""
    try:
        token = bearer_credentials(request)
    except ValueError as exc:
        raise MalformedAuthorization(str(exc)) from None
    if token is None:
        return None
    if len(token) > MAX_BEARER_CHARS or token.count(".") != 2:
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
