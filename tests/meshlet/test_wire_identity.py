"""Protocol version 3: the join credential and CSR in hello, the certificate in welcome, and
the csr / cert / bundle messages; every new field bounded and typed."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from meshlet.wire import (
    MAX_BUNDLE_PEM,
    MAX_CHAIN_PEM,
    MAX_CSR_PEM,
    MAX_TOKEN_TEXT,
    Bundle,
    Cert,
    ClientConnection,
    Csr,
    Hello,
    Issued,
    ServerConnection,
    Welcome,
    WireError,
    decode_message,
    encode,
)

TOKEN = "mjt_0123456789ab." + "A" * 43
CSR = b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
ISSUED = Issued(b"-----BEGIN CERTIFICATE-----\nleaf\n", b"-----BEGIN CERTIFICATE-----\nroot\n", 1_700_000_000.0)


def _hello(versions: tuple[int, ...] = (1, 2, 3), token: str = TOKEN, csr: bytes = CSR) -> Hello:
    return Hello(versions, "n-1", "user", {"instance_id": "user-1"}, token=token, csr=csr)


def _roundtrip(message: Any) -> Any:
    (body,) = [msgpack.unpackb(encode(message)[4:], raw=False)]
    return decode_message(body)


def test_hello_carries_token_and_csr_and_hides_the_token_from_repr() -> None:
    hello = _hello()
    assert _roundtrip(hello) == hello
    assert TOKEN not in repr(hello) and "A" * 43 not in str(hello)


def test_a_hello_without_credentials_is_byte_for_byte_the_old_one() -> None:
    plain = Hello((1, 2), "n-1", "user", {"instance_id": "user-1"})
    assert "token" not in plain.to_wire() and "csr" not in plain.to_wire()
    assert _roundtrip(plain) == plain


@pytest.mark.parametrize(
    "message",
    [Welcome(3, "cp", 15000, issued=ISSUED), Cert(ISSUED), Csr(CSR), Bundle(ISSUED.bundle)],
    ids=["welcome", "cert", "csr", "bundle"],
)
def test_identity_messages_round_trip(message: Any) -> None:
    assert _roundtrip(message) == message


def _raw(kind: str, **fields: Any) -> dict[str, Any]:
    return {"k": kind, **fields}


ISSUED_RAW = {"chain": ISSUED.chain, "bundle": ISSUED.bundle, "not_after": ISSUED.not_after}


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (_raw("hello", pv=[3], node="n", service="s", instance={}, token=7), "hello.token must be a string"),
        (_raw("hello", pv=[3], node="n", service="s", instance={}, token="x" * (MAX_TOKEN_TEXT + 1)), "at most"),
        (_raw("hello", pv=[3], node="n", service="s", instance={}, csr="text, not bytes"), "must be bytes"),
        (_raw("hello", pv=[3], node="n", service="s", instance={}, csr=b"x" * (MAX_CSR_PEM + 1)), "at most"),
        (_raw("hello", pv=[3], node="n", service="s", instance={}, csr="é".encode()), "not ASCII"),
        (_raw("csr", csr=b"x" * (MAX_CSR_PEM + 1)), "at most"),
        (_raw("csr"), "must be bytes"),
        (_raw("cert", **{**ISSUED_RAW, "chain": b"x" * (MAX_CHAIN_PEM + 1)}), "at most"),
        (_raw("cert", **{**ISSUED_RAW, "bundle": b"x" * (MAX_BUNDLE_PEM + 1)}), "at most"),
        (_raw("cert", **{**ISSUED_RAW, "not_after": "tomorrow"}), "not_after"),
        (_raw("cert", **{**ISSUED_RAW, "not_after": float("nan")}), "not_after"),
        (_raw("cert", **{**ISSUED_RAW, "not_after": True}), "not_after"),
        (_raw("welcome", pv=3, server="cp", cert="a certificate"), "must be a map"),
        (_raw("bundle", bundle=["root"]), "must be bytes"),
    ],
)
def test_identity_fields_are_bounded_and_typed(raw: dict[str, Any], why: str) -> None:
    with pytest.raises(WireError, match=why) as info:
        decode_message(raw)
    assert info.value.reason == "bad-message"


def test_a_version_3_session_carries_the_certificate_and_renews_on_the_channel() -> None:
    server, client = ServerConnection("cp"), ClientConnection(_hello())
    (hello,) = server.receive_data(client.hello())
    assert isinstance(hello, Hello) and hello.token == TOKEN and hello.csr == CSR
    (welcome,) = client.receive_data(server.accept(ISSUED))
    assert isinstance(welcome, Welcome) and welcome.protocol_version == 3 and welcome.issued == ISSUED
    assert server.speaks_identity
    assert server.receive_data(client.csr(CSR)) == [Csr(CSR)]
    assert client.receive_data(encode(Cert(ISSUED)) + encode(Bundle(b"roots"))) == [Cert(ISSUED), Bundle(b"roots")]


def test_identity_messages_need_version_3_both_ways() -> None:
    older = _hello(versions=(1, 2), token="", csr=b"")
    server, client = ServerConnection("cp"), ClientConnection(older)
    server.receive_data(client.hello())
    client.receive_data(server.accept())
    assert client.protocol_version == 2 and not server.speaks_identity
    with pytest.raises(WireError, match="unknown-message"):
        server.receive_data(encode(Csr(CSR)))
    with pytest.raises(WireError, match="unknown-message"):
        client.receive_data(encode(Cert(ISSUED)))
    with pytest.raises(WireError, match="unsupported-version"):
        client.csr(CSR)


def test_a_certificate_is_never_put_in_a_version_2_welcome() -> None:
    server = ServerConnection("cp")
    server.receive_data(ClientConnection(_hello(versions=(1, 2))).hello())
    with pytest.raises(WireError, match="unsupported-version"):
        server.accept(ISSUED)
