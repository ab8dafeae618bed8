"""The one path a request is matched and forwarded with: decoded once, refused when servers would disagree.

Kept apart from the proxy, because the sign-in redirect check, ``/oauth2/auth`` and the OAuth resource check
read paths the same way (one rule for every place a path decides something).
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, unquote_to_bytes

from .errors import BadRequest

_PATH_SAFE = "/:@!$&'()*+,=-._~"  # what stays literal in a forwarded path; everything else is %XX
# A path made only of these, with no empty segment and none of only dots: every server reads it the same way.
_PLAIN = re.compile(r"(?:/(?!\.+(?:/|$))[A-Za-z0-9\-._~!$&'()*+,=:@]+)*/?")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class BadPath(BadRequest):
    """A path the sidecar will not forward, because upstream servers disagree on what it means."""


def normalise_path(raw_path: str) -> str:
    """The one path that is both matched against skip-auth rules and forwarded upstream.

    The rule: what the skip-auth rules see is byte for byte what the upstream receives, and it is
    in a form every upstream (Tomcat, Jetty, Spring, nginx, Go, Node, Python) resolves to the same
    resource. So the raw path is percent-decoded exactly once, segment by segment, as strict UTF-8;
    empty segments (``//``) are dropped; the result is re-encoded with one canonical escaping
    (unreserved and sub-delimiter characters literal, everything else ``%XX``). A path is refused
    with 400 rather than guessed at when, after that one decoding, it has:

    - a control character (NUL, CR, LF, DEL, C1), a backslash, or a slash that was ``%2F`` (also
      as a fullwidth lookalike that Unicode normalisation turns into one);
    - a ``;``, raw or ``%3B``: Java servers cut ``;params`` out of each segment, so
      ``/public/..;/admin`` would be matched as public and served as ``/admin``, and
      ``/admin;.css`` would match a ``\\.css$`` rule (Spring Security refuses ``;`` too);
    - a segment ``.`` or ``..`` in any spelling (``%2e``, ``.%2E``), or one that Windows or
      Unicode normalisation can turn into one: any segment of only dots and spaces (``...``,
      ``.. ``), fullwidth dots;
    - a ``%`` that still forms an escape (``%252e``: a second decoding would change it);
    - a malformed escape (``%zz``), invalid or overlong UTF-8 (``%c0%ae``).

    Browsers resolve dot segments before sending, so only crafted requests are refused.
    """
    if _PLAIN.fullmatch(raw_path):
        return raw_path  # the common case, forwarded exactly as it came
    if not raw_path.startswith("/"):
        raise BadPath("malformed path")
    kept = [_segment(part) for part in raw_path.split("/") if part]
    path = "/" + "/".join(kept)
    if kept and raw_path.endswith("/"):
        path += "/"
    return quote(path, safe=_PATH_SAFE)


def _segment(raw: str) -> str:
    """One path segment decoded once, or BadPath when servers could read it differently."""
    if "%" in raw:
        if raw.count("%") != len(_ESCAPE.findall(raw)):
            raise BadPath("malformed percent-escape in path")
        try:
            text = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise BadPath("path is not valid UTF-8") from None
        if _ESCAPE.search(text):
            raise BadPath("double-encoded path")
    else:
        text = raw
    if _CONTROL.search(text):
        raise BadPath("path has a control character")
    folded = unicodedata.normalize("NFKC", text)  # what a server that folds Unicode would see
    if any(ch in folded for ch in "/\\;"):
        raise BadPath("path has an encoded slash, a backslash or a ';'")
    if not folded.strip(". "):
        raise BadPath("path has a segment of only dots or spaces")
    return text
