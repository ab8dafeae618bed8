"""HTML of the authorization server's browser pages: consent, device code entry, the grants list.

Same look as the sidecar's sign-in and error pages (``templates.py`` style, ``--banner`` and ``--footer``).
Every value that reaches a page passes ``html.escape`` here: client names, redirect hosts and scopes come
from whoever registered a client, so they are hostile text. Every page is answered with ``no-store`` and
may not be framed (a consent button under someone else's frame is clickjacking).
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from ..config import Config

_STYLE = "font-family:sans-serif;max-width:40em;margin:3em auto"
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def e(value: object) -> str:
    """Escaped for an HTML text node or a quoted attribute."""
    return html.escape(str(value), quote=True)


def page(config: Config, title: str, body_html: str, status: int = 200) -> web.Response:
    """``body_html`` must be built from escaped parts; the banner and footer are escaped here."""
    banner = f"<div class='banner'>{e(config.pages.banner)}</div>" if config.pages.banner else ""
    footer = f"<div class='footer'>{e(config.pages.footer)}</div>" if config.pages.footer else ""
    text = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title></head>"
        f"<body style='{_STYLE}'>{banner}<h1>{e(title)}</h1>{body_html}{footer}</body></html>"
    )
    return web.Response(status=status, text=text, content_type="text/html", headers=SECURITY_HEADERS)


def message(config: Config, title: str, text: str, status: int = 200) -> web.Response:
    """A page that only says something (errors of the authorization request, "return to your device")."""
    return page(config, title, f"<p>{e(text)}</p>", status)


@dataclass(frozen=True)
class ConsentView:
    """What the user must see before a client gets access in their name."""

    client_name: str
    client_id: str
    verified: bool  # False for dynamically registered clients: their name is whatever they claimed
    redirect_uri: str  # "" for the device flow (no redirect: the tokens go to the device that polls)
    resource: str
    scopes: Sequence[str]
    user: str
    pending: str
    csrf: str
    action: str
    client_host: str = ""  # a Client ID Metadata Document's host: the only part of its identity TLS vouches for


_SCOPE_TEXT = {
    "openid": "know who you are",
    "profile": "see your name",
    "email": "see your email address",
    "offline_access": "keep access while you are away (until you revoke it)",
}


def consent(config: Config, view: ConsentView) -> web.Response:
    """The consent form: who asks, where the answer goes, for what, as whom; approve or deny (both POST)."""
    warning = (
        ""
        if view.verified
        else "<p style='color:#a40'>This application registered itself; its name is not verified. "
        "Only continue if you started this sign-in yourself and recognise where it returns to.</p>"
    )
    host = urlsplit(view.redirect_uri).netloc if view.redirect_uri else ""
    where = (
        f"<p>Access will be handed to <strong>{e(host)}</strong> (<code>{e(view.redirect_uri)}</code>).</p>"
        if view.redirect_uri
        else "<p>Access will be handed to the device or command-line tool that showed you the code.</p>"
    )
    if view.redirect_uri and not host:  # a private-use scheme (RFC 8252 7.1): no host vouches for it
        scheme = view.redirect_uri.partition(":")[0]
        where = (
            f"<p>Access will be handed to <strong>an app on this device</strong> through its own link type "
            f"<code>{e(scheme)}:</code> (<code>{e(view.redirect_uri)}</code>). Any app installed here can claim "
            "that link type; continue only if you started this from the app you expect.</p>"
        )
    scopes = "".join(f"<li>{e(_SCOPE_TEXT.get(s, s))} (<code>{e(s)}</code>)</li>" for s in view.scopes)
    who = f"<strong>{e(view.client_name)}</strong> (client <code>{e(view.client_id)}</code>)"
    if view.client_host:
        who = (
            f"The application at <strong style='font-size:1.3em'>{e(view.client_host)}</strong>, which calls itself "
            f"&ldquo;{e(view.client_name)}&rdquo; (client <code>{e(view.client_id)}</code>),"
        )
        warning = (
            f"<p style='color:#a40'>Its name comes from its own description at {e(view.client_host)} and is not "
            "verified. Only continue if you started this sign-in yourself and trust that host.</p>"
        )
    body = (
        f"<p>{who} asks to use "
        f"<code>{e(view.resource)}</code> as <strong>{e(view.user)}</strong>.</p>{warning}{where}"
        f"<p>It will be able to:</p><ul>{scopes}</ul>"
        f"<form method='post' action='{e(view.action)}'>"
        f"<input type='hidden' name='pending' value='{e(view.pending)}'>"
        f"<input type='hidden' name='csrf' value='{e(view.csrf)}'>"
        "<button type='submit' name='decision' value='approve'>Allow</button> "
        "<button type='submit' name='decision' value='deny'>Deny</button></form>"
    )
    return page(config, "Allow access?", body)


def device_entry(
    config: Config, action: str, csrf: str, user_code: str, problem: str = "", status: int = 200
) -> web.Response:
    """The user code form; ``user_code`` pre-fills it (``verification_uri_complete``), it still needs a click."""
    note = f"<p style='color:#a40'>{e(problem)}</p>" if problem else ""
    body = (
        f"{note}<p>Enter the code shown by your device or command-line tool.</p>"
        f"<form method='post' action='{e(action)}'>"
        f"<input type='hidden' name='csrf' value='{e(csrf)}'>"
        f"<input name='user_code' value='{e(user_code)}' autocomplete='off' autocapitalize='characters' "
        "maxlength='16' placeholder='XXXX-XXXX' required> "
        "<button type='submit'>Continue</button></form>"
    )
    return page(config, "Connect a device", body, status)


@dataclass(frozen=True)
class GrantRow:
    grant_id: str
    client_name: str
    client_id: str
    resource: str
    created_at: float
    last_used_at: float
    last_used_from: str
    user_agent: str


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at)) if at else "never"


def grants(config: Config, user: str, rows: Iterable[GrantRow], action: str, csrf: str) -> web.Response:
    """One row per grant, each with its own revoke form."""
    cells = []
    for row in rows:
        cells.append(
            f"<tr><td>{e(row.client_name)}<br><small><code>{e(row.client_id)}</code></small></td>"
            f"<td><code>{e(row.resource)}</code></td><td>{e(_when(row.created_at))}</td>"
            f"<td>{e(_when(row.last_used_at))}</td><td>{e(row.last_used_from)}<br><small>{e(row.user_agent)}</small></td>"
            f"<td><form method='post' action='{e(action)}'><input type='hidden' name='csrf' value='{e(csrf)}'>"
            f"<input type='hidden' name='grant_id' value='{e(row.grant_id)}'>"
            "<button type='submit'>Revoke</button></form></td></tr>"
        )
    table = (
        "<table><tr><th>Application</th><th>Resource</th><th>Created</th><th>Last used</th><th>From</th><th></th></tr>"
        + "".join(cells)
        + "</table>"
        if cells
        else "<p>No application has access in your name.</p>"
    )
    body = f"<p>Applications with access as <strong>{e(user)}</strong>:</p>{table}"
    return page(config, "Connected applications", body)
