"""``make run``: the sidecar in front of the demo app, signing in at the dev provider. NOT for production.

Everything runs in one process on loopback with the in-memory session store:
    http://127.0.0.1:4180  sidecar  (open this)
    http://127.0.0.1:4181  demo app (the upstream; shows the identity headers it receives; /mcp is its MCP server,
                           which the sidecar guards as an --oauth-resource for CLI and MCP clients)
    http://127.0.0.1:4182  development OIDC provider (access tokens live one minute)

``--port N`` (or SIDECAR_DEV_PORT) moves the sidecar to N and the others to N+1, N+2; ``--port 0`` takes three
free ports and prints them (``make run PORT=0``). Every other argument is a sidecar flag applied on top of the
demo's settings (``make run ARGS="--oauth-access-token-ttl 20s"``); a bad one stops start-up with its name.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import Sequence

from aiohttp import web

from .. import logs
from ..app import build_app
from ..config import Config
from ..config_load import load_config
from ..errors import ConfigError
from .demo_app import demo_app
from .provider import run_provider

HOST = "127.0.0.1"


def _listen(port: int) -> socket.socket:
    """A bound listening socket (port 0: a free one, known before anything is configured)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(128)
    return sock


async def _serve(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


def demo_settings(port: int, app_port: int, issuer: str) -> list[str]:
    """The demo's settings as flags, so the caller's flags (after them) win."""
    settings = {
        "http-address": f"{HOST}:{port}",
        "upstream": f"http://{HOST}:{app_port}/",
        "oidc-issuer-url": issuer,
        "client-id": "sidecar-dev",
        "client-secret": "sidecar-dev-secret",
        "redirect-url": f"http://{HOST}:{port}/oauth2/callback",
        "cookie-secret": os.urandom(24).hex(),
        "cookie-secure": "false",  # plain http on loopback only
        "pass-access-token": "true",
        "pass-authorization-header": "true",
        "session-store-type": "memory",
        "email-domain": "*",  # the demo lets every development user in
        "request-logging": os.environ.get("SIDECAR_DEV_LOG", "false"),
        # CLI and MCP clients: the sidecar is their OAuth authorization server for /mcp (the demo's MCP server)
        "oauth-server": "true",
        "oauth-resource": "/mcp",
    }
    return [f"--{name}={value}" for name, value in settings.items()]


def _config(argv: Sequence[str]) -> Config:
    try:
        return load_config(argv, environ={})
    except ConfigError as exc:
        for line in str(exc).splitlines():
            sys.stderr.write(f"sidecar.dev: error: {line}\n")
        raise SystemExit(2) from None


def _arguments(argv: Sequence[str]) -> tuple[int, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m sidecar.dev", allow_abbrev=False, add_help=True)
    default = int(os.environ.get("SIDECAR_DEV_PORT", "4180"))
    parser.add_argument("--port", type=int, default=default, help="the sidecar's port; 0 = free ports")
    args, rest = parser.parse_known_args(list(argv))
    if not 0 <= args.port <= 65533:
        parser.error("--port must be 0 (free ports) or a port up to 65533")
    return args.port, rest


async def main(argv: Sequence[str] = ()) -> None:
    asked, flags = _arguments(argv)
    socks = [_listen(asked), _listen(asked + 1 if asked else 0)]
    port, app_port = (int(s.getsockname()[1]) for s in socks)
    provider_runner, provider = await run_provider(HOST, asked + 2 if asked else 0, access_token_ttl=60)
    config = _config([*demo_settings(port, app_port, provider.issuer), *flags])
    logs.setup("info")
    runners = [await _serve(demo_app(), socks[1]), await _serve(build_app(config), socks[0]), provider_runner]
    ttl = int(float(config.oauth_access_token_ttl))
    print(
        f"\n  sidecar demo (development only, NOT for production)\n"
        f"  open  http://{HOST}:{port}/  and sign in as alice or bob\n"
        f"  provider {provider.issuer}  (tokens live 60 s and are refreshed transparently)\n"
        f"  demo app http://{HOST}:{app_port}/\n"
        f"  MCP / CLI clients: http://{HOST}:{port}/mcp  (OAuth: device flow or an MCP client; see README;"
        f" access tokens live {ttl} s)\n"
        f"  SIDECAR_URL=http://{HOST}:{port}\n"
        f"  Ctrl-C to stop\n",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
