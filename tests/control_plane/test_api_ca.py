"""/v1/ca (control_plane/api/ca.py) and what /v1/status adds for `meshlet check`: the CA's
roots without key material, and the policy's mTLS modes."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from hypercorn.config import Config
from hypercorn.trio import serve

from control_plane.api import build_api
from control_plane.api.status import mtls_modes
from control_plane.joins import Joins
from control_plane.policies import PolicyStore
from control_plane.registry import Registry
from control_plane.server import PushServer
from control_plane.store import MemoryStore
from meshlet import __version__
from meshlet.policy import load_documents

from ..helpers import in_process_joins


async def serve_api(nursery: trio.Nursery, joins: Joins | None) -> str:
    push = PushServer(Registry(), policies=PolicyStore(MemoryStore()), joins=joins)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds = await nursery.start(partial(serve, build_api(push, token="s3cret"), config))  # type: ignore[arg-type]
    return str(binds[0])


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield http


async def test_the_ca_shows_its_roots_and_no_key(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    joins, _ = in_process_joins()
    first = joins.authority.current
    joins.authority = joins.authority.rotate(time.time(), random.Random(8))  # the old root in its overlap
    base = await serve_api(nursery, joins)
    answer = await client.get(f"{base}/v1/ca")
    assert answer.status_code == 200
    ca = answer.json()
    current = joins.authority.current.certificate
    der = current.public_bytes(serialization.Encoding.DER)
    assert ca["trust_domain"] == "meshlet.local"
    assert ca["root"] == {
        "fingerprint_sha256": hashlib.sha256(der).hexdigest(),
        "subject": current.subject.rfc4514_string(),
        "not_before": current.not_valid_before_utc.timestamp(),
        "not_after": current.not_valid_after_utc.timestamp(),
    }
    fingerprints = [root["fingerprint_sha256"] for root in ca["bundle"]]
    old = hashlib.sha256(first.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert fingerprints == [ca["root"]["fingerprint_sha256"], old]  # the current root first
    assert abs(ca["now"] - time.time()) < 60
    text = answer.text
    assert "PRIVATE" not in text and "BEGIN" not in text  # neither a key nor any PEM
    for root in (first, joins.authority.current):
        assert root.private_key_pem().decode().splitlines()[1] not in text
    assert (await client.post(f"{base}/v1/ca")).status_code == 405  # GET only


async def test_a_control_plane_without_a_ca_says_so(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    base = await serve_api(nursery, None)
    answer = await client.get(f"{base}/v1/ca")
    assert answer.status_code == 404 and answer.json() == {
        "problems": ["this control plane has no certificate authority"]
    }
    status = (await client.get(f"{base}/v1/status")).json()
    assert status["version"] == __version__
    assert status["mtls"] == {"mode": "permissive", "services": {}}  # no policy applied: the default


@pytest.mark.parametrize(
    ("policy", "modes"),
    [
        ("", {"mode": "permissive", "services": {}}),
        ("kind: MeshConfig\nname: mesh\nmtls: {mode: strict}\n", {"mode": "strict", "services": {}}),
        (
            "kind: MeshConfig\nname: mesh\nmtls: {mode: strict}\n---\nkind: Service\nname: db\nmtls: {mode: off}\n"
            "---\nkind: Service\nname: item\n",
            {"mode": "strict", "services": {"db": "off"}},
        ),
    ],
)
def test_the_mtls_modes_are_the_policys(policy: str, modes: dict[str, object]) -> None:
    assert mtls_modes(load_documents([("p.yaml", policy)]) if policy else []) == modes
