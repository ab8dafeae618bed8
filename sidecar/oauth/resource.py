"""The resource-server front: sidecar-issued bearer tokens on the ``--oauth-resource`` paths.

``guard.authenticate`` asks ``ResourceGuardImpl.authenticate`` first on every request, so a request outside
the resource paths must cost only a prefix check (no Redis, no parsing beyond the path). On a resource path
(or ``/oauth2/auth`` asked about one through the front's own headers, ``fronts.py``) an
``Authorization: Bearer sca.…`` token is looked up by its hash, its audience checked (the grant's canonical
resource must be this request's origin + the resource path the request falls under), the grant's session key
unwrapped with the token, and the grant's upstream session loaded and kept fresh by the grants' own
``Refresher`` (single-flight across replicas). Upstream ``invalid_grant`` ends the grant (401); an upstream
or store outage is raised as is (503/504) and changes nothing.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

from ..bearer import MalformedAuthorization, bearer_credentials
from ..context import original_of, view_of
from ..cookies import SessionRef
from ..errors import BadRequest, InvalidCookie, ProviderUnavailable, SessionGone
from ..models import Session
from ..paths import normalise_path
from . import cors
from . import tokens as tk
from .scopes import SCOPES as VOCABULARY

if TYPE_CHECKING:
    from .service import OAuthServer

SCOPES = " ".join(VOCABULARY)
_TOUCH_EVERY = 60.0
_TOUCH_CACHE = 10_000


class ResourceGuardImpl:
    """``context.ResourceGuard`` for ``--oauth-server``."""

    def __init__(self, server: OAuthServer) -> None:
        self._server = server
        self._resources = server.config.oauth_resources  # longest first
        self._auth_path = server.config.proxy_prefix + "/auth"
        self._skip_jwt = server.config.skip_jwt_bearer_tokens
        self._touched: dict[str, float] = {}

    def _resource_path(self, request: web.Request) -> str | None:
        """The --oauth-resource path this request is under (for /oauth2/auth: the one asked about)."""
        raw = request.raw_path
        if raw == self._auth_path or raw.startswith((self._auth_path + "?", self._auth_path + "/")):
            # The request a front asks about, from the front's own headers; "" when it names none (the cookie
            # decides). Headers naming different paths were refused (400): never the path a client picked.
            raw = original_of(request).path or ""
        raw = raw.split("?", 1)[0]
        if not any(raw.startswith(r) for r in self._resources) and "%" not in raw and "//" not in raw:
            return None  # the hot path: one prefix check per resource
        try:
            path = normalise_path(raw)
        except BadRequest:
            return None  # the proxy refuses it with 400 anyway
        for resource in self._resources:
            if path == resource or path.startswith(resource.rstrip("/") + "/"):
                return resource
        return None

    def _metadata(self, request: web.Request, resource: str) -> str:
        return f"{self._server.issuer(request)}/.well-known/oauth-protected-resource{resource}"

    def _invalid(self, request: web.Request, resource: str) -> web.HTTPUnauthorized:
        metadata = self._metadata(request, resource)
        return web.HTTPUnauthorized(
            headers={
                "WWW-Authenticate": f'Bearer resource_metadata="{metadata}", error="invalid_token"',
                "Cache-Control": "no-store",
                **cors.challenge_headers(request),
            },
            text="401 Unauthorized: invalid or expired access token\n",
        )

    async def authenticate(self, request: web.Request) -> tuple[SessionRef, Session] | None:
        resource = self._resource_path(request)
        if resource is None:
            return None
        try:
            token = bearer_credentials(request)
        except ValueError as exc:  # RFC 6750 3.1: a malformed request is 400 invalid_request (401 to a front)
            metadata = f'resource_metadata="{self._metadata(request, resource)}"'
            raise MalformedAuthorization(str(exc), metadata, cors.challenge_headers(request)) from None
        if token is None:
            return None  # no token: the cookie decides, then challenge() answers the 401
        if not tk.looks_like_ours(token):
            if self._skip_jwt:
                return None  # --skip-jwt-bearer-tokens: the JWT verifier judges it
            raise self._invalid(request, resource)
        return await self._session_for(request, token, resource)

    async def _session_for(self, request: web.Request, token: str, resource: str) -> tuple[SessionRef, Session]:
        server = self._server
        grant_id = tk.parse(token, tk.ACCESS)
        if grant_id is None:
            raise self._invalid(request, resource)
        raw = await server.store.access_record(grant_id, tk.token_hash(token))
        record = tk.TokenRecord.from_bytes(raw) if raw is not None else None
        if (
            record is None
            or record.expires_at <= server.clock()
            or record.resource_path != resource
            or record.resource != server.resource_for(request, resource)
            or server.foreign_origin(request)
            or server.unrouted(request)
        ):
            raise self._invalid(request, resource)
        key = tk.unwrap_key(record.wrapped_key, token)
        if key is None:
            raise self._invalid(request, resource)
        ref = SessionRef(sid=record.session_sid, key=key)
        try:
            session = await server.sessions.load(ref)
            session = await server.refresher.fresh(ref, session)
        except (SessionGone, InvalidCookie) as exc:
            if isinstance(exc, SessionGone) and await server.sessions.store.version(ref.store_key) is not None:
                # The refresher kept the record: the provider refused for a reason that says nothing about
                # the grant (invalid_client, invalid_request ...). A browser would sign in again; a grant
                # waits for the provider to be fixed instead of ending (only a gone record ends it).
                raise ProviderUnavailable("the provider refused to refresh the grant's tokens") from None
            await server.end_grant(grant_id, "upstream_session_gone")
            raise self._invalid(request, resource) from None
        await self._touch(request, grant_id, record.sub)
        return ref, session

    async def _touch(self, request: web.Request, grant_id: str, sub: str) -> None:
        """Last use for the grants page and the per-user LRU, written at most once a minute per grant."""
        mono = time.monotonic()
        if mono - self._touched.get(grant_id, -_TOUCH_EVERY) < _TOUCH_EVERY:
            return
        if len(self._touched) >= _TOUCH_CACHE:
            self._touched.clear()
        self._touched[grant_id] = mono
        await self._server.store.touch_grant(grant_id, sub, self._server.clock(), view_of(request).client_ip)

    def challenge(self, request: web.Request) -> web.Response | None:
        resource = self._resource_path(request)
        if resource is None:
            return None
        # a preflight the sidecar proxies itself; a front's decision request (/oauth2/auth) is never one
        preflight = None if request.path.startswith(self._auth_path) else cors.resource_preflight(request)
        if preflight is not None:
            return preflight
        metadata = f"{self._server.issuer(request)}/.well-known/oauth-protected-resource{resource}"
        return web.Response(
            status=401,
            text="401 Unauthorized: this API needs an access token\n",
            headers={
                "WWW-Authenticate": f'Bearer resource_metadata="{metadata}", scope="{SCOPES}"',
                "Cache-Control": "no-store",
                **cors.challenge_headers(request),
            },
        )
