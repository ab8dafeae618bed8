"""The checks every piece of client metadata passes, whoever sent it: a registration (RFC 7591,
``registration.py``) or a Client ID Metadata Document (``cimd.py``). Both import this module; it imports
neither.

- ``redirect_uris``: each an ``https`` URL, an ``http`` URL on a loopback host (``127.0.0.1``, ``[::1]``,
  ``localhost``; any port: RFC 8252 7.3), or, for a public client (``token_endpoint_auth_method`` ``none``),
  a private-use URI whose scheme is a reverse domain name (RFC 8252 7.1: ``com.example.app:/callback``: at
  least two dot-separated labels, lower case, a path after ``:/`` and no authority). Schemes without a dot
  (``javascript:``, ``data:``, ``file:``, ``myapp:``) are refused, and so is ``http`` on any other host. All
  written plainly: lower-case scheme and host, no fragment, no user info, no whitespace, control characters
  or backslashes, ASCII only (an IDN must be given as punycode). ``/authorize`` then matches exactly
  (``redirect_registered``), except the port of a loopback ``http`` URI: a native app learns its free port
  only when it starts listening, so any port is allowed at the request (RFC 8252 7.3); host, path and query
  must still be the registered ones, written the same way.
- ``redirect_uris`` may be left out or empty (``[]``) only by a client without the authorization-code grant
  (a device-flow tool: nothing is ever redirected to it). Such a client that sends some anyway (oidc-agent
  sends its loopback ports and ``edu.kit.data.oidc-agent:/redirect`` with every registration, confidential
  by default) has them checked as a public client's, then not kept: the reply echoes ``[]``.
- ``grant_types`` among authorization_code, refresh_token and the device code grant; ``response_types`` only
  ``code``; ``token_endpoint_auth_method`` ``none``, ``client_secret_post`` or ``client_secret_basic``.
- ``scope``: within the server's vocabulary (``scopes.SCOPES``); kept, echoed, and the limit of what the
  client may later ask for.
- Text shown to a person (``client_name``) may not hold control, format or other invisible characters:
  C0/C1 controls, bidi embeddings, overrides and isolates (U+202A-202E, U+2066-2069), zero-width characters
  (U+200B-200F, U+2060-2064, U+FEFF), line/paragraph separators, private-use, unassigned and surrogate code
  points, tag characters, variation selectors, blank-looking letters (U+115F, U+1160, U+3164, U+FFA0, U+2800)
  and marks that show nothing (U+034F, U+17B4, U+17B5): such a name can reverse the consent sentence or pass
  for another name ("tool \\u202Eelgoog" shows as "tool google").
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..rules import valid_hostname
from .model import AUTH_METHODS, GRANT_AUTHORIZATION_CODE, GRANT_TYPES
from .scopes import SCOPES, parse_scope

MAX_REDIRECT_URIS = 10
MAX_URI_CHARS = 2000
MAX_NAME_CHARS = 200
LOOPBACK_HOSTS = ("127.0.0.1", "[::1]", "localhost")
_PORT = re.compile(r"[0-9]{1,5}")
# A loopback http redirect URI as registration accepts it (no user info, no fragment), port apart: one spelling
# per port (no leading zero), and nothing after the host but a path and query.
_LOOPBACK_URI = re.compile(
    r"http://(?P<host>127\.0\.0\.1|\[::1\]|localhost)(?::(?P<port>[1-9][0-9]{0,4}))?(?P<rest>(?:/[^#]*)?)"
)
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_PRIVATE_SCHEME = re.compile(rf"[a-z](?:[a-z0-9-]{{0,61}}[a-z0-9])?(?:\.{_LABEL})+")
_INVISIBLE_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
# Blank-looking letters, and marks that render as nothing (combining grapheme joiner, Khmer inherent vowels)
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e\u034f\u17b4\u17b5")


class Refused(Exception):
    """An RFC 7591 3.2.2 error: ``code`` and a description with no secret in it."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


def invisible_characters(text: str) -> bool:
    """Does ``text`` hold a character a person cannot see, or that changes how the text around it reads?"""
    return any(
        unicodedata.category(ch) in _INVISIBLE_CATEGORIES
        or ch in _BLANK_LETTERS
        or "\ufe00" <= ch <= "\ufe0f"  # variation selectors
        or "\U000e0100" <= ch <= "\U000e01ef"  # variation selectors supplement
        for ch in text
    )


def is_private_use(uri: str) -> bool:
    """A reverse-domain private-use redirect URI (RFC 8252 7.1), as accepted here."""
    scheme, sep, rest = uri.partition(":")
    return bool(sep) and _PRIVATE_SCHEME.fullmatch(scheme) is not None and rest.startswith("/")


def redirect_uri_problem(uri: Any, public: bool = False) -> str | None:
    """Why ``uri`` may not be a redirect URI; None when it may (see the module docstring). Private-use
    schemes only for a ``public`` (native) client."""
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI_CHARS:
        return "must be a non-empty string of at most 2000 characters"
    if not uri.isascii() or any(ch <= " " or ch in "\x7f\\\"'<>`{}|^" for ch in uri):
        return "must be plain ASCII without spaces, quotes, backslashes or control characters"
    if "#" in uri:
        return "must not have a fragment"
    scheme = uri.partition(":")[0]
    if "." in scheme:
        return _private_use_problem(uri, public)
    try:
        parts = urlsplit(uri)
    except ValueError:  # an unclosed IPv6 bracket
        return "is not a URL"
    if parts.scheme not in ("https", "http") or not uri.startswith(parts.scheme + "://"):
        return (
            "must be an https URL, an http URL on a loopback address, or (public clients) a private-use URI "
            "with a reverse-domain scheme such as com.example.app:/callback"
        )
    netloc = parts.netloc
    if "@" in netloc:
        return "must not carry user info"
    host, port = _split_host(netloc)
    if host is None or (port is not None and not (_PORT.fullmatch(port) and 0 < int(port) < 65536)):
        return "has an invalid host or port"
    if host != host.lower():
        return "must have a lower-case host"
    if parts.scheme == "http" and host not in LOOPBACK_HOSTS:
        return "http is allowed only for loopback hosts (127.0.0.1, [::1], localhost)"
    if parts.scheme == "https" and not (host == "[::1]" or valid_hostname(host)):
        return "has an invalid host name (write an international name in punycode)"
    return None


def redirect_registered(registered: tuple[str, ...], requested: str) -> bool:
    """Is ``requested`` one of the ``registered`` redirect URIs: the same string, or a loopback ``http`` URI
    differing only in its port (RFC 8252 7.3: any port, none included)?"""
    if requested in registered:
        return True
    wanted = _loopback_without_port(requested)
    return wanted is not None and any(_loopback_without_port(uri) == wanted for uri in registered)


def _loopback_without_port(uri: str) -> tuple[str, str] | None:
    """(host, path and query) of a plainly written loopback ``http`` URI, else None."""
    found = _LOOPBACK_URI.fullmatch(uri)
    if found is None or (found["port"] is not None and not 0 < int(found["port"]) < 65536):
        return None
    return found["host"], found["rest"]


def _private_use_problem(uri: str, public: bool) -> str | None:
    scheme, _, rest = uri.partition(":")
    if _PRIVATE_SCHEME.fullmatch(scheme) is None or len(scheme) > 253:
        return "has a private-use scheme that is not a lower-case reverse domain name (com.example.app)"
    if not rest.startswith("/") or rest.startswith("//"):
        return "with a private-use scheme must be written scheme:/path (one slash, no authority)"
    if not public:
        return "with a private-use scheme is allowed only for public clients (token_endpoint_auth_method none)"
    return None


def _split_host(netloc: str) -> tuple[str | None, str | None]:
    """(host, port text) of an authority without user info; (None, None) when malformed."""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            return None, None
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        if host != "[::1]":
            return None, None  # other IPv6 literals: not needed by clients, easy to spell ambiguously
        if rest and not rest.startswith(":"):
            return None, None
        return host, rest[1:] if rest else None
    host, sep, port = netloc.partition(":")
    if not host or (sep and not port):
        return None, None
    return host, port if sep else None


def _strings(value: Any, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    if not isinstance(value, list) or len(value) > 10 or not all(isinstance(v, str) and len(v) < 200 for v in value):
        raise Refused("invalid_client_metadata", f"{name} must be a short list of strings")
    return tuple(dict.fromkeys(value))


def _text(meta: dict[str, Any], name: str, limit: int) -> str:
    value = meta.get(name, "")
    if not isinstance(value, str) or len(value) > limit:
        raise Refused("invalid_client_metadata", f"{name} must be a string of at most {limit} characters")
    if invisible_characters(value):
        raise Refused("invalid_client_metadata", f"{name} may not contain control, bidi or invisible characters")
    return value


@dataclass(frozen=True)
class Metadata:
    """Client metadata that passed the checks; shared by registration and Client ID Metadata Documents."""

    client_name: str
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    token_endpoint_auth_method: str
    client_uri: str
    scope: str = ""  # canonical order; "" when the client named none (it may ask for the whole vocabulary)


def check_metadata(
    meta: dict[str, Any], default_method: str = "client_secret_basic", methods: tuple[str, ...] = AUTH_METHODS
) -> Metadata:
    """The checked fields of RFC 7591 client metadata (see the module docstring); raises Refused. RFC 7591 2
    makes ``client_secret_basic`` the default method; a metadata document can only be public (``none``)."""
    grant_types = _strings(meta.get("grant_types"), "grant_types", (GRANT_AUTHORIZATION_CODE,))
    unknown = [g for g in grant_types if g not in GRANT_TYPES]
    if unknown or not grant_types:
        raise Refused("invalid_client_metadata", f"grant_types: only {', '.join(GRANT_TYPES)}")
    response_types = _strings(meta.get("response_types"), "response_types", ("code",))
    if response_types != ("code",) and not (response_types == () and GRANT_AUTHORIZATION_CODE not in grant_types):
        raise Refused("invalid_client_metadata", "response_types: only code")
    method = meta.get("token_endpoint_auth_method", default_method)
    if method not in methods:
        raise Refused("invalid_client_metadata", f"token_endpoint_auth_method: one of {', '.join(methods)}")
    redirect_uris = _redirect_uris(meta.get("redirect_uris"), grant_types, public=method == "none")
    scope = meta.get("scope")
    checked_scope = parse_scope(scope) if isinstance(scope, str) else None
    if scope is not None and checked_scope is None:
        raise Refused("invalid_client_metadata", f"scope: only {' '.join(SCOPES)}")
    client_uri = _text(meta, "client_uri", MAX_URI_CHARS)
    if client_uri and (not client_uri.startswith("https://") or redirect_uri_problem(client_uri) is not None):
        raise Refused("invalid_client_metadata", "client_uri must be an https URL")
    name = _text(meta, "client_name", MAX_NAME_CHARS).strip()
    return Metadata(name, redirect_uris, grant_types, method, client_uri, checked_scope or "")


def _redirect_uris(value: Any, grant_types: tuple[str, ...], public: bool) -> tuple[str, ...]:
    redirects = GRANT_AUTHORIZATION_CODE in grant_types
    if not redirects and (value is None or value == []):
        return ()  # RFC 7591 2: redirect URIs are for redirect-based flows; a device-only client has none
    if not isinstance(value, list) or not value or len(value) > MAX_REDIRECT_URIS:
        raise Refused("invalid_redirect_uri", f"redirect_uris: a list of 1 to {MAX_REDIRECT_URIS} URLs is required")
    for uri in value:
        # never redirected to without the code grant: a private-use scheme is harmless there even for a
        # confidential client; checked, then not kept (RFC 7591 3.2.1: the server may replace values)
        problem = redirect_uri_problem(uri, public or not redirects)
        if problem is not None:
            raise Refused("invalid_redirect_uri", f"redirect_uris: each {problem}")
    if not redirects:
        return ()
    return tuple(dict.fromkeys(value))
