"""HTTP/2 clients through a real sidecar process to an HTTP/1.1 origin (tests/origin.py,
declared ``http1``, so the upstream side speaks HTTP/1.1 to it):
curl with prior knowledge (h2c) on the outbound listener, h2load's load, curl with ALPN h2
over mTLS on the inbound listener (the caller is its certificate's), a slow reader of a large
response (the sidecar's memory stays bounded), and an attack on the real listener."""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
from pathlib import Path

import httpx
import trio
from hyperframe.frame import HeadersFrame, RstStreamFrame, SettingsFrame

from sidecar.core import http2

from ..certs import TestCA, sidecar_flags
from ..conftest import need
from ..helpers import SidecarProcess, run_sidecar, sample, write_static
from ..origin import Origin, pattern_bytes


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    argv = [need("curl"), "-sS", "--max-time", "60", *args]
    return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)


def h2c(address: str, path: str, *args: str) -> list[str]:
    return ["--http2-prior-knowledge", "-H", "host: item", *args, f"http://{address}{path}"]


def parse(output: bytes) -> tuple[str, dict[str, str], bytes]:
    """curl -i output: the status line, the headers, the body."""
    head, _, body = output.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body


async def metrics(sidecar: SidecarProcess) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(f"http://{sidecar.admin}/metrics")).text


def static_for(tmp_path: Path, origin: Origin) -> Path:
    """``item`` is the HTTP/1.1 origin, declared so: an undeclared app would get HTTP/2 requests
    in HTTP/2 (sidecar/core/h2_upstream.py), which tests/origin.py does not speak."""
    service = {"endpoints": [f"127.0.0.1:{origin.port}"], "protocol": "http1"}
    return write_static(tmp_path / "static.yaml", {"item": service})


async def test_curl_h2c_through_the_outbound_listener(tmp_path: Path, origin: Origin) -> None:
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static_for(tmp_path, origin)) as user:
        got = await curl("-i", *h2c(user.outbound, "/bytes/100000"))
        status, headers, body = parse(got.stdout)
        assert status.startswith("HTTP/2 200"), got.stderr
        assert body == pattern_bytes(100000) and headers["content-length"] == "100000"
        assert headers["via"] == "1.1 meshlet"

        upload = bytes(range(256)) * 4000  # 1 MB, every byte value
        (tmp_path / "upload").write_bytes(upload)
        got = await curl("-i", *h2c(user.outbound, "/sha256", "--data-binary", f"@{tmp_path / 'upload'}"))
        status, _, body = parse(got.stdout)
        assert status.startswith("HTTP/2 200") and body.decode().split() == [
            str(len(upload)),
            hashlib.sha256(upload).hexdigest(),
        ]
        assert origin.stats.last_headers is not None
        sent = dict(origin.stats.last_headers)
        assert sent["host"] == "item" and sent["content-length"] == str(len(upload))  # curl said its length

        got = await curl("-i", "--http2-prior-knowledge", "-H", "host: nowhere", f"http://{user.outbound}/")
        status, headers, body = parse(got.stdout)
        assert status.startswith("HTTP/2 404") and headers["x-meshlet-error"] == "no-route"

        text = await metrics(user)
        assert sample(text, "meshlet_requests_total", direction="outbound", code="200", destination="item") == 2
        assert sample(text, "meshlet_http2_streams_opened_total", listener="outbound") == 3
        # and HTTP/1.1 on the same listener, as before
        async with httpx.AsyncClient(timeout=10) as client:
            plain = await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})
            assert plain.status_code == 200 and plain.http_version == "HTTP/1.1"


async def test_h2load_through_the_sidecar(tmp_path: Path, origin: Origin) -> None:
    h2load = need("h2load")
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static_for(tmp_path, origin)) as user:
        argv = [h2load, "-n", "2000", "-c", "4", "-m", "10", "-H", ":authority: item", f"http://{user.outbound}/hello"]
        done = await trio.run_process(argv, capture_stdout=True, check=False)
        out = done.stdout.decode()
        assert re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded", out), out
        assert re.search(r"status codes: 2000 2xx", out), out
        text = await metrics(user)
        assert sample(text, "meshlet_requests_total", direction="outbound", code="200", destination="item") == 2000
        assert sample(text, "meshlet_http2_streams", listener="outbound") == 0


async def test_alpn_h2_over_mtls_to_the_inbound_listener(tmp_path: Path, origin: Origin) -> None:
    authority = TestCA()
    extra = sidecar_flags(authority, tmp_path, "item")
    async with run_sidecar(
        tmp_path, service="item", app=f"127.0.0.1:{origin.port}", static=static_for(tmp_path, origin), extra=extra
    ) as item:
        cert, key, _ = authority.write(tmp_path / "caller", "caller")
        url = f"https://{item.inbound}/hello"
        # -k: the sidecar's certificate names a SPIFFE ID, not 127.0.0.1; ours is verified by it
        got = await curl("-i", "-k", "--http2", "--cert", str(cert), "--key", str(key), "-H", "host: item", url)
        status, _, body = parse(got.stdout)
        assert status.startswith("HTTP/2 200"), got.stderr
        assert body == b"hello"
        text = await metrics(item)
        assert sample(text, "meshlet_requests_total", direction="inbound", source="caller", code="200") == 1
        assert sample(text, "meshlet_http2_streams_opened_total", listener="inbound") == 1


async def test_a_slow_reader_of_a_large_response_keeps_the_sidecar_small(tmp_path: Path, origin: Origin) -> None:
    """100 MB read at 50 MB/s: the origin is faster, so without flow control the sidecar would
    hold what the client has not read yet."""
    size = 100 * 1024 * 1024
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static_for(tmp_path, origin)) as user:
        status = Path(f"/proc/{user.process.pid}/status")

        def rss() -> int:  # kB
            line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
            return int(line.split()[1])

        await curl("-o", "/dev/null", *h2c(user.outbound, "/hello"))  # h2 loaded: its cost is not growth
        before = peak = rss()
        out = tmp_path / "out"
        argv = [need("curl"), "-sS", "-o", str(out), "--limit-rate", "50M", *h2c(user.outbound, f"/bytes/{size}")]
        async with trio.open_nursery() as nursery:
            process = await nursery.start(partial_process, argv)
            while process.returncode is None:  # noqa: ASYNC110 - sampling memory while it runs
                peak = max(peak, rss())
                await trio.sleep(0.05)
        assert process.returncode == 0
        assert out.stat().st_size == size
        assert (peak - before) < 30 * 1024, f"RSS grew by {(peak - before) // 1024} MB"
        print(f"RSS: {before // 1024} MB before, {peak // 1024} MB at the peak")


async def partial_process(argv: list[str], *, task_status: trio.TaskStatus[trio.Process]) -> None:
    await trio.run_process(argv, task_status=task_status, check=False)


async def test_rapid_reset_on_the_real_listener_closes_that_connection_only(tmp_path: Path, origin: Origin) -> None:
    from hpack import Encoder

    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static_for(tmp_path, origin)) as user:
        encoder = Encoder()
        burst = http2.PREFACE + SettingsFrame(0).serialize()
        for i in range(http2.RESET_BUDGET + 50):
            stream_id = 1 + 2 * i
            frame = HeadersFrame(stream_id)
            frame.data = encoder.encode(
                [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/delay/1"), (b":authority", b"item")]
            )
            frame.flags.add("END_HEADERS")
            frame.flags.add("END_STREAM")
            reset = RstStreamFrame(stream_id)
            reset.error_code = 8
            burst += frame.serialize() + reset.serialize()

        def attack() -> bytes:
            with socket.create_connection(("127.0.0.1", user.ports["outbound"]), timeout=10) as sock:
                sock.sendall(burst)
                received = b""
                while data := sock.recv(65536):
                    received += data
                return received

        received = await trio.to_thread.run_sync(attack)
        assert b"\x00\x00\x08\x07" in received  # a GOAWAY frame (length 8, type 7) before the close
        got = await curl("-i", *h2c(user.outbound, "/hello"))
        assert parse(got.stdout)[0].startswith("HTTP/2 200")  # another client is served
        text = await metrics(user)
        assert sample(text, "meshlet_http2_connections_closed_total", listener="outbound", reason="rapid-reset") == 1


async def test_a_client_reset_drops_the_upstream_exchange(tmp_path: Path, origin: Origin) -> None:
    from hpack import Encoder

    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", static=static_for(tmp_path, origin)) as user:
        got = await curl("-i", *h2c(user.outbound, "/hello"))
        assert parse(got.stdout)[0].startswith("HTTP/2 200")
        assert sample(await metrics(user), "meshlet_upstream_connections", state="idle") == 1  # pooled
        frame = HeadersFrame(1)
        frame.data = Encoder().encode(
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/delay/30"), (b":authority", b"item")]
        )
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        reset = RstStreamFrame(1)
        reset.error_code = 8  # CANCEL
        stream = await trio.open_tcp_stream("127.0.0.1", user.ports["outbound"])
        async with stream:
            await stream.send_all(http2.PREFACE + SettingsFrame(0).serialize() + frame.serialize())
            with trio.fail_after(10):
                while sample(await metrics(user), "meshlet_inflight_requests", direction="outbound") != 1:  # noqa: ASYNC110 - polled over HTTP
                    await trio.sleep(0.05)
            await stream.send_all(reset.serialize())
            with trio.fail_after(10):
                while sample(text := await metrics(user), "meshlet_inflight_requests", direction="outbound"):  # noqa: ASYNC110
                    await trio.sleep(0.05)
        assert sample(text, "meshlet_http2_streams_reset_total", listener="outbound", reason="client") == 1
        assert sample(text, "meshlet_upstream_connections") == 0  # the exchange's connection was closed, not pooled
