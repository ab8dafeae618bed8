"""Settings: precedence, oauth2-proxy forms, and one clear line (exit 2) per problem."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import parse_duration
from sidecar.config_load import load_config
from sidecar.errors import ConfigError

BASE = [
    "--oidc-issuer-url",
    "https://idp.example.com",
    "--client-id",
    "app",
    "--redirect-url",
    "https://app.example.com/oauth2/callback",
    "--cookie-secret",
    "0123456789abcdef0123",
    "--email-domain",
    "*",
]


def test_durations_take_seconds_and_go_units() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("168h") == 168 * 3600
    assert parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25
    for bad in ("", "abc", "10x", "-5", "h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    toml = tmp_path / "sidecar.toml"
    toml.write_text(
        'cookie-name = "from_file"\nscope = "openid file"\nupstream = ["http://a:1/", "http://b:2/api/"]\n'
        'cookie-expire = "2h"\n'
    )
    env = {"SIDECAR_COOKIE_NAME": "from_env", "SIDECAR_SCOPE": "openid env", "SIDECAR_COOKIE_SECURE": "0"}
    config = load_config([*BASE, "--config", str(toml), "--cookie-name", "from_flag"], env)
    assert config.cookie_name == "from_flag"
    assert config.scope == "openid env"
    assert config.cookie_secure is False
    assert config.cookie_expire == 7200
    assert [(u.prefix, u.url) for u in config.upstreams] == [("/api/", "http://b:2"), ("/", "http://a:1")]


def test_oauth2_proxy_boolean_and_list_forms() -> None:
    config = load_config(
        [*BASE[:-2], "--cookie-secure=false", "--reverse-proxy", "--allowed-group", "a", "--allowed-group", "b,c"],
        {"SIDECAR_EMAIL_DOMAIN": "example.com, example.org"},
    )
    assert config.cookie_secure is False and config.reverse_proxy is True
    assert config.allowed_group == ("a", "b", "c")
    assert config.email_domain == ("example.com", "example.org")


def test_config_repr_hides_secrets() -> None:
    config = load_config([*BASE, "--client-secret", "super-secret-value"], {})
    assert "super-secret-value" not in repr(config) and "0123456789abcdef0123" not in repr(config)


def test_client_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    assert load_config([*BASE, "--client-secret-file", str(secret)], {}).client_secret == "from-file"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cookie-secure=maybe"], "--cookie-secure"),
        (["--cookie-expire", "forever"], "--cookie-expire"),
        (["--session-store-type", "mongo"], "--session-store-type"),
        (["--cookie-secret", "short"], "--cookie-secret"),
        (["--http-address", "nonsense"], "--http-address"),
        (["--upstream", "ftp://x"], "--upstream"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--workers", "4"], "--workers"),
        (["--skip-auth-route", "(["], "--skip-auth-route"),
        (["--client-secret-file", "/nonexistent/secret"], "--client-secret-file"),
        (["--oauth-revocation-rate-limit", "-5"], "--oauth-revocation-rate-limit"),
        (["--oauth-unused-clients-per-network", "lots"], "--oauth-unused-clients-per-network"),
        (["--oauth-refresh-reuse-seconds", "61"], "--oauth-refresh-reuse-seconds"),
        (["--oauth-refresh-reuse-seconds", "2m"], "--oauth-refresh-reuse-seconds"),
        (["--oauth-refresh-reuse-seconds", "-1"], "--oauth-refresh-reuse-seconds"),
        (["--oauth-refresh-reuse-seconds", "soon"], "--oauth-refresh-reuse-seconds"),
        (["--oauth-refresh-reuse-seconds", "nan"], "--oauth-refresh-reuse-seconds"),
    ],
)
def test_a_bad_setting_stops_start_up_with_one_line_and_exit_2(args: list[str], needle: str) -> None:
    proc = _run(*BASE, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and lines[0].startswith("sidecar: error:")


def test_a_bad_env_value_names_the_option() -> None:
    proc = _run(*BASE, env={"SIDECAR_REFRESH_SKEW": "soon"})
    assert proc.returncode == 2 and "--refresh-skew" in proc.stderr


def test_missing_required_settings_are_all_reported() -> None:
    proc = _run()
    assert proc.returncode == 2
    for name in ("--oidc-issuer-url", "--client-id", "--redirect-url", "--cookie-secret"):
        assert name in proc.stderr


def test_help_lists_every_option_with_its_default() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    from sidecar.config import OPTIONS

    for option in OPTIONS:
        assert f"--{option.name}" in proc.stdout
    assert proc.stdout.count("[default:") == len(OPTIONS)


# --- Route rules: a regex is one rule, whatever its commas, from every source --------------------

REGEXES = [
    "^/public/[a-z]{1,}$",
    "^/v[0-9]{1,3}/items/[0-9]{2,4}$",
    "^/a{2}/b{,3}$",
    "^/(x|y),z/[^,]+$",
    "^/files/.{0,8}\\.txt$",
]


def _route_sources(rule: str, tmp_path: Path) -> dict[str, object]:
    toml = tmp_path / "routes.toml"
    toml.write_text("skip_auth_routes = [" + json.dumps(rule) + "]\n")
    toml_string = tmp_path / "route.toml"
    toml_string.write_text("skip-auth-route = " + json.dumps(rule) + "\n")
    return {
        "flag": load_config([*BASE, "--skip-auth-route", rule], {}),
        "env json": load_config(BASE, {"SIDECAR_SKIP_AUTH_ROUTE": json.dumps([rule])}),
        "env lines": load_config(BASE, {"SIDECAR_SKIP_AUTH_ROUTE": rule + "\n^/also/$\n"}),
        "oauth2-proxy env json": load_config(BASE, {"OAUTH2_PROXY_SKIP_AUTH_ROUTES": json.dumps([rule])}),
        "toml array": load_config([*BASE, "--config", str(toml)], {}),
        "toml string": load_config([*BASE, "--config", str(toml_string)], {}),
    }


@pytest.mark.parametrize("regex", REGEXES)
@pytest.mark.parametrize("method", ["", "GET=", "POST!="])
def test_a_route_regex_is_never_split(regex: str, method: str, tmp_path: Path) -> None:
    rule = method + regex
    for source, config in _route_sources(rule, tmp_path).items():
        routes = config.skip_routes  # type: ignore[attr-defined]
        assert routes[0].text == rule and routes[0].pattern.pattern == regex, source
        assert len(routes) == (2 if source == "env lines" else 1), source
        for path in ("/", "/admin", "/admin}", "/}$", "/z", "/public/", "/other,z/x"):
            for verb in ("GET", "POST", "DELETE"):
                if routes[0].matches(verb, path):
                    assert re.search(regex, path), (source, verb, path)


def test_method_rules_mean_what_they_say() -> None:
    config = load_config([*BASE, "--skip-auth-route", "GET=^/a/", "--skip-auth-route", "POST!=^/b/"], {})
    get_a, not_post_b = config.skip_routes
    assert get_a.matches("GET", "/a/x") and not get_a.matches("POST", "/a/x") and not get_a.matches("GET", "/b/")
    assert not_post_b.matches("GET", "/b/x") and not_post_b.matches("DELETE", "/b/x")
    assert not not_post_b.matches("POST", "/b/x") and not not_post_b.matches("GET", "/a/")
    assert load_config([*BASE, "--skip-auth-route", "get=^/c/"], {}).skip_routes[0].method == "GET"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SIDECAR_SKIP_AUTH_ROUTE": "GET=^/public/[a-z]{1,}$"}, "never split at commas"),
        ({"SIDECAR_SKIP_AUTH_ROUTE": "^/a/,^/b/"}, "never split at commas"),
        ({"SIDECAR_SKIP_AUTH_ROUTE": '["^/a/", 3]'}, "JSON array of strings"),
        ({"SIDECAR_SKIP_AUTH_ROUTE": "[^/a/"}, "not a JSON array"),
        ({"SIDECAR_SKIP_AUTH_ROUTE": "FETCH=^/a/"}, "not an HTTP method"),
        ({"SIDECAR_SKIP_AUTH_ROUTE": "GET="}, "empty regex"),
        ({"SIDECAR_SKIP_AUTH_ROUTE": "GET!=(unclosed"}, "bad regex"),
        ({"SIDECAR_EMAIL_DOMIAN": "corp.com"}, "did you mean SIDECAR_EMAIL_DOMAIN"),
        ({"SIDECAR_ALLOWED_GRUOPS": "admins"}, "did you mean SIDECAR_ALLOWED_GROUPS"),
        ({"SIDECAR_NO_SUCH_THING": "1"}, "SIDECAR_NO_SUCH_THING: unknown option"),
        ({"OAUTH2_PROXY_HTPASSWD_FILE": "/x"}, "not supported here"),
        ({"SIDECAR_EMAIL_DOMAIN": "a.com", "SIDECAR_EMAIL_DOMAINS": "b.com"}, "set it once"),
        ({"SIDECAR_WHITELIST_DOMAIN": "https://ok.example"}, "must be a host"),
        ({"SIDECAR_WHITELIST_DOMAIN": "ok.example:99999"}, "bad port"),
        ({"SIDECAR_WHITELIST_DOMAIN": "ok.*.example"}, "not a host name"),
        ({"SIDECAR_WHITELIST_DOMAIN": "*"}, "not a host name"),
        ({"SIDECAR_EMAIL_DOMAIN": "corp.com@evil.com"}, "not a domain"),
        ({"SIDECAR_EMAIL_DOMAIN": "*corp.com"}, "not a domain"),
        ({"SIDECAR_COOKIE_EXPIRE": "nan"}, "--cookie-expire"),
        ({"SIDECAR_COOKIE_EXPIRE": "inf"}, "--cookie-expire"),
        ({"SIDECAR_COOKIE_EXPIRE": "1e400"}, "--cookie-expire"),
        ({"SIDECAR_COOKIE_EXPIRE": "0"}, "--cookie-expire"),
        ({"SIDECAR_PROVIDER_TIMEOUT": "0s"}, "--provider-timeout"),
        ({"SIDECAR_PROVIDER_TIMEOUT": "100000h"}, "--provider-timeout"),
        ({"SIDECAR_SESSION_CACHE_TTL": "5s"}, "--session-cache-ttl"),
        ({"SIDECAR_PROVIDER_RETRIES": "-1"}, "--provider-retries"),
        ({"SIDECAR_PROVIDER_RETRIES": "1000"}, "--provider-retries"),
        ({"SIDECAR_LOG_LEVEL": "loud"}, "--log-level"),
    ],
)
def test_settings_that_are_not_understood_stop_start_up(env: dict[str, str], needle: str) -> None:
    if not any("EMAIL_DOMAIN" in name for name in env):
        env = {"SIDECAR_EMAIL_DOMAIN": "*", **env}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(BASE[:-2], env)


def test_oauth2_proxy_plural_spellings_are_the_same_options(tmp_path: Path) -> None:
    env = {"SIDECAR_EMAIL_DOMAINS": "corp.com", "SIDECAR_ALLOWED_GROUPS": "admins,ops", "OAUTH2_PROXY_UPSTREAMS": ""}
    config = load_config(BASE[:-2], env)
    assert config.email_domain == ("corp.com",) and config.allowed_group == ("admins", "ops")
    config = load_config(BASE[:-2], {"OAUTH2_PROXY_EMAIL_DOMAINS": "corp.com", "SIDECAR_EMAIL_DOMAIN": "b.com"})
    assert config.email_domain == ("b.com",)  # SIDECAR_ beats OAUTH2_PROXY_ for the same option
    cfg = tmp_path / "oauth2-proxy.cfg"
    cfg.write_text('email_domains = ["corp.com", "corp.org"]\nwhitelist_domains = [".corp.com:*"]\n')
    config = load_config([*BASE[:-2], "--config", str(cfg)], {})
    assert config.email_domain == ("corp.com", "corp.org")
    assert config.redirect_hosts[0].subdomains and config.redirect_hosts[0].any_port


def test_needless_oauth2_proxy_flags_get_a_notice_not_an_error() -> None:
    notices: list[str] = []
    load_config([*BASE, "--skip-provider-button", "--proxy-websockets=true"], {}, notices)
    assert len(notices) == 2 and all("ignored" in n for n in notices)


@pytest.mark.parametrize("flag", ["--cookie-sec", "--email", "--skip-auth", "--allowed-gro"])
def test_abbreviated_flags_are_refused(flag: str) -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        load_config([*BASE, flag, "x"], {})


def test_email_domain_must_be_given() -> None:
    with pytest.raises(ConfigError, match="--email-domain: required"):
        load_config(BASE[:-2], {})


def test_unknown_toml_keys_are_refused_with_a_hint(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text('email_domian = "corp.com"\n')
    with pytest.raises(ConfigError, match="did you mean email_domain"):
        load_config([*BASE, "--config", str(cfg)], {})


def test_secrets_never_appear_in_errors_or_repr() -> None:
    secret_url = "redis://user:hunter2-redis-pw@redis.internal:6380/0"
    config = load_config(
        [*BASE, "--client-secret", "client-pw-123", "--session-store-type", "redis"],
        {"SIDECAR_REDIS_CONNECTION_URL": secret_url, "SIDECAR_REDIS_SENTINEL_PASSWORD": "sentinel-pw"},
    )
    text = repr(config) + str(config.public())
    for secret in ("hunter2-redis-pw", "client-pw-123", "sentinel-pw", "0123456789abcdef0123"):
        assert secret not in text
    assert "redis.internal" in text
    with pytest.raises(ConfigError) as refused:
        load_config([*BASE, "--session-store-type", "redis"], {"SIDECAR_REDIS_CONNECTION_URL": "http://u:hunter2@x/"})
    assert "hunter2" not in str(refused.value) and "--redis-connection-url" in str(refused.value)
    proc = _run("--help")
    assert "hunter2" not in proc.stdout


def test_an_unknown_sidecar_variable_stops_the_process_with_one_line() -> None:
    proc = _run(*BASE, env={"SIDECAR_EMAIL_DOMAINZ": "corp.com"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "sidecar: error: SIDECAR_EMAIL_DOMAINZ: unknown option (did you mean SIDECAR_EMAIL_DOMAIN?)"
    )


OAUTH2_PROXY_CFG = """
# A typical oauth2-proxy.cfg, as its users write it
http_address = "0.0.0.0:4180"
reverse_proxy = true
provider = "oidc"
oidc_issuer_url = "https://login.example.com/realms/main"
client_id = "my-app"
redirect_url = "https://app.example.com/oauth2/callback"
scope = "openid email profile groups"
upstreams = ["http://127.0.0.1:8080/", "http://api.internal:9000/api/"]
email_domains = ["example.com", "example.org"]
allowed_groups = ["staff", "admins"]
whitelist_domains = [".example.com", "tools.example.net:8443"]
skip_auth_routes = ["GET=^/healthz$", "^/public/[a-z]{1,20}/.*$", "OPTIONS!=^/api/private/"]
cookie_name = "_oauth2_proxy"
cookie_secure = true
cookie_expire = "168h"
cookie_refresh = "1h"
cookie_domains = [".example.com"]
skip_provider_button = true
set_xauthrequest = true
pass_access_token = true
session_store_type = "redis"
redis_connection_url = "redis://redis.internal:6379/0"
"""


def test_a_realistic_oauth2_proxy_configuration_runs_as_written(tmp_path: Path) -> None:
    cfg = tmp_path / "oauth2-proxy.cfg"
    cfg.write_text(OAUTH2_PROXY_CFG)
    env = {
        "OAUTH2_PROXY_CONFIG": str(cfg),
        "OAUTH2_PROXY_COOKIE_SECRET": "0123456789abcdef0123456789abcdef",
        "OAUTH2_PROXY_CLIENT_SECRET": "client-secret-value",
        "OAUTH2_PROXY_PROXY_WEBSOCKETS": "true",
    }
    notices: list[str] = []
    config = load_config([], env, notices)
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 4180) and config.reverse_proxy
    assert [(u.prefix, u.url) for u in config.upstreams] == [
        ("/api/", "http://api.internal:9000"),
        ("/", "http://127.0.0.1:8080"),
    ]
    assert config.email_domain == ("example.com", "example.org")
    assert config.allowed_group == ("staff", "admins")
    assert [(r.domain, r.subdomains, r.port) for r in config.redirect_hosts] == [
        ("example.com", True, None),
        ("tools.example.net", False, 8443),
    ]
    healthz, public, not_options = config.skip_routes
    assert healthz.matches("GET", "/healthz") and not healthz.matches("POST", "/healthz")
    assert public.matches("PUT", "/public/abc/x") and not public.matches("GET", "/public/" + "a" * 21 + "/x")
    assert not_options.matches("GET", "/api/private/x") and not not_options.matches("OPTIONS", "/api/private/x")
    assert config.cookie_name == "_oauth2_proxy" and config.cookie_expire == 168 * 3600
    assert config.cookie_refresh == 3600 and config.cookie_domain == (".example.com",)
    assert config.client_secret == "client-secret-value" and config.pass_access_token
    assert config.session_store_type == "redis"
    assert len(notices) == 2 and all("ignored" in n for n in notices)  # skip_provider_button, proxy_websockets


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("skip_provider_button = true", 'provider_display_name = "Corp SSO"', "not supported here"),
        ("skip_provider_button = true", 'htpasswd_file = "/etc/htpasswd"', "not supported here"),
        ("skip_provider_button = true", 'email_domain = ["example.com"]', "set it once"),
        ("skip_provider_button = true", 'skip_auth_route = ["GET=^/a/"]', "set it once"),
        ("email_domains =", "emails_domains =", "did you mean email_domains"),
        ("cookie_secure = true", 'cookie_secure = "perhaps"', "--cookie-secure"),
        (
            'upstreams = ["http://127.0.0.1:8080/", "http://api.internal:9000/api/"]',
            'upstreams = "ftp://x/"',
            "--upstream",
        ),
        ('cookie_expire = "168h"', "cookie_expire = [1]", "expected a single value"),
        ('cookie_expire = "168h"', 'cookie_expire = "nan"', "--cookie-expire"),
        ('"GET=^/healthz$"', '"FETCH=^/healthz$"', "not an HTTP method"),
        ('".example.com", ', '"*.example.*", ', "--whitelist-domain"),
    ],
)
def test_an_oauth2_proxy_configuration_with_a_problem_names_the_key(
    tmp_path: Path, old: str, new: str, needle: str
) -> None:
    assert old in OAUTH2_PROXY_CFG
    cfg = tmp_path / "oauth2-proxy.cfg"
    cfg.write_text(OAUTH2_PROXY_CFG.replace(old, new, 1))
    env = {"OAUTH2_PROXY_COOKIE_SECRET": "0123456789abcdef0123456789abcdef"}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(["--config", str(cfg)], env)


@pytest.mark.parametrize("regex", ["^/x|", "|^/x", ".*", "^", "(?s).*", "^/x|$", "GET=(/a)?", "POST!=^/x|^/y|", "x*"])
def test_a_skip_rule_that_matches_every_path_is_refused(regex: str) -> None:
    with pytest.raises(ConfigError, match="matches every path"):
        load_config([*BASE, "--skip-auth-route", regex], {})


@pytest.mark.parametrize("regex", ["^/$", "^/public/", "GET=^/healthz$", "\\.css$", "^/a|^/b", "^/"])
def test_targeted_skip_rules_are_accepted(regex: str) -> None:
    assert len(load_config([*BASE, "--skip-auth-route", regex], {}).skip_routes) == 1


def test_a_stray_value_is_never_echoed_it_may_be_a_secret() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config([*BASE, "--cookie-secre", "TOPSECRETVALUE1234"], {})
    assert "TOPSECRETVALUE1234" not in str(refused.value) and "--cookie-secre" in str(refused.value)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--proxy-websockets=false"], {}),
        (["--skip-provider-button=false"], {}),
        ([], {"OAUTH2_PROXY_PROXY_WEBSOCKETS": "false"}),
        ([], {"OAUTH2_PROXY_PROXY_WEBSOCKETS": "maybe"}),
    ],
)
def test_needless_switches_turned_off_are_refused_not_ignored(args: list[str], env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="cannot be turned off"):
        load_config([*BASE, *args], env)


def test_upstream_credentials_are_refused_and_never_printed() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config([*BASE, "--upstream", "http://user:upstream-pw@app:8080/"], {})
    assert "upstream-pw" not in str(refused.value) and "--upstream" in str(refused.value)


@pytest.mark.parametrize(
    "args",
    [
        ["--ping-path", "/oauth2/auth"],
        ["--ready-path", "/oauth2"],
        ["--ping-path", "/ready"],
        ["--proxy-prefix", "/sso", "--ping-path", "/sso/ping"],
        ["--banner", "x" * 5000],
    ],
)
def test_endpoint_paths_that_would_shadow_each_other_are_refused(args: list[str]) -> None:
    with pytest.raises(ConfigError):
        load_config([*BASE, *args], {})
