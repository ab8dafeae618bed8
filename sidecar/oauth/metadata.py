"""Discovery: Authorization Server Metadata (RFC 8414) and Protected Resource Metadata (RFC 9728).

A client that gets a 401 on ``/mcp`` follows its ``resource_metadata`` to
``/.well-known/oauth-protected-resource/mcp``, learns the authorization server (the sidecar's external
origin) and reads ``/.well-known/oauth-authorization-server`` for the endpoints. Both are public and
carry no secret, so ``install`` opens them to any origin (``cors.py``: browser-based MCP clients read them
from another origin; the TypeScript SDK's ``MCP-Protocol-Version`` header makes the browser ask first).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..context import Services
from . import id_token
from .model import AUTH_METHODS, GRANT_TYPES
from .scopes import SCOPES
from .service import OAUTH

AS_PATH = "/.well-known/oauth-authorization-server"
OIDC_PATH = "/.well-known/openid-configuration"
CLAIMS = ("iss", "sub", "aud", "exp", "iat", "auth_time", "acr", "nonce", "at_hash", "preferred_username", "email")
PRM_PATH = "/.well-known/oauth-protected-resource"


def _json(body: dict[str, Any]) -> web.Response:
    return web.json_response(body, headers={"Cache-Control": "private, max-age=300"})


def _not_found() -> web.Response:
    return web.json_response({"error": "not_found"}, status=404)


async def authorization_server(request: web.Request, svc: Services) -> web.Response:
    """RFC 8414 metadata; the issuer is the external origin this client used. A path after the well-known prefix
    (RFC 8414 3.1) names an issuer with that path, which does not exist here: 404."""
    if request.match_info.get("path"):
        return _not_found()
    return _json(_server_metadata(request, svc))


async def openid_configuration(request: web.Request, svc: Services) -> web.Response:
    """OpenID Connect Discovery 1.0 section 3: the same server, with what an OpenID client needs on top (no
    userinfo endpoint: the ID token carries every claim the server knows). A path suffix: 404, as above."""
    if request.match_info.get("path"):
        return _not_found()
    return _json(
        {
            **_server_metadata(request, svc),
            "claims_supported": list(CLAIMS),
            "request_parameter_supported": False,
            "request_uri_parameter_supported": False,
            "claims_parameter_supported": False,
        }
    )


async def jwks(request: web.Request, svc: Services) -> web.Response:
    """The public keys that sign ID tokens (``id_token.py``)."""
    return _json(id_token.jwks(svc.config))


def _server_metadata(request: web.Request, svc: Services) -> dict[str, Any]:
    issuer = request.app[OAUTH].issuer(request)
    prefix = issuer + svc.config.proxy_prefix
    return {
        "issuer": issuer,
        "authorization_endpoint": prefix + "/authorize",
        "token_endpoint": prefix + "/token",
        "registration_endpoint": prefix + "/register",
        "jwks_uri": prefix + "/jwks",
        "revocation_endpoint": prefix + "/revoke",
        "device_authorization_endpoint": prefix + "/device_authorization",
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": list(GRANT_TYPES),
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "scopes_supported": list(SCOPES),
        "authorization_response_iss_parameter_supported": True,
        "client_id_metadata_document_supported": svc.config.oauth_client_metadata_documents,
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [id_token.ALGORITHM],
    }


async def protected_resource(request: web.Request, svc: Services) -> web.Response:
    """RFC 9728 metadata of the resource at the path after the well-known prefix; the root form names the
    first resource (the only one, usually). A path that is not a resource is 404."""
    oauth = request.app[OAUTH]
    path = request.match_info.get("path", "")
    paths = svc.config.oauth_resources
    if path in ("", "/"):
        path = sorted(paths)[0]
    elif path not in paths:
        return _not_found()
    return _json(
        {
            "resource": oauth.resource_for(request, path),
            "authorization_servers": [oauth.issuer(request)],
            "bearer_methods_supported": ["header"],
            "scopes_supported": list(SCOPES),
            "resource_name": f"{path} on {oauth.issuer(request)}",
        }
    )
