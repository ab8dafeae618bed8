"""``POST P/register``: Dynamic Client Registration (RFC 7591) for CLI and MCP clients.

Anyone may register, so what a registration can say is narrow:

- ``redirect_uris``: each an ``https`` URL, or an ``http`` URL on a loopback host (``127.0.0.1``, ``[::1]``,
  ``localhost``; any port: RFC 8252 native apps), written plainly: lower-case scheme and host, no
  fragment, no user info, no whitespace, control characters or backslashes, ASCII only (an IDN must be
  given as punycode). Private-use schemes (``com.example.app:/cb``) are refused: any app on the device
  can claim one, and MCP clients use loopback. Exact string matching at ``/authorize`` does the rest.
- ``redirect_uris`` may be left out only by a client that asks for the device grant alone (no redirect).
- ``grant_types`` among authorization_code, refresh_token and the device code grant; ``response_types``
  only ``code``; ``token_endpoint_auth_method`` ``none`` (public, PKCE) or ``client_secret_post`` /
  ``client_secret_basic`` (a secret is issued once; only its SHA-256 is kept).
- Bodies over 16 KiB, oversized fields and anything but a JSON object are refused; each client IP may
  register ``--oauth-registration-rate-limit`` clients per minute (429). A client unused for
  ``--oauth-client-idle-timeout`` is forgotten (its record's TTL, renewed on use).

Client ID Metadata Documents (MCP 2025-11-25) are the other way in, when the operator turns them on
(``--oauth-client-metadata-documents``, ``cimd.py``): a document's metadata passes the same checks
(``check_metadata``), restricted to public clients.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from .. import logs
from ..context import Services, view_of
from ..ratelimit import RateLimiter, retry_after
from ..rules import valid_hostname
from . import tokens as tk
from .authorize import parse_scope
from .model import AUTH_METHODS, GRANT_AUTHORIZATION_CODE, GRANT_TYPES, Client
from .service import OAUTH

MAX_BODY_BYTES = 16 * 1024
MAX_REDIRECT_URIS = 10
MAX_URI_CHARS = 2000
MAX_NAME_CHARS = 200
LOOPBACK_HOSTS = ("127.0.0.1", "[::1]", "localhost")
REGISTRATION_LIMITER = web.AppKey("oauth_registration_limiter", RateLimiter)
_PORT = re.compile(r"[0-9]{1,5}")
_JSON_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class Refused(Exception):
    """An RFC 7591 3.2.2 error: ``code`` and a description with no secret in it."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


def refusal(code: str, description: str, status: int = 400) -> web.Response:
    body = {"error": code, "error_description": description}
    return web.json_response(body, status=status, headers=_JSON_HEADERS)


def redirect_uri_problem(uri: Any) -> str | None:
    """Why ``uri`` may not be a redirect URI; None when it may (see the module docstring)."""
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI_CHARS:
        return "must be a non-empty string of at most 2000 characters"
    if not uri.isascii() or any(ch <= " " or ch in "\x7f\\\"'<>`{}|^" for ch in uri):
        return "must be plain ASCII without spaces, quotes, backslashes or control characters"
    if "#" in uri:
        return "must not have a fragment"
    try:
        parts = urlsplit(uri)
    except ValueError:  # an unclosed IPv6 bracket
        return "is not a URL"
    if parts.scheme not in ("https", "http") or not uri.startswith(parts.scheme + "://"):
        return "must be an https URL, or an http URL on a loopback address (private-use schemes are refused)"
    netloc = parts.netloc
    if "@" in netloc:
        return "must not carry user info"
    host, port = _split_host(netloc)
    if host is None or (port is not None and not (_PORT.fullmatch(port) and 0 < int(port) < 65536)):
        return "has an invalid host or port"
    if host != host.lower():
        return "must have a lower-case host"
    if parts.scheme == "http" and host not in LOOPBACK_HOSTS:
        return "http is allowed only for loopback hosts (127.0.0.1, [::1], localhost)"
    if parts.scheme == "https" and not (host == "[::1]" or valid_hostname(host)):
        return "has an invalid host name (write an international name in punycode)"
    return None


def _split_host(netloc: str) -> tuple[str | None, str | None]:
    """(host, port text) of an authority without user info; (None, None) when malformed."""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            return None, None
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        if host != "[::1]":
            return None, None  # other IPv6 literals: not needed by clients, easy to spell ambiguously
        if rest and not rest.startswith(":"):
            return None, None
        return host, rest[1:] if rest else None
    host, sep, port = netloc.partition(":")
    if not host or (sep and not port):
        return None, None
    return host, port if sep else None


def _strings(value: Any, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    if not isinstance(value, list) or len(value) > 10 or not all(isinstance(v, str) and len(v) < 200 for v in value):
        raise Refused("invalid_client_metadata", f"{name} must be a short list of strings")
    return tuple(dict.fromkeys(value))


def _text(meta: dict[str, Any], name: str, limit: int) -> str:
    value = meta.get(name, "")
    if not isinstance(value, str) or len(value) > limit:
        raise Refused("invalid_client_metadata", f"{name} must be a string of at most {limit} characters")
    return value


@dataclass(frozen=True)
class Metadata:
    """Client metadata that passed the checks; shared by registration and Client ID Metadata Documents."""

    client_name: str
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    token_endpoint_auth_method: str
    client_uri: str


def check_metadata(
    meta: dict[str, Any], default_method: str = "client_secret_basic", methods: tuple[str, ...] = AUTH_METHODS
) -> Metadata:
    """The checked fields of RFC 7591 client metadata (see the module docstring); raises Refused. RFC 7591 2
    makes ``client_secret_basic`` the default method; a metadata document can only be public (``none``)."""
    grant_types = _strings(meta.get("grant_types"), "grant_types", (GRANT_AUTHORIZATION_CODE,))
    unknown = [g for g in grant_types if g not in GRANT_TYPES]
    if unknown or not grant_types:
        raise Refused("invalid_client_metadata", f"grant_types: only {', '.join(GRANT_TYPES)}")
    response_types = _strings(meta.get("response_types"), "response_types", ("code",))
    if response_types != ("code",) and not (response_types == () and GRANT_AUTHORIZATION_CODE not in grant_types):
        raise Refused("invalid_client_metadata", "response_types: only code")
    method = meta.get("token_endpoint_auth_method", default_method)
    if method not in methods:
        raise Refused("invalid_client_metadata", f"token_endpoint_auth_method: one of {', '.join(methods)}")
    redirect_uris = _redirect_uris(meta.get("redirect_uris"), grant_types)
    scope = meta.get("scope")
    if scope is not None and (not isinstance(scope, str) or parse_scope(scope) is None):
        raise Refused("invalid_client_metadata", "scope: only openid, profile, email and offline_access")
    client_uri = _text(meta, "client_uri", MAX_URI_CHARS)
    if client_uri and (not client_uri.startswith("https://") or redirect_uri_problem(client_uri) is not None):
        raise Refused("invalid_client_metadata", "client_uri must be an https URL")
    name = _text(meta, "client_name", MAX_NAME_CHARS).strip()
    return Metadata(name, redirect_uris, grant_types, method, client_uri)


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
    )
    return client, secret


def _redirect_uris(value: Any, grant_types: tuple[str, ...]) -> tuple[str, ...]:
    if value is None and GRANT_AUTHORIZATION_CODE not in grant_types:
        return ()
    if not isinstance(value, list) or not value or len(value) > MAX_REDIRECT_URIS:
        raise Refused("invalid_redirect_uri", f"redirect_uris: a list of 1 to {MAX_REDIRECT_URIS} URLs is required")
    for uri in value:
        problem = redirect_uri_problem(uri)
        if problem is not None:
            raise Refused("invalid_redirect_uri", f"redirect_uris: each {problem}")
    return tuple(dict.fromkeys(value))


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
    per_minute = float(svc.config.oauth_registration_rate_limit)
    wait = request.app[REGISTRATION_LIMITER].take(client_ip, per_minute, 2 * per_minute, time.monotonic())
    if wait:
        response = refusal("too_many_requests", "too many registrations from this address; try again later", 429)
        response.headers["Retry-After"] = retry_after(wait)
        return response
    try:
        client, secret = client_from_metadata(await _read_json(request), client_ip)
    except Refused as exc:
        return refusal(exc.code, exc.description)
    await request.app[OAUTH].store.put_client(client, float(svc.config.oauth_client_idle_timeout))
    fields = {"client_id": client.client_id, "method": client.token_endpoint_auth_method, "client_ip": client_ip}
    logs.event("oauth_client_registered", fields)
    return web.json_response(_response(client, secret), status=201, headers=_JSON_HEADERS)
