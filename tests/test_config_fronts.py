"""Start-up rules added with ``--front``: Kubernetes service links, one rule for "empty", the idle timeout
floor, ``--front`` and ``--oauth-issuer``. The service-link environments are what the kubelet writes for
Services named oauth2-proxy, sidecar and redis (and the shipped sidecar-redis)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.config_load import load_config, service_link
from sidecar.errors import ConfigError
from tests.e2e.procs import free_ports, http_status
from tests.test_config import BASE


def links(service: str, ip: str, ports: dict[str, int]) -> dict[str, str]:
    """What the kubelet sets for one Service: its name upper-cased, dashes as underscores, per port."""
    name = service.upper().replace("-", "_")
    first = next(iter(ports.values()))
    at = f"[{ip}]" if ":" in ip else ip  # Go's net.JoinHostPort, as the kubelet writes the URLs
    env = {f"{name}_SERVICE_HOST": ip, f"{name}_SERVICE_PORT": str(first), f"{name}_PORT": f"tcp://{at}:{first}"}
    for port_name, port in ports.items():
        env[f"{name}_SERVICE_PORT_{port_name.upper().replace('-', '_')}"] = str(port)
        prefix = f"{name}_PORT_{port}_TCP"
        env.update({prefix: f"tcp://{at}:{port}", prefix + "_PROTO": "tcp", prefix + "_PORT": str(port)})
        env[prefix + "_ADDR"] = ip
    return env


POD_ENV = {
    **links("oauth2-proxy", "10.96.0.12", {"http": 4180, "metrics": 44180}),
    **links("sidecar", "10.96.0.13", {"http": 4180, "auth": 4181, "metrics": 9180}),
    **links("sidecar-redis", "10.96.0.14", {"redis": 6379}),
    **links("redis", "fd00:10:96::15", {"redis": 6379}),
    **links("oauth2-proxy-redis", "fd00:10:96::16", {"redis": 6379}),
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
}


def _started(env: dict[str, str]) -> str:
    """Start ``python -m sidecar`` with ``env``, wait for /ping, stop it; what it wrote to stderr."""
    (port,) = free_ports(1)
    env = {**env, "SIDECAR_HTTP_ADDRESS": f"127.0.0.1:{port}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "sidecar"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while http_status(f"http://127.0.0.1:{port}/ping") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)[1]
            time.sleep(0.05)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    return err


def test_ipv6_and_udp_services_are_links_too() -> None:
    env = links("sidecar", "fd00:10:96::d", {"http": 4180})
    env |= {"SIDECAR_PORT_53_UDP": "udp://10.96.0.10:53", "SIDECAR_PORT_53_UDP_PROTO": "udp"}
    assert env["SIDECAR_PORT"] == "tcp://[fd00:10:96::d]:4180"
    assert all(service_link(k, v) for k, v in env.items()), [k for k, v in env.items() if not service_link(k, v)]


def test_the_pod_environment_has_the_shapes_the_kubelet_writes() -> None:
    assert POD_ENV["OAUTH2_PROXY_PORT"] == "tcp://10.96.0.12:4180"
    assert POD_ENV["SIDECAR_PORT_4181_TCP_ADDR"] == "10.96.0.13"
    assert POD_ENV["SIDECAR_REDIS_SERVICE_PORT_REDIS"] == "6379"
    assert all(service_link(k, v) for k, v in POD_ENV.items() if k.startswith(("SIDECAR_", "OAUTH2_PROXY_")))


def test_service_links_are_ignored_with_one_notice() -> None:
    notices: list[str] = []
    config = load_config(BASE, POD_ENV, notices)
    assert config.http_address == "127.0.0.1:4180"  # nothing was read as a setting
    assert len(notices) == 1 and "Kubernetes service links" in notices[0]
    assert "OAUTH2_PROXY_PORT" in notices[0] and "SIDECAR_SERVICE_HOST" in notices[0]


def test_a_real_process_starts_with_the_pod_environment_and_says_so_once() -> None:
    env = {**POD_ENV, "SIDECAR_OIDC_ISSUER_URL": "https://idp.example.com", "SIDECAR_CLIENT_ID": "app"}
    env |= {"SIDECAR_REDIRECT_URL": "/oauth2/callback", "SIDECAR_COOKIE_SECRET": "0123456789abcdef0123"}
    env |= {"SIDECAR_EMAIL_DOMAIN": "*", "SIDECAR_COOKIE_SECURE": "false"}
    err = _started(env)
    assert "unknown option" not in err, err
    assert err.count("Kubernetes service links") == 1, err


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SIDECAR_ALLOWED_GROUPZ", "admins"),  # misspelt: still stops
        ("SIDECAR_SERVICE_HOST", "app.example.com"),  # the name fits, the value is no address
        ("SIDECAR_PORT", "4180"),  # a service link's _PORT is a tcp:// URL
        ("OAUTH2_PROXY_PORT", "tcp://10.96.0.12:4180/x"),
        ("OAUTH2_PROXY_SERVICE_PORT", "http"),
        ("SIDECAR_PORT_4180_TCP_PROTO", "http"),
        ("SIDECAR_PORT_4180_TCP_ADDR", "10.0.0.1; rm"),
        ("SIDECAR_PORT_4180_HTTP", "tcp://10.0.0.1:4180"),
        # Review 2: values only as strict as the kubelet writes them; a name alone never makes a link.
        ("SIDECAR_SERVICE_HOST", ":"),
        ("SIDECAR_SERVICE_HOST", "::::"),
        ("SIDECAR_SERVICE_HOST", "999.1.1.1"),
        ("SIDECAR_SERVICE_HOST", "fe80::1%eth0"),
        ("SIDECAR_REDIS_SERVICE_HOST", "dead:beef"),
        ("SIDECAR_PORT", "tcp://:4180"),
        ("SIDECAR_PORT", "tcp://fd00::1:4180"),  # IPv6 without brackets: never what the kubelet writes
        ("SIDECAR_PORT", "tcp://[10.0.0.1]:4180"),
        ("SIDECAR_PORT", "tcp://10.0.0.1:99999"),
        ("SIDECAR_PORT", "tcp://10.0.0.1:0"),
        ("SIDECAR_PORT", "TCP://10.0.0.1:4180"),
        ("SIDECAR_SERVICE_PORT", "0"),
        ("SIDECAR_SERVICE_PORT", "70000"),
        ("SIDECAR_SERVICE_PORT_HTTP", "04180"),
        ("SIDECAR_PORT_4180_TCP", "tcp://10.0.0.1:4181"),  # the name's port and the URL's differ
        ("SIDECAR_PORT_4180_TCP", "udp://10.0.0.1:4180"),  # the name's protocol and the URL's differ
        ("SIDECAR_PORT_4180_TCP_PROTO", "udp"),
        ("SIDECAR_PORT_4180_UDP_PROTO", "UDP"),
        ("SIDECAR_PORT_4180_TCP_PORT", "4181"),
        ("SIDECAR_PORT_4180_TCP_ADDR", "10.0.0.256"),
        ("OAUTH2_PROXY_REDIS_PORT_6379_TCP_ADDR", "::g"),
    ],
)
def test_anything_else_still_stops_start_up(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(BASE, {**POD_ENV, key: value})


# --- one rule for "empty" ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "toml"),
    [
        (["--allowed-group", ""], {}, ""),
        (["--allowed-group="], {}, ""),
        (["--allowed-group", " , "], {}, ""),
        ([], {"SIDECAR_ALLOWED_GROUP": ""}, ""),
        ([], {"OAUTH2_PROXY_ALLOWED_GROUPS": " , "}, ""),
        ([], {"SIDECAR_ALLOWED_GROUP": "[]"}, ""),
        ([], {"SIDECAR_ALLOWED_GROUP": '["", " "]'}, ""),
        ([], {}, "allowed_groups = []"),
        ([], {}, 'allowed_groups = ""'),
        ([], {}, 'allowed_groups = [" "]'),
        ([], {"SIDECAR_OAUTH_CLIENT_METADATA_HOSTS": ""}, ""),
        ([], {"SIDECAR_EMAIL_DOMAIN": ""}, ""),
        (["--whitelist-domain", ","], {}, ""),
        ([], {"SIDECAR_SKIP_AUTH_ROUTE": "\n \n"}, ""),
        ([], {}, "skip_auth_routes = []"),
    ],
)
def test_an_explicitly_empty_list_is_refused_everywhere(
    argv: list[str], env: dict[str, str], toml: str, tmp_path: Path
) -> None:
    if toml:
        (tmp_path / "c.toml").write_text(toml + "\n")
        argv = [*argv, "--config", str(tmp_path / "c.toml")]
    with pytest.raises(ConfigError, match="set but empty"):
        load_config([*BASE, *argv], env)


def test_left_out_is_how_to_say_none() -> None:
    assert load_config(BASE, {}).allowed_group == ()
    assert load_config([*BASE, "--allowed-group", "admins,,staff"], {}).allowed_group == ("admins", "staff")


# --- idle timeout, --front, --oauth-issuer ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["3s", "1m", "119s"])
def test_an_idle_timeout_shorter_than_the_last_active_interval_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="--session-idle-timeout: at least 120s"):
        load_config([*BASE, "--session-idle-timeout", value], {})


@pytest.mark.parametrize("value", ["0", "2m", "24h"])
def test_idle_timeouts_that_can_be_honoured(value: str) -> None:
    load_config([*BASE, "--session-idle-timeout", value], {})


def test_front_choices_and_their_conditions() -> None:
    assert load_config(BASE, {}).front == "nginx"
    assert load_config([*BASE, "--reverse-proxy", "--front", "ingress-nginx"], {}).front == "ingress-nginx"
    with pytest.raises(ConfigError, match="--front: traefik is only read with --reverse-proxy"):
        load_config([*BASE, "--front", "traefik"], {})
    with pytest.raises(ConfigError, match="--front: must be one of"):
        load_config([*BASE, "--reverse-proxy", "--front", "haproxy"], {})


@pytest.mark.parametrize(
    "issuer",
    ["app.example.com", "https://app.example.com/mcp", "https://app.example.com?x", "https://u@app.example.com",
     "ftp://app.example.com", "https://", "https://app.example.com:99999", " https://app.example.com",
     # review 2: each of these was taken, giving an issuer and audience no request matches (all tokens refused)
     "https://app.example.com:443", "http://app.example.com:80", "https://APP.example.com", "https://app.example.com#",
     "https://app.example.com/?", "https://app.example.com%2f", "https://app .example.com", "https://app.example.com:0",
     "https://app.example.com:", "https://-bad-.example", "https://app_x.example.com", "https://app.example.com.",
     "https://app.example.com;x", "https://[::g]", "https://[1.2.3.4]"],
)  # fmt: skip
def test_oauth_issuer_must_be_an_origin(issuer: str) -> None:
    with pytest.raises(ConfigError, match="--oauth-issuer: expected an origin"):
        load_config([*BASE, "--oauth-server", "--oauth-resource", "/mcp", "--oauth-issuer", issuer], {})


@pytest.mark.parametrize(
    "issuer", ["https://app.example.com", "https://app.example.com/", "http://app.example.com:8080", "https://[::1]",
               "https://10.0.0.1:8443"],
)  # fmt: skip
def test_oauth_issuer_origins_that_are_taken(issuer: str) -> None:
    load_config([*BASE, "--oauth-server", "--oauth-resource", "/mcp", "--oauth-issuer", issuer], {})


def test_oauth_issuer_needs_the_oauth_server() -> None:
    with pytest.raises(ConfigError, match="--oauth-issuer: only used with --oauth-server"):
        load_config([*BASE, "--oauth-issuer", "https://app.example.com"], {})
    config = load_config([*BASE, "--oauth-server", "--oauth-resource=/mcp", "--oauth-issuer=https://a.example"], {})
    assert config.oauth_issuer == "https://a.example"


def test_trusting_everyone_with_the_oauth_server_needs_an_issuer() -> None:
    oauth = ["--oauth-server", "--oauth-resource=/mcp", "--reverse-proxy"]
    for everyone in ("0.0.0.0/0", "::/0"):
        with pytest.raises(ConfigError, match="--trusted-proxy: trusting every address"):
            load_config([*BASE, *oauth, "--trusted-proxy", everyone], {})
        load_config([*BASE, *oauth, "--trusted-proxy", everyone, "--oauth-issuer", "https://a.example"], {})
    load_config([*BASE, *oauth, "--trusted-proxy", "10.0.0.0/8"], {})
