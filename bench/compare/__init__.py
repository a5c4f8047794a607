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
   open-loop by the same seeded schedules (`bench.workload`, `bench.serving`): a load run at a rate plays
   several seeds' schedules back to back. The goodput search (`bench.goodput.find_goodput`) bisects the rate
   at the workload's headline ``k`` on the attainment pooled over the seeds; goodput is the fitted target
   crossing inside the final bracket, pooled and per seed (the spread). Every load run is scored against
   every ``k`` (runs are cached by rate), so goodput is reported at each ``k``, plus the tightest ``k`` each
   system sustains at a fixed rate (the search's start rate, the same for every system).
4. One JSON object (machine, commit, config, per-rate results) and, with ``--plots``, PNGs.

Modules: `systems` (what is compared, start/stop), `modes` (quick/full), `slos` (model, isolated latencies,
SLOs, plans), `search` (one system on one workload), `orchestrate` (all systems taking turns), `results` (the
JSON, summary, plots), `cli` (arguments, main).
"""

from bench.compare.cli import main
from bench.compare.modes import FULL, QUICK, Mode, WorkloadSpec
from bench.compare.results import vs_best_colocated, workload_result
from bench.compare.search import evaluate
from bench.compare.slos import workload_slos
from bench.compare.systems import DISAGG, DISAGG_COND, System, systems

__all__ = [
    "DISAGG",
    "DISAGG_COND",
    "FULL",
    "QUICK",
    "Mode",
    "System",
    "WorkloadSpec",
    "evaluate",
    "main",
    "systems",
    "vs_best_colocated",
    "workload_result",
    "workload_slos",
]
