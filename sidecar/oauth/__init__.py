"""The OAuth 2.1 authorization server for command-line and MCP clients (``--oauth-server``).

The sidecar issues its own opaque tokens for the ``--oauth-resource`` paths; each grant keeps the
upstream provider's tokens server-side in a session record and refreshes them with the browser path's
single-flight ``Refresher``. Dependencies point one way: this package uses the session store, refresh
machinery and provider client; nothing on the browser path imports it (``app.build_app`` plugs it in
through ``Services.resource_guard`` and ``Services.sign_in_finishers``).
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
    from . import (
        authorize,
        cimd,
        device,
        grants_page,
        limits,
        metadata,
        registration,
        resource,
        revocation,
        token_endpoint,
    )
    from .service import OAUTH, oauth_ctx

    async def hooks_ctx(app: web.Application) -> AsyncIterator[None]:
        """After ``oauth_ctx``: bearer tokens on the resource paths, the grant's own upstream sign-in coming back
        through the browser callback, and the grants listed as connected applications on the account page."""
        svc = app[SERVICES]
        app[limits.LIMITER] = limits.limiter_for(svc.sessions.store)
        svc.resource_guard = resource.ResourceGuardImpl(app[OAUTH])
        svc.sign_in_finishers["grant"] = authorize.finish_grant
        svc.connected_apps = grants_page.GrantsAsApps(app)
        yield
        svc.connected_apps = None
        svc.sign_in_finishers.pop("grant", None)

    app.cleanup_ctx.append(oauth_ctx)
    app.cleanup_ctx.append(hooks_ctx)
    app[device.ENTRY_LIMITER] = RateLimiter()
    app[cimd.DOCUMENTS] = cimd.MetadataDocuments(config)
    router, prefix = app.router, config.proxy_prefix
    router.add_get(metadata.AS_PATH, guarded(metadata.authorization_server, "oauth_metadata"))
    router.add_route("OPTIONS", metadata.AS_PATH, guarded(metadata.preflight, "oauth_metadata"))
    router.add_get(metadata.OIDC_PATH, guarded(metadata.openid_configuration, "oauth_metadata"))
    router.add_route("OPTIONS", metadata.OIDC_PATH, guarded(metadata.preflight, "oauth_metadata"))
    router.add_get(prefix + "/jwks", guarded(metadata.jwks, "oauth_metadata"))
    resource_metadata = metadata.PRM_PATH + "{path:(/.*)?}"
    router.add_get(resource_metadata, guarded(metadata.protected_resource, "oauth_resource_metadata"))
    router.add_route("OPTIONS", resource_metadata, guarded(metadata.preflight, "oauth_resource_metadata"))
    router.add_post(prefix + "/register", guarded(registration.register, "/oauth2/register"))
    router.add_get(prefix + "/authorize", guarded(authorize.authorize, "/oauth2/authorize"))
    router.add_post(prefix + "/consent", guarded(authorize.consent, "/oauth2/consent"))
    router.add_post(
        prefix + "/device_authorization", guarded(device.device_authorization, "/oauth2/device_authorization")
    )
    router.add_get(prefix + "/device", guarded(device.device_page, "/oauth2/device"))
    router.add_post(prefix + "/device", guarded(device.device_page, "/oauth2/device"))
    router.add_get(prefix + "/grants", guarded(grants_page.grants, "/oauth2/grants"))
    router.add_post(prefix + "/grants/revoke", guarded(grants_page.revoke, "/oauth2/grants/revoke"))
    router.add_post(prefix + "/token", guarded(token_endpoint.handle, "/oauth2/token"))
    router.add_post(prefix + "/revoke", guarded(revocation.handle, "/oauth2/revoke"))
