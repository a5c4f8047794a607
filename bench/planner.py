"""`pdserve bench planner [--quick]`: the planner's search time and its reproduction of DistServe's example.

Prints one JSON object:
* `search_s_4x8`: wall seconds of one search (the slower of the two; `search_cpu_s_4x8` its CPU seconds, which
  on this shared machine is what an idle core would take) (the slower of the two; `search_cpu_s_4x8` its CPU seconds, which
  on this shared machine is what an idle core would take) over 4 nodes x 8 A100-80GB (DistServe's OPT-13B A100 profile,
  300 GB/s in a node; two runs: 3.1 GB/s between nodes (DistServe's 25 Gbps low-affinity cluster) and
  100 GB/s), with the plans found.
* `distserve_opt13b_1x4`: DistServe's single-node example (simdistserve/README.md: OPT-13B, 1 node x 4 A100
  80GB, TTFT 200 ms, TPOT 100 ms, 90 %): the plan and per-GPU goodput we find, DistServe's reported
  configuration and per-GPU rate beside it, and our simulator's per-GPU goodput for DistServe's configuration.
  Their workload is ShareGPT; with no dataset here we use `sharegpt-approx` (log-normal lengths), so the
  numbers differ by the workload as well as by the model (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.report import emit
from coordinator.planner.distserve import SHIPPED, profile_from_distserve
from coordinator.planner.latency import Layout
from coordinator.planner.model import OPT_13B_CONFIG, spec_from_config
from coordinator.planner.search import SearchInput, search
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


def fidelity(quick: bool, log_dir: str) -> dict[str, Any]:
    """Predicted vs measured SLO attainment on this machine. Profile the quick bench model here (TP1, one
    core: the engine's forward passes only), start a 1P1D cluster on this machine's two cores (the only plan
    the local topology holds), and calibrate: isolated requests (one at a time) measure what the serving path
    adds to TTFT and to each decode step (gateway, gRPC streams, KV hand-off, scheduling), which is added to
    the profile per prompt token (prefill) and per sequence per step (decode). SLOs are 4x the isolated TTFT and TPOT (the compare bench's balanced k = 4).
    Then plan with the calibrated profile and run the cluster at 0.6, 1.0 and 1.4 x its predicted goodput."""
    import asyncio
    import logging
    import os
    import statistics
    from dataclasses import replace

    import numpy as np

    from bench.compare.modes import QUICK
    from bench.compare.slos import bench_model, prompt_source
    from bench.compare.systems import warm_up
    from bench.metrics import SLO, attainment, compute_metrics
    from bench.serving import run_load
    from bench.workload import Fixed, Workload, make_requests
    from coordinator.planner.latency import Coeffs, Profile
    from coordinator.planner.model import spec_from_config
    from pdserve.launcher import ClusterConfig, LocalCluster
    from pdserve.plan_cli import local_topology, profile_from_json, run_profile

    logging.getLogger("bench.probe").setLevel(logging.WARNING)
    model_dir, tok = bench_model(QUICK.model)
    source, _ = prompt_source(model_dir, tok)
    engine_profile = profile_from_json(run_profile(model_dir, threads=1, new_tokens=10, tries=3))
    lat = engine_profile.latency(Layout(1, 1))
    spec = next(w for w in QUICK.workloads if w.name == "balanced")
    rng = np.random.default_rng(0)
    samples = tuple(
        (int(p), int(o))
        for p, o in zip(spec.prompt.sample(rng, 500), spec.output.sample(rng, 500), strict=True)
    )
    mean_p = round(sum(p for p, _ in samples) / len(samples))
    mean_o = round(sum(o for _, o in samples) / len(samples))
    topo = local_topology()
    model = spec_from_config(json.loads((Path(model_dir) / "config.json").read_text()))
    n = 40 if quick else 120
    out: dict[str, Any] = {"model": QUICK.model, "profile_fit_error": lat.fit_error, "requests_per_rate": n}
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
    cluster = LocalCluster(cfg).start(timeout_s=180)

    def load(wl: Workload) -> list[Any]:
        reqs = make_requests(wl, source)
        return compute_metrics(
            asyncio.run(run_load(cluster.gateway_address, reqs, request_timeout_s=60, drain_s=60))
        )

    try:
        warm_up(cluster.gateway_address, source)
        # isolated: mean-length requests 1.5 s apart (each takes well under that alone)
        iso = load(
            Workload("isolated", 6, 1 / 1.5, "gamma", cv=1e-3, prompt=Fixed(mean_p), output=Fixed(mean_o))
        )
        iso_ttft = statistics.median(m.ttft_s for m in iso if m.ok)
        iso_tpot = statistics.median(m.tpot_s for m in iso if m.ok)
        add_ttft = max(0.0, iso_ttft - lat.prefill_s(mean_p, mean_p * mean_p))
        add_step = max(0.0, iso_tpot - lat.decode_s(1, mean_p + mean_o / 2))

        # The serving path's cost is per request and per token on these shared cores, not per batch: it is
        # charged per prompt token (prefill b) and per sequence per step (decode c), so batching does not
        # amortise it.
        p0, ds, dl = lat.prefill, lat.decode_small, lat.decode_large
        cal = replace(
            lat,
            prefill=Coeffs(p0.a, p0.b + add_ttft / mean_p, p0.c),
            decode_small=Coeffs(ds.a, ds.b, ds.c + add_step),
            decode_large=Coeffs(dl.a, dl.b, dl.c + add_step),
        )
        profile = Profile(
            engine_profile.device, engine_profile.model, (cal,), "pdserve profile + calibration"
        )
        slo_ttft, slo_tpot = 4 * iso_ttft, 4 * iso_tpot
        base = SearchInput(model, profile, topo, slo_ttft, slo_tpot, samples, n_requests=200, pp_choices=(1,))
        plan = search(replace(base, fixed_unit=(Layout(1, 1), Layout(1, 1), 1, 1), fixed_units=1))
        uncal = search(replace(base, profile=engine_profile, fixed_unit=(Layout(1, 1), Layout(1, 1), 1, 1)))
        goodput = plan.predicted.goodput_rps
        out.update(
            {
                "isolated_ms": {"ttft": iso_ttft * 1e3, "tpot": iso_tpot * 1e3},
                "engine_only_ms": {
                    "ttft": lat.prefill_s(mean_p, mean_p * mean_p) * 1e3,
                    "tpot": lat.decode_s(1, mean_p + mean_o / 2) * 1e3,
                },
                "serving_path_added_ms": {"ttft": add_ttft * 1e3, "per_decode_step": add_step * 1e3},
                "slo_ms": {"ttft": slo_ttft * 1e3, "tpot": slo_tpot * 1e3},
                "plan": _summary(plan),
                "goodput_engine_only_profile_rps": uncal.predicted.goodput_rps,
                "fidelity": [],
                "measured": [],
            }
        )
        for rate in [round(goodput * f, 3) for f in (0.6, 1.0, 1.4)]:
            predicted = search(
                replace(base, rate=rate, fixed_unit=(Layout(1, 1), Layout(1, 1), 1, 1), fixed_units=1)
            )
            metrics = load(Workload("balanced", n, rate, prompt=spec.prompt, output=spec.output, seed=1))
            measured = attainment(metrics, SLO(slo_ttft, slo_tpot))
            ttfts = sorted(m.ttft_s for m in metrics if m.ok and m.ttft_s is not None)
            tpots = sorted(m.tpot_s for m in metrics if m.ok and m.tpot_s is not None)
            out["fidelity"].append(
                {
                    "rate": rate,
                    "predicted_attainment": predicted.predicted.attainment,
                    "measured_attainment": measured,
                }
            )
            out["measured"].append(
                {
                    "rate": rate,
                    "ok": sum(m.ok for m in metrics),
                    "requests": len(metrics),
                    "ttft_p50_ms": 1e3 * ttfts[len(ttfts) // 2] if ttfts else None,
                    "tpot_p50_ms": 1e3 * tpots[len(tpots) // 2] if tpots else None,
                }
            )
    finally:
        cluster.stop()
    out["max_abs_error_points"] = max(
        abs(f["predicted_attainment"] - f["measured_attainment"]) * 100 for f in out["fidelity"]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve bench planner", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="write the JSON here instead of stdout")
    p.add_argument("--no-fidelity", action="store_true", help="skip the cluster runs (search figures only)")
    p.add_argument("--log-dir", default="/tmp/pdserve-bench-planner", help="the cluster's process logs")
    a = p.parse_args(argv)
    out = run(a.quick)
    if not a.no_fidelity:
        out["fidelity_run"] = fidelity(a.quick, a.log_dir)
        out["fidelity"] = out["fidelity_run"]["fidelity"]
    emit(out, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
