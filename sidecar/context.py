"""Typed keys for what the web layer keeps on the application and on each request."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .cookies import CookieCodec, SessionRef
from .models import Session
from .oidc import OidcClient
from .ratelimit import RateLimiter
from .refresh import Refresher
from .sessions import Sessions


@dataclass
class Services:
    """Everything a handler needs, built once in ``app.build_app``."""

    config: Any
    codec: CookieCodec
    sessions: Sessions
    refresher: Refresher
    oidc: OidcClient
    http: aiohttp.ClientSession  # provider calls
    upstream_http: aiohttp.ClientSession | None = None  # proxied requests
    signin_limiter: RateLimiter = field(default_factory=RateLimiter)  # per client, /oauth2/start and callback


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


def _is_trusted(remote: str | None, config: Any) -> bool:
    if not config.reverse_proxy or not remote:
        return False
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(addr in net for net in config.trusted_networks)


def view_of(request: web.Request) -> View:
    """Computed on first use only: the hot /oauth2/auth path never needs it."""
    view = request.get(VIEW)
    if view is None:
        config = request.app[SERVICES].config
        trusted = _is_trusted(request.remote, config)
        scheme = "https" if request.secure else "http"
        host = request.host
        if trusted:
            scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip().lower() or scheme
            host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip() or host
        if scheme not in ("http", "https"):
            scheme = "http"
        view = request[VIEW] = View(scheme=scheme, host=host, client_ip=str(request.remote), trusted=trusted)
    return view


def services(request: web.Request) -> Services:
    return request.app[SERVICES]
