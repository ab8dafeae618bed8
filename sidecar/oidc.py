"""Client for the upstream OpenID Connect provider.

Discovery, PKCE (RFC 7636), the code exchange and refresh grants (RFC 6749),
revocation (RFC 7009), and ID-token validation (OIDC Core 3.1.3.7) against the
provider's JWKS. Every network or protocol failure leaves here as one of the
``ProviderError`` classes, chosen on purpose:

- no answer in time: ``ProviderTimeout``; no answer, 5xx, 429, an error code that says the provider
  is in trouble (``server_error``, ``temporarily_unavailable``): ``ProviderUnavailable``
  (retried only where the provider cannot have processed the grant);
- an answer that breaks the protocol (token response not a JSON object, no access
  token, a token type other than Bearer): ``ProviderProtocolError``;
- a token-endpoint refusal (RFC 6749 5.2): ``InvalidGrant`` for ``invalid_grant``, else
  ``ProviderRefused`` marked permanent or misconfigured by its error code, never by
  its message text.

Anyone can make us validate a token (``/oauth2/backchannel_logout`` is public), so
the provider is protected from us: discovery and JWKS fetches are single-flight
(``flight.Flight``: every concurrent caller shares one request), a failed fetch is not repeated for
``FIRST_FAILURE_BACKOFF`` seconds, doubling with each failure in a row up to ``FAILURE_BACKOFF``
(a provider that starts a moment after us, as in one pod or compose file, is used within a
second), and an unknown ``kid`` refetches the JWKS at most once
per ``JWKS_MIN_REFETCH`` seconds, counted from the start of the last attempt. A
token whose key we cannot look up right now is "provider unavailable", never
"invalid": only a key set fetched for this very token and still lacking its
``kid`` makes it invalid. Token responses are read by ``token_response``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import jwt
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from . import metrics
from .config import Config
from .errors import (
    InvalidGrant,
    ProviderError,
    ProviderProtocolError,
    ProviderRefused,
    ProviderTimeout,
    ProviderUnavailable,
    TokenValidationError,
)
from .flight import Flight
from .models import TokenSet
from .token_response import json_object, number, retry_after_seconds, token_set_from_response

log = logging.getLogger("sidecar.oidc")


BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
_ALLOWED_ALGS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
_LEEWAY = 60.0
_LOGOUT_TYPES = ("logout+jwt", "jwt")  # accepted ``typ`` headers of a logout token (any case, optional application/)
JWKS_MIN_REFETCH = 10.0  # an unknown kid refetches the JWKS at most this often (from the start of the last try)
FIRST_FAILURE_BACKOFF = 1.0  # a failed discovery or JWKS fetch is not tried again for this long,
FAILURE_BACKOFF = 5.0  # doubling with each failure in a row up to this
LOGOUT_TOKEN_MAX_AGE = 300.0  # a logout token issued longer ago (plus the leeway) is refused
# What a revocation did (``OidcClient.revoke``), as the sign-out and grant-end log lines say it.
REVOKED = "revoked"
NOT_REVOKED_NO_ENDPOINT = (
    "not revoked: the provider names no revocation endpoint; it stays valid there until it expires"
)
NOT_REVOKED_FAILED = "not revoked: the revocation request failed"
_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # what of a provider's error code we repeat in logs

# RFC 6749 5.2 codes that mean the grant itself cannot be refreshed again: the record goes.
_PERMANENT_REFUSALS = frozenset({"invalid_scope"})
# Codes a provider sends for its own passing trouble (RFC 6749 4.1.2.1; some token endpoints answer them with
# a 400): the provider is unavailable, like a 5xx, and nobody's session is judged by them.
_TRANSIENT_REFUSALS = frozenset({"server_error", "temporarily_unavailable"})
# Codes that point at this client's registration or credentials: an operator must act.
_MISCONFIGURED_REFUSALS = {
    "invalid_client": "the provider does not accept this client: check the client id/secret "
    "(--client-id, --client-secret) and the client authentication method",
    "unauthorized_client": "this client is not allowed this grant type: check the client's registration "
    "at the provider (authorization code and refresh token grants)",
    "unsupported_grant_type": "the provider does not support this grant type for this client: "
    "check the client's registration at the provider",
}
_BARE_401 = (
    "the token endpoint answered 401 without an error code: check the client id/secret (--client-id, --client-secret)"
)


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
    scopes_supported: frozenset[str] = frozenset()  # discovery's list ("offline_access" for CLI/MCP grants)
    secret_in_form: bool = False  # the token endpoint takes client_secret_post, not client_secret_basic
    revocation_secret_in_form: bool = False  # the same for the revocation endpoint
    iss_in_responses: bool = False  # RFC 9207: the provider says every authorization response names it


def token_hash(token: str, alg: str) -> str | None:
    """``at_hash`` (OIDC Core 3.1.3.6): the left half of the token's hash under the ID token's alg's hash
    function, base64url without padding. None for an algorithm whose hash we do not know (EdDSA means
    Ed25519 here, hence SHA-512)."""
    if alg == "EdDSA":
        digest = hashlib.sha512(token.encode()).digest()
    elif alg[:2] in ("RS", "PS", "ES") and alg[2:] in ("256", "384", "512"):
        digest = hashlib.new("sha" + alg[2:], token.encode()).digest()
    else:
        return None
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode()


def check_at_hash(id_token: str, access_token: str) -> None:
    """When the ID token carries ``at_hash``, it must name this access token. Read before the signature
    check, which the caller does next (``validate_id_token``): a forged ``at_hash`` fails there."""
    try:
        alg = jwt.get_unverified_header(id_token).get("alg")
        claims = jwt.decode(id_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return  # not a JWT: validate_id_token refuses it
    if "at_hash" not in claims:
        return
    expected = token_hash(access_token, alg) if isinstance(alg, str) else None
    at_hash = claims["at_hash"]
    if expected is None or not isinstance(at_hash, str) or not secrets.compare_digest(at_hash, expected):
        raise TokenValidationError("ID token at_hash does not match the access token")


def logout_token_replay_ttl(claims: dict[str, Any], now: float) -> float:
    """How long a logout token's ``jti`` must be remembered: as long as the token could still be accepted
    (its ``iat`` plus the allowed age, sooner when its ``exp`` says so), plus the leeway."""
    last = float(claims["iat"]) + LOGOUT_TOKEN_MAX_AGE
    if "exp" in claims:
        last = min(float(claims["exp"]), last)
    last += _LEEWAY
    return max(1.0, last - now + _LEEWAY)


def _refusal(status: int, body: dict[str, Any] | None) -> ProviderError:
    """Classify a token-endpoint error answer (RFC 6749 5.2) by its error code, never by message text."""
    raw = body.get("error") if body is not None else None
    code = raw if isinstance(raw, str) and _ERROR_CODE.match(raw) else None
    if code == "invalid_grant":
        # The grant is dead (expired, revoked, reused); retrying cannot help.
        return InvalidGrant("provider refused the grant: invalid_grant", error_code=code)
    if code in _TRANSIENT_REFUSALS:
        return ProviderUnavailable(f"token endpoint is unavailable: {code}")
    what = code or f"HTTP {status} without an error code"
    cause = _MISCONFIGURED_REFUSALS.get(code or "") or (_BARE_401 if code is None and status == 401 else None)
    if cause is not None:
        log.error("token endpoint refused this client", extra={"fields": {"error": what, "cause": cause}})
    return ProviderRefused(
        f"token endpoint refused the request: {what}",
        error_code=code,
        permanent=code in _PERMANENT_REFUSALS,
        misconfigured=cause is not None,
    )


class OidcClient:
    """Talks to one provider; one instance per application, sharing one HTTP session."""

    def __init__(self, config: Config, http: aiohttp.ClientSession) -> None:
        self._config = config
        self._http = http
        self._metadata: Metadata | None = None
        self._keys: dict[str, Any] = {}
        self._discovery: Flight[Metadata] = Flight(FIRST_FAILURE_BACKOFF, FAILURE_BACKOFF)
        self._jwks: Flight[dict[str, Any]] = Flight(FIRST_FAILURE_BACKOFF, FAILURE_BACKOFF)
        self.jwks_min_refetch = JWKS_MIN_REFETCH
        self._timeout = aiohttp.ClientTimeout(total=config.provider_timeout)
        self._token_closed_until = 0.0  # monotonic; the token endpoint asked (Retry-After) not to be called before
        self.audiences = {config.client_id, *config.oidc_extra_audience}

    async def metadata(self) -> Metadata:
        """The discovery document, fetched once; concurrent first callers share one fetch."""
        if self._metadata is None:
            self._metadata = await self._discovery.run(self._discover)
        return self._metadata

    async def _discover(self) -> Metadata:
        url = self._config.oidc_issuer_url.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self._get_json(url)
        issuer, configured = doc.get("issuer"), self._config.oidc_issuer_url
        # OIDC Discovery 4.3 wants them identical; one trailing "/" apart they name the same discovery document (its
        # URL drops it), so a "/" left out or added (Auth0's issuer ends in one) is no other provider. Every token's
        # iss is then compared exactly with the document's issuer.
        if not isinstance(issuer, str) or configured not in (issuer, issuer + "/", issuer.removesuffix("/")):
            raise ProviderError(f"discovery issuer {str(issuer)[:200]!r} does not match --oidc-issuer-url")
        try:
            algs = doc.get("id_token_signing_alg_values_supported", ["RS256"])
            return Metadata(
                issuer=issuer,
                authorization_endpoint=_url(doc["authorization_endpoint"]),
                token_endpoint=_url(doc["token_endpoint"]),
                jwks_uri=_url(doc["jwks_uri"]),
                revocation_endpoint=_url(doc["revocation_endpoint"]) if doc.get("revocation_endpoint") else None,
                end_session_endpoint=_url(doc["end_session_endpoint"]) if doc.get("end_session_endpoint") else None,
                id_token_algs=frozenset(a for a in algs if isinstance(a, str)) & _ALLOWED_ALGS
                if isinstance(algs, list)
                else frozenset(),
                scopes_supported=frozenset(s for s in scopes if isinstance(s, str))
                if isinstance(scopes := doc.get("scopes_supported"), list)
                else frozenset(),
                iss_in_responses=doc.get("authorization_response_iss_parameter_supported") is True,
                secret_in_form=_secret_in_form(doc.get("token_endpoint_auth_methods_supported")),
                revocation_secret_in_form=_secret_in_form(
                    doc.get(
                        "revocation_endpoint_auth_methods_supported", doc.get("token_endpoint_auth_methods_supported")
                    )
                ),
            )
        except KeyError as exc:
            raise ProviderProtocolError(f"discovery document lacks {exc.args[0]}") from None

    async def _get_json(self, url: str) -> dict[str, Any]:
        started = time.monotonic()
        try:
            async with self._http.get(url, timeout=self._timeout) as resp:
                if resp.status >= 400:
                    raise ProviderUnavailable(f"{url} answered {resp.status}")
                data = await resp.json(content_type=None)
        except TimeoutError as exc:
            raise ProviderTimeout(f"{url} did not answer in time") from exc
        except (aiohttp.ClientError, ValueError, RecursionError) as exc:
            raise ProviderUnavailable(f"cannot fetch {url}: {type(exc).__name__}") from exc
        finally:
            metrics.PROVIDER_SECONDS.labels(call="metadata").observe(time.monotonic() - started)
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"{url} did not return a JSON object")
        return data

    async def authorize_url(
        self,
        state: str,
        nonce: str,
        pkce: Pkce,
        redirect_uri: str | None = None,
        max_age: int | None = None,
        scope: str | None = None,
        offline: bool = False,
        acr_values: str | None = None,
    ) -> str:
        """``redirect_uri``: the callback built for this request (a relative ``--redirect-url``). ``max_age``
        (OIDC Core 3.1.2.1) makes the provider re-authenticate a user whose last sign-in there is older;
        the callback then checks the ID token's ``auth_time``. ``offline``: a refresh token is needed (a CLI/MCP
        grant); from a provider that lists no ``offline_access`` scope it is asked for Google's way."""
        meta = await self.metadata()
        params = {
            "response_type": "code",
            "client_id": self._config.client_id,
            "redirect_uri": redirect_uri or self._config.redirect_url,
            "scope": scope or self._config.scope,
            "state": state,
            "nonce": nonce,
            "code_challenge": pkce.challenge,
            "code_challenge_method": "S256",
        }
        if max_age is not None:
            params["max_age"] = str(max_age)
        if acr_values:
            params["acr_values"] = acr_values
        if offline and "offline_access" not in meta.scopes_supported:
            # Google: a refresh token only for access_type=offline, and on a repeated consent only with
            # prompt=consent. A provider that does not know them ignores them (RFC 6749 3.1).
            params["access_type"], params["prompt"] = "offline", "consent"
        query = urlencode(params)
        sep = "&" if "?" in meta.authorization_endpoint else "?"
        return f"{meta.authorization_endpoint}{sep}{query}"

    async def exchange_code(self, code: str, verifier: str, redirect_uri: str | None = None) -> TokenSet:
        """Redeem a code. The ID token's ``at_hash``, when present, must name the access token.
        ``redirect_uri`` must be the one sent in the authorize request (RFC 6749 4.1.3)."""
        body = await self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri or self._config.redirect_url,
                "code_verifier": verifier,
            },
            retry=False,  # a code is single-use: never send it twice
        )
        tokens = token_set_from_response(body, time.time())
        if tokens.id_token:
            check_at_hash(tokens.id_token, tokens.access_token)
        return tokens

    async def refresh(self, refresh_token: str) -> TokenSet:
        body = await self._token_request({"grant_type": "refresh_token", "refresh_token": refresh_token}, retry=True)
        return token_set_from_response(body, time.time())

    def _client_auth(self, in_form: bool = False) -> tuple[dict[str, str], dict[str, str]]:
        """(headers, form fields) authenticating this client: client_secret_basic, client_secret_post where the
        endpoint takes only that (``in_form``), or a public client."""
        if self._config.client_secret and in_form:
            return {}, {"client_id": self._config.client_id, "client_secret": self._config.client_secret}
        if self._config.client_secret:
            # RFC 6749 2.3.1: form-urlencode id and secret before Basic encoding.
            pair = f"{quote(self._config.client_id, safe='')}:{quote(self._config.client_secret, safe='')}"
            return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}, {}
        return {}, {"client_id": self._config.client_id}

    def raise_if_token_paused(self) -> None:
        """ProviderUnavailable (with the seconds left) while the token endpoint's Retry-After pause lasts."""
        closed = self._token_closed_until - time.monotonic()
        if closed > 0:
            raise ProviderUnavailable(
                "token endpoint asked for a pause (Retry-After); not asked yet", retry_after=closed
            )

    async def _token_request(self, form: dict[str, str], *, retry: bool) -> dict[str, Any]:
        """POST to the token endpoint. Retries only failures where the provider did not process the
        grant (connection refused, 5xx, 429), never a read timeout: with rotating refresh tokens a
        second presentation after an unseen success would look like token theft. A 429 or 5xx with
        ``Retry-After`` is not retried, and no token request of this process goes out before that time (capped
        at ``RETRY_AFTER_MAX``): a rate-limited provider is not hammered by every user whose token expires."""
        meta = await self.metadata()
        auth, extra = self._client_auth(meta.secret_in_form)
        attempts = 1 + (self._config.provider_retries if retry else 0)
        for attempt in range(attempts):
            self.raise_if_token_paused()
            try:
                return await self._post_token(meta.token_endpoint, {**form, **extra}, auth)
            except _Retryable as exc:
                if exc.retry_after is not None:
                    self._token_closed_until = time.monotonic() + exc.retry_after
                    raise ProviderUnavailable(str(exc), retry_after=exc.retry_after) from exc
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
                text = await resp.text(errors="replace")
                wait = retry_after_seconds(resp.headers.get("Retry-After"), time.time())
        except aiohttp.ClientConnectorError as exc:
            raise _Retryable(f"token endpoint unreachable: {type(exc).__name__}") from exc
        except TimeoutError as exc:
            raise ProviderTimeout("token endpoint timed out") from exc
        except aiohttp.ClientError as exc:
            raise ProviderUnavailable(f"token endpoint failed: {type(exc).__name__}") from exc
        finally:
            metrics.PROVIDER_SECONDS.labels(call="token").observe(time.monotonic() - started)
        if status >= 500 or status == 429:
            raise _Retryable(f"token endpoint answered {status}", wait)
        body = json_object(text)
        if status >= 400 or (body is not None and "error" in body):
            raise _refusal(status, body)
        if body is None:
            raise ProviderProtocolError(f"token endpoint answered {status} without a JSON object")
        return body

    async def revoke(self, token: str, hint: str = "refresh_token") -> str:
        """RFC 7009 revocation, best effort; what happened, for the log line of the sign-out or grant end:
        ``REVOKED``, ``NOT_REVOKED_NO_ENDPOINT`` (discovery names no revocation endpoint: nothing is sent,
        to no guessed URL either, and an offline token stays valid at the provider until it expires) or
        ``NOT_REVOKED_FAILED``. Never raises: the local sign-out has already happened."""
        try:
            meta = await self.metadata()
        except ProviderError:
            return NOT_REVOKED_FAILED
        if not meta.revocation_endpoint:
            return NOT_REVOKED_NO_ENDPOINT
        auth, extra = self._client_auth(meta.revocation_secret_in_form)
        try:
            async with self._http.post(
                meta.revocation_endpoint,
                data={"token": token, "token_type_hint": hint, **extra},
                headers=auth,
                timeout=self._timeout,
            ) as resp:
                return REVOKED if resp.status == 200 else NOT_REVOKED_FAILED
        except (TimeoutError, aiohttp.ClientError):
            return NOT_REVOKED_FAILED

    async def end_session_url(self, id_token: str | None, post_logout_redirect: str) -> str | None:
        meta = await self.metadata()
        if not meta.end_session_endpoint:
            return None
        params = {"post_logout_redirect_uri": post_logout_redirect, "client_id": self._config.client_id}
        if id_token:
            params["id_token_hint"] = id_token
        sep = "&" if "?" in meta.end_session_endpoint else "?"
        return f"{meta.end_session_endpoint}{sep}{urlencode(params)}"

    def _known_key(self, kid: str | None) -> Any:
        key = self._keys.get(kid or "")
        if key is None and kid is None and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        return key

    def _may_fetch_jwks(self) -> bool:
        """A JWKS fetch is running (join it), or the last one started long enough ago: a failure
        ``_Flight.backoff()`` ago, a success ``jwks_min_refetch`` ago."""
        if self._jwks.running:
            return True
        gap = self._jwks.backoff() if self._jwks.failed else self.jwks_min_refetch
        return self._jwks.seconds_since_start() >= gap

    async def _signing_key(self, kid: str | None) -> Any:
        """The key for ``kid``. Unknown and no fetch allowed yet, or the fetch failed: ProviderUnavailable
        (we cannot tell yet). Unknown in a key set fetched for this very call: TokenValidationError."""
        key = self._known_key(kid)
        if key is not None:
            return key
        if not self._may_fetch_jwks():
            raise ProviderUnavailable("token signed with a key not in the provider's key set fetched moments ago")
        self._keys = await self._jwks.run(self._load_jwks)
        key = self._known_key(kid)
        if key is None:
            raise TokenValidationError("token signed with a key the provider does not publish")
        return key

    async def _load_jwks(self) -> dict[str, Any]:
        """The usable signing keys by kid. A key set with no usable key is a failed fetch, so a provider
        glitch serving an empty set never makes every token look invalid."""
        meta = await self.metadata()
        doc = await self._get_json(meta.jwks_uri)
        entries = doc.get("keys")
        keys: dict[str, Any] = {}
        for entry in entries if isinstance(entries, list) else ():
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            kid = entry.get("kid", "")
            if not isinstance(kid, str):
                continue
            try:
                keys[kid] = jwt.PyJWK(entry).key
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                continue  # a key type we cannot use is not fatal while others work
        if not keys:
            raise ProviderUnavailable("the provider's JWKS holds no usable signing key")
        return keys

    async def _verify(self, token: str, what: str, require: list[str]) -> dict[str, Any]:
        """Signature (provider JWKS, allowed algorithms only), iss, aud and the required claims."""
        meta = await self.metadata()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenValidationError(f"{what} is not a JWT") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in meta.id_token_algs:
            raise TokenValidationError(f"{what} algorithm {alg!r} not allowed")
        if kid is not None and not isinstance(kid, str):
            raise TokenValidationError(f"{what} kid is not a string")
        key = await self._signing_key(kid)
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
        iat = number(claims.get("iat"))
        if iat is None or iat > time.time() + _LEEWAY:
            raise TokenValidationError(f"{what} issued in the future or without a usable iat")
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

    async def validate_bearer_token(self, token: str) -> dict[str, Any]:
        """A JWT an API client presents (``--skip-jwt-bearer-tokens``): this issuer's keys and allowed
        algorithms, ``iss``, an accepted ``aud``, ``exp``/``nbf``/``iat``. No ``azp`` check: a CLI's token
        is often issued to another client of the same provider, with our client id as audience."""
        claims = await self._verify(token, "bearer token", ["iss", "sub", "aud", "exp", "iat"])
        # RFC 8725 3.11: a logout token is signed by the same keys for the same audience; what only it carries
        # (the events claim, its typ) keeps it from ever being taken for an access token.
        typ = jwt.get_unverified_header(token).get("typ")
        if "events" in claims or (isinstance(typ, str) and "logout+jwt" in typ.lower()):
            raise TokenValidationError("bearer token is a logout token")
        return claims

    async def validate_logout_token(self, token: str) -> dict[str, Any]:
        """OIDC Back-Channel Logout 1.0, section 2.6: a signed event naming a sub and/or a sid. ``iat`` must be
        recent (``LOGOUT_TOKEN_MAX_AGE``, plus the leeway) and ``jti`` present, so a token can only be
        replayed for minutes; the caller refuses a ``jti`` seen before within that time
        (``logout_token_replay_ttl``, in the shared store). ``exp`` is checked when present and not required:
        it became required only in the 2023 errata, and providers still send the earlier format."""
        claims = await self._verify(token, "logout token", ["iss", "aud", "iat", "jti", "events"])
        events = claims.get("events")
        # 2.4: the event's member value MUST be a JSON object (usually {}).
        if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_EVENT), dict):
            raise TokenValidationError("logout token lacks the back-channel logout event")
        typ = jwt.get_unverified_header(token).get("typ")  # the signature was checked by _verify
        if typ is not None and (
            not isinstance(typ, str) or typ.lower().removeprefix("application/") not in _LOGOUT_TYPES
        ):
            # 2.4 (explicit typing): a token typed as another kind (an access token, a SET) is never a logout token;
            # no typ, or plain JWT, is the format of providers from before the 2023 errata.
            raise TokenValidationError("logout token typ names another kind of token")
        if "nonce" in claims:
            raise TokenValidationError("logout token must not carry a nonce")
        if not _named(claims.get("sub")) and not _named(claims.get("sid")):
            raise TokenValidationError("logout token names neither sub nor sid")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= 256:
            raise TokenValidationError("logout token jti is not a usable string")
        exp, iat = number(claims.get("exp")), number(claims.get("iat"))
        if iat is None or ("exp" in claims and (exp is None or not math.isfinite(exp))):
            raise TokenValidationError("logout token exp or iat is not a number")
        if time.time() - iat > LOGOUT_TOKEN_MAX_AGE + _LEEWAY:
            raise TokenValidationError("logout token issued too long ago")
        return claims


def _named(value: Any) -> bool:
    """A logout token's ``sub`` or ``sid`` names something: a non-empty string."""
    return isinstance(value, str) and value != ""


def _secret_in_form(methods: Any) -> bool:
    """Send the client secret in the form (client_secret_post): only when discovery lists the endpoint's methods,
    without client_secret_basic (the default, RFC 6749 2.3.1 and OIDC Discovery) and with client_secret_post."""
    return isinstance(methods, list) and "client_secret_basic" not in methods and "client_secret_post" in methods


def _url(value: Any) -> str:
    """An endpoint from the discovery document: an absolute http(s) URL, else the document is unusable."""
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        raise ProviderProtocolError("discovery document names an endpoint that is not an http(s) URL")
    return value


class _Retryable(Exception):
    """Internal: a token-endpoint failure that is safe to retry (after ``retry_after`` seconds, when it said)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
