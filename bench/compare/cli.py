"""`pdserve bench compare` / `python -m bench.compare`: arguments, the run, the one JSON object."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.compare.modes import FULL, QUICK, Mode
from bench.compare.orchestrate import ideal_split_of, run_all, schedule_of
from bench.compare.results import human_summary, plot_all, workload_result
from bench.compare.search import ideal_bounds
from bench.compare.slos import bench_model, iso_lens, measure_isolated, plan_workload, prompt_source
from bench.compare.systems import DISAGG, systems
from bench.probe import TARGET
from bench.report import emit, plots_status, stop_on_sigterm

log = logging.getLogger("bench.compare")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="Disaggregated vs colocated serving on the same cores: goodput under derived SLOs.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the full run at a lower resolution: 3 systems, 5 runs per search, 3 seeds per run (~15 min)",
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
    p.add_argument("--seed", type=int, default=0, help="the first workload seed")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="workload seeds per load run (seed, seed+1, ...; default 3): goodput per seed and its spread",
    )
    p.add_argument(
        "--isolated-from",
        default=None,
        metavar="JSON",
        help="take each workload's isolated latencies (so its SLOs and start rate) from an earlier run's JSON "
        "instead of measuring them: an A/B of two codes on a host whose speed drifts",
    )
    return p.parse_args(argv)


def mode_from_args(a: argparse.Namespace) -> Mode:
    """QUICK or FULL with the command line's overrides."""
    mode = QUICK if a.quick else FULL
    if a.n_requests:
        mode = replace(mode, n_requests=a.n_requests, min_requests=min(mode.min_requests, a.n_requests))
    if a.max_span_s:
        mode = replace(mode, max_span_s=a.max_span_s)
    if a.seeds is not None:
        if a.seeds < 1:
            raise SystemExit("--seeds must be >= 1")
        mode = replace(mode, seeds=a.seeds)
    if a.max_probes:
        mode = replace(
            mode, max_probes=a.max_probes, symmetric_probes=a.max_probes if mode.symmetric_probes else 0
        )
    return mode


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stop_on_sigterm()  # stop every started process, as Ctrl-C does
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pdserve.launcher").setLevel(logging.WARNING)
    began = time.monotonic()
    mode = mode_from_args(a)
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
    earlier = json.loads(Path(a.isolated_from).read_text())["workloads"] if a.isolated_from else {}
    missing = [spec.name for spec in specs if a.isolated_from and spec.name not in earlier]
    if missing:
        raise SystemExit(f"{a.isolated_from} has no isolated latencies for {missing}")
    plans = [
        plan_workload(
            spec,
            mode,
            model_dir,
            cpus[0],
            source,
            a.seed,
            earlier[spec.name]["isolated"] if earlier else None,
        )
        for spec in specs
    ]

    load_start = os.getloadavg()
    try:
        per_system, metrics_at_fixed = run_all(chosen, plans, mode, model_dir, cpus, source)
    except KeyboardInterrupt:
        log.warning("interrupted: every started process was stopped; no result")
        return 130
    load_end = os.getloadavg()
    # the same isolated measurement again (full mode): how far the machine drifted during the run
    drift = {
        p.spec.name: measure_isolated(model_dir, cpus[0], source, *iso_lens(p.spec))
        if mode.name == "full"
        else None
        for p in plans
    }

    # the ideals priced again at the end's isolated latencies: the host's drift during the run, in the shares
    disagg = next((s for s in chosen if s.name == DISAGG), None)
    for p in plans:
        end = drift[p.spec.name]
        if end is not None and disagg is not None:
            pool, split = ideal_bounds(
                schedule_of(p, mode, source),
                p.slos,
                end,
                p.start_rate,
                disagg.prefill,
                ideal_split_of(disagg, p, end),
            )
            per_system[p.spec.name][DISAGG]["ideal_at_end"] = {
                "ideal_prefill_pool": pool,
                "ideal_split": split,
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
            "seeds": list(range(a.seed, a.seed + mode.seeds)),
            # the isolated latencies (SLOs, start rate) were this JSON's, not measured (None: measured)
            "isolated_from": a.isolated_from,
            "requests_per_run": {  # per seed; a run plays every seed's schedule, one after another
                "max": mode.n_requests,
                "min": mode.min_requests,
                "max_span_s": mode.max_span_s,
                "min_span_ttft_slos": mode.min_span_ttft_slos,  # at high rates "max" gives way to this
                "seeds": mode.seeds,
            },
            "target_attainment": TARGET,
            "max_foreign_cores": mode.max_foreign_cores,
            "search": {
                "max_probes": mode.max_probes,
                "extra_probes_per_k": mode.extra_probes,
                "symmetric_probes": mode.symmetric_probes,
                "rel_tol": mode.rel_tol,
                "growth": mode.growth,
                "min_rate": "start_rate / 4",
                "goodput": "fitted: the target crossing interpolated between the runs around it",
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
