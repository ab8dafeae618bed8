"""The one settings object: a typed, frozen dataclass whose fields are the options.

Every option is one field below; its flag, its ``SIDECAR_*`` variable, its TOML key and its
``--help`` line all come from that field (``config_load.py`` reads them). Values are checked
here, every problem is collected, and start-up stops with exit code 2 listing them all: the
sidecar never runs half configured, and never accepts a setting it then ignores.

Field annotations name how a value is read: ``Seconds`` is a Go-style duration, ``Names`` a
list that may be comma-separated, ``Patterns`` a list of regexes that is never split.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError
from .rules import DomainRule, HostRule, Route, parse_domain_rule, parse_host_rule, parse_route, valid_hostname
from .stepup import FreshRoute, parse_fresh_route
from .templates import DEFAULT_TEMPLATES, PageTemplates, load_templates

Seconds = float
Names = tuple[str, ...]
Patterns = tuple[str, ...]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
_YEAR = 366 * 86400.0
_IDLE_FLOOR = 120.0  # sessions.py writes "last active" once a minute: an idle timeout must leave room for that


def parse_duration(text: str) -> float:
    """Seconds from ``"90"``, ``"30m"``, ``"168h"`` or ``"1h30m"`` (Go style, as oauth2-proxy)."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {text!r} (use seconds or units like 30m, 168h)")
    return total


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on", "t"):
        return True
    if lowered in ("0", "false", "no", "off", "f"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false/1/0)")


def option(
    default: Any,
    help: str,  # noqa: A002 - the --help text
    *,
    secret: bool = False,
    aliases: tuple[str, ...] = (),
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] = (),
) -> Any:
    """A settings field; ``aliases`` are other accepted names (oauth2-proxy's plural spellings)."""
    meta = {"help": help, "secret": secret, "aliases": aliases, "low": low, "high": high, "choices": choices}
    return field(default=default, metadata=meta)


def _derived(default: Any) -> Any:
    return field(default=default, repr=False, compare=False)


@dataclass(frozen=True)
class Upstream:
    prefix: str  # path prefix this upstream serves, always starts with "/"
    url: str  # scheme://host[:port] of the upstream, no path


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
        1000, "registered clients waiting for their first grant, across all replicas; more are refused (429)", low=1,
        high=1_000_000,
    )  # fmt: skip
    oauth_token_rate_limit: int = option(
        60, "token, device and revocation requests per client IP per minute, burst twice that; 0 = no limit",
        high=1_000_000,
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
    cookie_secrets: tuple[bytes, ...] = _derived(())
    upstreams: tuple[Upstream, ...] = _derived(())
    skip_routes: tuple[Route, ...] = _derived(())
    fresh_routes: tuple[FreshRoute, ...] = _derived(())
    redirect_hosts: tuple[HostRule, ...] = _derived(())
    email_domains: tuple[DomainRule, ...] = _derived(())
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _derived(())
    listen_host: str = _derived("")
    listen_port: int = _derived(0)
    metrics_host: str | None = _derived(None)
    metrics_port: int | None = _derived(None)
    cookie_domains: tuple[str, ...] = _derived(())  # normalised, longest first
    api_routes: tuple[re.Pattern[str], ...] = _derived(())
    jwt_issuers: tuple[tuple[str, str], ...] = _derived(())  # (issuer, audience) of --extra-jwt-issuers
    provider_ssl: ssl.SSLContext | bool | None = _derived(None)  # None: system trust; False: not verified
    pages: PageTemplates = _derived(DEFAULT_TEMPLATES)
    oauth_resources: tuple[str, ...] = _derived(())  # --oauth-resource paths, longest first
    oauth_client_metadata_ssl: ssl.SSLContext | None = _derived(None)  # system trust + --oauth-client-metadata-ca-file
    auth_host: str | None = _derived(None)
    auth_port: int | None = _derived(None)

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


@dataclass(frozen=True)
class Option:
    """One option as the loaders see it, read off a ``Config`` field."""

    attr: str
    kind: str  # str | bool | int | duration | names | patterns
    default: Any
    help: str
    secret: bool
    aliases: tuple[str, ...]
    low: float | None
    high: float | None
    choices: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.attr.replace("_", "-")

    @property
    def env(self) -> str:
        return "SIDECAR_" + self.attr.upper()

    def shown(self, value: Any) -> Any:
        """The value as it may appear in a log line: secrets hidden, passwords cut out of URLs."""
        if not self.secret or not value:
            return value
        if self.attr.startswith("redis_") and "url" in self.attr:
            return tuple(mask_url(v) for v in value) if isinstance(value, tuple) else mask_url(value)
        return "<hidden>"

    def convert(self, raw: Any) -> Any:
        """A raw flag, env or TOML value (or an already converted one) as this option's type."""
        if self.kind in ("names", "patterns"):
            items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
            if not all(isinstance(item, str) for item in items):
                raise ValueError("expected text or a list of text")
            if self.kind == "names" and not isinstance(raw, (list, tuple)):
                items = items[0].split(",")
            return tuple(item.strip() for item in items if item.strip())
        if self.kind == "bool":
            return raw if isinstance(raw, bool) else parse_bool(str(raw))
        if self.kind == "int":
            value = raw if isinstance(raw, int) and not isinstance(raw, bool) else int(str(raw).strip())
            return self._bounded(value)
        if self.kind == "duration":
            if isinstance(raw, bool):
                raise ValueError(f"not a duration: {raw!r}")
            return self._bounded(float(raw) if isinstance(raw, (int, float)) else parse_duration(str(raw)))
        if not isinstance(raw, str):
            raise ValueError(f"expected text, got {type(raw).__name__}")
        if self.choices and raw.strip().lower() not in self.choices:
            shown = ", ".join(repr(c) for c in self.choices)
            raise ValueError(f"must be one of {shown}, got {raw!r}")
        return raw.strip().lower() if self.choices else raw

    def _bounded(self, value: float) -> Any:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        low = 0.0 if self.low is None else self.low
        if value < low or (self.high is not None and value > self.high):
            high = "" if self.high is None else f" and at most {self.high:g}"
            raise ValueError(f"must be at least {low:g}{high}, got {value:g}")
        return value


_KINDS = {"str": "str", "bool": "bool", "int": "int", "Seconds": "duration", "Names": "names", "Patterns": "patterns"}


def _options() -> tuple[Option, ...]:
    out = []
    for f in dataclasses.fields(Config):
        if "help" in f.metadata:
            m = f.metadata
            out.append(
                Option(
                    f.name,
                    _KINDS[str(f.type)],
                    f.default,
                    m["help"],
                    m["secret"],
                    m["aliases"],
                    m["low"],
                    m["high"],
                    m["choices"],
                )  # fmt: skip
            )
    return tuple(out)


OPTIONS: tuple[Option, ...] = _options()
BY_ATTR: dict[str, Option] = {opt.attr: opt for opt in OPTIONS}


def mask_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``: passwords never reach a log or error."""
    try:
        parts = urlsplit(url if "//" in url else "redis://" + url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _split_hostport(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--{option}: expected host:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parse_upstream(text: str) -> Upstream:
    parts = urlsplit(text)
    if parts.username is not None or parts.password is not None:
        raise ConfigError("--upstream: user info in an upstream URL is not supported (it would be logged)")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"--upstream: expected an http(s) URL without query, got {text!r}")
    return Upstream(prefix=parts.path or "/", url=f"{parts.scheme}://{parts.netloc}")


def _check(v: Mapping[str, Any], problems: list[str]) -> None:
    """Cross-field rules; each problem names its option."""

    def need(attr: str, why: str) -> None:
        if not v[attr]:
            problems.append(f"--{BY_ATTR[attr].name}: {why}")

    need("oidc_issuer_url", "required (the provider's issuer URL)")
    need("client_id", "required")
    need("redirect_url", "required (e.g. https://app.example.com/oauth2/callback)")
    need("email_domain", "required: the email domains allowed in, or '*' for any address (as oauth2-proxy)")
    for attr in ("oidc_issuer_url", "redirect_url"):
        if attr == "redirect_url" and _relative_path(v[attr]):
            continue  # built per request from the host the browser used
        if v[attr] and urlsplit(v[attr]).scheme not in ("http", "https"):
            problems.append(f"--{BY_ATTR[attr].name}: must be an http(s) URL, got {v[attr]!r}")
    if not v["cookie_secret"]:
        problems.append("--cookie-secret: required (at least 16 random bytes, e.g. `openssl rand -base64 32`)")
    elif any(len(s.encode()) < 16 for s in v["cookie_secret"]):
        problems.append("--cookie-secret: too short (need at least 16 bytes)")
    if v["cookie_samesite"] == "none" and not v["cookie_secure"]:
        problems.append("--cookie-samesite: 'none' requires --cookie-secure")
    if v["redis_use_sentinel"]:
        need("redis_sentinel_master_name", "required with --redis-use-sentinel")
        need("redis_sentinel_connection_urls", "required with --redis-use-sentinel")
    if v["redis_use_cluster"]:
        need("redis_cluster_connection_urls", "required with --redis-use-cluster")
        if v["redis_use_sentinel"]:
            problems.append("--redis-use-cluster: cannot be combined with --redis-use-sentinel")
    url = v["redis_connection_url"]
    if v["session_store_type"] == "redis" and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        problems.append(
            f"--redis-connection-url: must start with redis://, rediss:// or unix://, got {mask_url(url)!r}"
        )
    if v["front"] != "nginx" and not v["reverse_proxy"]:
        problems.append(f"--front: {v['front']} is only read with --reverse-proxy; set it too")
    if 0 < v["session_idle_timeout"] < _IDLE_FLOOR:
        problems.append(
            f"--session-idle-timeout: at least {_IDLE_FLOOR:g}s (last activity is recorded once a minute), or 0 "
            f"for never; got {v['session_idle_timeout']:g}s"
        )
    if v["session_store_type"] == "memory" and v["workers"] > 1:
        problems.append(
            "--workers: the memory store lives in one process; use --session-store-type redis for more workers"
        )


def _collect(problems: list[str], parse: Any, items: tuple[str, ...], *args: Any) -> tuple[Any, ...]:
    out = []
    for item in items:
        try:
            out.append(parse(item, *args))
        except ConfigError as exc:
            problems.append(str(exc))
    return tuple(out)


def _skip_route(text: str) -> Route:
    return parse_route(text, "skip-auth-route", refuse_match_all=True)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"--trusted-proxy: not an IP network: {text!r}") from None


def _relative_path(text: str) -> bool:
    """A path such as ``/oauth2/callback``: the sidecar adds the request's scheme and host."""
    return text.startswith("/") and not text.startswith("//") and "\\" not in text and "?" not in text


def _secret_file(path: str, option_name: str, problems: list[str]) -> tuple[str, ...]:
    """A secret read from a file (a mounted Kubernetes or Docker secret); a comma list rotates, as the flag."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"--{option_name}: cannot read it ({getattr(exc, 'strerror', None) or 'not text'})")
        return ()
    secrets = tuple(part.strip() for part in text.split(",") if part.strip())
    if not secrets:
        problems.append(f"--{option_name}: the file is empty")
    return secrets


def _path_option(value: str, option_name: str, problems: list[str]) -> None:
    """Endpoint paths and the prefix: absolute, no trailing slash, nothing a router would read otherwise."""
    if not value.startswith("/") or value.startswith("//") or (value.endswith("/") and value != "/"):
        problems.append(f"--{option_name}: must start with / and not end with /, got {value!r}")
    elif not re.fullmatch(r"[A-Za-z0-9._~/-]+", value):
        problems.append(f"--{option_name}: only letters, digits and . _ ~ - / are allowed, got {value!r}")


def _cookie_domains(values: Mapping[str, Any], problems: list[str]) -> tuple[str, ...]:
    out = []
    for text in values["cookie_domain"]:
        domain = text.strip().lower().lstrip(".")
        if not valid_hostname(domain) or "." not in domain.strip("."):
            problems.append(f"--cookie-domain: not a domain: {text!r}")
        else:
            out.append(domain)
    return tuple(sorted(set(out), key=len, reverse=True))


def _jwt_issuers(values: Mapping[str, Any], problems: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for text in values["extra_jwt_issuers"]:
        issuer, sep, audience = text.partition("=")
        if not sep or not audience.strip() or urlsplit(issuer.strip()).scheme not in ("http", "https"):
            problems.append(f"--extra-jwt-issuers: expected issuer-url=audience, got {text!r}")
        else:
            out.append((issuer.strip(), audience.strip()))
    if out and not values["skip_jwt_bearer_tokens"]:
        problems.append("--extra-jwt-issuers: only used with --skip-jwt-bearer-tokens; set it too")
    return tuple(out)


def _api_routes(values: Mapping[str, Any], problems: list[str]) -> tuple[re.Pattern[str], ...]:
    out = []
    for text in values["api_route"]:
        try:
            out.append(re.compile(text))
        except re.error as exc:
            problems.append(f"--api-route: not a regular expression: {text!r} ({exc})")
    return tuple(out)


def _provider_ssl(values: Mapping[str, Any], problems: list[str]) -> ssl.SSLContext | bool | None:
    """TLS for provider calls: the listed CA files only (an internal IdP), or no verification at all."""
    if values["ssl_insecure_skip_verify"]:
        return False
    if not values["provider_ca_file"]:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    for path in values["provider_ca_file"]:
        try:
            context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"--provider-ca-file: cannot load {path!r} ({getattr(exc, 'strerror', None) or exc})")
    return context


def _migration_derived(values: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """Values derived from the options oauth2-proxy users bring along."""
    for attr in ("proxy_prefix", "ping_path", "ready_path"):
        _path_option(values[attr], BY_ATTR[attr].name, problems)
    prefix = values["proxy_prefix"].rstrip("/") + "/"
    for attr in ("ping_path", "ready_path"):
        if values[attr].startswith(prefix) or values[attr] + "/" == prefix:
            problems.append(f"--{BY_ATTR[attr].name}: {values[attr]!r} is under --proxy-prefix; choose another path")
    if values["ping_path"] == values["ready_path"]:
        problems.append("--ready-path: must differ from --ping-path")
    if len(values["banner"]) > 4096 or len(values["footer"]) > 4096:
        problems.append("--banner/--footer: at most 4096 characters each")
    header = values["real_client_ip_header"]
    if not re.fullmatch(r"[A-Za-z0-9-]+", header):
        problems.append(f"--real-client-ip-header: not a header name: {header!r}")
    try:
        pages = load_templates(values["custom_templates_dir"], values["banner"], values["footer"])
    except ConfigError as exc:
        problems.append(str(exc))
        pages = DEFAULT_TEMPLATES
    return {
        "cookie_domains": _cookie_domains(values, problems),
        "api_routes": _api_routes(values, problems),
        "jwt_issuers": _jwt_issuers(values, problems),
        "provider_ssl": _provider_ssl(values, problems),
        "pages": pages,
    }


def _oauth_resources(values: Mapping[str, Any], problems: list[str]) -> tuple[str, ...]:
    """Resource paths: absolute, distinct, none inside another (a token's audience is one path and
    everything under it), none over the sidecar's own endpoints or ``/.well-known``."""
    paths = values["oauth_resource"]
    if paths and not values["oauth_server"]:
        problems.append("--oauth-resource: only used with --oauth-server; set it too")
    if values["oauth_server"] and not paths:
        problems.append("--oauth-server: name at least one --oauth-resource path (e.g. /mcp)")
    _oauth_issuer(values, problems)
    if values["oauth_refresh_idle_timeout"] > values["oauth_refresh_max_lifetime"]:
        problems.append("--oauth-refresh-idle-timeout: must not exceed --oauth-refresh-max-lifetime")
    reserved = (values["proxy_prefix"], "/.well-known", values["ping_path"], values["ready_path"])
    out: list[str] = []
    for path in paths:
        before = len(problems)
        _path_option(path, "oauth-resource", problems)
        if len(problems) != before:
            continue
        if path == "/" or any(_nested(path, other) for other in reserved):
            problems.append(f"--oauth-resource: {path!r} overlaps the sidecar's own paths; choose another")
        elif any(_nested(path, other) for other in out):
            problems.append(f"--oauth-resource: {path!r} overlaps another resource path; a token must have one")
        else:
            out.append(path)
    return tuple(sorted(out, key=len, reverse=True))


def _oauth_issuer(values: Mapping[str, Any], problems: list[str]) -> None:
    """An origin only (the endpoints live under it at --proxy-prefix); a URL with a path, query or user would
    be an issuer no client can reach."""
    issuer = values["oauth_issuer"]
    everyone = any(net.prefixlen == 0 for net in _collect([], _network, values["trusted_proxy"]))
    if values["oauth_server"] and values["reverse_proxy"] and not issuer and everyone:
        problems.append(
            "--trusted-proxy: trusting every address lets any client name the issuer and the tokens' "
            "audience; name the front's networks, or set --oauth-issuer"
        )
    if not issuer:
        return
    if not values["oauth_server"]:
        problems.append("--oauth-issuer: only used with --oauth-server; set it too")
    if not _is_origin(issuer):
        problems.append(
            f"--oauth-issuer: expected an origin such as https://app.example.com (lower case, no default port), "
            f"got {issuer!r}"
        )


_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::([1-9][0-9]{0,4}))?/?")


def _is_origin(text: str) -> bool:
    """``scheme://host[:port]`` exactly as a browser writes an origin: lower case, no default port, nothing
    else (a ``#``, ``?``, ``;``, escape or space would give an issuer and audience no request ever matches)."""
    found = _ORIGIN.fullmatch(text)
    if found is None:
        return False
    scheme, host, port = found.groups()
    if port is not None and (int(port) > 65535 or int(port) == (443 if scheme == "https" else 80)):
        return False
    if host.startswith("["):
        try:
            return ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            return False
    return valid_hostname(host) and not host.endswith(".")


def _client_metadata_ssl(values: Mapping[str, Any], problems: list[str]) -> ssl.SSLContext | None:
    """TLS for Client ID Metadata Document fetches: the system's trust plus the listed CA files (public clients
    keep working when an internal registry's CA is added). Hosts are checked here; the switch must be on for
    either list (a setting is never accepted and then ignored)."""
    if not values["oauth_client_metadata_documents"]:
        for attr in ("oauth_client_metadata_hosts", "oauth_client_metadata_ca_file"):
            if values[attr]:
                problems.append(f"--{BY_ATTR[attr].name}: only used with --oauth-client-metadata-documents; set it too")
        return None
    if not values["oauth_server"]:
        problems.append("--oauth-client-metadata-documents: only used with --oauth-server; set it too")
    for host in values["oauth_client_metadata_hosts"]:
        if not _metadata_host(host):
            problems.append(f"--oauth-client-metadata-hosts: {host!r} is not a lower-case host name or IP address")
    context = ssl.create_default_context()  # verifies the chain and the host name
    for path in values["oauth_client_metadata_ca_file"]:
        try:
            context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            detail = getattr(exc, "strerror", None) or exc
            problems.append(f"--oauth-client-metadata-ca-file: cannot load {path!r} ({detail})")
    return context


def _metadata_host(host: str) -> bool:
    """A host as it appears in a client_id URL: a lower-case DNS name, an IPv4 literal or a bracketed IPv6 one."""
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])) == host[1:-1]  # the canonical spelling the URL must use
        except ValueError:
            return False
    return host == host.lower() and valid_hostname(host)


def _nested(a: str, b: str) -> bool:
    """Is one of the two paths the other or under it (``/api`` and ``/api/v2``, not ``/api2``)?"""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


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
        values["cookie_secret"] = _secret_file(values["cookie_secret_file"], "cookie-secret-file", problems)
    if values["client_secret_file"] and not values["client_secret"]:
        try:
            with open(values["client_secret_file"], encoding="utf-8") as fh:
                values["client_secret"] = fh.read().strip()
        except OSError as exc:
            problems.append(f"--client-secret-file: cannot read it ({exc.strerror})")
    _check(values, problems)
    derived: dict[str, Any] = {
        "upstreams": _collect(problems, _parse_upstream, values["upstream"]),
        "skip_routes": _collect(problems, _skip_route, values["skip_auth_route"]),
        "fresh_routes": _collect(
            problems, parse_fresh_route, values["fresh_auth_route"], "fresh-auth-route", parse_duration
        ),
        "redirect_hosts": _collect(problems, parse_host_rule, values["whitelist_domain"]),
        "email_domains": _collect(problems, parse_domain_rule, values["email_domain"]),
        "trusted_networks": _collect(problems, _network, values["trusted_proxy"]),
        **_migration_derived(values, problems),
        "oauth_resources": _oauth_resources(values, problems),
        "oauth_client_metadata_ssl": _client_metadata_ssl(values, problems),
    }
    for attr, key in (("http_address", "listen"), ("metrics_address", "metrics"), ("auth_address", "auth")):
        if values[attr] or attr == "http_address":
            try:
                derived[key + "_host"], derived[key + "_port"] = _split_hostport(values[attr], BY_ATTR[attr].name)
            except ConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    if values["workers"] == 0:
        values["workers"] = 1 if values["session_store_type"] == "memory" else (os.cpu_count() or 1)
    derived["upstreams"] = tuple(sorted(derived["upstreams"], key=lambda u: len(u.prefix), reverse=True))
    derived["cookie_secrets"] = tuple(s.encode() for s in values["cookie_secret"])
    return Config(**values, **derived)
