"""`pdserve bench engine --tp N[,N..] --pp M[,M..]`: prefill and decode latency of each TP x PP layout.

For every layout (TP1/PP1 always included, as the baseline) on the bench model (`bench.engine.BENCH_MODEL`;
`--quick`: the shipped model, fewer points), each rank on its own CPU core (a layout of W ranks uses the first
W cores this process may use; fewer cores than ranks: oversubscribed, said in the JSON):

* prefill: one prompt of each length in the grid, `runner.prefill` (sampling included), median (and best)
  wall time over the repeats;
* decode step: batches x contexts; the KV of the context is left as the cache holds it (its values do not
  change a step's work), `runner.decode` steps, median (and best) wall time per step;
* all-reduce: the wall time rank 0 spent in TP all-reduces during those passes (waiting for the slower
  rank of its stage included), per pass and as a share of it;
* the planner's latency model fitted to the points (`coordinator.planner.latency`: prefill a + b*sum_len +
  c*sum_len^2, decode a + b*sum_ctx + c*batch, seconds), with the points, so another fit can be made.

Wall clock throughout (several processes): on a shared machine other tenants' load stretches it at random, so
these figures are noisy; compare layouts from one run, not across runs.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from bench.engine import BENCH_MODEL, random_prompts
from coordinator.planner.latency import NO_THRESHOLD, LayoutLatency, fit_decode, fit_prefill
from coordinator.planner.latency import Layout as PlannerLayout
from engine.block_manager import BlockManager
from engine.device import Device
from engine.parallel.layout import Layout
from engine.parallel.runner import ParallelRunner
from engine.params import SamplingParams
from engine.runner import ModelRunner
from engine.sequence import Sequence

BLOCK = 16


def grid(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "prefill_lens": (64, 256, 512),
            "batches": (1, 8),
            "contexts": (128, 512),
            "steps": 4,
            "repeats": 3,
        }
    return {
        "prefill_lens": (64, 128, 256, 512, 1024),
        "batches": (1, 4, 16),
        "contexts": (128, 512, 1024),
        "steps": 8,
        "repeats": 5,
    }


def usable_cores() -> list[int]:
    return (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )


def make_runner(model_dir: str, layout: Layout, cores: list[int], num_blocks: int) -> ModelRunner:
    world = layout.world_size
    mine = tuple(cores[:world]) if len(cores) >= world else tuple(cores)
    if world == 1:
        return ModelRunner(model_dir, Device.cpu(mine[:1]), num_kv_blocks=num_blocks, block_size=BLOCK)
    return ParallelRunner(model_dir, layout, Device.cpu(mine), num_kv_blocks=num_blocks, block_size=BLOCK)


def reduce_s(runner: ModelRunner) -> float:
    return runner.rank0.reduce_s if isinstance(runner, ParallelRunner) else 0.0


def measure_layout(model_dir: str, layout: Layout, cores: list[int], g: dict[str, Any]) -> dict[str, Any]:
    need = max(max(g["prefill_lens"]) + 1, max(g["batches"]) * (max(g["contexts"]) + g["steps"] + 1))
    runner = make_runner(model_dir, layout, cores, -(-need // BLOCK) + max(g["batches"]))
    try:
        vocab = runner.config.vocab_size
        prefill: list[dict[str, Any]] = []
        for n in g["prefill_lens"]:
            bm = BlockManager(runner.kv_cache.num_blocks, BLOCK)
            seq = Sequence("p", random_prompts(1, n, vocab, n)[0], SamplingParams(max_tokens=1))
            seq.blocks = bm.allocate(n + 1)
            times, reduces = [], []
            for _ in range(g["repeats"]):
                seq.num_cached, seq.output_ids = 0, []
                r0, t0 = reduce_s(runner), time.perf_counter()
                runner.prefill([seq])
                times.append(time.perf_counter() - t0)
                reduces.append(reduce_s(runner) - r0)
            prefill.append(_point({"prompt_tokens": n}, times, reduces))
        decode: list[dict[str, Any]] = []
        for b in g["batches"]:
            for ctx in g["contexts"]:
                bm = BlockManager(runner.kv_cache.num_blocks, BLOCK)
                seqs = [
                    Sequence(f"d{i}", p, SamplingParams(max_tokens=g["steps"] + 1))
                    for i, p in enumerate(random_prompts(b, ctx, vocab, b * 1000 + ctx))
                ]
                for s in seqs:
                    s.blocks = bm.allocate(ctx + g["steps"] + 1)
                    s.num_cached = ctx - 1  # the context's KV is "cached": decode feeds the last prompt token
                times, reduces = [], []
                for _ in range(g["steps"]):
                    r0, t0 = reduce_s(runner), time.perf_counter()
                    tokens = runner.decode(seqs)
                    times.append(time.perf_counter() - t0)
                    reduces.append(reduce_s(runner) - r0)
                    for s, t in zip(seqs, tokens, strict=True):
                        s.output_ids.append(t)
                mean_ctx = ctx + (g["steps"] - 1) / 2  # context of the mean step, the new token included
                decode.append(
                    _point({"batch": b, "context": ctx, "sum_ctx": round(b * mean_ctx)}, times, reduces)
                )
    finally:
        if isinstance(runner, ParallelRunner):
            runner.close()
    pc, perr = fit_prefill([([p["prompt_tokens"]], p["ms"] / 1e3) for p in prefill])
    dc, derr = fit_decode([(p["batch"], p["sum_ctx"], p["step_ms"] / 1e3) for p in decode])
    model = LayoutLatency(
        PlannerLayout(layout.tp, layout.pp),
        pc,
        dc,
        dc,
        NO_THRESHOLD,
        fit_error={"prefill": perr, "decode": derr},
    )
    world = layout.world_size
    return {
        "tp": layout.tp,
        "pp": layout.pp,
        "cores": cores[:world] if len(cores) >= world else cores,
        "oversubscribed": len(cores) < world,
        "prefill": prefill,
        "decode": decode,
        "latency_model": model.to_dict(),
    }


def _point(key: dict[str, Any], times: list[float], reduces: list[float]) -> dict[str, Any]:
    ms = statistics.median(times) * 1e3
    ar = statistics.median(reduces) * 1e3
    name = "step_ms" if "batch" in key else "ms"
    best = min(times) * 1e3  # under other tenants' load the best repeat is the steadier figure
    return {
        **key,
        name: ms,
        "best_" + name: best,
        "allreduce_ms": ar,
        "allreduce_share": ar / ms if ms > 0 else 0.0,
    }


def run(tps: list[int], pps: list[int], quick: bool, model_dir: str | None = None) -> dict[str, Any]:
    from engine.synth import cached_random_model, default_model_dir

    model_dir = model_dir or (str(default_model_dir()) if quick else cached_random_model(**BENCH_MODEL))
    layouts = [Layout(1, 1)] + [Layout(t, p) for t in tps for p in pps if (t, p) != (1, 1)]
    cores = usable_cores()
    g = grid(quick)
    results = [measure_layout(model_dir, lay, cores, g) for lay in layouts]
    base = results[0]
    comparison = []
    for r in results[1:]:
        for p, b in zip(r["prefill"], base["prefill"], strict=True):
            if p["prompt_tokens"] == 512:
                comparison.append(
                    {
                        "layout": f"TP{r['tp']}xPP{r['pp']} on {len(r['cores'])} cores vs TP1 on 1 core",
                        "prefill_512_ms": p["ms"],
                        "tp1_prefill_512_ms": b["ms"],
                        "speedup": b["ms"] / p["ms"],
                        "allreduce_share": p["allreduce_share"],
                    }
                )
    reshard = None
    if 2 in tps:  # the KV hand-off a TP2 prefill instance makes to a TP1 decode instance, vs TP1 -> TP1
        from bench.reshard import Settings, measure_reshard

        os.sched_setaffinity(0, cores)  # the layouts pinned this process to their rank 0's core
        reshard = measure_reshard("", Settings.make(quick))  # the shipped model's real KV
    return {
        "bench": "engine-layouts",
        "mode": "quick" if quick else "full",
        "model_dir": model_dir,
        "clock": "wall",
        "grid": g,
        "layouts": results,
        "prefill_512": comparison,
        "reshard": reshard,
        "notes": [
            "wall clock on a shared machine: noisy; compare layouts within one run",
            "allreduce_ms: rank 0's time in TP all-reduces, waiting for the slower rank included",
        ],
    }


def summary(result: dict[str, Any]) -> str:
    lines = [f"engine layouts ({result['mode']}, wall clock: noisy on a shared machine)"]
    for r in result["layouts"]:
        pre = ", ".join(f"{p['prompt_tokens']}: {p['ms']:.0f} ms" for p in r["prefill"])
        dec = ", ".join(f"b{p['batch']}/c{p['context']}: {p['step_ms']:.1f} ms" for p in r["decode"])
        lines.append(f"TP{r['tp']}xPP{r['pp']} cores {r['cores']}: prefill {pre}; decode {dec}")
    for c in result["prefill_512"]:
        lines.append(
            f"{c['layout']}: {c['prefill_512_ms']:.0f} ms vs {c['tp1_prefill_512_ms']:.0f} ms -> "
            f"{c['speedup']:.2f}x (all-reduce {c['allreduce_share']:.0%} of it)"
        )
    if result.get("reshard"):
        from bench.reshard import summary as reshard_summary

        lines.append(reshard_summary(result["reshard"]))
    return "\n".join(lines)
