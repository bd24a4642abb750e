"""The gRPC origin of benchmarks/run.py: a grpcio server whose one unary method,
``/bench.Echo/Echo``, answers the request's bytes back (no protobuf: the generic handler
takes and returns raw bytes). It binds 127.0.0.1:0 and prints its ready line,
``grpc echo ready listen=127.0.0.1:PORT``, then serves until SIGTERM.

Usage: python benchmarks/grpc_echo.py [WORKERS]
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures

import grpc

SERVICE, METHOD = "bench.Echo", "Echo"


def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def main(argv: list[str]) -> int:
    workers = int(argv[1]) if len(argv) > 1 else 4
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    handler = grpc.unary_unary_rpc_method_handler(echo)  # no (de)serializers: bytes in, bytes out
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    print(f"grpc echo ready listen=127.0.0.1:{port}", flush=True)
    stop.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
