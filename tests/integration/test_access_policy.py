"""AccessPolicy enforced by a real inbound sidecar: the callers it names (as their mTLS
certificates prove them) get in on the paths and methods it names, others get 403
``forbidden`` from item's sidecar (item never sees them); neither an app nor a plaintext
client can claim another service's name with ``x-meshlet-source``; in shadow mode nothing is
refused and what would have been is counted, by verified identity."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from ..helpers import raw_exchange, sample, write_static
from ..mesh import Mesh

POLICY = """\
kind: AccessPolicy
name: item-callers
service: item
mode: {mode}
rules:
  - sources: [user]
    paths: [/hello, /info]
    methods: [GET]
"""


async def test_access_policy_enforced_then_shadowed(tmp_path: Path, mesh: Mesh) -> None:
    item = await mesh.origin()
    await mesh.control_plane()
    item_sidecar = await mesh.sidecar("item", app=item)
    user = await mesh.sidecar("user")
    gateway = await mesh.sidecar("gateway")
    async with httpx.AsyncClient(timeout=10) as client:

        async def call(caller: object, path: str, method: str = "GET", **headers: str) -> httpx.Response:
            url = f"http://{caller.outbound}{path}"  # type: ignore[attr-defined]
            return await client.request(method, url, headers={"host": "item", **headers})

        with trio.fail_after(15):  # both callers discover item
            for caller in (user, gateway):
                while (await call(caller, "/hello")).status_code != 200:  # noqa: ASYNC110 - another process
                    await trio.sleep(0.1)

        await mesh.apply(POLICY.format(mode="enforce"))
        served = item.stats.served
        assert (await call(user, "/hello")).status_code == 200
        info = (await call(user, "/info")).json()
        assert not any(name.lower() == "x-meshlet-source" for name, _ in info["headers"])
        for caller, path, method in [
            (user, "/status/200", "GET"),  # a path no rule names
            (user, "/hello/../status/200", "GET"),  # ... however it is spelt
            (user, "/hello", "POST"),  # a method no rule names
            (gateway, "/hello", "GET"),  # a caller no rule names
        ]:
            refused = await call(caller, path, method)
            assert refused.status_code == 403, (path, method)
            assert refused.headers["x-meshlet-error"] == "forbidden"
            assert "AccessPolicy 'item-callers'" in refused.text
        # gateway's app claims to be user: its sidecar says who is calling, not the app
        spoofed = await call(gateway, "/hello", **{"x-meshlet-source": "user"})
        assert spoofed.status_code == 403 and "'gateway'" in spoofed.text
        # a plaintext client straight to item's inbound port claims to be user: unauthenticated
        claimed = await raw_exchange(
            item_sidecar.ports["inbound"],
            b"GET /hello HTTP/1.1\r\nHost: item\r\nx-meshlet-source: user\r\nConnection: close\r\n\r\n",
        )
        assert claimed.startswith(b"HTTP/1.1 403 ") and b"'unauthenticated'" in claimed, claimed
        assert item.stats.served == served + 2  # item saw only the two allowed requests
        metrics = (await client.get(f"http://{item_sidecar.admin}/metrics")).text
        forbidden = {"direction": "inbound", "code": "403", "reason": "forbidden"}
        assert sample(metrics, "meshlet_requests_total", source="user", **forbidden) == 3
        assert sample(metrics, "meshlet_requests_total", source="gateway", **forbidden) == 2
        assert sample(metrics, "meshlet_requests_total", source="unauthenticated", **forbidden) == 1

        await mesh.apply(POLICY.format(mode="shadow"))
        served = item.stats.served
        assert (await call(gateway, "/hello")).status_code == 200
        assert (await call(user, "/hello")).status_code == 200
        assert (await call(user, "/status/204", "DELETE")).status_code == 204
        assert item.stats.served == served + 3  # nothing refused
        metrics = (await client.get(f"http://{item_sidecar.admin}/metrics")).text
        shadow = "meshlet_shadow_access_decisions_total"
        policy = {"policy": "item-callers"}
        assert sample(metrics, shadow, source="gateway", rule="default", decision="deny", **policy) == 1
        assert sample(metrics, shadow, source="user", rule="rules[0]", decision="allow", **policy) == 1
        assert sample(metrics, shadow, source="user", rule="default", decision="deny", **policy) == 1
        assert sample(metrics, "meshlet_requests_total", direction="inbound", reason="forbidden") == 6


async def test_every_x_meshlet_source_is_dropped(tmp_path: Path, mesh: Mesh) -> None:
    """An x-meshlet-source header claims nothing (the caller is what its connection proves):
    none reaches the app, however many and however spelt, and the request is served as
    the plaintext caller it is, ``unauthenticated``."""
    item = await mesh.origin()
    sidecar = await mesh.sidecar("item", app=item, static=write_static(tmp_path / "s.yaml", {}))
    inbound = sidecar.ports["inbound"]
    for claims in [b"X-Meshlet-SOURCE: user\r\n", b"x-meshlet-source: gateway\r\nX-Meshlet-Source: user\r\n"]:
        answer = await raw_exchange(
            inbound, b"GET /info HTTP/1.1\r\nHost: item\r\n%s\r\n" % claims, read_until_close=False
        )
        assert answer.startswith(b"HTTP/1.1 200") and b"meshlet-source" not in answer.lower(), answer
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://{sidecar.admin}/metrics")).text
    assert sample(metrics, "meshlet_requests_total", direction="inbound", source="unauthenticated") == 2


HOSTILE_PATHS = [b"/items/..;/admin", b"/items/..%5cadmin", b"/items/..\\admin", b"/items/%252e%252e/admin"]


async def test_the_path_checked_is_the_path_forwarded_on_both_listeners(mesh: Mesh) -> None:
    """``paths: [/items]``: spellings of /admin that an app resolves differently from the
    check are refused with 400 by the sidecar that reads them first (outbound or inbound);
    a path with dot segments is forwarded as the check saw it, with the query untouched."""
    item = await mesh.origin()
    await mesh.control_plane()
    item_sidecar = await mesh.sidecar("item", app=item)
    user = await mesh.sidecar("user")
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.fail_after(15):  # user discovers item
            hello = f"http://{user.outbound}/hello"
            while (await client.get(hello, headers={"host": "item"})).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)
    await mesh.apply(
        "kind: AccessPolicy\nname: items-only\nservice: item\nrules:\n  - {sources: ['*'], paths: [/items]}\n",
    )
    listeners = {"outbound": user.ports["outbound"], "inbound": item_sidecar.ports["inbound"]}

    async def send(listener: str, target: bytes) -> bytes:
        request = b"GET %s HTTP/1.1\r\nHost: item\r\nConnection: close\r\n\r\n" % target
        return await raw_exchange(listeners[listener], request)

    served = item.stats.served
    for listener in listeners:
        for target in HOSTILE_PATHS:
            answer = await send(listener, target)
            assert answer.startswith(b"HTTP/1.1 400 "), (listener, target, answer)
            assert b"x-meshlet-error: bad-request" in answer, (listener, target)
        denied = await send(listener, b"/items/../admin")
        assert denied.startswith(b"HTTP/1.1 403 "), (listener, denied)
    assert item.stats.served == served  # the app saw none of them

    for listener in listeners:
        answer = await send(listener, b"/items/a/../b/./%63//d?q=/../x%2f")
        assert answer.startswith(b"HTTP/1.1 404 "), answer  # the app's own: it has no /items
        assert b"x-meshlet-error" not in answer
        assert item.stats.paths[-1] == "/items/b/c/d?q=/../x%2f"  # exactly what was checked
