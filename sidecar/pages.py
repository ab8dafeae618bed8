"""Error pages that say what happened and offer a way on, for every status (400, 403, 429, 5xx too).

A browser (``Accept: text/html``) gets an HTML page from the page kit with links (sign in again,
try again, sign out, sign in as someone else) and the request id; any other client gets one line
of text (the same line as before the kit: scripts keep parsing it). The HTML page is the operator's
``error`` template (``config.pages``: built-in or ``error.html`` from ``--custom-templates-dir``,
with ``--banner`` and ``--footer``), so every error page carries the same branding as the
sign-in page. Every value that reaches the page is HTML-escaped by the template; the only
markup passed in is the list of links, built here from escaped parts. Nothing from the request
is echoed except the path to return to, which goes only into an escaped, URL-encoded link.
"""

from __future__ import annotations

import html
from urllib.parse import quote

from aiohttp import web

from . import kit
from .context import AUTHED, SERVICES
from .templates import Html
from .urls import safe_redirect

SIGN_IN = "sign_in"
SIGN_OUT = "sign_out"
SWITCH_USER = "switch_user"
TRY_AGAIN = "try_again"
HOME = "home"


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def _return_to(request: web.Request) -> str:
    """Where "sign in again" or "try again" should land: the page asked for, or ``/`` from the sidecar's own
    endpoints. The path is the client's text: ``//evil.example/`` (or ``/\\evil``) as an ``href`` would leave
    the site, so it must pass as a local path (``safe_redirect``), else ``/``."""
    path = request.rel_url.raw_path_qs
    if path.startswith(_prefix(request) + "/"):
        return "/"
    return safe_redirect(path, "", "", ()) if path.startswith("/") else "/"


def _prefix(request: web.Request) -> str:
    return str(request.app[SERVICES].config.proxy_prefix).rstrip("/")


def _links(request: web.Request, actions: tuple[str, ...]) -> list[tuple[str, str]]:
    prefix = _prefix(request)
    start = f"{prefix}/start?rd={quote(_return_to(request), safe='')}"
    targets = {
        SIGN_IN: ("Sign in again", start),
        SIGN_OUT: ("Sign out", f"{prefix}/sign_out"),
        SWITCH_USER: ("Sign in as someone else", f"{prefix}/sign_out?rd={quote(start, safe='')}"),
        TRY_AGAIN: ("Try again", _return_to(request) if request.method == "GET" else "/"),
        HOME: ("Go to the start page", "/"),
    }
    return [targets[action] for action in actions]


def page(request: web.Request, title: str, body_html: str, status: int = 200) -> web.Response:
    """A page that is not an error (the sign-out confirmation form, the signed-out page), from the page kit;
    ``body_html`` must already be escaped by the caller."""
    pages = request.app[SERVICES].config.pages
    text = kit.document(title, body_html, pages.banner, pages.footer, error=status >= 400)
    return web.Response(status=status, text=text, content_type="text/html", headers=kit.HEADERS)


def _actions_html(request: web.Request, actions: tuple[str, ...]) -> Html:
    """The way-on links as markup: built from escaped labels and hrefs, the one value the template takes as is."""
    links = "".join(
        f"<li><a href='{html.escape(href, quote=True)}'>{html.escape(label, quote=True)}</a></li>"
        for label, href in _links(request, actions)
    )
    return Html(f"<ul class='actions'>{links}</ul>" if links else "")


def _error_page(request: web.Request, status: int, title: str, message: str, actions: tuple[str, ...]) -> web.Response:
    """The operator's ``error`` template filled in; ``render`` escapes title, status and message."""
    pages = request.app[SERVICES].config.pages
    text = pages.render(
        "error", title=title, status=str(status), message=message, actions=_actions_html(request, actions)
    )
    headers = kit.HEADERS if pages.built_in("error") else {"Cache-Control": "no-store"}
    return web.Response(status=status, text=text, content_type="text/html", headers=headers)


def error(
    request: web.Request,
    status: int,
    title: str,
    message: str,
    actions: tuple[str, ...] = (SIGN_IN,),
    headers: dict[str, str] | None = None,
    text: str = "",
) -> web.Response:
    """``status`` with ``title`` and ``message`` (plain text) and links to ``actions``: the operator's error page
    for a browser, one line of text (``text``, else status, title and message) for any other client."""
    if _wants_html(request):
        response = _error_page(request, status, title, message, actions)
    else:
        response = web.Response(status=status, text=text or f"{status} {title}: {message}\n")
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def expired_sign_in(request: web.Request) -> web.Response:
    return error(
        request,
        400,
        "Sign-in expired",
        "This sign-in link has expired or was already used (for example after going back in the browser).",
        (SIGN_IN,),
    )


def refused_sign_in(request: web.Request, said: str = "") -> web.Response:
    message = "The sign-in could not be completed."
    if said:
        message += f" The identity provider said: {said[:100]}"
    return error(request, 403, "Sign-in refused", message, (SIGN_IN, SWITCH_USER))


def forbidden(request: web.Request, who: str = "") -> web.Response:
    """403 for a signed-in account the rules refuse; names the account (``who``, else the request's session)
    so the person sees which one to switch from."""
    authed = request.get(AUTHED)
    who = who or (authed[1].identity.email or authed[1].identity.user if authed else "")
    message = "Your account is not allowed to use this application."
    if who:
        message = f"You are signed in as {who}, and this account is not allowed to use this application."
    return error(request, 403, "Access denied", message, (SWITCH_USER, SIGN_OUT), text=_FORBIDDEN_TEXT)


_FORBIDDEN_TEXT = "403 Access denied: Your account is not allowed to use this application.\n"


def unavailable(request: web.Request, status: int, text: str, retry_after: str) -> web.Response:
    """503/504: the provider or the session store is down or slow; waiting helps."""
    title = "Temporarily unavailable" if status == 503 else "The sign-in service is slow"
    message = (
        "A service this sign-in depends on (the identity provider or the session store) is not answering "
        "right now. Nothing is lost: wait a few seconds and try again."
    )
    return error(request, status, title, message, (TRY_AGAIN,), {"Retry-After": retry_after}, text=text)


def bad_gateway(request: web.Request, text: str, what: str = "the identity provider") -> web.Response:
    message = (
        f"The sidecar could not get a usable answer from {what}. Try again; if it keeps failing, tell an administrator."
    )
    return error(request, 502, "Something went wrong upstream", message, (TRY_AGAIN, HOME), text=text)


def upstream_failed(request: web.Request, status: int, text: str) -> web.Response:
    """The application behind the sidecar is down or slow (not the sign-in)."""
    title = "The application is not answering" if status == 502 else "The application is too slow"
    message = "You are signed in, but the application behind this address did not answer. Try again in a moment."
    return error(request, status, title, message, (TRY_AGAIN,), text=text)


def bad_request(request: web.Request, text: str, detail: str) -> web.Response:
    message = f"The request could not be used: {detail}. Go back and try again from the application."
    return error(request, 400, "Bad request", message, (HOME,), text=text)


def too_many(request: web.Request, text: str, retry_after: str) -> web.Response:
    message = f"Too many sign-in attempts came from your network address. Wait {retry_after} seconds, then try again."
    return error(request, 429, "Too many attempts", message, (TRY_AGAIN,), {"Retry-After": retry_after}, text=text)


def internal(request: web.Request) -> web.Response:
    message = "Something failed inside the sidecar. Try again; if it keeps failing, tell an administrator."
    return error(request, 500, "Internal error", message, (TRY_AGAIN, HOME), text="500 Internal Server Error\n")


def misconfigured(request: web.Request) -> web.Response:
    """The provider refused this application itself (wrong client secret): waiting will not help."""
    return error(
        request,
        502,
        "Sign-in is misconfigured",
        "The identity provider does not accept this application's credentials. "
        "An administrator must check the sidecar's client id and secret.",
        (),
    )
