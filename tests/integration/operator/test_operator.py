"""The operator (kopf, `run_operator`) against an in-memory Kubernetes API (kmock): objects, owner references,
device requests, affinity, a spec change rolling into the Deployment, deletion, and bad specs."""

from __future__ import annotations

import json

from coordinator.operator.kube import path_of
from coordinator.operator.plan import PhasePlan, Plan, PlanRequest
from coordinator.planner.distserve import SHIPPED

from .conftest import start_operator, wait_for

NS = "default"


def _create(api, name, spec):
    api.kube._call(
        "POST",
        path_of("PDCluster", NS),
        body={
            "apiVersion": "pdserve.io/v1alpha1",
            "kind": "PDCluster",
            # the emulator keeps no resourceVersion/uid/generation: the test gives them as the API server would
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": f"uid-{name}",
                "generation": 1,
                "resourceVersion": "1",
            },
            "spec": spec,
        },
    )


def _condition(api, name, ctype):
    obj = api.kube.get(path_of("PDCluster", NS, name)) or {}
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == ctype:
            return c
    return None


def _deployment(api, name):
    return api.kube.get(path_of("Deployment", NS, name))


def test_create_scale_delete_gpu_cluster(fake_api, tmp_path, monkeypatch):
    stop = start_operator(fake_api, tmp_path, monkeypatch)
    try:
        _create(
            fake_api,
            "c1",
            {
                "model": {"path": "/models/m", "claimName": "models"},
                "image": "pdserve:gpu",
                "device": "gpu",
                "planner": "manual",
                "prefill": {"replicas": 1, "tp": 2, "pp": 1, "nodes": ["gpu-a"]},
                "decode": {"replicas": 2, "tp": 1, "pp": 1, "nodes": ["gpu-b"]},
            },
        )
        dec = wait_for(lambda: _deployment(fake_api, "c1-decode"), "the decode Deployment")
        pre = wait_for(lambda: _deployment(fake_api, "c1-prefill"), "the prefill Deployment")
        names = {
            ("Deployment", "c1-redis"), ("Service", "c1-redis"), ("Deployment", "c1-coordinator"),
            ("Service", "c1-gateway"), ("Deployment", "c1-prefill"), ("Deployment", "c1-decode"),
        }  # fmt: skip
        for kind, n in names:
            # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
            obj = wait_for(lambda k=kind, n=n: fake_api.kube.get(path_of(k, NS, n)), f"{kind} {n}")  # type: ignore[misc]
            (ref,) = obj["metadata"]["ownerReferences"]
            assert (
                ref["kind"] == "PDCluster"
                and ref["name"] == "c1"
                and ref["uid"] == "uid-c1"
                and ref["controller"]
            )
        assert dec["spec"]["replicas"] == 2 and pre["spec"]["replicas"] == 1
        pc = pre["spec"]["template"]["spec"]["containers"][0]
        assert pc["resources"]["limits"]["nvidia.com/gpu"] == "2"
        dc = dec["spec"]["template"]["spec"]["containers"][0]
        assert dc["resources"]["limits"]["nvidia.com/gpu"] == "1"
        terms = pre["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        assert terms[0]["matchExpressions"][0]["values"] == ["gpu-a"]
        assert (
            c["status"] == "True"
            if (c := wait_for(lambda: _condition(fake_api, "c1", "Planned"), "Planned"))
            else False
        )
        obj = fake_api.kube.get(path_of("PDCluster", NS, "c1"))
        assert obj["status"]["plan"]["decode"] == {"replicas": 2, "tp": 1, "pp": 1, "nodes": ["gpu-b"]}

        # the emulator has no Deployment controller: write the ready counts it would
        for n in ("c1-redis", "c1-coordinator", "c1-prefill"):
            fake_api.kube._call("PATCH", path_of("Deployment", NS, n) + "/status", body={"status": {"readyReplicas": 1}},
                                content_type="application/merge-patch+json")  # fmt: skip
        fake_api.kube._call("PATCH", path_of("Deployment", NS, "c1-decode") + "/status",
                            body={"status": {"readyReplicas": 1}}, content_type="application/merge-patch+json")  # fmt: skip
        wait_for(lambda: (_condition(fake_api, "c1", "Ready") or {}).get("status") == "True", "Ready=True")
        degraded = wait_for(lambda: _condition(fake_api, "c1", "Degraded"), "Degraded")
        assert degraded["status"] == "True" and "decode 1/2" in degraded["message"]
        phases = fake_api.kube.get(path_of("PDCluster", NS, "c1"))["status"]["phases"]
        assert phases["decode"] == {"replicas": 2, "readyReplicas": 1}

        # spec.decode.replicas 2 -> 3: the Deployment follows
        fake_api.kube._call("PATCH", path_of("PDCluster", NS, "c1"),
                            body={"metadata": {"generation": 2}, "spec": {"decode": {"replicas": 3}}},
                            content_type="application/merge-patch+json")  # fmt: skip
        wait_for(lambda: _deployment(fake_api, "c1-decode")["spec"]["replicas"] == 3, "decode replicas 3")

        # delete: the operator's finalizer deletes every owned object, then the PDCluster goes
        fake_api.kube.delete(path_of("PDCluster", NS, "c1"))
        wait_for(lambda: fake_api.kube.get(path_of("PDCluster", NS, "c1")) is None, "the PDCluster gone")
        assert fake_api.kube.list(path_of("Deployment", NS)) == []
        assert fake_api.kube.list(path_of("Service", NS)) == []
    finally:
        stop()


def test_bad_spec_and_auto_without_profile_are_conditions(fake_api, tmp_path, monkeypatch):
    fake_api.kube._call("POST", "/api/v1/nodes", body={"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": "cpu0"}, "status": {"allocatable": {"cpu": "8"}}})  # fmt: skip
    stop = start_operator(fake_api, tmp_path, monkeypatch)
    try:
        _create(fake_api, "bad", {"model": {"path": "/m"}, "device": "cpu", "prefill": {"tp": 2}})
        c = wait_for(lambda: _condition(fake_api, "bad", "Planned"), "Planned on the bad spec")
        assert c["status"] == "False" and c["reason"] == "InvalidSpec" and "tp*pp" in c["message"]
        auto = {
            "model": {"path": "/m"},
            "planner": "auto",
            "slo": {"ttftMs": 500, "tpotMs": 50, "attainment": 0.9},
            "workload": {"bench": "code"},
        }
        _create(fake_api, "auto", auto)
        c = wait_for(lambda: _condition(fake_api, "auto", "Planned"), "Planned on the auto spec")
        assert c["status"] == "False" and c["reason"] == "NoProfile" and "spec.profile.path" in c["message"]
        # neither got objects, and the operator is still serving: a good cluster next to them is created
        _create(fake_api, "good", {"model": {"path": "/m"}})
        wait_for(lambda: _deployment(fake_api, "good-decode"), "the good cluster's decode Deployment")
        assert _deployment(fake_api, "bad-decode") is None and _deployment(fake_api, "auto-decode") is None
    finally:
        stop()


def test_auto_plan_places_phases_on_the_planner_nodes(fake_api, tmp_path, monkeypatch):
    """planner: auto with a planner core plugged into the adapter: node topology in, affinity out."""
    seen: list[PlanRequest] = []

    def planner(req: PlanRequest) -> Plan:  # the smallest planner: prefill on the biggest GPU node
        seen.append(req)
        big = max(req.nodes, key=lambda n: (n.gpus, n.name))
        rest = tuple(n.hostname for n in req.nodes if n is not big)
        return Plan("auto", PhasePlan(1, big.gpus, 1, (big.hostname,)), PhasePlan(len(rest), 1, 1, rest))

    for name, gpus in (("n4", "4"), ("n1", "1"), ("cpu0", None)):
        labels = {"kubernetes.io/hostname": name, "pdserve.io/gpu-memory-gib": "80"}
        if gpus:
            labels["nvidia.com/gpu.count"] = gpus
        fake_api.kube._call("POST", "/api/v1/nodes", body={"apiVersion": "v1", "kind": "Node",
                            "metadata": {"name": name, "labels": labels}, "status": {"allocatable": {"cpu": "8"}}})  # fmt: skip
    stop = start_operator(fake_api, tmp_path, monkeypatch, planner=planner)
    try:
        auto = {
            "model": {"path": "/m"},
            "device": "gpu",
            "planner": "auto",
            "slo": {"ttftMs": 500, "tpotMs": 50, "attainment": 0.9},
            "workload": {"rate": 2.0, "promptTokens": [100, 200], "outputTokens": [50]},
        }
        _create(fake_api, "a", auto)
        pre = wait_for(lambda: _deployment(fake_api, "a-prefill"), "the prefill Deployment")
        assert {n.name for n in seen[0].nodes} == {
            "n4",
            "n1",
        }  # the CPU node is not offered for a GPU cluster
        assert seen[0].nodes[0].gpu_memory_gib == 80.0
        pod = pre["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
        expr = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][0]
        assert expr["matchExpressions"][0] == {
            "key": "kubernetes.io/hostname",
            "operator": "In",
            "values": ["n4"],
        }
        c = wait_for(lambda: _condition(fake_api, "a", "Planned"), "Planned")
        assert c["status"] == "True" and c["reason"] == "AutoPlan"
    finally:
        stop()


OPT_13B = {  # facebook/opt-13b's config.json (the fields the planner reads)
    "_name_or_path": "facebook/opt-13b", "model_type": "opt", "num_hidden_layers": 40, "hidden_size": 5120,
    "num_attention_heads": 40, "ffn_dim": 20480, "vocab_size": 50272, "max_position_embeddings": 2048,
    "torch_dtype": "float16",
}  # fmt: skip


def test_auto_plan_with_the_planner_core(fake_api, tmp_path, monkeypatch):
    """planner: auto with the shipped DistServe OPT-13B profile on two labelled 4-GPU nodes: the planner core
    plans, status.plan carries its JSON, and the Deployments request tp x pp GPUs on the planned nodes."""
    (tmp_path / "opt-13b").mkdir()
    (tmp_path / "opt-13b" / "config.json").write_text(json.dumps(OPT_13B))
    for name in ("gpu-a", "gpu-b"):
        labels = {"kubernetes.io/hostname": name, "nvidia.com/gpu.count": "4", "pdserve.io/gpu-memory-gib": "80",
                  "pdserve.io/intra-gbytes-per-s": "300", "pdserve.io/inter-gbytes-per-s": "25"}  # fmt: skip
        fake_api.kube._call("POST", "/api/v1/nodes", body={"apiVersion": "v1", "kind": "Node",
                            "metadata": {"name": name, "labels": labels}, "status": {"allocatable": {"cpu": "16"}}})  # fmt: skip
    stop = start_operator(fake_api, tmp_path, monkeypatch)
    try:
        spec = {
            "model": {"path": str(tmp_path / "opt-13b")},
            "device": "gpu",
            "planner": "auto",
            "profile": {"path": SHIPPED.name, "key": "facebook/opt-13b"},
            "slo": {"ttftMs": 250, "tpotMs": 30, "attainment": 0.9},
            "workload": {"rate": 2.0, "promptTokens": [500, 1000, 1500], "outputTokens": [20, 50, 80, 110]},
        }
        _create(fake_api, "opt", spec)
        c = wait_for(lambda: _condition(fake_api, "opt", "Planned"), "Planned", timeout=120)
        assert c["status"] == "True" and c["reason"] == "AutoPlan" and "predicted goodput" in c["message"], c
        plan = fake_api.kube.get(path_of("PDCluster", NS, "opt"))["status"]["plan"]
        assert plan["source"] == "auto"
        core = plan["planner"]  # pdserve plan's JSON
        assert core["predicted"]["goodput_rps"] > 0 and core["inputs"]["profile"]["source"] == "distserve"
        for phase in ("prefill", "decode"):
            want = plan[phase]
            assert want["replicas"] == core[phase]["instances"] >= 1
            assert (want["tp"], want["pp"]) == (core[phase]["tp"], core[phase]["pp"])
            placed = sorted({p["node"] for p in core["placement"] if p["phase"] == phase})
            assert want["nodes"] == placed and set(placed) <= {"gpu-a", "gpu-b"}
            dep = wait_for(lambda p=phase: _deployment(fake_api, f"opt-{p}"), f"the {phase} Deployment")  # type: ignore[misc]
            assert dep["spec"]["replicas"] == want["replicas"]
            pod = dep["spec"]["template"]["spec"]
            assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == str(
                want["tp"] * want["pp"]
            )
            expr = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"
            ][0]["matchExpressions"][0]
            assert expr == {"key": "kubernetes.io/hostname", "operator": "In", "values": placed}
        # this profile and these SLOs need more than one GPU per prefill instance
        assert plan["prefill"]["tp"] * plan["prefill"]["pp"] > 1

        # an SLO no layout meets: Planned=False, reason NoPlan, with the planner's message
        _create(fake_api, "tight", {**spec, "slo": {"ttftMs": 5, "tpotMs": 5}})
        c = wait_for(lambda: _condition(fake_api, "tight", "Planned"), "Planned on tight", timeout=120)
        assert c["status"] == "False" and c["reason"] == "NoPlan" and "SLO" in c["message"]
        assert _deployment(fake_api, "tight-prefill") is None
    finally:
        stop()
