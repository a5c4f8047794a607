"""infra/k8s: `kubectl kustomize` output passes `kubernetes-validate --strict`; the CRD's schema accepts the
samples and rejects bad specs; the operator's rendered objects pass strict validation too."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from coordinator.operator.plan import manual_plan
from coordinator.operator.render import Owner, render
from coordinator.operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "infra" / "k8s"
KUBECTL = shutil.which("kubectl")


def _schema() -> dict:
    crd = yaml.safe_load((K8S / "crd.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _sample(name: str) -> dict:
    return yaml.safe_load((K8S / "samples" / name).read_text())


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kustomize_output_validates_strict(tmp_path):
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(K8S)], check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert {d["kind"] for d in docs} == {
        "Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
    }  # fmt: skip
    f = tmp_path / "k8s.yaml"
    f.write_text(out)
    r = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", str(f)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == len(docs)


def test_rbac_is_least_privilege():
    rules = yaml.safe_load_all((K8S / "rbac.yaml").read_text())
    role = next(d for d in rules if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        if rule["resources"] == ["nodes"]:
            assert set(rule["verbs"]) <= {"get", "list"}  # nodes are read only
    assert not any("secrets" in r["resources"] or "pods" in r["resources"] for r in role["rules"])


@pytest.mark.parametrize("sample", ["cpu.yaml", "gpu.yaml"])
def test_samples_pass_the_crd_schema_and_the_operator(sample):
    obj = _sample(sample)
    jsonschema.Draft4Validator(_schema()).validate(obj)
    parse_spec(obj["spec"])  # no SpecError


BAD = [
    ("negative replicas", lambda s: s["decode"].update(replicas=-1)),
    ("tp not a power of two", lambda s: s["prefill"].update(tp=3)),
    ("unknown planner", lambda s: s.update(planner="magic")),
    ("missing model", lambda s: s.pop("model")),
    ("attainment 0", lambda s: s.update(slo={"ttftMs": 1, "tpotMs": 1, "attainment": 0})),
    ("attainment above 1", lambda s: s.update(slo={"ttftMs": 1, "tpotMs": 1, "attainment": 1.5})),
    ("unknown field", lambda s: s.update(replicas=3)),
    ("unknown device", lambda s: s.update(device="tpu")),
    ("unknown profile field", lambda s: s.update(profile={"path": "p.json", "model": "x"})),
    ("empty profile path", lambda s: s.update(profile={"path": ""})),
]


@pytest.mark.parametrize("what,mutate", BAD, ids=[b[0] for b in BAD])
def test_crd_schema_rejects_bad_specs(what, mutate):
    obj = copy.deepcopy(_sample("gpu.yaml"))
    mutate(obj["spec"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(_schema()).validate(obj)


def test_crd_schema_accepts_attainment_one():
    obj = copy.deepcopy(_sample("gpu.yaml"))
    obj["spec"]["slo"]["attainment"] = 1
    jsonschema.Draft4Validator(_schema()).validate(obj)


def test_crd_schema_and_the_operator_accept_an_auto_spec_with_a_profile():
    obj = copy.deepcopy(_sample("gpu.yaml"))
    obj["spec"].update(
        planner="auto", profile={"path": "profiler-a100-80g.distserve.json", "key": "facebook/opt-13b"}
    )
    jsonschema.Draft4Validator(_schema()).validate(obj)
    profile = parse_spec(obj["spec"]).profile
    assert (profile.path, profile.key) == ("profiler-a100-80g.distserve.json", "facebook/opt-13b")


@pytest.mark.parametrize("sample", ["cpu.yaml", "gpu.yaml"])
def test_rendered_objects_validate_strict(sample):
    spec = parse_spec(_sample(sample)["spec"])
    objs = render(Owner("c", "default", "uid-1"), spec, manual_plan(spec))
    for obj in objs:
        kubernetes_validate.validate(obj, "1.37.0", strict=True)
