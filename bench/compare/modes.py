"""The two sizes of the comparison (quick, full): model, workloads, systems, requests per run, goodput search."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bench.compare.systems import DISAGG, DISAGG_COND
from bench.workload import LengthDist, Uniform

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
    n_requests: int  # requests per seed per load run (probe)
    min_requests: int  # ... at least this many at low rates
    max_span_s: float  # ... else fewer, so that one seed's arrivals span at most this long
    # ... and more at high rates, so that one seed's arrivals span at least this many headline-k TTFT SLOs at
    # every probed rate: a backlog past the TTFT SLO has time to build, so a rate above the system's capacity
    # fails (12 requests at 30 req/s span 0.4 s, under a 1.1 s TTFT SLO: until 2026-12-06 quick passed the
    # pure split at 1.5x its prefill capacity and gave 8.9x where the full run gave 3.0x).
    min_span_ttft_slos: float
    max_probes: int  # load runs of the headline-k search
    extra_probes: int  # more load runs allowed for each other k (0: score the headline runs only)
    rel_tol: float  # the search stops once its bracket [highest pass, lowest fail] is this narrow (relative)
    symmetric_probes: int  # load runs of the symmetric-SLO search (workloads with a TTFT scale != 1)
    # contradictions at the headline k run again (`bench.probe.recheck`): pairs of runs per system and workload
    recheck_pairs: int = 1
    seeds: int = 3  # workload seeds per load run (seed, seed + 1, ...), back to back; goodput per seed too
    growth: float = 2.0  # the search's bracketing step (x or / per probe until a pass and a fail)
    only_systems: tuple[str, ...] = ()  # () = every system of `systems(budgets)`; --systems overrides
    ks: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
    # A run during which CPU outside the system under test and the load generator peaked above this many
    # cores in some second is run again (once): see bench.cpu. Measured on quiet full runs: 0.06-0.11 cores on
    # average (idle peers, the machine's daemons), 0.10-0.26 in the busiest second.
    max_foreign_cores: float = 0.5
    load_factor: float = (
        0.4  # start rate = load_factor x a 1-core capacity estimate (measured goodputs: 0.2-0.5)
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
    seeds=3,
    n_requests=40,  # per seed: 120 a probe (80 of one seed until 2026-12-06)
    min_requests=20,
    max_span_s=10.0,
    min_span_ttft_slos=6.0,  # near the knee the 10 s span is ~7 SLOs already; only runs far past it grow
    # bisection to a bracket of <= 10 % (issue 24: the 20 % brackets were as wide as the effects measured):
    # 2-3 probes to bracket at factors of 2, then 4 bisections
    max_probes=8,
    extra_probes=0,  # other k are scored on the headline search's runs
    rel_tol=0.1,
    symmetric_probes=6,  # the same search against the symmetric SLOs, most of its runs cached
)
# The full run's experiment at a lower resolution: the same model, workloads, SLOs, seeds and start rate, so
# its load runs are the full search's first runs (the same schedules at the same rates), but it stops after
# five probes (start, x2 or /2 until bracketed, then bisections: a bracket of <= 15 % in most searches, the
# goodput fitted inside it), without the symmetric-SLO search and the systems no full run found best.
# Until 2026-12-07 quick played two seeds (the full run three) over four probes: a burst in one seed's 32
# requests failed the pure split at 3.02 req/s (0.80) where the full run passed 3.65 (0.91), 2.04x against
# 2.7-3.1x in one hour. Until 2026-12-06 quick ran its own smaller model (6 layers, 384 wide) on its own
# lengths and k: with its faster steps the serving path's ~0.7 ms of CPU per streamed token weighed twice as
# much, and on the same idle host it gave 4.77x / 0.50x where the full run gave 2.99x / 0.81x.
QUICK = replace(
    FULL,
    name="quick",
    max_probes=5,
    rel_tol=0.15,
    symmetric_probes=0,  # the symmetric SLOs are scored on the headline search's runs only
    # The best colocated system of every full run was colocated-2x1core (-chunk128 tying it at best); the
    # one-replica-on-2-cores layouts and the chunked variants are left to full mode (--systems overrides).
    only_systems=(DISAGG, DISAGG_COND, "colocated-2x1core"),
)

# The small bench model and its workloads: `pdserve bench planner`'s cluster and `pdserve plan --workload
# balanced|prefill_heavy` (the compare's quick mode until 2026-12-06). 14 M parameters: decode step ~3.5 ms,
# prefill of 160 tokens ~45 ms on this host.
SMALL_MODEL = {"layers": 6, "hidden": 384, "heads": 6, "kv_heads": 2, "intermediate": 1024}
SMALL_WORKLOADS = (
    WorkloadSpec(
        "prefill_heavy", Uniform(128, 192), Uniform(8, 16), headline_k=3.0, ttft_tpot_ratio=SUMMARIZATION
    ),
    WorkloadSpec("balanced", Uniform(48, 80), Uniform(48, 80), headline_k=4.0),
)
