"""The control plane's API over TLS with a read token, as users run it: real processes, real
TLS. `meshlet get` over https with --api-ca (and refused without it, or without a token), a
sidecar posting its spans to the https API, and the files and values refused at start."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import sys
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..conftest import need
from ..helpers import sample
from ..mesh import Mesh

READ_TOKEN = "read-0123456789abcdef"


def write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA (ca.pem) and a server certificate for 127.0.0.1 it signed (api.pem, api.key 0600)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test API CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "control plane")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "api.pem", directory / "api.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


async def meshlet(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_an_https_api_with_a_read_token(mesh: Mesh, tmp_path: Path) -> None:
    ca, cert, key = write_tls_files(tmp_path)
    token_file = tmp_path / "read-token"
    token_file.write_text(READ_TOKEN + "\n")
    token_file.chmod(0o600)
    await mesh.control_plane(
        extra=["--api-tls-cert", str(cert), "--api-tls-key", str(key), "--api-read-token", f"@{token_file}"]
    )
    api = f"https://{mesh.api}"
    item = await mesh.origin()
    item_sidecar = await mesh.sidecar("item", app=item, extra=["--api-ca", str(ca)])
    user = await mesh.sidecar("user", extra=["--api-ca", str(ca)])

    # an independent client: openssl verifies the API's certificate with the CA, over TLS 1.2+
    openssl = await trio.run_process(
        [need("openssl"), "s_client", "-connect", mesh.api, "-CAfile", str(ca), "-verify_return_error", "-brief"],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    said = openssl.stdout.decode() + openssl.stderr.decode()
    assert openssl.returncode == 0 and "Verification: OK" in said and "Protocol version: TLSv1.3" in said, said

    # meshlet get over https: the CA and a token are both needed
    code, out, err = await meshlet("get", "services", "--api", api, "--api-ca", str(ca), "--token", READ_TOKEN)
    assert code == 0, err
    assert {"item", "user"} <= {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
    code, out, err = await meshlet("get", "services", "--api", api, env={"MESHLET_API_CA": str(ca)})
    assert code == 1 and "answered 401" in err and "--api-read-token" in err
    code, out, err = await meshlet("get", "services", "--api", api, "--token", READ_TOKEN)
    assert code == 1 and "--api-ca FILE" in err  # the CA that signed it is not the system's
    code, out, err = await meshlet("get", "services", "--api", mesh.api, "--token", READ_TOKEN)  # plain http
    assert code == 1 and "cannot reach" in err

    # the sidecars were told the API speaks https, and post their spans there
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca), timeout=10) as client:
        with trio.fail_after(20):  # once user's sidecar has item's endpoints
            while (await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})).status_code != 200:  # noqa: ASYNC110 - another process
                await trio.sleep(0.1)
        services: list[str] = []
        with trio.fail_after(20):  # spans are sent in batches, every second: both sidecars' arrive
            while sorted(services) != ["item", "user"]:
                await trio.sleep(0.5)
                answer = await client.get(f"{api}/api/v2/services", headers={"authorization": f"Bearer {READ_TOKEN}"})
                assert answer.status_code == 200, answer.text
                services = answer.json()
        for sidecar in (user, item_sidecar):
            metrics = (await client.get(f"http://{sidecar.admin}/metrics")).text
            assert sample(metrics, "meshlet_spans_dropped_total") == 0


def _cp_args(tmp_path: Path) -> list[str]:
    return ["control-plane", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--data-dir", str(tmp_path / "cp")]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("tls-key-0644", "chmod 600"),
        ("tls-key-only", "give both --api-tls-cert and --api-tls-key"),
        ("tls-mismatched", "cannot use"),
        ("read-token-file-0644", "chmod 600"),
        ("read-token-short", "at least 16"),
        ("read-token-is-write-token", "not the write token"),
        ("api-token-0644", "chmod 600"),
        ("collector-not-host-port", "expected HOST or HOST:PORT"),
    ],
)
async def test_what_the_control_plane_refuses_at_start(tmp_path: Path, setup: str, expected: str) -> None:
    ca, cert, key = write_tls_files(tmp_path)
    data = tmp_path / "cp"
    data.mkdir(mode=0o700)
    extra: list[str] = []
    if setup == "tls-key-0644":
        key.chmod(0o644)
        extra = ["--api-tls-cert", str(cert), "--api-tls-key", str(key)]
    elif setup == "tls-key-only":
        extra = ["--api-tls-key", str(key)]
    elif setup == "tls-mismatched":
        other = tmp_path / "other"
        other.mkdir()
        _, _, other_key = write_tls_files(other)
        extra = ["--api-tls-cert", str(cert), "--api-tls-key", str(other_key)]
    elif setup.startswith("read-token"):
        token = tmp_path / "read-token"
        token.write_text("short" if setup == "read-token-short" else READ_TOKEN)
        token.chmod(0o644 if setup == "read-token-file-0644" else 0o600)
        if setup == "read-token-is-write-token":
            (data / "api-token").write_text(READ_TOKEN + "\n")
            (data / "api-token").chmod(0o600)
        extra = ["--api-read-token", f"@{token}"]
    elif setup == "api-token-0644":
        (data / "api-token").write_text("0" * 64 + "\n")
        (data / "api-token").chmod(0o644)
    elif setup == "collector-not-host-port":
        extra = ["--allowed-collector", "http://zipkin:9411/api/v2/spans"]
    with trio.fail_after(30):
        code, out, err = await meshlet(*_cp_args(tmp_path), *extra)
    assert code in (1, 2) and expected in err, err
    assert "ready" not in out and "Traceback" not in err
    assert READ_TOKEN not in err and "BEGIN" not in err  # never the token nor key material
