"""The last good configuration on disk (sidecar/net/persist.py): written whole, read back,
shared by the instances of a service on one host, ignored when unreadable."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from meshlet import wire
from sidecar.core.discovered import PushedConfig
from sidecar.net.persist import read_last_good, write_last_good

ITEM = [wire.endpoint("item-1", "127.0.0.1:9001")]


def _config() -> PushedConfig:
    config = PushedConfig()
    config.apply(wire.Push(wire.ENDPOINTS, "t", "1", (wire.Resource("item", wire.content_version(ITEM), ITEM),)))
    return config


def test_what_is_written_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "deeper" / "item.json"  # its directory is made
    write_last_good(path, _config())
    again = read_last_good(path)
    assert again is not None and again.versions() == _config().versions()


def test_no_file_is_no_config(tmp_path: Path) -> None:
    assert read_last_good(tmp_path / "item.json") is None


@pytest.mark.parametrize(
    "text", ["{not json", '{"endpoints": {"item": {"body": []}}}', "[]", '{"endpoints": 3}', '{"store": ["a"]}']
)
def test_an_unreadable_file_is_ignored_and_logged(tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "item.json"
    path.write_text(text)
    assert read_last_good(path) is None
    assert "ignoring unreadable persisted config" in caplog.text


def test_a_failed_write_is_logged_and_leaves_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    write_last_good(blocker / "item.json", _config())  # its directory cannot be made
    assert "could not persist the last good config" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_instances_sharing_a_state_file_never_collide(tmp_path: Path) -> None:
    """Two sidecars of one service on one host persist to the same file, concurrently."""
    state = tmp_path / "item.json"
    configs = [_config() for _ in range(2)]
    errors: list[BaseException] = []

    def hammer(config: PushedConfig) -> None:
        try:
            for _ in range(300):
                write_last_good(state, config)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(c,)) for c in configs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and state.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["item.json"]  # no temporary file left behind
