"""The checks ``build_config`` runs: cross-field rules, and the values parsed out of options
(upstreams, networks, resource paths, TLS contexts), each problem one line naming its option.

Kept apart from ``config.py`` so the settings read as a list there and the rules read as rules here.
Every function adds to ``problems`` and carries on: start-up lists every problem at once.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .config_option import mask_url
from .errors import ConfigError
from .rules import Route, parse_route, valid_hostname
from .templates import DEFAULT_TEMPLATES, load_templates

_IDLE_FLOOR = 120.0  # sessions.py writes "last active" once a minute: an idle timeout must leave room for that


def _flag(attr: str) -> str:
    return attr.replace("_", "-")


@dataclass(frozen=True)
class Upstream:
    prefix: str  # path prefix this upstream serves, always starts with "/"
    url: str  # scheme://host[:port] of the upstream, no path


def split_hostport(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:  # isdigit takes any script
        raise ConfigError(f"--{option}: expected host:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_upstream(text: str) -> Upstream:
    parts = urlsplit(text)
    if parts.username is not None or parts.password is not None:
        raise ConfigError("--upstream: user info in an upstream URL is not supported (it would be logged)")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"--upstream: expected an http(s) URL without query, got {text!r}")
    return Upstream(prefix=parts.path or "/", url=f"{parts.scheme}://{parts.netloc}")


def check_fields(v: Mapping[str, Any], problems: list[str]) -> None:
    """Cross-field rules; each problem names its option."""

    def need(attr: str, why: str) -> None:
        if not v[attr]:
            problems.append(f"--{_flag(attr)}: {why}")

    need("oidc_issuer_url", "required (the provider's issuer URL)")
    need("client_id", "required")
    need("redirect_url", "required (e.g. https://app.example.com/oauth2/callback)")
    need("email_domain", "required: the email domains allowed in, or '*' for any address (as oauth2-proxy)")
    for attr in ("oidc_issuer_url", "redirect_url"):
        if attr == "redirect_url" and _relative_path(v[attr]):
            continue  # built per request from the host the browser used
        if v[attr] and urlsplit(v[attr]).scheme not in ("http", "https"):
            problems.append(f"--{_flag(attr)}: must be an http(s) URL, got {v[attr]!r}")
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


def collect(problems: list[str], parse: Any, items: tuple[str, ...], *args: Any) -> tuple[Any, ...]:
    out = []
    for item in items:
        try:
            out.append(parse(item, *args))
        except ConfigError as exc:
            problems.append(str(exc))
    return tuple(out)


def skip_route(text: str) -> Route:
    return parse_route(text, "skip-auth-route", refuse_match_all=True)


def network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"--trusted-proxy: not an IP network: {text!r}") from None


def _relative_path(text: str) -> bool:
    """A path such as ``/oauth2/callback``: the sidecar adds the request's scheme and host."""
    return text.startswith("/") and not text.startswith("//") and "\\" not in text and "?" not in text


def secret_file(path: str, option_name: str, problems: list[str]) -> tuple[str, ...]:
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


def migration_derived(values: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """Values derived from the options oauth2-proxy users bring along."""
    for attr in ("proxy_prefix", "ping_path", "ready_path"):
        _path_option(values[attr], _flag(attr), problems)
    prefix = values["proxy_prefix"].rstrip("/") + "/"
    for attr in ("ping_path", "ready_path"):
        if values[attr].startswith(prefix) or values[attr] + "/" == prefix:
            problems.append(f"--{_flag(attr)}: {values[attr]!r} is under --proxy-prefix; choose another path")
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


def oauth_resources(values: Mapping[str, Any], problems: list[str]) -> tuple[str, ...]:
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
    everyone = any(net.prefixlen == 0 for net in collect([], network, values["trusted_proxy"]))
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


def client_metadata_ssl(values: Mapping[str, Any], problems: list[str]) -> ssl.SSLContext | None:
    """TLS for Client ID Metadata Document fetches: the system's trust plus the listed CA files (public clients
    keep working when an internal registry's CA is added). Hosts are checked here; the switch must be on for
    either list (a setting is never accepted and then ignored)."""
    if not values["oauth_client_metadata_documents"]:
        for attr in ("oauth_client_metadata_hosts", "oauth_client_metadata_ca_file"):
            if values[attr]:
                problems.append(f"--{_flag(attr)}: only used with --oauth-client-metadata-documents; set it too")
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
