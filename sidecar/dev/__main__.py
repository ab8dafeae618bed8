"""``make run``: the sidecar in front of the demo app, signing in at the dev provider. NOT for production.

Everything runs in one process on loopback with the in-memory session store:
    http://127.0.0.1:4180  sidecar  (open this)
    http://127.0.0.1:4181  demo app (the upstream; shows the identity headers it receives; /mcp is its MCP server,
                           which the sidecar guards as an --oauth-resource for CLI and MCP clients)
    http://127.0.0.1:4182  development OIDC provider (access tokens live one minute)
Ports move with SIDECAR_DEV_PORT (the sidecar's; the others follow).
"""

from __future__ import annotations

import asyncio
import os
import signal

from aiohttp import web

from .. import logs
from ..app import build_app
from ..config import build_config
from .demo_app import demo_app
from .provider import run_provider

HOST = "127.0.0.1"


async def _serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    return runner


async def main() -> None:
    port = int(os.environ.get("SIDECAR_DEV_PORT", "4180"))
    provider_runner, _ = await run_provider(HOST, port + 2, access_token_ttl=60)
    issuer = f"http://{HOST}:{port + 2}"
    config = build_config(
        {
            "http_address": f"{HOST}:{port}",
            "upstream": f"http://{HOST}:{port + 1}/",
            "oidc_issuer_url": issuer,
            "client_id": "sidecar-dev",
            "client_secret": "sidecar-dev-secret",
            "redirect_url": f"http://{HOST}:{port}/oauth2/callback",
            "cookie_secret": os.urandom(24).hex(),
            "cookie_secure": "false",  # plain http on loopback only
            "pass_access_token": "true",
            "pass_authorization_header": "true",
            "session_store_type": "memory",
            "email_domain": "*",  # the demo lets every development user in
            "request_logging": os.environ.get("SIDECAR_DEV_LOG", "false"),
            # CLI and MCP clients: the sidecar is their OAuth authorization server for /mcp (the demo's MCP server)
            "oauth_server": "true",
            "oauth_resource": "/mcp",
        }
    )
    logs.setup("info")
    runners = [await _serve(demo_app(), port + 1), await _serve(build_app(config), port), provider_runner]
    print(
        f"\n  sidecar demo (development only, NOT for production)\n"
        f"  open  http://{HOST}:{port}/  and sign in as alice or bob\n"
        f"  provider {issuer}  (tokens live 60 s and are refreshed transparently)\n"
        f"  MCP / CLI clients: http://{HOST}:{port}/mcp  (OAuth: device flow or an MCP client; see README)\n"
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
    asyncio.run(main())
