"""The kopf handlers of the PDCluster operator (run by `pdserve operator`): thin adapters around the pure
core. A spec change: parse -> plan -> render -> apply the objects (server-side apply); a Deployment change:
recompute the ready counts and the Ready/Degraded conditions; deletion: delete the owned objects (owner
references let Kubernetes' garbage collector do the same; the operator does not rely on it).

A bad spec or a failed plan is answered with a `Planned=False` condition and no retry (a permanent error),
never with an exception loop."""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
from typing import Any

import kopf

from coordinator.operator.kube import Kube, load_api_client, path_of
from coordinator.operator.plan import (
    Plan,
    PlanError,
    PlanInputError,
    PlannerFn,
    auto_plan,
    call_planner,
    manual_plan,
)
from coordinator.operator.render import CLUSTER_LABEL, COMPONENT_LABEL, GROUP, PLURAL, VERSION, Owner, render
from coordinator.operator.spec import PHASES, SpecError, parse_spec

log = logging.getLogger("pdserve.operator")
CONDITION_TYPES = ("Planned", "Ready", "Degraded")


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_conditions(
    current: list[dict[str, Any]], updates: dict[str, tuple[bool, str, str]]
) -> list[dict[str, Any]]:
    """`updates`: type -> (status, reason, message). lastTransitionTime changes only when status does."""
    by_type = {c["type"]: c for c in current or []}
    for t, (ok, reason, message) in updates.items():
        status = "True" if ok else "False"
        old = by_type.get(t)
        since = old["lastTransitionTime"] if old and old.get("status") == status else _now()
        by_type[t] = {
            "type": t,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since,
        }
    return [by_type[t] for t in CONDITION_TYPES if t in by_type]


def readiness(
    deployments: list[dict[str, Any]], plan: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cluster's Deployments + status.plan -> (status.phases, {Ready, Degraded} condition updates).

    Ready: Redis and the coordinator are available and every phase planned with instances has at least one
    ready (the cluster can serve a generation). Degraded: some Deployment has fewer ready pods than desired."""
    by_component = {d["metadata"]["labels"].get(COMPONENT_LABEL): d for d in deployments}

    def counts(component: str) -> tuple[int, int]:
        d = by_component.get(component)
        if d is None:
            return 0, 0
        return int(d["spec"].get("replicas", 1)), int((d.get("status") or {}).get("readyReplicas") or 0)

    phases: dict[str, dict[str, int]] = {}
    for p in PHASES:
        want, n_ready = counts(p)
        phases[p] = {"replicas": want, "readyReplicas": n_ready}
    missing = [c for c in ("redis", "coordinator") if counts(c)[1] < 1]
    missing += [
        p for p in PHASES if plan.get(p, {}).get("replicas", 0) > 0 and phases[p]["readyReplicas"] < 1
    ]
    short = [f"{c} {r}/{w}" for c in ("redis", "coordinator", *PHASES) for w, r in [counts(c)] if r < w]
    ready = (
        (True, "AllPhasesServing", "a generation can be served")
        if not missing
        else (False, "NotReady", "no ready pod yet: " + ", ".join(missing))
    )
    degraded = (
        (True, "ReplicasUnavailable", "ready/desired: " + ", ".join(short))
        if short
        else (False, "AllReplicasReady", "every desired pod is ready")
    )
    return phases, {"Ready": ready, "Degraded": degraded}


def _plan(spec_dict: dict[str, Any], kube: Kube, planner: PlannerFn) -> Plan:
    spec = parse_spec(spec_dict)
    if spec.planner == "manual":
        return manual_plan(spec)
    return auto_plan(spec, kube.list("/api/v1/nodes"), planner)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile(
    *,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    name: str,
    namespace: str | None,
    memo: Any,
    **_: Any,
) -> None:
    assert namespace is not None  # PDClusters are namespaced
    kube: Kube = memo.kube
    conds = list(status.get("conditions") or [])
    try:
        parsed = parse_spec(dict(spec))
        plan = _plan(dict(spec), kube, memo.planner)
    except (SpecError, PlanInputError, PlanError) as exc:
        reason = (
            exc.reason
            if isinstance(exc, PlanInputError)
            else {SpecError: "InvalidSpec", PlanError: "NoPlan"}[type(exc)]
        )
        log.warning("PDCluster %s/%s: %s: %s", namespace, name, reason, exc)
        kube.patch_status(
            namespace,
            name,
            {
                "observedGeneration": meta.get("generation"),
                "conditions": set_conditions(conds, {"Planned": (False, reason, str(exc))}),
            },
        )
        raise kopf.PermanentError(f"{reason}: {exc}") from exc  # retried only when the spec changes
    owner = Owner(name=name, namespace=namespace, uid=meta["uid"])
    for obj in render(owner, parsed, plan):
        kube.apply(obj)
    deployments = kube.list(path_of("Deployment", namespace), f"{CLUSTER_LABEL}={name}")
    phases, updates = readiness(deployments, plan.to_dict())
    msg = ", ".join(
        f"{p} {plan.phase(p).replicas}x tp{plan.phase(p).tp} pp{plan.phase(p).pp}" for p in PHASES
    )
    if plan.planner is not None:
        msg += (
            f"; predicted goodput {plan.planner['predicted']['goodput_rps']:.2f} req/s (status.plan.planner)"
        )
    updates["Planned"] = (True, "ManualPlan" if plan.source == "manual" else "AutoPlan", msg)
    kube.patch_status(
        namespace,
        name,
        {
            "observedGeneration": meta.get("generation"),
            "plan": plan.to_dict(),
            "phases": phases,
            "conditions": set_conditions(conds, updates),
        },
    )


@kopf.on.event("apps", "v1", "deployments", labels={CLUSTER_LABEL: kopf.PRESENT})
def deployment_changed(*, meta: kopf.Meta, namespace: str | None, memo: Any, **_: Any) -> None:
    """A Deployment of a cluster changed (ready pods, replicas): refresh the cluster's counts and conditions."""
    assert namespace is not None  # Deployments are namespaced
    kube: Kube = memo.kube
    cluster = meta["labels"][CLUSTER_LABEL]
    obj = kube.get(path_of("PDCluster", namespace, cluster))
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return
    status = obj.get("status") or {}
    if "plan" not in status:
        return  # not planned (yet): nothing to count against
    deployments = kube.list(path_of("Deployment", namespace), f"{CLUSTER_LABEL}={cluster}")
    phases, updates = readiness(deployments, status["plan"])
    conds = set_conditions(status.get("conditions") or [], updates)
    if phases != status.get("phases") or conds != status.get("conditions"):
        kube.patch_status(namespace, cluster, {"phases": phases, "conditions": conds})


@kopf.on.delete(GROUP, VERSION, PLURAL)
def cleanup(*, name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    """Delete what the cluster owns (Kubernetes' garbage collector would, by the owner references)."""
    assert namespace is not None  # PDClusters are namespaced
    kube: Kube = memo.kube
    for kind in ("Deployment", "Service"):
        for obj in kube.list(path_of(kind, namespace), f"{CLUSTER_LABEL}={name}"):
            kube.delete(path_of(kind, namespace, obj["metadata"]["name"]))


@kopf.on.login()
def login(*, memo: Any, **_: Any) -> kopf.ConnectionInfo:
    """kopf's connection = the operator's own API client (in-cluster service account or kubeconfig)."""
    c = memo.kube.api.configuration
    header = c.get_api_key_with_prefix("BearerToken") or c.get_api_key_with_prefix("authorization") or ""
    scheme, _sep, token = header.rpartition(" ")
    return kopf.ConnectionInfo(
        server=c.host,
        ca_path=c.ssl_ca_cert,
        insecure=not c.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=c.cert_file,
        private_key_path=c.key_file,
    )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.WARNING  # Kubernetes events for warnings and errors only
    settings.persistence.finalizer = f"{GROUP}/operator"


def run_operator(
    namespaces: list[str] | None = None,
    planner: PlannerFn = call_planner,
    kube: Kube | None = None,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Run the operator until stopped: watch PDClusters in `namespaces` (None = all namespaces)."""
    memo = kopf.Memo(kube=kube or Kube(load_api_client()), planner=planner)
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces or [],
            memo=memo,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    )
