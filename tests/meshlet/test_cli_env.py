"""Every `meshlet sidecar` option can come from the environment (MESHLET_<OPTION>), as
containers are configured; a flag on the command line wins; a bad value names the variable."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from meshlet import cli

BASE = ["sidecar", "--service", "item", "--app", "127.0.0.1:8080"]


def parse(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argv: list[str]) -> argparse.Namespace:
    for name in [name for name in os.environ if name.startswith("MESHLET_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return cli.build_parser().parse_args(argv)


@pytest.mark.parametrize(
    ("variable", "value", "dest", "expected"),
    [
        ("MESHLET_INBOUND", "0.0.0.0:16006", "inbound", ("0.0.0.0", 16006)),
        ("MESHLET_OUTBOUND", "127.0.0.1:0", "outbound", ("127.0.0.1", 0)),
        ("MESHLET_ADMIN", "127.0.0.1:16090", "admin", ("127.0.0.1", 16090)),
        ("MESHLET_STATIC", "/etc/meshlet/services.yaml", "static", Path("/etc/meshlet/services.yaml")),
        ("MESHLET_CONTROL_PLANE", "cp-1:15010,cp-2:15010", "control_plane", "cp-1:15010,cp-2:15010"),
        ("MESHLET_LABEL", "version=v2, team=shop", "label", ["version=v2", "team=shop"]),
        ("MESHLET_ZONE", "eu-1a", "zone", "eu-1a"),
        ("MESHLET_ADVERTISE", "10.0.0.7", "advertise", "10.0.0.7"),
        ("MESHLET_INSTANCE_ID", "item-7", "instance_id", "item-7"),
        ("MESHLET_DATA_DIR", "/var/lib/meshlet", "data_dir", Path("/var/lib/meshlet")),
        ("MESHLET_HEALTH_PATH", "/healthz", "health_path", "/healthz"),
        ("MESHLET_APP_PROTOCOL", "tcp", "app_protocol", "tcp"),
        (
            "MESHLET_TRACE_COLLECTOR",
            "http://zipkin:9411/api/v2/spans",
            "trace_collector",
            "http://zipkin:9411/api/v2/spans",
        ),
        ("MESHLET_TRACE_SAMPLING", "0.01", "trace_sampling", 0.01),
        ("MESHLET_UPSTREAM", "item=127.0.0.1:9001", "upstream", [("item", ("127.0.0.1", 9001))]),
        ("MESHLET_WORKERS", "4", "workers", 4),
        ("MESHLET_HEADER_TIMEOUT", "2.5", "header_timeout", 2.5),
        ("MESHLET_HEADER_TIMEOUT", "500ms", "header_timeout", 0.5),  # a duration, as in a policy
        ("MESHLET_DRAIN_TIMEOUT", "1m", "drain_timeout", 60.0),
        ("MESHLET_MAX_INBOUND_CONNECTIONS", "5", "max_inbound_connections", 5),
        ("MESHLET_LOG_LEVEL", "debug", "log_level", "debug"),
    ],
)
def test_each_option_from_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, dest: str, expected: object
) -> None:
    assert getattr(parse(monkeypatch, {variable: value}, BASE), dest) == expected


def test_the_required_ones_too_and_a_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MESHLET_SERVICE": "item", "MESHLET_APP": "127.0.0.1:8080", "MESHLET_WORKERS": "4"}
    args = parse(monkeypatch, env, ["sidecar", "--workers", "2"])
    assert (args.service, args.app, args.workers) == ("item", ("127.0.0.1", 8080), 2)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MESHLET_INBOUND", "garbage", "MESHLET_INBOUND='garbage': 'garbage' is not HOST:PORT"),
        ("MESHLET_WORKERS", "many", "MESHLET_WORKERS='many': 'many' is not a whole number"),
        ("MESHLET_WORKERS", "0", "MESHLET_WORKERS='0': 0 must be at least 1"),
        ("MESHLET_DRAIN_TIMEOUT", "-1", "MESHLET_DRAIN_TIMEOUT='-1': '-1' is not a duration"),
        ("MESHLET_LOG_LEVEL", "loud", "MESHLET_LOG_LEVEL='loud': expected one of debug, info, warning, error"),
        ("MESHLET_UPSTREAM", "item", "MESHLET_UPSTREAM='item': 'item': expected NAME=HOST:PORT"),
    ],
)
def test_a_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(monkeypatch, {variable: value}, BASE)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_without_service_or_app_the_error_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse(monkeypatch, {}, ["sidecar"])
    assert "--service" in capsys.readouterr().err


def test_the_control_plane_is_configured_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "MESHLET_LISTEN": "0.0.0.0:15010",
        "MESHLET_API": "0.0.0.0:15000",
        "MESHLET_TTL": "30",
        "MESHLET_STORE": "memory",
    }
    args = parse(monkeypatch, env, ["control-plane", "--ttl", "20"])
    assert (args.listen, args.api, args.ttl, args.store) == (("0.0.0.0", 15010), ("0.0.0.0", 15000), 20.0, "memory")


def test_a_bad_value_for_another_command_does_not_stop_this_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command's variables are read; only the command run refuses its own."""
    env = {"MESHLET_SERVICE": "item", "MESHLET_APP": "127.0.0.1:8080", "MESHLET_TIMEOUT": "soon"}
    assert parse(monkeypatch, env, ["sidecar"]).service == "item"  # MESHLET_TIMEOUT is wait-ready's
    with pytest.raises(SystemExit) as exit_:
        parse(monkeypatch, env, ["wait-ready"])
    assert exit_.value.code == 2
    assert "MESHLET_TIMEOUT='soon'" in capsys.readouterr().err


# The flags check a value with the rule a file or policy would, and refuse it as bad usage
# (exit 2, naming the flag) before anything starts.
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "0"], "argument --workers: 0 must be at least 1"),
        (["--max-inbound-connections", "-3"], "argument --max-inbound-connections: -3 must be at least 1"),
        (["--max-outbound-connections", "x"], "argument --max-outbound-connections: 'x' is not a whole number"),
        (["--instance-id", "item/1"], "argument --instance-id: instance_id 'item/1' contains '/'"),
        (["--header-timeout", "0"], "argument --header-timeout: '0' must be greater than 0"),
        (["--header-timeout", "nan"], "argument --header-timeout: 'nan' is not a duration"),
        (
            ["--drain-timeout", "soon"],
            "argument --drain-timeout: 'soon' is not a duration (allowed: 250ms, 2s, 1m, 1h)",
        ),
        (["--app", "::1:8080"], "argument --app: '::1:8080' is not HOST:PORT (an IPv6 host goes in brackets"),
        (
            ["--app-protocol", "mysql"],
            "argument --app-protocol: 'mysql' is not a protocol (one of http1, http2, grpc, tcp)",
        ),
        (["--app-protocol", "HTTP2"], "argument --app-protocol: 'HTTP2' is not a protocol"),
    ],
)
def test_a_bad_flag_is_refused_with_the_rule(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(monkeypatch, {}, [*BASE, *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_service_name_is_checked_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not first by the control plane, once the sidecar is up and registering."""
    with pytest.raises(SystemExit) as exit_:
        parse(monkeypatch, {}, ["sidecar", "--service", "Item_1", "--app", "127.0.0.1:8080"])
    assert exit_.value.code == 2
    assert "argument --service: 'Item_1' is not a service name" in capsys.readouterr().err


def test_the_control_plane_lease_is_a_duration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse(monkeypatch, {}, ["control-plane", "--ttl", "1m"]).ttl == 60.0
    with pytest.raises(SystemExit) as exit_:
        parse(monkeypatch, {}, ["control-plane", "--ttl", "0"])  # float() took it: every lease expired at once
    assert exit_.value.code == 2
    assert "argument --ttl: '0' must be greater than 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, 1800.0),  # 30 min
        (["--max-session-age", "2s"], {}, 2.0),
        (["--max-session-age", "0"], {}, 0.0),  # never
        (["--max-session-age", "0s"], {}, 0.0),
        ([], {"MESHLET_MAX_SESSION_AGE": "1h"}, 3600.0),
    ],
)
def test_the_maximum_session_age_is_a_duration_or_zero(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str], expected: float
) -> None:
    assert parse(monkeypatch, env, ["control-plane", *argv]).max_session_age == expected


@pytest.mark.parametrize("value", ["-1s", "soon", "1e400"])
def test_a_bad_maximum_session_age_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(monkeypatch, {}, ["control-plane", f"--max-session-age={value}"])
    assert exit_.value.code == 2
    assert "argument --max-session-age: " in capsys.readouterr().err
