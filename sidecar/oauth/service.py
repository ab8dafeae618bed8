"""``OAuthServer``: the authorization server's shared state and the operations every endpoint needs.

One instance per application, at ``app[OAUTH]``, built by ``oauth_ctx`` (a cleanup context that runs after
the browser path's services exist). It holds the grant store, a second ``Sessions`` for the grants'
upstream-token records (longer lifetimes, not reached by back-channel logout by ``sid``) and a second
``Refresher`` on it, so a grant's upstream tokens are refreshed by the same single-flight, cross-replica
machinery as a browser session's.

A grant's session key (``SessionRef.key``) is never stored in the clear: each record that can lead to
it (code, access token, refresh token) holds it wrapped under its own token (``tokens.wrap_key``), and the
grant holds it sealed for the server (``ending``), which revokes the upstream refresh token whenever a
grant ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from .. import logs
from ..config import Config
from ..context import Services, is_auth_request, original_of, view_of
from ..fronts import FRONTS
from ..models import Identity, TokenSet
from ..refresh import Refresher
from ..sessions import Sessions
from . import tokens as tk
from .ending import end_upstream, seal_for_server, sweep_forever
from .model import AuthorizationCode, Client, DeviceAuthorization, Grant, IssuedTokens
from .refresh_reuse import Rotation
from .refresh_reuse import seal as seal_rotation
from .store import GrantStore

CODE_TTL = 120.0  # an authorization code lives this long (RFC 6749 4.1.2 recommends at most 10 minutes)
PENDING_GRANT_TTL = 900.0  # a grant whose code or device approval was never redeemed disappears after this
USER_AGENT_CHARS = 200

log = logging.getLogger("sidecar.oauth")
_unrouted_warned: list[bool] = []  # logged once per process


def grant_config(config: Config) -> Config:
    """The settings the grants' session records live by: the --oauth-refresh-* lifetimes. A provider that
    does not say how long its refresh token lives is assumed to keep it for the grant's idle timeout
    (not the browser's --refresh-token-ttl), so an unused grant's record is not dropped before its time."""
    return config.replace(
        cookie_expire=config.oauth_refresh_max_lifetime,
        session_idle_timeout=config.oauth_refresh_idle_timeout,
        refresh_token_ttl=config.oauth_refresh_idle_timeout,
    )


class OAuthServer:
    """Shared by the endpoints of ``sidecar.oauth``; see the module docstring."""

    def __init__(
        self, config: Config, store: GrantStore, svc: Services, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.store = store
        self.svc = svc
        self.clock = clock
        self.sessions = Sessions(svc.sessions.store, grant_config(config), index_provider_sid=False)
        self.refresher = Refresher(self.sessions, svc.oidc, grant_config(config))

    # --- where ------------------------------------------------------------------------------------------
    def issuer(self, request: web.Request) -> str:
        """``--oauth-issuer`` when set; otherwise the external origin the client used, as the configured front's
        own headers name it (``context.view_of``; the connection's scheme and Host without a trusted front)."""
        if self.config.oauth_issuer:
            return self.config.oauth_issuer.rstrip("/")
        view = view_of(request)
        return f"{view.scheme}://{view.host}"

    def foreign_origin(self, request: web.Request) -> bool:
        """With ``--oauth-issuer``: a trusted front names another host for this request (an app on another
        host behind the same sidecar); the issuer's tokens are for its own host only. The scheme is not
        compared: --oauth-issuer is how a front that cannot know it (TLS ended before it) is corrected."""
        if not self.config.oauth_issuer:
            return False
        view = view_of(request)
        return view.trusted and view.host.lower() != self.config.oauth_issuer.split("://", 1)[1].rstrip("/").lower()

    def unrouted(self, request: web.Request) -> bool:
        """An auth request from a front whose URL names the client's Host (ingress-nginx) without the auth-url
        saying which host it routed by (``?routed_host=$host``, ``fronts``): the audience's host is unproven, no
        token is taken. With it, ``fronts`` refused any disagreement already (400)."""
        front = FRONTS[self.config.front]
        if not front.routed or not is_auth_request(request, self.config) or original_of(request).routed:
            return False
        if not _unrouted_warned:
            _unrouted_warned.append(True)
            log.error(
                "--front %s: the auth-url lacks ?routed_host=$host (its last parameter), so no OAuth token is "
                "taken (see deploy/kubernetes README)",
                front.name,
            )
        return True

    def resource_for(self, request: web.Request, path: str) -> str:
        """The canonical resource URI of a --oauth-resource path, as this request's client sees it."""
        return self.issuer(request) + path

    # --- grants -------------------------------------------------------------------------------------------
    async def start_grant(
        self,
        identity: Identity,
        tokens: TokenSet,
        claims: dict[str, Any],
        client: Client,
        resource: str,
        resource_path: str,
        scope: str,
        client_ip: str,
        user_agent: str,
    ) -> tuple[Grant, bytes]:
        """Keep the upstream tokens in a new session record and make a grant on it; returns the grant and
        the record's key (the caller wraps it into the code or device approval it issues). Grants of the
        user beyond --oauth-grants-per-user are ended, least recently used first."""
        ref, _ = await self.sessions.create(identity, tokens, claims)
        now = self.clock()
        grant = Grant(
            grant_id=tk.new_grant_id(),
            sub=identity.sub,
            user=identity.email or identity.user,
            client_id=client.client_id,
            client_name=client.client_name,
            resource=resource,
            resource_path=resource_path,
            scope=scope,
            session_sid=ref.sid,
            created_at=now,
            last_used_at=now,
            last_used_from=client_ip,
            user_agent=user_agent[:USER_AGENT_CHARS],
            expires_at=now + float(self.config.oauth_refresh_max_lifetime),
        )
        grant = replace(grant, sealed_key=seal_for_server(self.config.cookie_secrets, grant.grant_id, ref.key))
        evicted = await self.store.create_grant(grant, PENDING_GRANT_TTL, int(self.config.oauth_grants_per_user))
        for old in evicted:
            await self.end_grant_session(old, "limit")
        logs.event("oauth_grant_started", {"grant_id": grant.grant_id, "client_id": client.client_id})
        return grant, ref.key

    async def issue_code(
        self, grant: Grant, session_key: bytes, redirect_uri: str, code_challenge: str, nonce: str = ""
    ) -> str:
        """A single-use authorization code for ``grant`` (PKCE S256 challenge kept for the token endpoint)."""
        code = tk.mint(tk.CODE, grant.grant_id)
        record = AuthorizationCode(
            grant_id=grant.grant_id,
            client_id=grant.client_id,
            redirect_uri=redirect_uri,
            code_challenge=code_challenge,
            resource=grant.resource,
            scope=grant.scope,
            wrapped_key=tk.wrap_key(session_key, code),
            expires_at=self.clock() + CODE_TTL,
            nonce=nonce,
        )
        await self.store.put_code(tk.token_hash(code), record, CODE_TTL)
        return code

    async def approve_device(self, device: DeviceAuthorization, grant: Grant, session_key: bytes) -> bool:
        """Mark a pending device authorization approved for ``grant`` (compare-and-set: False when it is no
        longer pending). The session key waits wrapped under a key from the server secret (``_device_key``)."""
        wrapped = tk.seal(self._device_key(device.device_code_hash), session_key)
        approved = replace(device, status="approved", grant_id=grant.grant_id, wrapped_key=wrapped)
        ok = await self.store.update_device(approved, "pending")
        if not ok:
            await self.end_grant(grant.grant_id, "device_not_pending")
        return ok

    def _device_key(self, device_code_hash: str) -> bytes:
        return tk.device_wrapping_key(self.config.cookie_secrets[0], device_code_hash)

    def open_device_key(self, device: DeviceAuthorization) -> bytes | None:
        """The session key of an approved device authorization (any configured cookie secret opens it)."""
        for secret in self.config.cookie_secrets:
            key = tk.unseal(tk.device_wrapping_key(secret, device.device_code_hash), device.wrapped_key)
            if key is not None:
                return key
        return None

    async def end_grant(self, grant_id: str, reason: str) -> bool:
        """End a grant: its token and code records, its index entry and its upstream-token record."""
        grant = await self.store.end_grant(grant_id)
        if grant is None:
            return False
        await self.end_grant_session(grant, reason)
        return True

    async def end_user_grants(self, sub: str, reason: str) -> int:
        ended = await self.store.end_user_grants(sub)
        for grant in ended:
            await self.end_grant_session(grant, reason)
        return len(ended)

    async def end_grant_session(self, grant: Grant, reason: str) -> None:
        """After the store ended ``grant`` (here, or by itself on a replayed refresh token): revoke its upstream
        refresh token and delete the record holding it, then log the end and what happened upstream."""
        revoked = await end_upstream(self.sessions, self.svc.oidc, self.config.cookie_secrets, grant)
        fields = {"grant_id": grant.grant_id, "client_id": grant.client_id, "reason": reason}
        logs.event("oauth_grant_ended", {**fields, "upstream_refresh_token": revoked})

    async def end_abandoned_grants(self, now: float | None = None) -> int:
        """End the grants whose code or device approval was not redeemed in time (``PENDING_GRANT_TTL``),
        upstream tokens included; each is ended by one replica. Returns how many this call ended."""
        ended = 0
        for grant_id in await self.store.take_abandoned(self.clock() if now is None else now):
            grant = await self.store.end_unredeemed(grant_id)
            if grant is not None:
                await self.end_grant_session(grant, "abandoned")
                ended += 1
        return ended

    # --- tokens -----------------------------------------------------------------------------------------
    async def issue_tokens(
        self,
        grant: Grant,
        session_key: bytes,
        used_refresh: str | None,
        client_ip: str,
        user_agent: str,
        asked_scope: str = "",
    ) -> IssuedTokens | str:
        """Mint an access and a refresh token for ``grant`` and store them (a rotation of ``used_refresh``
        when given, its answer kept for a retry: ``refresh_reuse.py``). Returns the tokens, or the store's
        "replayed"/"unknown"/"again"."""
        now = self.clock()
        access = tk.mint(tk.ACCESS, grant.grant_id)
        refresh = tk.mint(tk.REFRESH, grant.grant_id)
        access_ttl = max(1.0, min(float(self.config.oauth_access_token_ttl), grant.expires_at - now))
        refresh_ttl = min(float(self.config.oauth_refresh_idle_timeout), grant.expires_at - now)
        if refresh_ttl <= 0:
            return "unknown"

        def record(token: str, ttl: float) -> bytes:
            return tk.TokenRecord(
                wrapped_key=tk.wrap_key(session_key, token),
                session_sid=grant.session_sid,
                resource=grant.resource,
                resource_path=grant.resource_path,
                client_id=grant.client_id,
                sub=grant.sub,
                scope=grant.scope,
                expires_at=now + ttl,
            ).to_bytes()

        issued = IssuedTokens(
            access_token=access,
            refresh_token=refresh,
            expires_in=int(access_ttl),
            scope=grant.scope,
            resource=grant.resource,
        )
        # the kept answer lives no longer than its tokens (the refresh token's ttl is bounded by the grant's end)
        window = float(self.config.oauth_refresh_reuse_seconds) if used_refresh is not None else 0.0
        window = min(window, access_ttl, refresh_ttl)
        answer = b""
        if window > 0 and used_refresh is not None:
            scope = asked_scope or grant.scope
            rotation = Rotation(grant.client_id, grant.resource, scope, session_key, issued, issued_at=now)
            answer = seal_rotation(rotation, used_refresh)
        outcome = await self.store.issue_tokens(
            grant.grant_id,
            tk.token_hash(access),
            record(access, access_ttl),
            access_ttl,
            tk.token_hash(refresh),
            record(refresh, refresh_ttl),
            refresh_ttl,
            None if used_refresh is None else tk.token_hash(used_refresh),
            now,
            client_ip,
            user_agent[:USER_AGENT_CHARS],
            answer,
            window,
        )
        return issued if outcome == "ok" else outcome


OAUTH = web.AppKey("oauth", OAuthServer)


async def oauth_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context (appended by ``sidecar.oauth.install`` after the services context): builds the
    ``OAuthServer`` on the session store's connection (``install`` then plugs the resource guard in)."""
    from ..context import SERVICES
    from .store import grant_store_for

    svc = app[SERVICES]
    server = OAuthServer(svc.config, grant_store_for(svc.sessions.store), svc)
    app[OAUTH] = server
    sweeper = asyncio.ensure_future(sweep_forever(server.end_abandoned_grants))
    yield
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper
