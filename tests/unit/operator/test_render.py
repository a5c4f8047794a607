"""The pure core: spec checks (what the schema cannot say), node topology, manual plans and `render`."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.operator.plan import (
    PlanError,
    PlanInputError,
    auto_plan,
    manual_plan,
    node_topology,
)
from coordinator.operator.render import Owner, render
from coordinator.operator.spec import SpecError, parse_spec

OWNER = Owner("c", "ns", "uid-1")


def _by_name(objs):
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_cpu_render_instances_advertise_pod_ip_probe_grpc_health_and_request_cpus():
    spec = parse_spec({"model": {"path": "/m"}, "prefill": {"resources": {"requests": {"cpu": "2"}}}})
    objs = _by_name(render(OWNER, spec, manual_plan(spec)))
    assert set(objs) == {
        ("Deployment", "c-redis"), ("Service", "c-redis"), ("Deployment", "c-coordinator"),
        ("Service", "c-gateway"), ("Deployment", "c-prefill"), ("Deployment", "c-decode"),
    }  # fmt: skip
    for o in objs.values():
        assert o["metadata"]["ownerReferences"][0]["uid"] == "uid-1" and o["metadata"]["namespace"] == "ns"
    pod = objs[("Deployment", "c-prefill")]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    assert args[args.index("--advertise-host") + 1] == "$(POD_IP)"
    assert args[args.index("--redis-url") + 1] == "redis://c-redis:6379/0"
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
    assert c["readinessProbe"]["grpc"] == {"port": 50061} and c["livenessProbe"]["grpc"] == {"port": 50061}
    assert c["resources"]["requests"] == {"cpu": "2"} and "nvidia.com/gpu" not in str(c["resources"])
    assert "affinity" not in pod
    coord = objs[("Deployment", "c-coordinator")]["spec"]["template"]["spec"]["containers"][0]
    assert coord["args"][coord["args"].index("--redis-url") + 1] == "redis://c-redis:6379/0"
    assert coord["readinessProbe"]["grpc"] == {"port": 50051}


def test_gpu_render_requests_tp_times_pp_devices_and_mounts_the_model_claim():
    spec = parse_spec(
        {
            "model": {"path": "/models/m", "claimName": "pvc"},
            "device": "gpu",
            "prefill": {"tp": 4, "pp": 2, "nodes": ["a", "b"]},
        }
    )
    objs = _by_name(render(OWNER, spec, manual_plan(spec)))
    pod = objs[("Deployment", "c-prefill")]["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == "8" and res["limits"]["nvidia.com/gpu"] == "8"
    expr = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert expr[0]["matchExpressions"][0]["values"] == ["a", "b"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "pvc"
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/models"


@pytest.mark.parametrize(
    "spec,needle",
    [
        ({}, "model.path"),
        ({"model": {"path": "/m"}, "prefill": {"tp": 2}}, "device: gpu"),
        ({"model": {"path": "/m"}, "decode": {"replicas": -1}}, ">= 0"),
        ({"model": {"path": "/m"}, "planner": "auto"}, "slo"),
        ({"model": {"path": "/m"}, "planner": "auto", "slo": {"ttftMs": 1, "tpotMs": 1}}, "workload"),
        ({"model": {"path": "/x", "claimName": "p"}}, "under spec.model.mountPath"),
        (
            {
                "model": {"path": "/m"},
                "device": "gpu",
                "prefill": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
            },
            "tp*pp",
        ),
    ],
)
def test_spec_errors_say_what_is_wrong(spec, needle):
    with pytest.raises(SpecError, match=None) as exc:
        parse_spec(spec)
    assert needle in str(exc.value)


def test_node_topology_reads_the_documented_labels_and_annotations():
    node: dict[str, Any] = {
        "metadata": {
            "name": "n1",
            "labels": {
                "kubernetes.io/hostname": "host-1",
                "nvidia.com/gpu.count": "8",
                "nvidia.com/gpu.memory": "81920",
            },
            "annotations": {"pdserve.io/intra-gbytes-per-s": "450", "pdserve.io/inter-gbytes-per-s": "50"},
        },
        "status": {"allocatable": {"cpu": "15500m", "nvidia.com/gpu": "8"}},
    }
    t = node_topology(node)
    assert (t.hostname, t.gpus, t.gpu_memory_gib, t.cpus) == ("host-1", 8, 80.0, 15.5)
    assert (t.intra_gbytes_per_s, t.inter_gbytes_per_s) == (450.0, 50.0)
    # pdserve.io/gpu-memory-gib wins over GFD's MiB label; allocatable is the fallback for the count
    node["metadata"]["labels"]["pdserve.io/gpu-memory-gib"] = "141"
    del node["metadata"]["labels"]["nvidia.com/gpu.count"]
    t = node_topology(node)
    assert (t.gpus, t.gpu_memory_gib) == (8, 141.0)


def test_auto_plan_without_a_profile_is_a_clear_error_not_manual():
    spec = parse_spec(
        {
            "model": {"path": "/m"},
            "planner": "auto",
            "slo": {"ttftMs": 1, "tpotMs": 1},
            "workload": {"bench": "x"},
        }
    )
    nodes = [{"metadata": {"name": "n"}, "status": {"allocatable": {"cpu": "4"}}}]
    with pytest.raises(PlanInputError, match="spec.profile.path") as exc:
        auto_plan(spec, nodes)
    assert exc.value.reason == "NoProfile"
    gpu = parse_spec({**{"model": {"path": "/m"}, "planner": "auto", "device": "gpu"},
                      "slo": {"ttftMs": 1, "tpotMs": 1}, "workload": {"bench": "x"}})  # fmt: skip
    with pytest.raises(PlanError, match="no GPU nodes"):
        auto_plan(gpu, nodes)
