"""Joining the mesh, with real processes: a hello that proves nothing is refused, counted and
registers nothing; a sidecar with a token gets a certificate naming exactly its service,
renews it on its live channel and keeps it across a restart while the control plane is away;
`meshlet token create` mints scoped tokens that survive a control-plane restart. No token
ever reaches a log."""

from __future__ import annotations

import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane import ca
from meshlet import wire

from ..certs import TRUST_DOMAIN, TestCA, write_credentials
from ..conftest import need
from ..helpers import SidecarProcess, join_token, run_sidecar, sample
from ..mesh import Mesh
from .test_control_plane import eventually

INSTANCE = {"address": "127.0.0.1:9", "admin": "127.0.0.1:9"}


def _csr(*uris: str) -> bytes:
    """A CSR that asks for ``uris`` (the control plane must ignore them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        names = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(names, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


async def _session(port: int, hello: wire.Hello, *then: wire.Message) -> list[wire.Message]:
    """Say hello, then (once welcomed) send ``then``; every message until the close, or 3 s."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    decoder = wire.FrameDecoder()
    received: list[wire.Message] = []
    with trio.move_on_after(3):
        await stream.send_all(wire.encode(hello))
        while not received:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            received += decoder.feed(chunk)
        if received and isinstance(received[0], wire.Welcome):
            for message in then:
                await stream.send_all(wire.encode(message))
        while chunk := await stream.receive_some(65536):
            received += decoder.feed(chunk)
    await stream.aclose()
    return received


def _hello(service: str, token: str, csr: bytes = b"") -> wire.Hello:
    # An instance id of its own per service: a registration outlives its session (its lease), and
    # the control plane refuses another identity's claim on it.
    instance = {"instance_id": f"{service}-1", **INSTANCE}
    return wire.Hello(wire.PROTOCOL_VERSIONS, f"n-{service}", service, instance, token=token, csr=csr)


def _spiffe_ids(chain: bytes) -> list[str]:
    leaf = x509.load_pem_x509_certificate(chain)
    return leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


async def _get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url)


async def _token_create(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "meshlet", "token", "create", *args]
    command += ["--api", mesh.api, "--token-file", str(mesh.token_file)]
    return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)


async def test_a_hello_that_proves_nothing_is_refused_counted_and_registers_nothing(mesh: Mesh) -> None:
    cp = await mesh.control_plane()
    port = cp.ports["push"]
    minted = await _token_create(mesh, "--service", "item")
    item_token = minted.stdout.decode().strip()
    short = (await _token_create(mesh, "--service", "user", "--ttl", "1s")).stdout.decode().strip()
    forged = item_token[:-4] + ("AAAA" if not item_token.endswith("AAAA") else "BBBB")
    cases = [
        ("", "missing"),
        (forged, "invalid"),
        ("mjt_nonsense", "invalid"),
        (item_token, "wrong-service"),  # scoped to item, presented by user
    ]
    for token, reason in cases:
        (error,) = await _session(port, _hello("user", token, _csr()))
        assert isinstance(error, wire.Error) and error.reason == "join-refused", error
        assert f"join refused ({reason})" in error.message
        assert "--join-token @" in error.message and "meshlet token create --service NAME" in error.message

    async def expired() -> bool:  # user's 1 s token, presented by item: expired once its second is over
        (error,) = await _session(port, _hello("item", short))
        assert isinstance(error, wire.Error)
        return "join refused (expired)" in error.message

    await eventually(expired, "the 1 s token expires")
    metrics = (await _get(f"http://{mesh.api}/metrics")).text
    for reason, count in (("missing", 1), ("invalid", 2)):
        assert sample(metrics, "meshlet_cp_joins_refused_total", reason=reason) == count, reason
    assert sample(metrics, "meshlet_cp_joins_refused_total", reason="wrong-service") >= 1
    assert sample(metrics, "meshlet_cp_joins_refused_total", reason="expired") == 1
    assert sample(metrics, "meshlet_cp_certificates_issued_total") == 0
    assert (await _get(f"http://{mesh.api}/v1/services")).json() == {"services": []}
    assert (await _get(f"http://{mesh.api}/v1/status")).json()["sidecars"] == []
    log = cp.log()
    refusals = sample(metrics, "meshlet_cp_joins_refused_total")
    assert 1 <= log.count("join refused") < refusals  # the first of a burst logged; the rest counted
    for token in (item_token, short, forged, join_token(mesh.tmp_path)):
        assert token.split(".")[1] not in log


async def test_a_csr_for_another_service_still_yields_only_the_sessions_service(mesh: Mesh) -> None:
    cp = await mesh.control_plane()
    token = join_token(mesh.tmp_path)
    greedy = _csr("spiffe://meshlet.local/service/item", "spiffe://meshlet.local/service/user")
    messages = await _session(cp.ports["push"], _hello("user", token, greedy), wire.Csr(greedy))
    welcome = messages[0]
    assert isinstance(welcome, wire.Welcome) and welcome.protocol_version == 3 and welcome.issued is not None
    renewed = next(m for m in messages if isinstance(m, wire.Cert))
    root = x509.load_pem_x509_certificate((mesh.tmp_path / "cp" / "ca" / "ca.crt").read_bytes())
    for issued in (welcome.issued, renewed.issued):
        assert _spiffe_ids(issued.chain) == ["spiffe://meshlet.local/service/user"]
        x509.load_pem_x509_certificate(issued.chain).verify_directly_issued_by(root)
        assert x509.load_pem_x509_certificates(issued.bundle) == [root]


async def test_a_sidecar_joins_gets_its_certificate_and_renews_it_on_the_live_channel(
    mesh: Mesh, tmp_path: Path
) -> None:
    cp = await mesh.control_plane(extra=["--cert-lifetime", "6s"])  # renewal due after ~4 s
    item = await mesh.sidecar("item")
    data = tmp_path / "data-item"
    dump = await _wait_for_renewals(item, 3)
    identity = dump["control_plane"]["identity"]
    assert identity["spiffe_id"] == "spiffe://meshlet.local/service/item" and identity["state"] == "valid"
    assert cp.log().count("sidecar item-") == 1  # one session: renewed on it, never reconnected
    chain = (data / "item.crt").read_bytes()
    assert _spiffe_ids(chain) == ["spiffe://meshlet.local/service/item"]
    for name in ("item.key", "item.crt", "item.bundle.pem"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    ca_file = tmp_path / "cp" / "ca" / "ca.crt"
    openssl = need("openssl")
    verified = await trio.run_process(
        [openssl, "verify", "-CAfile", str(ca_file), str(data / "item.crt")], capture_stdout=True, check=False
    )
    assert verified.returncode == 0 and b": OK" in verified.stdout
    metrics = (await _get(f"http://{item.admin}/metrics")).text
    assert 0 < sample(metrics, "meshlet_certificate_expiry_seconds") <= 6
    assert (await _get(f"http://{item.admin}/ready")).status_code == 200
    token = join_token(tmp_path)
    for process in (cp, item):
        assert token.split(".")[1] not in process.log()
    assert token.split(".")[1] not in (await _get(f"http://{item.admin}/config_dump")).text


async def _wait_for_renewals(sidecar: SidecarProcess, count: int) -> dict:  # type: ignore[type-arg]
    dump: dict = {}  # type: ignore[type-arg]

    async def renewed() -> bool:
        nonlocal dump
        dump = (await _get(f"http://{sidecar.admin}/config_dump")).json()
        identity = dump["control_plane"]["identity"] or {}
        return bool(identity.get("renewals", 0) >= count)

    await eventually(renewed, f"{count} certificates installed", timeout=30)
    return dump


async def test_a_restarted_sidecar_keeps_its_certificate_while_the_control_plane_is_away(
    mesh: Mesh, tmp_path: Path
) -> None:
    cp = await mesh.control_plane()
    item = await mesh.sidecar("item")
    await _wait_for_renewals(item, 1)
    key = (tmp_path / "data-item" / "item.key").read_bytes()
    await mesh.stop(item)
    await mesh.stop(cp)
    again = await mesh.sidecar("item")  # its control plane is gone
    dump = (await _get(f"http://{again.admin}/config_dump")).json()
    assert dump["control_plane"]["connected"] is False
    assert dump["control_plane"]["identity"]["state"] == "valid"
    assert (await _get(f"http://{again.admin}/ready")).status_code == 200
    assert (tmp_path / "data-item" / "item.key").read_bytes() == key  # the same key
    assert "using the persisted certificate" in again.log()


async def test_a_minted_token_survives_a_restart_and_joins_only_its_service(mesh: Mesh) -> None:
    await mesh.control_plane()
    minted = await _token_create(mesh, "--service", "item", "--ttl", "1h")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.decode()
    assert token.count("\n") == 1 and token.startswith("mjt_")  # the token alone on stdout
    token = token.strip()
    assert "valid until" in minted.stderr.decode()
    assert (await _token_create(mesh, "--ttl", "0s")).returncode != 0
    unauthorized = await trio.run_process(
        [sys.executable, "-m", "meshlet", "token", "create", "--api", mesh.api, "--token", "wrong"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert unauthorized.returncode == 1 and b"401" in unauthorized.stderr and unauthorized.stdout == b""
    assert mesh.cp is not None
    await mesh.stop(mesh.cp)
    cp = await mesh.control_plane()  # the same data directory: the record is in its store
    user = await mesh.sidecar("user", extra=["--join-token", token])
    item = await mesh.sidecar("item", extra=["--join-token", token])
    await _wait_for_renewals(item, 1)

    async def refused() -> bool:
        return "join refused (wrong-service)" in user.log()

    await eventually(refused, "user's sidecar is refused and says why")
    assert "meshlet token create --service NAME" in user.log()
    ready = await _get(f"http://{user.admin}/ready")
    assert ready.status_code == 503  # no configuration and no certificate: it never joined
    services = {s["name"] for s in (await _get(f"http://{mesh.api}/v1/services")).json()["services"]}
    assert services == {"item"}
    for process in (cp, user, item):
        assert token.split(".")[1] not in process.log()


@pytest.mark.parametrize("flag", ["--trust-domain", "--ca-cert"])
async def test_a_control_plane_that_cannot_have_a_ca_says_why(tmp_path: Path, flag: str) -> None:
    value = "Not A Domain" if flag == "--trust-domain" else str(tmp_path / "missing.crt")
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", "control-plane", "--data-dir", str(tmp_path / "cp"), flag, value],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode in (1, 2)
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr
    assert ("not a trust domain" in stderr) if flag == "--trust-domain" else ("--ca-key go together" in stderr)


async def test_without_a_token_a_sidecar_warns_at_start(tmp_path: Path, mesh: Mesh) -> None:
    await mesh.control_plane()
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", control_plane=mesh.push, join_token="") as s:

        async def refused() -> bool:
            return "join refused (missing)" in s.log()

        await eventually(refused, "the sidecar logs the refusal")
    assert "no --join-token" in s.log()


# --- the push channel over TLS ------------------------------------------------------------------


def _client_context(tmp_path: Path, credentials: object | None) -> ssl.SSLContext:
    """A client of the push channel; with ``credentials`` (tests/certs.py), it presents them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # what the control plane proves is read below
    if credentials is not None:
        cert, key, _ = write_credentials(tmp_path / "client", credentials)  # type: ignore[arg-type]
        context.load_cert_chain(cert, key)
    return context


def _credentials_from_cp_ca(tmp_path: Path, service: str) -> object:
    """A certificate for ``service`` from the control plane's own CA (as if it had issued it)."""
    root = ca.read_root(tmp_path / "cp" / "ca", TRUST_DOMAIN, time.time())
    test_ca = TestCA()
    test_ca.root = root
    return test_ca.credentials(service)


async def _tls_session(port: int, context: ssl.SSLContext, hello: wire.Hello) -> tuple[list[wire.Message], list[str]]:
    """Over TLS: say hello; every message until the close (or 3 s), and the URI SANs of the
    control plane's certificate. A refused handshake: ([], [])."""
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context)
    decoder = wire.FrameDecoder()
    received: list[wire.Message] = []
    try:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
        uris = _spiffe_ids(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
        with trio.move_on_after(3):
            await stream.send_all(wire.encode(hello))
            while chunk := await stream.receive_some(65536):
                received += decoder.feed(bytes(chunk))
                if received and isinstance(received[0], wire.Welcome):
                    break
    except trio.BrokenResourceError:
        return received, []
    finally:
        with trio.move_on_after(1):
            await stream.aclose()
    return received, uris


async def test_over_tls_a_client_certificate_proves_its_service_and_only_it(mesh: Mesh, tmp_path: Path) -> None:
    cp = await mesh.control_plane()
    port = cp.ports["push"]
    item = _client_context(tmp_path, _credentials_from_cp_ca(tmp_path, "item"))
    messages, uris = await _tls_session(port, item, _hello("item", ""))
    assert uris == [f"spiffe://{TRUST_DOMAIN}/control-plane"]
    assert isinstance(messages[0], wire.Welcome)  # no token: the certificate proved item
    (refused,), _ = await _tls_session(port, item, _hello("user", join_token(tmp_path)))
    assert isinstance(refused, wire.Error) and "join refused (wrong-service)" in refused.message
    stranger = _client_context(tmp_path, TestCA(seed=9).credentials("item"))  # another CA
    assert await _tls_session(port, stranger, _hello("item", join_token(tmp_path))) == ([], [])
    anonymous = _client_context(tmp_path, None)  # TLS without a certificate: the token decides
    messages, _ = await _tls_session(port, anonymous, _hello("gateway", join_token(tmp_path)))
    assert isinstance(messages[0], wire.Welcome)
    metrics = (await _get(f"http://{mesh.api}/metrics")).text
    assert sample(metrics, "meshlet_cp_joins_refused_total", reason="bad-certificate") == 1
    assert sample(metrics, "meshlet_cp_joins_refused_total", reason="wrong-service") == 1


async def test_a_sidecar_verifies_the_control_plane_with_its_ca(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.control_plane()
    other = tmp_path / "other-ca.crt"
    other.write_bytes(TestCA(seed=9).bundle)
    fooled = await mesh.sidecar("user", extra=["--control-plane-ca", str(other)])
    pinned = await mesh.sidecar("item", extra=["--control-plane-ca", str(tmp_path / "cp" / "ca" / "ca.crt")])
    await _wait_for_renewals(pinned, 1)
    assert "trusting the control plane on first use" not in pinned.log()

    async def refused() -> bool:
        return "TLS with the control plane failed" in fooled.log()

    await eventually(refused, "the sidecar that trusts another CA refuses the control plane")
    dump = (await _get(f"http://{fooled.admin}/config_dump")).json()
    assert dump["control_plane"]["connected"] is False and dump["control_plane"]["identity"]["state"] == "none"
    first_use = await mesh.sidecar("gateway")
    await _wait_for_renewals(first_use, 1)
    log = first_use.log()
    assert "trusting the control plane on first use" in log
    fingerprint = log.split("fingerprint is ", 1)[1].split()[0]
    assert mesh.cp is not None and f"SHA-256 fingerprint {fingerprint}" in mesh.cp.log()  # the one it logged
