"""``POST P/register``: Dynamic Client Registration (RFC 7591) for CLI and MCP clients.

Anyone may register, so what a registration can say is narrow:

- The metadata passes ``client_metadata.check_metadata`` (redirect URIs: https, loopback http, or for public
  native clients a reverse-domain private-use scheme; grant types; scope; no invisible or bidi characters
  in what the consent page shows). The reply echoes what was kept, ``scope`` included.
- A confidential client (``client_secret_post`` / ``client_secret_basic``) gets a secret once; only its
  SHA-256 is kept.
- Bodies over 16 KiB, oversized fields, a checked record over 4 KiB and anything but a JSON object are
  refused; each client address may register ``--oauth-registration-rate-limit`` clients per minute, counted
  across replicas (``limits.py``; 429).
- Anyone may register, so a registration is kept only ``--oauth-unused-client-ttl`` (1h) until a user grants
  it access (``store.promote_client``, at the grant), and at most ``--oauth-unused-clients-max`` such unused
  registrations live at once across replicas, shared fairly between networks (``unused_pool.py``: a new one
  forgets an old one of the network holding the most, never refused for everyone). Their short TTL also makes
  them the first keys Redis's ``volatile-ttl`` eviction drops, before any session. Once granted, a client unused for
  ``--oauth-client-idle-timeout`` is forgotten (its record's TTL, renewed on use).

Client ID Metadata Documents (MCP 2025-11-25) are the other way in, when the operator turns them on
(``--oauth-client-metadata-documents``, ``cimd.py``): a document's metadata passes the same checks
(``check_metadata``), restricted to public clients.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict
from typing import Any

from aiohttp import web

from .. import logs
from ..context import Services, view_of
from . import tokens as tk
from .client_metadata import Refused, check_metadata, redirect_uri_problem
from .limits import too_many
from .model import GRANT_AUTHORIZATION_CODE, Client
from .scopes import SCOPES
from .service import OAUTH
from .unused_pool import network_of

__all__ = ["Refused", "check_metadata", "client_from_metadata", "redirect_uri_problem", "register"]

MAX_BODY_BYTES = 16 * 1024
MAX_STORED_BYTES = 4 * 1024  # what one anonymous registration may keep in the store, once checked
_JSON_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def refusal(code: str, description: str, status: int = 400) -> web.Response:
    body = {"error": code, "error_description": description}
    return web.json_response(body, status=status, headers=_JSON_HEADERS)


def client_from_metadata(meta: dict[str, Any], client_ip: str) -> tuple[Client, str | None]:
    """The client to store and its secret (None for a public client); raises Refused."""
    checked = check_metadata(meta)
    method = checked.token_endpoint_auth_method
    secret = None if method == "none" else secrets.token_urlsafe(32)
    client = Client(
        client_id=secrets.token_urlsafe(16),
        client_name=checked.client_name,
        redirect_uris=checked.redirect_uris,
        grant_types=checked.grant_types,
        token_endpoint_auth_method=method,
        secret_hash=tk.secret_hash(secret) if secret else None,
        created_at=time.time(),
        registered_from=client_ip,
        client_uri=checked.client_uri,
        scope=checked.scope,
    )
    return client, secret


async def _read_json(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Refused("invalid_client_metadata", "send the metadata as application/json")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise Refused("invalid_client_metadata", "request body too large")
    body = await request.content.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise Refused("invalid_client_metadata", "request body too large")
    try:
        meta = json.loads(body)
    except (ValueError, RecursionError):
        raise Refused("invalid_client_metadata", "the body is not JSON") from None
    if not isinstance(meta, dict):
        raise Refused("invalid_client_metadata", "the body must be a JSON object")
    return meta


def _response(client: Client, secret: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "client_id": client.client_id,
        "client_id_issued_at": int(client.created_at),
        "client_name": client.client_name,
        "redirect_uris": list(client.redirect_uris),
        "grant_types": list(client.grant_types),
        "response_types": ["code"] if GRANT_AUTHORIZATION_CODE in client.grant_types else [],
        "token_endpoint_auth_method": client.token_endpoint_auth_method,
        "scope": client.scope or " ".join(SCOPES),  # oidc-agent stops when its scopes are not echoed
    }
    if client.client_uri:
        body["client_uri"] = client.client_uri
    if secret is not None:
        body["client_secret"] = secret
        body["client_secret_expires_at"] = 0  # it lasts as long as the client (forgotten when idle)
    return body


async def register(request: web.Request, svc: Services) -> web.Response:
    """Register a client (201 with its metadata), or an RFC 7591 error."""
    client_ip = view_of(request).client_ip
    limited = await too_many(request, "register", float(svc.config.oauth_registration_rate_limit), "registrations")
    if limited is not None:
        return limited
    try:
        client, secret = client_from_metadata(await _read_json(request), client_ip)
    except Refused as exc:
        return refusal(exc.code, exc.description)
    if len(json.dumps(asdict(client), separators=(",", ":")).encode()) > MAX_STORED_BYTES:
        return refusal("invalid_client_metadata", "the client metadata is too large to keep (over 4 KiB)")
    config, network = svc.config, network_of(client_ip)
    forgotten = await request.app[OAUTH].store.put_new_client(
        client,
        network,
        float(config.oauth_unused_client_ttl),
        int(config.oauth_unused_clients_max),
        int(config.oauth_unused_clients_per_network),
    )
    if forgotten is not None:  # the pool's fair share (unused_pool.py): never a refusal for everyone
        logs.event("oauth_unused_client_forgotten", {"client_id": forgotten, "for_network": network})
    fields = {"client_id": client.client_id, "method": client.token_endpoint_auth_method, "client_ip": client_ip}
    logs.event("oauth_client_registered", fields)
    return web.json_response(_response(client, secret), status=201, headers=_JSON_HEADERS)
