"""`pdserve bench planner [--quick]`: the planner's search time and its reproduction of DistServe's example.

Prints one JSON object:
* `search_s_4x8`: wall seconds of one search (the slower of the two; `search_cpu_s_4x8` its CPU seconds, which
  on this shared machine is what an idle core would take) over 4 nodes x 8 A100-80GB (DistServe's OPT-13B A100 profile,
  300 GB/s in a node; two runs: 3.1 GB/s between nodes (DistServe's 25 Gbps low-affinity cluster) and
  100 GB/s), with the plans found.
* `distserve_opt13b_1x4`: DistServe's single-node example (simdistserve/README.md: OPT-13B, 1 node x 4 A100
  80GB, TTFT 200 ms, TPOT 100 ms, 90 %): the plan and per-GPU goodput we find, DistServe's reported
  configuration and per-GPU rate beside it, and our simulator's per-GPU goodput for DistServe's configuration.
  Their workload is ShareGPT; with no dataset here we use `sharegpt-approx` (log-normal lengths), so the
  numbers differ by the workload as well as by the model (see docs/benchmarks.md).
* `fidelity` (unless --no-fidelity): predicted vs measured SLO attainment of this machine's 1P1D cluster at
  three rates around the predicted goodput, with the details in `fidelity_run` (see `fidelity`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.report import emit
from coordinator.planner.distserve import SHIPPED, profile_from_distserve
from coordinator.planner.latency import Layout, LayoutLatency
from coordinator.planner.model import OPT_13B_CONFIG, spec_from_config
from coordinator.planner.search import SearchInput, search
from coordinator.planner.simulator import Stretch
from coordinator.planner.topology import uniform

# simdistserve/README.md (LLMServe/DistServe): "Best per GPU rate: 1.56; Best config: pp_cross=1,
# tp_prefill=2, pp_prefill=1, tp_decode=1, pp_decode=1" - their simulator, ShareGPT, N=300, one segment of
# 1 prefill + 1 decode instance (3 GPUs; their per-GPU rate divides by the GPUs the config uses).
DISTSERVE_REPORTED = {
    "source": "github.com/LLMServe/DistServe simdistserve/README.md (their simulator, ShareGPT, N=300)",
    "prefill": {"tp": 2, "pp": 1, "instances": 1},
    "decode": {"tp": 1, "pp": 1, "instances": 1},
    "per_gpu_goodput_rps": 1.56,
    "gpus": 3,
    "paper_real_system_figure": "not extracted: the paper plots goodput curves, not this configuration's number",
}


# The instances' stretch per window: schedstat read every STRETCH_WINDOW_S; a window in which the step thread
# ran less than STRETCH_WINDOW_MIN_RUN_S is merged into the next (bench.cpu.window_stretches)
STRETCH_WINDOW_S = 0.25
STRETCH_WINDOW_MIN_RUN_S = 0.05
# Requests sent at once by the calibration run whose decode batches reach what a run past the knee forms
# (the fidelity runs past the knee fill the decode instance: max_running, 64 sequences)
STEP_BURST = 64
# The fidelity runs: rates as multiples of the predicted goodput, and requests per run, enough to reach the
# steady state the planner predicts. A run of 60 requests at 20-45 req/s is one burst whose requests share
# one decode batch: it measures how far that batch grows, and its attainment at 2x flipped from 0.43 to 1.0
# for 5 % of step time (2026-12-07; docs/benchmarks.md, "Planner")
RATE_FACTORS = (0.6, 1.0, 1.4)
STEADY_REQUESTS = 200  # the calibration run at a steady rate (see `fidelity`)
QUICK_REQUESTS_PER_RATE = 300
REQUESTS_PER_RATE = 600


def stretch_windows(samples: list[tuple[float, Any]], role: str, offset_s: float) -> Stretch:
    """`role`'s stretch per window of a run's schedstat `samples` (bench.cpu.window_stretches; a window in
    which its step thread ran under STRETCH_WINDOW_MIN_RUN_S merged into the next), on the requests' clock:
    `offset_s` is the first sample's time on it."""
    from bench.cpu import window_stretches

    w = window_stretches(samples, role, STRETCH_WINDOW_MIN_RUN_S)
    return Stretch(tuple(x[0] + offset_s for x in w), tuple(x[1] for x in w))


def _summary(plan: Any) -> dict[str, Any]:
    d = plan.to_dict()
    return {
        "prefill": d["prefill"],
        "decode": d["decode"],
        "unit": d["unit"],
        "devices_used": d["devices_used"],
        "predicted": d["predicted"],
        "search_s": d["search_s"],
        "kv_link_codecs": sorted({k["codec"] for k in d["kv_links"]}),
        "kv_crosses_nodes": any(_node(d, k["prefill"]) != _node(d, k["decode"]) for k in d["kv_links"]),
    }


def _latency_quantiles(ttft_s: Any, tpot_s: Any) -> dict[str, float | None]:
    """p50 / p90 of TTFT and TPOT in ms (unserved requests, inf in the simulator, count as the slowest)."""
    import math

    from bench.metrics import stats

    out: dict[str, float | None] = {}
    for name, xs in (("ttft", ttft_s), ("tpot", tpot_s)):
        xs = list(xs)
        finite = [x for x in xs if math.isfinite(x)]
        cap = max(finite, default=0.0)
        st = stats([x if math.isfinite(x) else cap for x in xs], (50, 90))
        for q in (50, 90):
            v = st[f"p{q}"]
            out[f"{name}_p{q}"] = None if v is None else 1e3 * float(v)
    return out


def _field_default(cls: Any, name: str) -> Any:
    """A dataclass field's default (the coordinator's flags the launcher leaves at their defaults)."""
    import dataclasses

    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _node(d: dict[str, Any], name: str) -> str:
    return next(p["node"] for p in d["placement"] if p["instance"] == name)


def run(quick: bool) -> dict[str, Any]:
    from pdserve.plan_cli import workload_samples

    profile = profile_from_distserve(json.loads(SHIPPED.read_text()), "facebook/opt-13b")
    model = spec_from_config(OPT_13B_CONFIG)
    samples = workload_samples("sharegpt-approx")
    n = 200 if quick else 400

    def inp(topo: Any, **kw: Any) -> SearchInput:
        return SearchInput(model, profile, topo, 0.2, 0.1, samples, n_requests=n, **kw)

    out: dict[str, Any] = {"quick": quick, "workload": "sharegpt-approx", "n_requests": n}
    timings: dict[str, dict[str, Any]] = {}
    for inter in (3.1, 100.0):
        t0, c0 = time.perf_counter(), time.process_time()
        plan = search(inp(uniform(4, 8, 80, 300, inter, "a100-80g")))
        timings[f"inter_{inter:g}_gbytes_per_s"] = {
            "search_s": time.perf_counter() - t0,
            "search_cpu_s": time.process_time() - c0,  # this process's CPU time: what an idle core would take
            "plan": _summary(plan),
        }
    out["search_s_4x8"] = max(v["search_s"] for v in timings.values())
    out["search_cpu_s_4x8"] = max(v["search_cpu_s"] for v in timings.values())
    out["search_4x8"] = timings
    one_node = uniform(1, 4, 80, 300, 300, "a100-80g")
    ours = search(inp(one_node))
    theirs = search(inp(one_node, fixed_unit=(Layout(2, 1), Layout(1, 1), 1, 1)))
    unit_goodput = ours.predicted.goodput_rps / ours.units
    out["distserve_opt13b_1x4"] = {
        "slo": {"ttft_ms": 200, "tpot_ms": 100, "attainment": 0.9},
        "ours": {
            **_summary(ours),
            "per_gpu_goodput_rps": ours.predicted.per_device_goodput_rps,
            "unit_goodput_rps": unit_goodput,
        },
        "distserve_reported": DISTSERVE_REPORTED,
        "distserve_config_in_our_simulator": {
            **_summary(theirs),
            "per_gpu_goodput_rps": theirs.predicted.per_device_goodput_rps,
        },
    }
    return out


def fidelity(
    quick: bool,
    log_dir: str,
    raw_path: str | None = None,
    requests_per_rate: int | None = None,
    rate_factors: tuple[float, ...] = RATE_FACTORS,
) -> dict[str, Any]:
    """Predicted vs measured SLO attainment on this machine. Profile the quick bench model here (TP1, one
    core: the engine's forward passes only), start a 1P1D cluster on this machine's two cores (the only plan
    the local topology holds), and calibrate the profile to the serving path from four runs through it (an
    isolated one, a burst of 16, one of STEP_BURST and a steady one at the goodput the first three predict:
    the decode model is refitted on the decode steps the decode instance counted in them by batch size,
    calibrate.step_model; the isolated run and the first burst split what the path adds into latency and
    instance capacity, calibrate.calibrate). SLOs are 4x the isolated TTFT and TPOT (the compare bench's
    balanced k = 4).
    The simulator models the cluster as launched: the gateway's local prefill (`--local-prefill busy`), the
    decode instance's `max_running` and its KV cache. Then plan with the calibrated profile and run the
    cluster at `rate_factors` (0.6, 1.0 and 1.4) x its predicted goodput on this host as the calibration runs
    found it (other tenants' share of the cores stretching the model), `requests_per_rate` requests a run
    (300, full 600: enough for the steady state the search predicts), the rate nearest 1.0x first:
    `predicted_attainment` is the simulator on the very arrivals and lengths each run sent, every batch and
    step stretched by its instance's wait for a core in the 0.25 s window it starts in (schedstat, measured
    in that run: what other tenants did to the cores, not what the cluster did), on the calibrated model;
    `predicted_previous_attainment` the previous model (the profile's decode steps mapped as scale * step + a
    per-step term inferred by simulating the isolated run and the burst against the step thread's CPU,
    calibrate.decode_cpu); `decode_step_cpu_over_model` the run's decode steps' CPU as the instance counted
    it over the refitted model's for the same steps (how much faster or slower the host ran than in the
    calibration, the one input no prediction has); `predicted_cpu_matched_attainment` (a diagnostic, not a
    prediction: it uses the outcome of the run) the same with each instance's times scaled to the CPU its
    step thread used in that run (calibrate.cpu_matched), `predicted_run_stretch_attainment` the first with one stretch over the run,
    `predicted_attainment_band_5pct` the first with every time 5 % longer / shorter,
    `predicted_idle_host_attainment` the calibrated model unstretched, `predicted_steady_attainment` the
    search's steady-state figure at that rate (many more requests than a run sends, idle host),
    `predicted_no_local_prefill_attainment` the first without the local prefill; `distributions_ms` the p50 /
    p90 of TTFT and TPOT, predicted beside measured, per rate. `raw_path`: every run's per-request token
    times and schedstat readings are written there as JSON (to replay a run against another model)."""
    import asyncio
    import logging
    import os
    import statistics
    from dataclasses import asdict, astuple, replace

    import numpy as np

    from bench.compare.modes import SMALL_MODEL, SMALL_WORKLOADS
    from bench.compare.slos import bench_model, prompt_source
    from bench.compare.systems import warm_up
    from bench.cpu import CpuMeter, SchedSampler, busiest_run_s, schedstat_ns, stretch
    from bench.metrics import SLO, attainment, compute_metrics
    from bench.serving import run_load
    from bench.workload import Fixed, Workload, make_requests
    from coordinator.config import CoordinatorConfig
    from coordinator.planner.calibrate import (
        apply,
        calibrate,
        cpu_matched,
        cpu_scale,
        decode_cpu,
        local_hold,
        local_pass_scale,
        observed,
        one_by_one,
        step_model,
        stretched,
    )
    from coordinator.planner.latency import Profile
    from coordinator.planner.model import spec_from_config
    from coordinator.planner.search import kv_capacity_tokens
    from coordinator.planner.simulator import (
        Link,
        LocalPrefill,
        Request,
        SimResult,
        simulate,
    )
    from engine.runner import DEFAULT_KV_CACHE_BYTES
    from engine.step_loop import PassCpu
    from pdserve.instance import CPU_BATCH_TOKENS, InstanceConfig
    from pdserve.launcher import ClusterConfig, LocalCluster
    from pdserve.plan_cli import local_topology, profile_from_json, run_profile

    logging.getLogger("bench.probe").setLevel(logging.WARNING)
    load_before = os.getloadavg()
    model_dir, tok = bench_model(SMALL_MODEL)
    source, _ = prompt_source(model_dir, tok)
    profile_json = run_profile(model_dir, threads=1, new_tokens=10, tries=3)
    engine_profile = profile_from_json(profile_json)
    lat = engine_profile.latency(Layout(1, 1))
    spec = next(w for w in SMALL_WORKLOADS if w.name == "balanced")
    rng = np.random.default_rng(0)
    samples = tuple(
        (int(p), int(o))
        for p, o in zip(spec.prompt.sample(rng, 500), spec.output.sample(rng, 500), strict=True)
    )
    mean_p = round(sum(p for p, _ in samples) / len(samples))
    mean_o = round(sum(o for _, o in samples) / len(samples))
    topo = local_topology()
    model = spec_from_config(json.loads((Path(model_dir) / "config.json").read_text()))
    n = requests_per_rate or (QUICK_REQUESTS_PER_RATE if quick else REQUESTS_PER_RATE)
    out: dict[str, Any] = {
        "model": SMALL_MODEL,
        "profile_fit_error": lat.fit_error,
        "requests_per_rate": n,
        "loadavg_before": list(load_before),
    }
    cpus = tuple(sorted(os.sched_getaffinity(0)))[:2]
    cfg = ClusterConfig(
        model_dir=model_dir,
        port=0,
        prefill=1,
        decode=1,
        cpus=cpus,
        use_cuda=False,
        heartbeat_ttl_s=1.5,
        log_dir=log_dir,
    )
    # the gateway's conditional disaggregation as this cluster runs it (pdserve up's default, busy): short
    # prompts go to the decode instance while the prefill instance has `depth` requests in flight
    local = (
        LocalPrefill(cfg.local_prefill_max_tokens, _field_default(CoordinatorConfig, "local_prefill_depth"))
        if cfg.local_prefill == "busy"
        else None
    )
    if cfg.local_prefill not in ("busy", "off"):
        raise ValueError(f"the fidelity run models --local-prefill busy or off, not {cfg.local_prefill}")
    max_running = _field_default(InstanceConfig, "max_running")  # the decode instance's, as launched
    cluster = LocalCluster(cfg).start(timeout_s=180)
    raw_runs: list[dict[str, Any]] = []  # per run: each request's token times, schedstat every 0.25 s

    def pid(role: str) -> int:
        return next(c.proc.pid for c in cluster.children if c.role == role)

    def pass_cpu(role: str) -> PassCpu:
        """The `role` instance's step-thread CPU per pass kind so far (its Stats RPC; one instance a role)."""
        (counted,) = cluster.pass_cpu(role).values()
        return counted

    def step_rows(run_cpu: dict[str, Any]) -> list[tuple[int, int, int, float, float]]:
        """The decode steps the decode instance counted in a run (`load`'s CPU): (batch size, steps, context
        tokens, CPU s, of which in the model call)."""
        return [
            (int(b), int(n), int(ctx), float(c), float(f))
            for b, (n, ctx, c, f) in run_cpu["decode_pass_cpu"]["decode"].items()
        ]

    def load(wl: Workload) -> tuple[list[Request], list[Any], dict[str, Any], dict[str, Stretch]]:
        """Run `wl`: (what was sent, as simulator requests; per-request metrics; the run's CPU: machine-wide
        use by whom (bench.cpu), each instance's stretch (its step thread's run-queue wait over its time on
        a CPU) and its step thread's CPU seconds; each instance's stretch per window of about
        `STRETCH_WINDOW_S`, on the requests' clock)."""
        reqs = make_requests(wl, source)
        passes_before = {role: pass_cpu(role) for role in ("prefill", "decode")}
        before = {role: schedstat_ns(pid(role)) for role in ("prefill", "decode")}
        procs = {r: pid(r) for r in ("prefill", "decode", "coordinator")} | {"bench": os.getpid()}
        if cluster.redis is not None:
            procs["redis"] = cluster.redis.pid
        with CpuMeter(cluster.pids) as meter, SchedSampler(procs, STRETCH_WINDOW_S) as sampler:
            t_start = time.monotonic()  # the requests' clock starts here (run_load's, within milliseconds)
            records = asyncio.run(run_load(cluster.gateway_address, reqs, request_timeout_s=60, drain_s=60))
            metrics = compute_metrics(records)
        raw_runs.append(
            {
                "name": wl.name,
                "rate": wl.rate,
                "requests": [
                    {
                        "scheduled_s": r.scheduled_s,
                        "sent_s": r.sent_s,
                        "prompt": r.prompt_len,
                        "output": r.output_len,
                        "ok": r.ok,
                        "token_times": r.token_times,
                    }
                    for r in records
                ],
                "sched": [
                    (t, {k: {str(tid): v for tid, v in d.items()} for k, d in m.items()})
                    for t, m in sampler.samples
                ],
            }
        )
        cpu: dict[str, Any] = meter.usage.to_dict() if meter.usage else {}
        windows: dict[str, Stretch] = {}
        for role in ("prefill", "decode"):
            after = schedstat_ns(pid(role))
            # the step thread's CPU per pass kind over the run, as the instance counted it
            cpu[f"{role}_pass_cpu"] = asdict(pass_cpu(role).minus(passes_before[role]))
            cpu[f"{role}_stretch"] = stretch(before[role], after)
            cpu[f"{role}_cpu_s"] = busiest_run_s(before[role], after)
            offset = sampler.samples[0][0] - t_start
            raw_runs[-1]["window_offset_s"] = offset  # the windows on the requests' clock (planner_replay)
            windows[role] = stretch_windows(sampler.samples, role, offset)
            cpu[f"{role}_window_stretch"] = [round(k, 3) for k in windows[role].factors]
        sim = [Request(r.scheduled_s, r.prompt_len, r.output_len) for r in reqs]
        return sim, metrics, cpu, windows

    def observe(wl: Workload, per_window: bool) -> tuple[Any, dict[str, Any]]:
        """Run `wl` as a calibration run: its Observed, with the instances' stretch per window
        (`per_window`) or over the run, and its CPU."""
        sim, metrics, cpu, windows = load(wl)
        by_index = {m.index: m for m in metrics}
        served = [(r, by_index[i]) for i, r in enumerate(sim) if i in by_index and by_index[i].ok]
        return observed(
            [r for r, _ in served],
            [m.ttft_s for _, m in served if m.ttft_s is not None],
            [m.tpot_s for _, m in served if m.tpot_s is not None],
            windows["prefill"] if per_window else cpu["prefill_stretch"],
            windows["decode"] if per_window else cpu["decode_stretch"],
        ), cpu

    try:
        warm_up(cluster.gateway_address, source)
        # isolated: mean-length requests 1.5 s apart (each takes well under that alone); burst: 16 at once
        # (4 prefill passes of 256 tokens, a decode batch of up to 16)
        iso, iso_cpu = observe(
            Workload("isolated", 6, 1 / 1.5, "gamma", cv=1e-3, prompt=Fixed(mean_p), output=Fixed(mean_o)),
            per_window=False,  # its sums are taken as means (calibrate._engine_excess)
        )
        burst, burst_cpu = observe(
            Workload("burst", 16, 1000.0, "gamma", cv=1e-3, prompt=Fixed(mean_p), output=Fixed(mean_o)),
            per_window=True,
        )
        # a burst of STEP_BURST at once: decode batches up to STEP_BURST, as far as a run past the knee grows
        # them, for the decode step's CPU by batch size (calibrate.step_model) and nothing else
        *_, big_cpu, _ = load(
            Workload(
                "burst-steps",
                STEP_BURST,
                1000.0,
                "gamma",
                cv=1e-3,
                prompt=Fixed(mean_p),
                output=Fixed(mean_o),
            )
        )
        memory = min(nd.device_memory_gib for nd in topo.nodes)
        base = SearchInput(
            model,
            engine_profile,
            topo,
            1.0,
            1.0,
            samples,
            n_requests=200,
            pp_choices=(1,),
            prefill_max_batch_tokens=CPU_BATCH_TOKENS,
            local_prefill=local,
        )
        # the decode instance's KV cache as it runs here (the runner's default budget, float32 on CPU), not
        # the topology's memory per core: what back-pressures admission in the cluster measured
        cpu_kv_tokens = DEFAULT_KV_CACHE_BYTES // replace(model, dtype_bytes=4).kv_bytes_per_token
        cap = min(kv_capacity_tokens(base, Layout(1, 1), memory), cpu_kv_tokens)
        # The profile is another process's CPU clock, taken before the cluster started, each point at its own
        # moment: the decode model is refitted on the decode steps the instance counted itself in the three
        # calibration runs, by batch size (its Stats: engine.step_loop.PassCpu; calibrate.step_model), the
        # last burst ramping the batch up to STEP_BURST. Not prefill: that thread also does the KV
        # hand-off's bookkeeping after the first token, which is no part of the TTFT the model predicts.
        prefill_cpu_ratio, decode_batch1_ratio = cpu_scale(
            lat, iso.requests, iso_cpu["prefill_cpu_s"], iso_cpu["decode_cpu_s"], cap, CPU_BATCH_TOKENS
        )
        # the previous model, for comparison: scale * the profile's step + a per-step term, inferred from
        # the step thread's CPU over the isolated run and the burst by simulating them (calibrate.decode_cpu)
        dcpu = decode_cpu(
            lat,
            [
                (iso.requests, iso.prefill_stretch, iso.decode_stretch, iso_cpu["decode_cpu_s"]),
                (burst.requests, burst.prefill_stretch, burst.decode_stretch, burst_cpu["decode_cpu_s"]),
            ],
            cap,
            CPU_BATCH_TOKENS,
            max_running,
            local,
        )

        def calibrated(lat_run: LayoutLatency, counted: bool) -> tuple[Any, LayoutLatency]:
            # the engine profile is CPU-clock time: calibrated with each run's measured stretches taken out;
            # a decode model `counted` on the step thread's CPU (step_model) takes no decode capacity terms
            terms = calibrate(
                lat_run,
                iso,
                burst,
                cap,
                CPU_BATCH_TOKENS,
                local_prefill=local,
                max_running=max_running,
                decode_terms=not counted,
            )
            return terms, apply(lat_run, terms, mean_p)

        _, cal_previous = calibrated(dcpu.apply(lat), counted=False)
        slo_ttft, slo_tpot = 4 * iso.ttft_s, 4 * iso.tpot_s
        base = replace(base, slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot)
        unit = (Layout(1, 1), Layout(1, 1), 1, 1)
        # The rates: around the goodput predicted for this host as it is now (the burst's stretches), not for
        # an idle host: on a shared host the idle-host goodput can be far beyond what the cluster gets
        burst_k = (burst_cpu["prefill_stretch"], burst_cpu["decode_stretch"])  # over the whole burst

        def profile_of(model: LayoutLatency) -> Profile:
            return Profile(
                engine_profile.device, engine_profile.model, (model,), "pdserve profile + calibration"
            )

        def steps_of(runs: list[dict[str, Any]]) -> LayoutLatency:
            """The step model refitted on the decode steps counted in `runs` (their CPU)."""
            return step_model(lat, [row for c in runs for row in step_rows(c)])

        def goodput_now(model: LayoutLatency) -> float:
            """The calibrated `model`'s goodput at the burst's contention (the runs' rates are around it)."""
            now = profile_of(stretched(model, *burst_k))
            return search(replace(base, profile=now, fixed_unit=unit, fixed_units=1)).predicted.goodput_rps

        # The decode steps of a burst run with the prefill core idle once its prompts are done; in a run at a
        # steady rate the prefill instance works beside every step, on the other core of the same caches
        # and memory, and the same batch took 10-15 % more CPU (2026-12-07). So a fourth calibration run at
        # the goodput the bursts predict (another seed than the fidelity runs) adds the steps of the steady
        # state, the decode batch growing as far as that rate takes it, and the model is refitted on all.
        first_goodput = goodput_now(calibrated(steps_of([iso_cpu, burst_cpu, big_cpu]), counted=True)[1])
        steady_sent, _, steady_cpu, steady_win = load(
            Workload("steady", STEADY_REQUESTS, first_goodput, prompt=spec.prompt, output=spec.output, seed=2)
        )
        lat_steps = steps_of([iso_cpu, burst_cpu, big_cpu, steady_cpu])
        # the decode instance's prompt passes (local prefill) in the steady run: passes, tokens, sum of
        # squares, CPU seconds (engine.step_loop.PassCpu)
        lp_passes, lp_tokens, lp_sq, lp_cpu, _ = steady_cpu["decode_pass_cpu"]["prefill"]
        steady_local = int(lp_passes)  # prompts the decode instance prefilled
        local_k = 1.0
        if local is not None:
            # the gateway hears late that a prompt is done: held in flight until the simulated steady run
            # sends as many prompts to local prefill as the real one did (calibrate.local_hold), its local
            # passes as slow as the real ones (calibrate.local_pass_scale)
            _, cal = calibrated(lat_steps, counted=True)
            local_k = local_pass_scale(cal, int(lp_passes), int(lp_tokens), int(lp_sq), lp_cpu)
            hold = local_hold(
                cal,
                steady_sent,
                steady_win["prefill"],
                steady_win["decode"],
                cap,
                CPU_BATCH_TOKENS,
                max_running,
                local,
                steady_local,
                local_k,
            )
            local = replace(local, hold_s=hold)
            base = replace(base, local_prefill=local)
        # the serving terms again, the burst simulated with the hold (calibrate runs the gateway's policy)
        terms, cal = calibrated(lat_steps, counted=True)
        goodput = goodput_now(cal)
        base = replace(base, profile=profile_of(cal))
        if local is not None:
            local_k = local_pass_scale(cal, int(lp_passes), int(lp_tokens), int(lp_sq), lp_cpu)
        plan = search(replace(base, fixed_unit=unit, fixed_units=1))
        uncal = search(replace(base, profile=engine_profile, fixed_unit=unit))
        out.update(
            {
                "isolated_ms": {"ttft": iso.ttft_s * 1e3, "tpot": iso.tpot_s * 1e3},
                "burst_ms": {"ttft": burst.ttft_s * 1e3, "tpot": burst.tpot_s * 1e3},
                "calibration_cpu": {
                    "isolated": iso_cpu,
                    "burst": burst_cpu,
                    "burst_steps": big_cpu,
                    "steady": steady_cpu,
                },
                "steady_calibration_rps": first_goodput,
                "steady_local_prefills": steady_local,
                "local_prefill_hold_ms": None if local is None else local.hold_s * 1e3,
                # the decode instance's local prefill passes over the prefill model (the steady run's)
                "local_pass_scale": local_k,
                "engine_only_ms": {
                    "ttft": lat.prefill_s(mean_p, mean_p * mean_p) * 1e3,
                    "tpot": lat.decode_s(1, mean_p + mean_o / 2) * 1e3,
                },
                "serving_terms": terms.to_dict(),
                "decode_kv_capacity_tokens": cap,
                "decode_max_running": max_running,
                "slo_ms": {"ttft": slo_ttft * 1e3, "tpot": slo_tpot * 1e3},
                "plan": _summary(plan),
                "goodput_engine_only_profile_rps": uncal.predicted.goodput_rps,
                "goodput_idle_host_rps": plan.predicted.goodput_rps,
                "calibration_stretch": {
                    "isolated": [iso_cpu["prefill_stretch"], iso_cpu["decode_stretch"]],
                    "burst": list(burst_k),
                },
                # the decode model refitted on the steps the instance counted (calibrate.step_model):
                # [a (s), b (s per context token), c (s per sequence)] below / from `threshold` sequences
                "decode_step_model": {
                    "small": list(astuple(lat_steps.decode_small)),
                    "large": list(astuple(lat_steps.decode_large)),
                    "threshold": lat_steps.threshold,
                },
                # the previous model (predicted_previous_attainment): scale * the profile's step + per_step_ms
                "decode_cpu": dcpu.to_dict(),
                # the cluster's step-thread CPU over the isolated run / the profile's (calibrate.cpu_scale)
                "cpu_scale": {"decode_batch1": decode_batch1_ratio, "prefill": prefill_cpu_ratio},
                "goodput_at_calibration_contention_rps": goodput,
                "fidelity": [],
                "measured": [],
                # per rate: p50 / p90 of TTFT and TPOT (ms), the simulator's (on the run's own schedule and
                # stretches) beside the client's; the attainment counts both SLOs, these show which one moved
                "distributions_ms": [],
            }
        )

        def step_cpu_over_model(run_cpu: dict[str, Any]) -> float:
            rows = step_rows(run_cpu)
            model = sum(n * lat_steps.decode_s(b, ctx / n) for b, n, ctx, _, _ in rows)
            return sum(c for *_, c, _ in rows) / model if model > 0 else float("nan")

        def run_wl(rate: float) -> Workload:
            return Workload("balanced", n, rate, prompt=spec.prompt, output=spec.output, seed=1)

        def on_schedule(
            sent: list[Request],
            k_prefill: float | Stretch,
            k_decode: float | Stretch,
            policy: LocalPrefill | None = local,
            scale: float = 1.0,
            lat: LayoutLatency | None = None,
        ) -> SimResult:
            """The simulator on a run's own arrivals and lengths, the instances' times (`lat`, default the
            calibrated model) stretched (over the run or per window), and all of them `scale` times longer."""
            model = (cal if lat is None else lat).scaled(scale)
            pre, dec = one_by_one(model, k_prefill, k_decode, cap, CPU_BATCH_TOKENS, max_running, local_k)
            return simulate(sent, pre, dec, [[Link(0.0)]], policy)

        def run_rate(rate: float) -> None:
            """Run the cluster at `rate`, record predicted beside measured."""
            steady = search(replace(base, rate=rate, fixed_unit=unit, fixed_units=1))
            sent, metrics, cpu, windows = load(run_wl(rate))

            measured = attainment(metrics, SLO(slo_ttft, slo_tpot))
            ttfts = sorted(m.ttft_s for m in metrics if m.ok and m.ttft_s is not None)
            tpots = sorted(m.tpot_s for m in metrics if m.ok and m.tpot_s is not None)
            win = (windows["prefill"], windows["decode"])
            # the run's CPU: each instance's times scaled so that its busy seconds in the simulated run are
            # the CPU seconds its step thread measured (calibrate.cpu_matched)
            run_lat, cpu_p, cpu_d = cpu_matched(
                cal,
                sent,
                *win,
                cpu["prefill_cpu_s"],
                cpu["decode_cpu_s"],
                cap,
                CPU_BATCH_TOKENS,
                max_running,
                local,
            )
            pred = on_schedule(sent, *win)
            run_k = (cpu["prefill_stretch"], cpu["decode_stretch"])
            out["fidelity"].append(
                {
                    "rate": rate,
                    "predicted_attainment": pred.attainment(slo_ttft, slo_tpot),
                    "measured_attainment": measured,
                    # how sharp the knee is: the prediction with every time 5 % shorter / longer
                    "predicted_attainment_band_5pct": [
                        on_schedule(sent, *win, scale=x).attainment(slo_ttft, slo_tpot) for x in (1.05, 0.95)
                    ],
                    "stretch": list(run_k),
                    "cpu_factors": [cpu_p, cpu_d],
                    # a diagnostic: the model's times scaled to the CPU the run's step threads used (the
                    # outcome of the very run, so not a prediction)
                    "predicted_cpu_matched_attainment": on_schedule(sent, *win, lat=run_lat).attainment(
                        slo_ttft, slo_tpot
                    ),
                    # the decode steps' CPU the instance counted in this run over what the calibrated model
                    # gives the same steps (batch sizes, contexts): how much faster (< 1) or slower the host
                    # ran them than in the calibration runs, the one input a prediction cannot have
                    "decode_step_cpu_over_model": step_cpu_over_model(cpu),
                    # the previous model: the decode map inferred by simulating the calibration runs
                    "predicted_previous_attainment": on_schedule(sent, *win, lat=cal_previous).attainment(
                        slo_ttft, slo_tpot
                    ),
                    # without the run's CPU, one stretch over the whole run (the second version's model)
                    "predicted_run_stretch_attainment": on_schedule(sent, *run_k).attainment(
                        slo_ttft, slo_tpot
                    ),
                    "foreign_cores": cpu.get("foreign_cores"),
                    "predicted_idle_host_attainment": on_schedule(sent, 1.0, 1.0).attainment(
                        slo_ttft, slo_tpot
                    ),
                    # the same model without the gateway's local prefill (the simulator before it modelled it)
                    "predicted_no_local_prefill_attainment": on_schedule(sent, *win, None).attainment(
                        slo_ttft, slo_tpot
                    ),
                    "predicted_steady_attainment": steady.predicted.attainment,
                }
            )
            out["distributions_ms"].append(
                {
                    "rate": rate,
                    "predicted": _latency_quantiles(
                        pred.ttft_s, [t for t, r in zip(pred.tpot_s, sent, strict=True) if r.output > 1]
                    ),
                    "measured": _latency_quantiles(ttfts, tpots),
                    "predicted_decode_batch_max": pred.decode_batch_max,
                    "predicted_local_prefills": pred.local_prefills,
                    "measured_local_prefills": int(cpu["decode_pass_cpu"]["prefill"][0]),
                    # the decode instance's work, simulated (contention-free) beside counted (its step
                    # thread's CPU): steps run, and seconds busy
                    "predicted_decode_steps": pred.decode_steps[0],
                    "measured_decode_steps": sum(n for _, n, *_ in step_rows(cpu)),
                    "predicted_decode_busy_s": pred.decode_busy_s[0],
                    "measured_decode_cpu_s": cpu["decode_cpu_s"],
                    "predicted_local_prefill_busy_s": pred.decode_pass_busy_s[0],
                    "measured_local_prefill_cpu_s": cpu["decode_pass_cpu"]["prefill"][3],
                }
            )
            out["measured"].append(
                {
                    "rate": rate,
                    "ok": sum(m.ok for m in metrics),
                    "requests": len(metrics),
                    "ttft_p50_ms": 1e3 * statistics.median(ttfts) if ttfts else None,
                    "tpot_p50_ms": 1e3 * statistics.median(tpots) if tpots else None,
                    "cpu": cpu,
                }
            )

        # the rate nearest the goodput first, right after the steady calibration run: at the knee a few % of
        # host speed move attainment by tens of points, and this host's speed drifts over a minute
        for f in sorted(rate_factors, key=lambda f: abs(f - 1.0)):
            run_rate(round(goodput * f, 3))
        for key in ("fidelity", "distributions_ms", "measured"):
            out[key].sort(key=lambda row: row["rate"])
        out["rate_factors"] = list(rate_factors)
    finally:
        cluster.stop()
    out["loadavg_after"] = list(os.getloadavg())
    if raw_path:
        inputs = {
            "engine_profile": profile_json,
            "summary": out,
            "consts": {
                "mean_prompt": mean_p,
                "mean_output": mean_o,
                "max_batch_tokens": CPU_BATCH_TOKENS,
                "max_running": max_running,
                "local_prefill": None if local is None else [local.max_tokens, local.depth],
            },
            "runs": raw_runs,
        }
        Path(raw_path).write_text(json.dumps(inputs))
    out["max_abs_error_points"] = max(
        abs(f["predicted_attainment"] - f["measured_attainment"]) * 100 for f in out["fidelity"]
    )
    for key in (
        "idle_host",
        "steady",
        "no_local_prefill",
        "run_stretch",
        "cpu_matched",
        "previous",
    ):
        out[f"max_abs_error_points_{key}"] = max(
            abs(f[f"predicted_{key}_attainment"] - f["measured_attainment"]) * 100 for f in out["fidelity"]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.report import stop_on_sigterm

    stop_on_sigterm()  # stop the clusters it starts on SIGTERM too
    p = argparse.ArgumentParser(prog="pdserve bench planner", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="write the JSON here instead of stdout")
    p.add_argument("--no-fidelity", action="store_true", help="skip the cluster runs (search figures only)")
    p.add_argument("--raw", default=None, help="write every run's per-request token times and schedstat here")
    p.add_argument(
        "--requests-per-rate",
        type=int,
        default=None,
        help=f"requests per fidelity run (default {QUICK_REQUESTS_PER_RATE}, full {REQUESTS_PER_RATE})",
    )
    p.add_argument(
        "--rate-factors",
        type=lambda v: tuple(float(x) for x in v.split(",")),
        default=RATE_FACTORS,
        help="the fidelity runs' rates, as multiples of the predicted goodput (default 0.6,1.0,1.4)",
    )
    p.add_argument("--log-dir", default="/tmp/pdserve-bench-planner", help="the cluster's process logs")
    a = p.parse_args(argv)
    out = run(a.quick)
    if not a.no_fidelity:
        out["fidelity_run"] = fidelity(a.quick, a.log_dir, a.raw, a.requests_per_rate, a.rate_factors)
        out["fidelity"] = out["fidelity_run"]["fidelity"]
    emit(out, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
