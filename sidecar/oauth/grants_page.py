"""``GET P/grants`` and ``POST P/grants/revoke``: a signed-in user's CLI/MCP grants, and ending one.

Only the user's own grants are listed (the store's per-user index, by the browser session's ``sub``), and a
revoke for a grant of someone else is answered exactly like one for a grant that does not exist. Revoking
is a same-origin POST with a CSRF token bound to the browser session. ``Accept: application/json`` gets the
list as JSON, with the CSRF token a script needs to revoke through the same session.

"Sign out everywhere" (``/oauth2/sign_out?everywhere=true``) ends the user's grants too: it ends every
session record in the user's index, and a grant's upstream-token record is one of them; a grant whose
record is gone is refused by the resource guard and the token endpoint (they cannot open it).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import logs
from ..context import ConnectedApp, Services
from ..guard import browser_session
from ..policy import why_denied
from . import pages
from .authorize import csrf_ok, csrf_token, read_post, same_origin, sign_in_first
from .service import OAUTH

_BOUND = "grants"


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _not_signed_in(request: web.Request, svc: Services) -> web.Response:
    if _wants_json(request) or request.method != "GET":
        return web.json_response({"error": "not signed in"}, status=401, headers={"Cache-Control": "no-store"})
    return sign_in_first(svc, request)


async def grants(request: web.Request, svc: Services) -> web.Response:
    """The user's grants, most recently used first."""
    authed = await browser_session(request, svc)
    if authed is None:
        return _not_signed_in(request, svc)
    ref, session = authed
    if why_denied(session.identity, svc.config) is not None:
        raise web.HTTPForbidden()
    found = await request.app[OAUTH].store.user_grants(session.identity.sub)
    found = sorted(found, key=lambda g: g.last_used_at, reverse=True)
    csrf = csrf_token(svc.config, ref.sid, _BOUND)
    if _wants_json(request):
        items: list[dict[str, Any]] = [
            {
                "grant_id": g.grant_id,
                "client_id": g.client_id,
                "client_name": g.client_name,
                "resource": g.resource,
                "scope": g.scope,
                "created_at": g.created_at,
                "last_used_at": g.last_used_at,
                "last_used_from": g.last_used_from,
                "user_agent": g.user_agent,
                "expires_at": g.expires_at,
            }
            for g in found
        ]
        body = {"user": session.identity.email or session.identity.user, "grants": items, "csrf": csrf}
        return web.json_response(body, headers=pages.SECURITY_HEADERS)
    rows = [
        pages.GrantRow(
            grant_id=g.grant_id,
            client_name=g.client_name or g.client_id,
            client_id=g.client_id,
            resource=g.resource,
            created_at=g.created_at,
            last_used_at=g.last_used_at,
            last_used_from=g.last_used_from,
            user_agent=g.user_agent,
        )
        for g in found
    ]
    user = session.identity.email or session.identity.user
    return pages.grants(svc.config, user, rows, svc.config.proxy_prefix + "/grants/revoke", csrf)


async def revoke(request: web.Request, svc: Services) -> web.Response:
    """End one of the user's grants (its tokens and upstream-token record); 404 for any other grant id."""
    authed = await browser_session(request, svc)
    if authed is None:
        return _not_signed_in(request, svc)
    if not same_origin(request):
        return _answer(request, svc, 403, "cross-site form submission refused")
    ref, session = authed
    form = await read_post(request)
    if form is None:
        return _answer(request, svc, 400, "the form could not be read")
    if not csrf_ok(svc.config, ref.sid, _BOUND, str(form.get("csrf", ""))[:200]):
        return _answer(request, svc, 403, "CSRF check failed")
    grant_id = str(form.get("grant_id", ""))[:64]
    oauth = request.app[OAUTH]
    grant = await oauth.store.get_grant(grant_id) if grant_id else None
    if grant is None or grant.sub != session.identity.sub:
        return _answer(request, svc, 404, "no such grant")
    await oauth.end_grant(grant.grant_id, "revoked_by_user")
    logs.event("oauth_grant_revoked", {**logs.who(session.identity), "grant_id": grant.grant_id})
    if _wants_json(request):
        return web.json_response({"revoked": grant.grant_id}, headers={"Cache-Control": "no-store"})
    location = svc.config.proxy_prefix + "/grants"
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _answer(request: web.Request, svc: Services, status: int, text: str) -> web.Response:
    if _wants_json(request):
        return web.json_response({"error": text}, status=status, headers={"Cache-Control": "no-store"})
    title = {400: "Bad request", 403: "Refused"}.get(status, "Not found")
    return pages.message(svc.config, title, text.capitalize() + ".", status)


class GrantsAsApps:
    """The ``ConnectedApps`` hook: the account page lists and ends the user's grants through it."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    async def list(self, sub: str) -> list[ConnectedApp]:
        found = await self._app[OAUTH].store.user_grants(sub)
        return [
            ConnectedApp(
                app_id=g.grant_id,
                name=g.client_name or g.client_id,
                client_id=g.client_id,
                resource=g.resource,
                created_at=g.created_at,
                last_used_at=g.last_used_at,
                last_used_from=g.last_used_from,
            )
            for g in found
        ]

    async def revoke(self, sub: str, app_id: str) -> bool:
        oauth = self._app[OAUTH]
        grant = await oauth.store.get_grant(app_id[:64])
        if grant is None or grant.sub != sub:
            return False
        await oauth.end_grant(grant.grant_id, "revoked_by_user")
        return True
