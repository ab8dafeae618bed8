"""The OAuth 2.1 authorization server for command-line and MCP clients (``--oauth-server``).

The sidecar issues its own opaque tokens for the ``--oauth-resource`` paths; each grant keeps the
upstream provider's tokens server-side in a session record and refreshes them with the browser path's
single-flight ``Refresher``. Dependencies point one way: this package uses the session store, refresh
machinery and provider client; nothing on the browser path imports it (``app.build_app`` plugs it in
through ``Services.resource_guard`` and ``Services.sign_in_finishers``).
"""

from __future__ import annotations

from aiohttp import web

from ..config import Config


def install(app: web.Application, config: Config) -> None:
    """Add the authorization server's routes and hooks to ``app`` (called before the proxy catch-all)."""
    raise NotImplementedError("--oauth-server is being built")
