"""The demo upstream app behind the sidecar in ``make run``. Development only.

Every path answers a page that shows what the sidecar forwarded (identity
headers, token expiry) so a person can watch sign-in and transparent refresh
work. ``/_demo/echo``, ``/_demo/ws`` and ``/_demo/stream`` give the proxy tests
something deterministic to talk to. ``/mcp`` is a minimal MCP server (JSON-RPC:
initialize, tools/list, tools/call ``whoami``) for the sidecar's ``--oauth-resource /mcp``
demo: MCP clients and ``curl`` see who the sidecar says they are.

Run standalone::

    python -m sidecar.dev.demo_app --port 8081
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import time
from collections.abc import Sequence
from typing import Any

import jwt
from aiohttp import WSMsgType, web

IDENTITY_HEADERS = (
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-Auth-Request-Groups",
    "X-Auth-Request-Preferred-Username",
)
TOKEN_HEADERS = ("Authorization", "X-Forwarded-Access-Token")
_SHOWN = {h.lower() for h in (*IDENTITY_HEADERS, *TOKEN_HEADERS)}
MAX_STREAM_CHUNKS = 1000

_SCRIPT = """
(function () {
  var fields = ["user", "email", "groups", "access_token_expires_at", "refresh_count"];
  function show(data, error) {
    fields.forEach(function (f) {
      var cell = document.getElementById("ui-" + f);
      var v = data ? data[f] : undefined;
      if (Array.isArray(v)) { v = v.join(", "); }
      if (f === "access_token_expires_at" && typeof v === "number") {
        v = new Date(v * 1000).toISOString() + " (" + Math.round(v - Date.now() / 1000) + " s)";
      }
      cell.textContent = v === undefined || v === null ? "-" : String(v);
    });
    document.getElementById("ui-status").textContent = error || "ok";
  }
  function poll() {
    fetch("/oauth2/userinfo", {credentials: "same-origin", headers: {Accept: "application/json"}})
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (d) { show(d, null); })
      .catch(function (e) { show(null, String(e)); });
  }
  poll();
  setInterval(poll, 5000);
})();
"""


def _mask(value: str) -> str:
    """Show only the start of a credential: enough to recognise, not enough to reuse."""
    return value[:12] + "\u2026" if len(value) > 12 else value


def _token_expiry(request: web.Request) -> tuple[int, int] | None:
    """``(exp, seconds_left)`` of the forwarded JWT, decoded without verification (display only)."""
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        token = request.headers.get("X-Forwarded-Access-Token", "")
    if not token:
        return None
    try:
        claims = jwt.decode(token.strip(), options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return None
    return int(exp), int(exp - time.time())


def _rows(pairs: Sequence[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(v)}</code></td></tr>" for k, v in pairs)


def render_page(request: web.Request) -> str:
    """The HTML of the demo page; every request-derived value is escaped."""
    identity = [(h, request.headers.get(h, "(absent)")) for h in IDENTITY_HEADERS]
    identity += [(h, _mask(request.headers[h]) if h in request.headers else "(absent)") for h in TOKEN_HEADERS]
    others = [(k, v) for k, v in request.headers.items() if k.lower() not in _SHOWN]
    expiry = _token_expiry(request)
    if expiry is None:
        token_line = "No bearer JWT was forwarded."
    else:
        exp, left = expiry
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(exp))
        token_line = f"Access token exp = {exp} ({when}), {left} s left."
    userinfo_rows = "".join(
        f"<tr><th>{f}</th><td id='ui-{f}'>-</td></tr>"
        for f in ("user", "email", "groups", "access_token_expires_at", "refresh_count")
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='refresh' content='20'>"
        "<title>sidecar demo app</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
        "code{word-break:break-all}</style></head><body>"
        "<h1>sidecar demo app</h1>"
        f"<p><b>{html.escape(request.method)}</b> <code>{html.escape(request.path_qs)}</code>"
        " &middot; <a href='/oauth2/sign_out'>Sign out</a></p>"
        f"<p id='token-expiry'>{html.escape(token_line)} (page reloads every 20 s)</p>"
        "<h2>Identity headers received</h2>"
        f"<table>{_rows(identity)}</table>"
        "<h2>Session (live from /oauth2/userinfo every 5 s)</h2>"
        f"<table>{userinfo_rows}<tr><th>status</th><td id='ui-status'>-</td></tr></table>"
        "<h2>Other request headers</h2>"
        f"<table>{_rows(others)}</table>"
        f"<script>{_SCRIPT}</script>"
        "</body></html>"
    )


async def page(request: web.Request) -> web.Response:
    """Catch-all: the human-facing page."""
    return web.Response(text=render_page(request), content_type="text/html", headers={"Cache-Control": "no-store"})


async def echo(request: web.Request) -> web.Response:
    """What arrived, as JSON, so proxy tests can assert on forwarded requests."""
    body = await request.read()
    data: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "query": {k: request.query.getall(k) for k in request.query},
        "headers": {k: ", ".join(request.headers.getall(k)) for k in request.headers},
        "body_length": len(body),
    }
    return web.json_response(data)


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    """Echo every text and binary message back, for WebSocket proxying tests."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def stream(request: web.Request) -> web.StreamResponse:
    """``n`` chunks with small sleeps, to prove the proxy streams instead of buffering."""
    try:
        n = int(request.query.get("n", "5"))
        delay = float(request.query.get("delay", "0.05"))
    except ValueError:
        raise web.HTTPBadRequest(text="n must be an integer, delay a number") from None
    n = max(0, min(n, MAX_STREAM_CHUNKS))
    delay = max(0.0, min(delay, 5.0))
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    for i in range(n):
        await resp.write(f"chunk {i}\n".encode())
        if delay and i + 1 < n:
            await asyncio.sleep(delay)
    await resp.write_eof()
    return resp


# --- /mcp: a minimal MCP server (JSON-RPC over streamable HTTP, JSON responses only) -----------------------------

MCP_PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")
MCP_MAX_BODY = 64 * 1024
WHOAMI_TOOL = {
    "name": "whoami",
    "description": "Who the sidecar says is calling: the identity headers this request carried.",
    "inputSchema": {"type": "object", "properties": {}, "additionalProperties": False},
}


def whoami(request: web.Request) -> dict[str, Any]:
    """The identity the sidecar forwarded; the Authorization header only as present/absent (never its value)."""
    identity = {h: request.headers[h] for h in IDENTITY_HEADERS if h in request.headers}
    return {"identity": identity, "authorization_forwarded": "Authorization" in request.headers}


def _rpc_result(rpc_id: Any, result: dict[str, Any]) -> web.Response:
    return web.json_response({"jsonrpc": "2.0", "id": rpc_id, "result": result})


def _rpc_error(rpc_id: Any, code: int, message: str, status: int = 200) -> web.Response:
    body = {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": code, "message": message}}
    return web.json_response(body, status=status)


def _mcp_call(request: web.Request, rpc_id: Any, method: str, params: dict[str, Any]) -> web.Response:
    """One request: initialize, ping, tools/list, tools/call whoami; anything else is method-not-found."""
    if method == "initialize":
        asked = params.get("protocolVersion")
        version = asked if asked in MCP_PROTOCOL_VERSIONS else MCP_PROTOCOL_VERSIONS[0]
        info = {"name": "sidecar-demo", "version": "1"}
        return _rpc_result(rpc_id, {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": info})
    if method == "ping":
        return _rpc_result(rpc_id, {})
    if method == "tools/list":
        return _rpc_result(rpc_id, {"tools": [WHOAMI_TOOL]})
    if method == "tools/call":
        if params.get("name") != "whoami":
            return _rpc_error(rpc_id, -32602, "unknown tool")
        data = whoami(request)
        text = json.dumps(data, indent=2)
        return _rpc_result(rpc_id, {"content": [{"type": "text", "text": text}], "structuredContent": data})
    return _rpc_error(rpc_id, -32601, "method not found")


async def mcp(request: web.Request) -> web.StreamResponse:
    """POST /mcp: the MCP streamable HTTP transport reduced to single JSON-RPC messages answered with JSON.

    Notifications and responses get 202; GET (the server-to-client stream) and DELETE (session end) get
    405, which the transport allows: this server keeps no sessions and never calls the client.
    """
    if request.method != "POST":
        return web.Response(status=405, headers={"Allow": "POST"})
    if request.content_length is not None and request.content_length > MCP_MAX_BODY:
        return _rpc_error(None, -32600, "request too large", status=413)
    raw = await request.content.read(MCP_MAX_BODY + 1)
    try:
        message = json.loads(raw) if len(raw) <= MCP_MAX_BODY else None
    except (ValueError, RecursionError):
        return _rpc_error(None, -32700, "parse error", status=400)
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return _rpc_error(None, -32600, "one JSON-RPC 2.0 message per request", status=400)
    method, params = message.get("method"), message.get("params") or {}
    if "id" not in message or not isinstance(method, str):
        return web.Response(status=202)  # a notification or a response: nothing to answer
    if not isinstance(params, dict):
        return _rpc_error(message["id"], -32602, "params must be an object")
    return _mcp_call(request, message["id"], method, params)


def demo_app() -> web.Application:
    """The demo upstream application."""
    app = web.Application()
    app.router.add_route("*", "/_demo/echo", echo)
    app.router.add_get("/_demo/ws", ws_echo)
    app.router.add_get("/_demo/stream", stream)
    app.router.add_route("*", "/mcp", mcp)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the demo app standalone."""
    parser = argparse.ArgumentParser(prog="python -m sidecar.dev.demo_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)

    def banner(_: str) -> None:
        print(f"demo app listening on http://{args.host}:{args.port}", flush=True)

    web.run_app(demo_app(), host=args.host, port=args.port, print=banner, access_log=None)


if __name__ == "__main__":
    main()
