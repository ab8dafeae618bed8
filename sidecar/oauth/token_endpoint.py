"""POST P/token: authorization_code (PKCE S256), refresh_token (rotated at every use) and device_code grants.

Everything a client sends is checked before any record is touched: a form-encoded body only, at most
``MAX_BODY`` bytes, each parameter once, tokens in the sidecar's exact shape. Clients authenticate as they
registered: ``none`` (public, PKCE), ``client_secret_post`` or ``client_secret_basic`` (constant-time
comparison of SHA-256s). Errors are RFC 6749 5.2 JSON and never echo what the client sent. Every answer
carries ``Cache-Control: no-store``.

Replay: a code presented twice ends its grant (RFC 6749 4.1.2); a refresh token presented after it was
rotated ends the grant and all its tokens (RFC 9700 4.14.2) - including when two requests race with the
same refresh token (one gets the new pair, the other ``invalid_grant``, and the grant is then ended),
since the server cannot tell that race from a stolen token being used - unless it comes within
``--oauth-refresh-reuse-seconds`` of the rotation from the same client for the same resource: then it is
a retry and gets the first rotation's answer again (``refresh_reuse.py``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

from .. import logs
from ..context import Services, view_of
from ..cookies import SessionRef
from ..errors import InvalidCookie, SessionGone
from . import id_token
from . import refresh_reuse as reuse
from . import tokens as tk
from .cimd import find_client
from .limits import too_many
from .model import GRANT_AUTHORIZATION_CODE, GRANT_DEVICE_CODE, GRANT_REFRESH_TOKEN, Client, Grant, IssuedTokens
from .service import OAUTH, OAuthServer

MAX_BODY = 8192
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    """An RFC 6749 5.2 error answer; ``description`` is fixed text, never client input."""

    def __init__(self, error: str, description: str, status: int = 400, basic: bool = False) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status
        self.basic = basic


def error_response(exc: OAuthError) -> web.Response:
    headers = dict(NO_STORE)
    status = exc.status
    if status == 401 and exc.basic:
        # only to a client that sent HTTP Basic (RFC 6749 5.2 MUST): to a request without it (a public client,
        # client_secret_post, another site's page posting with the visitor's cookies) the challenge would
        # make a browser prompt the person for a password in the sidecar's name
        headers["WWW-Authenticate"] = 'Basic realm="sidecar"'
    elif status == 401:
        status = 400  # a 401 must carry a challenge (RFC 9110 15.5.2); without one, RFC 6749 5.2's default: 400
    body = {"error": exc.error, "error_description": exc.description}
    return web.json_response(body, status=status, headers=headers)


async def read_form(request: web.Request) -> dict[str, str]:
    """The form parameters; invalid_request for another media type, a large body or a repeated parameter."""
    media = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise OAuthError("invalid_request", "request body too large")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise OAuthError("invalid_request", "request body too large")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw), errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "malformed form body") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthError("invalid_request", "a parameter is repeated")
        form[name] = value
    return form


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    values = request.headers.getall("Authorization", [])
    if not values:
        return None
    if len(values) != 1 or values[0][:6].lower() != "basic ":
        raise OAuthError("invalid_client", "unsupported client authentication", 401, basic=True)
    try:
        decoded = base64.b64decode(values[0][6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "malformed client credentials", 401, basic=True) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "malformed client credentials", 401, basic=True)
    return unquote_plus(client_id), unquote_plus(secret)  # RFC 6749 2.3.1: form-encoded first


async def authenticate_client(server: OAuthServer, request: web.Request, form: dict[str, str]) -> Client:
    """The client, authenticated by the method it registered; invalid_client (401) otherwise."""
    basic = _basic_credentials(request)
    if basic is not None:
        if "client_secret" in form or form.get("client_id", basic[0]) != basic[0]:
            raise OAuthError("invalid_request", "use one client authentication method")
        client_id, secret, method = basic[0], basic[1], "client_secret_basic"
    elif "client_secret" in form:
        client_id, secret, method = form.get("client_id", ""), form["client_secret"], "client_secret_post"
    else:
        client_id, secret, method = form.get("client_id", ""), "", "none"
    used_basic = basic is not None
    if not client_id or len(client_id) > 2048:
        raise OAuthError("invalid_client", "client authentication failed", 401, basic=used_basic)
    client = await find_client(request.app, client_id)  # a metadata document's client is public: method none
    if client is None or client.token_endpoint_auth_method != method:
        raise OAuthError("invalid_client", "client authentication failed", 401, basic=used_basic)
    if method != "none" and (client.secret_hash is None or not tk.same_secret(secret, client.secret_hash)):
        raise OAuthError("invalid_client", "client authentication failed", 401, basic=used_basic)
    if not client.metadata_document:
        await server.store.touch_client(client.client_id, float(server.config.oauth_client_idle_timeout))
    return client


def same_resource(given: str, expected: str) -> bool:
    """A ``resource`` parameter names the grant's resource (a single trailing "/" tolerated)."""
    return given in (expected, expected + "/")


def _pkce_ok(verifier: str, challenge: str) -> bool:
    if not _VERIFIER.fullmatch(verifier):
        return False
    computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return hmac.compare_digest(computed, challenge)


def _client_ip_and_agent(request: web.Request) -> tuple[str, str]:
    return view_of(request).client_ip, request.headers.get("User-Agent", "")


async def _code_grant(server: OAuthServer, request: web.Request, form: dict[str, str], client: Client) -> IssuedTokens:
    code = form.get("code", "")
    grant_id = tk.parse(code, tk.CODE)
    if grant_id is None:
        raise OAuthError("invalid_grant", "the code is invalid or expired")
    record, first_use = await server.store.take_code(tk.token_hash(code), grant_id)
    if record is None:
        raise OAuthError("invalid_grant", "the code is invalid or expired")
    if not first_use:
        await server.end_grant(grant_id, "code_replay")
        raise OAuthError("invalid_grant", "the code was already used")
    if record.client_id != client.client_id or record.expires_at < server.clock():
        raise OAuthError("invalid_grant", "the code is invalid or expired")
    if form.get("redirect_uri") != record.redirect_uri:
        raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
    if "code_verifier" not in form:
        raise OAuthError("invalid_request", "code_verifier is required (PKCE)")
    if not _pkce_ok(form["code_verifier"], record.code_challenge):
        raise OAuthError("invalid_grant", "the code_verifier does not match the code_challenge")
    if "resource" in form and not same_resource(form["resource"], record.resource):
        raise OAuthError("invalid_target", "the resource does not match the authorization request")
    grant = await server.store.get_grant(grant_id)
    key = tk.unwrap_key(record.wrapped_key, code)
    if grant is None or key is None:
        raise OAuthError("invalid_grant", "the code is invalid or expired")
    return await _issue(server, request, grant, key, None, record.nonce)


class _Retry(Exception):
    """The store saw a retry of the grant's latest rotation within the reuse window: nothing was issued."""


async def _issue(
    server: OAuthServer,
    request: web.Request,
    grant: Grant,
    key: bytes,
    used_refresh: str | None,
    nonce: str = "",
    asked_scope: str = "",
) -> IssuedTokens:
    ip, agent = _client_ip_and_agent(request)
    issued = await server.issue_tokens(grant, key, used_refresh, ip, agent, asked_scope)
    if isinstance(issued, IssuedTokens):
        return await _with_id_token(server, request, grant, key, issued, nonce)
    if issued == "again" and used_refresh is not None:
        raise _Retry
    if issued == "replayed":
        await server.end_grant_session(grant, "refresh_replay")
    raise OAuthError("invalid_grant", "the grant is invalid, expired or revoked")


async def _with_id_token(
    server: OAuthServer, request: web.Request, grant: Grant, key: bytes, issued: IssuedTokens, nonce: str
) -> IssuedTokens:
    if "openid" in issued.scope.split(" "):
        return replace(issued, id_token=await _id_token(server, request, grant, key, issued, nonce))
    return issued


async def _id_token(
    server: OAuthServer, request: web.Request, grant: Grant, key: bytes, issued: IssuedTokens, nonce: str
) -> str:
    """OIDC Core 3.1.3.3: the ID token for a grant with ``openid``, from the user of its upstream record."""
    try:
        session = await server.sessions.load(SessionRef(sid=grant.session_sid, key=key))
    except (SessionGone, InvalidCookie):
        await server.end_grant(grant.grant_id, "upstream_session_gone")
        raise OAuthError("invalid_grant", "the grant's sign-in has ended") from None
    return id_token.mint(
        server.config,
        issuer=server.issuer(request),
        client_id=grant.client_id,
        scope=issued.scope,
        session=session,
        access_token=issued.access_token,
        nonce=nonce,
        now=server.clock(),
        lifetime=float(issued.expires_in),
    )


async def _refresh_grant(
    server: OAuthServer, request: web.Request, form: dict[str, str], client: Client
) -> IssuedTokens:
    token = form.get("refresh_token", "")
    grant_id = tk.parse(token, tk.REFRESH)
    if grant_id is None:
        raise OAuthError("invalid_grant", "the refresh token is invalid or expired")
    token_hash = tk.token_hash(token)
    raw = await server.store.refresh_record(grant_id, token_hash)
    record = tk.TokenRecord.from_bytes(raw) if raw is not None else None
    if record is None:
        return await _retry_or_replay(server, request, form, client, grant_id, token)
    if record.client_id != client.client_id or record.expires_at < server.clock():
        raise OAuthError("invalid_grant", "the refresh token is invalid or expired")
    if "resource" in form and not same_resource(form["resource"], record.resource):
        raise OAuthError("invalid_target", "the resource does not match the grant")
    if "scope" in form and not set(form["scope"].split()) <= set(record.scope.split()):
        raise OAuthError("invalid_scope", "the scope exceeds the grant")
    key = tk.unwrap_key(record.wrapped_key, token)
    grant = await server.store.get_grant(grant_id)
    if key is None or grant is None:
        raise OAuthError("invalid_grant", "the refresh token is invalid or expired")
    await _sign_in_alive(server, grant, key)
    try:
        return await _issue(server, request, grant, key, token, asked_scope=" ".join(form.get("scope", "").split()))
    except _Retry:  # a concurrent request with this token rotated it first
        return await _retry_or_replay(server, request, form, client, grant_id, token)


async def _sign_in_alive(server: OAuthServer, grant: Grant, key: bytes) -> None:
    try:  # the upstream session must still exist (sign-out everywhere, back-channel logout by sub end it);
        # read from the store, not this process's cache: another Sessions or replica may have ended it
        await server.sessions.load_fresh(SessionRef(sid=grant.session_sid, key=key))
    except (SessionGone, InvalidCookie):
        await server.end_grant(grant.grant_id, "upstream_session_gone")
        raise OAuthError("invalid_grant", "the grant's sign-in has ended") from None


def _same_request(rotation: reuse.Rotation, form: dict[str, str], client: Client) -> bool:
    """A retry: the client that rotated, the same resource, the scope it asked for or less."""
    if rotation.client_id != client.client_id:
        return False
    if "resource" in form and not same_resource(form["resource"], rotation.resource):
        return False
    return "scope" not in form or set(form["scope"].split()) <= set(rotation.scope.split())


async def _kept_answer(server: OAuthServer, grant_id: str, rotation: reuse.Rotation) -> IssuedTokens | None:
    """The kept answer while its tokens still work: its access token neither expired nor revoked (RFC 7009;
    the refresh token's revocation ended the grant). A client that revoked it had the answer: None then."""
    again = reuse.still_valid(rotation, server.clock())
    if again is None:
        return None
    if await server.store.access_record(grant_id, tk.token_hash(again.access_token)) is None:
        return None
    return again


async def _retry_or_replay(
    server: OAuthServer, request: web.Request, form: dict[str, str], client: Client, grant_id: str, token: str
) -> IssuedTokens:
    """A refresh token with no record: within the reuse window, a retry of its rotation gets that rotation's
    answer again; anything else presenting a rotated token is a replay and ends the grant (RFC 9700 4.14.2)."""
    token_hash = tk.token_hash(token)
    if server.config.oauth_refresh_reuse_seconds > 0:
        sealed = await server.store.reused_rotation(grant_id, token_hash)
        rotation = reuse.unseal(sealed, token) if sealed is not None else None
        grant = await server.store.get_grant(grant_id) if rotation is not None else None
        if rotation is not None and grant is not None and _same_request(rotation, form, client):
            again = await _kept_answer(server, grant_id, rotation)
            if again is not None:
                await _sign_in_alive(server, grant, rotation.session_key)
                logs.event("oauth_refresh_retried", {"grant_id": grant_id, "client_id": client.client_id})
                return await _with_id_token(server, request, grant, rotation.session_key, again, "")
    ended = await server.store.report_replay(grant_id, token_hash)
    if ended is not None:
        await server.end_grant_session(ended, "refresh_replay")
    raise OAuthError("invalid_grant", "the refresh token is invalid or expired")


async def _device_grant(
    server: OAuthServer, request: web.Request, form: dict[str, str], client: Client
) -> IssuedTokens:
    device_code = form.get("device_code", "")
    if not device_code or len(device_code) > 256:
        raise OAuthError("invalid_grant", "the device code is invalid")
    now = server.clock()
    device, too_fast = await server.store.poll_device(tk.token_hash(device_code), now)
    if device is None or device.client_id != client.client_id:
        raise OAuthError("invalid_grant", "the device code is invalid")
    if device.expires_at < now and device.status in ("pending", "approved"):
        raise OAuthError("expired_token", "the device code has expired")
    if device.status == "pending":
        if too_fast:
            raise OAuthError("slow_down", "polling too often; wait longer between requests")
        raise OAuthError("authorization_pending", "the user has not answered yet")
    if device.status == "denied":
        raise OAuthError("access_denied", "the user denied the request")
    if device.status != "approved":
        raise OAuthError("invalid_grant", "the device code was already used")
    if not await server.store.update_device(replace(device, status="redeemed"), "approved"):
        raise OAuthError("invalid_grant", "the device code was already used")
    grant = await server.store.get_grant(device.grant_id)
    key = server.open_device_key(device)
    if grant is None or key is None:
        raise OAuthError("invalid_grant", "the grant is invalid, expired or revoked")
    return await _issue(server, request, grant, key, None)


def _success(issued: IssuedTokens) -> web.Response:
    body: dict[str, Any] = {
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "refresh_token": issued.refresh_token,
    }
    if issued.scope:
        body["scope"] = issued.scope
    if issued.id_token:
        body["id_token"] = issued.id_token
    return web.Response(text=json.dumps(body), content_type="application/json", headers=NO_STORE)


async def handle(request: web.Request, svc: Services) -> web.Response:
    """POST P/token (RFC 6749 3.2, RFC 8628 3.4)."""
    limited = await too_many(request, "token", float(svc.config.oauth_token_rate_limit), "token requests")
    if limited is not None:
        return limited
    server = request.app[OAUTH]
    try:
        form = await read_form(request)
        client = await authenticate_client(server, request, form)
        grant_type = form.get("grant_type", "")
        if grant_type not in client.grant_types and grant_type in (
            GRANT_AUTHORIZATION_CODE,
            GRANT_REFRESH_TOKEN,
            GRANT_DEVICE_CODE,
        ):
            raise OAuthError("unauthorized_client", "the client is not registered for this grant type")
        if grant_type == GRANT_AUTHORIZATION_CODE:
            issued = await _code_grant(server, request, form, client)
        elif grant_type == GRANT_REFRESH_TOKEN:
            issued = await _refresh_grant(server, request, form, client)
        elif grant_type == GRANT_DEVICE_CODE:
            issued = await _device_grant(server, request, form, client)
        else:
            raise OAuthError(
                "unsupported_grant_type",
                "grant_type must be authorization_code, refresh_token or urn:ietf:params:oauth:grant-type:device_code",
            )
    except OAuthError as exc:
        return error_response(exc)
    return _success(issued)
