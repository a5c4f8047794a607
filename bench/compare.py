"""Disaggregated vs colocated serving on the same cores: goodput under derived SLOs (`pdserve bench compare`).

Method (docs/benchmarks.md, "Serving"):

1. Bench model: a random Llama (`engine.synth.cached_random_model`, fp32) with the shipped model's vocabulary;
   prompts are cut from the shipped model's held-out text with its tokenizer (fallback: stdlib text and the
   bench model's tokenizer). Outputs are forced (`ignore_eos`).
2. Isolated latencies, measured in this run on one pinned core with the same engine: the prefill time of the
   workload's mean prompt length and the batch-1 decode step at its mean context. SLO at scale ``k``:
   TTFT <= k x s x isolated prefill, TPOT <= k x isolated decode step. The TTFT scale s is 1, except for a
   workload modelled on an application whose SLOs have a given TTFT:TPOT ratio (the prefill-heavy one:
   DistServe's summarization, 15 s : 0.15 s, a tight TPOT beside a loose TTFT), where
   s = max(1, ratio x decode step / prefill). Such a workload is also scored against s = 1 ("symmetric").
3. Every system (same cores, same engine, same gateway and client) is started with `LocalCluster` and driven
   open-loop by the same seeded schedule (`bench.workload`, `bench.serving`). The goodput search
   (`bench.goodput.find_goodput`) bisects the rate at the workload's headline ``k``; every load run is scored
   against every ``k`` (runs are cached by rate), so goodput is reported at each ``k``, plus the tightest ``k``
   each system sustains at a fixed rate (the search's start rate, the same for every system).
4. One JSON object (machine, commit, config, per-rate results) and, with ``--plots``, PNGs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.cpu import PidsFn
from bench.goodput import GoodputResult, find_goodput, goodput_per_device
from bench.ideal import ideal_ttft_attainment
from bench.metrics import SLO, RequestMetrics, attainment, compute_metrics, summarize_records
from bench.probe import (
    TARGET,
    Prober,
    Turns,
    goodput_from_runs,
    highest_passing_rate,
    refine_goodput,
    tightest_k,
)
from bench.report import emit, plot_attainment_vs_rate, plot_goodput_bars, plot_latency_cdfs, plots_status
from bench.serving import run_load
from bench.workload import LengthDist, Uniform, Workload, make_requests

log = logging.getLogger("bench.compare")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO_ROOT / "models" / "pdserve-tiny-py"
DISAGG = "disagg-1P1D"
# The same two instances with conditional disaggregation (coordinator `--local-prefill busy`): a prompt of at
# most 128 tokens is prefilled on the decode instance while the prefill instance has two requests in flight.
DISAGG_COND = "disagg-1P1D-cond"
KV_BLOCKS = 2048  # per instance, every system: 64 running requests of the longest full-mode workload fit


# ---------------------------------------------------------------------------------------------------------------
# What is compared
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class System:
    """One serving configuration on `devices` cores: prefill + decode instances, or colocated replicas."""

    name: str
    devices: int
    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    chunk_tokens: int | None = None
    local_prefill: str = "off"  # coordinator --local-prefill (conditional disaggregation)


def systems(budgets: tuple[int, ...]) -> list[System]:
    """Disaggregated 1P + 1D against every colocated configuration on 2 cores."""
    out = [
        System(DISAGG, 2, prefill=1, decode=1),
        System(DISAGG_COND, 2, prefill=1, decode=1, local_prefill="busy"),
        System("colocated-2x1core", 2, colocated=2),
        System("colocated-1x2core", 2, colocated=1),
    ]
    for b in budgets:
        out.append(System(f"colocated-2x1core-chunk{b}", 2, colocated=2, chunk_tokens=b))
        out.append(System(f"colocated-1x2core-chunk{b}", 2, colocated=1, chunk_tokens=b))
    return out


SUMMARIZATION = 100.0  # DistServe's summarization SLOs: TTFT 15 s, TPOT 0.15 s (shared docs, REFERENCES.md)


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    prompt: LengthDist
    output: LengthDist
    headline_k: float  # the SLO scale goodput_per_device is quoted at
    # The application's TTFT SLO over its TPOT SLO, as in DistServe's per-application SLOs (summarization:
    # 15 s / 0.15 s = 100, a tight TPOT beside a loose TTFT). Sets the TTFT scale s of this workload's SLOs,
    # s = max(1, ratio x isolated decode step / isolated prefill), measured in the run. None: s = 1.
    ttft_tpot_ratio: float | None = None


@dataclass(frozen=True)
class Mode:
    name: str
    model: dict[str, int]  # cached_random_model kwargs (vocab_size is the shipped tokenizer's)
    workloads: tuple[WorkloadSpec, ...]
    budgets: tuple[int, ...]  # chunked-prefill token budgets swept
    n_requests: int  # requests per load run (probe)
    min_requests: int  # ... at least this many at low rates
    max_span_s: float  # ... else fewer, so that a run's arrivals span at most this long
    max_probes: int  # load runs of the headline-k search
    extra_probes: int  # more load runs allowed for each other k (0: score the headline runs only)
    rel_tol: float
    symmetric_probes: int  # load runs of the symmetric-SLO search (workloads with a TTFT scale != 1)
    only_systems: tuple[str, ...] = ()  # () = every system of `systems(budgets)`; --systems overrides
    ks: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
    # A run during which CPU outside the system under test and the load generator peaked above this many
    # cores in some second is run again (once): see bench.cpu. Measured on quiet full runs: 0.06-0.11 cores on
    # average (idle peers, the machine's daemons), 0.10-0.26 in the busiest second.
    max_foreign_cores: float = 0.5
    load_factor: float = (
        0.4  # start rate = load_factor x a 1-core capacity estimate (measured goodputs: 0.2-0.5)
    )


QUICK = Mode(
    name="quick",
    # 14 M parameters: decode step ~3.5 ms, prefill of 160 tokens ~45 ms on this host. The 4-layer 256-wide
    # model quick mode had until 2026-12-04 stepped in 0.9-1.6 ms, no more than the ~1 ms per token the
    # serving path adds (two gRPC streams, the gateway), so its SLOs measured that path and every system
    # could score 0 (docs/benchmarks.md).
    model={"layers": 6, "hidden": 384, "heads": 6, "kv_heads": 2, "intermediate": 1024},
    workloads=(
        # k = 3, not full mode's 2: 24 requests per run and two runs per search leave little margin. Prompts of
        # 128-192 tokens (224-288 until 2026-12-06): the runs at the low rates a long prefill allows took a
        # third of the 2-minute budget.
        WorkloadSpec(
            "prefill_heavy", Uniform(128, 192), Uniform(8, 16), headline_k=3.0, ttft_tpot_ratio=SUMMARIZATION
        ),
        WorkloadSpec("balanced", Uniform(48, 80), Uniform(48, 80), headline_k=4.0),
    ),
    budgets=(64,),
    n_requests=24,
    min_requests=24,
    max_span_s=3.0,
    max_probes=2,
    extra_probes=0,
    rel_tol=0.25,
    symmetric_probes=0,  # quick: the symmetric SLOs are scored on the headline search's runs only
    # the one-replica-on-2-cores layouts were never the best colocated system in a full run: quick skips them
    only_systems=(DISAGG, DISAGG_COND, "colocated-2x1core", "colocated-2x1core-chunk64"),
)
FULL = Mode(
    name="full",
    model={"layers": 8, "hidden": 512, "heads": 8, "kv_heads": 2, "intermediate": 1408},
    workloads=(
        WorkloadSpec(
            "prefill_heavy", Uniform(320, 448), Uniform(12, 20), headline_k=2.0, ttft_tpot_ratio=SUMMARIZATION
        ),
        WorkloadSpec("balanced", Uniform(96, 160), Uniform(96, 160), headline_k=4.0),
    ),
    budgets=(32, 128),
    n_requests=80,
    min_requests=30,
    max_span_s=20.0,
    max_probes=6,  # 4 left the brackets wider than rel_tol (2026-12-03)
    extra_probes=0,  # other k are scored on the headline search's runs (fits ~45 min on 2 cores)
    rel_tol=0.2,
    symmetric_probes=4,  # the same search, most of its runs cached: ~4 min more
)


# ---------------------------------------------------------------------------------------------------------------
# Model, prompts, isolated latencies
# ---------------------------------------------------------------------------------------------------------------


def bench_model(kwargs: dict[str, int]) -> tuple[str, str | None]:
    """(model dir, shipped tokenizer path or None): the random model gets the shipped tokenizer's vocab size."""
    from engine.synth import cached_random_model

    tok = SHIPPED_MODEL / "tokenizer.json"
    if tok.exists():
        import tokenizers

        vocab = tokenizers.Tokenizer.from_file(str(tok)).get_vocab_size(with_added_tokens=True)
        return cached_random_model(**kwargs, vocab_size=vocab), str(tok)
    return cached_random_model(**kwargs), None


def prompt_source(model_dir: str, shipped_tokenizer: str | None) -> tuple[list[int], str]:
    """Token ids of held-out text to cut prompts from, and a description of where they came from."""
    heldout = SHIPPED_MODEL / "heldout.txt"
    if shipped_tokenizer and heldout.exists():
        import tokenizers

        ids = tokenizers.Tokenizer.from_file(shipped_tokenizer).encode(heldout.read_text("utf-8")).ids
        return ids, f"{heldout.relative_to(REPO_ROOT)} with the shipped tokenizer"
    from engine.synth import stdlib_texts
    from engine.tokenizer import Tokenizer

    ids = Tokenizer(model_dir).encode("\n".join(stdlib_texts(max_bytes=400_000)))
    return ids, "Python stdlib sources with the bench model's tokenizer (shipped held-out text not found)"


def mean_len(dist: LengthDist) -> int:
    if isinstance(dist, Uniform):
        return (dist.lo + dist.hi) // 2
    return int(round(float(np.mean(dist.sample(np.random.default_rng(0), 4096)))))


def measure_isolated(model_dir: str, cpu: int, source: list[int], prompt_len: int, context_len: int) -> dict:
    """Prefill of `prompt_len` tokens and the batch-1 decode step at `context_len`, alone, on one core
    (a thread pinned like an instance: affinity + 1 torch thread). Best of repeated runs: the machine is
    shared, and the least disturbed run is the closest to "served alone on an idle device"."""
    out: dict[str, Any] = {}

    def work() -> None:
        from engine.device import Device
        from engine.params import SamplingParams
        from engine.runner import ModelRunner
        from engine.sequence import Sequence

        runner = ModelRunner(model_dir, Device.cpu((cpu,)), num_kv_blocks=4 * (context_len // 16 + 64))
        params = SamplingParams(max_tokens=64, ignore_eos=True)

        def fresh(n: int) -> Sequence:
            s = Sequence("iso", list(source[:n]), params)
            s.blocks = list(range(-(-(n + 64) // runner.block_size)))
            return s

        prefill = []
        for i in range(9):
            s = fresh(prompt_len)
            t = time.perf_counter()
            runner.prefill([s])
            if i:  # the first run warms up
                prefill.append(time.perf_counter() - t)
        s = fresh(context_len)
        s.output_ids.append(runner.prefill([s])[0])  # type: ignore[arg-type]
        steps = []
        for _ in range(40):
            t = time.perf_counter()
            s.output_ids.append(runner.decode([s])[0])
            steps.append(time.perf_counter() - t)
        out.update(
            prefill_s=min(prefill),
            decode_step_s=min(steps[4:]),
            prefill_median_s=statistics.median(prefill),
            decode_step_median_s=statistics.median(steps[4:]),
            prompt_len=prompt_len,
            context_len=context_len,
            cpu=cpu,
        )

    t = threading.Thread(target=work, name="isolated")  # pins only this thread
    t.start()
    t.join()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Load runs, scored against every k
# ---------------------------------------------------------------------------------------------------------------


def _compact(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("n_requests", "n_ok", "n_failed", "errors", "attainment", "attainment_ttft", "attainment_tpot")
    out = {k: summary[k] for k in keep}
    for key in ("ttft_s", "tpot_s", "tbt_s"):
        out[key] = {q: summary[key][q] for q in ("p50", "p90", "p99")}
    out["request_throughput"] = summary["request_throughput"]
    out["output_token_throughput"] = summary["output_token_throughput"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# One system on one workload
# ---------------------------------------------------------------------------------------------------------------


def evaluate(
    prober: Prober,
    iso: dict,
    slos: dict[float, SLO],
    headline_k: float,
    start_rate: float,
    mode: Mode,
    prefill_servers: int = 0,
    symmetric_slos: dict[float, SLO] | None = None,
) -> dict[str, Any]:
    """Goodput at the headline k (bisection), then at every other k, and the tightest k at start_rate.
    With `prefill_servers` (a disaggregated system), every run is also scored against the ideal prefill pool
    of that many instances (`bench.ideal`): the TTFT attainment queueing alone allows on the run's schedule.
    With `symmetric_slos` (a workload whose TTFT scale is not 1), goodput is also found against SLOs that
    scale both isolated latencies alike: a search of its own at the headline k (`mode.symmetric_probes` load
    runs at most, cached runs included; 0: score the other runs only), every k scored on all runs."""
    base = (slos[headline_k].ttft_s / headline_k, slos[headline_k].tpot_s / headline_k)  # the SLO at k = 1

    def search(slo: SLO, max_probes: int) -> GoodputResult:
        return find_goodput(
            lambda r: prober.attainment(r, slo),
            start_rate=start_rate,
            target=TARGET,
            rel_tol=mode.rel_tol,
            max_probes=max_probes,
            min_rate=start_rate / 4,
        )

    res = search(slos[headline_k], mode.max_probes)
    for k, slo in slos.items():
        if k != headline_k:
            refine_goodput(prober, slo, mode.extra_probes, mode.rel_tol)
    sym_search = None
    if symmetric_slos and mode.symmetric_probes:
        sym_search = search(symmetric_slos[headline_k], mode.symmetric_probes).to_dict()
    goodput: dict[str, Any] = {}
    for k, slo in slos.items():
        if k == headline_k:
            goodput[f"{k:g}"] = {"rate": res.rate, "search": res.to_dict()}
        else:
            goodput[f"{k:g}"] = {"rate": goodput_from_runs(list(prober.runs.values()), slo), "search": None}
    fixed = prober.run(start_rate)
    runs: list[dict[str, Any]] = []
    for run in sorted(prober.runs.values(), key=lambda r: r.rate):
        summary = summarize_records(run.records, slos[headline_k])
        entry: dict[str, Any] = {
            "rate": run.rate,
            "attainment_by_k": {
                f"{k:g}": attainment(compute_metrics(run.records), s) for k, s in slos.items()
            },
            "tightest_k": tightest_k(run.records, *base),
            "at_headline_k": _compact(summary),
            "cpu": run.cpu.to_dict() if run.cpu else None,
            "discarded_disturbed_runs": [u.to_dict() for u in run.discarded],
        }
        if prefill_servers:
            entry["ideal_prefill_ttft_attainment_by_k"] = {
                f"{k:g}": ideal_ttft_attainment(
                    run.records, s.ttft_s, iso["prefill_s"], iso["prompt_len"], prefill_servers
                )
                for k, s in slos.items()
            }
        runs.append(entry)
    ideal = None
    if prefill_servers:  # the highest probed rate the ideal pool passes at each k, every lower run passing
        ideal = {
            "prefill_servers": prefill_servers,
            "goodput_by_k": {
                key: highest_passing_rate(
                    [(e["rate"], e["ideal_prefill_ttft_attainment_by_k"][key]) for e in runs]
                )
                for key in (f"{k:g}" for k in slos)
            },
        }
    return {
        "ideal_prefill_pool": ideal,
        "goodput": goodput,
        "tightest_k_at_fixed_rate": tightest_k(fixed.records, *base),
        "goodput_symmetric": (
            {f"{k:g}": goodput_from_runs(list(prober.runs.values()), s) for k, s in symmetric_slos.items()}
            if symmetric_slos
            else None
        ),
        "symmetric_search": sym_search,
        "runs": runs,
    }


def start_system(system: System, model_dir: str, cpus: tuple[int, ...], log_dir: str):
    from pdserve.launcher import ClusterConfig, LocalCluster

    cfg = ClusterConfig(
        model_dir=model_dir,
        port=0,
        prefill=system.prefill,
        decode=system.decode,
        colocated=system.colocated,
        chunk_tokens=system.chunk_tokens,
        local_prefill=system.local_prefill,
        cpus=cpus,
        use_cuda=False,
        heartbeat_ttl_s=1.5,
        num_kv_blocks=KV_BLOCKS,
        log_dir=os.path.join(log_dir, system.name),
    )
    return LocalCluster(cfg).start(timeout_s=180)


def warm_up(address: str, source: list[int]) -> None:
    """A few requests through every instance, so first-call costs are not in the measurements."""
    wl = Workload("warmup", n_requests=6, rate=20.0, prompt=Uniform(16, 64), output=Uniform(4, 8), seed=99)
    asyncio.run(run_load(address, make_requests(wl, source), request_timeout_s=60, drain_s=60))


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def plot_all(
    result: dict[str, Any], metrics_at_fixed: dict[str, dict[str, list[RequestMetrics]]], plots_dir: str
) -> list[str | None]:
    """Per workload: attainment vs rate (headline k), TTFT/TBT CDFs at the fixed rate, goodput per device."""
    files: list[str | None] = []
    for wname, w in result["workloads"].items():
        k = "{:g}".format(w["headline_k"])
        slo = SLO(w["slos"][k]["ttft_s"], w["slos"][k]["tpot_s"])
        series = {
            name: [(run["rate"], run["attainment_by_k"][k]) for run in s["runs"]]
            for name, s in w["systems"].items()
        }
        files.append(
            plot_attainment_vs_rate(series, Path(plots_dir) / f"serving_{wname}_attainment.png", TARGET)
        )
        files.append(
            plot_latency_cdfs(metrics_at_fixed[wname], Path(plots_dir) / f"serving_{wname}_cdfs.png", slo)
        )
        files.append(
            plot_goodput_bars(w["goodput_per_device"], Path(plots_dir) / f"serving_{wname}_goodput.png")
        )
    return files


@dataclass
class Plan:
    """One workload as every system sees it: schedule, isolated latencies, SLOs, fixed rate, timeout."""

    spec: WorkloadSpec
    workload: Workload
    isolated: dict[str, Any]
    slos: dict[float, SLO]
    ttft_scale: float  # TTFT SLO = k x ttft_scale x isolated prefill (1 unless the spec sets ttft_tpot_ratio)
    symmetric_slos: dict[float, SLO] | None  # k x both isolated latencies, when ttft_scale != 1
    start_rate: float  # the search starts here; also the fixed rate of the tightest-k comparison
    timeout_s: float  # a request unanswered this long after its arrival is a failure (an SLO miss)


def _iso_lens(spec: WorkloadSpec) -> tuple[int, int]:
    """(prompt length, decode context) of the isolated measurement: the workload's means."""
    p_len, o_len = mean_len(spec.prompt), mean_len(spec.output)
    return p_len, p_len + o_len // 2


def workload_slos(
    spec: WorkloadSpec, prefill_s: float, decode_step_s: float, ks: list[float]
) -> tuple[float, dict[float, SLO], dict[float, SLO] | None]:
    """(TTFT scale s, the workload's SLO per k, the symmetric SLO per k or None when s == 1).

    At scale k: TTFT <= k x s x prefill_s, TPOT <= k x decode_step_s; s = max(1, ratio x decode / prefill)
    for a spec with a TTFT:TPOT ratio (never below 1: a TTFT SLO under the isolated prefill is unmeetable)."""
    scale = 1.0
    if spec.ttft_tpot_ratio is not None:
        scale = max(1.0, spec.ttft_tpot_ratio * decode_step_s / prefill_s)
    slos = {k: SLO(k * scale * prefill_s, k * decode_step_s) for k in ks}
    symmetric = {k: SLO(k * prefill_s, k * decode_step_s) for k in ks} if scale != 1.0 else None
    return scale, slos, symmetric


def plan_workload(
    spec: WorkloadSpec, mode: Mode, model_dir: str, cpu: int, source: list[int], seed: int
) -> Plan:
    p_len, o_len = mean_len(spec.prompt), mean_len(spec.output)
    iso = measure_isolated(model_dir, cpu, source, *_iso_lens(spec))
    ks = sorted({*mode.ks, spec.headline_k})
    scale, slos, symmetric = workload_slos(spec, iso["prefill_s"], iso["decode_step_s"], ks)
    # a 1-core capacity estimate (prefill + decode at a batch of ~8); start at load_factor of it
    per_request = iso["prefill_s"] + o_len * iso["decode_step_s"] / 8
    start_rate = float(f"{mode.load_factor / per_request:.3g}")
    timeout_s = max(ks) * (scale * iso["prefill_s"] + spec.output.hi * iso["decode_step_s"]) * 2 + 2.0  # type: ignore[union-attr]
    workload = Workload(
        spec.name,
        n_requests=mode.n_requests,
        rate=start_rate,
        prompt=spec.prompt,
        output=spec.output,
        seed=seed,
    )
    log.info(
        "%s: isolated prefill(%d) %.1f ms, decode step %.2f ms; TTFT scale %.2f; start rate %.3g req/s",
        spec.name,
        p_len,
        1e3 * iso["prefill_s"],
        1e3 * iso["decode_step_s"],
        scale,
        start_rate,
    )
    return Plan(spec, workload, iso, slos, scale, symmetric, start_rate, timeout_s)


def start_all(chosen: list[System], model_dir: str, cpus: tuple[int, ...], log_dir: str) -> dict[str, Any]:
    """Start every system at once (they idle while others run load); all or none."""
    from pdserve.launcher import LocalCluster

    t = time.monotonic()
    clusters: dict[str, LocalCluster] = {}
    with ThreadPoolExecutor(len(chosen)) as pool:
        futures = {s.name: pool.submit(start_system, s, model_dir, cpus, log_dir) for s in chosen}
        errors = []
        for name, fut in futures.items():
            try:
                clusters[name] = fut.result()
            except Exception as exc:  # noqa: BLE001 - reported after the others are stopped
                errors.append(f"{name}: {exc}")
    if errors:
        stop_all(list(clusters.values()))
        raise RuntimeError("could not start every system: " + "; ".join(errors))
    log.info("%d systems up in %.1fs", len(clusters), time.monotonic() - t)
    return clusters


def stop_all(clusters: list[Any]) -> None:
    """Stop clusters in parallel (each waits for its processes' graceful shutdown)."""
    with ThreadPoolExecutor(max(1, len(clusters))) as pool:
        list(pool.map(lambda c: c.stop(), clusters))


def evaluate_system(
    system: System,
    address: str,
    plans: list[Plan],
    mode: Mode,
    source: list[int],
    turns: Turns,
    pids: PidsFn | None = None,
    peer_pids: PidsFn | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[RequestMetrics]]]:
    """Every workload on one running system: (results, metrics at the fixed rate) per workload. With `pids`
    (the system's processes; `peer_pids`: the other systems') each run's CPU use is measured, and a run that
    foreign load disturbed is run again (`Prober`)."""
    results: dict[str, dict[str, Any]] = {}
    fixed: dict[str, list[RequestMetrics]] = {}
    try:
        with turns.turn(system.name):
            warm_up(address, source)
        for plan in plans:
            prober = Prober(
                system.name,
                address,
                plan.workload,
                source,
                timeout_s=plan.timeout_s,
                max_span_s=mode.max_span_s,
                min_requests=mode.min_requests,
                turns=turns,
                log_slo=plan.slos[plan.spec.headline_k],
                pids=pids,
                peer_pids=peer_pids,
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
            )
            results[plan.spec.name] = {"devices": system.devices, "config": asdict(system), **out}
            fixed[plan.spec.name] = compute_metrics(prober.run(plan.start_rate).records)
    finally:
        turns.leave(system.name)
    return results, fixed


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


def slos_json(slos: dict[float, SLO]) -> dict[str, dict[str, float]]:
    return {f"{k:g}": {"ttft_s": s.ttft_s, "tpot_s": s.tpot_s} for k, s in slos.items()}


def vs_best_colocated(
    per_device: dict[str, float], sysres: dict[str, dict[str, Any]], system: str = DISAGG
) -> tuple[str | None, float | None, float | None]:
    """(best colocated system, `system`'s goodput / its goodput, lower bound of that ratio when every
    colocated goodput is 0, i.e. below its lowest probed rate)."""
    colocated = {n: v for n, v in per_device.items() if n.startswith("colocated")}
    best = max(colocated, key=lambda n: colocated[n]) if colocated else None
    ratio = lower_bound = None
    if best is not None and system in per_device:
        if colocated[best] > 0:
            ratio = per_device[system] / colocated[best]
        elif per_device[system] > 0:
            floor = max(min(r["rate"] for r in sysres[n]["runs"]) / sysres[n]["devices"] for n in colocated)
            lower_bound = per_device[system] / floor
    return best, ratio, lower_bound


def workload_result(plan: Plan, sysres: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON of one workload: goodput per device at the headline k and at every k, the ratio of the
    disaggregated system to the best colocated one, the tightest k at the fixed rate, every run."""
    headline = f"{plan.spec.headline_k:g}"
    by_k = {
        k: {n: goodput_per_device(s["goodput"][k]["rate"], s["devices"]) for n, s in sysres.items()}
        for k in (f"{k:g}" for k in plan.slos)
    }
    per_device = by_k[headline]
    best, ratio, lower_bound = vs_best_colocated(per_device, sysres)
    cond_ratio = vs_best_colocated(per_device, sysres, DISAGG_COND)[1] if DISAGG_COND in per_device else None
    symmetric = None
    if plan.symmetric_slos:  # k x both isolated latencies: its own search in full mode, every k on all runs
        sym_by_k = {
            k: {n: goodput_per_device(s["goodput_symmetric"][k], s["devices"]) for n, s in sysres.items()}
            for k in (f"{k:g}" for k in plan.symmetric_slos)
        }
        sym_best, sym_ratio, sym_bound = vs_best_colocated(sym_by_k[headline], sysres)
        symmetric = {
            "slos": slos_json(plan.symmetric_slos),
            "goodput_per_device_by_k": sym_by_k,
            "best_colocated": sym_best,
            "goodput_ratio_vs_best_colocated": sym_ratio,
            "goodput_ratio_lower_bound": sym_bound,
        }
    return {
        "workload": plan.workload.to_dict(),
        "isolated": plan.isolated,
        "headline_k": plan.spec.headline_k,
        "ttft_tpot_ratio": plan.spec.ttft_tpot_ratio,
        "ttft_scale": plan.ttft_scale,
        "slos": slos_json(plan.slos),
        "fixed_rate": plan.start_rate,
        "request_timeout_s": plan.timeout_s,
        "goodput_per_device": per_device,
        "goodput_per_device_by_k": by_k,
        "tightest_k_at_fixed_rate": {n: s["tightest_k_at_fixed_rate"] for n, s in sysres.items()},
        "best_colocated": best,
        "goodput_ratio_vs_best_colocated": ratio,
        "goodput_ratio_lower_bound": lower_bound,  # set when every colocated goodput is below its lowest probe
        # the same ratio for the conditional-disaggregation system (the pure split's is the one above)
        "conditional_goodput_ratio_vs_best_colocated": cond_ratio,
        # the ideal prefill pool's goodput per device (TTFT only, bench.ideal) on the disaggregated system's runs
        "disagg_ideal_prefill_goodput_per_device": (
            goodput_per_device(
                sysres[DISAGG]["ideal_prefill_pool"]["goodput_by_k"][headline],
                sysres[DISAGG]["devices"],
            )
            if DISAGG in sysres and sysres[DISAGG].get("ideal_prefill_pool")
            else None
        ),
        "symmetric_slos": symmetric,
        "systems": sysres,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="small model, 2 runs per search, 24 requests per run (< 2 min)"
    )
    p.add_argument("--json", default=None, help="write the JSON object here instead of stdout")
    p.add_argument("--plots", default=None, help="write PNG plots into this directory")
    p.add_argument("--cpus", default="", help="the 2 cores the systems share (default: the first two usable)")
    p.add_argument("--systems", default="", help="comma-separated system names (default: all of the mode)")
    p.add_argument("--workloads", default="", help="comma-separated workload names (default: all)")
    p.add_argument("--n-requests", type=int, default=None, help="requests per load run (at most)")
    p.add_argument(
        "--max-span-s",
        type=float,
        default=None,
        help="fewer requests when a run's arrivals would span longer",
    )
    p.add_argument(
        "--max-probes", type=int, default=None, help="load runs per goodput search (the symmetric one too)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # stop every started process, as Ctrl-C does
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pdserve.launcher").setLevel(logging.WARNING)
    began = time.monotonic()
    mode = QUICK if a.quick else FULL
    if a.n_requests:
        mode = replace(mode, n_requests=a.n_requests, min_requests=min(mode.min_requests, a.n_requests))
    if a.max_span_s:
        mode = replace(mode, max_span_s=a.max_span_s)
    if a.max_probes:
        mode = replace(
            mode, max_probes=a.max_probes, symmetric_probes=a.max_probes if mode.symmetric_probes else 0
        )
    from engine.device import parse_cpus

    cpus = parse_cpus(a.cpus) if a.cpus else tuple(sorted(os.sched_getaffinity(0)))[:2]
    if len(cpus) != 2:
        raise SystemExit(f"bench.compare compares systems on 2 cores, got {cpus}")
    wanted = a.systems.split(",") if a.systems else mode.only_systems
    chosen = [s for s in systems(mode.budgets) if not wanted or s.name in wanted]
    specs = [w for w in mode.workloads if not a.workloads or w.name in a.workloads.split(",")]
    if not chosen or not specs:
        raise SystemExit("no system or workload selected")

    model_dir, shipped_tok = bench_model(mode.model)
    source, source_desc = prompt_source(model_dir, shipped_tok)
    log.info("bench model %s; prompts from %s (%d tokens)", model_dir, source_desc, len(source))
    plans = [plan_workload(spec, mode, model_dir, cpus[0], source, a.seed) for spec in specs]

    load_start = os.getloadavg()
    try:
        per_system, metrics_at_fixed = run_all(chosen, plans, mode, model_dir, cpus, source)
    except KeyboardInterrupt:
        log.warning("interrupted: every started process was stopped; no result")
        return 130
    load_end = os.getloadavg()
    # the same isolated measurement again (full mode): how far the machine drifted during the run
    drift = {
        p.spec.name: measure_isolated(model_dir, cpus[0], source, *_iso_lens(p.spec))
        if mode.name == "full"
        else None
        for p in plans
    }

    result: dict[str, Any] = {
        "benchmark": "compare",
        "mode": mode.name,
        "config": {
            "model": {"dir": model_dir, **mode.model, "dtype": "float32", "init": "random (engine.synth)"},
            "prompt_source": source_desc,
            "cpus": list(cpus),
            "device": "one CPU core",
            "arrival": "poisson",
            "seed": a.seed,
            "requests_per_run": {
                "max": mode.n_requests,
                "min": mode.min_requests,
                "max_span_s": mode.max_span_s,
            },
            "target_attainment": TARGET,
            "max_foreign_cores": mode.max_foreign_cores,
            "search": {
                "max_probes": mode.max_probes,
                "extra_probes_per_k": mode.extra_probes,
                "symmetric_probes": mode.symmetric_probes,
                "rel_tol": mode.rel_tol,
                "min_rate": "start_rate / 4",
            },
            "systems": [asdict(s) for s in chosen],
        },
        "workloads": {p.spec.name: workload_result(p, per_system[p.spec.name]) for p in plans},
        "background_load": {"loadavg_1_5_15_at_start": load_start, "at_end": load_end},
    }
    for p in plans:
        result["workloads"][p.spec.name]["isolated_at_end"] = drift[p.spec.name]
    files = plot_all(result, metrics_at_fixed, a.plots) if a.plots else []
    result["plots"] = plots_status(files)
    result["elapsed_s"] = time.monotonic() - began
    emit(result, a.json, summary=human_summary(result))
    return 0


def human_summary(result: dict[str, Any]) -> str:
    lines = [f"bench compare ({result['mode']}) in {result['elapsed_s']:.0f}s"]
    for wname, w in result["workloads"].items():
        iso = w["isolated"]
        k = "{:g}".format(w["headline_k"])
        slo = w["slos"][k]
        lines.append(
            f"{wname}: k={k} -> TTFT <= {slo['ttft_s'] * 1e3:.0f} ms, TPOT <= {slo['tpot_s'] * 1e3:.1f} ms "
            f"(TTFT scale {w['ttft_scale']:.2f}; isolated prefill {iso['prefill_s'] * 1e3:.1f} ms, "
            f"decode step {iso['decode_step_s'] * 1e3:.2f} ms)"
        )
        for name, g in sorted(w["goodput_per_device"].items(), key=lambda kv: -kv[1]):
            tk = w["tightest_k_at_fixed_rate"][name]
            lines.append(
                f"  {name:28s} goodput/device {g:7.3f} req/s   tightest k @ {w['fixed_rate']:.3g} req/s: "
                + (f"{tk:.2f}" if tk is not None else "none")
            )
        r, bound = w["goodput_ratio_vs_best_colocated"], w["goodput_ratio_lower_bound"]
        shown = f"{r:.2f}x" if r is not None else (f"> {bound:.2f}x" if bound is not None else "n/a")
        lines.append(f"  disaggregated / best colocated ({w['best_colocated']}): {shown}")
        cond = w.get("conditional_goodput_ratio_vs_best_colocated")
        if cond is not None:
            lines.append(f"  conditional disaggregation ({DISAGG_COND}) / best colocated: {cond:.2f}x")
        ideal = w.get("disagg_ideal_prefill_goodput_per_device")
        if ideal is not None:
            lines.append(
                f"  ideal prefill pool on the disaggregated runs' schedules (queueing only): goodput/device "
                f">= {ideal:.3f} req/s"
            )
        cpus = [run["cpu"] for sres in w["systems"].values() for run in sres["runs"] if run.get("cpu")]
        if cpus:
            reruns = sum(
                len(run["discarded_disturbed_runs"]) for sres in w["systems"].values() for run in sres["runs"]
            )
            lines.append(
                f"  foreign CPU during the runs: mean <= {max(c['foreign_cores'] for c in cpus):.2f} cores, "
                f"peak second <= {max(c['foreign_peak_cores'] for c in cpus):.2f}; {reruns} disturbed run(s) redone"
            )
        sym = w.get("symmetric_slos")
        if sym:
            g = sym["goodput_per_device_by_k"][k]
            r, bound = sym["goodput_ratio_vs_best_colocated"], sym["goodput_ratio_lower_bound"]
            shown = f"{r:.2f}x" if r is not None else (f"> {bound:.2f}x" if bound is not None else "n/a")
            lines.append(
                f"  symmetric SLOs (TTFT scale 1) at k={k}: "
                + ", ".join(f"{n} {v:.3f}" for n, v in sorted(g.items(), key=lambda kv: -kv[1]))
                + f"; disaggregated / best colocated: {shown}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
