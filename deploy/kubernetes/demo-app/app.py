"""Demo upstream: shows which identity headers reached the application.

Listens on $LISTEN_HOST:$LISTEN_PORT (default 127.0.0.1:8080). Standard
library only, writes nothing to disk.
"""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SHOWN = (
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-groups",
    "x-auth-request-preferred-username",
)


class Handler(BaseHTTPRequestHandler):
    server_version = "demo-app"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            body, kind = b"ok\n", "text/plain"
        else:
            seen = {k: v for k, v in self.headers.items() if k.lower() in SHOWN}
            body = (json.dumps({"path": self.path, "identity": seen}, indent=2) + "\n").encode()
            kind = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    host = os.environ.get("LISTEN_HOST", "127.0.0.1")
    port = int(os.environ.get("LISTEN_PORT", "8080"))
    ThreadingHTTPServer((host, port), Handler).serve_forever()
