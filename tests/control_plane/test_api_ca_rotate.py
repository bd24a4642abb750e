"""GET /v1/ca and POST /v1/ca/rotate over real HTTP: who may read and rotate, what is refused
and why (409 with the reason), and that no answer holds key material."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from control_plane import ca
from control_plane.api import build_api
from control_plane.ca_rotation import Rotation
from control_plane.joins import Joins
from control_plane.registry import Registry
from control_plane.server import PushServer

WRITE_TOKEN = "write-token-0123456789"
READ_TOKEN = "read-token-0123456789"
WRITE = {"authorization": f"Bearer {WRITE_TOKEN}"}
READ = {"authorization": f"Bearer {READ_TOKEN}"}
LIFETIME = 3600.0


async def start(nursery: trio.Nursery, directory: Path | None) -> tuple[str, list[int]]:
    authority = (
        ca.open_authority(directory, "meshlet.local", 1.8e9, random.Random(1))
        if directory is not None
        else ca.Authority(ca.create_root("meshlet.local", 1.8e9, random.Random(1)))
    )
    joins = Joins(authority, dict, token_path="join-token", lifetime=LIFETIME, wall=lambda: 1.8e9)
    pushed: list[int] = []
    rotation = Rotation(joins, directory, lambda: pushed.append(1), wall=lambda: 1.8e9)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    app = build_api(PushServer(Registry(), joins=joins), token=WRITE_TOKEN, read_token=READ_TOKEN, rotation=rotation)
    binds: list[str] = await nursery.start(partial(serve, app, config))  # type: ignore[arg-type]
    return binds[0], pushed


@pytest.fixture
async def api(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, list[int]]]:
    base, pushed = await start(nursery, tmp_path / "ca")
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        yield client, pushed


async def test_status_needs_the_read_token_and_shows_no_key(api: tuple[httpx.AsyncClient, list[int]]) -> None:
    client, _ = api
    assert (await client.get("/v1/ca")).status_code == 401
    status = await client.get("/v1/ca", headers=READ)
    assert status.status_code == 200
    assert status.json()["trust_domain"] == "meshlet.local" and status.json()["bundle_roots"] == 1
    assert "PRIVATE" not in status.text and "BEGIN" not in status.text


@pytest.mark.parametrize(
    ("headers", "body", "code", "problem"),
    [
        ({}, {}, 401, "token"),
        (READ, {}, 401, "token"),  # a reader may not rotate
        (WRITE, {"overlap": LIFETIME - 1}, 409, "shorter than a certificate's lifetime"),
        (WRITE, {"overlap": "2h"}, 400, "overlap"),
        (WRITE, {"propagation": -1}, 400, "propagation"),
    ],
    ids=["no-token", "read-token", "short-overlap", "not-seconds", "negative-propagation"],
)
async def test_a_rotation_that_is_refused_changes_nothing(
    api: tuple[httpx.AsyncClient, list[int]], headers: dict[str, str], body: dict[str, object], code: int, problem: str
) -> None:
    client, pushed = api
    answer = await client.post("/v1/ca/rotate", json=body, headers=headers)
    assert answer.status_code == code, answer.text
    assert problem in " ".join(answer.json()["problems"])
    assert pushed == [] and (await client.get("/v1/ca", headers=READ)).json()["next"] is None


async def test_a_rotation_stages_a_new_root_and_a_second_is_refused(api: tuple[httpx.AsyncClient, list[int]]) -> None:
    client, pushed = api
    answer = await client.post("/v1/ca/rotate", json={"propagation": 10}, headers=WRITE)
    assert answer.status_code == 201, answer.text
    staged = answer.json()["next"]
    assert staged["signs_from"] == 1.8e9 + 10 and staged["old_root_trusted_until"] == 1.8e9 + 10 + 2 * LIFETIME
    assert pushed == [1] and "PRIVATE" not in answer.text
    again = await client.post("/v1/ca/rotate", json={}, headers=WRITE)
    assert again.status_code == 409 and "already under way" in again.text


async def test_an_operators_root_is_not_rotated(nursery: trio.Nursery) -> None:
    base, pushed = await start(nursery, None)
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        answer = await client.post("/v1/ca/rotate", json={}, headers=WRITE)
        assert answer.status_code == 409 and "--ca-cert" in answer.text
        assert (await client.get("/v1/ca", headers=READ)).json()["operator_root"] is True
    assert pushed == []
