"""Typed keys for what the web layer keeps on the application and on each request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from .cookies import CookieCodec, SessionRef
from .models import Session
from .oidc import OidcClient
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


@dataclass
class View:
    """How the client sees this request: scheme and host, trusting X-Forwarded-* only from trusted proxies."""

    scheme: str
    host: str
    client_ip: str
    trusted: bool  # the peer is a trusted proxy and --reverse-proxy is on


SERVICES = web.AppKey("services", Services)
REQUEST_ID = web.RequestKey("request_id", str)
VIEW = web.RequestKey("view", View)
# (SessionRef, Session) once authenticated; the user goes into the log line
AUTHED: web.RequestKey[tuple[SessionRef, Session]] = web.RequestKey("authed", tuple)  # type: ignore[arg-type]


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def authed(request: web.Request) -> tuple[SessionRef, Session] | None:
    return request.get(AUTHED)  # type: ignore[no-any-return]
