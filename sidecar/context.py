"""Typed keys for what the web layer keeps on the application and on each request."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web

from .bearer import BearerVerifier
from .config import Config
from .cookies import CookieCodec, SessionRef, SignInAttempt
from .models import Identity, Session, TokenSet
from .oidc import OidcClient
from .ratelimit import RateLimiter
from .refresh import Refresher
from .sessions import Sessions

if TYPE_CHECKING:  # decisions imports this module
    from .decisions import DecisionCache


class ResourceGuard(Protocol):
    """Plugged in by ``sidecar.oauth`` (``--oauth-server``): the browser path calls it without importing it."""

    async def authenticate(self, request: web.Request) -> tuple[SessionRef, Session] | None:
        """The session behind a sidecar-issued bearer token on a resource path; None: not such a request
        (the cookie decides). Raises an HTTP 401 for a bad token there."""

    def challenge(self, request: web.Request) -> web.Response | None:
        """The 401 a resource path answers without credentials (``resource_metadata``); None elsewhere."""


# Finishes an upstream sign-in started with a ``purpose`` (``SignInAttempt.purpose``): gets the request,
# the attempt, the identity, the provider's tokens and the ID token claims; answers the browser.
SignInFinisher = Callable[[web.Request, SignInAttempt, Identity, TokenSet, dict[str, Any]], Awaitable[web.Response]]


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
    decisions: DecisionCache | None = None  # cached /oauth2/auth 202s (decisions.py)


@dataclass
class View:
    """How the client sees this request: scheme and host, trusting X-Forwarded-* only from trusted proxies."""

    scheme: str
    host: str
    client_ip: str
    trusted: bool  # the peer is a trusted proxy and --reverse-proxy is on


SERVICES = web.AppKey("services", Services)
VIEW = web.RequestKey("view", View)
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


def view_of(request: web.Request) -> View:
    """Computed on first use only: the hot /oauth2/auth path never needs it."""
    view = request.get(VIEW)
    if view is None:
        config = request.app[SERVICES].config
        trusted = trusted_peer(request.remote, config)
        scheme = "https" if request.secure else "http"
        host = request.host
        if trusted:
            scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip().lower() or scheme
            host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip() or host
        if scheme not in ("http", "https"):
            scheme = "http"
        client_ip = (forwarded_client_ip(request, config) if trusted else None) or str(request.remote)
        view = request[VIEW] = View(scheme=scheme, host=host, client_ip=client_ip, trusted=trusted)
    return view


def services(request: web.Request) -> Services:
    return request.app[SERVICES]
