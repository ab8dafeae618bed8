"""Where a browser may be sent after sign-in or sign-out (the ``rd`` parameter).

Accepted: a local path, a URL of the very origin the request came to (same scheme, host and
port), or a host and port allowed by ``--whitelist-domain``. Anything else, including
anything a browser might read differently from us (backslashes, control characters and
whitespace that browsers drop, user info, odd authorities, encoded slashes), falls back to
``/``. The URL is parsed strictly once and compared exactly; nothing is "mostly" matched.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from .rules import HostRule, valid_hostname

MAX_RD_CHARS = 2048
_ABSOLUTE = re.compile(r"\A(https?)://([^/?#]*)([/?#].*)?\Z", re.DOTALL)
_AUTHORITY = re.compile(r"\A([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?\Z")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _invisible(text: str) -> bool:
    """Characters a browser strips or reinterprets in a URL: controls, whitespace, backslash."""
    return any(ch <= " " or ch == "\x7f" or ch == "\\" or ch.isspace() for ch in text)


def _authority(text: str, scheme: str) -> tuple[str, int] | None:
    """(host, port) of ``host[:port]``, or None for anything else (user info, bad ports, odd hosts)."""
    match = _AUTHORITY.match(text.lower())
    if not match:
        return None
    host, port_text = match.group(1), match.group(2)
    if not host.startswith("[") and not valid_hostname(host):
        return None
    port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
    return (host, port) if 0 < port < 65536 else None


def _local_path_ok(rd: str, decoded: tuple[str, ...]) -> bool:
    # "//evil" and "/\evil" are protocol-relative to browsers, in any decoding.
    return all(form.startswith("/") and not form.startswith(("//", "/\\")) for form in decoded)


def safe_redirect(rd: str | None, scheme: str, request_host: str, rules: tuple[HostRule, ...]) -> str:
    """``rd`` when it is safe to redirect to, otherwise ``/``."""
    if not rd or len(rd) > MAX_RD_CHARS:
        return "/"
    if _invisible(rd):
        return "/"
    # Decoded forms matter where a browser decodes: scheme, authority and path. A query or fragment is data
    # (``scope=openid%20email`` from clients that encode with encodeURIComponent) and moves nobody elsewhere.
    head = re.split(r"[?#]", rd, maxsplit=1)[0]
    once = unquote(head)
    decoded = (head, once, unquote(once))
    if any(_invisible(form) for form in decoded):
        return "/"
    if rd.startswith("/"):
        return rd if _local_path_ok(rd, decoded) else "/"
    match = _ABSOLUTE.match(rd)
    if not match:
        return "/"
    target_scheme = match.group(1)
    target = _authority(match.group(2), target_scheme)
    if target is None:
        return "/"
    here = _authority(request_host, scheme) if scheme in _DEFAULT_PORTS else None
    if here is not None and (target_scheme, target) == (scheme, here):
        return rd
    host, port = target
    return rd if any(rule.allows(host, port, _DEFAULT_PORTS[target_scheme]) for rule in rules) else "/"
