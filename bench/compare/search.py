"""One system on one workload: the goodput search at the headline k over pooled seeds, every run scored against
every k and every seed, the tightest k at the fixed rate, the ideal prefill pool's bound."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from bench.compare.modes import Mode
from bench.goodput import GoodputResult, bracket_rel_width, find_goodput, passing_bracket
from bench.ideal import IdealSplit, Scheduled, ideal_goodput, ideal_ttft_attainment
from bench.metrics import SLO, attainment, compute_metrics, summarize_records
from bench.probe import (
    TARGET,
    Prober,
    Run,
    attainment_by_rate,
    fitted_from_runs,
    recheck,
    refine_goodput,
    tightest_k,
)


def _compact(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("n_requests", "n_ok", "n_failed", "errors", "attainment", "attainment_ttft", "attainment_tpot")
    out = {k: summary[k] for k in keep}
    for key in ("ttft_s", "tpot_s", "tbt_s"):
        out[key] = {q: summary[key][q] for q in ("p50", "p90", "p99")}
    out["request_throughput"] = summary["request_throughput"]
    out["output_token_throughput"] = summary["output_token_throughput"]
    return out


def score_run(
    run: Run,
    slos: dict[float, SLO],
    headline_k: float,
    seeds: tuple[int, ...],
    base: tuple[float, float],
    iso: dict,
    prefill_servers: int,
    ideal_split: IdealSplit | None = None,
) -> dict[str, Any]:
    """One load run in the JSON: attainment at every k and per seed (headline k), the tightest k (the SLO
    at k = 1 is `base`), a summary at the headline k, the CPU use, and the ideal prefill pool's and ideal
    split's attainment on the run's schedule."""
    entry = {
        "rate": run.rate,
        "attainment_by_k": {f"{k:g}": attainment(compute_metrics(run.records), s) for k, s in slos.items()},
        "attainment_by_seed": {
            str(seed): attainment(compute_metrics(run.records_of(seed)), slos[headline_k]) for seed in seeds
        },
        "tightest_k": tightest_k(run.records, *base),
        "at_headline_k": _compact(summarize_records(run.records, slos[headline_k])),
        "cpu": run.cpu.to_dict() if run.cpu else None,
        "discarded_disturbed_runs": [u.to_dict() for u in run.discarded],
        "replaced_contradicting_runs": [
            {
                "at_headline_k": _compact(summarize_records(old.records, slos[headline_k])),
                "cpu": old.cpu.to_dict() if old.cpu else None,
            }
            for old in run.replaced
        ],
    }
    if prefill_servers:
        entry["ideal_prefill_ttft_attainment_by_k"] = {
            f"{k:g}": ideal_ttft_attainment(
                run.records, s.ttft_s, iso["prefill_s"], iso["prompt_len"], prefill_servers
            )
            for k, s in slos.items()
        }
    if ideal_split is not None:
        entry["ideal_split_attainment_by_k"] = {
            f"{k:g}": ideal_split.attainment(run.records, s) for k, s in slos.items()
        }
    return entry


def ideal_bounds(
    schedule: Callable[[float], Sequence[Scheduled]],
    slos: dict[float, SLO],
    iso: dict,
    start_rate: float,
    prefill_servers: int,
    ideal_split: IdealSplit | None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the ideal prefill pool, the ideal split) of `prefill_servers` prefill instances, each ideal's goodput
    at every k searched on `schedule` (the requests a run at a rate sends), priced at the isolated
    measurement `iso` (the pool at its best and its median prefill; the split as `ideal_split` is made);
    None for an ideal not asked for (no prefill servers, no ideal split)."""

    def pool_goodput(ttft_s: float, prefill_s: float) -> float:
        return ideal_goodput(
            schedule,
            lambda recs: ideal_ttft_attainment(recs, ttft_s, prefill_s, iso["prompt_len"], prefill_servers),
            start_rate,
        )

    pool = split = None
    if prefill_servers:
        pool = {
            "prefill_servers": prefill_servers,
            "goodput_by_k": {f"{k:g}": pool_goodput(s.ttft_s, iso["prefill_s"]) for k, s in slos.items()},
            # the same priced at the isolated median (the SLOs' reference) instead of the best run
            "goodput_by_k_at_median": {
                f"{k:g}": pool_goodput(s.ttft_s, iso["slo_prefill_s"]) for k, s in slos.items()
            },
        }
    if ideal_split is not None:
        split = {
            "prefill_servers": ideal_split.prefill_servers,
            "decode_servers": ideal_split.decode_servers,
            "latency": ideal_split.latency.to_dict(),
            "kv_tokens": ideal_split.kv_tokens,
            "max_running": ideal_split.max_running,
            "goodput_by_k": {
                f"{k:g}": ideal_goodput(schedule, partial(ideal_split.attainment, slo=s), start_rate)
                for k, s in slos.items()
            },
        }
    return pool, split


def evaluate(
    prober: Prober,
    iso: dict,
    slos: dict[float, SLO],
    headline_k: float,
    start_rate: float,
    mode: Mode,
    prefill_servers: int = 0,
    symmetric_slos: dict[float, SLO] | None = None,
    ideal_split: IdealSplit | None = None,
) -> dict[str, Any]:
    """Goodput at the headline k (bisection on the attainment pooled over the prober's seeds), then at every
    other k, and the tightest k at start_rate. Every goodput is the fitted crossing (`fitted_from_runs`), over
    all seeds and over each seed alone (`by_seed`), with the bracket it lies in.
    With `prefill_servers` (a disaggregated system), every run is also scored against the ideal prefill pool
    of that many instances (`bench.ideal`): the TTFT attainment queueing alone allows on the run's schedule;
    with `ideal_split` too, against that ideal split (both SLOs, the decode side included), and each ideal's
    goodput is searched on the schedules runs would send.
    With `symmetric_slos` (a workload whose TTFT scale is not 1), goodput is also found against SLOs that
    scale both isolated latencies alike: a search of its own at the headline k (`mode.symmetric_probes` load
    runs at most, cached runs included; 0: score the other runs only), every k scored on all runs.
    Before scoring, a contradiction among the runs at the headline k (a rate failing below a rate passing)
    is run again (`bench.probe.recheck`, `mode.recheck_pairs`): with every run scored, a single disturbed
    run below the knee would otherwise set every goodput, and a full run (more runs) would be more exposed
    to one than a quick run."""
    base = (slos[headline_k].ttft_s / headline_k, slos[headline_k].tpot_s / headline_k)  # the SLO at k = 1

    def search(slo: SLO, max_probes: int) -> GoodputResult:
        return find_goodput(
            lambda r: prober.attainment(r, slo),
            start_rate=start_rate,
            target=TARGET,
            rel_tol=mode.rel_tol,
            growth=mode.growth,
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
    rechecked = recheck(prober, slos[headline_k], mode.recheck_pairs)
    all_runs = list(prober.runs.values())

    def scored(slo: SLO, searched: GoodputResult | None) -> dict[str, Any]:
        lo, hi = passing_bracket(attainment_by_rate(all_runs, slo), TARGET)
        return {
            "rate": fitted_from_runs(all_runs, slo),
            "bracket": {"lo": lo, "hi": hi, "rel_width": bracket_rel_width(lo, hi)},
            "by_seed": {str(seed): fitted_from_runs(all_runs, slo, seed) for seed in prober.seeds},
            "search": searched.to_dict() if searched else None,
        }

    goodput = {f"{k:g}": scored(slo, res if k == headline_k else None) for k, slo in slos.items()}
    fixed = prober.run(start_rate)
    runs = [
        score_run(run, slos, headline_k, prober.seeds, base, iso, prefill_servers, ideal_split)
        for run in sorted(prober.runs.values(), key=lambda r: r.rate)
    ]

    ideal, split = ideal_bounds(
        lambda rate: prober.schedule(rate)[0], slos, iso, start_rate, prefill_servers, ideal_split
    )
    return {
        "ideal_prefill_pool": ideal,
        "ideal_split": split,
        "goodput": goodput,
        "tightest_k_at_fixed_rate": tightest_k(fixed.records, *base),
        "goodput_symmetric": (
            {f"{k:g}": fitted_from_runs(all_runs, s) for k, s in symmetric_slos.items()}
            if symmetric_slos
            else None
        ),
        "symmetric_search": sym_search,
        "rechecked_rates": rechecked,
        "runs": runs,
    }
