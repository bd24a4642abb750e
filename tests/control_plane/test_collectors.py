"""Where sidecars may send their spans: MeshConfig's tracing.collector is an http(s) URL
(meshlet/schema.py), and a control plane given --allowed-collector refuses any other host
(control_plane/collectors.py, checked by the policy store on apply, rollback and load)."""

from __future__ import annotations

import pytest

from control_plane.collectors import collector_problems, parse_allowed
from control_plane.policies import PolicyStore
from control_plane.store import MemoryStore
from meshlet.policy import PolicyError, load_documents


def mesh_config(collector: str) -> str:
    return f'kind: MeshConfig\nname: mesh\ntracing: {{collector: "{collector}"}}\n'


@pytest.mark.parametrize(
    ("collector", "problem"),
    [
        ("file:///etc/passwd", "must be an http:// or https:// URL"),
        ("gopher://127.0.0.1:70/_GET", "its scheme is 'gopher'"),
        ("ftp://zipkin/spans", "its scheme is 'ftp'"),
        ("zipkin:9411", "its scheme is 'zipkin'"),
        ("/api/v2/spans", "it has no scheme"),
        ("http:///api/v2/spans", "must name a host"),
        ("http://zipkin:0/api/v2/spans", "must name a host (and a port above 0)"),
        ("http://zipkin:x/api/v2/spans", "not a URL the sidecars can send spans to"),
        ("http://[::1/api/v2/spans", "not a URL the sidecars can send spans to"),
    ],
)
def test_a_collector_that_is_not_an_http_url_is_refused(collector: str, problem: str) -> None:
    with pytest.raises(PolicyError) as refused:
        load_documents([("mesh.yaml", mesh_config(collector))])
    (said,) = refused.value.problems
    assert said.startswith("mesh.yaml:3: tracing.collector: ") and problem in said


@pytest.mark.parametrize(
    "collector", ["http://zipkin:9411/api/v2/spans", "https://zipkin.example.com/api/v2/spans", "http://[::1]:9411/"]
)
def test_http_and_https_collectors_are_accepted(collector: str) -> None:
    (document,) = load_documents([("mesh.yaml", mesh_config(collector))])
    assert document.tracing.collector == collector  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("zipkin", ("zipkin", None)),
        ("Zipkin:9411", ("zipkin", 9411)),
        ("10.0.0.7:9411", ("10.0.0.7", 9411)),
        ("[::1]:9411", ("::1", 9411)),
    ],
)
def test_parse_allowed(entry: str, parsed: tuple[str, int | None]) -> None:
    assert parse_allowed(entry) == parsed


@pytest.mark.parametrize("entry", ["", "http://zipkin:9411", "zipkin:9411/api", "user@zipkin", "zipkin:x", ":9411"])
def test_parse_allowed_refuses_what_is_not_host_port(entry: str) -> None:
    with pytest.raises(ValueError, match="expected HOST or HOST:PORT"):
        parse_allowed(entry)


ALLOW = (("zipkin", 9411), ("collector.example.com", None))


@pytest.mark.parametrize(
    ("collector", "allowed"),
    [
        ("http://zipkin:9411/api/v2/spans", True),
        ("http://ZIPKIN:9411/api/v2/spans", True),
        ("http://zipkin:9412/api/v2/spans", False),  # the port is listed: only that one
        ("http://zipkin/api/v2/spans", False),  # port 80
        ("https://collector.example.com/api/v2/spans", True),  # no port listed: any
        ("https://collector.example.com:8443/api/v2/spans", True),
        ("http://169.254.169.254/latest/meta-data", False),
        ("http://zipkin.evil:9411/api/v2/spans", False),
        ("http://zipkin:9411@evil:9411/api/v2/spans", False),  # userinfo is not the host
    ],
)
def test_collector_problems(collector: str, allowed: bool) -> None:
    documents = load_documents([("mesh.yaml", mesh_config(collector))])
    problems = collector_problems(documents, ALLOW)
    assert problems == [] if allowed else len(problems) == 1 and "--allowed-collector" in problems[0]
    assert collector_problems(documents, ()) == []  # no list: any http(s) collector


async def test_the_policy_store_refuses_a_collector_not_allowed() -> None:
    store = PolicyStore(MemoryStore(), allowed_collectors=(("zipkin", 9411),))
    with pytest.raises(PolicyError) as refused:
        await store.apply([("mesh.yaml", mesh_config("http://169.254.169.254/x"))], source="test", now=0.0)
    assert "169.254.169.254:80 is not a collector this control plane allows (--allowed-collector: zipkin:9411)" in str(
        refused.value
    )
    assert store.version == ""  # nothing applied
    applied = await store.apply([("mesh.yaml", mesh_config("http://zipkin:9411/api/v2/spans"))], source="t", now=0.0)
    assert applied.applied


async def test_a_stored_policy_naming_a_collector_no_longer_allowed_is_not_loaded() -> None:
    memory = MemoryStore()
    await PolicyStore(memory).apply(
        [
            ("mesh.yaml", mesh_config("http://old:9411/")),
        ],
        source="t",
        now=0.0,
    )
    with pytest.raises(PolicyError, match="--allowed-collector"):
        await PolicyStore(memory, allowed_collectors=(("zipkin", None),)).load()
