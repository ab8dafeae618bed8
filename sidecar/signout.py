"""Sign-out (here, everywhere, at the provider) and OIDC back-channel logout; the same-origin check of
the browser path's forms."""

from __future__ import annotations

import hashlib
import html
import logging
import time
from urllib.parse import quote, urlsplit

from aiohttp import web

from . import csrf, logs, pages
from .context import Services, services, view_of
from .errors import InvalidCookie, SessionGone, TokenValidationError
from .guard import absolute, clear_session_cookie, read_cookie
from .oidc import logout_token_replay_ttl
from .signin import redirect_target

log = logging.getLogger("sidecar.handlers")

_TRUE = ("1", "true", "yes", "on")

_page = pages.page


def _same_origin(request: web.Request) -> bool:
    """A state-changing POST must come from our own pages.

    A real origin in ``Origin`` decides. ``Origin: null`` is what Chromium sends for a same-origin form
    posted from a page whose referrer policy hides the origin, and also what a sandboxed or opaque page
    sends, so then ``Sec-Fetch-Site`` decides (``same-origin`` or ``none``, a typed-in navigation); a
    ``null`` without it is refused. Clients that send neither header (curl, scripts) are not browsers
    riding on a cookie from another site. A browser sends each header once: two of either, or an
    ``Origin`` that is not a bare origin, is refused, never read by its first value."""
    origins = request.headers.getall("Origin", [])
    sites = request.headers.getall("Sec-Fetch-Site", [])
    if len(origins) > 1 or len(sites) > 1:
        return False
    origin = origins[0].strip() if origins else None
    site = sites[0].strip().lower() if sites else None
    if origin is not None and origin.lower() != "null":
        view = view_of(request)
        ours = _origin_tuple(f"{view.scheme}://{view.host}")
        # a browser that says cross-site is believed even when Origin looks right (it cannot be forged by a page)
        return ours is not None and _origin_tuple(origin) == ours and site in (None, "same-origin")
    if origin is not None:  # "null"
        return site in ("same-origin", "none")
    return site is None or site in ("same-origin", "none")


def _origin_tuple(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the default port filled in; None for ``null`` or anything that is not a bare
    ``scheme://host[:port]`` (user info, a query or fragment, a path other than ``/``)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    if "@" in parts.netloc or parts.query or parts.fragment or "?" in origin or "#" in origin:
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


async def _wants_everywhere(request: web.Request) -> bool:
    value = request.query.get("everywhere", "")
    if not value and request.method == "POST":
        value = str((await request.post()).get("everywhere", ""))
    return value.lower() in _TRUE


def _confirm_everywhere_page(request: web.Request) -> web.Response:
    """A GET never signs a user out everywhere (a link or image on another site could): it asks for a POST,
    with a token bound to this browser's session (``csrf.py``)."""
    svc = services(request)
    prefix = svc.config.proxy_prefix
    back = f"&rd={quote(redirect_target(request), safe='')}" if _rd_given(request) else ""
    action = html.escape(f"{prefix}/sign_out?everywhere=true{back}", quote=True)
    return _page(
        request,
        "Sign out everywhere?",
        "<p>This ends your sessions in every browser and every connected application (command-line tools, "
        "MCP clients), not only here.</p>"
        f"<form method='post' action='{action}'>{everywhere_field(svc, read_cookie(request, svc.config.cookie_name))}"
        "<div class='buttons'><button type='submit'>Sign out everywhere</button></div></form>",
    )


def everywhere_field(svc: Services, cookie: str | None) -> str:
    """The hidden CSRF field of a "sign out everywhere" form for the browser holding ``cookie`` (none without
    a readable one: such a post has no session to end)."""
    try:
        sid = svc.codec.load_session(cookie, time.time()).sid if cookie else None
    except InvalidCookie:
        sid = None
    if sid is None:
        return ""
    token = html.escape(csrf.form_token(svc.config, sid, csrf.EVERYWHERE), quote=True)
    return f"<input type='hidden' name='csrf' value='{token}'>"


def _rd_given(request: web.Request) -> bool:
    return bool(request.query.get("rd") or request.headers.get("X-Auth-Request-Redirect"))


def _after_sign_out(request: web.Request, everywhere: bool) -> str:
    """Where the browser lands: the ``rd`` asked for, else the signed-out page (which says so)."""
    if _rd_given(request):
        return redirect_target(request)
    return services(request).config.proxy_prefix + "/signed_out" + ("?everywhere=1" if everywhere else "")


async def sign_out(request: web.Request, svc: Services) -> web.Response:
    """End the session here, revoke its refresh token at the provider, clear the cookie.

    A plain sign-out may be a GET (oauth2-proxy compatible); "everywhere" needs a same-origin POST carrying
    the confirmation form's token (``csrf.py``), bound to this browser's session."""
    everywhere = await _wants_everywhere(request)
    if everywhere and request.method != "POST":
        return _confirm_everywhere_page(request)
    if request.method not in ("GET", "HEAD") and not _same_origin(request):
        text = "403 Forbidden: cross-site sign-out refused\n"
        return pages.error(request, 403, "Refused", "A sign-out posted from another site was refused.", (), text=text)
    config = svc.config
    rd = _after_sign_out(request, everywhere)
    id_token, signed_in = None, False
    cookie = read_cookie(request, config.cookie_name)
    if cookie:
        try:
            ref = svc.codec.load_session(cookie, time.time())
            svc.codec.forget(cookie)
            session = await svc.sessions.load_fresh(ref)
        except (InvalidCookie, SessionGone):
            session = None
        if session is not None and everywhere and not await _everywhere_token_ok(request, svc, ref.sid):
            text = "403 Forbidden: sign out everywhere needs the form of this browser's session\n"
            message = "This form is not from your session (CSRF check failed). Nothing was signed out."
            return pages.error(request, 403, "Refused", message, (), text=text)
        if session is not None and everywhere:
            for before in svc.sign_out_everywhere:  # the user's CLI/MCP grants, revoked upstream
                await before(session.identity.sub)
            await svc.sessions.end_all_for_user(session.identity.sub)
        if session is not None:
            await svc.sessions.end(ref, session, reason="sign_out")
            revoked = "none"
            if session.tokens.refresh_token:
                revoked = await svc.oidc.revoke(session.tokens.refresh_token, "refresh_token")
            fields = {**logs.who(session.identity), "everywhere": everywhere, "client_ip": view_of(request).client_ip}
            logs.event("sign_out", {**fields, "refresh_token": revoked})
            id_token, signed_in = session.tokens.id_token, True
    location = rd
    if config.provider_sign_out and signed_in:
        try:
            location = await svc.oidc.end_session_url(id_token, absolute(request, rd)) or rd
        except Exception:  # noqa: BLE001 - the local sign-out already happened; never fail it here
            location = rd
    response = web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
    clear_session_cookie(response, config)
    return response


async def _everywhere_token_ok(request: web.Request, svc: Services, sid: str) -> bool:
    presented = (await request.post()).get("csrf", "")
    return isinstance(presented, str) and csrf.form_token_ok(svc.config, sid, csrf.EVERYWHERE, presented)


async def backchannel_logout(request: web.Request, svc: Services) -> web.Response:
    """OIDC Back-Channel Logout: the provider tells us a user's (or one provider session's) sign-out.
    The token must be recent (``iat``; ``exp`` when it has one) and its ``jti`` unseen: a replay is refused (400), so a
    captured token cannot be posted again. A token we cannot check yet (its key not fetchable right
    now, the store down) is 503 or 504, and the provider retries."""
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
    seen = hashlib.sha256(f"{claims['iss']}\n{claims['jti']}".encode()).hexdigest()
    if not await svc.sessions.store.remember_once("lt:" + seen, logout_token_replay_ttl(claims, time.time())):
        log.warning("logout token rejected", extra={"fields": {"detail": "replayed jti"}})
        return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
    ended = 0
    sid = claims.get("sid") if isinstance(claims.get("sid"), str) and claims["sid"] else None  # "" names none
    if sid is not None:
        ended += await svc.sessions.end_provider_session(sid)
    if isinstance(claims.get("sub"), str) and claims["sub"] and sid is None:
        ended += await svc.sessions.end_all_for_user(claims["sub"], reason="backchannel_logout")
    log.info("back-channel logout", extra={"fields": {"sessions_ended": ended}})
    return web.Response(status=200, headers=headers)
