"""POST P/revoke (RFC 7009): a refresh token ends its whole grant; an access token ends only itself.

The answer is 200 whatever the token was (unknown, expired, malformed, another client's): a client learns
nothing about tokens it does not hold. A token issued to another client is left alone. The client
authenticates as at the token endpoint; ``token_type_hint`` is accepted and not needed (the token's own
prefix says what it is).
"""

from __future__ import annotations

from aiohttp import web

from ..context import Services
from . import tokens as tk
from .limits import too_many
from .service import OAUTH, OAuthServer
from .token_endpoint import NO_STORE, OAuthError, authenticate_client, error_response, read_form


async def handle(request: web.Request, svc: Services) -> web.Response:
    limited = await too_many(request, "revoke", float(svc.config.oauth_revocation_rate_limit), "revocation requests")
    if limited is not None:
        return limited
    server = request.app[OAUTH]
    try:
        form = await read_form(request)
        client = await authenticate_client(server, request, form)
        if "token" not in form:
            raise OAuthError("invalid_request", "the token parameter is required")
    except OAuthError as exc:
        return error_response(exc)
    await _revoke(server, form["token"], client.client_id)
    return web.Response(status=200, headers=NO_STORE)


async def _revoke(server: OAuthServer, token: str, client_id: str) -> None:
    for kind in (tk.REFRESH, tk.ACCESS):
        grant_id = tk.parse(token, kind)
        if grant_id is None:
            continue
        token_hash = tk.token_hash(token)
        if kind == tk.REFRESH:
            raw = await server.store.refresh_record(grant_id, token_hash)
        else:
            raw = await server.store.access_record(grant_id, token_hash)
        record = tk.TokenRecord.from_bytes(raw) if raw is not None else None
        if record is None or record.client_id != client_id:
            return
        if kind == tk.REFRESH:
            await server.end_grant(grant_id, "revoked_by_client")
        else:
            await server.store.revoke_access(grant_id, token_hash)
        return
