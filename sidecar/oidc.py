"""Client for the upstream OpenID Connect provider.

Discovery, PKCE (RFC 7636), the code exchange and refresh grants (RFC 6749),
revocation (RFC 7009), and ID-token validation (OIDC Core 3.1.3.7) against the
provider's JWKS, refetched when an unknown ``kid`` shows up. Every network or
protocol failure leaves here as one of the ``ProviderError`` classes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import jwt
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from . import metrics
from .errors import InvalidGrant, ProviderError, ProviderUnavailable, TokenValidationError
from .models import TokenSet

log = logging.getLogger("sidecar.oidc")

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
_ALLOWED_ALGS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
_LEEWAY = 60.0
_JWKS_MIN_REFETCH = 1.0  # an unknown kid may refetch the JWKS at most this often


@dataclass(frozen=True)
class Pkce:
    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(48)
        return cls(verifier=verifier, challenge=create_s256_code_challenge(verifier))


@dataclass(frozen=True)
class Metadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    revocation_endpoint: str | None
    end_session_endpoint: str | None
    id_token_algs: frozenset[str]


def _jwt_exp(token: str) -> float | None:
    """The ``exp`` of an access token that happens to be a JWT (read, not trusted, for timing only)."""
    if token.count(".") != 2:
        return None
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, (int, float)) else None


def token_set_from_response(body: dict[str, Any], now: float) -> TokenSet:
    """Read a token response. A missing ``expires_in`` stays unknown unless the token is a JWT."""
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise ProviderUnavailable("token response without access_token")
    expires_in = body.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)
    access_expires = (
        now + float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else _jwt_exp(access)
    )
    refresh_in = body.get("refresh_expires_in")
    refresh_expires = now + float(refresh_in) if isinstance(refresh_in, (int, float)) and refresh_in > 0 else None
    refresh = body.get("refresh_token")
    id_token = body.get("id_token")
    return TokenSet(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        id_token=id_token if isinstance(id_token, str) and id_token else None,
        access_expires_at=access_expires,
        refresh_expires_at=refresh_expires,
        issued_at=now,
    )


class OidcClient:
    """Talks to one provider; one instance per application, sharing one HTTP session."""

    def __init__(self, config: Any, http: aiohttp.ClientSession) -> None:
        self._config = config
        self._http = http
        self._metadata: Metadata | None = None
        self._keys: dict[str, Any] = {}
        self._keys_fetched = 0.0
        self._lock = asyncio.Lock()
        self._timeout = aiohttp.ClientTimeout(total=config.provider_timeout)
        self.audiences = {config.client_id, *config.oidc_extra_audience}

    async def metadata(self) -> Metadata:
        if self._metadata is None:
            async with self._lock:
                if self._metadata is None:
                    self._metadata = await self._discover()
        return self._metadata

    async def _discover(self) -> Metadata:
        url = self._config.oidc_issuer_url.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self._get_json(url)
        issuer = doc.get("issuer")
        if issuer != self._config.oidc_issuer_url and issuer != self._config.oidc_issuer_url.rstrip("/"):
            raise ProviderError(f"discovery issuer {issuer!r} does not match --oidc-issuer-url")
        try:
            return Metadata(
                issuer=issuer,
                authorization_endpoint=doc["authorization_endpoint"],
                token_endpoint=doc["token_endpoint"],
                jwks_uri=doc["jwks_uri"],
                revocation_endpoint=doc.get("revocation_endpoint"),
                end_session_endpoint=doc.get("end_session_endpoint"),
                id_token_algs=frozenset(doc.get("id_token_signing_alg_values_supported", ["RS256"])) & _ALLOWED_ALGS,
            )
        except KeyError as exc:
            raise ProviderError(f"discovery document lacks {exc.args[0]}") from None

    async def _get_json(self, url: str) -> dict[str, Any]:
        started = time.monotonic()
        try:
            async with self._http.get(url, timeout=self._timeout) as resp:
                if resp.status >= 400:
                    raise ProviderUnavailable(f"{url} answered {resp.status}")
                data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as exc:
            raise ProviderUnavailable(f"cannot fetch {url}: {type(exc).__name__}") from exc
        finally:
            metrics.PROVIDER_SECONDS.labels(call="metadata").observe(time.monotonic() - started)
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"{url} did not return a JSON object")
        return data

    async def authorize_url(self, state: str, nonce: str, pkce: Pkce) -> str:
        meta = await self.metadata()
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self._config.client_id,
                "redirect_uri": self._config.redirect_url,
                "scope": self._config.scope,
                "state": state,
                "nonce": nonce,
                "code_challenge": pkce.challenge,
                "code_challenge_method": "S256",
            }
        )
        sep = "&" if "?" in meta.authorization_endpoint else "?"
        return f"{meta.authorization_endpoint}{sep}{query}"

    async def exchange_code(self, code: str, verifier: str) -> TokenSet:
        body = await self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self._config.redirect_url,
                "code_verifier": verifier,
            },
            retry=False,  # a code is single-use: never send it twice
        )
        return token_set_from_response(body, time.time())

    async def refresh(self, refresh_token: str) -> TokenSet:
        body = await self._token_request({"grant_type": "refresh_token", "refresh_token": refresh_token}, retry=True)
        return token_set_from_response(body, time.time())

    def _client_auth(self) -> tuple[dict[str, str], dict[str, str]]:
        """(headers, form fields) authenticating this client: client_secret_basic, or a public client."""
        if self._config.client_secret:
            # RFC 6749 2.3.1: form-urlencode id and secret before Basic encoding.
            pair = f"{quote(self._config.client_id, safe='')}:{quote(self._config.client_secret, safe='')}"
            return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}, {}
        return {}, {"client_id": self._config.client_id}

    async def _token_request(self, form: dict[str, str], *, retry: bool) -> dict[str, Any]:
        """POST to the token endpoint. Retries only failures where the provider did not process the
        grant (connection refused, 5xx, 429), never a read timeout: with rotating refresh tokens a
        second presentation after an unseen success would look like token theft."""
        meta = await self.metadata()
        auth, extra = self._client_auth()
        attempts = 1 + (self._config.provider_retries if retry else 0)
        for attempt in range(attempts):
            try:
                return await self._post_token(meta.token_endpoint, {**form, **extra}, auth)
            except _Retryable as exc:
                if attempt + 1 >= attempts:
                    raise ProviderUnavailable(str(exc)) from exc
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")

    async def _post_token(self, url: str, form: dict[str, str], auth: dict[str, str]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            async with self._http.post(
                url, data=form, timeout=self._timeout, headers={"Accept": "application/json", **auth}
            ) as resp:
                status = resp.status
                text = await resp.text()
        except aiohttp.ClientConnectorError as exc:
            raise _Retryable(f"token endpoint unreachable: {type(exc).__name__}") from exc
        except TimeoutError as exc:
            raise ProviderUnavailable("token endpoint timed out") from exc
        except aiohttp.ClientError as exc:
            raise ProviderUnavailable(f"token endpoint failed: {type(exc).__name__}") from exc
        finally:
            metrics.PROVIDER_SECONDS.labels(call="token").observe(time.monotonic() - started)
        if status >= 500 or status == 429:
            raise _Retryable(f"token endpoint answered {status}")
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            raise ProviderUnavailable(f"token endpoint answered {status} without JSON") from None
        if not isinstance(body, dict):
            raise ProviderUnavailable("token endpoint answered a non-object")
        if status >= 400 or "error" in body:
            code = str(body.get("error", "unknown"))
            if code == "invalid_grant":
                # The grant is dead (expired, revoked, reused); retrying cannot help. Client-level
                # errors (invalid_client) are a configuration problem and never end sessions.
                raise InvalidGrant(f"provider refused the grant: {code}", error_code=code)
            raise ProviderUnavailable(f"token endpoint error: {code}", error_code=code)
        return body

    async def revoke(self, token: str, hint: str = "refresh_token") -> bool:
        """RFC 7009 revocation, best effort. Returns False when unsupported or failed."""
        meta = await self.metadata()
        if not meta.revocation_endpoint:
            return False
        auth, extra = self._client_auth()
        try:
            async with self._http.post(
                meta.revocation_endpoint,
                data={"token": token, "token_type_hint": hint, **extra},
                headers=auth,
                timeout=self._timeout,
            ) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            log.warning("token revocation failed")
            return False

    async def end_session_url(self, id_token: str | None, post_logout_redirect: str) -> str | None:
        meta = await self.metadata()
        if not meta.end_session_endpoint:
            return None
        params = {"post_logout_redirect_uri": post_logout_redirect, "client_id": self._config.client_id}
        if id_token:
            params["id_token_hint"] = id_token
        sep = "&" if "?" in meta.end_session_endpoint else "?"
        return f"{meta.end_session_endpoint}{sep}{urlencode(params)}"

    async def _signing_key(self, kid: str | None, alg: str) -> Any:
        key = self._keys.get(kid or "")
        if key is None and (time.monotonic() - self._keys_fetched > _JWKS_MIN_REFETCH or not self._keys):
            await self._load_jwks()
            key = self._keys.get(kid or "")
        if key is None and kid is None and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        if key is None:
            raise TokenValidationError("ID token signed with an unknown key")
        return key

    async def _load_jwks(self) -> None:
        meta = await self.metadata()
        doc = await self._get_json(meta.jwks_uri)
        keys: dict[str, Any] = {}
        for entry in doc.get("keys", []):
            if entry.get("use", "sig") != "sig":
                continue
            try:
                keys[entry.get("kid", "")] = jwt.PyJWK(entry).key
            except (jwt.PyJWTError, ValueError, TypeError):
                continue  # a key type we cannot use is not fatal while others work
        self._keys, self._keys_fetched = keys, time.monotonic()

    async def _verify(self, token: str, what: str, require: list[str]) -> dict[str, Any]:
        """Signature (provider JWKS, allowed algorithms only), iss, aud and the required claims."""
        meta = await self.metadata()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenValidationError(f"{what} is not a JWT") from exc
        alg = header.get("alg")
        if alg not in meta.id_token_algs:
            raise TokenValidationError(f"{what} algorithm {alg!r} not allowed")
        key = await self._signing_key(header.get("kid"), alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(self.audiences),
                issuer=meta.issuer,
                leeway=_LEEWAY,
                options={"require": require},
            )
        except jwt.PyJWTError as exc:
            raise TokenValidationError(f"{what} rejected: {type(exc).__name__}") from exc
        if float(claims["iat"]) > time.time() + _LEEWAY:
            raise TokenValidationError(f"{what} issued in the future")
        return claims

    async def validate_id_token(self, id_token: str, nonce: str | None) -> dict[str, Any]:
        """Full OIDC Core 3.1.3.7 checks; ``nonce`` None skips the nonce (refresh responses)."""
        claims = await self._verify(id_token, "ID token", ["iss", "sub", "aud", "exp", "iat"])
        aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        azp = claims.get("azp")
        if (len(aud) > 1 or azp is not None) and azp != self._config.client_id:
            raise TokenValidationError("ID token azp is not this client")
        if nonce is not None and not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise TokenValidationError("ID token nonce does not match")
        return claims

    async def validate_logout_token(self, token: str) -> dict[str, Any]:
        """OIDC Back-Channel Logout 1.0, section 2.6: a signed event naming a sub and/or a sid."""
        claims = await self._verify(token, "logout token", ["iss", "aud", "iat", "jti", "events"])
        events = claims.get("events")
        if not isinstance(events, dict) or BACKCHANNEL_EVENT not in events:
            raise TokenValidationError("logout token lacks the back-channel logout event")
        if "nonce" in claims:
            raise TokenValidationError("logout token must not carry a nonce")
        if not isinstance(claims.get("sub"), str) and not isinstance(claims.get("sid"), str):
            raise TokenValidationError("logout token names neither sub nor sid")
        return claims


class _Retryable(Exception):
    """Internal: a token-endpoint failure that is safe to retry."""
