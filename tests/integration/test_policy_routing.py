"""Route policies enforced by real sidecars: a canary split by subset, header-based
routing with header changes and a rewrite, a direct response, a redirect, an injected
fault; a policy change takes effect on the next request."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import httpx
import trio

from ..helpers import fake_control_plane_tls, run_sidecar, sample
from ..mesh import Mesh
from ..origin import Origin

ROUTES = """\
kind: Route
name: item
host: item
rules:
  - name: beta
    priority: 10
    match: {headers: {x-group: {exact: beta}}, path: {prefix: /api}}
    destinations: [{service: item, subset: {version: v2}}]
    headers: {request: {add: {x-canary: "1"}, remove: [x-secret]}, response: {add: {x-route: beta}}}
    rewrite: {prefix: /info}
  - name: admin
    priority: 10
    match: {path: {exact: /admin}}
    direct_response: {status: 403, body: "admins only"}
  - name: old
    priority: 10
    match: {path: {prefix: /old}}
    redirect: {location: /hello, status: 301}
  - name: broken
    priority: 10
    match: {path: {prefix: /broken}}
    destinations: [{service: item}]
    fault: {abort: {percent: 100, status: 503}}
  - name: split
    destinations:
      - {service: item, subset: {version: v1}, weight: 90}
      - {service: item, subset: {version: v2}, weight: 10}
tests:
  - request: {path: /api/x, headers: {x-group: beta}}
    expect: {rule: beta}
  - request: {path: /admin}
    expect: {status: 403}
"""


async def meshlet(*args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "meshlet", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_routes_split_match_rewrite_and_answer(tmp_path: Path, mesh: Mesh) -> None:
    v1, v2 = await mesh.origin(), await mesh.origin()
    (tmp_path / "routes.yaml").write_text(ROUTES)
    await mesh.control_plane()
    await mesh.sidecar("item", app=v1, extra=["--label", "version=v1", "--instance-id", "item-v1"])
    await mesh.sidecar("item", app=v2, extra=["--label", "version=v2", "--instance-id", "item-v2"])
    user = await mesh.sidecar("user")
    code, out, err = await meshlet(
        "apply",
        "--token-file",
        str(mesh.token_file),
        "-f",
        str(tmp_path / "routes.yaml"),
        "--api",
        mesh.api,
    )
    assert code == 0, err + out
    base = f"http://{user.outbound}"
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.fail_after(15):  # until user's sidecar knows both item instances
            while True:
                await client.get(f"{base}/hello", headers={"host": "item"})
                dump = (await client.get(f"http://{user.admin}/config_dump")).json()
                if len(dump["config"]["services"].get("item", {}).get("endpoints", [])) == 2:
                    break
                await trio.sleep(0.1)
        assert dump["config"]["routes"] == {"item": "item"}

        before = (v1.stats.served, v2.stats.served)
        for _ in range(200):
            response = await client.get(f"{base}/hello", headers={"host": "item"})
            assert response.status_code == 200
        split = (v1.stats.served - before[0], v2.stats.served - before[1])
        assert split == (180, 20)  # 90/10, exactly: a smooth weighted round robin

        response = await client.get(f"{base}/api?x=1", headers={"host": "item", "x-group": "beta", "x-secret": "s"})
        info = response.json()
        assert info["target"] == "/info?x=1"  # the matched prefix rewritten, the query kept
        sent = dict(info["headers"])
        assert sent.get("x-canary") == "1" and "x-secret" not in sent
        assert response.headers["x-route"] == "beta"
        assert v2.stats.served - before[1] == 21  # the beta rule goes to v2 only

        admin = await client.get(f"{base}/admin", headers={"host": "item"})
        assert (admin.status_code, admin.text) == (403, "admins only")
        assert "x-meshlet-error" not in admin.headers  # the policy's answer, not a mesh failure
        old = await client.get(f"{base}/old/thing", headers={"host": "item"})
        assert (old.status_code, old.headers["location"]) == (301, "/hello")
        broken = await client.get(f"{base}/broken", headers={"host": "item"})
        assert (broken.status_code, broken.headers["x-meshlet-fault"]) == (503, "abort")

        # A new policy takes effect on the next request: everything to v1 now.
        (tmp_path / "routes.yaml").write_text(
            "kind: Route\nname: item\nhost: item\nrules:\n"
            "  - {name: v1, destinations: [{service: item, subset: {version: v1}}]}\n"
        )
        slow: list[httpx.Response] = []

        async def in_flight() -> None:  # a request under way while the policy changes
            slow.append(await client.get(f"{base}/delay/3", headers={"host": "item"}))

        async with trio.open_nursery() as during:
            during.start_soon(in_flight)
            await trio.sleep(0.2)
            code, out, err = await meshlet(
                "apply",
                "--token-file",
                str(mesh.token_file),
                "-f",
                str(tmp_path / "routes.yaml"),
                "--api",
                mesh.api,
            )
            assert code == 0 and "3 of 3 sidecars ACKed" in out, err + out
        assert [(r.status_code, r.text) for r in slow] == [(200, "late")]  # finished on the old policy
        before = (v1.stats.served, v2.stats.served)
        outcomes = Counter()
        for _ in range(20):
            outcomes[(await client.get(f"{base}/hello", headers={"host": "item"})).status_code] += 1
        assert outcomes == {200: 20}
        assert (v1.stats.served - before[0], v2.stats.served - before[1]) == (20, 0)
        unmatched = await client.get(f"{base}/admin", headers={"host": "item"})
        # The admin rule went with the old version: the request reaches the app now.
        assert (unmatched.status_code, unmatched.text) == (404, "origin: no such path")
    code, out, _ = await meshlet("status", "-o", "json", "--api", mesh.api)
    sidecars = json.loads(out)["sidecars"]
    assert all(s["last_nack"] is None for s in sidecars)


async def test_a_shadow_route_is_counted_not_enforced(tmp_path: Path, mesh: Mesh) -> None:
    (tmp_path / "shadow.yaml").write_text(
        "kind: Route\nname: item-next\nhost: item\nmode: shadow\nrules:\n"
        "  - {name: moved, match: {path: {prefix: /hello}}, redirect: {location: /v2/hello}}\n"
        "  - {name: rest, destinations: [{service: item, subset: {version: v2}}]}\n"
    )
    await mesh.control_plane()
    await mesh.sidecar("item", app=await mesh.origin())
    user = await mesh.sidecar("user")
    code, out, err = await meshlet(
        "apply",
        "--token-file",
        str(mesh.token_file),
        "-f",
        str(tmp_path / "shadow.yaml"),
        "--api",
        mesh.api,
    )
    assert code == 0, err + out
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.fail_after(15):  # until user's sidecar routes item (polling another process)
            response = await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})
            while response.status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)
                response = await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})
        statuses = Counter()
        for path in ["/hello"] * 5 + ["/status/201"] * 3:
            response = await client.get(f"http://{user.outbound}{path}", headers={"host": "item"})
            statuses[response.status_code] += 1
        metrics = (await client.get(f"http://{user.admin}/metrics")).text
    assert statuses == {200: 5, 201: 3}  # not enforced: every request reached the app
    lines = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("meshlet_shadow")
    }
    assert lines['meshlet_shadow_route_decisions_total{decision="redirect 302",route="item-next",rule="moved"}'] >= 5
    assert lines['meshlet_shadow_route_decisions_total{decision="item,version=v2",route="item-next",rule="rest"}'] == 3


async def test_mirrored_copies_reach_the_shadow_and_its_failures_never_the_caller(tmp_path: Path, mesh: Mesh) -> None:
    main, shadow = await mesh.origin(), await mesh.origin()
    (tmp_path / "mirror.yaml").write_text(
        "kind: Route\nname: item\nhost: item\nrules:\n"
        "  - {name: all, destinations: [{service: item}], mirror: {service: item-next, percent: 100}}\n"
    )
    await mesh.control_plane()
    await mesh.sidecar("item", app=main)
    user = await mesh.sidecar("user")
    code, out, err = await meshlet(
        "apply",
        "--token-file",
        str(mesh.token_file),
        "-f",
        str(tmp_path / "mirror.yaml"),
        "--api",
        mesh.api,
    )
    assert code == 0, err + out
    base = f"http://{user.outbound}"
    async with httpx.AsyncClient(timeout=10) as client:

        async def call() -> httpx.Response:
            return await client.get(f"{base}/hello", headers={"host": "item"})

        async def mirrored_ok() -> float:
            metrics = (await client.get(f"http://{user.admin}/metrics")).text
            key = 'meshlet_mirror_requests_total{destination="item-next",outcome="2xx"} '
            return sum(float(line[len(key) :]) for line in metrics.splitlines() if line.startswith(key))

        async with run_sidecar(
            tmp_path, service="item-next", app=f"127.0.0.1:{shadow.port}", control_plane=mesh.push
        ) as shadow_sidecar:
            await client.get(f"{base}/hello", headers={"host": "item-next"})  # user's sidecar watches it
            with trio.fail_after(15):  # until a copy made it (item-next registered and ready)
                while not await mirrored_ok():  # noqa: ASYNC110 - polling another process
                    assert (await call()).status_code == 200
                    await trio.sleep(0.1)
            before = (main.stats.served, shadow.stats.served, await mirrored_ok())
            for _ in range(10):
                assert (await call()).text == "hello"
            with trio.fail_after(5):
                while await mirrored_ok() < before[2] + 10:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert main.stats.served - before[0] == 10
            assert shadow.stats.served - before[1] == 10
            assert shadow_sidecar.inbound  # the copies went through the shadow's own sidecar
            # A body is copied as it streams through (up to 1 MiB), and sent whole.
            body = bytes(range(256)) * 400  # 102,400 bytes
            seen = (shadow.stats.served, await mirrored_ok())
            response = await client.post(f"{base}/sha256", headers={"host": "item"}, content=body)
            assert response.text.startswith("102400 ")
            with trio.fail_after(5):
                while await mirrored_ok() < seen[1] + 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert shadow.stats.served == seen[0] + 1
            assert [p for p in shadow.stats.paths if p != "/health"][-1] == "/sha256"
            assert dict(shadow.stats.last_headers)["host"].endswith("-shadow")
            large = await client.post(f"{base}/sha256", headers={"host": "item"}, content=b"x" * 2_000_000)
            assert large.text.startswith("2000000 ")  # the caller is served; the copy is skipped
        # The shadow is gone (its sidecar stopped): the caller sees nothing of it.
        for _ in range(10):
            assert (await call()).status_code == 200
        metrics = (await client.get(f"http://{user.admin}/metrics")).text
    mirrored = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("meshlet_mirror_requests_total")
    }
    assert mirrored.get('destination="item-next",outcome="2xx"', 0) >= 10
    assert mirrored.get('destination="item-next",outcome="skipped-body"', 0) == 1
    failed = sum(v for k, v in mirrored.items() if "2xx" not in k)
    assert failed >= 1  # copies to a gone shadow: counted, never seen by the caller


async def test_a_mirror_target_the_caller_never_calls_is_looked_up_and_receives_the_copies(mesh: Mesh) -> None:
    """user calls item only; item's Route mirrors to item-next, which user's sidecar has
    never heard of: the first copy subscribes it (as a first call would), and the copies
    arrive."""
    main, shadow = await mesh.origin(), await mesh.origin()
    await mesh.control_plane()
    await mesh.sidecar("item", app=main)
    await mesh.sidecar("item-next", app=shadow)
    user = await mesh.sidecar("user")
    await mesh.apply(
        "kind: Route\nname: item\nhost: item\nrules:\n"
        "  - {name: all, destinations: [{service: item}], mirror: {service: item-next}}\n",
    )
    async with httpx.AsyncClient(timeout=10) as client:

        async def mirrored(outcome: str) -> float:
            metrics = (await client.get(f"http://{user.admin}/metrics")).text
            return sample(metrics, "meshlet_mirror_requests_total", destination="item-next", outcome=outcome)

        with trio.fail_after(15):  # item-next registered and ready: a copy makes it
            while not await mirrored("2xx"):
                response = await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})
                assert response.status_code in (200, 503), response.text  # 503: item not ready yet
                await trio.sleep(0.1)
        before = (shadow.stats.served, await mirrored("2xx"))
        for _ in range(10):
            assert (await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})).text == "hello"
        with trio.fail_after(5):
            while await mirrored("2xx") < before[1] + 10:  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)
        assert shadow.stats.served - before[0] == 10
        dump = (await client.get(f"http://{user.admin}/config_dump")).json()
        assert "item-next" in dump["config"]["services"]  # watched now, like a service it calls


async def test_a_policy_the_sidecar_rejects_is_nacked_and_the_old_one_keeps_serving(
    tmp_path: Path, origin: Origin, nursery: trio.Nursery
) -> None:
    """A fake control plane (wire.py on a real socket) pushes a good route, then a bad
    version of it (as a control plane of another version might)."""
    from meshlet import wire

    good = {
        "kind": "Route",
        "name": "item",
        "host": "item",
        "rules": [
            {"name": "admin", "match": {"path": {"exact": "/admin"}}, "direct_response": {"status": 403}},
            {"name": "rest", "match": {"path": {"prefix": "/hello"}}, "destinations": [{"service": "item"}]},
        ],
    }
    bad = {**good, "rules": []}
    endpoints = [wire.endpoint("item-1", f"127.0.0.1:{origin.port}")]
    answers: list[wire.Message] = []
    done = trio.Event()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def fake_control_plane(stream: trio.abc.Stream) -> None:  # over TLS, as sidecars dial it
        conn = wire.ServerConnection("fake-cp")
        while conn.hello is None:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        await stream.send_all(conn.accept())
        _, data = conn.push(
            "endpoints", "e1", (wire.Resource("item", wire.content_version(endpoints), endpoints),), full=True
        )
        await stream.send_all(data)
        pushes = [
            (wire.Resource("Route/item", wire.content_version(good), good),),
            (wire.Resource("Route/item", wire.content_version(bad), bad),),
        ]
        while not done.is_set():
            data = await stream.receive_some(65536)
            if not data:
                return
            for message in conn.receive_data(bytes(data)):
                if isinstance(message, wire.Ack | wire.Nack):
                    answers.append(message)
                    if pushes:
                        _, frame = conn.push("policies", f"p{len(pushes)}", pushes.pop(0), full=len(pushes) == 1)
                        await stream.send_all(frame)
                    elif len(answers) == 3:
                        done.set()

    tls = [trio.SSLListener(listener, fake_control_plane_tls(tmp_path)) for listener in listeners]
    nursery.start_soon(trio.serve_listeners, fake_control_plane, tls)
    fake = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    async with run_sidecar(tmp_path, service="user", app="127.0.0.1:1", control_plane=fake) as user:
        with trio.fail_after(10):
            await done.wait()
        endpoints_ack, route_ack, route_nack = answers
        assert isinstance(route_ack, wire.Ack) and route_ack.type == "policies"
        assert isinstance(route_nack, wire.Nack) and route_nack.names == ("Route/item",)
        assert "rules" in route_nack.message and route_nack.version == route_ack.version
        async with httpx.AsyncClient(timeout=5) as client:
            admin = await client.get(f"http://{user.outbound}/admin", headers={"host": "item"})
            hello = await client.get(f"http://{user.outbound}/hello", headers={"host": "item"})
            nothing = await client.get(f"http://{user.outbound}/nothing", headers={"host": "item"})
        assert admin.status_code == 403  # the good version still routes
        assert (hello.status_code, hello.text) == (200, "hello")
        assert (nothing.status_code, nothing.headers["x-meshlet-error"]) == (404, "no-route")
        assert "no rule of route 'item' matches GET /nothing" in nothing.text
