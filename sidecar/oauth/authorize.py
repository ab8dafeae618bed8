"""``GET P/authorize``, ``POST P/consent`` and the ``grant`` sign-in finisher: how a user gives a client access.

The sidecar has one upstream client and lets anyone register clients, so without a consent step it would be
a confused deputy: a link to ``/authorize`` with an attacker's client would hand the attacker a token in the
signed-in user's name. Hence:

1. ``/authorize`` checks the request. An unknown client or a redirect URI not registered exactly gets an error
   page, never a redirect (that would be an open redirector); other errors go back to the client with
   ``error``, ``state`` and ``iss`` (RFC 9207). PKCE S256 is required.
2. Without a browser session the user signs in first (``P/start``) and comes back here.
3. The consent page names the client (and that its name is unverified), where the answer goes, the resource,
   the scopes and the signed-in user. Its form carries a CSRF token bound to the browser session and to the
   pending request (an HMAC under the cookie secret); the pending request itself stays server-side.
4. Approval starts a second upstream sign-in (``purpose="grant:<pending id>"``), so the grant gets its own
   upstream tokens, with ``offline_access`` where the provider offers it. The finisher checks that the
   identity coming back is the user who consented, makes the grant and redirects with a code (or approves the
   device authorization of the device flow).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from aiohttp import web
from multidict import MultiDictProxy

from .. import handlers, logs
from ..config import Config
from ..context import Services, view_of
from ..cookies import SessionRef, SignInAttempt
from ..guard import browser_session
from ..models import Identity, Session, TokenSet
from ..policy import why_denied
from ..ratelimit import retry_after
from ..stepup import parse_max_age
from . import cimd, pages
from .acr import UNMET, parse_acr_values, unmet
from .client_metadata import redirect_registered
from .limits import new_document_wait
from .model import GRANT_AUTHORIZATION_CODE, Client, DeviceAuthorization
from .scopes import SCOPES, parse_scope
from .service import OAUTH, OAuthServer

__all__ = ["SCOPES", "parse_scope"]  # where device.py and older callers find them

log = logging.getLogger("sidecar.oauth")

PENDING_TTL = 600.0  # a consent must be given within ten minutes
MAX_QUERY_CHARS = 4096
MAX_STATE_CHARS = 1024
MAX_NONCE_CHARS = 512
_S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_SINGLE = (
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
    "scope",
    "resource",
    "max_age",
    "acr_values",
    "prompt",
    "response_mode",
    "nonce",
)


# --- shared by the browser-facing endpoints -------------------------------------------------------------------


def pick_resource(request: web.Request, oauth: OAuthServer, values: list[str]) -> tuple[str, str] | None:
    """(canonical resource URI, its path) named by the ``resource`` parameter (RFC 8707): exactly one of ours,
    a single trailing "/" tolerated; none given is allowed only when there is exactly one resource."""
    paths = oauth.config.oauth_resources
    if not values:
        return (oauth.resource_for(request, paths[0]), paths[0]) if len(paths) == 1 else None
    if len(values) != 1:
        return None
    for path in paths:
        canonical = oauth.resource_for(request, path)
        if values[0] in (canonical, canonical + "/"):
            return canonical, path
    return None


async def read_post(request: web.Request) -> MultiDictProxy[Any] | None:
    """The fields of a form POST; None for a body aiohttp cannot parse (bytes that are not UTF-8, an unknown
    charset, broken multipart): the client's mistake, answered 400, never a 500."""
    try:
        return await request.post()
    except (ValueError, LookupError):
        return None


def csrf_token(config: Config, sid: str, bound_to: str, secret: bytes | None = None) -> str:
    """An HMAC under the cookie secret of the browser session id and what the form acts on: a form from
    another session, or for another pending request, does not verify."""
    key = secret if secret is not None else config.cookie_secrets[0]
    mac = hmac.new(key, f"sidecar.oauth.csrf\0{sid}\0{bound_to}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def csrf_ok(config: Config, sid: str, bound_to: str, presented: str) -> bool:
    """Any configured cookie secret may have made it (secret rotation)."""
    return bool(presented) and any(
        hmac.compare_digest(csrf_token(config, sid, bound_to, secret).encode(), presented.encode())
        for secret in config.cookie_secrets
    )


async def find_client(app: web.Application, client_id: str) -> Client | None:
    """A registered client, or one described by its Client ID Metadata Document (``cimd.py``)."""
    return (await resolve_client(app, client_id))[0]


async def resolve_client(app: web.Application, client_id: str) -> tuple[Client | None, str]:
    """(client, why there is none)."""
    return await cimd.resolve_client(app, client_id)


async def grant_scope(svc: Services) -> str:
    """What the grant's upstream sign-in asks for: ``--scope``, plus ``offline_access`` where the provider lists
    it (a refresh token that outlives the browser session)."""
    scope = svc.config.scope
    if "offline_access" in (await svc.oidc.metadata()).scopes_supported and "offline_access" not in scope.split():
        scope += " offline_access"
    return scope


def sign_in_first(svc: Services, request: web.Request) -> web.Response:
    """To the normal browser sign-in, returning to this very request (a relative URL)."""
    rd = request.rel_url.raw_path_qs
    location = f"{svc.config.proxy_prefix}/start?rd={quote(rd, safe='')}"
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def same_origin(request: web.Request) -> bool:
    return handlers._same_origin(request)


# --- the pending authorization ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """An authorization waiting for the user's consent and the grant's sign-in (server-side, 10 minutes)."""

    kind: str  # "code" | "device"
    client_id: str
    resource: str
    resource_path: str
    scope: str
    sub: str  # the browser user who saw the consent page
    redirect_uri: str = ""
    state: str | None = None
    code_challenge: str = ""
    device_code_hash: str = ""
    approved: bool = False
    nonce: str = ""
    max_age: int | None = None  # OIDC Core 3.1.2.1: the grant's upstream sign-in must be at most this old
    acr_values: str = ""  # OIDC Core 3.1.2.1: classes the grant's upstream sign-in must meet (``acr``)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> Pending | None:
        if raw is None:
            return None
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError):
            return None


def _pending_key(pending_id: str) -> str:
    return "consent:" + hashlib.sha256(pending_id.encode()).hexdigest()


async def save_pending(oauth: OAuthServer, pending: Pending, pending_id: str | None = None) -> str:
    pending_id = pending_id or secrets.token_urlsafe(24)
    await oauth.store.put_pending(_pending_key(pending_id), pending.to_bytes(), PENDING_TTL)
    return pending_id


async def consent_page(
    request: web.Request,
    svc: Services,
    authed: tuple[SessionRef, Session],
    client: Client,
    pending: Pending,
    device: DeviceAuthorization | None = None,
) -> web.Response:
    """Keep ``pending`` server-side and show the consent form for it (for a device: with its code, and when
    and from where it was asked for, so a person sent someone else's code can see it is not theirs)."""
    oauth = request.app[OAUTH]
    pending_id = await save_pending(oauth, pending)
    ref, session = authed
    view = pages.ConsentView(
        client_name=client.client_name or client.client_id,
        client_id=client.client_id,
        verified=False,  # self-registered (DCR) or self-described (metadata document): nothing vouches for its name
        client_host=urlsplit(client.client_id).netloc if client.metadata_document else "",
        redirect_uri=pending.redirect_uri,
        resource=pending.resource,
        scopes=pending.scope.split(),
        user=session.identity.email or session.identity.user,
        pending=pending_id,
        csrf=csrf_token(svc.config, ref.sid, "consent:" + pending_id),
        action=f"{svc.config.proxy_prefix}/consent",
        device_code=pretty_code(device.user_code) if device else "",
        requested_at=device.requested_at if device else 0.0,
        requested_from=device.requested_from if device else "",
    )
    return pages.consent(svc.config, view)


def pretty_code(user_code: str) -> str:
    """``ABCD-EFGH``: the user code as the device shows it."""
    return f"{user_code[:4]}-{user_code[4:]}" if len(user_code) == 8 else user_code


# --- GET P/authorize ---------------------------------------------------------------------------------------------


def _error_page(svc: Services, text: str) -> web.Response:
    """Errors that must not redirect: the redirect URI is not known to be the client's."""
    return pages.message(svc.config, "Authorization request refused", text, status=400)


def is_loopback(redirect_uri: str) -> bool:
    """A native client's loopback listener (RFC 8252 7.3). An error for a request nobody approved goes back only
    there: sent to an https URI, which anyone may register, it would make this origin an open redirector."""
    parts = urlsplit(redirect_uri)
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost")


def to_client(redirect_uri: str, params: dict[str, str | None]) -> web.Response:
    """A 302 to the client's registered redirect URI with ``params`` added to its query."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    sep = "&" if "?" in redirect_uri else "?"
    return web.Response(
        status=302,
        headers={"Location": f"{redirect_uri}{sep}{query}", "Cache-Control": "no-store", "Pragma": "no-cache"},
    )


async def authorize(request: web.Request, svc: Services) -> web.Response:
    """RFC 6749 4.1.1 with OAuth 2.1's rules; see the module docstring for the order of the checks."""
    oauth = request.app[OAUTH]
    query = request.query
    if len(request.rel_url.raw_query_string) > MAX_QUERY_CHARS:
        return _error_page(svc, "The authorization request is too long.")
    client_ids, redirect_uris = query.getall("client_id", []), query.getall("redirect_uri", [])
    if len(client_ids) != 1 or len(redirect_uris) != 1:
        return _error_page(svc, "The request must name its client_id and redirect_uri exactly once.")
    wait = await new_document_wait(request, client_ids[0])
    if wait:
        response = pages.message(svc.config, "Too many requests", "Too many new applications; wait a minute.", 429)
        response.headers["Retry-After"] = retry_after(wait)
        return response
    client, why = await resolve_client(request.app, client_ids[0])
    if client is None and client_ids[0].startswith("https://") and svc.config.oauth_client_metadata_documents:
        logs.event("oauth_authorize_refused", {"client_id": client_ids[0][:200], "reason": "client_metadata"})
        return _error_page(svc, f"This application's client metadata document was not accepted: {why}.")
    if client is None:
        return _error_page(svc, "This application is not registered (or its registration expired).")
    redirect_uri = redirect_uris[0]
    if not redirect_registered(client.redirect_uris, redirect_uri):
        logs.event("oauth_authorize_refused", {"client_id": client.client_id, "reason": "redirect_uri"})
        return _error_page(svc, "The redirect URI is not one this application registered.")
    states = query.getall("state", [])
    state = states[0] if len(states) == 1 and len(states[0]) <= MAX_STATE_CHARS else None
    iss = oauth.issuer(request)

    def error(code: str, description: str) -> web.Response:
        fields = {"client_id": client.client_id, "reason": code}
        logs.event("oauth_authorize_refused", fields)
        if not is_loopback(redirect_uri):  # RFC 9700 4.11.2: no redirect nobody approved to a URI anyone registers
            return _error_page(svc, f"The authorization request was refused ({code}: {description}).")
        return to_client(redirect_uri, {"error": code, "error_description": description, "state": state, "iss": iss})

    problem = _request_problem(query, client)
    if problem is not None:
        return error(*problem)
    found = pick_resource(request, oauth, query.getall("resource", []))
    if found is None:
        return error("invalid_target", "resource must name one of this server's protected resources")
    scope = parse_scope(query.get("scope"), client.scope)
    if scope is None:
        return error("invalid_scope", f"scopes offered: {client.scope or ' '.join(SCOPES)}")
    authed = await browser_session(request, svc)
    if query.get("prompt") == "none":
        return error("login_required" if authed is None else "consent_required", "this server always asks the user")
    if authed is None:
        return sign_in_first(svc, request)
    session = authed[1]
    if why_denied(session.identity, svc.config) is not None:
        raise web.HTTPForbidden()
    if not client.metadata_document:
        await oauth.store.touch_client(client.client_id, float(svc.config.oauth_client_idle_timeout))
    pending = Pending(
        kind="code",
        client_id=client.client_id,
        resource=found[0],
        resource_path=found[1],
        scope=scope,
        sub=session.identity.sub,
        redirect_uri=redirect_uri,
        state=state,
        code_challenge=query["code_challenge"],
        nonce=query.get("nonce", ""),
        max_age=parse_max_age(query["max_age"]) if "max_age" in query else None,
        acr_values=parse_acr_values(query["acr_values"]) or "" if "acr_values" in query else "",
    )
    return await consent_page(request, svc, authed, client, pending)


def _request_problem(query: Any, client: Client) -> tuple[str, str] | None:
    """(error, description) for what is wrong with a request whose client and redirect URI are fine."""
    for name in _SINGLE:
        if len(query.getall(name, [])) > 1:
            return "invalid_request", f"{name} given more than once"
    if len(query.get("state", "")) > MAX_STATE_CHARS:
        return "invalid_request", "state too long"
    response_type = query.get("response_type")
    if not response_type:
        return "invalid_request", "response_type missing"
    if response_type != "code":
        return "unsupported_response_type", "only response_type=code"
    if query.get("response_mode", "query") != "query":
        return "invalid_request", "only response_mode=query"
    if GRANT_AUTHORIZATION_CODE not in client.grant_types:
        return "unauthorized_client", "this client did not register the authorization_code grant"
    challenge, method = query.get("code_challenge"), query.get("code_challenge_method")
    if not challenge:
        return "invalid_request", "code_challenge required (PKCE)"
    if method != "S256":
        return "invalid_request", "code_challenge_method must be S256"
    if not _S256_CHALLENGE.fullmatch(challenge):
        return "invalid_request", "code_challenge must be a base64url SHA-256 (43 characters)"
    for name in ("request", "request_uri"):  # OIDC Core 6: not supported, and said so in discovery
        if name in query:
            return f"{name}_not_supported", f"the {name} parameter is not supported"
    if "max_age" in query and parse_max_age(query["max_age"]) is None:
        return "invalid_request", "max_age must be a whole number of seconds"
    if "acr_values" in query and parse_acr_values(query["acr_values"]) is None:
        return "invalid_request", "acr_values must be up to 10 space-separated printable ASCII values"
    nonce = query.get("nonce", "")
    if len(nonce) > MAX_NONCE_CHARS or not nonce.isascii() or not nonce.isprintable():
        return "invalid_request", "nonce must be printable ASCII of at most 512 characters"
    return None


# --- POST P/consent ------------------------------------------------------------------------------------------------


async def consent(request: web.Request, svc: Services) -> web.Response:
    """The consent form's answer: same origin, the same browser session, a CSRF token for this pending request."""
    config = svc.config
    if not same_origin(request):
        return pages.message(config, "Refused", "Cross-site form submission refused.", status=403)
    form = await read_post(request)
    if form is None:
        return pages.message(config, "Bad request", "The form could not be read.", status=400)
    pending_id, csrf, decision = (str(form.get(name, ""))[:200] for name in ("pending", "csrf", "decision"))
    authed = await browser_session(request, svc)
    if authed is None:
        return pages.message(config, "Not signed in", "Your session ended; start again from the application.", 403)
    ref, session = authed
    if not pending_id or not csrf_ok(config, ref.sid, "consent:" + pending_id, csrf):
        return pages.message(config, "Refused", "This form is not from your session (CSRF check failed).", status=403)
    oauth = request.app[OAUTH]
    pending = Pending.from_bytes(await oauth.store.get_pending(_pending_key(pending_id)))
    if pending is None:
        return pages.message(config, "Request expired", "This request expired; start again from the application.", 400)
    if pending.sub != session.identity.sub:
        return pages.message(config, "Refused", "This request was shown to another user.", status=403)
    if decision == "deny":
        return await _deny(request, oauth, pending_id, pending)
    if decision != "approve":
        return pages.message(config, "Bad request", "Choose Allow or Deny.", status=400)
    await save_pending(oauth, Pending(**{**asdict(pending), "approved": True}), pending_id)
    logs.event("oauth_consent", {**logs.who(session.identity), "client_id": pending.client_id, "kind": pending.kind})
    # With max_age, the provider is asked for a sign-in at most that old and the callback checks auth_time
    # (stepup.callback_problem), as for a browser step-up: an RFC 9470 client asking again gets a fresh one.
    return await handlers.begin_sign_in(
        request,
        svc,
        "/",
        purpose=f"grant:{pending_id}",
        scope=await grant_scope(svc),
        max_age=pending.max_age,
        acr_values=pending.acr_values or None,
        offline=True,
    )


async def _deny(request: web.Request, oauth: OAuthServer, pending_id: str, pending: Pending) -> web.Response:
    """Back to the client with ``access_denied``; for a device, its polling now gets ``access_denied``."""
    await oauth.store.take_pending(_pending_key(pending_id))
    logs.event("oauth_consent_denied", {"client_id": pending.client_id, "kind": pending.kind})
    if pending.kind == "device":
        device = await oauth.store.device_by_code_hash(pending.device_code_hash)
        if device is not None and device.status == "pending":
            await oauth.store.update_device(_with_status(device, "denied"), "pending")
        return pages.message(oauth.config, "Access denied", "The device was not given access.")
    params = {"error": "access_denied", "state": pending.state, "iss": oauth.issuer(request)}
    return to_client(pending.redirect_uri, params)


async def _drop_upstream(oauth: OAuthServer, tokens: TokenSet) -> None:
    """No grant is made after the grant's own upstream sign-in: its refresh token (often ``offline_access``,
    valid for months) belongs to nobody, so it is revoked as a grant's end would (best effort, never raises)."""
    if tokens.refresh_token:
        outcome = await oauth.svc.oidc.revoke(tokens.refresh_token, "refresh_token")
        logs.event("oauth_grant_refused_upstream", {"refresh_token": outcome})


def _with_status(device: DeviceAuthorization, status: str) -> DeviceAuthorization:
    return DeviceAuthorization(**{**asdict(device), "status": status})


# --- the "grant" sign-in finisher ----------------------------------------------------------------------------


async def finish_grant(
    request: web.Request, attempt: SignInAttempt, identity: Identity, tokens: TokenSet, claims: dict[str, Any]
) -> web.Response:
    """The grant's own upstream sign-in came back: make the grant, then a code (or the device's approval)."""
    oauth = request.app[OAUTH]
    config = oauth.config
    pending_id = attempt.purpose.partition(":")[2]
    pending = Pending.from_bytes(await oauth.store.take_pending(_pending_key(pending_id)))
    if pending is None or not pending.approved:
        await _drop_upstream(oauth, tokens)
        return pages.message(config, "Request expired", "This request expired; start again from the application.", 400)
    if identity.sub != pending.sub:
        logs.event("oauth_grant_refused", {"client_id": pending.client_id, "reason": "other_user"})
        await _drop_upstream(oauth, tokens)
        return pages.message(
            config, "Refused", "You signed in as a different user than the one who allowed access.", status=403
        )
    client = await find_client(request.app, pending.client_id)
    if client is None:
        await _drop_upstream(oauth, tokens)
        return pages.message(config, "Request expired", "The application's registration expired.", 400)
    unmet_why = unmet(claims, pending.acr_values) if pending.acr_values else None
    if unmet_why is not None:  # fail-closed (acr.py): no grant, and the client is told why
        logs.event("oauth_grant_refused", {"client_id": pending.client_id, "reason": UNMET})
        await _drop_upstream(oauth, tokens)
        params = {"error": UNMET, "error_description": unmet_why, "state": pending.state}
        return to_client(pending.redirect_uri, {**params, "iss": oauth.issuer(request)})
    if pending.kind == "device" and not await _device_waiting(oauth, pending):
        await _drop_upstream(oauth, tokens)
        return pages.message(config, "Code expired", "The device code expired or was used; start again.", 400)
    # A user granted it access: no longer an unused registration. Unless the unused pool forgot it since it was
    # read (a registration on another replica): then no grant for it.
    idle = float(config.oauth_client_idle_timeout)
    if not client.metadata_document and not await oauth.store.promote_client(client.client_id, idle):
        await _drop_upstream(oauth, tokens)
        return pages.message(config, "Request expired", "The application's registration expired.", 400)
    grant, key = await oauth.start_grant(
        identity,
        tokens,
        claims,
        client,
        pending.resource,
        pending.resource_path,
        pending.scope,
        view_of(request).client_ip,
        request.headers.get("User-Agent", ""),
    )
    if pending.kind == "device":
        device = await oauth.store.device_by_code_hash(pending.device_code_hash)
        if device is None or not await oauth.approve_device(device, grant, key):
            return pages.message(config, "Code expired", "The device code expired or was used; start again.", 400)
        return pages.message(config, "Device connected", "You may close this page and return to your device.")
    code = await oauth.issue_code(grant, key, pending.redirect_uri, pending.code_challenge, pending.nonce)
    return to_client(pending.redirect_uri, {"code": code, "state": pending.state, "iss": oauth.issuer(request)})


async def _device_waiting(oauth: OAuthServer, pending: Pending) -> bool:
    device = await oauth.store.device_by_code_hash(pending.device_code_hash)
    return device is not None and device.status == "pending" and device.expires_at > time.time()
