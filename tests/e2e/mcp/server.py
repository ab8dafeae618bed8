"""A small MCP server (the official Python SDK's ``MCPServer``, formerly FastMCP) for the upstream behind the sidecar.

Streamable HTTP at ``/mcp``. Its one tool, ``whoami``, reports the identity headers the sidecar forwarded and
whether any ``Authorization`` header it received carried a sidecar-issued token (``sca.``/``scr.``): the tests
assert the sidecar never passes its own tokens through. It has no auth of its own: the sidecar in front is the
resource server. DNS-rebinding protection stays on, with the hosts the sidecar forwards (``--allowed-host``).

Run: ``python tests/e2e/mcp/server.py --port 8765 --allowed-host 127.0.0.1:*``
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.middleware.cors import CORSMiddleware

IDENTITY = (
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-preferred-username",
    "x-forwarded-groups",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-preferred-username",
)
# sca.<grant id>.<secret> (access), scr. (refresh), scc. (code), anywhere in any header value
SIDECAR_TOKEN = re.compile(r"(?<![A-Za-z0-9_.-])sc[acr]\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")

server = MCPServer("sidecar-e2e")


@server.tool()
async def whoami(ctx: Context) -> dict[str, Any]:
    """The identity headers this request carried, and whether a sidecar token reached this server."""
    headers = {k.lower(): v for k, v in (ctx.headers or {}).items()}
    return {
        "identity": {name: headers[name] for name in IDENTITY if name in headers},
        "authorization_present": "authorization" in headers,
        "sidecar_token_seen": any(SIDECAR_TOKEN.search(value) for value in headers.values()),
        "header_names": sorted(headers),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--allowed-host", action="append", default=[])
    # a web page allowed to call it from the browser (the MCP Inspector's direct connection): its Origin passes
    # the DNS-rebinding check and its answers carry that page's CORS headers
    parser.add_argument("--cors-origin", action="append", default=[])
    args = parser.parse_args()
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{args.host}:{args.port}", *args.allowed_host],
        allowed_origins=list(args.cors_origin),
    )
    app = server.streamable_http_app(streamable_http_path="/mcp", transport_security=security, host=args.host)
    if args.cors_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(args.cors_origin),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "mcp-protocol-version", "mcp-session-id", "last-event-id"],
            expose_headers=["Mcp-Session-Id", "Mcp-Protocol-Version"],
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
