"""A real-HTTP OpenID Connect provider for local development and tests. NOT for production.

``DevProvider`` holds the state (codes, refresh-token families, keys, counters,
behaviour toggles, injected faults) and the control surface; the grant logic is
mixed in from ``provider_grants`` and ``provider_routes`` turns it into an
aiohttp app. Tests drive it in-process through its methods or, from another
process, through the JSON ``/_control/`` API.

Run standalone::

    python -m sidecar.dev.provider --port 9000 --access-token-ttl 60 --rotate-refresh-tokens
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from .provider_grants import TokenGrants
from .provider_model import (
    ACR_LEVELS,
    ACR_MODES,
    AT_HASH_MODES,
    DEFAULT_USERS,
    ENDPOINT_FAULT_KINDS,
    FAULT_KINDS,
    SIGNING_ALGS,
    AuthCode,
    ClientReg,
    DevUser,
    Fault,
    KeyRing,
    OAuthError,
    RefreshFamily,
    RefreshRecord,
    default_clients,
    random_token,
)

__all__ = [
    "DEFAULT_USERS",
    "FAULT_KINDS",
    "ClientReg",
    "DevProvider",
    "DevUser",
    "OAuthError",
    "main",
    "run_provider",
]

BOOL_SETTINGS = (
    "send_expires_in",
    "send_refresh_expires_in",
    "send_id_token_on_refresh",
    "rotate_refresh_tokens",
    "reuse_detection",
    "return_same_refresh_token",
    "send_sid",
    "remember_logins",
    "honour_max_age",
    "send_auth_time",
    "logout_token_exp",
    "revocation_endpoint",
    "send_kid",
    "send_iss",
    "issuer_trailing_slash",
)
# What the token endpoint answers for a refresh token it does not know (or has forgotten): most providers
# say invalid_grant, some (older enterprise SSOs) invalid_request.
UNKNOWN_REFRESH_ERRORS = ("invalid_grant", "invalid_request", "unauthorized_client")
# How confidential clients may authenticate at the token and revocation endpoints (``client_auth``): both ways, or
# only one, as a provider configured per client does (Zitadel's "POST" apps, Authelia, some Keycloak set-ups).
CLIENT_AUTH_CHOICES = {
    "both": ("client_secret_basic", "client_secret_post"),
    "basic": ("client_secret_basic",),
    "post": ("client_secret_post",),
}
INT_SETTINGS = ("access_token_ttl", "refresh_token_ttl", "id_token_ttl", "code_ttl")
SCOPES = ["openid", "email", "profile", "groups", "offline_access"]
# When the code exchange issues a refresh token (``refresh_tokens``): always, or Google's way: discovery lists no
# offline_access, and a refresh token comes only for ``access_type=offline``, on a user's first consent to the
# client or with ``prompt=consent``.
REFRESH_TOKEN_POLICIES = ("always", "google")


class DevProvider(TokenGrants):
    """State + behaviour of the provider; one aiohttp app serves it."""

    def __init__(
        self,
        issuer: str,
        clients: dict[str, ClientReg] | None = None,
        users: Mapping[str, DevUser] = DEFAULT_USERS,
        access_token_ttl: int = 60,
        refresh_token_ttl: int = 3600,
        *,
        auto_login: str | None = None,
        rotate_refresh_tokens: bool = False,
        reuse_detection: bool = True,
        return_same_refresh_token: bool = False,
        send_expires_in: bool = True,
        send_refresh_expires_in: bool = True,
        send_id_token_on_refresh: bool = True,
        send_sid: bool = False,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.clients = dict(clients) if clients is not None else default_clients()
        # Deep copy: set_groups() must not leak into DEFAULT_USERS or other instances.
        self.users: dict[str, DevUser] = {k: copy.deepcopy(u) for k, u in users.items()}
        self.keys = KeyRing()
        # Behaviour toggles (see BOOL_SETTINGS / INT_SETTINGS).
        self.access_token_ttl = access_token_ttl
        self.refresh_token_ttl = refresh_token_ttl
        self.id_token_ttl = 300
        self.code_ttl = 60
        self.send_expires_in = send_expires_in
        self.send_refresh_expires_in = send_refresh_expires_in
        self.send_id_token_on_refresh = send_id_token_on_refresh
        self.send_sid = send_sid  # ID tokens name the provider session (the refresh family), as Keycloak's do
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.reuse_detection = reuse_detection
        self.return_same_refresh_token = return_same_refresh_token
        self.at_hash = "good"  # see AT_HASH_MODES
        # Quirks of real providers: back-channel logout tokens in the format before the 2023 errata (no
        # exp), refusals of a forgotten refresh token as invalid_request, no RFC 7009 endpoint in discovery.
        self.logout_token_exp = True
        self.unknown_refresh_error = "invalid_grant"
        self.revocation_endpoint = True
        self.client_auth = "both"  # see CLIENT_AUTH_CHOICES
        self.refresh_tokens = "always"  # see REFRESH_TOKEN_POLICIES
        self.issuer_trailing_slash = False  # the issuer identifier ends in "/" (Auth0); endpoints do not
        self._consented: set[tuple[str, str]] = set()  # (user, client) pairs that consented once (google)
        self.acr_mode = "honour"  # see ACR_MODES
        self.send_iss = True  # RFC 9207 iss in authorization responses, said in discovery (off: Google, Entra ID)
        self.token_overrides: dict[str, Any] = {}  # merged into every token response; None removes a field
        self.endpoint_faults: dict[str, tuple[str, float]] = {}  # "discovery"/"jwks"/"revoke" -> (kind, delay)
        # Single sign-on, off unless asked: a browser that logged in is remembered (a cookie scoped to
        # /authorize) and not asked again, so its auth_time stays that of the login. max_age makes a
        # remembered login older than it count for nothing, unless honour_max_age is off (a provider
        # that ignores it); send_auth_time off leaves auth_time out of ID tokens.
        self.remember_logins = False
        self.honour_max_age = True
        self.send_auth_time = True
        self._logins: dict[str, tuple[str, int]] = {}  # sso cookie value -> (username, login time)
        self.auto_login: str | None = None
        if auto_login is not None:
            self.config(auto_login=auto_login)
        # Grant state.
        self._codes: dict[str, AuthCode] = {}
        self._families: dict[str, RefreshFamily] = {}
        self._refresh: dict[str, RefreshRecord] = {}  # sha256(token) -> record
        self._access: dict[str, tuple[str | None, float]] = {}  # jti -> (family, exp)
        self._revoked_jtis: set[str] = set()
        self._faults: list[Fault] = []
        self.reset_counters()  # the counters

    # ---------------------------------------------------------------- wiring

    def app(self) -> web.Application:
        """A fresh aiohttp application serving this provider."""
        from .provider_routes import build_app

        return build_app(self)

    def url(self, path: str) -> str:
        """Absolute URL of one of our endpoints (the issuer may change once the port is known)."""
        return f"{self.issuer}{path}"

    def discovery(self) -> dict[str, Any]:
        """The ``/.well-known/openid-configuration`` document."""
        return {
            "issuer": self.issuer_id,
            "authorization_endpoint": self.url("/authorize"),
            "token_endpoint": self.url("/token"),
            "userinfo_endpoint": self.url("/userinfo"),
            "jwks_uri": self.url("/jwks"),
            "end_session_endpoint": self.url("/logout"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": self.keys.algs(),
            "token_endpoint_auth_methods_supported": list(self.client_auth_methods),
            "subject_types_supported": ["public"],
            "acr_values_supported": list(ACR_LEVELS),
            "scopes_supported": [s for s in SCOPES if s != "offline_access" or self.refresh_tokens != "google"],
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "azp",
                "exp",
                "iat",
                "auth_time",
                "nonce",
                "email",
                "email_verified",
                "name",
                "preferred_username",
                "groups",
            ],
            **({"authorization_response_iss_parameter_supported": True} if self.send_iss else {}),
            **(self._revocation_metadata() if self.revocation_endpoint else {}),
        }

    def _revocation_metadata(self) -> dict[str, Any]:
        auth_methods = list(self.client_auth_methods)
        return {"revocation_endpoint": self.url("/revoke"), "revocation_endpoint_auth_methods_supported": auth_methods}

    # ------------------------------------------------------ control surface

    def config(self, values: Mapping[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """Validate then apply toggles (all or nothing); returns the current settings."""
        changes = {**(values or {}), **kw}
        for key, value in changes.items():
            if key == "auto_login":
                if value not in (None, "", False) and value not in self.users:
                    raise ValueError(f"auto_login: unknown user {value!r}")
            elif key == "at_hash":
                if value not in AT_HASH_MODES:
                    raise ValueError(f"at_hash must be one of {AT_HASH_MODES}")
            elif key == "signing_alg":
                if value not in SIGNING_ALGS:
                    raise ValueError(f"signing_alg must be one of {SIGNING_ALGS}")
            elif key == "acr_mode":
                if value not in ACR_MODES:
                    raise ValueError(f"acr_mode must be one of {ACR_MODES}")
            elif key == "refresh_tokens":
                if value not in REFRESH_TOKEN_POLICIES:
                    raise ValueError(f"refresh_tokens must be one of {REFRESH_TOKEN_POLICIES}")
            elif key == "client_auth":
                if value not in CLIENT_AUTH_CHOICES:
                    raise ValueError(f"client_auth must be one of {tuple(CLIENT_AUTH_CHOICES)}")
            elif key == "unknown_refresh_error":
                if value not in UNKNOWN_REFRESH_ERRORS:
                    raise ValueError(f"unknown_refresh_error must be one of {UNKNOWN_REFRESH_ERRORS}")
            elif key in BOOL_SETTINGS:
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be a boolean")
            elif key in INT_SETTINGS:
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ValueError(f"{key} must be a positive integer")
            else:
                raise ValueError(f"unknown setting {key!r}")
        for key, value in changes.items():
            if key == "auto_login":
                value = value or None
            setattr(self, key, value)
        return self.settings()

    def settings(self) -> dict[str, Any]:
        """Current toggles."""
        names = (
            *BOOL_SETTINGS,
            *INT_SETTINGS,
            "auto_login",
            "at_hash",
            "unknown_refresh_error",
            "signing_alg",
            "client_auth",
            "refresh_tokens",
            "acr_mode",
        )
        return {name: getattr(self, name) for name in names}

    def stats(self) -> dict[str, Any]:
        """Counters plus toggles, flat, for assertions in tests."""
        return {
            "token_calls": dict(self.token_calls),
            "reuse_detected": self.reuse_detected,
            "revocations": self.revocations,
            "userinfo_calls": self.userinfo_calls,
            "codes_issued": self.codes_issued,
            "logout_calls": self.logout_calls,
            "discovery_calls": self.discovery_calls,
            "jwks_calls": self.jwks_calls,
            "refresh_tokens_presented": list(self.refresh_tokens_presented),
            "active_refresh_families": sum(1 for f in self._families.values() if not f.revoked),
            "live_refresh_tokens": self.live_refresh_tokens(),
            "revoke_calls": self.revoke_calls,
            "faults": [f.to_dict() for f in self._faults],
            "interactive_logins": self.interactive_logins,
            "kids": [k.kid for k in self.keys.keys],
            **self.settings(),
        }

    def offline_allowed(self, username: str, params: Mapping[str, str]) -> bool:
        """Whether this authorization's code exchange issues a refresh token (see REFRESH_TOKEN_POLICIES)."""
        if self.refresh_tokens == "always":
            return True
        pair = (username, params.get("client_id", ""))
        first = pair not in self._consented
        self._consented.add(pair)
        prompt = params.get("prompt", "").split()
        return params.get("access_type") == "offline" and (first or "consent" in prompt)

    def acr_for(self, acr_values: str | None) -> str | None:
        """The ID token's ``acr`` for an authorization that asked ``acr_values`` (see ACR_MODES); None: no claim."""
        if acr_values is None or self.acr_mode == "none":
            return None
        wanted = [v for v in acr_values.split() if v in ACR_LEVELS] if self.acr_mode == "honour" else []
        return wanted[0] if wanted else ACR_LEVELS[0]

    @property
    def client_auth_methods(self) -> tuple[str, ...]:
        """The client authentication methods the token and revocation endpoints accept."""
        return CLIENT_AUTH_CHOICES[self.client_auth]

    @property
    def send_kid(self) -> bool:
        """Tokens and the JWKS name each key's ``kid`` (off: as some providers with one key do)."""
        return self.keys.send_kid

    @send_kid.setter
    def send_kid(self, value: bool) -> None:
        self.keys.send_kid = value

    @property
    def signing_alg(self) -> str:
        """The algorithm of the key that signs; setting another adds a key of that kind (the old stays published)."""
        return self.keys.current.alg

    @signing_alg.setter
    def signing_alg(self, alg: str) -> None:
        if alg != self.keys.current.alg:
            self.keys.rotate(keep_old=True, alg=alg)

    def reset_counters(self) -> None:
        """Zero every counter (state such as tokens and toggles is kept)."""
        self.token_calls: dict[str, int] = {"authorization_code": 0, "refresh_token": 0}
        self.reuse_detected = 0
        self.revocations = 0
        self.revoke_calls = 0
        self.userinfo_calls = 0
        self.codes_issued = 0
        self.logout_calls = 0
        self.discovery_calls = 0
        self.jwks_calls = 0
        self.refresh_tokens_presented: list[str] = []
        self.interactive_logins = 0

    def inject_fault(
        self,
        kind: str,
        count: int = 1,
        grant: str = "refresh_token",
        delay: float = 0.0,
        *,
        status: int = 400,
        body: str = "",
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """Make the next ``count`` token calls for ``grant`` misbehave (``count=-1``: forever).
        ``raw`` answers ``status`` with ``body`` (and ``headers``) as it is: any refusal or malformed answer a
        provider might send (an empty 400, ``invalid_client``, an HTML 401, a 200 that is not JSON, a 429
        with ``Retry-After`` ...)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if count == 0 or count < -1:
            raise ValueError("count must be positive or -1")
        if delay < 0:
            raise ValueError("delay must not be negative")
        if not 200 <= status <= 599:
            raise ValueError("status must be an HTTP status")
        fault = Fault(kind, count, grant, float(delay), status, body, content_type, dict(headers or {}))
        self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Forget every pending fault (token endpoint, discovery and JWKS)."""
        self._faults.clear()
        self.endpoint_faults.clear()

    def break_endpoint(self, endpoint: str, kind: str, delay: float = 0.0) -> None:
        """Make ``discovery``, ``jwks`` or ``revoke`` misbehave until ``clear_faults``: answer 500, answer after
        ``delay`` seconds (``slow``; a long delay is a hanging provider), or answer broken JSON."""
        if endpoint not in ("discovery", "jwks", "revoke"):
            raise ValueError("endpoint must be 'discovery', 'jwks' or 'revoke'")
        if kind not in ENDPOINT_FAULT_KINDS:
            raise ValueError(f"unknown endpoint fault {kind!r}; expected one of {ENDPOINT_FAULT_KINDS}")
        if delay < 0:
            raise ValueError("delay must not be negative")
        self.endpoint_faults[endpoint] = (kind, float(delay))

    def override_token_fields(self, fields: Mapping[str, Any]) -> None:
        """Every later token response carries these fields as given (``None`` removes the field); an
        empty mapping restores normal answers. For odd lifetimes, token types and missing tokens."""
        self.token_overrides = dict(fields)

    def take_fault(self, grant_type: str) -> Fault | None:
        """Consume one use of the first fault matching this call, if any."""
        for fault in self._faults:
            if fault.matches(grant_type):
                if fault.remaining > 0:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                return fault
        return None

    def rotate_keys(self, keep_old: bool = True) -> str:
        """New signing key (new kid); old keys stay in the JWKS when ``keep_old``."""
        return self.keys.rotate(keep_old)

    def revoke_user(self, sub: str) -> int:
        """Kill every refresh-token family (and its access tokens) of ``sub``; returns count."""
        killed = 0
        for fam in self._families.values():
            user = self.users.get(fam.username)
            if not fam.revoked and user is not None and user.sub == sub:
                fam.revoked = True
                killed += 1
        return killed

    def remembered_login(self, sso: str | None, username: str, max_age: int | None, prompt: str) -> int | None:
        """The login time of this browser's remembered login as ``username``, when it may stand in for a
        new one: logins are remembered, no ``prompt=login``, and (honouring ``max_age``) recent enough."""
        login = self._logins.get(sso or "") if self.remember_logins else None
        if login is None or login[0] != username or "login" in prompt.split():
            return None
        if self.honour_max_age and max_age is not None and time.time() - login[1] > max_age:
            return None
        return login[1]

    def log_in(self, username: str) -> tuple[int, str | None]:
        """An interactive login now: (its time, the SSO cookie value to set when logins are remembered)."""
        self.interactive_logins += 1
        now = int(time.time())
        if not self.remember_logins:
            return now, None
        sso = random_token(16)
        self._logins[sso] = (username, now)
        return now, sso

    def backdate_logins(self, seconds: int) -> None:
        """Every remembered login happened ``seconds`` earlier: time passing at the provider, without sleeping."""
        self._logins = {k: (user, at - seconds) for k, (user, at) in self._logins.items()}

    def set_groups(self, username: str, groups: Sequence[str]) -> None:
        """Change a user's groups; later tokens and userinfo answers carry the new list."""
        if username not in self.users:
            raise ValueError(f"unknown user {username!r}")
        self.users[username].groups = [str(g) for g in groups]


async def run_provider(host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> tuple[web.AppRunner, DevProvider]:
    """Start a provider on a TCP site. ``port=0`` picks a free port and fixes the issuer up.

    Pass ``issuer=`` to override the default ``http://host:port`` and
    ``shutdown_timeout=`` (default 0.5 s) to change how long cleanup waits for
    in-flight requests; other keyword arguments go to ``DevProvider``. Stop it
    with ``await runner.cleanup()``.
    """
    issuer: str | None = kwargs.pop("issuer", None)
    shutdown_timeout = float(kwargs.pop("shutdown_timeout", 0.5))
    shown_host = f"[{host}]" if ":" in host else host
    provider = DevProvider(issuer or f"http://{shown_host}:{port}", **kwargs)
    # Short drain: a handler sleeping in a "timeout" fault must not stall cleanup for 30 s.
    runner = web.AppRunner(provider.app(), access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    if issuer is None and port == 0:
        provider.issuer = f"http://{shown_host}:{runner.addresses[0][1]}"
    return runner, provider


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sidecar.dev.provider",
        description="Development OpenID Connect provider. NOT FOR PRODUCTION.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--issuer", help="default: http://HOST:PORT")
    p.add_argument("--client-id", default="sidecar-dev")
    p.add_argument("--client-secret", default="sidecar-dev-secret")
    p.add_argument("--redirect-uri", action="append", default=[], help="repeatable; none = any")
    p.add_argument("--access-token-ttl", type=int, default=60)
    p.add_argument("--refresh-token-ttl", type=int, default=3600)
    p.add_argument("--auto-login", metavar="USER", help="skip the login page, sign in as USER")
    p.add_argument("--rotate-refresh-tokens", action="store_true")
    p.add_argument("--no-reuse-detection", action="store_true")
    p.add_argument("--return-same-refresh-token", action="store_true")
    p.add_argument("--no-expires-in", action="store_true", help="omit expires_in")
    p.add_argument("--no-refresh-expires-in", action="store_true")
    p.add_argument("--no-id-token-on-refresh", action="store_true")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the provider standalone until SIGINT/SIGTERM."""
    args = _parse_args(argv)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    issuer = args.issuer or f"http://{shown_host}:{args.port}"
    clients = {args.client_id: ClientReg(args.client_id, args.client_secret, args.redirect_uri)}
    try:
        provider = DevProvider(
            issuer,
            clients,
            DEFAULT_USERS,
            args.access_token_ttl,
            args.refresh_token_ttl,
            auto_login=args.auto_login,
            rotate_refresh_tokens=args.rotate_refresh_tokens,
            reuse_detection=not args.no_reuse_detection,
            return_same_refresh_token=args.return_same_refresh_token,
            send_expires_in=not args.no_expires_in,
            send_refresh_expires_in=not args.no_refresh_expires_in,
            send_id_token_on_refresh=not args.no_id_token_on_refresh,
        )
    except ValueError as exc:
        sys.exit(f"error: {exc}")

    def banner(_: str) -> None:
        print(f"dev OIDC provider (NOT FOR PRODUCTION) listening on {issuer}", flush=True)

    if args.verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    web.run_app(
        provider.app(),
        host=args.host,
        port=args.port,
        print=banner,
        shutdown_timeout=0.5,
        access_log=logging.getLogger("aiohttp.access") if args.verbose else None,
    )


if __name__ == "__main__":
    main()
