"""control_plane.joins: who may join (a table on a fixed clock), the burst log, and issuance
for the session's service only, whatever the CSR asks for."""

from __future__ import annotations

import logging
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from control_plane import ca
from control_plane.joins import BurstLog, Joins, decide
from control_plane.tokens import mint
from meshlet import wire

NOW = 1_800_000_000.0
RNG = random.Random(7)
ANY, ANY_RECORD = mint(None, None, NOW - 10, RNG.randbytes)
ITEM, ITEM_RECORD = mint("item", 3600, NOW - 10, RNG.randbytes)
OLD, OLD_RECORD = mint("item", 60, NOW - 120, RNG.randbytes)
RECORDS = {r.id: r for r in (ANY_RECORD, ITEM_RECORD, OLD_RECORD)}
FORGED = ITEM[:-4] + ("AAAA" if not ITEM.endswith("AAAA") else "BBBB")  # a known id, the wrong secret


@pytest.mark.parametrize(
    ("token", "service", "certificate", "reason"),
    [
        ("", "item", None, "missing"),
        (ANY, "item", None, "ok"),
        (ANY, "user", None, "ok"),
        (ITEM, "item", None, "ok"),
        (ITEM, "user", None, "wrong-service"),
        (OLD, "item", None, "expired"),
        (FORGED, "item", None, "invalid"),
        ("mjt_not-a-token", "item", None, "invalid"),
        ("mjt_" + "0" * 12 + "." + "A" * 43, "item", None, "invalid"),  # an id nobody made
        (ANY, "Not A Service", None, "invalid"),
        ("", "item", "item", "ok"),  # a verified client certificate for the service decides
        (ANY, "item", "user", "wrong-service"),  # ... and a token cannot widen it
    ],
)
def test_who_may_join(token: str, service: str, certificate: str | None, reason: str) -> None:
    admission = decide(token, service, RECORDS, NOW, certificate_service=certificate)
    assert admission.reason == reason
    assert admission.ok == (reason == "ok")
    assert admission.service == (service if reason == "ok" else None)
    assert token.split(".")[-1] not in admission.detail or not token  # never the secret


def test_a_certificate_that_did_not_verify_is_refused_whatever_the_token() -> None:
    admission = decide(ANY, "item", RECORDS, NOW, certificate_error="signed by another CA")
    assert (admission.reason, admission.ok) == ("bad-certificate", False)


def test_the_burst_log_logs_the_first_and_counts_the_rest() -> None:
    burst = BurstLog(window=10.0)
    assert [burst.due(t) for t in (0.0, 1.0, 9.9, 10.0, 10.5)] == [True, False, False, True, False]
    assert burst.suppressed == 3


def _csr(names: list[str]) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "item")])
    )
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(n) for n in names]), critical=False
    )
    return key, builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _joins() -> Joins:
    root = ca.create_root("example.org", NOW - 100, random.Random(1))
    return Joins(
        ca.Authority(root),
        lambda: RECORDS,
        token_path="/data/join-token",
        rng=random.Random(2),
        wall=lambda: NOW,
        lifetime=3600,
    )


def test_a_csr_for_another_service_yields_only_the_sessions_service() -> None:
    joins = _joins()
    key, csr = _csr(["spiffe://example.org/service/item", "spiffe://example.org/service/admin"])
    issued = joins.issue(csr, "user")
    leaf = x509.load_pem_x509_certificate(issued.chain)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/service/user"]
    assert leaf.subject == x509.Name([])  # the CSR's CN is ignored too
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    (root,) = x509.load_pem_x509_certificates(issued.bundle)
    leaf.verify_directly_issued_by(root)
    assert issued.not_after == leaf.not_valid_after_utc.timestamp() == NOW + 3600
    assert joins.issued == 1


def test_refusals_are_counted_by_reason_logged_once_per_burst_and_tell_the_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    joins = _joins()
    hellos = [
        wire.Hello((3,), "n", "user", {}, token=""),
        wire.Hello((3,), "n", "user", {}, token=FORGED),
        wire.Hello((3,), "n", "user", {}, token=ITEM),
        wire.Hello((3,), "n", "item", {}, token=OLD),
    ]
    with caplog.at_level(logging.WARNING, logger="meshlet.cp.joins"):
        admissions = [joins.admit(hello, "127.0.0.1", now=float(i)) for i, hello in enumerate(hellos)]
        later = joins.admit(hellos[0], "127.0.0.1", now=60.0)
    assert [a.reason for a in admissions] == ["missing", "invalid", "wrong-service", "expired"]
    assert joins.refused == {"missing": 2, "invalid": 1, "wrong-service": 1, "expired": 1, "bad-certificate": 0}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "3 more refused" in lines[1]
    assert not any(secret in caplog.text for secret in (ITEM.split(".")[1], FORGED.split(".")[1], OLD.split(".")[1]))
    message = joins.refusal(later)
    assert "--join-token @/data/join-token" in message and "meshlet token create --service NAME" in message
    assert joins.admit(wire.Hello((3,), "n", "item", {}, token=ITEM), "127.0.0.1", 61.0).ok
