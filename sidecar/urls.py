"""Where a browser may be sent after sign-in or sign-out (the ``rd`` parameter).

Only a local path, the host the request came to, or a host matched by
``--whitelist-domain`` is accepted; anything else falls back to ``/``.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit


def _host_allowed(host: str, request_host: str, whitelist: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    if host == request_host.lower().split(":")[0]:
        return True
    for entry in whitelist:
        entry = entry.lower().split(":")[0]
        if entry.startswith("."):
            if host == entry[1:] or host.endswith(entry):
                return True
        elif host == entry:
            return True
    return False


def safe_redirect(rd: str | None, request_host: str, whitelist: tuple[str, ...]) -> str:
    """``rd`` when it is safe to redirect to, otherwise ``/``."""
    if not rd or len(rd) > 2048:
        return "/"
    decoded = unquote(unquote(rd))
    if any(ch < " " or ch == "\x7f" or ch == "\\" for ch in decoded):
        return "/"
    if rd.startswith("/"):
        # "//evil" and "/\evil" are protocol-relative to browsers; check the decoded form as well.
        if decoded.startswith(("//", "/\\")) or rd.startswith(("//", "/\\")):
            return "/"
        return rd
    try:
        parts = urlsplit(rd)
    except ValueError:
        return "/"
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return "/"
    return rd if _host_allowed(parts.hostname, request_host, whitelist) else "/"
