"""The comparison's scoring on synthetic records: per-request minimal SLO scale, tightest k, goodput from
cached runs; and `pdserve bench` dispatch."""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from typing import Any

import pytest

from bench.compare import (
    DISAGG,
    DISAGG_COND,
    FULL,
    QUICK,
    WorkloadSpec,
    evaluate,
    vs_best_colocated,
    workload_slos,
)
from bench.cpu import CpuUsage
from bench.metrics import SLO, RequestRecord, attainment, compute_metrics
from bench.probe import Prober, Run, Turns, goodput_from_runs, min_k_per_request, refine_goodput, tightest_k
from bench.workload import Uniform, Workload
from pdserve.cli import main as pdserve_main


def _record(i: int, ttft: float, gap: float, n: int = 5, ok: bool = True) -> RequestRecord:
    rec = RequestRecord(i, scheduled_s=0.0, prompt_len=8, output_len=n)
    rec.token_times = [ttft + j * gap for j in range(n)]
    if not ok:
        rec.fail("UNAVAILABLE: gone")
    return rec


def test_min_k_is_the_binding_bound() -> None:
    # isolated prefill 0.1 s, decode step 0.01 s
    recs = [_record(0, 0.2, 0.01), _record(1, 0.1, 0.05), _record(2, 0.1, 0.01, ok=False)]
    assert min_k_per_request(recs, 0.1, 0.01) == pytest.approx([2.0, 5.0, math.inf])


def test_tightest_k_is_the_90th_percentile_of_per_request_k() -> None:
    recs = [_record(i, 0.1 * (i + 1), 0.01) for i in range(10)]  # k_i = 1, 2, ..., 10
    assert tightest_k(recs, 0.1, 0.01) == pytest.approx(9.0)
    recs[8].fail("timeout")
    recs[9].fail("timeout")  # 2 of 10 failed: no k reaches 90%
    assert tightest_k(recs, 0.1, 0.01) is None


def test_goodput_from_runs_needs_every_lower_rate_to_pass() -> None:
    good = [_record(i, 0.1, 0.01) for i in range(10)]
    bad = [_record(i, 1.0, 0.01) for i in range(10)]
    slo = SLO(0.5, 0.02)
    assert goodput_from_runs([Run(1.0, good), Run(2.0, good), Run(4.0, bad)], slo) == 2.0
    assert goodput_from_runs([Run(1.0, bad), Run(2.0, good)], slo) == 0.0
    assert goodput_from_runs([], slo) == 0.0


def test_pdserve_bench_rejects_unknown_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("no_such_bench", "../etc"):
        with pytest.raises(SystemExit) as exc:
            pdserve_main(["bench", name])
        assert exc.value.code == 2
    assert "no benchmark named" in capsys.readouterr().err


class FakeProber:
    """Stands in for bench.probe.Prober: runs whose requests all meet a 0.5 s TTFT SLO up to `knee` req/s,
    and none above."""

    ttft_s = (0.1, 1.0)  # time to first token at rates up to the knee, and above it
    seeds: tuple[int, ...] = (0,)

    def __init__(self, knee: float, rates: list[float]) -> None:
        self.knee = knee
        self.runs: dict[float, Run] = {}
        self.new: list[float] = []
        for r in rates:
            self.run(r)
        self.new.clear()

    def run(self, rate: float) -> Run:
        if rate not in self.runs:
            self.new.append(rate)
            ttft = self.ttft_s[0] if rate <= self.knee else self.ttft_s[1]
            self.runs[rate] = Run(rate, [_record(i, ttft, 0.01) for i in range(10)])
        return self.runs[rate]


@pytest.mark.parametrize(
    "knee, rates, budget, expect_new",
    [
        (10.0, [1.0, 2.0], 2, [4.0, 8.0]),  # every run passes: keep doubling
        (0.1, [1.0, 2.0], 1, []),  # none passes: never below the lowest run
        (1.4, [1.0, 2.0], 3, [1.5, 1.25]),  # bracketed: bisect until rel_tol (0.25) is reached
    ],
)
def test_refine_goodput_continues_the_search_within_budget(
    knee: float, rates: list[float], budget: int, expect_new: list[float]
) -> None:

    prober = FakeProber(knee, rates)
    refine_goodput(prober, SLO(0.5, 0.02), budget, rel_tol=0.25)  # type: ignore[arg-type]  # a fake Prober
    assert prober.new == expect_new


def test_turns_rotate_reversing_each_round_and_survive_leaving() -> None:
    turns = Turns(["a", "b", "c"])
    order: list[str] = []

    def worker(name: str, n: int) -> None:
        for _ in range(n):
            with turns.turn(name):
                order.append(name)
        turns.leave(name)

    threads = [threading.Thread(target=worker, args=(n, k)) for n, k in (("a", 3), ("b", 1), ("c", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads), f"deadlock after {order}"
    assert order == ["a", "b", "c", "c", "a", "a", "c"]


def test_workload_slos_scale_ttft_by_the_applications_ratio() -> None:
    ks = [1.5, 2.0]
    # summarization-shaped: TTFT:TPOT = 100; isolated prefill 0.25 s, decode step 0.008 s -> s = 3.2
    spec = WorkloadSpec("ph", Uniform(8, 8), Uniform(4, 4), headline_k=2.0, ttft_tpot_ratio=100.0)
    scale, slos, symmetric = workload_slos(spec, 0.25, 0.008, ks)
    assert scale == pytest.approx(3.2)
    assert slos[2.0].ttft_s == pytest.approx(1.6) and slos[2.0].tpot_s == pytest.approx(0.016)
    assert slos[2.0].ttft_s / slos[2.0].tpot_s == pytest.approx(100.0)
    assert symmetric is not None
    assert symmetric[1.5].ttft_s == pytest.approx(0.375) and symmetric[1.5].tpot_s == pytest.approx(0.012)
    # no ratio: both latencies scale alike, nothing symmetric to add
    plain = WorkloadSpec("b", Uniform(8, 8), Uniform(4, 4), headline_k=4.0)
    scale, slos, symmetric = workload_slos(plain, 0.25, 0.008, ks)
    assert (scale, symmetric) == (1.0, None)
    assert slos[2.0].ttft_s == pytest.approx(0.5)
    # a ratio that would put TTFT under the isolated prefill is clipped to s = 1
    scale, slos, symmetric = workload_slos(replace(spec, ttft_tpot_ratio=10.0), 0.25, 0.008, ks)
    assert (scale, symmetric) == (1.0, None)


def test_a_plan_can_take_an_earlier_runs_isolated_latencies(monkeypatch: pytest.MonkeyPatch) -> None:
    # --isolated-from: nothing is measured, and the SLOs and start rate are those the latencies give
    import bench.compare.slos as slos_mod

    def no_measuring(*a: Any, **k: Any) -> None:
        raise AssertionError("measured the isolated latencies")

    monkeypatch.setattr(slos_mod, "measure_isolated", no_measuring)
    spec = WorkloadSpec("b", Uniform(8, 8), Uniform(4, 4), headline_k=4.0)
    iso = {"prefill_s": 0.04, "decode_step_s": 0.009, "slo_prefill_s": 0.05, "slo_decode_step_s": 0.01}
    plan = slos_mod.plan_workload(spec, QUICK, "unused", 0, [1, 2, 3], 0, isolated=iso)
    assert plan.isolated is iso
    assert plan.slos[4.0].ttft_s == pytest.approx(0.2) and plan.slos[4.0].tpot_s == pytest.approx(0.04)
    # a 1-core capacity estimate: prefill + 4 output tokens at a batch of 8
    assert plan.start_rate == float(f"{QUICK.load_factor / (0.05 + 4 * 0.01 / 8):.3g}")


def test_vs_best_colocated_ratio_and_lower_bound() -> None:
    sysres = {
        DISAGG: {"runs": [{"rate": 1.0}], "devices": 2},
        "colocated-a": {"runs": [{"rate": 0.5}, {"rate": 1.0}], "devices": 2},
        "colocated-b": {"runs": [{"rate": 0.8}], "devices": 2},
    }
    assert vs_best_colocated({DISAGG: 1.5, "colocated-a": 0.5, "colocated-b": 0.6}, sysres) == (
        "colocated-b",
        pytest.approx(2.5),
        None,
    )
    # no colocated system passed its lowest run: the ratio is only bounded, by the highest lowest run (0.4/dev)
    best, ratio, bound = vs_best_colocated({DISAGG: 1.5, "colocated-a": 0.0, "colocated-b": 0.0}, sysres)
    assert ratio is None and bound == pytest.approx(1.5 / 0.4)
    assert vs_best_colocated({DISAGG: 0.0, "colocated-a": 0.0}, sysres)[1:] == (None, None)


def test_vs_best_colocated_never_counts_a_disaggregated_system_as_colocated() -> None:
    sysres = {
        DISAGG: {"runs": [{"rate": 1.0}], "devices": 2},
        DISAGG_COND: {"runs": [{"rate": 1.0}], "devices": 2},
        "colocated-a": {"runs": [{"rate": 0.5}], "devices": 2},
    }
    per_device = {DISAGG: 0.5, DISAGG_COND: 2.0, "colocated-a": 1.0}
    # the conditional system's 2.0 is not "the best colocated": the pure split is compared with colocated-a
    assert vs_best_colocated(per_device, sysres) == ("colocated-a", pytest.approx(0.5), None)
    assert vs_best_colocated(per_device, sysres, DISAGG_COND) == ("colocated-a", pytest.approx(2.0), None)


class SloProber(FakeProber):
    """Every request takes 0.3 s to its first token up to `knee` req/s and 1.0 s above; 10 ms token gaps."""

    ttft_s = (0.3, 1.0)

    def attainment(self, rate: float, slo: SLO) -> float:
        return attainment(compute_metrics(self.run(rate).records), slo)


def test_evaluate_searches_the_symmetric_slos_on_their_own() -> None:
    # the workload's SLO at k=2 (TTFT 2.0 s) passes every rate; the symmetric one (TTFT 0.2 s) passes none,
    # so its search halves below the start rate, and both goodputs come out of one set of cached runs
    slos = {2.0: SLO(2.0, 0.02)}
    symmetric = {2.0: SLO(0.2, 0.02)}
    iso = {"prefill_s": 0.1, "decode_step_s": 0.01, "prompt_len": 8}
    mode = replace(QUICK, max_probes=2, symmetric_probes=3)
    prober = SloProber(knee=0.5, rates=[])
    out = evaluate(prober, iso, slos, 2.0, 1.0, mode, symmetric_slos=symmetric)  # type: ignore[arg-type]  # a fake Prober
    assert out["goodput"]["2"]["rate"] == 2.0  # 1.0 and 2.0 pass the loose TTFT
    assert [p["rate"] for p in out["symmetric_search"]["probes"]] == [1.0, 0.5, 0.25]
    assert out["goodput_symmetric"]["2"] == 0.0  # 0.3 s > 0.2 s at every rate
    assert out["tightest_k_at_fixed_rate"] == pytest.approx(1.0)  # TTFT 1.0 s over the k=1 TTFT 1.0 s
    # no symmetric probes: scored on the headline runs only
    prober = SloProber(knee=0.5, rates=[])
    out = evaluate(prober, iso, slos, 2.0, 1.0, replace(mode, symmetric_probes=0), symmetric_slos=symmetric)  # type: ignore[arg-type]  # a fake Prober
    assert out["symmetric_search"] is None and sorted(prober.runs) == [1.0, 2.0]


class OutlierProber(SloProber):
    """SloProber (knee 3.0) whose first run at `outlier` req/s fails every request (a disturbed run); with
    `persistent`, so does every run there. `rerun` as bench.probe.Prober's."""

    def __init__(self, outlier: float, persistent: bool = False) -> None:
        self.name = "outlier"
        self.outlier, self.persistent = outlier, persistent
        super().__init__(knee=3.0, rates=[])

    def run(self, rate: float) -> Run:
        if rate not in self.runs:
            bad = rate == self.outlier and (self.persistent or not any(r == rate for r in self.new))
            self.new.append(rate)
            ttft = self.ttft_s[1] if bad or rate > self.knee else self.ttft_s[0]
            self.runs[rate] = Run(rate, [_record(i, ttft, 0.01) for i in range(10)])
        return self.runs[rate]

    rerun = Prober.rerun


@pytest.mark.parametrize("persistent", [False, True])
def test_evaluate_runs_a_contradicting_pair_again_before_scoring(persistent: bool) -> None:
    # headline search from 1.0 (TTFT SLO 0.5 s, knee 3.0): 1.0, 2.0 pass, 4.0 fails, 3.0 passes; the symmetric
    # search (TTFT 0.2 s: fails everything) halves to 0.5 and 0.25, and the outlier at 0.5 fails its first
    # run at the headline SLO too: 0.5 (fail) and 3.0 (the highest pass above it) contradict and are run
    # again. A one-off outlier is gone after its rerun; a persistent one stands and bounds the goodput.
    iso = {"prefill_s": 0.1, "decode_step_s": 0.01, "prompt_len": 8}
    mode = replace(QUICK, max_probes=4, rel_tol=0.4, growth=2.0, symmetric_probes=3)
    prober = OutlierProber(outlier=0.5, persistent=persistent)
    slos, symmetric = {2.0: SLO(0.5, 0.02)}, {2.0: SLO(0.2, 0.02)}
    out = evaluate(prober, iso, slos, 2.0, 1.0, mode, symmetric_slos=symmetric)  # type: ignore[arg-type]  # a fake Prober
    assert out["rechecked_rates"] == [0.5, 3.0]
    assert prober.new == [1.0, 2.0, 4.0, 3.0, 0.5, 0.25, 0.5, 3.0]
    # fitted between the highest pass and the next rate: 3.0 (1.0) -> 4.0 (0.0), or 0.25 (1.0) -> 0.5 (0.0)
    assert out["goodput"]["2"]["rate"] == pytest.approx(0.275 if persistent else 3.1)
    by_rate = {r["rate"]: r for r in out["runs"]}

    def replaced(rate: float) -> list[float]:
        return [old["at_headline_k"]["attainment"] for old in by_rate[rate]["replaced_contradicting_runs"]]

    assert replaced(0.5) == [0.0] and replaced(3.0) == [1.0] and replaced(2.0) == []


def test_evaluate_leaves_monotone_runs_alone() -> None:
    prober = OutlierProber(outlier=-1.0)
    iso = {"prefill_s": 0.1, "decode_step_s": 0.01, "prompt_len": 8}
    mode = replace(QUICK, max_probes=4, rel_tol=0.4, growth=2.0, symmetric_probes=0)
    out = evaluate(prober, iso, {2.0: SLO(0.5, 0.02)}, 2.0, 1.0, mode)  # type: ignore[arg-type]  # a fake Prober
    assert out["rechecked_rates"] == [] and prober.new == [1.0, 2.0, 4.0, 3.0]


class ScriptedProber(Prober):
    """A prober whose load runs report scripted foreign CPU peaks (the run itself is not what is tested)."""

    def __init__(self, peaks: list[float], **kw: Any) -> None:
        super().__init__(
            "sys",
            "127.0.0.1:1",
            Workload("w", n_requests=4, rate=1.0),
            list(range(100)),
            timeout_s=1,
            max_span_s=10,
            min_requests=1,
            **kw,
        )
        self.peaks = peaks
        self.loads = 0

    def _load(self, rate: float, reqs: list) -> Run:
        peak = self.peaks[self.loads]
        self.loads += 1
        usage = CpuUsage(1.0, 1.0, 0.1, 0.0, peak, 0.0, foreign_peak_cores=peak)
        return Run(rate, [_record(i, 0.1, 0.01) for i in range(len(reqs))], usage)


@pytest.mark.parametrize(
    "peaks, loads, kept_peak, discarded",
    [
        ([0.1], 1, 0.1, []),  # quiet: one run
        ([0.9, 0.2], 2, 0.2, [0.9]),  # disturbed, then quiet: the quiet run is kept
        ([0.9, 0.8, 0.1], 2, 0.8, [0.9]),  # disturbed twice: one rerun only, the last run kept
    ],
)
def test_a_disturbed_run_is_run_again_once(
    peaks: list[float], loads: int, kept_peak: float, discarded: list[float]
) -> None:
    prober = ScriptedProber(peaks, max_foreign_cores=0.5, reruns=1)
    run = prober.run(2.0)
    assert prober.loads == loads
    assert run.cpu is not None and run.cpu.foreign_peak_cores == kept_peak
    assert [u.foreign_peak_cores for u in run.discarded] == discarded
    assert prober.run(2.0) is run and prober.loads == loads  # cached: no new load


class SeededProber(SloProber):
    """Two seeds per run: seed s's requests all meet a 0.5 s TTFT SLO up to knees[s] req/s, none above."""

    seeds = (0, 1)

    def __init__(self, knees: dict[int, float]) -> None:
        self.knees = knees
        super().__init__(knee=0.0, rates=[])

    def run(self, rate: float) -> Run:
        if rate not in self.runs:
            self.new.append(rate)
            records: list[RequestRecord] = []
            seed_of: list[int] = []
            for seed in self.seeds:
                ttft = self.ttft_s[0] if rate <= self.knees[seed] else self.ttft_s[1]
                records += [_record(len(records) + i, ttft, 0.01) for i in range(10)]
                seed_of += [seed] * 10
            self.runs[rate] = Run(rate, records, seed_of=seed_of)
        return self.runs[rate]


def _evaluate_seeded(knees: dict[int, float]) -> dict:
    iso = {"prefill_s": 0.1, "decode_step_s": 0.01, "prompt_len": 8}
    mode = replace(QUICK, max_probes=4, rel_tol=0.25, growth=2.0)
    return evaluate(SeededProber(knees), iso, {2.0: SLO(0.5, 0.02)}, 2.0, 1.0, mode)  # type: ignore[arg-type]  # a fake Prober


def test_evaluate_fits_goodput_pooled_and_per_seed() -> None:
    # worked by hand: 1.0 passes for both seeds (pooled 1.0); 2.0, 1.5, 1.25 fail seed 1 (pooled 0.5)
    out = _evaluate_seeded({0: 2.0, 1: 1.0})
    g = out["goodput"]["2"]
    assert [p["rate"] for p in g["search"]["probes"]] == [1.0, 2.0, 1.5, 1.25]
    assert g["bracket"] == {"lo": 1.0, "hi": 1.25, "rel_width": pytest.approx(0.25)}
    assert g["rate"] == pytest.approx(1.0 + 0.1 / 0.5 * 0.25)  # the pooled line 1.0 -> 0.5 crosses 0.9
    assert g["by_seed"]["0"] == 2.0  # seed 0 passes every run
    assert g["by_seed"]["1"] == pytest.approx(1.0 + 0.1 / 1.0 * 0.25)
    assert [r["attainment_by_seed"] for r in out["runs"]][1] == {"0": 1.0, "1": 0.0}  # at 1.25


def test_workload_result_reports_the_ratio_per_seed_and_its_spread() -> None:
    from bench.compare import workload_result
    from bench.compare.slos import Plan

    sysres = {
        DISAGG: {"devices": 2, "config": {}, **_evaluate_seeded({0: 2.0, 1: 1.0})},
        "colocated-a": {"devices": 2, "config": {}, **_evaluate_seeded({0: 1.0, 1: 1.0})},
    }
    spec = WorkloadSpec("w", Uniform(8, 8), Uniform(4, 4), headline_k=2.0)
    plan = Plan(spec, Workload("w", 10, 1.0), {}, {2.0: SLO(0.5, 0.02)}, 1.0, None, 1.0, 5.0, (0, 1))
    w = workload_result(plan, sysres)
    # colocated-a: seed 0 and 1 both fail 1.25 -> 1.025 pooled and per seed
    assert w["goodput_per_device"]["colocated-a"] == pytest.approx(1.025 / 2)
    assert w["goodput_ratio_vs_best_colocated"] == pytest.approx(1.05 / 1.025)
    assert w["goodput_ratio_by_seed"] == {"0": pytest.approx(2.0 / 1.025), "1": pytest.approx(1.0)}
    spread = w["goodput_ratio_spread"]
    assert (spread["min"], spread["max"], spread["n"]) == (pytest.approx(1.0), pytest.approx(2.0 / 1.025), 2)
    assert w["bracket_rel_width"] == {DISAGG: pytest.approx(0.25), "colocated-a": pytest.approx(0.25)}


def test_a_run_plays_every_seed_and_keeps_their_records_apart() -> None:
    prober = ScriptedProber([0.1], seeds=(3, 4))
    run = prober.run(2.0)
    assert len(run.records) == 8 and run.seed_of == [3] * 4 + [4] * 4  # 4 requests per seed
    assert run.records_of(4) == run.records[4:] and run.records_of(None) == run.records


def test_command_line_overrides_of_the_mode() -> None:
    from bench.compare.cli import mode_from_args, parse_args

    assert FULL.rel_tol <= 0.1  # issue 24: brackets <= 10 %
    # quick is the full experiment at a lower resolution (so that it agrees with it): same model, workloads,
    # seeds and start rate, so its runs are the full search's first runs
    same = ("model", "workloads", "load_factor", "seeds", "growth", "n_requests", "min_span_ttft_slos")
    assert [getattr(QUICK, f) for f in same] == [getattr(FULL, f) for f in same]
    assert QUICK.max_probes < FULL.max_probes and QUICK.rel_tol > FULL.rel_tol
    mode = mode_from_args(parse_args(["--quick", "--seeds", "3", "--n-requests", "5", "--max-probes", "3"]))
    assert (mode.seeds, mode.n_requests, mode.min_requests, mode.max_probes) == (3, 5, 5, 3)
    with pytest.raises(SystemExit):
        mode_from_args(parse_args(["--seeds", "0"]))


class CountingProber(Prober):
    """A prober that records how many requests each load run sends (the run itself is not what is tested)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(
            "sys", "127.0.0.1:1", Workload("w", n_requests=12, rate=1.0), list(range(100)), timeout_s=1, **kw
        )
        self.sent: dict[float, int] = {}

    def _load(self, rate: float, reqs: list) -> Run:
        self.sent[rate] = len(reqs)
        return Run(rate, [_record(i, 0.1, 0.01) for i in range(len(reqs))], None)


def test_a_run_spans_at_least_min_span_s_at_high_rates_and_at_most_max_span_s_at_low_ones() -> None:
    prober = CountingProber(max_span_s=2.0, min_requests=8, min_span_s=6.5)
    for rate in (1.0, 5.0, 30.0):
        prober.run(rate)
    # 1 req/s: 2 s span -> 2, raised to min_requests 8 (8 s > 6.5 s); 5 req/s: 10 capped... and 12 span 2.4 s,
    # under 6.5 s -> ceil(32.5) = 33; 30 req/s: ceil(195) = 195 (12 would span 0.4 s)
    assert prober.sent == {1.0: 8, 5.0: 33, 30.0: 195}
    unbounded = CountingProber(max_span_s=2.0, min_requests=8)  # no floor: at most n_requests
    unbounded.run(30.0)
    assert unbounded.sent == {30.0: 12}


def test_sigterm_unwinds_a_benchmark_like_ctrl_c() -> None:
    """A killed benchmark must run its `finally` blocks (which stop the clusters it started)."""
    import os
    import signal

    from bench.report import stop_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    stopped = []
    try:
        stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode
            finally:
                stopped.append(True)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stopped == [True]


def test_isolated_latencies_are_the_best_and_the_median_over_every_block(tiny_model_dir: Any) -> None:
    import os

    from bench.compare.slos import BATCH_STEPS, DECODE_BATCHES, measure_isolated

    cpu = min(os.sched_getaffinity(0))
    iso = measure_isolated(
        str(tiny_model_dir), cpu, list(range(1, 200)), prompt_len=32, context_len=40, blocks=2
    )
    assert len(iso["blocks"]) == 2  # each block its own prefills and decode run
    assert iso["prefill_s"] == min(b["prefill_s"] for b in iso["blocks"])
    assert iso["decode_step_s"] == min(b["decode_step_s"] for b in iso["blocks"])
    # the SLOs scale with the medians over every block (8 prefills and 36 steps each), never below the best
    assert (
        0 < iso["prefill_s"] <= iso["slo_prefill_s"] and 0 < iso["decode_step_s"] <= iso["slo_decode_step_s"]
    )
    assert (iso["prompt_len"], iso["context_len"], iso["cpu"]) == (32, 40, cpu)
    # the decode step by batch size (the ideal split's model): batch 1 from the 36 steps a block above, each
    # other batch BATCH_STEPS a block, its sequences' contexts averaging about the workload's mean context
    by_batch = iso["decode_by_batch"]
    assert sorted(map(int, by_batch)) == [1, *DECODE_BATCHES]
    assert by_batch["1"]["steps"] == 2 * 36 and by_batch["1"]["median_s"] == iso["slo_decode_step_s"]
    for b in DECODE_BATCHES:
        point = by_batch[str(b)]
        assert point["steps"] == 2 * BATCH_STEPS and 0 < point["best_s"] <= point["median_s"]
        assert 0.75 * 40 <= point["mean_context"] <= 1.25 * 40, point
    assert by_batch["48"]["median_s"] > by_batch["1"]["median_s"]  # 48 sequences cost more than one


def _ideal_iso(prefill_s: float, median_s: float, step_s: float) -> dict[str, Any]:
    """An isolated measurement of 128-token prompts and steps of `step_s` + 1 ms a sequence."""
    return {
        "prefill_s": prefill_s,
        "slo_prefill_s": median_s,
        "prompt_len": 128,
        "decode_by_batch": {
            str(b): {"median_s": step_s + 0.001 * b, "best_s": step_s + 0.001 * b} for b in (1, 8, 16, 32, 48)
        },
    }


def test_ideal_bounds_price_the_pool_at_the_best_and_the_median_and_the_split_at_the_median() -> None:
    """20 prompts 1/r apart, TTFT SLO 0.25 s, one prefill server: prompt i waits i * (t - 1/r), so 18 of 20
    (0.9) pass up to 1/r = t - 0.15 / 17 (t = 0.1: r = 10.97) or, priced at the median, t - 0.125 / 17
    (t = 0.125: r = 8.50)."""
    from bench.compare.search import ideal_bounds
    from bench.ideal import IdealSplit, ideal_split_latency
    from bench.workload import BenchRequest

    def schedule(rate: float) -> list[BenchRequest]:
        return [BenchRequest(i, i / rate, (1,) * 128, 11) for i in range(20)]

    iso = _ideal_iso(0.1, 0.125, 0.01)
    lat = ideal_split_latency(iso)
    assert lat is not None
    slos = {2.0: SLO(0.25, 0.05)}
    pool, split = ideal_bounds(schedule, slos, iso, 1.0, 1, IdealSplit(lat, 1 << 16, 64))
    assert pool is not None and split is not None
    assert pool["goodput_by_k"]["2"] == pytest.approx(1 / (0.1 - 0.15 / 17), rel=0.01)
    assert pool["goodput_by_k_at_median"]["2"] == pytest.approx(1 / (0.125 - 0.125 / 17), rel=0.01)
    # the split's prefill is the median pool; its decode side only takes requests away
    assert 0 < split["goodput_by_k"]["2"] <= pool["goodput_by_k_at_median"]["2"] * 1.005
    assert split["latency"]["prefill"][1] == pytest.approx(0.125 / 128)
    assert ideal_bounds(schedule, slos, iso, 1.0, 0, None) == (None, None)  # a colocated system


def test_workload_result_reports_the_shares_of_each_ideal_at_the_start_and_at_the_end() -> None:
    from bench.compare import workload_result
    from bench.compare.slos import Plan

    def bound(rate: float) -> dict[str, Any]:
        return {"goodput_by_k": {"2": rate}, "goodput_by_k_at_median": {"2": rate / 2}}

    disagg = _evaluate_seeded({0: 2.0, 1: 1.0})  # goodput 1.05 req/s (pooled)
    disagg |= {"ideal_prefill_pool": bound(2.1), "ideal_split": {"goodput_by_k": {"2": 1.4}}}
    disagg["ideal_at_end"] = {"ideal_prefill_pool": bound(4.2), "ideal_split": {"goodput_by_k": {"2": 2.1}}}
    sysres = {
        DISAGG: {"devices": 2, "config": {}, **disagg},
        "colocated-a": {"devices": 2, "config": {}, **_evaluate_seeded({0: 1.0, 1: 1.0})},
    }
    spec = WorkloadSpec("w", Uniform(8, 8), Uniform(4, 4), headline_k=2.0)
    plan = Plan(spec, Workload("w", 10, 1.0), {}, {2.0: SLO(0.5, 0.02)}, 1.0, None, 1.0, 5.0, (0, 1))
    w = workload_result(plan, sysres)
    assert w["disagg_share_of_ideal_prefill_pool"] == pytest.approx(1.05 / 2.1)
    assert w["disagg_share_of_ideal_prefill_pool_at_median"] == pytest.approx(1.05 / 1.05)
    assert w["disagg_ideal_split_goodput_per_device"] == pytest.approx(0.7)
    assert w["disagg_share_of_ideal_split"] == pytest.approx(0.75)
    assert w["disagg_share_of_ideal_at_end"] == {
        "prefill_pool": pytest.approx(0.25),
        "prefill_pool_at_median": pytest.approx(0.5),
        "split": pytest.approx(0.5),
    }
    del sysres[DISAGG]["ideal_at_end"]  # quick mode measures no end
    assert workload_result(plan, sysres)["disagg_share_of_ideal_at_end"] is None
