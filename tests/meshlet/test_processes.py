"""meshlet/processes.py: the ready line, and children that fail to start or to stop."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import trio

from meshlet import processes
from meshlet.processes import ChildFailed, ReadyLine, parse_ready_line

READY_LINES = [
    (
        "meshlet sidecar ready outbound=127.0.0.1:4001 inbound=127.0.0.1:4002 admin=127.0.0.1:4003",
        "meshlet sidecar ready",
        {"outbound": 4001, "inbound": 4002, "admin": 4003},
    ),
    (
        "meshlet control-plane ready push=127.0.0.1:15010 api=0.0.0.0:15000\n",
        "meshlet control-plane ready",
        {"push": 15010, "api": 15000},
    ),
    (  # workers: a count, not an address; an upstream listener's name has a colon
        "meshlet sidecar ready outbound=127.0.0.1:1 inbound=127.0.0.1:2 admin=127.0.0.1:3 "
        "upstream:db=127.0.0.1:5432 workers=2",
        "meshlet sidecar ready",
        {"outbound": 1, "inbound": 2, "admin": 3, "upstream:db": 5432},
    ),
    ("meshlet sidecar ready inbound=[::1]:8080", "meshlet sidecar ready", {"inbound": 8080}),
    ("listening 8080", "listening 8080", {}),
    ("", "", {}),
    ("Traceback (most recent call last):", "Traceback (most recent call last):", {}),
    ("meshlet sidecar ready admin=127.0.0.1:notaport", "meshlet sidecar ready", {}),
]


@pytest.mark.parametrize(("line", "banner", "ports"), READY_LINES)
def test_ready_line(line: str, banner: str, ports: dict[str, int]) -> None:
    ready = parse_ready_line(line)
    assert ready.banner == banner
    assert ready.ports == ports


def test_ready_line_keeps_every_field_as_printed() -> None:
    ready = parse_ready_line("meshlet sidecar ready admin=127.0.0.1:9 workers=2")
    assert ready == ReadyLine("meshlet sidecar ready", {"admin": "127.0.0.1:9", "workers": "2"})


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


READY = "print('meshlet test ready port=127.0.0.1:1234', flush=True)"
SERVE = "import time; time.sleep(60)"
IGNORE_SIGTERM = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)"
TRACEBACK = "import threading; threading.Thread(target=lambda: 1 / 0).start()"  # logged, and it goes on

# A child that never says it is ready, each way, and what the failure must quote.
NOT_READY = [
    ("import sys; sys.stderr.write('no such option --x\\n'); sys.exit(2)", "exited with 2", "no such option --x"),
    ("raise SystemExit('boom: bad config')", "exited with 1", "boom: bad config"),
    ("print('something else', flush=True); import time; time.sleep(60)", "still running", "something else"),
]


@pytest.mark.parametrize(("code", "status", "quoted"), NOT_READY)
def test_a_child_that_does_not_start_fails_with_its_log(tmp_path: Path, code: str, status: str, quoted: str) -> None:
    with (
        pytest.raises(ChildFailed, match=status) as failed,
        processes.started("child", python(code), tmp_path / "child.log", ready="meshlet test ready"),
    ):
        pass
    assert quoted in str(failed.value)


def test_a_child_that_logs_a_traceback_fails_with_its_log(tmp_path: Path) -> None:
    code = f"{READY}; {TRACEBACK}; {SERVE}"
    with (
        pytest.raises(ChildFailed, match="logged a traceback") as failed,
        processes.started("child", python(code), tmp_path / "child.log", ready="meshlet test ready") as child,
    ):
        assert child.ready is not None and child.ready.ports == {"port": 1234}
        time.sleep(0.5)
    assert "Traceback (most recent call last)" in str(failed.value)


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    code = f"{IGNORE_SIGTERM}; {READY}; {SERVE}"
    started = time.monotonic()
    with processes.started("child", python(code), tmp_path / "child.log", ready="meshlet test ready", grace=0.5) as c:
        pass
    assert c.popen.returncode == -9
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("code", "status", "quoted"), NOT_READY)
async def test_a_trio_child_that_does_not_start_fails_with_its_log(
    tmp_path: Path, code: str, status: str, quoted: str
) -> None:
    with pytest.raises(ChildFailed, match=status) as failed:
        async with processes.open_child("child", python(code), tmp_path / "child.log", ready="meshlet test ready"):
            pass
    assert quoted in str(failed.value)


async def test_a_trio_child_that_logs_a_traceback_fails_with_its_log(tmp_path: Path) -> None:
    code = f"{READY}; {TRACEBACK}; {SERVE}"
    with pytest.raises(ChildFailed, match="logged a traceback") as failed:
        async with processes.open_child("child", python(code), tmp_path / "c.log", ready="meshlet test ready") as child:
            assert child.ready is not None and child.ready.ports == {"port": 1234}
            await trio.sleep(0.5)
    assert "Traceback (most recent call last)" in str(failed.value)


async def test_stop_child_kills_a_trio_child_that_ignores_sigterm(tmp_path: Path) -> None:
    code = f"{IGNORE_SIGTERM}; {READY}; {SERVE}"
    with trio.fail_after(10):
        async with processes.open_child(
            "child", python(code), tmp_path / "child.log", ready="meshlet test ready", grace=0.5
        ) as child:
            pass
    assert child.process.returncode == -9


async def test_stop_child_stops_the_child_even_when_cancelled(tmp_path: Path) -> None:
    code = f"{READY}; {SERVE}"
    with trio.move_on_after(0.2):
        async with processes.open_child("child", python(code), tmp_path / "c.log", ready="meshlet test ready") as child:
            await trio.sleep_forever()
    assert child.process.returncode == -15


def test_the_ready_banner_is_matched_word_by_word(tmp_path: Path) -> None:
    code = f"print('listening 8080', flush=True); {SERVE}"
    with processes.started("app", python(code), tmp_path / "app.log", ready="listening") as child:
        assert child.ready is not None and child.ready.banner == "listening 8080"
    with (
        pytest.raises(ChildFailed, match="did not say 'listen'"),
        processes.started("app", python(code), tmp_path / "app.log", ready="listen"),
    ):
        pass


def test_a_failure_quotes_the_end_of_a_long_log(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    log.write_text("".join(f"warning {i}\n" for i in range(500)) + "Traceback (most recent call last):\n")
    message = str(ChildFailed("child", "exited with 1", log))
    assert "the end of its log" in message and "Traceback" in message
    assert "warning 499" in message and "warning 400\n" not in message
