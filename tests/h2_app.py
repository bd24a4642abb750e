"""An app that speaks HTTP/2 (hypercorn: h2c by prior knowledge, and HTTP/1.1), run as a
process of its own for the HTTP/2 upstream tests: ``python -m tests.h2_app`` prints
``ready PORT`` once it listens on 127.0.0.1.

Paths:
  /info           JSON: http_version, method, path, headers as the app got them
  /bytes/N        N bytes, streamed in 64 KiB pieces, no content-length
  /sha256         reads the body as it streams in; answers "<length> <sha256>"
  /gather/N       answers once N requests to /gather/N are under way at once
  /stats          JSON: connections (distinct client ports seen), disconnects
  /slow           never answers; counts the request's disconnect when it comes
  /trailers       "body", then the trailers grpc-status: 0 and x-end: yes (with te: trailers)
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

PIECE = 64 * 1024
clients: set[int] = set()
disconnects = [0]
gatherings: dict[int, tuple[list[int], trio.Event]] = {}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    clients.add(scope["client"][1])
    path = scope["path"]
    if path == "/info":
        info = {
            "http_version": scope["http_version"],
            "method": scope["method"],
            "path": path,
            "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
        }
        await answer(send, json.dumps(info).encode())
    elif path.startswith("/bytes/"):
        size = int(path.split("/")[2])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        piece = b"b" * PIECE
        while size > 0:
            await send({"type": "http.response.body", "body": piece[:size], "more_body": True})
            size -= PIECE
        await send({"type": "http.response.body", "body": b""})
    elif path == "/sha256":
        digest, length, more = hashlib.sha256(), 0, True
        while more:
            message = await receive()
            body = message.get("body", b"")
            digest.update(body)
            length += len(body)
            more = message.get("more_body", False)
        await answer(send, f"{length} {digest.hexdigest()}".encode())
    elif path.startswith("/gather/"):
        wanted = int(path.split("/")[2])
        count, everyone = gatherings.setdefault(wanted, ([0], trio.Event()))
        count[0] += 1
        if count[0] >= wanted:
            everyone.set()
        await everyone.wait()
        await answer(send, b"gathered")
    elif path == "/stats":
        await answer(send, json.dumps({"connections": len(clients), "disconnects": disconnects[0]}).encode())
    elif path == "/slow":
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnects[0] += 1
    elif path == "/trailers":
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"body"})
        trailers = [(b"grpc-status", b"0"), (b"x-end", b"yes")]
        await send({"type": "http.response.trailers", "headers": trailers, "more_trailers": False})
    else:
        await answer(send, b"not found", 404)


async def answer(send: Any, body: bytes, status: int = 200) -> None:
    headers = [(b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def main() -> None:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, config)
        print("ready", binds[0].rsplit(":", 1)[1], flush=True)


if __name__ == "__main__":
    sys.exit(trio.run(main))
