"""One mesh per test: a control plane, sidecars and origins on 127.0.0.1, every process
stopped when the test ends (the last started first: sidecars before their control plane).

    async def test_item_is_routed(mesh: Mesh) -> None:
        await mesh.control_plane()
        item = await mesh.origin()
        await mesh.sidecar("item", app=item)
        user = await mesh.sidecar("user")  # an app that is never called back
        await mesh.apply(ROUTE)  # `meshlet apply`, once every affected sidecar ACKed
        ... user.outbound, user.admin, mesh.api ...

Each process is one of tests/helpers.py's (`run_control_plane`, `run_sidecar`): its ports
from its ready line, a traceback in its log fails the test, SIGTERM then SIGKILL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Protocol

import trio

from .helpers import SidecarProcess, apply_policy, run_control_plane, run_sidecar
from .origin import Origin

NO_APP = "127.0.0.1:1"  # the app of a sidecar that only calls out: nothing listens there


class App(Protocol):
    """A test app serving on 127.0.0.1 (tests/origin.py's Origin, or a test's own)."""

    port: int


class Mesh:
    def __init__(self, tmp_path: Path, nursery: trio.Nursery, stack: AsyncExitStack) -> None:
        self.tmp_path = tmp_path
        self._nursery = nursery
        self._stack = stack
        self._running: dict[int, AsyncExitStack] = {}  # id(process) → what stops it
        self.cp: SidecarProcess | None = None

    async def control_plane(self, *, listen: str = "127.0.0.1:0", extra: list[str] | None = None) -> SidecarProcess:
        """A control plane (its data in tmp_path/cp); the sidecars started after it join it."""
        self.cp = await self._start(run_control_plane(self.tmp_path, listen=listen, extra=extra))
        return self.cp

    async def sidecar(
        self,
        service: str,
        *,
        app: App | str = NO_APP,
        static: Path | None = None,
        extra: list[str] | None = None,
        join: bool = True,
    ) -> SidecarProcess:
        """A sidecar in front of ``app`` (a test app, or an address); it joins the control
        plane if one runs (and ``join``), and reads ``static`` if given."""
        address = app if isinstance(app, str) else f"127.0.0.1:{app.port}"
        push = self.push if join and self.cp is not None else None
        sidecar = run_sidecar(
            self.tmp_path, service=service, app=address, static=static, control_plane=push, extra=extra
        )
        return await self._start(sidecar)

    async def origin(self) -> Origin:
        """A test app (tests/origin.py) serving on a port of its own until the test ends."""
        origin = Origin()
        await self._nursery.start(origin.serve)
        return origin

    async def stop(self, process: SidecarProcess) -> None:
        """Stop one process now (its log checked as at the end); the rest run on."""
        await self._running.pop(id(process)).aclose()

    async def apply(self, text: str) -> None:
        """``meshlet apply`` of a policy document; returns once every affected sidecar ACKed."""
        await apply_policy(self.tmp_path, self.api, text)

    @property
    def push(self) -> str:
        assert self.cp is not None, "await mesh.control_plane() first"
        return f"127.0.0.1:{self.cp.ports['push']}"

    @property
    def api(self) -> str:
        assert self.cp is not None, "await mesh.control_plane() first"
        return f"127.0.0.1:{self.cp.ports['api']}"

    @property
    def token_file(self) -> Path:
        return self.tmp_path / "cp" / "api-token"

    async def _start(self, context: AbstractAsyncContextManager[SidecarProcess]) -> SidecarProcess:
        one = AsyncExitStack()
        process = await one.enter_async_context(context)
        self._running[id(process)] = one
        self._stack.push_async_callback(one.aclose)  # a no-op if stopped already
        return process


@asynccontextmanager
async def open_mesh(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Mesh]:
    async with AsyncExitStack() as stack:
        yield Mesh(tmp_path, nursery, stack)
