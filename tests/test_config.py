"""Settings: precedence, oauth2-proxy forms, and one clear line (exit 2) per problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import load_config, parse_duration

BASE = [
    "--oidc-issuer-url",
    "https://idp.example.com",
    "--client-id",
    "app",
    "--redirect-url",
    "https://app.example.com/oauth2/callback",
    "--cookie-secret",
    "0123456789abcdef0123",
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
        [*BASE, "--cookie-secure=false", "--reverse-proxy", "--allowed-group", "a", "--allowed-group", "b,c"],
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
