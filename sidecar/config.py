"""The one settings object: a typed, frozen dataclass whose fields are the options.

Every option is one field below; its flag, its ``SIDECAR_*`` variable, its TOML key and its
``--help`` line all come from that field (``config_load.py`` reads them). ``build_config`` checks
the values (the rules are in ``config_checks.py``), collects every problem, and start-up stops with
exit code 2 listing them all: the sidecar never runs half configured, and never accepts a setting it
then ignores. How one option is declared and parsed is in ``config_option.py``.

Field annotations name how a value is read: ``Seconds`` is a Go-style duration, ``Names`` a
list that may be comma-separated, ``Patterns`` a list of regexes that is never split.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config_checks import (
    Upstream,
    check_fields,
    client_metadata_ssl,
    collect,
    migration_derived,
    network,
    oauth_resources,
    parse_upstream,
    secret_file,
    skip_route,
    split_hostport,
)
from .config_option import (
    Names,
    Option,
    Patterns,
    Seconds,
    derived_field,
    mask_url,
    option,
    options_of,
    parse_bool,
    parse_duration,
)
from .errors import ConfigError
from .rules import DomainRule, HostRule, Route, parse_domain_rule, parse_host_rule
from .stepup import FreshRoute, parse_fresh_route
from .templates import DEFAULT_TEMPLATES, PageTemplates

# Names other modules import from here (kept so ``from .config import ...`` goes on working after the split).
__all__ = [
    "BY_ATTR",
    "OPTIONS",
    "Config",
    "Option",
    "Upstream",
    "build_config",
    "mask_url",
    "option",
    "parse_bool",
    "parse_duration",
]

_YEAR = 366 * 86400.0


@dataclass(frozen=True, repr=False)
class Config:
    """Every setting, validated and typed; build it with ``build_config`` or ``config_load.load_config``."""

    http_address: str = option("127.0.0.1:4180", "host:port to listen on")
    upstream: Names = option((), "upstream URL; its path is the prefix it serves (repeatable)", aliases=("upstreams",))
    provider: str = option("oidc", "identity provider type", choices=("oidc",))
    oidc_issuer_url: str = option("", "OpenID Connect issuer URL (discovery)")
    client_id: str = option("", "OAuth client id")
    client_secret: str = option("", "OAuth client secret", secret=True)
    client_secret_file: str = option("", "file holding the client secret")
    redirect_url: str = option("", "callback URL, e.g. https://app.example.com/oauth2/callback")
    scope: str = option(
        "openid email profile", "scopes to request (add offline_access if the provider needs it for refresh tokens)"
    )
    oidc_email_claim: str = option("email", "claim holding the email")
    oidc_groups_claim: str = option("groups", "claim holding the groups")
    user_id_claim: str = option("sub", "claim used as the user name when there is no email")
    oidc_extra_audience: Names = option((), "extra accepted ID token audiences (repeatable)")
    insecure_oidc_allow_unverified_email: bool = option(False, "accept an email whose email_verified is not true")
    cookie_name: str = option("_sidecar", "session cookie name")
    cookie_secret: Names = option(
        (), "cookie signing secret, >= 16 bytes; comma list to rotate, newest first", secret=True
    )
    cookie_domain: Names = option(
        (),
        "cookie Domain: the longest listed domain the request's host falls under; none matching: host-only",
        aliases=("cookie_domains",),
    )
    cookie_path: str = option("/", "cookie Path attribute")
    cookie_secure: bool = option(True, "cookie Secure attribute")
    cookie_httponly: bool = option(True, "cookie HttpOnly attribute")
    cookie_samesite: str = option("lax", "cookie SameSite", choices=("lax", "strict", "none", ""))
    cookie_expire: Seconds = option(
        604800.0, "absolute session lifetime and cookie Max-Age (168h)", low=1, high=10 * _YEAR
    )
    cookie_refresh: Seconds = option(
        0.0, "refresh the access token once it is this old (0 = only on expiry)", high=_YEAR
    )
    session_idle_timeout: Seconds = option(
        86400.0, "sign out a session unused this long (24h; 0 = never)", high=10 * _YEAR
    )
    refresh_token_ttl: Seconds = option(
        2592000.0, "refresh-token lifetime when the provider does not say (720h)", low=1, high=10 * _YEAR
    )
    refresh_skew: Seconds = option(30.0, "refresh this long before the access token expires", high=86400)
    refresh_wait_timeout: Seconds = option(
        15.0, "longest a request waits for another's refresh before 503", low=0.1, high=300
    )
    provider_timeout: Seconds = option(5.0, "timeout of one call to the provider", low=0.05, high=300)
    provider_retries: int = option(2, "retries of a failed provider call (with backoff)", high=10)
    session_store_type: str = option(
        "memory", "session store: memory (one process) or redis", choices=("memory", "redis")
    )
    redis_connection_url: str = option("redis://127.0.0.1:6379/0", "redis://, rediss:// or unix:// URL", secret=True)
    redis_use_sentinel: bool = option(False, "find the Redis master through Sentinel")
    redis_sentinel_master_name: str = option("", "Sentinel master name")
    redis_sentinel_connection_urls: Names = option((), "Sentinel URLs (repeatable)", secret=True)
    redis_sentinel_password: str = option("", "password for the Sentinels themselves", secret=True)
    redis_use_cluster: bool = option(False, "use Redis Cluster")
    redis_cluster_connection_urls: Names = option((), "Redis Cluster node URLs (repeatable)", secret=True)
    redis_timeout: Seconds = option(2.0, "timeout of one Redis command", low=0.01, high=60)
    session_cache_ttl: Seconds = option(1.0, "how long a replica trusts its cached copy of a session (0 to 1s)", high=1)
    auth_decision_cache: bool = option(
        True, "keep each /oauth2/auth 202 (and proxy sign-in check) per cookie for at most --session-cache-ttl"
    )
    email_domain: Names = option(
        (),
        "allowed email domains: example.com, .example.com (subdomains) or * for any (required)",
        aliases=("email_domains",),
    )
    allowed_group: Names = option((), "allowed groups; empty allows any (repeatable)", aliases=("allowed_groups",))
    set_xauthrequest: bool = option(True, "set X-Auth-Request-* headers on /oauth2/auth and proxied requests")
    pass_user_headers: bool = option(True, "send X-Forwarded-User/-Email/-Groups to the upstream")
    pass_access_token: bool = option(False, "send X-Forwarded-Access-Token / X-Auth-Request-Access-Token")
    pass_authorization_header: bool = option(False, "send Authorization: Bearer <access token> upstream")
    skip_auth_route: Patterns = option(
        (),
        "[METHOD=|METHOD!=]path-regex served without auth (repeatable; never split at commas)",
        aliases=("skip_auth_routes",),
    )
    fresh_auth_route: Patterns = option(
        (),
        "DURATION=[METHOD=|METHOD!=]path-regex: a session whose last interactive sign-in is older than DURATION "
        "must sign in again there (browsers with max_age, others 401; repeatable, e.g. 5m=^/admin/)",
        aliases=("fresh_auth_routes",),
    )
    whitelist_domain: Names = option(
        (),
        "hosts allowed in rd redirects: host, host:port, host:*, .example.com (repeatable)",
        aliases=("whitelist_domains",),
    )
    signin_rate_limit: int = option(
        30,
        "sign-in requests (/oauth2/start, /oauth2/callback) per client per minute, burst twice that; 0 = no limit",
        high=1_000_000,
    )
    reverse_proxy: bool = option(False, "trust X-Forwarded-* from --trusted-proxy addresses")
    trusted_proxy: Names = option(("127.0.0.1/32", "::1/128"), "proxy networks whose X-Forwarded-* are trusted")
    front: str = option(
        "nginx",
        "the proxy in front (--reverse-proxy): which headers it sets itself, the only ones read for the original "
        "request's URI, method, scheme and host (see README, Deployment)",
        choices=("nginx", "ingress-nginx", "traefik", "caddy", "envoy"),
    )
    upstream_timeout: Seconds = option(30.0, "upstream connect + read timeout", low=0.05, high=86400)
    provider_sign_out: bool = option(True, "send browsers to the provider's end_session_endpoint on sign-out")
    oidc_logout_id_token_hint: bool = option(
        False, "keep the ID token to send as id_token_hint at sign-out (Okta needs it; ~0.7 KB more per session)"
    )
    metrics_address: str = option("", "separate host:port for /metrics (default: served on --http-address)")
    workers: int = option(0, "worker processes (0 = one per core; memory store uses 1)", high=256)
    shutdown_timeout: Seconds = option(15.0, "on SIGTERM, wait at most this long for in-flight requests", high=3600)
    log_level: str = option("info", "log level", choices=("debug", "info", "warning", "error"))
    request_logging: bool = option(True, "one JSON log line per request")
    cookie_secret_file: str = option("", "file holding the cookie secret (one fixed secret for every replica)")
    provider_ca_file: Names = option(
        (), "CA certificate files trusted for provider calls instead of the system's (repeatable)",
        aliases=("provider_ca_files",),
    )  # fmt: skip
    ssl_insecure_skip_verify: bool = option(False, "do not verify the provider's TLS certificate (testing only)")
    skip_jwt_bearer_tokens: bool = option(
        False, "accept `Authorization: Bearer <JWT>` from API clients, validated against the provider's keys"
    )
    extra_jwt_issuers: Names = option((), "more bearer JWT issuers as issuer=audience (repeatable)")
    api_route: Patterns = option(
        (), "path regex of API routes: 401 instead of a sign-in redirect (repeatable)", aliases=("api_routes",)
    )
    ping_path: str = option("/ping", "liveness endpoint path")
    ready_path: str = option("/ready", "readiness endpoint path")
    proxy_prefix: str = option("/oauth2", "path prefix of the sidecar's own endpoints (start, callback, auth, ...)")
    real_client_ip_header: str = option(
        "X-Real-IP", "header holding the client IP, read only from --trusted-proxy peers with --reverse-proxy"
    )
    banner: str = option("", "text shown on the sign-in and error pages (HTML-escaped)")
    footer: str = option("", "text shown at the foot of the sign-in and error pages (HTML-escaped)")
    custom_templates_dir: str = option("", "directory with sign_in.html and/or error.html ($placeholders)")
    auth_address: str = option(
        "", "extra host:port serving only /oauth2/auth on a lean listener (nginx auth_request targets)"
    )
    # The OAuth 2.1 authorization server for CLI and MCP clients (sidecar/oauth/).
    oauth_server: bool = option(False, "be the OAuth authorization server for CLI and MCP clients of --oauth-resource")
    oauth_resource: Names = option(
        (),
        "path of an API the sidecar issues tokens for, e.g. /mcp (repeatable); a token works only under its path",
        aliases=("oauth_resources",),
    )
    oauth_issuer: str = option(
        "", "the external origin clients use (https://app.example.com): issuer and resource URIs are built from it "
        "instead of from the front's headers",
    )  # fmt: skip
    oauth_access_token_ttl: Seconds = option(900.0, "lifetime of the access tokens it issues (15m)", low=10, high=86400)
    oauth_refresh_idle_timeout: Seconds = option(
        30 * 86400.0, "a grant whose refresh token is unused this long ends (sliding, 720h)", low=120, high=10 * _YEAR
    )
    oauth_refresh_reuse_seconds: Seconds = option(
        10.0, "a rotated refresh token presented again this soon by the same client gets the first rotation's "
        "answer again (a retry or a concurrent refresh, not a replay); 0 = strict (README, Refresh token reuse)",
        high=60,
    )  # fmt: skip
    oauth_refresh_max_lifetime: Seconds = option(
        365 * 86400.0, "a grant ends this long after its sign-in, used or not (8760h)", low=60, high=10 * _YEAR
    )
    oauth_grants_per_user: int = option(
        20, "most live grants per user; a new one ends the least recently used", low=1, high=10_000
    )
    oauth_client_idle_timeout: Seconds = option(
        30 * 86400.0, "a registered client with no grant and no use this long is forgotten (720h)", low=60,
        high=10 * _YEAR,
    )  # fmt: skip
    oauth_registration_rate_limit: int = option(
        10, "dynamic client registrations per client IP per minute, burst twice that; 0 = no limit", high=1_000_000
    )
    oauth_unused_client_ttl: Seconds = option(
        3600.0, "a registered client no user has granted access to yet is forgotten after this (1h)", low=60,
        high=86400,
    )  # fmt: skip
    oauth_unused_clients_max: int = option(
        1000, "registered clients waiting for their first grant, across all replicas; when full, a new one forgets "
        "the oldest of the network holding the most (README, Anonymous load)", low=1, high=1_000_000,
    )  # fmt: skip
    oauth_unused_clients_per_network: int = option(
        20, "registered clients waiting for their first grant from one network (an IPv4 /24, an IPv6 /48); a new "
        "one from a network holding this many forgets that network's oldest", low=1, high=1_000_000,
    )  # fmt: skip
    oauth_token_rate_limit: int = option(
        60, "token requests (/oauth2/token: codes, refreshes, device polls) per client IP per minute, burst twice "
        "that; 0 = no limit", high=1_000_000,
    )  # fmt: skip
    oauth_revocation_rate_limit: int = option(
        60, "revocation requests (/oauth2/revoke) per client IP per minute, burst twice that; 0 = no limit. A budget "
        "of its own: revoking many tokens never holds up a refresh from the same address", high=1_000_000,
    )  # fmt: skip
    oauth_device_code_ttl: Seconds = option(600.0, "how long a device code waits for the user (10m)", low=60, high=3600)
    oauth_device_poll_interval: Seconds = option(
        5.0, "least seconds between a device's token polls (RFC 8628 interval)", low=1, high=60
    )
    oauth_client_metadata_documents: bool = option(
        False,
        "accept https URLs as client_id (Client ID Metadata Documents): the sidecar then fetches those documents "
        "from the internet when asked to authorize; public addresses only unless the host is listed",
    )
    oauth_client_metadata_hosts: Names = option(
        (), "accept metadata documents only from these hosts, as the URL writes them (example.com, 10.0.0.5, "
        "[fd00::5]; repeatable); a listed host may resolve to a private address (an internal client registry)",
    )  # fmt: skip
    oauth_client_metadata_ca_file: Names = option(
        (), "CA certificate files trusted for metadata document fetches in addition to the system's (repeatable)",
    )  # fmt: skip

    # Derived once from the options above by build_config.
    cookie_secrets: tuple[bytes, ...] = derived_field(())
    upstreams: tuple[Upstream, ...] = derived_field(())
    skip_routes: tuple[Route, ...] = derived_field(())
    fresh_routes: tuple[FreshRoute, ...] = derived_field(())
    redirect_hosts: tuple[HostRule, ...] = derived_field(())
    email_domains: tuple[DomainRule, ...] = derived_field(())
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = derived_field(())
    listen_host: str = derived_field("")
    listen_port: int = derived_field(0)
    metrics_host: str | None = derived_field(None)
    metrics_port: int | None = derived_field(None)
    cookie_domains: tuple[str, ...] = derived_field(())  # normalised, longest first
    api_routes: tuple[re.Pattern[str], ...] = derived_field(())
    jwt_issuers: tuple[tuple[str, str], ...] = derived_field(())  # (issuer, audience) of --extra-jwt-issuers
    provider_ssl: ssl.SSLContext | bool | None = derived_field(None)  # None: system trust; False: not verified
    pages: PageTemplates = derived_field(DEFAULT_TEMPLATES)
    oauth_resources: tuple[str, ...] = derived_field(())  # --oauth-resource paths, longest first
    # system trust + --oauth-client-metadata-ca-file
    oauth_client_metadata_ssl: ssl.SSLContext | None = derived_field(None)
    auth_host: str | None = derived_field(None)
    auth_port: int | None = derived_field(None)

    def options(self) -> dict[str, Any]:
        """The option values (not the derived ones), as ``build_config`` takes them."""
        return {opt.attr: getattr(self, opt.attr) for opt in OPTIONS}

    def replace(self, **changes: Any) -> Config:
        """A new Config with some settings changed, checked again (tests and the dev runner use this)."""
        return build_config({**self.options(), **changes})

    def public(self) -> dict[str, Any]:
        """The settings with every secret masked: for the start-up log line and ``repr``."""
        return {opt.attr: opt.shown(getattr(self, opt.attr)) for opt in OPTIONS}

    def __repr__(self) -> str:
        return f"Config({self.public()})"


OPTIONS: tuple[Option, ...] = options_of(Config)
BY_ATTR: dict[str, Option] = {opt.attr: opt for opt in OPTIONS}


def build_config(raw: Mapping[str, Any]) -> Config:
    """Validate raw settings (attr -> value, already merged by precedence) into a Config."""
    problems = [f"--{name.replace('_', '-')}: unknown option" for name in sorted(set(raw) - set(BY_ATTR))]
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        try:
            values[opt.attr] = opt.convert(raw[opt.attr]) if opt.attr in raw else opt.default
        except (ValueError, TypeError) as exc:
            detail = "invalid value" if opt.secret else str(exc)
            problems.append(f"--{opt.name}: {detail}")
            values[opt.attr] = opt.default
    if values["cookie_secret_file"] and not values["cookie_secret"]:
        values["cookie_secret"] = secret_file(values["cookie_secret_file"], "cookie-secret-file", problems)
    if values["client_secret_file"] and not values["client_secret"]:
        try:
            with open(values["client_secret_file"], encoding="utf-8") as fh:
                values["client_secret"] = fh.read().strip()
        except OSError as exc:
            problems.append(f"--client-secret-file: cannot read it ({exc.strerror})")
    check_fields(values, problems)
    share = values["oauth_unused_clients_per_network"]  # left at its default, it never binds a smaller pool
    if share != BY_ATTR["oauth_unused_clients_per_network"].default and share > values["oauth_unused_clients_max"]:
        problems.append("--oauth-unused-clients-per-network: must not exceed --oauth-unused-clients-max")
    derived: dict[str, Any] = {
        "upstreams": collect(problems, parse_upstream, values["upstream"]),
        "skip_routes": collect(problems, skip_route, values["skip_auth_route"]),
        "fresh_routes": collect(
            problems, parse_fresh_route, values["fresh_auth_route"], "fresh-auth-route", parse_duration
        ),
        "redirect_hosts": collect(problems, parse_host_rule, values["whitelist_domain"]),
        "email_domains": collect(problems, parse_domain_rule, values["email_domain"]),
        "trusted_networks": collect(problems, network, values["trusted_proxy"]),
        **migration_derived(values, problems),
        "oauth_resources": oauth_resources(values, problems),
        "oauth_client_metadata_ssl": client_metadata_ssl(values, problems),
    }
    for attr, key in (("http_address", "listen"), ("metrics_address", "metrics"), ("auth_address", "auth")):
        if values[attr] or attr == "http_address":
            try:
                derived[key + "_host"], derived[key + "_port"] = split_hostport(values[attr], BY_ATTR[attr].name)
            except ConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    if values["workers"] == 0:
        values["workers"] = 1 if values["session_store_type"] == "memory" else (os.cpu_count() or 1)
    derived["upstreams"] = tuple(sorted(derived["upstreams"], key=lambda u: len(u.prefix), reverse=True))
    derived["cookie_secrets"] = tuple(s.encode() for s in values["cookie_secret"])
    return Config(**values, **derived)
