"""An "unmodified app" for the transparent-mode tests, run in a network namespace:
``python -m tests.netns_app NAME PORT [PORT...]`` serves every PORT on 0.0.0.0 and answers
any GET with JSON: its name, the port asked, the path, the headers as received and the
peer. Prints ``ready`` once listening. Standard library only, so nothing of meshlet's
is on the app's side."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def handler(name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = json.dumps(
                {
                    "app": name,
                    "port": self.server.server_address[1],
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "peer": self.client_address[0],
                }
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    name, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
    servers = [ThreadingHTTPServer(("0.0.0.0", port), handler(name)) for port in ports]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
