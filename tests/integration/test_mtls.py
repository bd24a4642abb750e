"""mTLS between real sidecars: user → item over TLS 1.3 with certificates from
control_plane/ca.py, one pooled connection for many requests and a resumed session for the
next one; the modes (permissive serves plaintext as ``unauthenticated``, strict refuses it,
off dials plaintext); an endpoint that proves another identity, a certificate from another
CA and an expired one refused; ``openssl s_client`` as an independent client."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio

from meshlet import processes

from ..certs import TestCA, sidecar_flags, write_credentials
from ..conftest import need
from ..helpers import raw_exchange, sample, write_static
from ..mesh import Mesh


async def wait_for_200(client: httpx.AsyncClient, url: str, host: str = "item") -> None:
    with trio.fail_after(15):
        while (await client.get(url, headers={"host": host})).status_code != 200:  # noqa: ASYNC110 - another process
            await trio.sleep(0.1)


async def metrics(client: httpx.AsyncClient, sidecar: object) -> str:
    return (await client.get(f"http://{sidecar.admin}/metrics")).text  # type: ignore[attr-defined]


async def test_two_sidecars_talk_mtls_on_one_pooled_connection_and_resume(tmp_path: Path, mesh: Mesh) -> None:
    item = await mesh.origin()
    await mesh.control_plane()
    item_sidecar = await mesh.sidecar("item", app=item)
    user = await mesh.sidecar("user")
    async with httpx.AsyncClient(timeout=10) as client:
        url = f"http://{user.outbound}/info"
        await wait_for_200(client, url)
        for _ in range(30):
            info = await client.get(url, headers={"host": "item", "x-meshlet-source": "gateway"})
            assert info.status_code == 200
            assert not any(name.lower() == "x-meshlet-source" for name, _ in info.json()["headers"])
        caller, callee = await metrics(client, user), await metrics(client, item_sidecar)
        assert sample(caller, "meshlet_tls_handshakes_total", side="client") == 1  # one connection, pooled
        assert sample(callee, "meshlet_tls_handshakes_total", side="server") == 1
        assert sample(callee, "meshlet_requests_total", direction="inbound", source="user") >= 31
        assert sample(callee, "meshlet_requests_total", direction="inbound", source="gateway") == 0

        # Two at once: the second needs a connection of its own, and resumes the first's session.
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(
                    functools.partial(client.get, f"http://{user.outbound}/delay/0.5", headers={"host": "item"})
                )
        caller = await metrics(client, user)
        assert sample(caller, "meshlet_tls_handshakes_total", side="client", resumed="false") == 1
        assert sample(caller, "meshlet_tls_handshakes_total", side="client", resumed="true") == 1


MODE = "kind: Service\nname: item\nmtls: {{mode: {mode}}}\n"


async def test_permissive_strict_and_off(tmp_path: Path, mesh: Mesh) -> None:
    item = await mesh.origin()
    await mesh.control_plane()
    item_sidecar = await mesh.sidecar("item", app=item)
    user = await mesh.sidecar("user")
    inbound = item_sidecar.ports["inbound"]
    plaintext = b"GET /hello HTTP/1.1\r\nHost: item\r\nx-meshlet-source: user\r\nConnection: close\r\n\r\n"
    async with httpx.AsyncClient(timeout=10) as client:
        url = f"http://{user.outbound}/hello"
        await wait_for_200(client, url)

        # permissive (the default): a plaintext caller is served, as unauthenticated
        assert (await raw_exchange(inbound, plaintext)).startswith(b"HTTP/1.1 200 ")
        callee = await metrics(client, item_sidecar)
        assert sample(callee, "meshlet_requests_total", direction="inbound", source="unauthenticated") == 1

        await mesh.apply(MODE.format(mode="strict"))
        for _ in range(3):
            try:
                answer = await raw_exchange(inbound, plaintext)
            except OSError:  # reset, as the peer may see it
                answer = b""
            assert answer == b""
        assert (await client.get(url, headers={"host": "item"})).status_code == 200  # mTLS still served
        callee = await metrics(client, item_sidecar)
        assert sample(callee, "meshlet_plaintext_refused_total") == 3
        assert sample(callee, "meshlet_requests_total", direction="inbound", source="unauthenticated") == 1
        assert item_sidecar.log().count("refused: service item is in strict mTLS mode") == 1  # per burst

        await mesh.apply(MODE.format(mode="off"))
        handshakes = sample(await metrics(client, user), "meshlet_tls_handshakes_total", side="client")
        assert (await client.get(url, headers={"host": "item"})).status_code == 200
        assert sample(await metrics(client, user), "meshlet_tls_handshakes_total", side="client") == handshakes
        callee = await metrics(client, item_sidecar)
        assert sample(callee, "meshlet_requests_total", direction="inbound", source="unauthenticated") == 2
        assert "calls to it are plaintext" in user.log()  # logged loudly


async def test_an_endpoint_proving_another_identity_is_an_error(tmp_path: Path, mesh: Mesh) -> None:
    """user's static file says item's endpoint is a sidecar (an mtls mode): the sidecar
    there proves 'gateway', so the call fails with peer-identity-mismatch, never reaching it."""
    authority = TestCA()
    impostor_app = await mesh.origin()
    impostor = await mesh.sidecar(
        "gateway",
        app=impostor_app,
        static=write_static(tmp_path / "gateway.yaml", {}),
        extra=sidecar_flags(authority, tmp_path, "gateway"),
    )
    address = f"127.0.0.1:{impostor.ports['inbound']}"
    static = write_static(tmp_path / "user.yaml", {"item": {"endpoints": [address], "mtls": {"mode": "permissive"}}})
    user = await mesh.sidecar("user", static=static, extra=sidecar_flags(authority, tmp_path, "user"))
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})
        assert answer.status_code == 502
        assert answer.headers["x-meshlet-error"] == "peer-identity-mismatch"
        assert "'gateway'" in answer.text
        assert impostor_app.stats.served == 0
        caller = await metrics(client, user)
        assert sample(caller, "meshlet_tls_failures_total", side="client", reason="peer-identity-mismatch") >= 1


async def test_a_certificate_from_another_ca_is_refused(tmp_path: Path, mesh: Mesh) -> None:
    authority, stranger = TestCA(), TestCA(seed=2)
    item = await mesh.origin()
    item_sidecar = await mesh.sidecar(
        "item",
        app=item,
        static=write_static(tmp_path / "item.yaml", {}),
        extra=sidecar_flags(authority, tmp_path, "item"),
    )
    # user's certificate is the stranger's; it trusts item's CA all the same
    cert, key, bundle = write_credentials(
        tmp_path / "stranger", dataclasses.replace(stranger.credentials("user"), bundle=authority.bundle)
    )
    address = f"127.0.0.1:{item_sidecar.ports['inbound']}"
    static = write_static(tmp_path / "user.yaml", {"item": {"endpoints": [address], "mtls": {"mode": "strict"}}})
    flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--trust-bundle", str(bundle)]
    user = await mesh.sidecar("user", static=static, extra=flags)
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(3):
            answer = await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})
            assert answer.status_code == 502
            assert answer.headers["x-meshlet-error"] == "tls-handshake-failed"
        assert item.stats.served == 0
        callee = await metrics(client, item_sidecar)
        assert sample(callee, "meshlet_tls_failures_total", side="server", reason="tls-handshake-failed") >= 3
    refusals = [line for line in item_sidecar.log().splitlines() if "mTLS connection from 127.0.0.1 refused" in line]
    assert len(refusals) == 1 and "certificate verify failed" in refusals[0]  # once a burst, saying why


def s_client(port: int, directory: Path, request: bytes) -> str:
    openssl = need("openssl")
    command = [
        openssl,
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-tls1_3",
        "-cert",
        str(directory / "user.crt"),
        "-key",
        str(directory / "user.key"),
        "-CAfile",
        str(directory / "bundle.pem"),
        "-verify_return_error",
        "-ign_eof",
    ]
    done = subprocess.run(command, input=request, capture_output=True, timeout=20, check=False)
    return done.stdout.decode("latin-1") + done.stderr.decode("latin-1")


async def test_openssl_s_client_sees_the_spiffe_id_and_is_served(tmp_path: Path, mesh: Mesh) -> None:
    need("openssl")
    authority = TestCA()
    item = await mesh.origin()
    item_sidecar = await mesh.sidecar(
        "item",
        app=item,
        static=write_static(tmp_path / "item.yaml", {}),
        extra=sidecar_flags(authority, tmp_path, "item"),
    )
    port = item_sidecar.ports["inbound"]
    request = b"GET /hello HTTP/1.1\r\nHost: item\r\nConnection: close\r\n\r\n"
    authority.write(tmp_path / "good", "user")
    output = await trio.to_thread.run_sync(s_client, port, tmp_path / "good", request)
    assert "HTTP/1.1 200 " in output, output
    pem = output[output.index("-----BEGIN CERTIFICATE-----") : output.index("-----END CERTIFICATE-----") + 25]
    names = await trio.run_process(
        [need("openssl"), "x509", "-noout", "-ext", "subjectAltName"], stdin=pem.encode(), capture_stdout=True
    )
    assert "URI:spiffe://meshlet.local/service/item" in names.stdout.decode()

    # an expired client certificate: no answer, counted as a failed handshake
    authority.write(tmp_path / "expired", "user", now=time.time() - 3600, lifetime=60)
    output = await trio.to_thread.run_sync(s_client, port, tmp_path / "expired", request)
    assert "HTTP/1.1" not in output
    async with httpx.AsyncClient(timeout=10) as client:
        callee = await metrics(client, item_sidecar)
    assert sample(callee, "meshlet_tls_failures_total", side="server", reason="tls-handshake-failed") == 1
    assert sample(callee, "meshlet_tls_handshakes_total", side="server") == 1
    assert sample(callee, "meshlet_requests_total", direction="inbound", source="user") == 1


@pytest.mark.parametrize("problem", ["not 0600", "another service's"])
async def test_static_credentials_refused_at_start(tmp_path: Path, problem: str) -> None:
    cert, key, bundle = TestCA().write(tmp_path, "item")
    if problem == "not 0600":
        key.chmod(0o644)
        expected = f"chmod 600 {key}"
    else:
        expected = "the certificate is 'item''s, not --service 'user''s"
    command = [
        *processes.meshlet_command(
            "sidecar",
            "--service",
            "user",
            "--app",
            "127.0.0.1:1",
            "--static",
            str(write_static(tmp_path / "s.yaml", {})),
        ),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--trust-bundle",
        str(bundle),
    ]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 1
    assert expected in done.stderr.decode()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--tls-cert", "c.pem", "--control-plane", "127.0.0.1:1"], "go together: give all three"),
        (
            ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--trust-bundle", "b.pem", "--control-plane", "127.0.0.1:1"],
            "are for a sidecar without a control plane",
        ),
    ],
    ids=["partial", "with-a-control-plane"],
)
async def test_static_credentials_are_refused_where_they_cannot_hold(
    tmp_path: Path, flags: list[str], expected: str
) -> None:
    """Static credentials with a control plane would verify it with one CA while it issues from
    another: refused at start, saying where a root of one's own goes."""
    command = processes.meshlet_command("sidecar", "--service", "user", "--app", "127.0.0.1:1", *flags)
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr.decode()
