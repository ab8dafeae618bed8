"""The OAuth 2.1 authorization server for command-line and MCP clients (``--oauth-server``).

The sidecar issues its own opaque tokens for the ``--oauth-resource`` paths; each grant keeps the
upstream provider's tokens server-side in a session record and refreshes them with the browser path's
single-flight ``Refresher``. Dependencies point one way: this package uses the session store, refresh
machinery and provider client; nothing on the browser path imports it (``app.build_app`` plugs it in
through ``Services.resource_guard``, ``Services.sign_in_finishers`` and ``Services.sign_out_everywhere``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from ..config import Config
from ..context import SERVICES
from ..middleware import guarded
from ..ratelimit import RateLimiter


def install(app: web.Application, config: Config) -> None:
    """Add the authorization server's routes and hooks to ``app`` (called before the proxy catch-all)."""
    from . import authorize, cimd, cors, device, grants_page, metadata, registration, revocation, token_endpoint
    from .service import oauth_ctx

    async def hooks_ctx(app: web.Application) -> AsyncIterator[None]:
        """After ``oauth_ctx``: the grant's own upstream sign-in comes back through the browser callback, and
        "sign out everywhere" ends the user's grants (their upstream refresh tokens revoked) first."""
        from .service import OAUTH

        async def end_grants(sub: str) -> int:
            return await app[OAUTH].end_user_grants(sub, "signed_out_everywhere")

        app[SERVICES].sign_in_finishers["grant"] = authorize.finish_grant
        app[SERVICES].sign_out_everywhere.append(end_grants)
        app[SERVICES].connected_apps = grants_page.GrantsAsApps(app)
        yield
        app[SERVICES].connected_apps = None
        app[SERVICES].sign_in_finishers.pop("grant", None)
        app[SERVICES].sign_out_everywhere.remove(end_grants)

    app.cleanup_ctx.append(oauth_ctx)
    app.cleanup_ctx.append(hooks_ctx)
    app.cleanup_ctx.append(_guard_ctx)
    app[device.ENTRY_LIMITER] = RateLimiter()
    app[cimd.DOCUMENTS] = cimd.MetadataDocuments(config)
    router, prefix = app.router, config.proxy_prefix
    # what a browser-based client fetch()es from its own origin: open to any origin, never with credentials
    # (cors.py); the pages and the cookie-reading endpoints below get no CORS header
    suffix = "{path:(/.*)?}"  # a path-suffixed form (RFC 8414 3.1) is answered here: 404, not the app's sign-in
    as_metadata, oidc_metadata = metadata.AS_PATH + suffix, metadata.OIDC_PATH + suffix
    cors.add_routes(router, as_metadata, {"GET": guarded(metadata.authorization_server, "oauth_metadata")})
    cors.add_routes(router, oidc_metadata, {"GET": guarded(metadata.openid_configuration, "oauth_metadata")})
    cors.add_routes(router, prefix + "/jwks", {"GET": guarded(metadata.jwks, "oauth_metadata")})
    resource_metadata = metadata.PRM_PATH + "{path:(/.*)?}"
    cors.add_routes(router, resource_metadata, {"GET": guarded(metadata.protected_resource, "oauth_resource_metadata")})
    cors.add_routes(router, prefix + "/register", {"POST": guarded(registration.register, "/oauth2/register")})
    cors.add_routes(router, prefix + "/token", {"POST": guarded(token_endpoint.handle, "/oauth2/token")})
    cors.add_routes(router, prefix + "/revoke", {"POST": guarded(revocation.handle, "/oauth2/revoke")})
    router.add_get(prefix + "/authorize", guarded(authorize.authorize, "/oauth2/authorize"))
    router.add_post(prefix + "/consent", guarded(authorize.consent, "/oauth2/consent"))
    router.add_post(
        prefix + "/device_authorization", guarded(device.device_authorization, "/oauth2/device_authorization")
    )
    router.add_get(prefix + "/device", guarded(device.device_page, "/oauth2/device"))
    router.add_post(prefix + "/device", guarded(device.device_page, "/oauth2/device"))
    router.add_get(prefix + "/grants", guarded(grants_page.grants, "/oauth2/grants"))
    router.add_post(prefix + "/grants/revoke", guarded(grants_page.revoke, "/oauth2/grants/revoke"))


async def _guard_ctx(app: web.Application) -> AsyncIterator[None]:
    """After ``oauth_ctx``: bearer tokens on the resource paths (the guard needs the server, the server does not
    know the guard), and the unauthenticated endpoints' rate limits beside the session store."""
    from . import limits, resource
    from .service import OAUTH

    svc = app[SERVICES]
    app[limits.LIMITER] = limits.limiter_for(svc.sessions.store)
    svc.resource_guard = resource.ResourceGuardImpl(app[OAUTH])
    yield
