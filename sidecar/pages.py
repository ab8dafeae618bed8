"""Error pages that say what happened and offer a way on.

A browser gets an HTML page with links (sign in again, sign out, sign in as someone else);
any other client gets one line of text with the same message. The HTML page is the operator's
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

from .context import SERVICES
from .templates import Html

SIGN_IN = "sign_in"
SIGN_OUT = "sign_out"
SWITCH_USER = "switch_user"


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def _return_to(request: web.Request) -> str:
    """Where "sign in again" should land: the page asked for, or ``/`` from the sidecar's own endpoints."""
    path = request.rel_url.raw_path_qs
    return "/" if path.startswith(_prefix(request) + "/") else path


def _prefix(request: web.Request) -> str:
    return str(request.app[SERVICES].config.proxy_prefix).rstrip("/")


def _links(request: web.Request, actions: tuple[str, ...]) -> list[tuple[str, str]]:
    prefix = _prefix(request)
    start = f"{prefix}/start?rd={quote(_return_to(request), safe='')}"
    targets = {
        SIGN_IN: ("Sign in again", start),
        SIGN_OUT: ("Sign out", f"{prefix}/sign_out"),
        SWITCH_USER: ("Sign in as someone else", f"{prefix}/sign_out?rd={quote(start, safe='')}"),
    }
    return [targets[action] for action in actions]


def page(title: str, body_html: str, status: int = 200) -> web.Response:
    """A bare HTML page that is not an error (the sign-out confirmation form); ``body_html`` must already be
    escaped by the caller. Error pages go through ``error`` and the operator's template instead."""
    title = html.escape(title)
    text = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body style='font-family:sans-serif;max-width:40em;margin:3em auto'><h1>{title}</h1>{body_html}</body></html>"
    )
    return web.Response(status=status, text=text, content_type="text/html")


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
    return web.Response(status=status, text=text, content_type="text/html")


def error(
    request: web.Request,
    status: int,
    title: str,
    message: str,
    actions: tuple[str, ...] = (SIGN_IN,),
    headers: dict[str, str] | None = None,
) -> web.Response:
    """``status`` with ``title`` and ``message`` (plain text) and links to ``actions``: the operator's error page
    for a browser, one line of text for any other client."""
    if _wants_html(request):
        response = _error_page(request, status, title, message, actions)
    else:
        response = web.Response(status=status, text=f"{status} {title}: {message}\n")
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


def forbidden(request: web.Request) -> web.Response:
    return error(
        request, 403, "Access denied", "Your account is not allowed to use this application.", (SWITCH_USER, SIGN_OUT)
    )


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
