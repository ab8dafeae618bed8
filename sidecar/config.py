"""The one settings object, built once at start-up from flags, env and a TOML file.

Every option is declared once in ``OPTIONS``; the flag, the ``SIDECAR_*``
environment variable, the TOML key and the ``--help`` line all come from that
entry. Flags beat environment, environment beats file, file beats default.
Every problem is collected and reported together, one line each, and start-up
stops with exit code 2: the sidecar never runs half configured.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``"90"``, ``"30m"``, ``"168h"`` or ``"1h30m"`` (Go style, as oauth2-proxy)."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pos, total = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(f"not a duration: {text!r} (use seconds or units like 30m, 168h)") from None
        return total
    if value < 0:
        raise ValueError("must not be negative")
    return value


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on", "t"):
        return True
    if lowered in ("0", "false", "no", "off", "f"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false/1/0)")


def parse_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


@dataclass(frozen=True)
class Option:
    name: str  # flag name without dashes, e.g. "cookie-secret"
    kind: str  # str | bool | int | duration | list
    default: Any
    help: str
    secret: bool = False

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "SIDECAR_" + self.attr.upper()

    def convert(self, raw: Any) -> Any:
        """Turn a raw flag/env/TOML value into the option's type, or raise ValueError."""
        if self.kind == "list":
            items = [str(v) for v in raw] if isinstance(raw, list) else [str(raw)]
            out: list[str] = []
            for item in items:
                out.extend(part.strip() for part in item.split(",") if part.strip())
            return tuple(out)
        if self.kind == "bool":
            return raw if isinstance(raw, bool) else parse_bool(str(raw))
        if self.kind == "int":
            return raw if isinstance(raw, int) and not isinstance(raw, bool) else parse_int(str(raw))
        if self.kind == "duration":
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                return parse_duration(str(raw))
            return parse_duration(str(raw))
        return str(raw)


OPTIONS: tuple[Option, ...] = (
    Option("http-address", "str", "127.0.0.1:4180", "host:port to listen on"),
    Option("upstream", "list", (), "upstream URL; its path is the prefix it serves (repeatable)"),
    Option("provider", "str", "oidc", "identity provider type (only 'oidc')"),
    Option("oidc-issuer-url", "str", "", "OpenID Connect issuer URL (discovery)"),
    Option("client-id", "str", "", "OAuth client id"),
    Option("client-secret", "str", "", "OAuth client secret", secret=True),
    Option("client-secret-file", "str", "", "file holding the client secret"),
    Option("redirect-url", "str", "", "callback URL, e.g. https://app.example.com/oauth2/callback"),
    Option(
        "scope",
        "str",
        "openid email profile",
        "scopes to request (add offline_access if the provider needs it for refresh tokens)",
    ),
    Option("oidc-email-claim", "str", "email", "claim holding the email"),
    Option("oidc-groups-claim", "str", "groups", "claim holding the groups"),
    Option("user-id-claim", "str", "sub", "claim used as the user name when there is no email"),
    Option("oidc-extra-audience", "list", (), "extra accepted ID token audiences (repeatable)"),
    Option("insecure-oidc-allow-unverified-email", "bool", False, "accept email_verified=false"),
    Option("cookie-name", "str", "_sidecar", "session cookie name"),
    Option(
        "cookie-secret",
        "list",
        (),
        "cookie signing secret, >= 16 bytes; comma list to rotate, newest first",
        secret=True,
    ),
    Option("cookie-domain", "str", "", "cookie Domain attribute"),
    Option("cookie-path", "str", "/", "cookie Path attribute"),
    Option("cookie-secure", "bool", True, "cookie Secure attribute"),
    Option("cookie-httponly", "bool", True, "cookie HttpOnly attribute"),
    Option("cookie-samesite", "str", "lax", "cookie SameSite: lax, strict, none or ''"),
    Option("cookie-expire", "duration", 604800.0, "absolute session lifetime and cookie Max-Age (168h)"),
    Option("cookie-refresh", "duration", 0.0, "refresh the access token once it is this old (0 = only on expiry)"),
    Option("session-idle-timeout", "duration", 86400.0, "sign out a session unused this long (24h; 0 = never)"),
    Option("refresh-token-ttl", "duration", 2592000.0, "refresh-token lifetime when the provider does not say (720h)"),
    Option("refresh-skew", "duration", 30.0, "refresh this long before the access token expires"),
    Option("refresh-wait-timeout", "duration", 15.0, "longest a request waits for another's refresh before 503"),
    Option("provider-timeout", "duration", 5.0, "timeout of one call to the provider"),
    Option("provider-retries", "int", 2, "retries of a failed provider call (with backoff)"),
    Option("session-store-type", "str", "memory", "session store: memory (one process) or redis"),
    Option("redis-connection-url", "str", "redis://127.0.0.1:6379/0", "redis://, rediss:// or unix:// URL"),
    Option("redis-use-sentinel", "bool", False, "find the Redis master through Sentinel"),
    Option("redis-sentinel-master-name", "str", "", "Sentinel master name"),
    Option("redis-sentinel-connection-urls", "list", (), "Sentinel URLs (repeatable)"),
    Option("redis-sentinel-password", "str", "", "password for the Sentinels themselves", secret=True),
    Option("redis-use-cluster", "bool", False, "use Redis Cluster"),
    Option("redis-cluster-connection-urls", "list", (), "Redis Cluster node URLs (repeatable)"),
    Option("redis-timeout", "duration", 2.0, "timeout of one Redis command"),
    Option("session-cache-ttl", "duration", 1.0, "how long a replica trusts its cached copy of a session (max 1s)"),
    Option("email-domain", "list", ("*",), "allowed email domains, '*' for any (repeatable)"),
    Option("allowed-group", "list", (), "allowed groups; empty allows any (repeatable)"),
    Option("set-xauthrequest", "bool", True, "set X-Auth-Request-* headers on /oauth2/auth and proxied requests"),
    Option("pass-user-headers", "bool", True, "send X-Forwarded-User/-Email/-Groups to the upstream"),
    Option("pass-access-token", "bool", False, "send X-Forwarded-Access-Token / X-Auth-Request-Access-Token"),
    Option("pass-authorization-header", "bool", False, "send Authorization: Bearer <access token> upstream"),
    Option("skip-auth-route", "list", (), "[METHOD=]path-regex served without auth (repeatable)"),
    Option("whitelist-domain", "list", (), "hosts allowed in rd redirects; '.example.com' for subdomains (repeatable)"),
    Option("reverse-proxy", "bool", False, "trust X-Forwarded-* from --trusted-proxy addresses"),
    Option("trusted-proxy", "list", ("127.0.0.1/32", "::1/128"), "proxy networks whose X-Forwarded-* are trusted"),
    Option("upstream-timeout", "duration", 30.0, "upstream connect + read timeout"),
    Option("provider-sign-out", "bool", True, "send browsers to the provider's end_session_endpoint on sign-out"),
    Option(
        "oidc-logout-id-token-hint",
        "bool",
        False,
        "keep the ID token to send as id_token_hint at sign-out (Okta needs it; ~0.7 KB more per session)",
    ),
    Option("metrics-address", "str", "", "separate host:port for /metrics (default: served on --http-address)"),
    Option("workers", "int", 0, "worker processes (0 = one per core; memory store uses 1)"),
    Option("shutdown-timeout", "duration", 15.0, "on SIGTERM, wait this long for in-flight requests"),
    Option("log-level", "str", "info", "debug, info, warning or error"),
    Option("request-logging", "bool", True, "one JSON log line per request"),
)

_BY_ATTR = {opt.attr: opt for opt in OPTIONS}


@dataclass(frozen=True)
class Upstream:
    prefix: str  # path prefix this upstream serves, always starts with "/"
    url: str  # scheme://host[:port] of the upstream, no path


@dataclass(frozen=True)
class SkipRoute:
    method: str | None
    pattern: re.Pattern[str]

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and bool(self.pattern.search(path))


@dataclass(frozen=True)
class Config:
    """Every setting, validated and typed. Attribute names are the option names in snake case."""

    values: Mapping[str, Any]
    cookie_secrets: tuple[bytes, ...]
    upstreams: tuple[Upstream, ...]
    skip_routes: tuple[SkipRoute, ...]
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    listen_host: str
    listen_port: int
    metrics_host: str | None = None
    metrics_port: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Plain instance attributes: settings are read on every request, so no __getattr__ detour.
        for key, value in self.values.items():
            object.__setattr__(self, key, value)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "values")
        try:
            return values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        shown = {k: ("<hidden>" if _BY_ATTR[k].secret and v else v) for k, v in self.values.items()}
        return f"Config({shown})"

    def replace(self, **changes: Any) -> Config:
        """A new Config with some raw settings changed (tests and the dev runner use this)."""
        merged = dict(self.values)
        merged.update(changes)
        return build_config(merged)


def _split_hostport(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--{option}: expected host:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parse_upstream(text: str) -> Upstream:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--upstream: expected an http(s) URL, got {text!r}")
    prefix = parts.path or "/"
    return Upstream(prefix=prefix, url=f"{parts.scheme}://{parts.netloc}")


def _parse_skip_route(text: str) -> SkipRoute:
    method, sep, pattern = text.partition("=")
    if not sep or not method.isalpha() or not method.isupper():
        method, pattern = "", text
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--skip-auth-route: bad regex {pattern!r}: {exc}") from None
    return SkipRoute(method=method or None, pattern=compiled)


def _check(values: dict[str, Any], problems: list[str]) -> None:
    """Cross-field rules; each problem names its option."""

    def need(attr: str, why: str) -> None:
        if not values[attr]:
            problems.append(f"--{_BY_ATTR[attr].name}: {why}")

    if values["provider"] != "oidc":
        problems.append(f"--provider: unsupported {values['provider']!r} (only 'oidc')")
    need("oidc_issuer_url", "required (the provider's issuer URL)")
    need("client_id", "required")
    need("redirect_url", "required (e.g. https://app.example.com/oauth2/callback)")
    for attr in ("oidc_issuer_url", "redirect_url"):
        url = values[attr]
        if url and urlsplit(url).scheme not in ("http", "https"):
            problems.append(f"--{_BY_ATTR[attr].name}: must be an http(s) URL, got {url!r}")
    if not values["cookie_secret"]:
        problems.append("--cookie-secret: required (at least 16 random bytes, e.g. `openssl rand -base64 32`)")
    for secret in values["cookie_secret"]:
        if len(secret.encode()) < 16:
            problems.append("--cookie-secret: too short (need at least 16 bytes)")
            break
    if values["session_store_type"] not in ("memory", "redis"):
        problems.append(f"--session-store-type: must be memory or redis, got {values['session_store_type']!r}")
    if values["cookie_samesite"].lower() not in ("lax", "strict", "none", ""):
        problems.append(f"--cookie-samesite: must be lax, strict, none or '', got {values['cookie_samesite']!r}")
    if values["cookie_samesite"].lower() == "none" and not values["cookie_secure"]:
        problems.append("--cookie-samesite: 'none' requires --cookie-secure")
    if values["log_level"].lower() not in ("debug", "info", "warning", "error"):
        problems.append(f"--log-level: must be debug, info, warning or error, got {values['log_level']!r}")
    if values["redis_use_sentinel"]:
        need("redis_sentinel_master_name", "required with --redis-use-sentinel")
        need("redis_sentinel_connection_urls", "required with --redis-use-sentinel")
    if values["redis_use_cluster"]:
        need("redis_cluster_connection_urls", "required with --redis-use-cluster")
    if values["redis_use_cluster"] and values["redis_use_sentinel"]:
        problems.append("--redis-use-cluster: cannot be combined with --redis-use-sentinel")
    url = values["redis_connection_url"]
    if values["session_store_type"] == "redis" and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        problems.append(f"--redis-connection-url: must start with redis://, rediss:// or unix://, got {url!r}")
    if values["cookie_expire"] <= 0:
        problems.append("--cookie-expire: must be positive")
    if values["refresh_token_ttl"] <= 0:
        problems.append("--refresh-token-ttl: must be positive")
    if not 0 < values["session_cache_ttl"] <= 1 and values["session_cache_ttl"] != 0:
        problems.append(
            "--session-cache-ttl: must be between 0 and 1 second (sign-out must reach every replica within 1s)"
        )
    if values["provider_timeout"] <= 0:
        problems.append("--provider-timeout: must be positive")
    if values["session_store_type"] == "memory" and values["workers"] > 1:
        problems.append(
            "--workers: the memory store lives in one process; use --session-store-type redis for more workers"
        )


def build_config(raw: Mapping[str, Any]) -> Config:
    """Validate raw settings (attr -> value, already merged by precedence) into a Config."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        value = raw.get(opt.attr, opt.default)
        try:
            values[opt.attr] = opt.convert(value) if value is not opt.default else value
        except (ValueError, TypeError) as exc:
            problems.append(f"--{opt.name}: {exc}")
            values[opt.attr] = opt.default
    unknown = sorted(set(raw) - set(_BY_ATTR) - {"config"})
    problems.extend(f"--{name.replace('_', '-')}: unknown option" for name in unknown)

    if values["client_secret_file"] and not values["client_secret"]:
        try:
            with open(values["client_secret_file"], encoding="utf-8") as fh:
                values["client_secret"] = fh.read().strip()
        except OSError as exc:
            problems.append(f"--client-secret-file: cannot read it ({exc.strerror})")
    _check(values, problems)

    upstreams: list[Upstream] = []
    skip_routes: list[SkipRoute] = []
    networks: list[Any] = []
    listen: tuple[str | None, int | None] = (None, None)
    metrics: tuple[str | None, int | None] = (None, None)
    try:
        upstreams.extend(_parse_upstream(u) for u in values["upstream"])
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        skip_routes.extend(_parse_skip_route(r) for r in values["skip_auth_route"])
    except ConfigError as exc:
        problems.append(str(exc))
    for net in values["trusted_proxy"]:
        try:
            networks.append(ipaddress.ip_network(net, strict=False))
        except ValueError:
            problems.append(f"--trusted-proxy: not an IP network: {net!r}")
    try:
        listen = _split_hostport(values["http_address"], "http-address")
        if values["metrics_address"]:
            metrics = _split_hostport(values["metrics_address"], "metrics-address")
    except ConfigError as exc:
        problems.append(str(exc))

    if problems:
        raise ConfigError("\n".join(problems))
    if values["workers"] == 0:
        values["workers"] = 1 if values["session_store_type"] == "memory" else (os.cpu_count() or 1)
    values["cookie_samesite"] = values["cookie_samesite"].lower()
    values["log_level"] = values["log_level"].lower()
    return Config(
        values=values,
        cookie_secrets=tuple(s.encode() for s in values["cookie_secret"]),
        upstreams=tuple(sorted(upstreams, key=lambda u: len(u.prefix), reverse=True)),
        skip_routes=tuple(skip_routes),
        trusted_networks=tuple(networks),
        listen_host=str(listen[0]),
        listen_port=int(listen[1] or 0),
        metrics_host=metrics[0],
        metrics_port=metrics[1],
    )


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str) -> Any:
        sys.stderr.write(f"sidecar: error: {message}\n")
        raise SystemExit(2)


def _argument_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="sidecar",
        description="OAuth2 / OpenID Connect authentication proxy. Every flag can also be set "
        "as SIDECAR_<NAME> in the environment or as <name> in the --config TOML file.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings (flags and env win)")
    for opt in OPTIONS:
        default = "<hidden>" if opt.secret and opt.default else opt.default
        if isinstance(default, tuple):
            default = ",".join(default) or "none"
        text = f"{opt.help} [default: {default}] [env: {opt.env}]"
        if opt.kind == "bool":
            parser.add_argument(
                f"--{opt.name}",
                dest=opt.attr,
                nargs="?",
                const="true",
                default=None,
                metavar="BOOL",
                help=text,
            )
        elif opt.kind == "list":
            parser.add_argument(f"--{opt.name}", dest=opt.attr, action="append", default=None, help=text)
        else:
            parser.add_argument(f"--{opt.name}", dest=opt.attr, default=None, help=text)
    return parser


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path!r} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path!r} is not valid TOML ({exc})") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def load_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """Merge file < env < flags and build the Config; raises ConfigError."""
    environ = os.environ if environ is None else environ
    args = vars(_argument_parser().parse_args(list(argv)))
    config_file = args.pop("config") or environ.get("SIDECAR_CONFIG")
    merged: dict[str, Any] = _read_toml(config_file) if config_file else {}
    for opt in OPTIONS:
        if opt.env in environ:
            merged[opt.attr] = environ[opt.env]
        if args.get(opt.attr) is not None:
            merged[opt.attr] = args[opt.attr]
    return build_config(merged)


def config_or_exit(argv: Sequence[str], err: Callable[[str], object] | None = None) -> Config:
    """Build the Config or print each problem on one line and exit with code 2."""
    try:
        return load_config(argv)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            (err or (lambda s: sys.stderr.write(s + "\n")))(f"sidecar: error: {line}")
        raise SystemExit(2) from None
