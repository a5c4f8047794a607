"""`render(owner, spec, plan)`: the objects a PDCluster should own, as dicts (pure; the operator applies them).

Per cluster NAME: Redis (Deployment + Service NAME-redis), the coordinator (Deployment NAME-coordinator,
Service NAME-gateway: gRPC 50051, OpenAI HTTP 8000) and one Deployment per phase (NAME-prefill,
NAME-decode). Every object carries an owner reference to the PDCluster and the labels in `labels()`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.operator.plan import HOSTNAME_LABEL, PhasePlan, Plan
from coordinator.operator.spec import PHASES, ClusterSpec

GROUP = "pdserve.io"
VERSION = "v1alpha1"
KIND = "PDCluster"
PLURAL = "pdclusters"
CLUSTER_LABEL = "pdserve.io/cluster"  # every owned object: the PDCluster's name
COMPONENT_LABEL = "app.kubernetes.io/component"  # redis | coordinator | prefill | decode
GATEWAY_PORT = 50051  # coordinator gRPC
HTTP_PORT = 8000  # coordinator OpenAI-compatible HTTP API
INSTANCE_PORT = 50061  # prefill/decode gRPC (and its health service)
REDIS_PORT = 6379
REDIS_IMAGE = "redis:7-alpine"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "pdserve",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/managed-by": "pdserve-operator",
        CLUSTER_LABEL: owner.name,
        COMPONENT_LABEL: component,
    }


def _selector(owner: Owner, component: str) -> dict[str, str]:
    return {CLUSTER_LABEL: owner.name, COMPONENT_LABEL: component}


def _meta(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component),
        "ownerReferences": [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def _deployment(
    owner: Owner, name: str, component: str, replicas: int, pod: dict[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, name, component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": _selector(owner, component)},
            "template": {"metadata": {"labels": labels(owner, component)}, "spec": pod},
        },
    }


def _service(owner: Owner, name: str, component: str, ports: dict[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, name, component),
        "spec": {
            "selector": _selector(owner, component),
            "ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in ports.items()],
        },
    }


def redis_url(owner: Owner) -> str:
    return f"redis://{owner.name}-redis:{REDIS_PORT}/0"


def _model_volume(spec: ClusterSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container mounts) for a model on a PersistentVolumeClaim; none for one in the image."""
    if not spec.model.claim_name:
        return [], []
    vol = {"name": "model", "persistentVolumeClaim": {"claimName": spec.model.claim_name, "readOnly": True}}
    return [vol], [{"name": "model", "mountPath": spec.model.mount_path, "readOnly": True}]


def _affinity(nodes: tuple[str, ...]) -> dict[str, Any] | None:
    if not nodes:
        return None
    term = {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": list(nodes)}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def _instance_pod(owner: Owner, spec: ClusterSpec, phase: str, pp: PhasePlan) -> dict[str, Any]:
    p = spec.phase(phase)
    requests = dict(p.requests)
    limits = dict(p.limits)
    args = [
        "--model", spec.model.path,
        "--redis-url", redis_url(owner),
        "--cluster", owner.name,
        "--host", "0.0.0.0",
        "--advertise-host", "$(POD_IP)",
        "--port", str(INSTANCE_PORT),
    ]  # fmt: skip
    if spec.device == "gpu":
        gpus = str(pp.tp * pp.pp)
        requests[GPU_RESOURCE] = gpus  # extended resources: request == limit
        limits[GPU_RESOURCE] = gpus
        args += ["--cuda", "0", "--transport", "auto"]
    else:
        requests.setdefault("cpu", "1")
        args += ["--transport", "tcp"]
    volumes, mounts = _model_volume(spec)
    grpc_probe = {"grpc": {"port": INSTANCE_PORT}}
    container: dict[str, Any] = {
        "name": phase,
        "image": spec.image,
        "command": ["python", "-m", f"{phase}_service"],
        "args": args,
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "grpc", "containerPort": INSTANCE_PORT}],
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        # loading the model may take minutes: the startup probe holds liveness off until the first SERVING
        "startupProbe": {**grpc_probe, "periodSeconds": 5, "failureThreshold": 120},
        "readinessProbe": {**grpc_probe, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**grpc_probe, "periodSeconds": 10, "failureThreshold": 3},
        "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if (affinity := _affinity(pp.nodes)) is not None:
        pod["affinity"] = affinity
    return pod


def _coordinator_pod(owner: Owner, spec: ClusterSpec) -> dict[str, Any]:
    volumes, mounts = _model_volume(spec)  # the coordinator reads the tokenizer from the model directory
    container = {
        "name": "coordinator",
        "image": spec.image,
        "command": ["python", "-m", "coordinator"],
        "args": [
            "--model",
            spec.model.path,
            "--redis-url",
            redis_url(owner),
            "--cluster",
            owner.name,
            "--host",
            "0.0.0.0",
            "--port",
            str(GATEWAY_PORT),
            "--http-port",
            str(HTTP_PORT),
        ],  # fmt: skip
        "ports": [
            {"name": "grpc", "containerPort": GATEWAY_PORT},
            {"name": "http", "containerPort": HTTP_PORT},
        ],
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
        # SERVING once one prefill and one decode instance registered: ready = can serve a generation
        "readinessProbe": {"grpc": {"port": GATEWAY_PORT}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": GATEWAY_PORT}, "periodSeconds": 10, "failureThreshold": 3},
        "volumeMounts": mounts,
    }
    return {"containers": [container], "volumes": volumes}


def _redis_pod() -> dict[str, Any]:
    container = {
        "name": "redis",
        "image": REDIS_IMAGE,
        "command": ["redis-server", "--save", "", "--appendonly", "no"],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 10},
    }
    return {"containers": [container]}


def render(owner: Owner, spec: ClusterSpec, plan: Plan) -> list[dict[str, Any]]:
    """The desired objects of one PDCluster, in creation order (Redis first, then coordinator, phases)."""
    n = owner.name
    out = [
        _deployment(owner, f"{n}-redis", "redis", 1, _redis_pod()),
        _service(owner, f"{n}-redis", "redis", {"redis": REDIS_PORT}),
        _deployment(owner, f"{n}-coordinator", "coordinator", 1, _coordinator_pod(owner, spec)),
        _service(owner, f"{n}-gateway", "coordinator", {"grpc": GATEWAY_PORT, "http": HTTP_PORT}),
    ]
    for phase in PHASES:
        pp = plan.phase(phase)
        out.append(
            _deployment(owner, f"{n}-{phase}", phase, pp.replicas, _instance_pod(owner, spec, phase, pp))
        )
    return out
