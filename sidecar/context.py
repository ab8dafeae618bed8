"""Typed keys for what the web layer keeps on the application and on each request."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web

from .bearer import BearerVerifier
from .config import Config
from .cookies import CookieCodec, SessionRef, SignInAttempt
from .errors import BadRequest
from .fronts import FRONTS, Original, names_original, read_auth, read_proxied
from .models import Identity, Session, TokenSet
from .oidc import OidcClient
from .ratelimit import RateLimiter
from .refresh import Refresher
from .sessions import Sessions

if TYPE_CHECKING:  # only for the annotation: decisions.py is the table, it imports nothing of the web layer
    from .decisions import DecisionCache


class ResourceGuard(Protocol):
    """Plugged in by ``sidecar.oauth`` (``--oauth-server``): the browser path calls it without importing it."""

    async def authenticate(self, request: web.Request) -> tuple[SessionRef, Session] | None:
        """The session behind a sidecar-issued bearer token on a resource path; None: not such a request
        (the cookie decides). Raises an HTTP 401 for a bad token there."""

    def challenge(self, request: web.Request) -> web.Response | None:
        """The 401 a resource path answers without credentials (``resource_metadata``); None elsewhere."""


@dataclass(frozen=True)
class ConnectedApp:
    """An application acting for the user (a CLI/MCP client's grant), as the account page lists it."""

    app_id: str
    name: str  # what the client calls itself: hostile text, shown isolated and escaped
    client_id: str
    resource: str
    created_at: float
    last_used_at: float
    last_used_from: str


class ConnectedApps(Protocol):
    """Plugged in by ``sidecar.oauth``: the account page lists and ends grants without importing it."""

    async def list(self, sub: str) -> list[ConnectedApp]:
        """The user's grants."""

    async def revoke(self, sub: str, app_id: str) -> bool:
        """End one of the user's grants; False when ``app_id`` is not one of them."""


# Finishes an upstream sign-in started with a ``purpose`` (``SignInAttempt.purpose``): gets the request,
# the attempt, the identity, the provider's tokens and the ID token claims; answers the browser.
SignInFinisher = Callable[[web.Request, SignInAttempt, Identity, TokenSet, dict[str, Any]], Awaitable[web.Response]]
# Called with a user's ``sub`` before "sign out everywhere" ends their session records: what must be revoked
# upstream first, while its record can still be opened (--oauth-server: the user's grants). Returns a count.
UserSignOut = Callable[[str], Awaitable[int]]


@dataclass
class Services:
    """Everything a handler needs, built once in ``app.build_app``."""

    config: Config
    codec: CookieCodec
    sessions: Sessions
    refresher: Refresher
    oidc: OidcClient
    http: aiohttp.ClientSession  # provider calls
    upstream_http: aiohttp.ClientSession | None = None  # proxied requests
    signin_limiter: RateLimiter = field(default_factory=RateLimiter)  # per client, /oauth2/start and callback
    bearer: BearerVerifier | None = None  # --skip-jwt-bearer-tokens
    resource_guard: ResourceGuard | None = None  # --oauth-server
    sign_in_finishers: dict[str, SignInFinisher] = field(default_factory=dict)  # by purpose kind, --oauth-server
    sign_out_everywhere: list[UserSignOut] = field(default_factory=list)  # --oauth-server
    connected_apps: ConnectedApps | None = None  # --oauth-server: the account page's applications
    decisions: DecisionCache | None = None  # cached /oauth2/auth 202s (decisions.py)


@dataclass
class View:
    """How the client sees this request: scheme and host, trusting X-Forwarded-* only from trusted proxies."""

    scheme: str
    host: str
    client_ip: str
    trusted: bool  # the peer is a trusted proxy and --reverse-proxy is on


NOTHING = Original(uri=None, method=None, scheme=None, host=None)

log = logging.getLogger("sidecar.context")

SERVICES = web.AppKey("services", Services)
VIEW = web.RequestKey("view", View)
ORIGINAL = web.RequestKey("original", Original)
# (SessionRef, Session) once authenticated; the user goes into the log line
AUTHED: web.RequestKey[tuple[SessionRef, Session]] = web.RequestKey("authed", tuple)
# True when a sidecar-issued bearer token authenticated the request: its Authorization never reaches the app
BY_SIDECAR_TOKEN: web.RequestKey[bool] = web.RequestKey("by_sidecar_token", bool)
# The decision cache key the lean listener computed and found no entry for (``()``: not cacheable)
DECISION_KEY: web.RequestKey[tuple[str, ...]] = web.RequestKey("decision_key", tuple)


def trusted_peer(remote: str | None, config: Config) -> bool:
    """The socket peer is a proxy the operator named: ``--reverse-proxy`` on, peer in ``--trusted-proxy``."""
    if not config.reverse_proxy or not remote:
        return False
    return _in_networks(remote, config)


def _in_networks(address: str, config: Config) -> bool:
    networks = config.trusted_networks
    hit = _trust.get(address)
    if hit is not None and hit[0] is networks:  # hashing the networks tuple (ipaddress objects) costs ~1 us
        return hit[1]
    trusted = _address_in(address, networks)
    if len(_trust) >= 1024:
        _trust.clear()
    _trust[address] = (networks, trusted)
    return trusted


_trust: dict[str, tuple[tuple[Any, ...], bool]] = {}  # peer address -> (the networks it was checked against, answer)


@lru_cache(maxsize=1024)
def _address_in(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Cached: the same few peers (nginx, the ingress controller) ask on every request."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(addr in net for net in networks)


def _ip(text: str) -> str | None:
    """A bare IP address (``[v6]:port`` and ``v4:port`` forms allowed), normalised; None for anything else."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def forwarded_client_ip(request: web.Request, config: Config) -> str | None:
    """The client address a trusted proxy reports in ``--real-client-ip-header``; None when it names none.

    For ``X-Forwarded-For`` each proxy appended the address it saw, so the client is the right-most
    address that is not itself a trusted proxy; entries to its left were written by the client and
    prove nothing. Other headers (``X-Real-IP``, ``X-ProxyUser-IP``...) hold one address set by the
    proxy; several values, or anything that is not an IP address, are not believed."""
    values = request.headers.getall(config.real_client_ip_header, [])
    if not values:
        return None
    if config.real_client_ip_header.lower() != "x-forwarded-for":
        return _ip(values[0]) if len(values) == 1 and "," not in values[0] else None
    hops = [part for value in values for part in value.split(",")]
    for hop in reversed(hops):
        address = _ip(hop)
        if address is None:
            return None
        if not _in_networks(address, config):
            return address
    return None


def is_auth_request(request: web.Request, config: Config) -> bool:
    """A front's auth subrequest (``<prefix>/auth``; envoy's ext_authz appends the original path to it)."""
    path = request.path
    auth = config.proxy_prefix + "/auth"
    return path == auth or (config.front == "envoy" and path.startswith(auth + "/"))


def original_of(request: web.Request) -> Original:
    """The request a trusted front asks ``/oauth2/auth`` about, read from the configured front's own headers
    (``fronts.read_auth``); NOTHING for other requests and untrusted peers. Raises BadRequest, every time it
    is asked, when the headers disagree."""
    found = request.get(ORIGINAL)
    if found is None:
        config = request.app[SERVICES].config
        if not is_auth_request(request, config):
            found = NOTHING
        elif not trusted_peer(request.remote, config):
            found = NOTHING
            if names_original(request.headers):
                _untrusted_front(request.remote, config)
        else:
            tail = request.raw_path[len(config.proxy_prefix) + len("/auth") :] if config.front == "envoy" else ""
            query = request.raw_path.partition("?")[2]  # as sent: a "#" in it stays, and is refused
            found = read_auth(request.headers, FRONTS[config.front], request.method, tail, request.host, query)
        request[ORIGINAL] = found
    return found


_untrusted_warned: set[tuple[str, str]] = set()


def _untrusted_front(remote: str | None, config: Config) -> None:
    """Once per peer (up to 16): a front asks about a request but is not trusted, so its headers are not read
    (step-up rules and OAuth resources then cannot see the original request, and tokens are refused)."""
    peer = remote or "?"
    why = "--reverse-proxy is off" if not config.reverse_proxy else "the peer is not in --trusted-proxy"
    if (peer, why) in _untrusted_warned or len(_untrusted_warned) >= 16:
        return
    _untrusted_warned.add((peer, why))
    log.error(
        "an auth request names the original request but its headers are not read: %s",
        why,
        extra={"fields": {"peer": peer}},
    )


def view_of(request: web.Request) -> View:
    """Computed on first use only: the hot /oauth2/auth path never needs it. Scheme and host come from the
    configured front's own headers (on an auth subrequest, those naming the original request); a request
    whose headers disagree keeps the connection's (``original_of`` refuses it where it matters)."""
    view = request.get(VIEW)
    if view is None:
        config = request.app[SERVICES].config
        trusted = trusted_peer(request.remote, config)
        scheme = "https" if request.secure else "http"
        host = request.host
        if trusted:
            front = FRONTS[config.front]
            if is_auth_request(request, config):
                try:
                    original = original_of(request)
                except BadRequest:
                    original = NOTHING
                found = (original.scheme, original.host)
            else:
                found = read_proxied(request.headers, front)
            scheme = found[0] or scheme
            host = found[1] or host
        if scheme not in ("http", "https"):
            scheme = "http"
        client_ip = (forwarded_client_ip(request, config) if trusted else None) or str(request.remote)
        view = request[VIEW] = View(scheme=scheme, host=host, client_ip=client_ip, trusted=trusted)
    return view


def services(request: web.Request) -> Services:
    return request.app[SERVICES]
