"""The sidecar's own endpoints: ``/oauth2/*``, ``/ping``, ``/ready`` and ``/metrics``."""

from __future__ import annotations

import html
import json
import logging
import secrets
import time
from typing import Any

from aiohttp import web

from . import metrics
from .context import Services, services, view_of
from .cookies import state_cookie_suffix
from .errors import InvalidCookie, InvalidState, SessionGone, StoreUnavailable, TokenValidationError
from .guard import absolute, authenticate, authorize, clear_cookie, clear_session_cookie, set_cookie
from .headers import auth_response_headers_for
from .middleware import guarded
from .oidc import Pkce
from .policy import identity_from_claims, is_allowed
from .urls import safe_redirect

log = logging.getLogger("sidecar.handlers")

STATE_TTL = 600.0  # a sign-in attempt must finish within ten minutes


def _page(title: str, body: str, status: int = 200) -> web.Response:
    title = html.escape(title)
    text = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body style='font-family:sans-serif;max-width:40em;margin:3em auto'><h1>{title}</h1>{body}</body></html>"
    )
    return web.Response(status=status, text=text, content_type="text/html")


def _rd(request: web.Request) -> str:
    """Where to return: ``rd``, else ``X-Auth-Request-Redirect`` (set by nginx's sign-in location,
    which cannot URL-escape the original URI itself), checked by ``safe_redirect``."""
    rd = request.query.get("rd") or request.headers.get("X-Auth-Request-Redirect")
    return safe_redirect(rd, view_of(request).host, services(request).config.whitelist_domain)


def _state_cookie_name(config: Any, state: str) -> str:
    return f"{config.cookie_name}_csrf_{state_cookie_suffix(state)}"


async def start(request: web.Request, svc: Services) -> web.Response:
    """Begin sign-in: remember (verifier, nonce, rd) under a fresh state, send the browser to the provider."""
    state, nonce, pkce = secrets.token_urlsafe(32), secrets.token_urlsafe(32), Pkce.new()
    pending = json.dumps({"v": pkce.verifier, "n": nonce, "rd": _rd(request)}).encode()
    url = await svc.oidc.authorize_url(state, nonce, pkce)
    await svc.sessions.store.put_state(state, pending, STATE_TTL)
    response = web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})
    set_cookie(response, svc.config, _state_cookie_name(svc.config, state), svc.codec.dump_state(state), STATE_TTL)
    return response


async def callback(request: web.Request, svc: Services) -> web.Response:
    """Finish sign-in. State is checked (cookie, then single-use store entry) before any provider call."""
    config = svc.config
    if "error" in request.query:
        reason = html.escape(request.query.get("error", "")[:100])
        return _page(
            "Sign-in failed",
            f"<p>The identity provider said: {reason}</p><p><a href='/oauth2/sign_in'>Try again</a></p>",
            status=403,
        )
    state, code = request.query.get("state", ""), request.query.get("code", "")
    if not state or not code or len(state) > 256 or len(code) > 4096:
        raise InvalidState("callback without state or code")
    issuer = request.query.get("iss")
    if issuer is not None and issuer != (await svc.oidc.metadata()).issuer:
        raise InvalidState("callback iss does not name our provider (RFC 9207)")
    cookie_name = _state_cookie_name(config, state)
    svc.codec.check_state(request.cookies.get(cookie_name), state, STATE_TTL)
    raw = await svc.sessions.store.take_state(state)  # atomic: a state can be used once
    if raw is None:
        raise InvalidState("sign-in state unknown, expired or already used")
    pending = json.loads(raw)
    tokens = await svc.oidc.exchange_code(code, pending["v"])
    if not tokens.id_token:
        raise TokenValidationError("token response has no id_token")
    claims = await svc.oidc.validate_id_token(tokens.id_token, nonce=pending["n"])
    identity = identity_from_claims(claims, config)
    if not is_allowed(identity, config):
        metrics.DECISIONS.add("403")
        response = _page("Access denied", "<p>Your account is not allowed to use this application.</p>", 403)
        clear_cookie(response, config, cookie_name)
        return response
    await _end_previous_session(request)
    ref, _ = await svc.sessions.create(identity, tokens, claims)
    response = web.Response(status=302, headers={"Location": pending["rd"], "Cache-Control": "no-store"})
    set_cookie(response, config, config.cookie_name, svc.codec.dump_session(ref), config.cookie_expire)
    clear_cookie(response, config, cookie_name)
    return response


async def _end_previous_session(request: web.Request) -> None:
    """A sign-in replaces whatever session the browser had; its old record goes."""
    svc = services(request)
    old = request.cookies.get(svc.config.cookie_name)
    if not old:
        return
    try:
        ref = svc.codec.load_session(old, time.time())
        await svc.sessions.end(ref, None, reason="replaced")
    except (InvalidCookie, StoreUnavailable):
        pass


async def sign_in(request: web.Request, svc: Services) -> web.Response:
    rd = html.escape(_rd(request), quote=True)
    from urllib.parse import quote

    href = html.escape(f"/oauth2/start?rd={quote(_rd(request), safe='')}", quote=True)
    return _page(
        "Sign in",
        f"<p>This application is protected.</p><p><a href='{href}'>Sign in</a></p>"
        f"<p style='color:#888'>You will return to {rd}</p>",
    )


async def sign_out(request: web.Request, svc: Services) -> web.Response:
    """End the session here, revoke its refresh token at the provider, clear the cookie."""
    config = svc.config
    rd = _rd(request)
    id_token, signed_in = None, False
    cookie = request.cookies.get(config.cookie_name)
    if cookie:
        try:
            ref = svc.codec.load_session(cookie, time.time())
            svc.codec.forget(cookie)
            session = await svc.sessions.load_fresh(ref)
        except (InvalidCookie, SessionGone):
            session = None
        if session is not None and request.query.get("everywhere", "").lower() in ("1", "true", "yes"):
            await svc.sessions.end_all_for_user(session.identity.sub)
        if session is not None:
            await svc.sessions.end(ref, session, reason="sign_out")
            id_token, signed_in = session.tokens.id_token, True
            if session.tokens.refresh_token:
                await svc.oidc.revoke(session.tokens.refresh_token, "refresh_token")
    location = rd
    if config.provider_sign_out and signed_in:
        try:
            location = await svc.oidc.end_session_url(id_token, absolute(request, rd)) or rd
        except Exception:  # noqa: BLE001 - the local sign-out already happened; never fail it here
            location = rd
    response = web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
    clear_session_cookie(response, config)
    return response


async def backchannel_logout(request: web.Request, svc: Services) -> web.Response:
    """OIDC Back-Channel Logout: the provider tells us a user's (or one provider session's) sign-out.
    A replayed token only signs out again, so no replay store is kept."""
    form = await request.post()
    token = form.get("logout_token")
    headers = {"Cache-Control": "no-store"}
    if not isinstance(token, str) or not token or len(token) > 16384:
        return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
    try:
        claims = await svc.oidc.validate_logout_token(token)
    except TokenValidationError as exc:
        log.warning("logout token rejected", extra={"fields": {"detail": str(exc)}})
        return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
    ended = 0
    if isinstance(claims.get("sid"), str):
        ended += await svc.sessions.end_provider_session(claims["sid"])
    if isinstance(claims.get("sub"), str) and not isinstance(claims.get("sid"), str):
        ended += await svc.sessions.end_all_for_user(claims["sub"], reason="backchannel_logout")
    log.info("back-channel logout", extra={"fields": {"sessions_ended": ended}})
    return web.Response(status=200, headers=headers)


async def auth(request: web.Request, svc: Services) -> web.Response:
    """nginx auth_request target: 202 with identity headers, 401 or 403. Never a redirect, never a cookie:
    nginx only understands 2xx/401/403 here, and the browser is sent to sign in by nginx's error_page."""
    try:
        _, session = await authenticate(request, svc)
    except SessionGone:
        metrics.DECISIONS.add("401")
        return web.Response(status=401, text="401 Unauthorized\n")
    if not is_allowed(session.identity, svc.config):
        metrics.DECISIONS.add("403")
        return web.Response(status=403, text="403 Forbidden\n")
    metrics.DECISIONS.add("202")
    return web.Response(status=202, headers=auth_response_headers_for(session, svc.config))


async def userinfo(request: web.Request, svc: Services) -> web.Response:
    try:
        _, session = await authorize(request, svc)
    except SessionGone:
        return web.json_response({"error": "not signed in"}, status=401)
    ident, tokens = session.identity, session.tokens
    return web.json_response(
        {
            "user": ident.user,
            "email": ident.email,
            "groups": list(ident.groups),
            "preferred_username": ident.preferred_username,
            "access_token_expires_at": tokens.access_expires_at,
            "refresh_count": session.refresh_count,
            "signed_in_at": session.signed_in_at,
        },
        headers={"Cache-Control": "no-store"},
    )


async def ping(request: web.Request, svc: Services) -> web.Response:
    return web.Response(text="OK\n")


async def ready(request: web.Request, svc: Services) -> web.Response:
    try:
        await svc.sessions.store.ping()
    except StoreUnavailable:
        return web.Response(status=503, text="session store unreachable\n")
    return web.Response(text="OK\n")


async def metrics_page(request: web.Request, svc: Services | None = None) -> web.Response:
    return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")


def add_routes(app: web.Application, with_metrics: bool) -> None:
    routes = [
        ("GET", "/oauth2/start", start),
        ("GET", "/oauth2/callback", callback),
        ("GET", "/oauth2/sign_in", sign_in),
        ("*", "/oauth2/sign_out", sign_out),
        ("*", "/oauth2/auth", auth),
        ("GET", "/oauth2/userinfo", userinfo),
        ("POST", "/oauth2/backchannel_logout", backchannel_logout),
        ("GET", "/ping", ping),
        ("GET", "/ready", ready),
    ]
    if with_metrics:
        routes.append(("GET", "/metrics", metrics_page))
    for method, path, handler in routes:
        if method == "GET":
            app.router.add_get(path, guarded(handler, path))  # HEAD too, for probes
        else:
            app.router.add_route(method, path, guarded(handler, path))
