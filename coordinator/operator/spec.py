"""The `PDCluster` spec as frozen dataclasses: `parse_spec(dict)` checks what the CRD's OpenAPI schema cannot
express (cross-field rules) and raises `SpecError` with a message for the `Planned=False` condition."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PHASES = ("prefill", "decode")
PARALLEL_SIZES = (1, 2, 4, 8)  # tp and pp: powers of two (the CRD schema enumerates the same set)
DEVICES = ("cpu", "gpu")
PLANNERS = ("auto", "manual")


class SpecError(ValueError):
    """A spec the operator cannot act on; the message goes into the status condition."""


@dataclass(frozen=True)
class SLO:
    ttft_ms: float  # time to first token, milliseconds
    tpot_ms: float  # time per output token, milliseconds
    attainment: float  # fraction of requests that must meet both, in (0, 1]


@dataclass(frozen=True)
class Workload:
    rate: float | None = None  # requests per second
    prompt_tokens: tuple[int, ...] = ()  # sample of prompt lengths
    output_tokens: tuple[int, ...] = ()  # sample of output lengths
    bench: str | None = None  # a named bench workload instead of samples


@dataclass(frozen=True)
class PhaseSpec:
    replicas: int = 1
    tp: int = 1
    pp: int = 1
    # Kubernetes resource quantities, e.g. {"cpu": "2", "memory": "4Gi"}; GPUs are added from tp*pp
    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)
    nodes: tuple[str, ...] = ()  # manual placement: node names this phase may run on (empty = any)

    @property
    def devices(self) -> int:
        """Accelerators one instance uses."""
        return self.tp * self.pp


@dataclass(frozen=True)
class ModelSpec:
    path: str  # model directory inside the container
    claim_name: str | None = (
        None  # a PersistentVolumeClaim holding the model, mounted read-only at mount_path
    )
    mount_path: str = "/models"


@dataclass(frozen=True)
class ProfileSpec:
    """The latency profile `planner: auto` plans with (pdserve profile's JSON or a DistServe profiler-*.json)."""

    path: str | None = None  # inside the operator's container; relative: a profile shipped with pdserve
    key: str | None = None  # the model's entry in a DistServe profile file (e.g. facebook/opt-13b)


@dataclass(frozen=True)
class ClusterSpec:
    model: ModelSpec
    image: str
    device: str  # cpu | gpu
    planner: str  # auto | manual
    slo: SLO | None
    workload: Workload
    prefill: PhaseSpec
    decode: PhaseSpec
    profile: ProfileSpec = ProfileSpec()

    def phase(self, name: str) -> PhaseSpec:
        return {"prefill": self.prefill, "decode": self.decode}[name]


def _quantities(d: Any, where: str) -> dict[str, str]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SpecError(f"{where} must be a map of resource quantities")
    return {str(k): str(v) for k, v in d.items()}


def _phase(d: dict[str, Any], name: str, device: str) -> PhaseSpec:
    p = d.get(name) or {}
    resources = p.get("resources") or {}
    spec = PhaseSpec(
        replicas=int(p.get("replicas", 1)),
        tp=int(p.get("tp", 1)),
        pp=int(p.get("pp", 1)),
        requests=_quantities(resources.get("requests"), f"spec.{name}.resources.requests"),
        limits=_quantities(resources.get("limits"), f"spec.{name}.resources.limits"),
        nodes=tuple(p.get("nodes") or ()),
    )
    if spec.replicas < 0:
        raise SpecError(f"spec.{name}.replicas must be >= 0, got {spec.replicas}")
    for what, v in (("tp", spec.tp), ("pp", spec.pp)):
        if v not in PARALLEL_SIZES:
            raise SpecError(f"spec.{name}.{what} must be one of {PARALLEL_SIZES}, got {v}")
    if device == "cpu" and spec.devices != 1:
        raise SpecError(f"spec.{name}: tp*pp = {spec.devices} needs device: gpu (CPU instances are tp=pp=1)")
    if "nvidia.com/gpu" in spec.requests or "nvidia.com/gpu" in spec.limits:
        raise SpecError(
            f"spec.{name}.resources: nvidia.com/gpu is set by the operator from tp*pp, leave it out"
        )
    return spec


def parse_spec(d: dict[str, Any]) -> ClusterSpec:
    """The spec of a PDCluster object (its `spec` dict) -> ClusterSpec, or SpecError saying what is wrong."""
    model = d.get("model") or {}
    if not isinstance(model, dict) or not model.get("path"):
        raise SpecError("spec.model.path is required (the model directory inside the container)")
    m = ModelSpec(
        path=str(model["path"]),
        claim_name=model.get("claimName") or None,
        mount_path=str(model.get("mountPath", "/models")),
    )
    if m.claim_name and not (m.path == m.mount_path or m.path.startswith(m.mount_path.rstrip("/") + "/")):
        raise SpecError(f"spec.model.path {m.path!r} must be under spec.model.mountPath {m.mount_path!r}")
    device = d.get("device", "cpu")
    if device not in DEVICES:
        raise SpecError(f"spec.device must be one of {DEVICES}, got {device!r}")
    planner = d.get("planner", "manual")
    if planner not in PLANNERS:
        raise SpecError(f"spec.planner must be one of {PLANNERS}, got {planner!r}")
    slo = None
    if d.get("slo") is not None:
        s = d["slo"]
        slo = SLO(
            ttft_ms=float(s["ttftMs"]), tpot_ms=float(s["tpotMs"]), attainment=float(s.get("attainment", 0.9))
        )
        if slo.ttft_ms <= 0 or slo.tpot_ms <= 0:
            raise SpecError("spec.slo.ttftMs and spec.slo.tpotMs must be > 0")
        if not 0 < slo.attainment <= 1:
            raise SpecError(f"spec.slo.attainment must be in (0, 1], got {slo.attainment}")
    w = d.get("workload") or {}
    workload = Workload(
        rate=float(w["rate"]) if w.get("rate") is not None else None,
        prompt_tokens=tuple(int(x) for x in w.get("promptTokens") or ()),
        output_tokens=tuple(int(x) for x in w.get("outputTokens") or ()),
        bench=w.get("bench") or None,
    )
    prof = d.get("profile") or {}
    if not isinstance(prof, dict):
        raise SpecError("spec.profile must be a map: path (and key for a DistServe profile file)")
    profile = ProfileSpec(path=prof.get("path") or None, key=prof.get("key") or None)
    if planner == "auto":
        if slo is None:
            raise SpecError("planner: auto needs spec.slo (ttftMs, tpotMs, attainment)")
        if workload.bench is None and not (
            workload.rate and workload.prompt_tokens and workload.output_tokens
        ):
            raise SpecError(
                "planner: auto needs spec.workload: a bench workload name, or rate with promptTokens and "
                "outputTokens samples"
            )
    return ClusterSpec(
        model=m,
        image=str(d.get("image") or "pdserve:latest"),
        device=device,
        planner=planner,
        slo=slo,
        workload=workload,
        prefill=_phase(d, "prefill", device),
        decode=_phase(d, "decode", device),
        profile=profile,
    )
