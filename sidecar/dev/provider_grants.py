"""Grant logic of the development OIDC provider (NOT for production).

A mixin so ``provider.py`` stays readable: codes with PKCE, refresh tokens with
optional rotation and reuse detection, revocation and access-token checks. The
state it works on is declared here and created by ``DevProvider.__init__``.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
import jwt

from .provider_model import (
    AuthCode,
    ClientReg,
    DevUser,
    KeyRing,
    OAuthError,
    RefreshFamily,
    RefreshRecord,
    at_hash,
    random_token,
    sha256_hex,
    verifier_ok,
)


class TokenGrants:
    """Codes, token issuing, refresh, revocation; mixed into ``DevProvider``."""

    issuer: str
    clients: dict[str, ClientReg]
    users: dict[str, DevUser]
    keys: KeyRing
    access_token_ttl: int
    refresh_token_ttl: int
    id_token_ttl: int
    code_ttl: int
    send_expires_in: bool
    send_refresh_expires_in: bool
    send_id_token_on_refresh: bool
    send_sid: bool
    send_auth_time: bool
    at_hash: str
    token_overrides: dict[str, Any]
    rotate_refresh_tokens: bool
    logout_token_exp: bool
    unknown_refresh_error: str
    reuse_detection: bool
    return_same_refresh_token: bool
    refresh_tokens: str  # "always" or "google" (provider.REFRESH_TOKEN_POLICIES)
    issuer_trailing_slash: bool
    reuse_detected: int
    revocations: int
    codes_issued: int
    _codes: dict[str, AuthCode]
    _families: dict[str, RefreshFamily]
    _refresh: dict[str, RefreshRecord]  # sha256(token) -> record
    _access: dict[str, tuple[str | None, float]]  # jti -> (family id, exp)
    _revoked_jtis: set[str]

    @property
    def issuer_id(self) -> str:
        """The issuer identifier in discovery, tokens and ``iss`` parameters (``issuer_trailing_slash``: with a "/")."""
        return self.issuer + "/" if self.issuer_trailing_slash else self.issuer

    def authenticate_client(self, client_id: str | None, secret: str | None) -> ClientReg:
        """RFC 6749 section 2.3 client authentication."""
        if not client_id:
            raise OAuthError("invalid_client", "client authentication required")
        reg = self.clients.get(client_id)
        if reg is None:
            raise OAuthError("invalid_client", "unknown client")
        if reg.client_secret is not None and (
            secret is None or not secrets.compare_digest(secret.encode(), reg.client_secret.encode())
        ):
            raise OAuthError("invalid_client", "bad client credentials")
        return reg

    def issue_code(
        self,
        client_id: str,
        redirect_uri: str,
        code_challenge: str,
        nonce: str | None,
        username: str,
        scope: str,
        auth_time: int | None = None,
        offline: bool = True,
        acr: str | None = None,
    ) -> str:
        """A single-use code bound to everything the token request must match. ``auth_time``: when the user
        logged in (a remembered login's time), else now. ``offline``: its exchange issues a refresh token."""
        now = time.time()
        self._codes = {c: a for c, a in self._codes.items() if a.expires_at + 600 > now}
        code = random_token()
        self._codes[code] = AuthCode(
            client_id,
            redirect_uri,
            code_challenge,
            nonce,
            username,
            scope,
            now + self.code_ttl,
            int(now) if auth_time is None else auth_time,
            offline=offline,
            acr=acr,
        )
        self.codes_issued += 1
        return code

    def exchange_code(self, client: ClientReg, form: Mapping[str, str]) -> dict[str, Any]:
        """``grant_type=authorization_code`` with mandatory PKCE."""
        code = form.get("code")
        if not code:
            raise OAuthError("invalid_request", "missing code")
        grant = self._codes.get(code)
        if grant is None or grant.client_id != client.client_id:
            raise OAuthError("invalid_grant", "unknown authorization code")
        if grant.used:
            # RFC 6749 4.1.2: a replayed code should kill what it produced.
            if grant.family_id is not None:
                self._families[grant.family_id].revoked = True
            raise OAuthError("invalid_grant", "authorization code already used")
        grant.used = True
        if grant.expires_at <= time.time():
            raise OAuthError("invalid_grant", "authorization code expired")
        if form.get("redirect_uri") != grant.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorization")
        if not verifier_ok(form.get("code_verifier"), grant.code_challenge):
            raise OAuthError("invalid_grant", "PKCE verification failed")
        user = self.users.get(grant.username)
        if user is None:
            raise OAuthError("invalid_grant", "user no longer exists")
        fam = RefreshFamily(
            random_token(12), grant.username, client.client_id, grant.scope, grant.auth_time, acr=grant.acr
        )
        self._families[fam.family_id] = fam
        grant.family_id = fam.family_id
        token, expires_at = self._new_refresh_token(fam) if grant.offline else (None, time.time())
        return self._token_response(
            fam,
            user,
            grant.scope,
            nonce=grant.nonce,
            with_id_token=True,
            refresh_token=token,
            refresh_expires_at=expires_at,
        )

    async def refresh(self, client: ClientReg, form: Mapping[str, str]) -> dict[str, Any]:
        """``grant_type=refresh_token``, serialized per family so counters stay exact."""
        token = form.get("refresh_token")
        if not token:
            raise OAuthError("invalid_request", "missing refresh_token")
        record = self._refresh.get(sha256_hex(token))
        if record is None:
            raise OAuthError(self.unknown_refresh_error, "unknown refresh token")
        fam = self._families[record.family_id]
        async with fam.lock:
            return self._refresh_locked(client, form, token, record, fam)

    def _refresh_locked(
        self,
        client: ClientReg,
        form: Mapping[str, str],
        token: str,
        record: RefreshRecord,
        fam: RefreshFamily,
    ) -> dict[str, Any]:
        if fam.client_id != client.client_id:
            raise OAuthError("invalid_grant", "refresh token was issued to another client")
        if fam.revoked:
            raise OAuthError("invalid_grant", "refresh token revoked")
        if record.rotated:
            if self.reuse_detection:
                fam.revoked = True
                self.reuse_detected += 1
                raise OAuthError("invalid_grant", "refresh token reuse detected; family revoked")
            raise OAuthError("invalid_grant", "refresh token already rotated")
        now = time.time()
        if record.expires_at <= now:
            raise OAuthError("invalid_grant", "refresh token expired")
        scope = fam.scope
        if form.get("scope"):
            requested = form["scope"].split()
            if not set(requested) <= set(fam.scope.split()):
                raise OAuthError("invalid_scope", "scope exceeds the original grant")
            scope = " ".join(requested)
        user = self.users.get(fam.username)
        if user is None:
            raise OAuthError("invalid_grant", "user no longer exists")
        new_token: str | None
        if self.rotate_refresh_tokens:
            record.rotated = True
            new_token, expires_at = self._new_refresh_token(fam)
        else:
            new_token = token if self.return_same_refresh_token else None
            expires_at = record.expires_at
        return self._token_response(
            fam,
            user,
            scope,
            nonce=None,
            with_id_token=self.send_id_token_on_refresh,
            refresh_token=new_token,
            refresh_expires_at=expires_at,
        )

    def _new_refresh_token(self, fam: RefreshFamily) -> tuple[str, float]:
        token = random_token()
        expires_at = time.time() + self.refresh_token_ttl
        self._refresh[sha256_hex(token)] = RefreshRecord(fam.family_id, expires_at)
        return token, expires_at

    def _token_response(
        self,
        fam: RefreshFamily,
        user: DevUser,
        scope: str,
        *,
        nonce: str | None,
        with_id_token: bool,
        refresh_token: str | None,
        refresh_expires_at: float,
    ) -> dict[str, Any]:
        now = int(time.time())
        self._access = {j: v for j, v in self._access.items() if v[1] > now - 60}
        jti = random_token(16)
        exp = now + self.access_token_ttl
        access = self.keys.sign(
            {
                "iss": self.issuer_id,
                "sub": user.sub,
                "aud": fam.client_id,
                "exp": exp,
                "iat": now,
                "jti": jti,
                "scope": scope,
                "client_id": fam.client_id,
            }
        )
        self._access[jti] = (fam.family_id, exp)
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer"}
        if self.send_expires_in:
            body["expires_in"] = self.access_token_ttl
        if refresh_token is not None:
            body["refresh_token"] = refresh_token
        if self.send_refresh_expires_in and self.refresh_tokens != "google":
            body["refresh_expires_in"] = max(0, int(refresh_expires_at - time.time()))
        if with_id_token:
            claims: dict[str, Any] = {
                "iss": self.issuer_id,
                "aud": fam.client_id,
                "azp": fam.client_id,
                "exp": now + self.id_token_ttl,
                "iat": now,
                **user.claims(),
            }
            if self.send_auth_time:
                claims["auth_time"] = fam.auth_time
            if fam.acr is not None:
                claims["acr"] = fam.acr
            if nonce is not None:
                claims["nonce"] = nonce
            if self.send_sid:
                claims["sid"] = fam.family_id
            if self.at_hash != "none":
                claims["at_hash"] = at_hash(access if self.at_hash == "good" else access + "x", self.keys.current.alg)
            body["id_token"] = self.keys.sign(claims)
        body["scope"] = scope
        for name, value in self.token_overrides.items():  # misbehaviour on request: odd or missing fields
            if value is None:
                body.pop(name, None)
            else:
                body[name] = value
        return body

    def forget_refresh_tokens(self, username: str | None = None) -> int:
        """Lose every refresh token (of ``username``): a provider whose token store was wiped or that
        expired them early. Later presentations are answered ``unknown_refresh_error``. Returns how many."""
        gone = [h for h, r in self._refresh.items() if username in (None, self._families[r.family_id].username)]
        for token_hash in gone:
            del self._refresh[token_hash]
        return len(gone)

    def live_refresh_tokens(self) -> dict[str, int]:
        """Per user, the refresh tokens the provider would still honour: what a revocation must bring down."""
        now, live = time.time(), dict[str, int]()
        for record in self._refresh.values():
            fam = self._families[record.family_id]
            if not fam.revoked and not record.rotated and record.expires_at > now:
                live[fam.username] = live.get(fam.username, 0) + 1
        return live

    # ------------------------------------------------------ back-channel logout

    def logout_token(self, username: str, sid: str | None = None, audience: str = "sidecar-dev") -> str:
        """A signed OIDC Back-Channel Logout token for ``username`` (and one provider session ``sid``); without
        ``exp`` when ``logout_token_exp`` is off, as providers wrote them before the 2023 errata."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer_id,
            "aud": audience,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "sub": self.users[username].sub,
            "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
        }
        if self.logout_token_exp:
            claims["exp"] = now + 120
        if sid is not None:
            claims["sid"] = sid
        return self.keys.sign(claims)

    async def send_backchannel_logout(self, uri: str, username: str, sid: str | None = None) -> int:
        """POST a logout token to a relying party's back-channel logout URI, as a provider does; its status."""
        form = {"logout_token": self.logout_token(username, sid)}
        async with aiohttp.ClientSession() as http, http.post(uri, data=form) as resp:
            await resp.read()
            return resp.status

    # ------------------------------------------------- revocation, userinfo

    def revoke(self, client: ClientReg, token: str) -> None:
        """RFC 7009: kill a refresh token's family or one access token; unknown is fine."""
        record = self._refresh.get(sha256_hex(token))
        if record is not None:
            fam = self._families[record.family_id]
            if fam.client_id != client.client_id:
                raise OAuthError("unauthorized_client", "token was issued to another client")
            fam.revoked = True
        else:
            try:
                claims = self.keys.verify(token, self.issuer_id, verify_exp=False)
            except jwt.InvalidTokenError:
                claims = {}
            if claims.get("jti") in self._access:
                if claims.get("client_id") != client.client_id:
                    raise OAuthError("unauthorized_client", "token was issued to another client")
                self._revoked_jtis.add(claims["jti"])
        self.revocations += 1

    def check_access_token(self, token: str) -> DevUser:
        """The user behind one of our live access tokens, else ``invalid_token``."""
        try:
            claims = self.keys.verify(token, self.issuer_id)
        except jwt.InvalidTokenError as exc:
            raise OAuthError("invalid_token", f"token rejected: {exc}") from exc
        jti = claims.get("jti")
        entry = self._access.get(jti) if isinstance(jti, str) else None
        if entry is None or jti in self._revoked_jtis:
            raise OAuthError("invalid_token", "token unknown or revoked")
        fam = self._families.get(entry[0]) if entry[0] else None
        if fam is not None and fam.revoked:
            raise OAuthError("invalid_token", "grant revoked")
        user = next((u for u in self.users.values() if u.sub == claims["sub"]), None)
        if user is None:
            raise OAuthError("invalid_token", "user no longer exists")
        return user
