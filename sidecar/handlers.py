"""The sidecar's own endpoints: ``/oauth2/*``, ``/ping``, ``/ready`` and ``/metrics``; the flows live in
``signin.py``, ``signout.py`` and ``auth_decision.py``, the routes are laid out here."""

from __future__ import annotations

import logging

from aiohttp import web

from . import metrics
from .auth_decision import auth as auth
from .auth_decision import decision_key as decision_key
from .config import Config
from .context import Services
from .errors import ProviderError, SessionGone, StoreUnavailable
from .guard import authorize
from .middleware import guarded
from .signin import begin_sign_in as begin_sign_in
from .signin import callback, sign_in, start
from .signout import _same_origin as _same_origin
from .signout import backchannel_logout, sign_out
from .signout import everywhere_field as everywhere_field

log = logging.getLogger("sidecar.handlers")


async def userinfo(request: web.Request, svc: Services) -> web.Response:
    try:
        _, session = await authorize(request, svc)
    except SessionGone:
        return web.json_response({"error": "not signed in"}, status=401)
    ident, tokens = session.identity, session.tokens
    return web.json_response(
        {
            "user": ident.user,
            "email": ident.email,
            "groups": list(ident.groups),
            "preferred_username": ident.preferred_username,
            "access_token_expires_at": tokens.access_expires_at,
            "refresh_count": session.refresh_count,
            "signed_in_at": session.signed_in_at,
        },
        headers={"Cache-Control": "no-store"},
    )


async def ping(request: web.Request, svc: Services) -> web.Response:
    return web.Response(text="OK\n")


async def ready(request: web.Request, svc: Services) -> web.Response:
    """Ready when the store answers and the provider's discovery document was fetched (once is enough)."""
    try:
        await svc.sessions.store.ping()
    except StoreUnavailable:
        return web.Response(status=503, text="session store unreachable\n")
    try:
        await svc.oidc.metadata()
    except ProviderError as exc:
        log.error(
            "identity provider not usable: check --oidc-issuer-url",
            extra={"fields": {"issuer": svc.config.oidc_issuer_url, "error": type(exc).__name__, "detail": str(exc)}},
        )
        return web.Response(status=503, text=f"identity provider unreachable or not an OIDC issuer: {exc}\n")
    return web.Response(text="OK\n")


async def metrics_page(request: web.Request, svc: Services | None = None) -> web.Response:
    return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")


def add_routes(app: web.Application, config: Config, with_metrics: bool) -> None:
    """The endpoints under ``--proxy-prefix`` and at ``--ping-path`` / ``--ready-path``. Metric and log
    labels keep the default names (``/oauth2/auth``...), so dashboards do not depend on the prefix."""
    prefix = config.proxy_prefix
    routes = [
        ("GET", "/oauth2/start", start),
        ("GET", "/oauth2/callback", callback),
        ("GET", "/oauth2/sign_in", sign_in),
        ("*", "/oauth2/sign_out", sign_out),
        ("*", "/oauth2/auth", auth),
        ("GET", "/oauth2/userinfo", userinfo),
        ("POST", "/oauth2/backchannel_logout", backchannel_logout),
    ]
    paths = [prefix + label.removeprefix("/oauth2") for _, label, _ in routes]
    routes += [("GET", "/ping", ping), ("GET", "/ready", ready)]
    paths += [config.ping_path, config.ready_path]
    if with_metrics:
        routes.append(("GET", "/metrics", metrics_page))
        paths.append("/metrics")
    if config.front == "envoy":  # ext_authz appends the original path to the auth URL's
        routes.append(("*", "/oauth2/auth", auth))
        paths.append(prefix + "/auth/{tail:.*}")
    for (method, label, handler), path in zip(routes, paths, strict=True):
        if method == "GET":
            app.router.add_get(path, guarded(handler, label))  # HEAD too, for probes
        else:
            app.router.add_route(method, path, guarded(handler, label))
