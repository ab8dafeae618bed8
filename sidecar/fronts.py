"""Which headers each front (the proxy before the sidecar) sets itself, and reading the original request from them.

A front asks ``/oauth2/auth`` about a request it holds: the original URI, method, scheme and host decide
``--fresh-auth-route`` and ``--oauth-resource`` (a token's audience). Every front copies the client's own
headers into that subrequest, and each overwrites only some names: ingress-nginx sets ``X-Original-URL``
and ``X-Original-Method`` and passes a client's ``X-Forwarded-Uri`` through; Traefik and Caddy set
``X-Forwarded-Uri``/``-Method`` and pass a client's ``X-Original-URL`` through. So the value is read only
from the headers the configured front (``--front``) writes, and every other name of the same family that
is present must say the same thing: a disagreement is a client naming another request (400), and a family
member present without the front's own header means the front is not the one configured (400, logged).

The host in ingress-nginx's ``X-Original-URL`` is the client's ``Host`` header (``$http_host``), which need not
be the host nginx chose the server block by (``$host``): an absolute-form request line (``GET https://b/ HTTP/1.1``
with ``Host: a``) is served by b's server and named a. A token's audience is its host, so the shipped Ingress's
auth-url ends in ``?routed_host=$host``, which nginx expands in the auth location's proxy_pass and no client can
change (a header could be: nginx passes a client's own on wherever an Ingress does not overwrite it). The URL's
host must be that host (port and one trailing dot aside, which nginx drops from ``$host``), and without the
parameter no token is taken (``Original.routed``).

``FRONTS`` is the one description; the README's deployment section says the same per front.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from multidict import CIMultiDictProxy

from .errors import BadRequest
from .headers import is_protected

log = logging.getLogger("sidecar.fronts")

REQUEST = "(request)"  # envoy: the auth request's own method, path tail or Host is the original's


@dataclass(frozen=True)
class Front:
    """What one front writes on every auth subrequest (``uri``...: header names it overwrites) and on the
    requests it proxies to the sidecar's own endpoints (``proxied_*``); ``passes`` is what it copies from
    the client unchanged (documentation, and what the tests add as a hostile client)."""

    name: str
    uri: tuple[str, ...]  # the original request target (path?query), or a whole URL in ``url``
    url: str | None  # a header with the whole original URL: scheme, host and target
    method: str | None
    scheme: str | None
    host: str | None
    relays: bool = False  # hands the auth answer to the client as it is (a 302 reaches the browser)
    proxied_scheme: str = "X-Forwarded-Proto"
    proxied_host: str = "X-Forwarded-Host"
    passes: str = ""
    routed: bool = False  # the auth-url's routed_host=$host names the host it routed by (``url``'s may not be it)


FRONTS: dict[str, Front] = {
    front.name: front
    for front in (
        Front(
            "nginx",
            uri=("X-Forwarded-Uri", "X-Original-URI"),
            url=None,
            method="X-Forwarded-Method",
            scheme="X-Forwarded-Proto",
            host="X-Forwarded-Host",
            passes="every other client header (proxy_pass_request_headers on), e.g. X-Original-URL",
        ),
        Front(
            "ingress-nginx",
            uri=(),
            url="X-Original-URL",
            method="X-Original-Method",
            scheme=None,  # X-Forwarded-Proto is blanked on the auth subrequest; the URL has the scheme
            host=None,  # Host is the auth-url's (in-cluster) host; the URL has the client's
            passes="X-Forwarded-Uri, X-Forwarded-Method, X-Forwarded-Host (and X-Original-URI without auth-method)",
            routed=True,  # ?routed_host=$host, last in the shipped auth-url
        ),
        Front(
            "traefik",
            uri=("X-Forwarded-Uri",),
            url=None,
            method="X-Forwarded-Method",
            relays=True,
            scheme="X-Forwarded-Proto",
            host="X-Forwarded-Host",
            passes="X-Original-URI, X-Original-URL, X-Original-Method (trustForwardHeader: false keeps its own)",
        ),
        Front(
            "caddy",
            uri=("X-Forwarded-Uri",),
            url=None,
            method="X-Forwarded-Method",
            relays=True,
            scheme="X-Forwarded-Proto",
            host="X-Forwarded-Host",
            passes="X-Original-URI, X-Original-URL, X-Original-Method (without trusted_proxies it drops "
            "the client's X-Forwarded-*)",
        ),
        Front(
            "envoy",
            uri=(REQUEST,),  # ext_authz appends the original path to the auth URL's path
            url=None,
            method=REQUEST,  # and keeps the original method
            relays=True,
            scheme="X-Forwarded-Proto",
            host=REQUEST,  # and the original :authority as Host
            proxied_host="Host",
            passes="whatever headersToExtAuth / allowed_headers let through",
        ),
    )
}

# Every name a front might use for each part of the original request. All that are present must agree.
URI_HEADERS = ("X-Forwarded-Uri", "X-Original-URI", "X-Forwarded-Path", "X-Envoy-Original-Path", "X-Rewrite-URL")
URL_HEADERS = ("X-Original-URL",)
# X-HTTP-Method and X-Method-Override: the other override names applications honour (OData, ASP.NET, some
# Express set-ups); a POST that one of them turns into a DELETE must not be judged as a POST.
METHOD_HEADERS = (
    "X-Forwarded-Method",
    "X-Original-Method",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
)
SCHEME_HEADERS = ("X-Forwarded-Proto", "X-Forwarded-Scheme", "X-Scheme", "X-Forwarded-Ssl", "Front-End-Https")
HOST_HEADERS = ("X-Forwarded-Host", "X-Original-Host", "X-Host")
FAMILY = (*URI_HEADERS, *URL_HEADERS, *METHOD_HEADERS, *SCHEME_HEADERS, *HOST_HEADERS, "Forwarded")
ROUTED_HOST = "routed_host"  # the auth-url's LAST query parameter, routed_host=$host: not a location rule
_ROUTED_AT = ROUTED_HOST + "="
# Headers the sidecar itself interprets: undecodable bytes there are refused at the edge (400), once.
READ_HEADERS = ("Host", "Authorization", *FAMILY)


@dataclass(frozen=True)
class Original:
    """The request a front asks about, as its own headers name it; None where it names nothing."""

    uri: str | None  # path?query
    method: str | None
    scheme: str | None
    host: str | None
    routed: str | None = None  # the host the front routed by, from the auth-url's routed_host, checked against ``host``

    @property
    def path(self) -> str | None:
        return None if self.uri is None else self.uri.split("?", 1)[0]


def refuse_undecodable(headers: Mapping[str, str]) -> None:
    """Raise BadRequest when a header the sidecar reads holds anything but printable ASCII. Both listeners
    decode header bytes with surrogateescape, so ``\\xff`` would otherwise reach a ``str.encode`` deep inside
    (a 500); this is the one place that refuses it. Other headers (an app's UTF-8 cookie) pass untouched."""
    if all(value.isascii() for value in headers.values()):
        return  # the common case: one cheap pass
    for name in READ_HEADERS:
        for value in headers.getall(name, []):  # type: ignore[attr-defined]
            if not _printable(value):
                raise BadRequest(f"{name}: not printable ASCII")


_ALIAS_CHARS = re.compile(r"[^A-Za-z0-9-]")


def refuse_aliases(headers: Mapping[str, str]) -> None:
    """Raise BadRequest for a header whose name another spelling of an identity or original-request header:
    ``X_Auth_Request_User``, ``X.Auth.Request.User``, ``X~Forwarded~Email``. CGI/WSGI/PHP-style applications
    read each as the dash spelling, which is the only one a front replaces; some fronts (Caddy) pass the others
    to the application, so a request carrying one is refused here, where every front asks first."""
    if _ALIAS_CHARS.search("".join(headers)) is None:
        return  # the common case: every name is letters, digits and dashes
    for key in headers:
        if _ALIAS_CHARS.search(key) is None:
            continue
        norm = _ALIAS_CHARS.sub("-", key).lower()
        if is_protected(norm) or norm in _CANONICAL:
            raise BadRequest(f"header name {key!r} is another spelling of {norm}")


def _printable(value: str) -> bool:
    return value.isascii() and value.isprintable()


_CANONICAL = {name.lower(): name for name in FAMILY}  # a header's name as written -> its family spelling
_PARTS = ("uri", "method", "scheme", "host")


_Memo = dict[tuple[object, ...], "Original | str"]
_memo: _Memo = {}  # the same pages are asked about again and again: their reading, or why it was refused
_MEMO_LIMIT = 2048


def names_original(headers: CIMultiDictProxy[str]) -> bool:
    """Does any header name the original request (a front's auth subrequest)?"""
    return any(key.lower() in _CANONICAL for key in headers)


def split_routed(query: str) -> tuple[str, str | None]:
    """An auth-url's raw query as (the location rules before ``routed_host=``, everything after it or None).
    nginx writes ``$host`` into the query as it is, and a Host may hold ``&``, ``=``, ``#`` or ``%``: so the
    parameter is the auth-url's last and its value is the whole rest, never split or decoded (``a&routed_host=b``
    is then a value no host has, refused, rather than a second parameter one reading or another would pick)."""
    if query.startswith(_ROUTED_AT):
        return "", query[len(_ROUTED_AT) :]
    at = query.find("&" + _ROUTED_AT)
    if at < 0:
        return query, None
    return query[:at], query[at + 1 + len(_ROUTED_AT) :]


def read_auth(
    headers: CIMultiDictProxy[str], front: Front, method: str, tail: str, host: str, query: str = ""
) -> Original:
    """The original request of an auth subrequest, from ``front``'s own headers (``method``, ``tail`` and
    ``host``: the subrequest's own, which only envoy's description reads) and, for a front that routes by
    another host than the URL's, the auth request's raw ``query`` (its ``routed_host``). Raises BadRequest
    when two present names disagree or when names of a family are present without the front's own."""
    present = []
    for key, value in headers.items():  # one pass over the dozen headers a front sends
        name = _CANONICAL.get(key.lower())
        if name is not None:
            present.append((name, value))
    routed = split_routed(query)[1] if front.routed else None
    memo_key = (front.name, *present, method, tail, host) if front.name == "envoy" else (front.name, *present, routed)
    found = _memo.get(memo_key)
    if found is None:
        try:
            found = _read(present, front, method, tail, host, routed)
        except BadRequest as exc:
            found = str(exc)
        if len(_memo) >= _MEMO_LIMIT:
            _memo.clear()
        _memo[memo_key] = found
    if isinstance(found, str):
        raise BadRequest(found)
    return found


def _read(
    present: list[tuple[str, str]], front: Front, method: str, tail: str, host: str, routed_raw: str | None
) -> Original:
    seen: dict[str, list[tuple[str, str]]] = {"uri": [], "method": [], "scheme": [], "host": []}
    if len({name for name, _ in present}) != len(present):
        raise BadRequest("an original-request header was sent more than once")
    routed = None if routed_raw is None else _routed(routed_raw)
    for name, value in present:
        _collect(name, value, seen)
    if front.uri == (REQUEST,):
        seen["uri"].append((REQUEST, _target(REQUEST, tail or "/")))
    if front.method == REQUEST:
        seen["method"].append((REQUEST, method.upper()))
    if front.host == REQUEST and host:
        seen["host"].append((REQUEST, _host("Host", host)))
    own = _own(front.name)
    found = [_agreed(part, seen[part], own[part], front) for part in _PARTS]
    if routed is not None and found[3] is not None and _hostname(found[3]) != routed:
        raise BadRequest(f"the original request's host is not the one the auth-url's {ROUTED_HOST} says")
    return Original(uri=found[0], method=found[1], scheme=found[2], host=found[3], routed=routed)


def _routed(value: str) -> str:
    """nginx's ``$host``: the server name it chose the server block by, lower case, without port or final dot.
    Anything else (empty, a port, a final dot, upper case, percent-encoding, a second parameter, a fragment, a
    character no host has) is not what nginx writes there for a request it routed to a named server: refused."""
    if not _AUTHORITY.fullmatch(value) or _hostname(value) != value:
        raise BadRequest(f"{ROUTED_HOST}: not a host as nginx's $host has it (it must end the auth-url)")
    return value


def _hostname(authority: str) -> str:
    """A host[:port]'s host as nginx's ``$host`` has it: lower case, no port, no final dot."""
    authority = authority.lower()
    if authority.startswith("["):
        return authority[: authority.index("]") + 1]
    name = authority.partition(":")[0]
    return name[:-1] if name.endswith(".") else name


@lru_cache(maxsize=8)
def _own(name: str) -> dict[str, tuple[str, ...]]:
    """Per part, the names the front called ``name`` writes itself."""
    front = FRONTS[name]
    url = (front.url,) if front.url else ()
    return {
        "uri": front.uri + url,
        "method": (front.method,) if front.method else (),
        "scheme": ((front.scheme,) if front.scheme else ()) + url,
        "host": ((front.host,) if front.host else ()) + url,
    }


def _agreed(part: str, seen: list[tuple[str, str]], own: tuple[str, ...], front: Front) -> str | None:
    if not seen:
        return None
    value = seen[0][1]
    if any(other != value for _, other in seen):
        names = ", ".join(sorted({name for name, _ in seen}))
        raise BadRequest(f"the original-request headers disagree on the {part} ({names})")
    if not any(name in own for name, _ in seen):
        names = ", ".join(sorted({name for name, _ in seen}))
        _misconfigured(front, part, names)
        raise BadRequest(f"the {part} is named by {names}, which --front {front.name} does not set")
    return value


_warned: set[tuple[str, str]] = set()


def _misconfigured(front: Front, part: str, names: str) -> None:
    """Once per process: either a client adds headers, or the front is not the one --front names."""
    if (part, names) in _warned or len(_warned) > 64:
        return
    _warned.add((part, names))
    log.error(
        "auth request names the original %s only in headers the configured front does not set; if every "
        "request shows this, set --front to the front in use (see README, Deployment)",
        part,
        extra={"fields": {"front": front.name, "headers": names}},
    )


def _collect(name: str, value: str, seen: dict[str, list[tuple[str, str]]]) -> None:
    """Add what one header says to ``seen`` (part -> [(name, normalised value)])."""
    if not _printable(value):
        raise BadRequest(f"{name}: not printable ASCII")
    lowered = name.lower()
    if name in URL_HEADERS or (name in URI_HEADERS and "://" in value):
        # A whole URL names a scheme and host too, even in a header that usually holds a path: they must agree
        scheme, host, target = _url(name, value)
        seen["uri"].append((name, target))
        seen["scheme"].append((name, scheme))
        seen["host"].append((name, host))
    elif name in URI_HEADERS:
        seen["uri"].append((name, _target(name, value)))
    elif name in METHOD_HEADERS:
        seen["method"].append((name, value.strip().upper()))
    elif lowered in ("x-forwarded-ssl", "front-end-https"):
        seen["scheme"].append((name, "https" if value.strip().lower() == "on" else "http"))
    elif name in SCHEME_HEADERS:  # every element of a list: an application may read the last one
        seen["scheme"].extend((name, item.strip().lower()) for item in value.split(","))
    elif name in HOST_HEADERS:
        seen["host"].extend((name, _host(name, item.strip())) for item in value.split(","))
    else:  # Forwarded (RFC 7239): proto= and host= of every element, quoted strings read as one value
        for key, item in _forwarded_pairs(name, value):
            if key == "proto":
                seen["scheme"].append((name, item.lower()))
            elif key == "host":
                seen["host"].append((name, _host(name, item)))


_FORWARDED = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,;"\s]*)\s*([,;]|$)')


def _forwarded_pairs(name: str, value: str) -> list[tuple[str, str]]:
    """Every ``key=value`` of a Forwarded header, across all its elements; a ``,`` or ``;`` inside a quoted
    string stays in the value (``for="a,b";host=evil`` names host evil). Anything else is refused (400)."""
    pairs, pos = [], 0
    while pos < len(value):
        found = _FORWARDED.match(value, pos)
        if found is None or found.end() == pos:
            raise BadRequest(f"{name}: not an RFC 7239 list of key=value pairs")
        item = found.group(2)
        if item.startswith('"'):
            item = re.sub(r"\\(.)", r"\1", item[1:-1])
        pairs.append((found.group(1).lower(), item))
        pos = found.end()
    return pairs


def _target(name: str, value: str) -> str:
    """A request target as a front writes it: a path (and query). A ``#`` is refused: a browser never sends a
    fragment, nginx passes it on in ``$request_uri``, and applications differ on it (most cut it off and serve
    ``/admin/x`` for ``/admin/x#y``, which rules would otherwise judge as the path ``/admin/x%23y``)."""
    if not value.startswith("/"):
        raise BadRequest(f"{name}: not a path")
    if "#" in value:
        raise BadRequest(f"{name}: a fragment (#) in the original request")
    return value


# A URL's or a host header's host[:port]: what a request's Host can rightly hold. nginx accepts a Host such as
# "app.example.com?" or "a\\b" and ingress-nginx writes it into X-Original-URL as it came, where "?" would
# end the authority and turn the path into a query ("https://app.example.com?/admin/x" names "/").
_AUTHORITY = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _host(name: str, value: str) -> str:
    if not _AUTHORITY.fullmatch(value):
        raise BadRequest(f"{name}: not a host")
    return value.lower()


def _url(name: str, value: str) -> tuple[str, str, str]:
    authority = value.partition("://")[2].split("/", 1)[0]
    if not _AUTHORITY.fullmatch(authority):
        raise BadRequest(f"{name}: not an http(s) URL with a host")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise BadRequest(f"{name}: not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.username or parts.password:
        raise BadRequest(f"{name}: not an http(s) URL")
    if "#" in value:
        raise BadRequest(f"{name}: a fragment (#) in the original request")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.netloc.lower(), target


def read_proxied(headers: CIMultiDictProxy[str], front: Front) -> tuple[str | None, str | None]:
    """Scheme and host of a request the front proxies to the sidecar's own endpoints (its own headers only)."""
    scheme = headers.get(front.proxied_scheme)
    host = headers.get(front.proxied_host)
    scheme = scheme.split(",")[0].strip().lower() if scheme else None
    host = host.split(",")[0].strip() if host else None
    return scheme or None, host or None
