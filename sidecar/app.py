"""The only place where the parts are assembled into an aiohttp application."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import ssl
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from . import account, handlers, logs, metrics, proxy
from .bearer import BearerVerifier
from .config import Config
from .context import SERVICES, Services
from .cookies import CookieCodec
from .decisions import DecisionCache
from .guard import cookie_domain_middleware
from .middleware import drop_server_headers, guarded
from .oidc import OidcClient
from .refresh import Refresher
from .sessions import Sessions
from .store import SessionStore, make_store
from .upstream_client import upstream_client

log = logging.getLogger("sidecar")

MAX_HEADER_BYTES = 8190  # larger request lines or header fields are refused with 400 by aiohttp


def provider_http(config: Config) -> aiohttp.ClientSession:
    """The client for provider calls: ``--provider-ca-file`` trusts only those CAs (an internal IdP with
    a private CA); ``--ssl-insecure-skip-verify`` verifies nothing and says so at start."""
    if config.provider_ssl is False:
        log.warning(
            "--ssl-insecure-skip-verify: the provider's TLS certificate is not verified; "
            "anyone on the network path can impersonate it. Use --provider-ca-file instead."
        )
    ssl_arg: ssl.SSLContext | bool = True if config.provider_ssl is None else config.provider_ssl
    return aiohttp.ClientSession(
        headers={"User-Agent": f"sidecar/{version()}"}, connector=aiohttp.TCPConnector(ssl=ssl_arg)
    )


def version() -> str:
    """The installed package's version (``sidecar --version``, the User-Agent)."""
    try:
        return importlib.metadata.version("sidecar")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_app(config: Config, store: SessionStore | None = None) -> web.Application:
    """A ready-to-run application; ``store`` lets tests share one store between apps."""
    app = web.Application(
        middlewares=[cookie_domain_middleware] if config.cookie_domains else [],
        handler_args={
            "max_line_size": MAX_HEADER_BYTES,
            "max_field_size": MAX_HEADER_BYTES,
        },
    )

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        chosen = store if store is not None else make_store(config)
        http = provider_http(config)
        upstream_http = upstream_client(config)
        sessions = Sessions(chosen, config)
        oidc = OidcClient(config, http)
        app[SERVICES] = Services(
            config=config,
            codec=CookieCodec(config.cookie_secrets, config.cookie_expire),
            sessions=sessions,
            refresher=Refresher(sessions, oidc, config),
            oidc=oidc,
            http=http,
            upstream_http=upstream_http,
            bearer=BearerVerifier(config, http, oidc) if config.skip_jwt_bearer_tokens else None,
            decisions=DecisionCache(sessions, config) if config.auth_decision_cache else None,
        )
        flusher = asyncio.ensure_future(_flush_metrics_every_second())
        yield
        flusher.cancel()
        metrics.flush()
        logs.flush()
        await upstream_http.close()
        await http.close()
        if store is None:
            await chosen.close()

    app.cleanup_ctx.append(services_ctx)
    drop_server_headers(app)  # on every answer, the proxy's too
    handlers.add_routes(app, config, with_metrics=not config.metrics_address)
    account.add_routes(app, config)
    if config.oauth_server:
        from . import oauth  # only then: the browser path never imports the authorization server

        oauth.install(app, config)  # its routes, and its hooks on SERVICES (after services_ctx)
    app.router.add_route("*", r"/{tail:[\s\S]*}", guarded(proxy.handle, "proxy"))  # newlines too
    return app


async def _flush_metrics_every_second() -> None:
    while True:
        await asyncio.sleep(1.0)
        metrics.flush()


def build_metrics_app() -> web.Application:
    app = web.Application()
    drop_server_headers(app)  # aiohttp's parser 400s too: the signal skips a request never routed
    app.router.add_get("/metrics", handlers.metrics_page)
    return app
