"""What wraps every handler: request id, errors to statuses, metrics, one JSON log line.

Only here do the project's exceptions become HTTP answers, so every handler
can simply raise. It is applied once per route when the app is built
(``guarded``) rather than as an aiohttp middleware, which would rebuild a
wrapper chain on every request of the hot path.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from time import monotonic
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from . import kit, logs, metrics, pages
from .context import AUTHED, SERVICES, VIEW, Services, View, trusted_peer, view_of
from .errors import (
    BadRequest,
    InvalidGrant,
    InvalidState,
    ProviderRefused,
    ProviderTimeout,
    ProviderUnavailable,
    RefreshBusy,
    SessionGone,
    SidecarError,
    StoreUnavailable,
    TokenValidationError,
)
from .fronts import refuse_undecodable
from .guard import sign_in_redirect
from .models import Session

log = logging.getLogger("sidecar.errors")

Handler = Callable[[web.Request, Services], Awaitable[web.StreamResponse]]
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # fullmatch: no "$" that lets a trailing newline in
_RETRY_AFTER = "2"


_ID_PREFIX = secrets.token_hex(4)
_ids = itertools.count(1)


def _next_request_id() -> str:
    """Unique per process run without a syscall per request: random prefix + counter."""
    return f"{_ID_PREFIX}-{next(_ids):x}"


def _error_response(request: web.Request, exc: SidecarError) -> web.StreamResponse:
    if isinstance(exc, SessionGone):
        if request.path == request.app[SERVICES].config.proxy_prefix + "/auth":
            return web.Response(status=401, text="401 Unauthorized\n")
        return sign_in_redirect(request)
    if isinstance(exc, ProviderTimeout):
        log.warning("provider timed out", extra={"fields": {"error": type(exc).__name__, "detail": str(exc)}})
        text = "504 Gateway Timeout: the identity provider did not answer\n"
        return pages.unavailable(request, 504, text, _RETRY_AFTER)
    if isinstance(exc, (StoreUnavailable, ProviderUnavailable, RefreshBusy)):
        log.warning("temporarily unavailable", extra={"fields": {"error": type(exc).__name__, "detail": str(exc)}})
        wait = exc.retry_after if isinstance(exc, ProviderUnavailable) else None  # the provider's own Retry-After
        told = _RETRY_AFTER if wait is None else str(max(1, math.ceil(wait)))
        return pages.unavailable(request, 503, "503 Service Unavailable: try again shortly\n", told)
    if isinstance(exc, (TokenValidationError, InvalidGrant)):
        log.warning("sign-in refused", extra={"fields": {"error": type(exc).__name__, "detail": str(exc)}})
        return pages.refused_sign_in(request)
    if isinstance(exc, InvalidState):
        log.info("sign-in state refused", extra={"fields": {"detail": str(exc)}})
        return pages.expired_sign_in(request)
    if isinstance(exc, BadRequest):
        return pages.bad_request(request, f"400 Bad Request: {exc}\n", str(exc))
    if isinstance(exc, ProviderRefused) and exc.misconfigured:
        # oidc.py already logged the cause as an error naming the client credentials to check.
        return pages.misconfigured(request)
    log.error("provider or internal error", extra={"fields": {"error": type(exc).__name__, "detail": str(exc)}})
    return pages.bad_gateway(request, "502 Bad Gateway: the identity provider failed\n")


def guarded(handler: Handler, route: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """``handler(request, services)`` wrapped with request id, error mapping, metrics and the log line.

    ``route`` is the metrics/log label, fixed per route so no label is derived from client input."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        svc = request.app[SERVICES]
        started = monotonic()
        request_id = _request_id(request, svc)
        token = kit.REQUEST_ID.set(request_id)  # for the error pages the handler may build
        try:
            headers = request.headers
            if not "".join(headers.values()).isascii():  # one pass in C; the common case ends here
                refuse_undecodable(headers)  # bytes are judged here, once, for both listeners
            response = await handler(request, svc)
        except web.HTTPForbidden:
            response = pages.forbidden(request)
        except web.HTTPException as exc:
            _finish(request, svc, route, exc.status, started, request_id)
            raise
        except SidecarError as exc:
            response = _error_response(request, exc)
        except Exception:
            log.exception("unhandled error")
            response = pages.internal(request)
        finally:
            kit.REQUEST_ID.reset(token)
        _finish(request, svc, route, response.status, started, request_id)
        if request_id and not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response

    wrapped.__name__ = getattr(handler, "__name__", "handler")
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _request_id(request: web.Request, svc: Services) -> str | None:
    """The caller's well-formed ``X-Request-Id``, else a new one; none without logging (ids exist to correlate
    log lines; without logging only the caller's is echoed)."""
    incoming = request.headers.get("X-Request-Id")
    if incoming and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return _next_request_id() if svc.config.request_logging else None


def _finish(
    request: web.Request, svc: Services, route: str, status: int, started: float, request_id: str | None
) -> None:
    """Count the request and write its log line."""
    seconds = monotonic() - started
    metrics.REQUEST_COUNTS.add((route, status))
    metrics.request_seconds(route, seconds)
    if request_id is None or not svc.config.request_logging:
        return
    state = _state_of(request)
    authed = state.get(AUTHED)
    view: View | None = state.get(VIEW)
    logs.access_request(
        request_id,
        request.method,
        route,
        request.path,
        status,
        seconds,
        authed[1] if authed else None,
        view.client_ip if view is not None else _client_ip(request, svc),
    )


def finish_cached(
    svc: Services,
    route: str,
    method: str,
    path: str,
    seconds: float,
    incoming: str | None,
    authed: Session,
    client_ip: str,
) -> str | None:
    """``_finish`` for a 202 the lean listener answered from the decision cache, with no request object: the
    same counts and the same access line. Returns the request id to echo, if any."""
    metrics.REQUEST_COUNTS.add((route, 202))
    metrics.request_seconds(route, seconds)
    request_id = incoming if incoming and _REQUEST_ID.fullmatch(incoming) else None
    if not svc.config.request_logging:
        return request_id
    request_id = request_id or _next_request_id()
    logs.access_request(request_id, method, route, path, 202, seconds, authed, client_ip)
    return request_id


def _state_of(request: web.Request) -> Mapping[Any, Any]:
    """The request's own key dict: ``web.Request.get`` is ``Mapping.get``, which for a key that is not there
    (the view, for most requests) raises and catches a ``KeyError`` in Python. The lean listener's request
    adapter has no such dict and a cheap ``get`` of its own."""
    state: Mapping[Any, Any] | None = getattr(request, "_state", None)
    return request if state is None else state


def _client_ip(request: web.Request, svc: Services) -> str:
    """``view_of(request).client_ip`` for a request whose view was not built, without building it only for the
    log line: from a peer that is not a trusted proxy the client is the peer itself, which is all ``view_of``
    would conclude too."""
    remote = request.remote
    if not svc.config.reverse_proxy or not trusted_peer(remote, svc.config):
        return str(remote)
    return view_of(request).client_ip


async def drop_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """No ``Server: Python/3.x aiohttp/3.y`` on any answer: it tells a scanner which CVEs to try.

    aiohttp adds it to every response it prepares unless one is set; a proxied app's own
    ``Server`` header is copied over first and so is kept, as the app chose to send it."""
    if response.headers.get("Server") == SERVER_SOFTWARE:
        del response.headers["Server"]


def drop_server_headers(app: web.Application) -> None:
    """``drop_server_header`` for every answer of ``app``, the proxy's too: through its requests' own prepare
    step where aiohttp lets the application choose the request class (``Application._make_request(...,
    _cls=...)``), else, on an aiohttp without that, through the signal as before. The signal (``Signal.send``
    and a second coroutine on every answer) was about 8k of a proxied request's ~650k instructions."""
    make = getattr(app, "_make_request", None)
    if make is None or "_cls" not in inspect.signature(make).parameters:
        app.on_response_prepare.append(drop_server_header)
        return
    receivers = app.on_response_prepare  # frozen with the app: empty unless someone else adds one
    subapps = getattr(app, "_subapps", True)  # the sidecar has none; with one, aiohttp's own walk decides

    class ServerlessRequest(web.Request):
        async def _prepare_hook(self, response: web.StreamResponse) -> None:
            headers = response.headers
            if headers.get("Server") == SERVER_SOFTWARE:
                del headers["Server"]
            if receivers or subapps:
                await super()._prepare_hook(response)  # their receivers, as aiohttp would run them

    # object.__setattr__: aiohttp's debug mode warns on any attribute set on an application
    object.__setattr__(app, "_make_request", functools.partial(make, _cls=ServerlessRequest))
