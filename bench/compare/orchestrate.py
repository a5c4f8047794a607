"""Run the comparison: start every system, let them take turns at load runs (one at a time), stop them."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from bench.compare.modes import Mode
from bench.compare.search import evaluate
from bench.compare.slos import Plan
from bench.compare.systems import KV_BLOCKS, System, start_all, stop_all, warm_up
from bench.cpu import NamedPidsFn, PidsFn, memory_mib
from bench.ideal import IdealSplit, ideal_split_latency
from bench.metrics import RequestMetrics, compute_metrics
from bench.probe import Prober, Turns
from bench.workload import BenchRequest


def evaluate_system(
    system: System,
    address: str,
    plans: list[Plan],
    mode: Mode,
    source: list[int],
    turns: Turns,
    pids: PidsFn | None = None,
    peer_pids: PidsFn | None = None,
    named_pids: NamedPidsFn | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[RequestMetrics]]]:
    """Every workload on one running system: (results, metrics at the fixed rate) per workload. With `pids`
    (the system's processes; `peer_pids`: the other systems') each run's CPU use is measured, and a run that
    foreign load disturbed is run again (`Prober`); `named_pids`: the system's processes by name, whose
    CPU and waits each run records apart (which process of a slow run was slow)."""
    results: dict[str, dict[str, Any]] = {}
    fixed: dict[str, list[RequestMetrics]] = {}
    try:
        with turns.turn(system.name):
            warm_up(address, source)
        memory = {n: memory_mib(pid) for n, pid in (named_pids() if named_pids else {}).items()}
        for plan in plans:
            prober = prober_for(
                plan,
                mode,
                source,
                system.name,
                address,
                turns=turns,
                log_slo=plan.slos[plan.spec.headline_k],
                pids=pids,
                peer_pids=peer_pids,
                named_pids=named_pids,
                max_foreign_cores=mode.max_foreign_cores,
            )
            out = evaluate(
                prober,
                plan.isolated,
                plan.slos,
                plan.spec.headline_k,
                plan.start_rate,
                mode,
                prefill_servers=system.prefill,
                symmetric_slos=plan.symmetric_slos,
                ideal_split=ideal_split_of(system, plan),
            )
            results[plan.spec.name] = {
                "devices": system.devices,
                "config": asdict(system),
                "memory_mib_after_warm_up": memory,  # per process: rss_mib, huge_pages_mib
                **out,
            }
            fixed[plan.spec.name] = compute_metrics(prober.run(plan.start_rate).records)
    finally:
        turns.leave(system.name)
    return results, fixed


def prober_for(
    plan: Plan, mode: Mode, source: list[int], name: str = "schedule", address: str = "", **kw: Any
) -> Prober:
    """The Prober of `plan`'s load runs against the gateway at `address` (`kw`: turns, CPU accounting):
    every system's runs send the same schedules; without an address it only makes them (`schedule`)."""
    return Prober(
        name,
        address,
        plan.workload,
        source,
        timeout_s=plan.timeout_s,
        max_span_s=mode.max_span_s,
        min_requests=mode.min_requests,
        min_span_s=mode.min_span_ttft_slos * plan.slos[plan.spec.headline_k].ttft_s,
        seeds=plan.seeds,
        **kw,
    )


def schedule_of(plan: Plan, mode: Mode, source: list[int]) -> Callable[[float], list[BenchRequest]]:
    """The requests a load run of `plan` at a rate sends (as every system's Prober makes them); nothing is
    sent."""
    prober = prober_for(plan, mode, source)
    return lambda rate: prober.schedule(rate)[0]


def ideal_split_of(system: System, plan: Plan, iso: dict[str, Any] | None = None) -> IdealSplit | None:
    """The ideal of a disaggregated system on this workload (bench.ideal): its instance counts, the decode
    instance's KV cache and sequence limit as launched, priced at `iso` (default: the plan's isolated
    measurement); None for a colocated system or an isolated measurement without batch steps."""
    from pdserve.instance import InstanceConfig

    lat = ideal_split_latency(iso or plan.isolated)
    if not (system.prefill and system.decode) or lat is None:
        return None
    launched = InstanceConfig(role="decode", model_dir="", redis_url="")  # what the launcher starts
    return IdealSplit(
        lat,
        KV_BLOCKS * launched.block_size,
        launched.max_running,
        prefill_servers=system.prefill,
        decode_servers=system.decode,
    )


def run_all(
    chosen: list[System],
    plans: list[Plan],
    mode: Mode,
    model_dir: str,
    cpus: tuple[int, ...],
    source: list[int],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, list[RequestMetrics]]]]:
    """Start all systems, evaluate them taking turns (one load run at a time), stop them."""
    per_system: dict[str, dict[str, Any]] = {p.spec.name: {} for p in plans}
    metrics_at_fixed: dict[str, dict[str, list[RequestMetrics]]] = {p.spec.name: {} for p in plans}
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as log_dir:
        clusters = start_all(chosen, model_dir, cpus, log_dir)
        turns = Turns([s.name for s in chosen])
        pool = ThreadPoolExecutor(len(chosen))
        try:

            def peers_of(name: str) -> PidsFn:
                return lambda: [pid for n, c in clusters.items() if n != name for pid in c.pids()]

            futures = {
                s.name: pool.submit(
                    evaluate_system,
                    s,
                    clusters[s.name].gateway_address,
                    plans,
                    mode,
                    source,
                    turns,
                    clusters[s.name].pids,
                    peers_of(s.name),
                    clusters[s.name].named_pids,
                )
                for s in chosen
            }
            for name, fut in futures.items():
                results, fixed = fut.result()  # the first failure (or Ctrl-C) stops the comparison
                for w in results:
                    per_system[w][name] = results[w]
                    metrics_at_fixed[w][name] = fixed[w]
        finally:
            turns.stop()  # no-op after a complete run; else the other systems end their runs now
            pool.shutdown(wait=True, cancel_futures=True)
            stop_all(list(clusters.values()))
    return per_system, metrics_at_fixed
