"""The only place where the parts are assembled into an aiohttp application."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from . import handlers, logs, metrics, proxy
from .context import SERVICES, Services
from .cookies import CookieCodec
from .middleware import guarded
from .oidc import OidcClient
from .refresh import Refresher
from .sessions import Sessions
from .store import SessionStore, make_store

MAX_HEADER_BYTES = 8190  # larger request lines or header fields are refused with 400 by aiohttp


def build_app(config: Any, store: SessionStore | None = None) -> web.Application:
    """A ready-to-run application; ``store`` lets tests share one store between apps."""
    app = web.Application(
        handler_args={
            "max_line_size": MAX_HEADER_BYTES,
            "max_field_size": MAX_HEADER_BYTES,
        }
    )

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        chosen = store if store is not None else make_store(config)
        http = aiohttp.ClientSession(headers={"User-Agent": "sidecar/0.1"})
        upstream_http = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
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
    handlers.add_routes(app, with_metrics=not config.metrics_address)
    app.router.add_route("*", "/{tail:.*}", guarded(proxy.handle, "proxy"))
    return app


async def _flush_metrics_every_second() -> None:
    while True:
        await asyncio.sleep(1.0)
        metrics.flush()


def build_metrics_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", handlers.metrics_page)
    return app
