"""The one middleware: request id, client view, errors to statuses, one JSON log line.

Only here do the project's exceptions become HTTP answers, so every handler
can simply raise.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import logs, metrics
from .context import AUTHED, REQUEST_ID, VIEW, View, services
from .errors import (
    BadRequest,
    InvalidGrant,
    ProviderUnavailable,
    RefreshBusy,
    SessionGone,
    SidecarError,
    StoreUnavailable,
    TokenValidationError,
)
from .guard import sign_in_redirect

log = logging.getLogger("sidecar.errors")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_KNOWN_ROUTES = ("/oauth2/auth", "/oauth2/start", "/oauth2/callback", "/oauth2/sign_in", "/oauth2/sign_out",
                 "/oauth2/userinfo", "/ping", "/ready", "/metrics")
_RETRY_AFTER = "2"


def _route(path: str) -> str:
    """A bounded label: our own endpoints by name, everything else is 'proxy'."""
    return path if path in _KNOWN_ROUTES else "proxy"


def _is_trusted(remote: str | None, config: Any) -> bool:
    if not config.reverse_proxy or not remote:
        return False
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(addr in net for net in config.trusted_networks)


def client_view(request: web.Request, config: Any) -> View:
    trusted = _is_trusted(request.remote, config)
    scheme = "https" if request.secure else "http"
    host = request.host
    if trusted:
        scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip().lower() or scheme
        host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip() or host
    if scheme not in ("http", "https"):
        scheme = "http"
    return View(scheme=scheme, host=host, client_ip=str(request.remote), trusted=trusted)


def _error_response(request: web.Request, exc: SidecarError) -> web.StreamResponse:
    if isinstance(exc, SessionGone):
        if request.path == "/oauth2/auth":
            return web.Response(status=401, text="401 Unauthorized\n")
        return sign_in_redirect(request)
    if isinstance(exc, (StoreUnavailable, ProviderUnavailable, RefreshBusy)):
        log.warning("temporarily unavailable", extra={"fields": {"error": type(exc).__name__, "detail": str(exc)}})
        return web.Response(status=503, headers={"Retry-After": _RETRY_AFTER},
                            text="503 Service Unavailable: try again shortly\n")
    if isinstance(exc, (TokenValidationError, InvalidGrant)):
        log.warning("sign-in refused", extra={"fields": {"error": type(exc).__name__, "detail": str(exc)}})
        return web.Response(status=403, text="403 Forbidden: sign-in could not be completed\n")
    if isinstance(exc, BadRequest):
        return web.Response(status=400, text=f"400 Bad Request: {exc}\n")
    log.error("provider or internal error", extra={"fields": {"error": type(exc).__name__, "detail": str(exc)}})
    return web.Response(status=502, text="502 Bad Gateway: the identity provider failed\n")


@web.middleware
async def core(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    config = services(request).config
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(8)
    request[REQUEST_ID] = request_id
    request[VIEW] = client_view(request, config)
    status = 500
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        status = exc.status
        raise
    except SidecarError as exc:
        response = _error_response(request, exc)
        status = response.status
    except Exception:
        log.exception("unhandled error")
        response = web.Response(status=500, text="500 Internal Server Error\n")
    finally:
        route = _route(request.path)
        metrics.REQUESTS.labels(route=route, status=str(status)).inc()
        if config.request_logging:
            authed = request.get(AUTHED)
            logs.access({
                "request_id": request_id, "method": request.method, "route": route,
                "path": request.path if route != "proxy" else request.path[:200],
                "status": status, "latency_ms": round((time.monotonic() - started) * 1000, 2),
                "user": authed[1].identity.user if authed else None, "client_ip": request[VIEW].client_ip,
            })
    if not response.prepared:
        response.headers.setdefault("X-Request-Id", request_id)
    return response
