"""benchmarks/cp_scale.py's replicas parts that can be checked without a benchmark: the
options, the targets, the histograms added up across replicas, the results section of its
own, and etcd (a real process) with the put→watch probe. No timing asserted."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import trio

from meshlet import wire

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cp() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cp_scale", ROOT / "benchmarks" / "cp_scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_cp_scale"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "replicas", "store"),
    [
        ([], 1, "file"),
        (["--store", "etcd"], 1, "etcd"),
        (["--replicas", "2"], 2, "etcd"),
    ],
)
def test_options(cp: ModuleType, argv: list[str], replicas: int, store: str) -> None:
    if store == "etcd" and shutil.which("etcd") is None:
        pytest.skip("etcd is not installed")
    settings = cp.parse_settings([*argv, "--no-pin"])
    assert (settings.replicas, settings.store) == (replicas, store)
    assert settings.section == (cp.SECTION if replicas == 1 else cp.REPLICAS_SECTION)


@pytest.mark.parametrize("argv", [["--replicas", "2", "--store", "file"], ["--replicas", "0"]])
def test_options_refused(cp: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        cp.parse_settings(argv)


def histogram(counts: list[int]) -> str:
    bounds = ["0.1", "0.5", "1.0", "+Inf"]
    return "".join(
        f'meshlet_cp_convergence_seconds_bucket{{le="{le}"}} {c}\n' for le, c in zip(bounds, counts, strict=True)
    )


def test_histograms_of_replicas_add_up(cp: ModuleType) -> None:
    # Replica 0: 10 ACKs under 0.1 s; replica 1: 10 between 0.5 and 1 s. Together the median
    # is at the top of the first bucket, which neither alone shows.
    one = cp.histogram_summary([histogram([10, 10, 10, 10])])
    both = cp.histogram_summary([histogram([10, 10, 10, 10]), histogram([0, 0, 10, 10])])
    assert one["count"] == 10 and both["count"] == 20
    assert one["p50"] == pytest.approx(0.05)
    assert both["p50"] == pytest.approx(0.1)
    assert both["p99"] == pytest.approx(0.5 + 0.5 * 9.8 / 10)


def sized(cp: ModuleType, n: int, all_acked: list[float], rss: list[float], *, synced_s: float, lost: int) -> object:
    start = cp.StartResult(cp.COLD, 60.0, synced_s=synced_s, sessions_lost=lost)
    result = cp.SizeResult(n, 4, starts=[start], all_acked=all_acked, replica_rss_mb=rss)
    result.rss_mb = max(rss)
    return result


def test_targets(cp: ModuleType) -> None:
    one = sized(cp, 5000, [2.5], [280.0], synced_s=10.0, lost=0)
    rows = {t.metric: (t.limit, t.passed) for t in cp.build_targets([one])}
    assert rows == {
        "convergence p99, all 5,000 ACKed": (3.0, True),
        "control-plane RSS at 5,000 connected": (300.0, True),
    }
    two = sized(cp, 10000, [1.2, 1.6], [250.0, 320.0], synced_s=31.0, lost=3)
    rows = {t.metric: (t.limit, t.passed) for t in cp.build_targets([two], replicas=2)}
    assert rows == {
        "convergence p99, all 10,000 ACKed": (1.5, False),
        "cold start of 10,000: all connected and synced": (30.0, False),
        "cold start of 10,000: sessions lost": (0.0, False),
        "replica 0 RSS at 10,000 connected": (300.0, True),
        "replica 1 RSS at 10,000 connected": (300.0, False),
    }
    small = sized(cp, 800, [0.5], [100.0, 100.0], synced_s=2.0, lost=0)  # the 1 s target still holds
    assert {t.metric: t.limit for t in cp.build_targets([small], replicas=2)}["convergence p99, all 800 ACKed"] == 1.0


def test_replicas_section_leaves_the_single_one(cp: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\n## Other\n\nkept\n")
    cp.write_section(out, f"{cp.SECTION}\n\none process, first\n")
    cp.write_section(out, f"{cp.REPLICAS_SECTION}\n\nreplicas, first\n", cp.REPLICAS_SECTION)
    cp.write_section(out, f"{cp.SECTION}\n\none process, second\n")
    cp.write_section(out, f"{cp.REPLICAS_SECTION}\n\nreplicas, second\n", cp.REPLICAS_SECTION)
    text = out.read_text()
    assert text.count(cp.SECTION + "\n") == 1 and text.count(cp.REPLICAS_SECTION + "\n") == 1
    assert "kept" in text and "one process, second" in text and "replicas, second" in text
    assert "first" not in text


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")
def test_etcd_and_its_put_watch_probe(cp: ModuleType, tmp_path: Path) -> None:
    async def main() -> tuple[list[float], str, int]:
        async with cp.etcd_server(tmp_path, "t", None) as etcd:
            latencies = await cp.put_watch_latency(etcd.url, puts=50)
            scratch = {"key": cp.b64(cp.PROBE_PREFIX), "range_end": cp.b64(cp.prefix_end(cp.PROBE_PREFIX))}
            async with httpx.AsyncClient(base_url=etcd.url) as client:
                left = (await client.post("/v3/kv/range", json={**scratch, "count_only": True})).json()
            return latencies, left.get("count", "0"), etcd.child.pid

    latencies, left, pid = trio.run(main)
    assert len(latencies) == 50 and all(t > 0 for t in latencies)
    assert left == "0"  # the probe's keys were deleted (int64 fields come as strings; 0 is left out)
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped


def test_deltas_are_checked_against_their_version(cp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def ep(i: int) -> dict[str, object]:
        return {"id": f"i{i}", "address": f"10.0.0.{i}:80", "labels": {"zone": "a"}}

    lists = cp.SharedLists()
    a, b, target = [ep(1)], [ep(1), ep(2)], [ep(1), ep(2), ep(3)]
    v_a, v_b, v_target = (wire.content_version(x) for x in (a, b, target))
    # Two sidecars hold different versions; both are pushed a delta to the same target. The
    # load's own hash (each endpoint's bytes kept) agrees: wire's slower one is not needed.
    slow = wire.apply_endpoint_delta
    monkeypatch.setattr(wire, "apply_endpoint_delta", lambda *_: pytest.fail("hashed the slow way"))
    assert lists.delta(a, wire.Resource("svc-7", v_target, base=v_a, add=(ep(2), ep(3)))) == target
    assert lists.delta(b, wire.Resource("svc-7", v_target, base=v_b, add=(ep(3),))) == target
    assert lists.delta(target, wire.Resource("svc-7", v_a, base=v_target, remove=("i2", "i3"))) == a
    monkeypatch.setattr(wire, "apply_endpoint_delta", slow)
    for wrong, why in [
        (wire.Resource("svc-7", v_target, base=v_b, add=(ep(4),)), "do not match"),  # not the target
        (wire.Resource("svc-7", v_target, base=v_b, add=({**ep(3), "labels": {"zone": "b"}},)), "do not match"),
        (wire.Resource("svc-7", v_target, base=v_b, add=("not an endpoint",)), "endpoint"),
    ]:
        with pytest.raises(wire.WireError, match=why):
            lists.delta(b, wrong)
