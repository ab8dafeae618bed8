"""The one page skeleton every built-in HTML answer is made of (sign-in, errors, consent, device, grants,
account, signed out).

A page is: ``lang``, a viewport for phones, a title, the operator's ``--banner`` and ``--footer``, one
``<main>`` with a heading, and, on an error, the request id to quote. One small stylesheet (system fonts,
16 px text, 44 px buttons, a dark variant through ``prefers-color-scheme``, colours at WCAG AA contrast or
better) is inlined and allowed by its hash in the Content-Security-Policy: no script, no inline style
attribute, nothing from elsewhere. Every value is escaped by the caller (``e``) or here; ``body`` is markup
built from escaped parts.

The request id comes from a context variable the request wrapper (``middleware.guarded``) sets, so a page
built deep in a handler carries it without threading the request through.
"""

from __future__ import annotations

import base64
import hashlib
import html
import unicodedata
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("sidecar_request_id", default=None)

CSS = """
:root{color-scheme:light dark;--bg:#fff;--fg:#1b1b1b;--muted:#545454;--line:#c4c4c4;--link:#0b57d0;
--btn:#0b57d0;--btn-fg:#fff;--warn-bg:#fff4e5;--warn-fg:#6b3200;--code:#f2f2f2}
@media (prefers-color-scheme:dark){:root{--bg:#121212;--fg:#ececec;--muted:#b8b8b8;--line:#5c5c5c;
--link:#9cc3ff;--btn:#9cc3ff;--btn-fg:#0a1a33;--warn-bg:#3a2410;--warn-fg:#ffd9b0;--code:#262626}}
*{box-sizing:border-box}
html{font-size:100%;-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);font:1rem/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Noto Sans",sans-serif}
main,.banner,.footer{max-width:44rem;margin:0 auto;padding:1rem}
main{padding-top:1.5rem;padding-bottom:2rem}
.banner{border-bottom:1px solid var(--line);font-weight:600}
.footer{border-top:1px solid var(--line);color:var(--muted);font-size:.9rem}
h1{font-size:1.6rem;line-height:1.25;margin:0 0 1rem}
h2{font-size:1.2rem;margin:1.5rem 0 .5rem}
a{color:var(--link)}
p,ul{margin:0 0 1rem}
code{background:var(--code);padding:0 .2em;border-radius:3px;overflow-wrap:anywhere;font-size:.95em}
.muted{color:var(--muted)}
.warn{background:var(--warn-bg);color:var(--warn-fg);border-left:4px solid currentColor;padding:.6rem .8rem}
.big{font-size:1.5rem;font-weight:700;letter-spacing:.08em}
.actions{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.75rem}
form.inline{display:inline}
.buttons{display:flex;flex-wrap:wrap;gap:.75rem;margin:1rem 0}
button,.button{min-height:44px;min-width:44px;white-space:nowrap;padding:.55rem 1.2rem;font:inherit;font-weight:600;
border-radius:6px;border:2px solid var(--btn);background:var(--btn);color:var(--btn-fg);cursor:pointer}
button.secondary{background:transparent;color:var(--link);border-color:var(--link)}
label{display:block;font-weight:600;margin-bottom:.3rem}
input[type=text]{font:inherit;font-size:1.25rem;letter-spacing:.1em;padding:.5rem;min-height:44px;
width:100%;max-width:16rem;border:2px solid var(--muted);border-radius:6px;background:var(--bg);color:var(--fg)}
table{border-collapse:collapse;width:100%;margin:0 0 1rem}
th,td{text-align:left;vertical-align:top;padding:.5rem;border-bottom:1px solid var(--line)}
@media (max-width:40rem){table,thead,tbody,tr,th,td{display:block}thead tr{position:absolute;left:-10000px}
tr{border:1px solid var(--line);border-radius:6px;margin-bottom:.75rem;padding:.25rem}
td{border:0;padding:.25rem .5rem}td[data-label]::before{content:attr(data-label) ": ";font-weight:600}}
""".strip()

STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
CSP = f"default-src 'none'; style-src '{STYLE_HASH}'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'"
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # keeps Origin on our own form posts (no-referrer turns it into "null")
    "X-Content-Type-Options": "nosniff",
}


def e(value: object) -> str:
    """Escaped for an HTML text node or a quoted attribute."""
    return html.escape(str(value), quote=True)


def name(value: str) -> str:
    """A name someone else chose (a client's name): isolated (``<bdi>``) so it cannot reorder the sentence
    around it, and its invisible characters (bidi overrides, zero-width and other format or control
    characters) shown as ``<U+202E>`` so "Backup tool <U+202E>elgoog.www" cannot pass for "www.google"."""
    shown = "".join(f"<U+{ord(ch):04X}>" if unicodedata.category(ch) in ("Cf", "Cc") else ch for ch in value)
    return f"<bdi>{e(shown)}</bdi>"


def document(title: str, body: str, banner: str = "", footer: str = "", error: bool = False) -> str:
    """The whole page. ``title`` and operator texts are plain text; ``body`` is markup built from escaped parts.
    On an error the request id (when the request has one) is shown to quote to an administrator."""
    top = f"<header class='banner'>{e(banner)}</header>" if banner else ""
    bottom = f"<footer class='footer'>{e(footer)}</footer>" if footer else ""
    request_id = REQUEST_ID.get()
    reference = (
        f"<p class='muted'>Request id: <code>{e(request_id)}</code> (quote it when asking for help)</p>"
        if error and request_id
        else ""
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta name='color-scheme' content='light dark'>"
        f"<title>{e(title)}</title><style>{CSS}</style></head>"
        f"<body>{top}<main><h1>{e(title)}</h1>{body}{reference}</main>{bottom}</body></html>"
    )


def message_body(text: str, links: list[tuple[str, str]] | None = None) -> str:
    """A paragraph and a list of ways on (label, href)."""
    items = "".join(f"<li><a href='{e(href)}'>{e(label)}</a></li>" for label, href in links or [])
    return f"<p>{e(text)}</p>" + (f"<ul class='actions'>{items}</ul>" if items else "")
