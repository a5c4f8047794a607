"""`planner: auto` through the real planner core: the shipped DistServe OPT-13B A100 profile, an OPT-13B
config.json and GPU nodes described by labels -> the same plan `pdserve plan` prints for the same inputs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from coordinator.operator.plan import PlanError, PlanInputError, auto_plan
from coordinator.operator.spec import parse_spec
from coordinator.planner.distserve import SHIPPED
from coordinator.planner.model import OPT_13B_CONFIG
from pdserve.cli import main

OPT_13B = OPT_13B_CONFIG  # facebook/opt-13b's config.json (the fields the planner reads)
PROMPTS, OUTPUTS = [100, 200, 300, 400, 550], [20, 50, 80, 110]


def _node(name: str, gpus: int, **extra: str) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": f"host-{name}",
        "nvidia.com/gpu.count": str(gpus),
        "pdserve.io/gpu-memory-gib": "80",
        "pdserve.io/intra-gbytes-per-s": "300",
        "pdserve.io/inter-gbytes-per-s": "25",
        **extra,
    }
    return {"metadata": {"name": name, "labels": labels}, "status": {"allocatable": {"cpu": "16"}}}


def _spec(model_dir: Path, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"path": str(model_dir)},
        "device": "gpu",
        "planner": "auto",
        "profile": {"path": SHIPPED.name, "key": "facebook/opt-13b"},  # relative: the shipped profile
        "slo": {"ttftMs": 200, "tpotMs": 100, "attainment": 0.9},
        "workload": {"rate": 2.0, "promptTokens": PROMPTS, "outputTokens": OUTPUTS},
    }
    spec.update(over)
    return spec


@pytest.fixture
def opt13b(tmp_path: Path) -> Path:
    (tmp_path / "opt-13b").mkdir()
    (tmp_path / "opt-13b" / "config.json").write_text(json.dumps(OPT_13B))
    return tmp_path / "opt-13b"


def test_auto_plan_matches_pdserve_plan(
    opt13b: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = [_node("a", 2), _node("b", 2)]
    plan = auto_plan(parse_spec(_spec(opt13b)), nodes)

    # the same inputs as files, through `pdserve plan`
    topo = {
        "nodes": [
            {"name": f"host-{n}", "devices": 2, "device_memory_gib": 80, "intra_gbytes_per_s": 300}
            for n in ("a", "b")
        ],
        "inter_node_gbytes_per_s": 25,
    }
    (tmp_path / "topo.json").write_text(json.dumps(topo))
    reqs = [{"prompt_tokens": p, "output_tokens": o} for p, o in itertools.product(PROMPTS, OUTPUTS)]
    (tmp_path / "work.json").write_text(json.dumps({"requests": reqs}))
    argv = ["plan", "--model", str(opt13b), "--profile", str(SHIPPED), "--profile-key", "facebook/opt-13b"]
    argv += ["--topology", str(tmp_path / "topo.json"), "--workload", str(tmp_path / "work.json")]
    argv += ["--slo-ttft-ms", "200", "--slo-tpot-ms", "100", "--attainment", "0.9", "--rate", "2"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out.err
    cli = json.loads(out.out)

    assert plan.source == "auto" and plan.planner is not None
    for key in ("prefill", "decode", "placement", "kv_links", "predicted", "unit", "devices_used"):
        assert plan.planner[key] == cli[key], key
    for phase in ("prefill", "decode"):
        ours = plan.phase(phase)
        assert (ours.replicas, ours.tp, ours.pp) == (
            cli[phase]["instances"],
            cli[phase]["tp"],
            cli[phase]["pp"],
        )
        assert ours.replicas >= 1
        assert ours.nodes == tuple(sorted({p["node"] for p in cli["placement"] if p["phase"] == phase}))
        assert set(ours.nodes) <= {"host-a", "host-b"}  # hostnames: what node affinity matches
    assert plan.to_dict()["planner"]["inputs"]["profile"]["source"] == "distserve"


def test_auto_plan_inputs_missing_are_clear_conditions(opt13b: Path, tmp_path: Path) -> None:
    nodes = [_node("a", 2), _node("b", 2)]
    cases = [
        (_spec(opt13b, profile={}), nodes, "NoProfile", "spec.profile.path"),
        (_spec(tmp_path / "nowhere"), nodes, "NoModelConfig", "config.json"),
        (_spec(opt13b, profile={"path": "no-such.json"}), nodes, "BadProfile", "no-such.json"),
        (_spec(opt13b, profile={"path": SHIPPED.name}), nodes, "BadProfile", "several models"),
        (_spec(opt13b, profile={"path": SHIPPED.name, "key": "no/such"}), nodes, "BadProfile", "no/such"),
        (_spec(opt13b, workload={"bench": "nope"}), nodes, "InvalidSpec", "nope"),
    ]
    bare = _node("c", 2)
    del bare["metadata"]["labels"]["pdserve.io/gpu-memory-gib"]
    cases.append((_spec(opt13b), [_node("a", 2), bare], "NodeTopology", "c: pdserve.io/gpu-memory-gib"))
    for spec, ns, reason, needle in cases:
        with pytest.raises(PlanInputError) as exc:
            auto_plan(parse_spec(spec), ns)
        assert exc.value.reason == reason and needle in str(exc.value), (reason, str(exc.value))


def test_auto_plan_unmeetable_slo_is_no_plan(opt13b: Path) -> None:
    spec = _spec(opt13b, slo={"ttftMs": 5, "tpotMs": 5})
    with pytest.raises(PlanError, match="SLO"):
        auto_plan(parse_spec(spec), [_node("a", 2)])
