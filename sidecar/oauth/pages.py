"""HTML of the authorization server's browser pages: consent, device code entry, the grants list.

Made of the one page kit (``sidecar/kit.py``: skeleton, stylesheet, ``--banner``/``--footer``, strict CSP).
Every value that reaches a page passes ``kit.e`` here: client names, redirect hosts and scopes come from
whoever registered a client, so they are hostile text; a client's name is also isolated in ``<bdi>`` so bidi
controls in it cannot reorder the sentence around it. Every page is answered with ``no-store`` and may not
be framed (a consent button under someone else's frame is clickjacking).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from .. import kit
from ..config import Config

SECURITY_HEADERS = {**kit.HEADERS, "Pragma": "no-cache"}
e = kit.e


def page(config: Config, title: str, body_html: str, status: int = 200) -> web.Response:
    """``body_html`` must be built from escaped parts; the banner and footer are escaped by the kit."""
    text = kit.document(title, body_html, config.pages.banner, config.pages.footer, error=status >= 400)
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
    device_code: str = ""  # the device flow: the code, and when and from where the device asked for it
    requested_at: float = 0.0
    requested_from: str = ""


_SCOPE_TEXT = {
    "openid": "know who you are",
    "profile": "see your name",
    "email": "see your email address",
    "offline_access": "keep access while you are away (until you revoke it)",
}


_WHY_SIGN_IN_AGAIN = (
    "<p class='muted'>After Allow, your identity provider's sign-in may appear once more: the application gets "
    "its own sign-in, separate from this browser's, so that it keeps working after you sign out here and ends "
    "when you revoke it.</p>"
)
_DENY_IF_SENT = "If someone sent you this link or code, choose Deny."


def _who(view: ConsentView) -> str:
    if view.client_host:
        return (
            f"The application at <strong class='big'>{e(view.client_host)}</strong>, which calls itself "
            f"&ldquo;{kit.name(view.client_name)}&rdquo; (not verified; client <code>{e(view.client_id)}</code>),"
        )
    return f"<strong>{kit.name(view.client_name)}</strong> (name not verified; client <code>{e(view.client_id)}</code>)"


def _warning(view: ConsentView) -> str:
    if view.client_host:
        text = (
            f"Its name comes from its own description at {e(view.client_host)} and is not verified. Only continue "
            "if you started this sign-in yourself and trust that host."
        )
    elif view.verified:
        return ""
    else:
        text = (
            "This application registered itself; its name is not verified. Only continue if you started this "
            "sign-in yourself and recognise where it returns to."
        )
    return f"<p class='warn'>{text}</p>"


def _device_facts(view: ConsentView) -> str:
    """The device flow's anti-phishing facts: the code, when and from where it was asked for, and the warning."""
    if not view.device_code:
        return ""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view.requested_at)) if view.requested_at else "unknown"
    return (
        f"<p>Code: <span class='big'>{e(view.device_code)}</span></p>"
        f"<p>Asked for at <strong>{e(when)}</strong> from the network address "
        f"<strong>{e(view.requested_from or 'unknown')}</strong>. "
        "Check that this is your device and that the code matches what it shows.</p>"
        f"<p class='warn'><strong>{e(_DENY_IF_SENT)}</strong></p>"
    )


def consent(config: Config, view: ConsentView) -> web.Response:
    """The consent form: who asks, where the answer goes, for what, as whom; approve or deny (both POST)."""
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
    body = (
        f"<p>{_who(view)} asks to use <code>{e(view.resource)}</code> as <strong>{e(view.user)}</strong>.</p>"
        f"{_device_facts(view)}{_warning(view)}{where}"
        f"<p>It will be able to:</p><ul>{scopes}</ul>"
        f"<form method='post' action='{e(view.action)}'>"
        f"<input type='hidden' name='pending' value='{e(view.pending)}'>"
        f"<input type='hidden' name='csrf' value='{e(view.csrf)}'><div class='buttons'>"
        "<button type='submit' name='decision' value='approve'>Allow</button>"
        "<button type='submit' name='decision' value='deny' class='secondary'>Deny</button></div></form>"
        f"{_WHY_SIGN_IN_AGAIN}"
    )
    return page(config, "Connect a device?" if view.device_code else "Allow access?", body)


def device_entry(
    config: Config, action: str, csrf: str, user_code: str, problem: str = "", status: int = 200
) -> web.Response:
    """The user code form; ``user_code`` pre-fills it (``verification_uri_complete``), it still needs a click."""
    note = f"<p class='warn'>{e(problem)}</p>" if problem else ""
    body = (
        f"{note}<p>Enter the code shown by your device or command-line tool.</p>"
        f"<form method='post' action='{e(action)}'>"
        f"<input type='hidden' name='csrf' value='{e(csrf)}'>"
        "<label for='user_code'>Code from your device</label>"
        f"<input type='text' id='user_code' name='user_code' value='{e(user_code)}' autocomplete='off' "
        "autocapitalize='characters' spellcheck='false' maxlength='16' placeholder='XXXX-XXXX' required>"
        "<div class='buttons'><button type='submit'>Continue</button></div></form>"
        f"<p class='muted'>{e(_DENY_IF_SENT)} Nobody legitimate asks you to enter a code they sent you.</p>"
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
            f"<tr><td data-label='Application'>{kit.name(row.client_name)}<br><small><code>{e(row.client_id)}</code>"
            f"</small></td><td data-label='Resource'><code>{e(row.resource)}</code></td>"
            f"<td data-label='Created'>{e(_when(row.created_at))}</td>"
            f"<td data-label='Last used'>{e(_when(row.last_used_at))}</td>"
            f"<td data-label='From'>{e(row.last_used_from)}<br><small>{kit.name(row.user_agent)}</small></td>"
            f"<td><form method='post' action='{e(action)}'><input type='hidden' name='csrf' value='{e(csrf)}'>"
            f"<input type='hidden' name='grant_id' value='{e(row.grant_id)}'>"
            "<button type='submit' class='secondary'>Revoke</button></form></td></tr>"
        )
    table = (
        "<table><thead><tr><th scope='col'>Application</th><th scope='col'>Resource</th><th scope='col'>Created</th>"
        "<th scope='col'>Last used</th><th scope='col'>From</th><th scope='col'>End access</th></tr></thead><tbody>"
        + "".join(cells)
        + "</tbody></table>"
        if cells
        else "<p>No application has access in your name.</p>"
    )
    account = e(config.proxy_prefix + "/account")
    body = (
        f"<p>Applications with access as <strong>{e(user)}</strong>:</p>{table}"
        f"<p><a href='{account}'>Your browser sessions and applications together</a></p>"
    )
    return page(config, "Connected applications", body)
