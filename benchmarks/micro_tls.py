"""Micro-benchmark: round trips over meshlet.io's TLSConnection, and the same over plain
Connections, on a real loopback pair in one process.

The client sends 1 KB, the server echoes it, N times; what is measured is the CPU time per
round trip of both ends together (sockets, OpenSSL, the Python around them), which is what
mTLS adds to a pooled hop. The contexts are the sidecar's own (sidecar/net/tls.py), with
certificates minted by control_plane/ca.py.

    .venv/bin/python benchmarks/micro_tls.py [N] [--tls-only]

Run it under ``strace -c -f`` for the syscalls per round trip, or ``perf stat -e
instructions`` for the instructions (the setup, a CA and two handshakes, is included: use
N large enough, or subtract a run with N=0). Each variant runs five times; the best is shown.
"""

from __future__ import annotations

import random
import sys
import time

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane import ca
from meshlet.io import Connection, connect, listen_socket, start_tls
from sidecar.core.credentials import Credentials
from sidecar.net.tls import build_context

PAYLOAD = b"x" * 1024
TRUST_DOMAIN = "meshlet.local"


def credentials(root: ca.Root, service: str, rng: random.Random) -> Credentials:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    now = time.time()
    cert = ca.issue(root, csr.public_bytes(serialization.Encoding.PEM), service, TRUST_DOMAIN, now, rng)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Credentials(cert, key_pem, root.certificate_pem(), TRUST_DOMAIN, service, now, now + 86400)


async def loopback_pair() -> tuple[Connection, Connection]:
    listener = listen_socket("127.0.0.1", 0)
    client = await connect("127.0.0.1", listener.getsockname()[1])
    while True:
        try:
            sock, address = listener.accept()
            break
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
    listener.close()
    return Connection(sock, address[0]), client


async def echo(server: Connection, size: int) -> None:
    while True:
        got = 0
        while got < size:
            data = await server.recv()
            if not data:
                return
            got += len(data)
        await server.send_all(PAYLOAD)


async def round_trips(client: Connection, n: int) -> None:
    size = len(PAYLOAD)
    for _ in range(n):
        await client.send_all(PAYLOAD)
        got = 0
        while got < size:
            got += len(await client.recv(wait_first=True))


async def run(n: int, tls: bool, root: ca.Root | None) -> float:
    """CPU seconds per round trip (both ends: one process)."""
    server, client = await loopback_pair()
    if tls:
        assert root is not None
        rng = random.Random(1)
        server_context = build_context(credentials(root, "item", rng), server_side=True)
        client_context = build_context(credentials(root, "user", rng), server_side=False)
        server = start_tls(server, server_context, server_side=True)
        client = start_tls(client, client_context, server_side=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handshake)
            await client.handshake()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo, server, len(PAYLOAD))
        await round_trips(client, 100)  # warm up
        started = time.process_time()
        await round_trips(client, n)
        elapsed = time.process_time() - started
        client.close()
    server.close()
    return elapsed / max(n, 1)


def main() -> None:
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    n = int(args[0]) if args else 20_000
    tls_only = "--tls-only" in sys.argv
    root = ca.create_root(TRUST_DOMAIN, time.time() - 60, random.Random(1))
    variants = [True] if tls_only else [False, True]
    best: dict[bool, float] = {}
    for _ in range(5):
        for tls in variants:
            per = trio.run(run, n, tls, root)
            best[tls] = min(best.get(tls, per), per)
    for tls in variants:
        print(f"{'TLS  ' if tls else 'plain'} {best[tls] * 1e6:7.2f} µs CPU per 1 KB round trip (best of 5, n={n})")
    if not tls_only:
        print(f"TLS adds {(best[True] - best[False]) * 1e6:.2f} µs per round trip")


if __name__ == "__main__":
    main()
