"""The device authorization grant (RFC 8628): ``POST P/device_authorization`` and the user's ``P/device`` page.

A command-line tool without a browser asks for a device code and shows the user a short user code; the
user opens ``P/device`` in a browser where they are signed in, types it, sees the same consent page as the
authorization code flow, and approves (a grant sign-in whose pending record says "device") or denies. The
tool meanwhile polls the token endpoint (``token_endpoint.py``) with the device code.

User codes are 8 characters from 20 consonants that are hard to confuse (no vowels: no words), shown as
``XXXX-XXXX`` and accepted in any case, with or without the dash or spaces: about 34.5 bits, against
code entry limited per browser session and per client address, for the ten minutes a code lives.
``verification_uri_complete`` only pre-fills the form: the user still confirms, so a link sent by someone
else cannot approve anything by itself. A wrong, expired, used or denied code all get the same answer.
"""

from __future__ import annotations

import secrets
import time
from urllib.parse import quote, urlsplit

from aiohttp import web

from .. import logs
from ..context import Services, view_of
from ..guard import browser_session
from ..policy import why_denied
from ..ratelimit import RateLimiter, client_key, retry_after
from . import pages
from . import tokens as tk
from .authorize import (
    SCOPES,
    Pending,
    consent_page,
    csrf_ok,
    csrf_token,
    find_client,
    parse_scope,
    pick_resource,
    read_post,
    same_origin,
    sign_in_first,
)
from .limits import too_many
from .model import GRANT_DEVICE_CODE, DeviceAuthorization
from .service import OAUTH
from .token_endpoint import OAuthError, authenticate_client, error_response, read_form

ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_CHARS = 8
CODE_ENTRY_PER_MINUTE = 10.0  # per browser session and per client address
# Device codes of one client from one client address (an IPv6 /64) alive at once, across replicas: what an
# anonymous caller can make the server keep. Counted per address, not per client alone: a client id is no
# secret (a metadata document's URL is public), and one address filling a shared count would lock every
# user of that client out of the device flow for the code's whole life.
MAX_PENDING = 20
ENTRY_LIMITER = web.AppKey("oauth_code_entry_limiter", RateLimiter)  # code entries per session and address
_JSON_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def new_user_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(USER_CODE_CHARS))


def pretty(user_code: str) -> str:
    return f"{user_code[:4]}-{user_code[4:]}"


def normalise(text: str) -> str | None:
    """``bcdf-ghjk``, ``BCDF GHJK``, ``bcdfghjk`` -> ``BCDFGHJK``; None for anything that cannot be a code."""
    code = "".join(ch for ch in text.upper() if ch not in "- \t")
    if len(code) != USER_CODE_CHARS or any(ch not in ALPHABET for ch in code):
        return None
    return code


def _oauth_error(code: str, description: str, status: int = 400) -> web.Response:
    body = {"error": code, "error_description": description}
    headers = dict(_JSON_HEADERS)
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="sidecar"'
    return web.json_response(body, status=status, headers=headers)


async def device_authorization(request: web.Request, svc: Services) -> web.Response:
    """RFC 8628 3.1-3.2: a device code, a user code and where to enter it."""
    oauth = request.app[OAUTH]
    client_ip = view_of(request).client_ip
    limited = await too_many(request, "device", float(svc.config.signin_rate_limit), "device authorization requests")
    if limited is not None:
        return limited
    try:  # one reader for OAuth form bodies: urlencoded only, bounded, each parameter once
        form = await read_form(request)
    except OAuthError as exc:
        return error_response(exc)
    try:  # RFC 8628 3.1: the client authenticates as at the token endpoint (public clients: client_id only)
        client = await authenticate_client(oauth, request, form)
    except OAuthError as exc:
        return error_response(exc)
    if GRANT_DEVICE_CODE not in client.grant_types:
        return _oauth_error("unauthorized_client", "this client did not register the device code grant")
    scope = parse_scope(form.get("scope"), client.scope)
    if scope is None:
        return _oauth_error("invalid_scope", f"scopes offered: {client.scope or ' '.join(SCOPES)}")
    found = pick_resource(request, oauth, [form["resource"]] if "resource" in form else [])
    if found is None:
        return _oauth_error("invalid_target", "resource must name one of this server's protected resources")
    device_code = secrets.token_urlsafe(32)
    ttl = float(svc.config.oauth_device_code_ttl)
    counted = f"{client.client_id}@{client_key(client_ip)}"  # "@" never appears in an address bucket
    if not await oauth.store.reserve_device(counted, tk.token_hash(device_code), time.time() + ttl, MAX_PENDING):
        text = "too many device codes of this client from this address are waiting; try later"
        return _oauth_error("too_many_requests", text, 429)
    for _ in range(5):
        user_code = new_user_code()
        device = DeviceAuthorization(
            device_code_hash=tk.token_hash(device_code),
            user_code=user_code,
            client_id=client.client_id,
            resource=found[0],
            scope=scope,
            expires_at=time.time() + ttl,
            interval=float(svc.config.oauth_device_poll_interval),
            status="pending",
            requested_at=time.time(),
            requested_from=client_ip,
        )
        if await oauth.store.put_device(device, ttl):
            break
    else:
        return _oauth_error("temporarily_unavailable", "try again", 503)
    logs.event("oauth_device_started", {"client_id": client.client_id, "client_ip": client_ip})
    verification = oauth.issuer(request) + svc.config.proxy_prefix + "/device"
    body = {
        "device_code": device_code,
        "user_code": pretty(user_code),
        "verification_uri": verification,
        "verification_uri_complete": f"{verification}?user_code={quote(pretty(user_code))}",
        "expires_in": int(ttl),
        "interval": int(svc.config.oauth_device_poll_interval),
    }
    return web.json_response(body, headers=_JSON_HEADERS)


# --- the user's page ----------------------------------------------------------------------------------------------

_WRONG = "That code is not valid, has expired or was already used. Check the code on your device."


async def device_page(request: web.Request, svc: Services) -> web.Response:
    """GET: the code entry form (pre-filled from ``user_code``); POST: check the code, then the consent page."""
    authed = await browser_session(request, svc)
    if authed is None:
        if request.method == "POST":
            return pages.message(svc.config, "Not signed in", "Sign in, then enter the code again.", 403)  # no session
        return sign_in_first(svc, request)
    ref, session = authed
    if why_denied(session.identity, svc.config) is not None:
        raise web.HTTPForbidden()
    action = svc.config.proxy_prefix + "/device"
    csrf = csrf_token(svc.config, ref.sid, "device")
    if request.method != "POST":
        given = normalise(request.query.get("user_code", "")[:32])
        return pages.device_entry(svc.config, action, csrf, pretty(given) if given else "")
    if not same_origin(request):
        return pages.message(svc.config, "Refused", "Cross-site form submission refused.", status=403)
    form = await read_post(request)
    if form is None:
        return pages.message(svc.config, "Bad request", "The form could not be read.", status=400)
    if not csrf_ok(svc.config, ref.sid, "device", str(form.get("csrf", ""))[:200]):
        return pages.message(svc.config, "Refused", "This form is not from your session (CSRF check failed).", 403)
    limited = _entry_limited(request, ref.sid)
    if limited is not None:
        return limited
    user_code = normalise(str(form.get("user_code", ""))[:32])
    device = await request.app[OAUTH].store.device_by_user_code(user_code) if user_code else None
    client = await find_client(request.app, device.client_id) if device is not None else None
    if device is None or client is None or device.status != "pending" or device.expires_at <= time.time():
        logs.event("oauth_device_code_refused", {"client_ip": view_of(request).client_ip})
        return pages.device_entry(svc.config, action, csrf, "", problem=_WRONG, status=400)
    pending = Pending(
        kind="device",
        client_id=client.client_id,
        resource=device.resource,
        resource_path=_resource_path(device.resource),
        scope=device.scope,
        sub=session.identity.sub,
        device_code_hash=device.device_code_hash,
    )
    return await consent_page(request, svc, authed, client, pending, device)


def _resource_path(resource: str) -> str:
    """The --oauth-resource path of a canonical resource URI (checked when the device code was issued)."""
    return urlsplit(resource).path


def _entry_limited(request: web.Request, sid: str) -> web.Response | None:
    """Guessing codes is limited per browser session and per client address (RFC 8628 5.1)."""
    limiter, now = request.app[ENTRY_LIMITER], time.monotonic()
    wait = max(
        limiter.take("s:" + sid, CODE_ENTRY_PER_MINUTE, CODE_ENTRY_PER_MINUTE, now),
        limiter.take("a:" + client_key(view_of(request).client_ip), CODE_ENTRY_PER_MINUTE, CODE_ENTRY_PER_MINUTE, now),
    )
    if not wait:
        return None
    response = pages.message(
        request.app[OAUTH].config, "Too many attempts", "Too many codes entered; wait a minute.", 429
    )
    response.headers["Retry-After"] = retry_after(wait)
    return response
