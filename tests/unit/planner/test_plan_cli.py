"""`pdserve plan`, `pdserve topology --local`, `pdserve profile`: the thin adapters around the planner core."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.planner.distserve import SHIPPED
from coordinator.planner.model import OPT_13B_CONFIG
from coordinator.planner.topology import Topology
from pdserve.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


@pytest.fixture
def opt13b_inputs(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "opt-13b").mkdir()
    (tmp_path / "opt-13b" / "config.json").write_text(json.dumps(OPT_13B_CONFIG))
    topo = {
        "nodes": [{"name": "n0", "devices": 4, "device_memory_gib": 80, "intra_gbytes_per_s": 300}],
        "inter_node_gbytes_per_s": 25,
    }
    (tmp_path / "topo.json").write_text(json.dumps(topo))
    reqs = [{"prompt_tokens": 100 + 50 * (i % 10), "output_tokens": 20 + 15 * (i % 7)} for i in range(70)]
    (tmp_path / "work.json").write_text(json.dumps({"requests": reqs}))
    return {
        "model": str(tmp_path / "opt-13b"),
        "topology": str(tmp_path / "topo.json"),
        "workload": str(tmp_path / "work.json"),
    }


def test_plan_prints_one_json_object(
    opt13b_inputs: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["plan", "--model", opt13b_inputs["model"], "--profile", str(SHIPPED), "--topology"]
    common += [opt13b_inputs["topology"], "--slo-ttft-ms", "200", "--slo-tpot-ms", "100"]
    rc, out, err = run(
        [*common, "--profile-key", "facebook/opt-13b", "--workload", opt13b_inputs["workload"]], capsys
    )
    assert rc == 0, err
    plan = json.loads(out)
    for key in ("prefill", "decode", "placement", "kv_links", "predicted", "search_s"):
        assert key in plan
    assert plan["prefill"]["instances"] >= 1 and plan["decode"]["instances"] >= 1
    assert sum(len(p["devices"]) for p in plan["placement"]) <= 4
    assert plan["predicted"]["goodput_rps"] > 0
    # --rate: instance counts for that rate (a single node of 4 holds one unit at most)
    rc, out, _ = run(
        [
            *common,
            "--profile-key",
            "facebook/opt-13b",
            "--workload",
            opt13b_inputs["workload"],
            "--rate",
            "0.5",
        ],
        capsys,
    )
    assert rc == 0 and json.loads(out)["predicted"]["rate_rps"] == 0.5
    # bad input: clear messages, exit 2
    rc, _, err = run([*common, "--workload", opt13b_inputs["workload"]], capsys)
    assert rc == 2 and "--profile-key" in err
    rc, _, err = run([*common, "--profile-key", "facebook/opt-13b", "--workload", "nope"], capsys)
    assert rc == 2 and "unknown workload" in err
    rc, _, err = run([*common, "--profile-key", "no/such", "--workload", "balanced"], capsys)
    assert rc == 2 and "no model 'no/such'" in err
    # a rate no topology of 4 devices can serve
    rc, _, err = run(
        [*common, "--profile-key", "facebook/opt-13b", "--workload", "balanced", "--rate", "1e6"], capsys
    )
    assert rc == 1 and "no plan" in err


def test_topology_local_is_a_valid_topology(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["topology", "--local", "--out", str(tmp_path / "t.json")], capsys)
    assert rc == 0
    topo = Topology.from_dict(json.loads(out))
    assert topo.num_devices >= 1 and topo.nodes[0].intra_gbytes_per_s > 0
    assert Topology.from_dict(json.loads((tmp_path / "t.json").read_text())) == topo


def test_profile_fits_the_engine_here(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(
        ["profile", "--tries", "1", "--new-tokens", "3", "--out", str(tmp_path / "p.json")], capsys
    )
    assert rc == 0
    prof = json.loads(out)
    (layout,) = prof["layouts"]
    assert (layout["tp"], layout["pp"]) == (1, 1)
    assert len(layout["points"]["prefill"]) >= 3 and len(layout["points"]["decode"]) >= 3
    assert all(p["s"] > 0 for p in layout["points"]["decode"])
    assert set(layout["fit_error"]) == {"prefill", "decode"}
    # the plan reads it back
    from pdserve.plan_cli import load_profile

    assert load_profile(str(tmp_path / "p.json"), None).tps() == (1,)


def test_status_reads_the_registry(redis_server: object, capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator.registry import InstanceInfo, Registry

    url = redis_server.url  # type: ignore[attr-defined]
    reg = Registry(url, "plan-status")
    try:
        reg.announce(InstanceInfo("p0", "prefill", "127.0.0.1:1", node="h", devices="cpu:0", queue_len=2), 30)
        reg.announce(
            InstanceInfo(
                "d0", "decode", "127.0.0.1:2", node="h", devices="cpu:1", kv_blocks_free=7, kv_blocks_total=9
            ),
            30,
        )
        rc, out, _ = run(["status", "--redis-url", url, "--cluster", "plan-status"], capsys)
        assert rc == 0
        st = json.loads(out)
        assert st["counts"] == {"decode": 1, "prefill": 1}
        d0, p0 = st["instances"]
        assert (p0["instance"], p0["role"], p0["devices"], p0["node"]) == ("p0", "prefill", "cpu:0", "h")
        assert p0["load"]["queue_len"] == 2 and d0["load"]["kv_blocks_free"] == 7
        assert p0["layout"] == {"tp": 1, "pp": 1}
    finally:
        for i in reg.instances():
            reg.withdraw(i)
        reg.close()
    rc, _, err = run(["status", "--redis-url", "redis://127.0.0.1:1"], capsys)
    assert rc == 1 and "cannot read the registry" in err
