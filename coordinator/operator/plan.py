"""A PDCluster's plan: how many instances per phase, their tp x pp layout and the nodes they may run on.

`manual_plan` takes the spec as given. `auto_plan` reads the nodes' topology (`node_topology`, from the
labels and annotations documented in infra/k8s/README.md) and calls the planner core through the one
adapter `call_planner`; until the planner core is wired in, that raises `PlannerUnavailable` and the
operator reports `Planned=False` (never a silent fallback to manual)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.operator.spec import PHASES, SLO, ClusterSpec, Workload

# Node labels / annotations the auto planner reads (labels win over annotations of the same key).
GPU_COUNT_KEYS = ("nvidia.com/gpu.count",)  # GPU feature discovery's label; else status.allocatable
GPU_MEMORY_GIB = "pdserve.io/gpu-memory-gib"  # memory of one accelerator, GiB
GPU_MEMORY_MIB_NVIDIA = "nvidia.com/gpu.memory"  # GPU feature discovery's label, MiB
INTRA_GBPS = "pdserve.io/intra-gbytes-per-s"  # bandwidth between accelerators of one node (NVLink), GB/s
INTER_GBPS = "pdserve.io/inter-gbytes-per-s"  # network bandwidth of the node, GB/s
HOSTNAME_LABEL = "kubernetes.io/hostname"


class PlannerUnavailable(RuntimeError):
    """The planner core cannot be called (not installed in this build, or not wired into the operator)."""


class PlanError(ValueError):
    """The planner found no layout that meets the spec on these nodes."""


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

    def phase(self, name: str) -> PhasePlan:
        return {"prefill": self.prefill, "decode": self.decode}[name]

    def to_dict(self) -> dict[str, Any]:
        """What the operator writes into status.plan."""
        return {"source": self.source, **{p: self.phase(p).to_dict() for p in PHASES}}


@dataclass(frozen=True)
class PlanRequest:
    """What the planner core gets: the model, the SLOs, the workload hints and the nodes it may use."""

    model_path: str
    device: str  # cpu | gpu
    slo: SLO
    workload: Workload
    nodes: tuple[NodeTopology, ...]


# The interface the operator expects of the planner core: PlanRequest -> Plan (source="auto"), raising
# PlanError when no layout meets the SLOs on these nodes. Pure: no Kubernetes, no I/O.
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


def call_planner(request: PlanRequest) -> Plan:
    """THE adapter to the planner core (coordinator/planner). Not wired yet: the integrator replaces this
    body with a call of the planner's entry point that turns `request` into a Plan (and its failures into
    PlanError). Until then every `planner: auto` cluster gets Planned=False, reason PlannerUnavailable."""
    raise PlannerUnavailable(
        "the planner core (coordinator.planner) is not wired into this operator build; "
        "use planner: manual, or an operator image with the planner"
    )


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
        model_path=spec.model.path, device=spec.device, slo=spec.slo, workload=spec.workload, nodes=topo
    )
    plan = planner(request)
    if plan.source != "auto":
        raise PlanError(f"the planner returned a plan of source {plan.source!r}, expected 'auto'")
    return plan
