"""The data path end to end: a client → sidecar A (service `user`, outbound) → mTLS →
sidecar B (service `item`, inbound) → the origin app, all real processes and sockets on
127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from ..certs import TestCA, sidecar_flags
from ..helpers import SidecarProcess, raw_exchange, run_sidecar, write_static
from ..origin import Origin, pattern_bytes


@dataclass
class Mesh:
    a: SidecarProcess  # the caller's sidecar (outbound)
    b: SidecarProcess  # item's sidecar (inbound → origin)
    origin: Origin

    def url(self, path: str) -> str:
        return f"http://{self.a.outbound}{path}"


@pytest.fixture
async def mesh(tmp_path: Path, origin: Origin) -> AsyncIterator[Mesh]:
    authority = TestCA()
    async with run_sidecar(
        tmp_path,
        service="item",
        app=f"127.0.0.1:{origin.port}",
        static=write_static(tmp_path / "b.yaml", {}),
        extra=sidecar_flags(authority, tmp_path, "item"),
    ) as b:
        static_a = write_static(
            tmp_path / "a.yaml",
            {
                "item": {"endpoints": [b.inbound], "timeout": "1s", "mtls": {"mode": "permissive"}},
                "empty": {"endpoints": []},
                "refused": {"endpoints": ["127.0.0.1:1"]},
            },
        )
        async with run_sidecar(
            tmp_path,
            service="user",
            app="127.0.0.1:1",
            static=static_a,
            extra=["--header-timeout", "0.5", *sidecar_flags(authority, tmp_path, "user")],
        ) as a:
            yield Mesh(a, b, origin)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


async def scrape(admin: str) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://{admin}/metrics")).text


# --- addressing styles (docs/architecture.md) ---------------------------------------


async def test_host_header_crosses_both_sidecars(mesh: Mesh) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(mesh.url("/hello"), headers={"host": "item"})
    assert response.status_code == 200
    assert response.text == "hello"
    assert "x-meshlet-error" not in response.headers
    a_metrics, b_metrics = await scrape(mesh.a.admin), await scrape(mesh.b.admin)
    assert (
        metric(a_metrics, "meshlet_requests_total", direction="outbound", source="user", destination="item", code="200")
        == 1
    )
    assert (
        metric(b_metrics, "meshlet_requests_total", direction="inbound", source="user", destination="item", code="200")
        == 1
    )
    assert mesh.origin.stats.paths == ["/hello"]


async def test_absolute_form_via_http_proxy(mesh: Mesh) -> None:
    async with httpx.AsyncClient(proxy=f"http://{mesh.a.outbound}") as client:
        response = await client.get("http://item/info?x=1")
    assert response.status_code == 200
    info = response.json()
    assert info["target"] == "/info?x=1"  # origin-form upstream, never the absolute form
    assert dict(info["headers"])["host"] == "item"


async def test_explicit_upstream_port(tmp_path: Path, origin: Origin) -> None:
    static = write_static(tmp_path / "s.yaml", {"item": [f"127.0.0.1:{origin.port}"]})
    async with run_sidecar(
        tmp_path, service="user", app="127.0.0.1:1", static=static, extra=["--upstream", "item=127.0.0.1:0"]
    ) as a:
        port = a.ports["upstream:item"]
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/info")
    assert response.status_code == 200
    assert dict(response.json()["headers"])["host"] == "item"


# --- HTTP/1.1 behaviour --------------------------------------------------------------


async def test_keep_alive_reuses_one_upstream_connection(mesh: Mesh) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            response = await client.get(mesh.url("/hello"), headers={"host": "item"})
            assert response.status_code == 200
    assert mesh.origin.stats.requests == 100
    assert mesh.origin.stats.connections == 1
    async with httpx.AsyncClient() as client:
        clusters = (await client.get(f"http://{mesh.a.admin}/clusters")).json()
    (endpoint,) = clusters["item"]
    assert endpoint["requests"] == 100
    assert endpoint["connections_opened"] == 1
    assert endpoint["idle_connections"] == 1


async def test_broken_pooled_connection_is_not_reused(mesh: Mesh) -> None:
    async with httpx.AsyncClient() as client:
        first = await client.get(mesh.url("/close-after"), headers={"host": "item"})
        second = await client.get(mesh.url("/hello"), headers={"host": "item"})
    assert (first.status_code, first.text) == (200, "bye")
    assert (second.status_code, second.text) == (200, "hello")
    assert mesh.origin.stats.connections == 2


async def test_a_stale_pooled_connection_is_replaced_while_the_body_is_still_coming(mesh: Mesh) -> None:
    """The app closed an idle pooled connection; the next request's head goes out on it
    before its body has come from the client. The fresh connection gets the body whole:
    not a 400 from two body pumps reading one client, nor a body lost to the dead one."""
    for method in (b"POST", b"PUT"):  # a body read as it comes; a body in the replay buffer (retriable)
        async with httpx.AsyncClient() as client:
            first = await client.get(mesh.url("/close-after"), headers={"host": "item"})
        assert (first.status_code, first.text) == (200, "bye")
        await trio.sleep(0.2)  # its close reaches item's sidecar, whose pool still holds the connection
        stream = await trio.open_tcp_stream("127.0.0.1", mesh.a.ports["outbound"])
        await stream.send_all(method + b" /echo HTTP/1.1\r\nhost: item\r\ncontent-length: 5\r\n\r\n")
        await trio.sleep(0.2)  # the head goes on alone; the body follows
        await stream.send_all(b"hello")
        received = b""
        with trio.move_on_after(5):
            while not received.endswith(b"\r\n\r\nhello") and b"x-meshlet-error" not in received:
                data = await stream.receive_some(65536)
                if not data:
                    break
                received += data
        await stream.aclose()
        assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"\r\n\r\nhello"), (method, received)


async def test_chunked_upload_and_download_byte_exact(mesh: Mesh) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]

    async with httpx.AsyncClient(timeout=30) as client:
        upload = await client.post(mesh.url("/sha256"), headers={"host": "item"}, content=pieces())
        assert upload.text == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
        assert dict(mesh.origin.stats.last_headers)["transfer-encoding"] == "chunked"
        download = await client.get(mesh.url("/bytes/1000001?chunked=1"), headers={"host": "item"})
        assert download.headers["transfer-encoding"] == "chunked"
        assert download.content == pattern_bytes(1_000_001)


async def test_full_duplex_echo_streams_both_ways(mesh: Mesh) -> None:
    """The origin echoes while it reads: the proxy must pump the request body and the
    response body at the same time, or both sides would block on full buffers."""
    payload = os.urandom(8 * 1024 * 1024)
    stream = await trio.open_tcp_stream("127.0.0.1", mesh.a.ports["outbound"])
    received = bytearray()

    async def send() -> None:
        await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: item\r\nContent-Length: %d\r\n\r\n" % len(payload))
        for i in range(0, len(payload), 65536):
            await stream.send_all(payload[i : i + 65536])

    async def receive() -> None:
        while True:
            data = await stream.receive_some(65536)
            received.extend(data)
            head_end = received.find(b"\r\n\r\n")
            if not data or (head_end != -1 and len(received) - head_end - 4 >= len(payload)):
                return

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
    await stream.aclose()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == payload


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_50mb_body_byte_exact_with_bounded_memory(mesh: Mesh) -> None:
    size = 50 * 1024 * 1024
    block = os.urandom(1024 * 1024)

    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield block

    async with httpx.AsyncClient(timeout=60) as client:
        upload = await client.post(
            mesh.url("/sha256"), headers={"host": "item", "content-length": str(size)}, content=pieces()
        )
        assert upload.text == f"{size} {hashlib.sha256(block * 50).hexdigest()}"
        digest, received = hashlib.sha256(), 0
        async with client.stream("GET", mesh.url(f"/bytes/{size}"), headers={"host": "item"}) as response:
            assert response.headers["content-length"] == str(size)
            async for piece in response.aiter_raw():
                digest.update(piece)
                received += len(piece)
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()
    for sidecar in (mesh.a, mesh.b):
        assert _peak_rss_mb(sidecar.process.pid) < 60, "a sidecar buffered the body"


async def test_bodyless_responses_and_reuse(mesh: Mesh) -> None:
    async with httpx.AsyncClient() as client:
        head = await client.head(mesh.url("/bytes/1000"), headers={"host": "item"})
        assert head.status_code == 200
        assert head.headers["content-length"] == "1000"
        assert head.content == b""
        for code in (204, 304):
            response = await client.get(mesh.url(f"/status/{code}"), headers={"host": "item"})
            assert response.status_code == code
            assert response.content == b""
        after = await client.get(mesh.url("/hello"), headers={"host": "item"})
        assert after.text == "hello"
    # HEAD, 204 and 304 all left the pooled connections clean: reused throughout.
    assert mesh.origin.stats.connections == 1


async def test_expect_100_continue(mesh: Mesh) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", mesh.a.ports["outbound"])
    await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: item\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    interim = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in interim:
            interim += await stream.receive_some(4096)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    await stream.send_all(b"hello")
    rest = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
    with trio.fail_after(5):
        while not rest.endswith(b"hello"):
            rest += await stream.receive_some(4096)
    await stream.aclose()
    assert rest.startswith(b"HTTP/1.1 200 ")
    assert b"100 Continue" not in rest  # never a second interim response
    assert all(name.lower() != "expect" for name, _ in mesh.origin.stats.last_headers)


async def test_hop_by_hop_removed_and_forwarding_headers_set(mesh: Mesh) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            mesh.url("/info"),
            headers={
                "host": "item",
                "connection": "keep-alive, x-drop-me",
                "x-drop-me": "1",
                "keep-alive": "timeout=5",
                "proxy-connection": "keep-alive",
                "te": "trailers",
                "upgrade": "h2c",
                "trailer": "x-t",
                "x-forwarded-for": "10.1.2.3",
                "x-keep-me": "yes",
            },
        )
    headers = {name.lower(): value for name, value in response.json()["headers"]}
    for gone in ("x-drop-me", "keep-alive", "proxy-connection", "te", "upgrade", "trailer", "connection"):
        assert gone not in headers, gone
    assert headers["x-keep-me"] == "yes"
    assert headers["x-forwarded-for"] == "10.1.2.3, 127.0.0.1, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["via"] == "1.1 meshlet, 1.1 meshlet"
    assert "x-meshlet-source" not in headers  # consumed by the inbound sidecar
    assert response.headers["via"] == "1.1 meshlet, 1.1 meshlet"


async def test_websocket_upgrade_is_tunnelled(mesh: Mesh) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", mesh.a.ports["outbound"])
    await stream.send_all(
        b"GET /ws HTTP/1.1\r\nHost: item\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    head = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"upgrade: websocket" in head.lower()
    await stream.send_all(b"\x81\x04ping")
    echoed = head.split(b"\r\n\r\n", 1)[1]
    with trio.fail_after(5):
        while b"ping" not in echoed:
            echoed += await stream.receive_some(4096)
    assert echoed == b"echo:\x81\x04ping"
    await stream.aclose()


async def test_pipelined_requests_answered_in_order(mesh: Mesh) -> None:
    requests = (
        b"".join(b"GET /status/%d HTTP/1.1\r\nHost: item\r\n\r\n" % code for code in (201, 202, 203))
        + b"GET /hello HTTP/1.1\r\nHost: item\r\nConnection: close\r\n\r\n"
    )
    data = await raw_exchange(mesh.a.ports["outbound"], requests)
    assert data.count(b"HTTP/1.1 ") == 4
    order = [data.index(marker) for marker in (b"status 201", b"status 202", b"status 203", b"hello")]
    assert order == sorted(order)


# --- errors the mesh makes (README.md) ----------------------------------------------


@pytest.mark.parametrize(
    ("host", "path", "status", "reason"),
    [
        ("nope", "/", 404, "no-route"),
        ("empty", "/", 503, "no-healthy-endpoints"),
        ("refused", "/", 503, "connect-failed"),
        ("item", "/reset-before", 502, "upstream-reset"),
        ("item", "/delay/3", 504, "timeout"),
    ],
)
async def test_mesh_errors(mesh: Mesh, host: str, path: str, status: int, reason: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(mesh.url(path), headers={"host": host})
    assert response.status_code == status
    assert response.headers["x-meshlet-error"] == reason
    assert response.text.startswith(f"{reason}: ")
    metrics = await scrape(mesh.a.admin)
    assert metric(metrics, "meshlet_requests_total", direction="outbound", code=str(status), reason=reason) == 1


async def test_app_5xx_passes_through_untouched(mesh: Mesh) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(mesh.url("/status/503"), headers={"host": "item"})
    assert response.status_code == 503
    assert response.text == "status 503"
    assert "x-meshlet-error" not in response.headers


async def test_reset_mid_body_cuts_the_client_connection(mesh: Mesh) -> None:
    data = await raw_exchange(mesh.a.ports["outbound"], b"GET /reset HTTP/1.1\r\nHost: item\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: 100000" in head.lower()
    assert 0 < len(body) < 100000  # short, and the connection was closed: never a complete-looking body
    async with httpx.AsyncClient() as client:  # and the sidecars still serve
        assert (await client.get(mesh.url("/hello"), headers={"host": "item"})).text == "hello"


BAD_REQUESTS = [
    pytest.param(b"GET / FOO/1.1\r\nHost: item\r\n\r\n", 400, id="bad-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: item\r\nBad Name: x\r\n\r\n", 400, id="bad-header-name"),
    pytest.param(
        b"POST /echo HTTP/1.1\r\nHost: item\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        id="cl-and-te",
    ),
    pytest.param(
        b"POST /echo HTTP/1.1\r\nHost: item\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        400,
        id="duplicate-cl",
    ),
    pytest.param(
        b"POST /echo HTTP/1.1\r\nHost: item\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
        id="invalid-chunk-size",
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: item\r\nX: a\r\n  folded\r\n\r\n", 400, id="obs-fold"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: item\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431, id="oversized-head"),
]


@pytest.mark.parametrize(("request_bytes", "status"), BAD_REQUESTS)
async def test_malformed_requests_rejected_and_nothing_forwarded(mesh: Mesh, request_bytes: bytes, status: int) -> None:
    data = await raw_exchange(mesh.a.ports["outbound"], request_bytes)
    assert data.startswith(b"HTTP/1.1 %d " % status)
    assert b"x-meshlet-error: bad-request" in data
    assert b"connection: close" in data.lower()
    assert mesh.origin.stats.requests == 0
    metrics = await scrape(mesh.a.admin)
    assert metric(metrics, "meshlet_requests_total", code=str(status)) == 0  # never reached the request path


async def test_slow_client_head_gets_408(mesh: Mesh) -> None:
    data = await raw_exchange(mesh.a.ports["outbound"], b"GET / HTTP/1.1\r\nHost: it", timeout=5)
    assert data.startswith(b"HTTP/1.1 408 ")


# --- admin ----------------------------------------------------------------------------


async def test_admin_endpoints(mesh: Mesh) -> None:
    async with httpx.AsyncClient() as client:
        await client.get(mesh.url("/hello"), headers={"host": "item"})
        admin = f"http://{mesh.a.admin}"
        assert (await client.get(admin + "/live")).status_code == 200
        assert (await client.get(admin + "/ready")).status_code == 200
        dump = (await client.get(admin + "/config_dump")).json()
        assert dump["service"] == "user"
        assert dump["config"]["services"]["item"]["endpoints"][0]["address"] == mesh.b.inbound
        assert dump["config"]["source"].startswith("static:")
        metrics = (await client.get(admin + "/metrics")).text
        missing = (await client.get(admin + "/nope")).status_code
    assert missing == 404
    for name in (
        "meshlet_requests_total",
        "meshlet_request_duration_seconds_bucket",
        "meshlet_inflight_requests",
        "meshlet_upstream_connections",
    ):
        assert name in metrics, name
    assert metric(metrics, "meshlet_request_duration_seconds_count", destination="item") == 1
    assert metric(metrics, "meshlet_upstream_connections", destination="item", state="idle") == 1
    assert metric(metrics, "meshlet_inflight_requests", direction="outbound") == 0


async def test_bad_static_config_fails_with_file_and_line(tmp_path: Path) -> None:
    static = tmp_path / "bad.yaml"
    static.write_text("services:\n  item:\n    endpoints: [nohost]\n    timeout: soon\n")
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", "sidecar", "--service", "x", "--app", "127.0.0.1:1", "--static", str(static)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"{static}:3: services.item.endpoints[0].address:" in err
    assert f"{static}:4: services.item.timeout:" in err


async def test_config_dump_is_json(mesh: Mesh) -> None:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://{mesh.b.admin}/config_dump")).text
    assert json.loads(text)["service"] == "item"


# --- --workers ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "environment"])
async def test_workers_share_listeners_and_metrics_add_up(
    tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    static = write_static(tmp_path / "w.yaml", {"item": [f"127.0.0.1:{origin.port}"]})
    if how == "environment":  # the workers inherit MESHLET_WORKERS too: they must not become supervisors
        monkeypatch.setenv("MESHLET_WORKERS", "2")
    extra = ["--workers", "2"] if how == "flag" else []
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static, extra=extra) as sidecar:
        for _ in range(40):  # a new connection each: SO_REUSEPORT spreads connections
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://{sidecar.outbound}/hello", headers={"host": "item"})
                assert response.status_code == 200
        async with httpx.AsyncClient() as client:
            workers = (await client.get(f"http://{sidecar.admin}/workers")).json()
            metrics = (await client.get(f"http://{sidecar.admin}/metrics")).text
            clusters = (await client.get(f"http://{sidecar.admin}/clusters")).json()
    assert len(workers) == 2
    assert all(w["ready"] for w in workers)
    assert all(w["requests"] > 0 for w in workers), workers  # both took a share
    assert sum(w["requests"] for w in workers) == 40
    assert metric(metrics, "meshlet_requests_total", destination="item", code="200") == 40
    assert metric(metrics, "meshlet_request_duration_seconds_count", destination="item") == 40
    assert clusters["item"][0]["requests"] == 40
    assert origin.stats.requests == 40


# --- config reload -------------------------------------------------------------------------


async def _config_version(client: httpx.AsyncClient, admin: str) -> str:
    return (await client.get(f"http://{admin}/config_dump")).json()["config"]["version"]


async def _wait_for_version_change(client: httpx.AsyncClient, admin: str, old: str) -> str:
    for _ in range(100):
        version = await _config_version(client, admin)
        if version != old:
            return version
        await trio.sleep(0.05)
    raise AssertionError("config version did not change")


async def test_sighup_reloads_static_and_keeps_last_good(tmp_path: Path, origin: Origin) -> None:
    static = write_static(tmp_path / "s.yaml", {"item": [f"127.0.0.1:{origin.port}"]})
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static) as sidecar:
        async with httpx.AsyncClient() as client:
            url = f"http://{sidecar.outbound}/hello"
            before = await _config_version(client, sidecar.admin)
            assert (await client.get(url, headers={"host": "item"})).status_code == 200

            static.write_text("services:\n  item: [nohost]\n")  # invalid: rejected whole
            sidecar.process.send_signal(signal.SIGHUP)
            for _ in range(100):
                if "reload of" in sidecar.log():
                    break
                await trio.sleep(0.05)
            assert "keeping version " + before in sidecar.log()
            assert (await client.get(url, headers={"host": "item"})).status_code == 200

            write_static(static, {"other": [f"127.0.0.1:{origin.port}"]})
            sidecar.process.send_signal(signal.SIGHUP)
            await _wait_for_version_change(client, sidecar.admin, before)
            gone = await client.get(url, headers={"host": "item"})
            assert (gone.status_code, gone.headers["x-meshlet-error"]) == (404, "no-route")
            assert (await client.get(url, headers={"host": "other"})).status_code == 200


# --- upstream that does not speak HTTP/1.1 properly --------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="cl-and-te"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 0\r\n\r\n", id="obs-fold"),
        pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n", id="not-http"),
    ],
)
async def test_malformed_upstream_response_is_502(tmp_path: Path, nursery: trio.Nursery, answer: bytes) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def bad_origin(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(answer)
        await trio.sleep(0.2)
        await stream.aclose()

    nursery.start_soon(trio.serve_listeners, bad_origin, listeners)
    static = write_static(tmp_path / "s.yaml", {"item": [f"127.0.0.1:{port}"]})
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static) as sidecar:
        data = await raw_exchange(
            sidecar.ports["outbound"], b"GET / HTTP/1.1\r\nHost: item\r\nConnection: close\r\n\r\n"
        )
    assert data.startswith(b"HTTP/1.1 502 ")
    assert b"x-meshlet-error: upstream-protocol-error" in data
    assert b"folded" not in data and b"SSH" not in data


async def test_client_that_vanishes_mid_body_or_mid_wait_harms_nothing(mesh: Mesh) -> None:
    port = mesh.a.ports["outbound"]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"POST /sha256 HTTP/1.1\r\nHost: item\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 5000)
    await trio.sleep(0.2)
    await stream.aclose()  # gone mid-body
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /delay/0.3 HTTP/1.1\r\nHost: item\r\n\r\n")
    await stream.aclose()  # gone while the upstream is still thinking
    await trio.sleep(0.6)
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            assert (await client.get(mesh.url("/hello"), headers={"host": "item"})).text == "hello"
    assert mesh.origin.stats.completed == 4  # the delay request, and 3 hellos; never the cut upload
    assert "Traceback" not in mesh.a.log() and "Traceback" not in mesh.b.log()


async def test_http10_client_gets_close_delimited_body(mesh: Mesh) -> None:
    data = await raw_exchange(mesh.a.ports["outbound"], b"GET /bytes/70000?chunked=1 HTTP/1.0\r\nHost: item\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()  # an HTTP/1.0 client cannot read chunked
    assert b"connection: close" in head.lower()
    assert body == pattern_bytes(70000)  # the close marks the end


async def test_http10_keep_alive_is_honoured(mesh: Mesh) -> None:
    request = b"GET /hello HTTP/1.0\r\nHost: item\r\nConnection: keep-alive\r\n\r\n"
    data = await raw_exchange(mesh.a.ports["outbound"], request * 2, timeout=2)
    assert data.count(b"HTTP/1.1 200 ") == 2
    assert data.lower().count(b"connection: keep-alive") == 2


async def test_a_dead_worker_is_restarted(tmp_path: Path, origin: Origin) -> None:
    static = write_static(tmp_path / "w.yaml", {"item": [f"127.0.0.1:{origin.port}"]})
    async with run_sidecar(
        tmp_path, service="user", app="127.0.0.1:1", static=static, extra=["--workers", "2"]
    ) as sidecar:
        async with httpx.AsyncClient() as client:
            before = (await client.get(f"http://{sidecar.admin}/workers")).json()
            os.kill(before[0]["pid"], signal.SIGKILL)
            for _ in range(100):  # bounded: the supervisor restarts it after ~1 s
                await trio.sleep(0.1)
                now = (await client.get(f"http://{sidecar.admin}/workers")).json()
                if now[0]["ready"] and now[0]["pid"] != before[0]["pid"]:
                    break
            else:
                raise AssertionError(f"worker 0 was not restarted: {now}")
            assert (await client.get(f"http://{sidecar.admin}/ready")).status_code == 200
            for _ in range(10):
                async with httpx.AsyncClient() as fresh:
                    response = await fresh.get(f"http://{sidecar.outbound}/hello", headers={"host": "item"})
                assert response.status_code == 200
