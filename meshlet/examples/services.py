"""The demo's services: plain Python HTTP apps that know nothing about the mesh except
where their sidecar's outbound listener is (the HTTP_PROXY way, docs/architecture.md), and pass
the trace headers on from each request to the calls it makes (sidecar/propagation.py).

    python -m meshlet.examples.services item    --port 0 --instance item-1
    python -m meshlet.examples.services user    --port 0 --proxy http://127.0.0.1:15001
    python -m meshlet.examples.services gateway --port 0 --proxy http://127.0.0.1:15001

item:    GET /items/<id>   → {"id", "name", "instance"}
         PUT /fault {"failing": 0.3} → from now on that share of /items answers is a 503
         (the demo's way to make an instance flaky, or fail hard with 1.0); GET /fault
user:    GET /users/<id>   → the user, with the item it calls `item` for
gateway: GET /api/users/<id> → calls `user`
All:     GET /health       → 200
Each prints "listening <port>" once it accepts connections.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from sidecar.propagation import add_trace_headers, incoming


def make_handler(role: str, instance: str, client: httpx.Client | None) -> type[BaseHTTPRequestHandler]:
    fault = {"failing": 0.0, "faults": 0}  # item only: failing on command
    chance = random.Random(instance)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Buffer the response and write it once: head and body in separate small
        # writes meet Nagle and the peer's delayed ACK (40 ms on Linux) on every request.
        wbufsize = 64 * 1024

        def log_message(self, format: str, *args: object) -> None:  # quiet demo
            pass

        def reply(self, status: int, value: object) -> None:
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            incoming(self.headers.items())  # the calls made below continue this request's trace
            parts = self.path.strip("/").split("/")
            if parts == ["health"]:
                return self.reply(200, {"status": "ok", "instance": instance})
            if role == "item" and parts == ["fault"]:
                return self.reply(200, fault)
            if role == "item" and len(parts) == 2 and parts[0] == "items":
                if fault["failing"] and chance.random() < fault["failing"]:
                    fault["faults"] += 1
                    return self.reply(503, {"error": "failing on command", "instance": instance})
                return self.reply(200, {"id": parts[1], "name": f"item {parts[1]}", "instance": instance})
            if role == "user" and len(parts) == 2 and parts[0] == "users":
                assert client is not None
                item = client.get(f"http://item/items/{parts[1]}")
                if item.status_code != 200:
                    return self.reply(
                        502,
                        {
                            "error": "item failed",
                            "status": item.status_code,
                            "mesh_error": item.headers.get("x-meshlet-error"),
                        },
                    )
                return self.reply(200, {"id": parts[1], "name": f"user {parts[1]}", "item": item.json()})
            if role == "gateway" and len(parts) == 3 and parts[:2] == ["api", "users"]:
                assert client is not None
                user = client.get(f"http://user/users/{parts[2]}")
                return self.reply(user.status_code, user.json())
            return self.reply(404, {"error": "no such path", "path": self.path})

        def do_PUT(self) -> None:  # noqa: N802
            if role == "item" and self.path == "/fault":
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))) or b"{}")
                fault["failing"] = float(body.get("failing", 0.0))
                return self.reply(200, fault)
            return self.reply(404, {"error": "no such path", "path": self.path})

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["item", "user", "gateway"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--instance", default="")
    parser.add_argument("--proxy", help="the sidecar's outbound listener, e.g. http://127.0.0.1:15001")
    args = parser.parse_args()
    hooks = {"request": [add_trace_headers]}  # pass the trace on (sidecar/propagation.py)
    client = httpx.Client(proxy=args.proxy, timeout=10, event_hooks=hooks) if args.proxy else None
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.role, args.instance or args.role, client))
    print(f"listening {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
