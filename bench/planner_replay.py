"""`python -m bench.planner_replay RAW.json`: replay the fidelity runs of `pdserve bench planner --raw RAW.json`
offline, on the model that run calibrated or on a variant of it, without a cluster.

The raw file holds everything a prediction used: the engine profile, the calibration's results (the refitted
decode model, the serving terms, the gateway's hold, the SLOs, the decode instance's KV capacity), and per
run the requests sent (arrival, prompt and output tokens) with the schedstat readings its stretch windows
come from. Replayed as recorded, each rate's attainment is the run's `predicted_attainment`; the flags change
one input at a time (`--hold-ms`, `--scale`: every instance time that many times longer, `--no-stretch`:
the instances as if alone on their cores), to see what a miss is made of. Prints one JSON object: per rate,
the replayed attainment beside the recorded prediction and measurement, and the simulated decode work.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.planner import stretch_windows
from bench.report import emit
from coordinator.planner.calibrate import ServingTerms, apply, one_by_one
from coordinator.planner.latency import Coeffs, Layout, LayoutLatency
from coordinator.planner.simulator import Link, LocalPrefill, Request, SimResult, Stretch, simulate
from pdserve.plan_cli import profile_from_json


def calibrated_model(raw: dict[str, Any]) -> LayoutLatency:
    """The model the run predicted with: the engine profile's TP1 layout, its decode pieces refitted
    (`decode_step_model`), the serving terms applied at the mean prompt."""
    summary = raw["summary"]
    lat = profile_from_json(raw["engine_profile"]).latency(Layout(1, 1))
    steps = summary["decode_step_model"]
    lat = replace(
        lat,
        decode_small=Coeffs(*steps["small"]),
        decode_large=Coeffs(*steps["large"]),
        threshold=int(steps["threshold"]),
    )
    terms = ServingTerms.from_dict(summary["serving_terms"])
    return apply(lat, terms, raw["consts"]["mean_prompt"])


def windows(run: dict[str, Any], role: str) -> Stretch:
    """`role`'s stretch per window over `run`, on the requests' clock (as the planner computed it)."""
    samples = [
        (t, {name: {int(tid): (int(v[0]), int(v[1])) for tid, v in d.items()} for name, d in m.items()})
        for t, m in run["sched"]
    ]
    return stretch_windows(samples, role, float(run.get("window_offset_s", 0.0)))


def replay_run(
    raw: dict[str, Any],
    run: dict[str, Any],
    lat: LayoutLatency,
    hold_s: float | None = None,
    stretch: bool = True,
) -> SimResult:
    """One recorded run simulated on `lat`, its instances stretched per window as measured (or not)."""
    summary, consts = raw["summary"], raw["consts"]
    requests = [Request(r["scheduled_s"], r["prompt"], r["output"]) for r in run["requests"]]
    k_prefill: float | Stretch = windows(run, "prefill") if stretch else 1.0
    k_decode: float | Stretch = windows(run, "decode") if stretch else 1.0
    pre, dec = one_by_one(
        lat,
        k_prefill,
        k_decode,
        int(summary["decode_kv_capacity_tokens"]),
        int(consts["max_batch_tokens"]),
        int(consts["max_running"]),
        float(summary.get("local_pass_scale", 1.0)),
    )
    local = None
    if consts.get("local_prefill"):
        max_tokens, depth = consts["local_prefill"]
        recorded = summary.get("local_prefill_hold_ms") or 0.0
        local = LocalPrefill(int(max_tokens), int(depth), recorded / 1e3 if hold_s is None else hold_s)
    return simulate(requests, pre, dec, [[Link(0.0)]], local)


def replay(
    raw: dict[str, Any], hold_s: float | None = None, scale: float = 1.0, stretch: bool = True
) -> list[dict[str, Any]]:
    """Every fidelity run of `raw` (the runs named like the workload, after the calibration runs) replayed;
    per rate, in the order they ran."""
    summary = raw["summary"]
    lat = calibrated_model(raw).scaled(scale)
    slo_ttft, slo_tpot = summary["slo_ms"]["ttft"] / 1e3, summary["slo_ms"]["tpot"] / 1e3
    recorded = {round(f["rate"], 6): f for f in summary.get("fidelity", [])}
    out = []
    for run in raw["runs"]:
        f = recorded.get(round(run["rate"], 6))
        if f is None:  # a calibration run
            continue
        res = replay_run(raw, run, lat, hold_s, stretch)
        out.append(
            {
                "rate": run["rate"],
                "replayed_attainment": res.attainment(slo_ttft, slo_tpot),
                "predicted_attainment": f["predicted_attainment"],
                "measured_attainment": f["measured_attainment"],
                "decode_steps": res.decode_steps[0],
                "decode_busy_s": res.decode_busy_s[0],
                "local_prefills": res.local_prefills,
                "decode_batch_max": res.decode_batch_max,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.planner_replay", description=__doc__.split("\n")[0])
    p.add_argument("raw", help="a `pdserve bench planner --raw` file")
    p.add_argument("--hold-ms", type=float, default=None, help="the gateway's hold (default: as calibrated)")
    p.add_argument("--scale", type=float, default=1.0, help="every instance time this many times longer")
    p.add_argument("--no-stretch", action="store_true", help="the instances as if alone on their cores")
    p.add_argument("--json", default=None, help="write the JSON here instead of stdout")
    a = p.parse_args(argv)
    raw = json.loads(Path(a.raw).read_text())
    hold = None if a.hold_ms is None else a.hold_ms / 1e3
    emit({"raw": a.raw, "runs": replay(raw, hold, a.scale, not a.no_stretch)}, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
