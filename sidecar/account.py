"""The person's own pages: ``P/account`` (where am I signed in, which applications act for me) and
``P/signed_out``.

The account page lists, in one table, the user's browser sessions (the device in words from its
User-Agent, the address, when it signed in, when it was last active, "this browser") and the applications
connected through ``--oauth-server`` (their grants, through the ``Services.connected_apps`` hook: nothing
here imports ``sidecar.oauth``). Each row can be ended with a same-origin POST carrying a CSRF token bound
to this browser session; "sign out everywhere" ends them all.

Which records are the user's comes from the store's per-user index, the one "sign out everywhere" uses;
each browser session's device card (``devices.py``) says what to show; records without a card (a grant's
upstream tokens) are not browser sessions and are not listed as such.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web

from . import crypto, kit, logs
from .config import Config
from .context import Services
from .cookies import SessionRef
from .devices import CARD, open_card
from .errors import InvalidCookie, StoreUnavailable
from .guard import browser_session, clear_session_cookie, read_cookie
from .handlers import _same_origin, everywhere_field
from .middleware import guarded
from .models import Session
from .policy import why_denied
from .sessions import user_key

_BOUND = "account"


def _handle(config: Config, key: str) -> str:
    """What the page calls a session by: not its store key."""
    mac = hmac.new(config.cookie_secrets[0], b"sidecar.account.row\0" + key.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:12]).decode()


def _csrf(config: Config, sid: str, secret: bytes | None = None) -> str:
    key = secret if secret is not None else config.cookie_secrets[0]
    mac = hmac.new(key, f"sidecar.account.csrf\0{sid}\0{_BOUND}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _csrf_ok(config: Config, sid: str, presented: str) -> bool:
    return bool(presented) and any(
        hmac.compare_digest(_csrf(config, sid, s).encode(), presented.encode()) for s in config.cookie_secrets
    )


@dataclass(frozen=True)
class Row:
    kind: str  # "session" or "app"
    row_id: str
    what: str  # markup built from escaped parts
    where: str
    started: float
    last_active: float


async def _session_rows(svc: Services, ref: SessionRef, session: Session) -> list[Row]:
    rows = []
    sub = session.identity.sub
    for key in await svc.sessions.store.user_sessions(user_key(sub)):
        blob = await svc.sessions.store.get_outcome(CARD + key)
        record = await svc.sessions.store.load(key) if blob else None
        card = open_card(svc.config, sub, key, blob) if blob and record else None
        if card is None or record is None:
            continue
        here = key == ref.store_key
        what = kit.e(card.device) + (" <strong>(this browser)</strong>" if here else "")
        rows.append(Row("session", _handle(svc.config, key), what, card.address, card.signed_in_at, record.last_active))
    return rows


async def _app_rows(svc: Services, sub: str) -> list[Row]:
    if svc.connected_apps is None:
        return []
    return [
        Row(
            "app",
            app.app_id,
            f"{kit.name(app.name)} <span class='muted'>(application, <code>{kit.e(app.resource)}</code>)</span>",
            app.last_used_from or "",
            app.created_at,
            app.last_used_at,
        )
        for app in await svc.connected_apps.list(sub)
    ]


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at)) if at else "never"


def _table(rows: list[Row], action: str, csrf: str) -> str:
    cells = []
    for row in rows:
        label = "Sign out" if row.kind == "session" else "Revoke"
        cells.append(
            f"<tr><td data-label='Signed in with'>{row.what}</td><td data-label='From'>{kit.e(row.where)}</td>"
            f"<td data-label='Since'>{kit.e(_when(row.started))}</td>"
            f"<td data-label='Last active'>{kit.e(_when(row.last_active))}</td>"
            f"<td><form method='post' action='{kit.e(action)}'><input type='hidden' name='csrf' value='{kit.e(csrf)}'>"
            f"<input type='hidden' name='kind' value='{kit.e(row.kind)}'>"
            f"<input type='hidden' name='id' value='{kit.e(row.row_id)}'>"
            f"<button type='submit' class='secondary'>{label}</button></form></td></tr>"
        )
    head = (
        "<thead><tr><th scope='col'>Signed in with</th><th scope='col'>From</th><th scope='col'>Since</th>"
        "<th scope='col'>Last active</th><th scope='col'>End it</th></tr></thead>"
    )
    return f"<table>{head}<tbody>{''.join(cells)}</tbody></table>"


async def account(request: web.Request, svc: Services) -> web.Response:
    """The list: browser sessions first (this one on top), then applications, most recently active first."""
    authed = await browser_session(request, svc)
    if authed is None:
        return _sign_in_first(request, svc)
    ref, session = authed
    if why_denied(session.identity, svc.config) is not None:
        raise web.HTTPForbidden()
    sessions = await _session_rows(svc, ref, session)
    sessions.sort(key=lambda r: ("this browser" not in r.what, -r.last_active))
    apps = sorted(await _app_rows(svc, session.identity.sub), key=lambda r: -r.last_active)
    prefix = svc.config.proxy_prefix
    who = session.identity.email or session.identity.user
    body = (
        f"<p>Signed in as <strong>{kit.e(who)}</strong>. These browsers and applications can act as you. "
        "End any you do not recognise.</p>"
        + _table(sessions + apps, prefix + "/account/revoke", _csrf(svc.config, ref.sid))
        + "<h2>Everywhere at once</h2><p>Ends every session above, in every browser and application.</p>"
        f"<form method='post' action='{kit.e(prefix)}/sign_out?everywhere=true'>"
        f"{everywhere_field(svc, read_cookie(request, svc.config.cookie_name))}<div class='buttons'>"
        "<button type='submit'>Sign out everywhere</button></div></form>"
    )
    return _page(svc, "Your sessions and applications", body)


async def revoke(request: web.Request, svc: Services) -> web.Response:
    """End one row of the list: another browser session, this one (then signed out), or an application."""
    authed = await browser_session(request, svc)
    if authed is None:
        return _refused(svc, 401, "Not signed in", "Your session ended; sign in again.")
    if not _same_origin(request):
        return _refused(svc, 403, "Refused", "A form posted from another site was refused.")
    ref, session = authed
    try:
        form = await request.post()
    except (ValueError, LookupError):
        return _refused(svc, 400, "Bad request", "The form could not be read.")
    if not _csrf_ok(svc.config, ref.sid, str(form.get("csrf", ""))[:200]):
        return _refused(svc, 403, "Refused", "This form is not from your session (CSRF check failed).")
    kind, row_id = str(form.get("kind", "")), str(form.get("id", ""))[:100]
    sub = session.identity.sub
    fields = {**logs.who(session.identity), "kind": kind}
    ended = False
    if kind == "session":
        revoked = await _end_session(svc, sub, row_id)
        ended = revoked is not None
        fields["refresh_token"] = revoked or "none"
    elif kind == "app" and svc.connected_apps is not None and row_id:
        ended = await svc.connected_apps.revoke(sub, row_id)
    if not ended:
        return _refused(svc, 404, "Not found", "There is no such session or application in your list.")
    logs.event("account_revoked", fields)
    if kind == "session" and row_id == _handle(svc.config, ref.store_key):
        response = _see_other(svc.config.proxy_prefix + "/signed_out")
        clear_session_cookie(response, svc.config)
        return response
    return _see_other(svc.config.proxy_prefix + "/account")


async def _end_session(svc: Services, sub: str, row_id: str) -> str | None:
    """Only a key from this user's own index, named by its handle, can be ended. As sign-out does, the
    session's upstream refresh token is revoked (``OidcClient.revoke``: only at the endpoint discovery named);
    what happened to it is returned for the log line, None when there was no such session."""
    index = user_key(sub)
    for key in await svc.sessions.store.user_sessions(index):
        if not hmac.compare_digest(_handle(svc.config, key), row_id):
            continue
        blob = await svc.sessions.store.get_outcome(CARD + key)
        if not blob:
            return None
        card = open_card(svc.config, sub, key, blob)
        refresh_token, why = await _refresh_token(svc, key, card.session_key if card else None)
        await svc.sessions.end_users_session(sub, key)
        # The session is gone: its token is revoked before anything else can fail. The card left behind is
        # harmless (a card without its record is not listed) and lives no longer than the cookie could.
        outcome = await svc.oidc.revoke(refresh_token, "refresh_token") if refresh_token else why
        with contextlib.suppress(StoreUnavailable):
            await svc.sessions.store.put_outcome(CARD + key, b"", 1.0)
        return outcome
    return None


NOT_OPENED = "not revoked: the session record could not be opened"


async def _refresh_token(svc: Services, key: str, session_key: bytes | None) -> tuple[str | None, str]:
    """The refresh token in another browser's session record, opened with the key its device card keeps; else
    None and what the log line says: "none" when the record holds none, ``NOT_OPENED`` when a record is there
    but the card cannot open it (a card from before the key was kept, or one that does not fit the record),
    so that a token left valid at the provider is never logged as if there were none."""
    record = await svc.sessions.store.load(key)
    if record is None:
        return None, "none"
    if session_key is None:
        return None, NOT_OPENED
    try:
        plain = crypto.decrypt(session_key, record.blob, key.encode())
        return Session.from_bytes(plain, record.version, record.last_active).tokens.refresh_token, "none"
    except (InvalidCookie, ValueError):
        return None, NOT_OPENED


async def signed_out(request: web.Request, svc: Services) -> web.Response:
    """Where a sign-out lands when no ``rd`` was asked for (directly, or back from the provider's page)."""
    everywhere = request.query.get("everywhere") == "1"
    start = f"{svc.config.proxy_prefix}/start?rd={quote('/', safe='')}"
    text = (
        "You are signed out here and in every other browser and connected application."
        if everywhere
        else "You are signed out of this browser. Other browsers and connected applications are not affected."
    )
    body = (
        f"<p>{kit.e(text)}</p><p class='muted'>If this is a shared computer, also close the browser: the identity "
        "provider may still remember you.</p>"
        f"<p><a class='button' href='{kit.e(start)}'>Sign in again</a></p>"
    )
    return _page(svc, "You are signed out", body)


def _page(svc: Services, title: str, body: str, status: int = 200) -> web.Response:
    pages = svc.config.pages
    text = kit.document(title, body, pages.banner, pages.footer, error=status >= 400)
    return web.Response(status=status, text=text, content_type="text/html", headers=kit.HEADERS)


def _refused(svc: Services, status: int, title: str, text: str) -> web.Response:
    return _page(svc, title, f"<p>{kit.e(text)}</p>", status)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _sign_in_first(request: web.Request, svc: Services) -> web.Response:
    if "text/html" not in request.headers.get("Accept", ""):
        return web.json_response({"error": "not signed in"}, status=401, headers={"Cache-Control": "no-store"})
    location = f"{svc.config.proxy_prefix}/start?rd={quote(request.rel_url.raw_path_qs, safe='')}"
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def add_routes(app: web.Application, config: Config) -> None:
    prefix = config.proxy_prefix
    app.router.add_get(prefix + "/account", guarded(account, "/oauth2/account"))
    app.router.add_post(prefix + "/account/revoke", guarded(revoke, "/oauth2/account/revoke"))
    app.router.add_get(prefix + "/signed_out", guarded(signed_out, "/oauth2/signed_out"))
