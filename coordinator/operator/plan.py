"""A PDCluster's plan: how many instances per phase, their tp x pp layout and the nodes they may run on.

`manual_plan` takes the spec as given. `auto_plan` reads the nodes' topology (`node_topology`, from the
labels and annotations documented in infra/k8s/README.md) and calls the planner core through the one
adapter `call_planner`: the model's config.json, the spec's latency profile, SLOs and workload and the GPU
nodes become the planner's SearchInput (built as `pdserve plan` builds it, pdserve.plan_cli.search_input),
and its plan becomes per-phase replicas, tp, pp and hostnames. Any failure is a `Planned=False` condition
(never a silent fallback to manual)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.operator.spec import PHASES, SLO, ClusterSpec, Workload
from coordinator.planner.distserve import SHIPPED
from coordinator.planner.plan import Plan as CorePlan
from coordinator.planner.topology import Node, Topology

# Node labels / annotations the auto planner reads (labels win over annotations of the same key).
GPU_COUNT_KEYS = ("nvidia.com/gpu.count",)  # GPU feature discovery's label; else status.allocatable
GPU_MEMORY_GIB = "pdserve.io/gpu-memory-gib"  # memory of one accelerator, GiB
GPU_MEMORY_MIB_NVIDIA = "nvidia.com/gpu.memory"  # GPU feature discovery's label, MiB
INTRA_GBPS = "pdserve.io/intra-gbytes-per-s"  # bandwidth between accelerators of one node (NVLink), GB/s
INTER_GBPS = "pdserve.io/inter-gbytes-per-s"  # network bandwidth of the node, GB/s
HOSTNAME_LABEL = "kubernetes.io/hostname"


SHIPPED_PROFILES = SHIPPED.parent  # a relative spec.profile.path names a file here
N_SAMPLES = 1000  # (prompt, output) pairs drawn when the spec's length samples' cross product is larger


class PlanError(ValueError):
    """The planner found no layout that meets the spec on these nodes (condition reason NoPlan)."""


class PlanInputError(ValueError):
    """An input of `planner: auto` is missing or unreadable; `reason` is the Planned=False condition's reason
    (NoProfile, BadProfile, NoModelConfig, NodeTopology, InvalidSpec)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class NodeTopology:
    name: str
    hostname: str  # the node's kubernetes.io/hostname label (what node affinity matches)
    gpus: int  # allocatable accelerators (0 on a CPU node)
    gpu_memory_gib: float | None  # memory of one accelerator
    cpus: float  # allocatable CPU cores
    intra_gbytes_per_s: float | None  # between the node's accelerators
    inter_gbytes_per_s: float | None  # to other nodes


@dataclass(frozen=True)
class PhasePlan:
    replicas: int
    tp: int
    pp: int
    nodes: tuple[str, ...] = ()  # kubernetes.io/hostname values the phase's pods may run on (empty = any)

    def to_dict(self) -> dict[str, Any]:
        return {"replicas": self.replicas, "tp": self.tp, "pp": self.pp, "nodes": list(self.nodes)}


@dataclass(frozen=True)
class Plan:
    source: str  # "manual" or "auto"
    prefill: PhasePlan
    decode: PhasePlan
    planner: Mapping[str, Any] | None = None  # auto: the planner's plan, as `pdserve plan` prints it

    def phase(self, name: str) -> PhasePlan:
        return {"prefill": self.prefill, "decode": self.decode}[name]

    def to_dict(self) -> dict[str, Any]:
        """What the operator writes into status.plan."""
        d: dict[str, Any] = {"source": self.source, **{p: self.phase(p).to_dict() for p in PHASES}}
        if self.planner is not None:
            d["planner"] = dict(self.planner)
        return d


@dataclass(frozen=True)
class PlanRequest:
    """What the planner core gets: the model, the SLOs, the workload hints and the nodes it may use."""

    model_path: str
    device: str  # cpu | gpu
    slo: SLO
    workload: Workload
    nodes: tuple[NodeTopology, ...]
    profile_path: str | None = None  # spec.profile.path (relative: shipped with pdserve)
    profile_key: str | None = None  # spec.profile.key


# The interface the operator expects of a planner: PlanRequest -> Plan (source="auto"), raising PlanInputError
# when an input is missing or unreadable and PlanError when no layout meets the SLOs on these nodes. No
# Kubernetes calls (call_planner reads the model's config.json and the profile file, nothing else).
PlannerFn = Callable[[PlanRequest], Plan]


def _num(meta: Mapping[str, str], key: str) -> float | None:
    v = meta.get(key)
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return None


def _cpu_cores(q: str) -> float:
    """A Kubernetes CPU quantity ('4', '3500m') in cores."""
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def node_topology(node: Mapping[str, Any]) -> NodeTopology:
    """One Node object (a dict as the API returns it) -> its topology, from labels and annotations."""
    meta = node.get("metadata", {})
    keys: dict[str, str] = {**(meta.get("annotations") or {}), **(meta.get("labels") or {})}
    alloc = (node.get("status") or {}).get("allocatable") or {}
    gpus = next((int(v) for k in GPU_COUNT_KEYS if (v := _num(keys, k)) is not None), None)
    if gpus is None:
        gpus = int(alloc.get("nvidia.com/gpu", 0))
    mem = _num(keys, GPU_MEMORY_GIB)
    if mem is None and (mib := _num(keys, GPU_MEMORY_MIB_NVIDIA)) is not None:
        mem = mib / 1024
    return NodeTopology(
        name=meta["name"],
        hostname=keys.get(HOSTNAME_LABEL, meta["name"]),
        gpus=gpus,
        gpu_memory_gib=mem,
        cpus=_cpu_cores(str(alloc.get("cpu", "0"))),
        intra_gbytes_per_s=_num(keys, INTRA_GBPS),
        inter_gbytes_per_s=_num(keys, INTER_GBPS),
    )


def manual_plan(spec: ClusterSpec) -> Plan:
    def one(name: str) -> PhasePlan:
        p = spec.phase(name)
        return PhasePlan(replicas=p.replicas, tp=p.tp, pp=p.pp, nodes=p.nodes)

    return Plan(source="manual", prefill=one("prefill"), decode=one("decode"))


def profile_file(path: str) -> Path:
    """spec.profile.path -> the file: absolute as given, relative in the profiles shipped with pdserve."""
    p = Path(path)
    return p if p.is_absolute() else SHIPPED_PROFILES / p


def planner_topology(nodes: Sequence[NodeTopology]) -> Topology:
    """GPU nodes -> the planner's topology: node names are hostnames (what the plan's placement, hence node
    affinity, names); the bandwidth between two nodes is the lower of their inter-node figures."""
    missing = []
    for n in nodes:
        if n.gpu_memory_gib is None:
            missing.append(f"{n.name}: {GPU_MEMORY_GIB} (or {GPU_MEMORY_MIB_NVIDIA})")
        if n.gpus > 1 and n.intra_gbytes_per_s is None:
            missing.append(f"{n.name}: {INTRA_GBPS}")
        if len(nodes) > 1 and n.inter_gbytes_per_s is None:
            missing.append(f"{n.name}: {INTER_GBPS}")
    if missing:
        raise PlanInputError("NodeTopology", "node labels/annotations missing: " + "; ".join(missing))
    inter = {n.hostname: n.inter_gbytes_per_s or 0.0 for n in nodes}
    floor = min(inter.values()) if len(nodes) > 1 else 1.0  # one node: no inter-node link to use
    pnodes = tuple(
        # a one-GPU node has no intra-node link: its figure is never used (the Topology wants one > 0)
        Node(n.hostname, n.gpus, float(n.gpu_memory_gib or 0), n.intra_gbytes_per_s or floor)
        for n in nodes
    )
    overrides = tuple(
        (a, b, min(inter[a], inter[b]))
        for a, b in itertools.combinations(sorted(inter), 2)
        if min(inter[a], inter[b]) != floor
    )
    try:
        return Topology(pnodes, floor, overrides, device_kind="gpu")
    except ValueError as exc:
        raise PlanInputError("NodeTopology", str(exc)) from exc


def workload_samples(w: Workload) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The spec's workload hints -> (what `pdserve plan`'s JSON records as the workload, (prompt, output)
    length pairs). Length samples win over a bench name; prompt and output lengths are independent: their
    cross product, or N_SAMPLES pairs drawn from it (seed 0) when larger."""
    from pdserve.plan_cli import workload_samples as named_samples

    if w.prompt_tokens and w.output_tokens:
        pairs = list(itertools.product(w.prompt_tokens, w.output_tokens))
        if len(pairs) > N_SAMPLES:
            rng = random.Random(0)
            pairs = [(rng.choice(w.prompt_tokens), rng.choice(w.output_tokens)) for _ in range(N_SAMPLES)]
        return "spec.workload length samples", tuple(pairs)
    assert w.bench is not None  # parse_spec requires samples or a bench name for planner: auto
    try:
        return w.bench, named_samples(w.bench)
    except (ValueError, KeyError, OSError) as exc:
        raise PlanInputError("InvalidSpec", f"spec.workload.bench: {exc}") from exc


def to_operator_plan(core: CorePlan, planner_json: Mapping[str, Any]) -> Plan:
    """The planner's plan -> per phase: instances, tp, pp and the hostnames its instances are placed on."""

    def phase(name: str) -> PhasePlan:
        layout = core.prefill if name == "prefill" else core.decode
        nodes = tuple(sorted({p.node for p in core.placement if p.phase == name}))
        return PhasePlan(replicas=core.instances(name), tp=layout.tp, pp=layout.pp, nodes=nodes)

    return Plan("auto", phase("prefill"), phase("decode"), planner=planner_json)


def call_planner(request: PlanRequest) -> Plan:
    """THE adapter to the planner core (coordinator/planner): request -> SearchInput (as `pdserve plan`
    builds it) -> search -> Plan. Missing inputs raise PlanInputError, no plan raises PlanError."""
    from coordinator.planner.search import PlanError as CorePlanError
    from coordinator.planner.search import search
    from pdserve.plan_cli import load_model, load_profile, plan_json, search_input

    if not request.profile_path:
        raise PlanInputError(
            "NoProfile",
            "planner: auto needs spec.profile.path: a latency profile of the model on these GPUs "
            "(a pdserve profile JSON, or a DistServe profiler-*.json with spec.profile.key)",
        )
    if request.device != "gpu":
        raise PlanError("planner: auto plans GPU clusters (device: gpu); use planner: manual on CPUs")
    config = Path(request.model_path) / "config.json"
    if not config.is_file():
        raise PlanInputError(
            "NoModelConfig",
            f"no {config} in the operator's container: planner: auto reads the model's sizes from it "
            "(mount the model's claim into the operator at the same path, or bake the model into its image)",
        )
    try:
        model, model_dir = load_model(str(config))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise PlanInputError("NoModelConfig", f"{config}: {exc}") from exc
    path = profile_file(request.profile_path)
    try:
        profile = load_profile(str(path), request.profile_key, model.name)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        where = f"spec.profile ({path}, key {request.profile_key!r})"
        raise PlanInputError("BadProfile", f"{where}: {exc}") from exc
    workload, samples = workload_samples(request.workload)
    inp = search_input(
        model,
        model_dir,
        profile,
        str(path),
        planner_topology(request.nodes),
        samples,
        request.slo.ttft_ms,
        request.slo.tpot_ms,
        request.slo.attainment,
        request.workload.rate,
    )
    try:
        core = search(inp)
    except CorePlanError as exc:
        raise PlanError(str(exc)) from exc
    return to_operator_plan(core, plan_json(core, inp, request.slo.ttft_ms, request.slo.tpot_ms, workload))


def auto_plan(
    spec: ClusterSpec, nodes: Sequence[Mapping[str, Any]], planner: PlannerFn = call_planner
) -> Plan:
    """The nodes' topology + the spec's SLOs and workload -> the planner core's plan."""
    assert spec.slo is not None  # parse_spec requires it for planner: auto
    topo = tuple(node_topology(n) for n in nodes)
    if spec.device == "gpu":
        topo = tuple(t for t in topo if t.gpus > 0)
    if not topo:
        raise PlanError(f"no {spec.device.upper()} nodes to plan on")
    request = PlanRequest(
        model_path=spec.model.path,
        device=spec.device,
        slo=spec.slo,
        workload=spec.workload,
        nodes=topo,
        profile_path=spec.profile.path,
        profile_key=spec.profile.key,
    )
    plan = planner(request)
    if plan.source != "auto":
        raise PlanError(f"the planner returned a plan of source {plan.source!r}, expected 'auto'")
    return plan
