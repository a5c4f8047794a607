"""Serving-path calibration (coordinator/planner/calibrate.py): terms recovered from runs made with known ones."""

from __future__ import annotations

import statistics

import pytest

from coordinator.planner.calibrate import (
    Observed,
    ServingTerms,
    apply,
    calibrate,
    observed,
    one_by_one,
    stretched,
)
from coordinator.planner.latency import Coeffs, Layout, LayoutLatency
from coordinator.planner.simulator import (
    DecodeInstance,
    Link,
    LocalPrefill,
    PrefillInstance,
    Request,
    simulate,
)

ENGINE = LayoutLatency(
    Layout(1, 1), Coeffs(0.005, 1e-4, 0.0), Coeffs(0.003, 0.0, 2e-4), Coeffs(0.003, 0.0, 2e-4)
)
CAP = 100_000  # KV tokens of the decode instance
BATCH_TOKENS = 256
PROMPT, OUTPUT = 64, 32


def measure(
    true: ServingTerms, reqs: list[Request], k_prefill: float = 1.0, k_decode: float = 1.0
) -> Observed:
    """What a cluster whose serving path costs `true` would measure (the simulator stands in for it), its
    instances waiting for a core so that their work takes k times longer (and saying so)."""
    lat = stretched(apply(ENGINE, true, PROMPT), k_prefill, k_decode)
    res = simulate(reqs, [PrefillInstance(lat, BATCH_TOKENS)], [DecodeInstance(lat, CAP)], [[Link(0.0)]])
    return observed(reqs, res.ttft_s, res.tpot_s, k_prefill, k_decode)


def isolated() -> list[Request]:
    return [Request(2.0 * i, PROMPT, OUTPUT) for i in range(4)]


def burst() -> list[Request]:
    return [Request(0.001 * i, PROMPT, OUTPUT) for i in range(16)]


@pytest.mark.parametrize(
    "true",
    [
        ServingTerms(0.020, 0.010, 0.001, 0.0005, {}),
        ServingTerms(0.030, 0.0, 0.002, 0.0, {}),  # all latency / all per-step: nothing charged per sequence
        ServingTerms(0.0, 0.015, 0.0, 0.001, {}),  # all capacity
    ],
)
def test_calibration_recovers_the_terms_a_cluster_was_run_with(true: ServingTerms) -> None:
    got = calibrate(ENGINE, measure(true, isolated()), measure(true, burst()), CAP, BATCH_TOKENS)
    assert got.path_s == pytest.approx(true.path_s, abs=2e-4)
    assert got.prefill_per_request_s == pytest.approx(true.prefill_per_request_s, abs=2e-4)
    assert got.step_s == pytest.approx(true.step_s, abs=2e-5)
    assert got.step_per_seq_s == pytest.approx(true.step_per_seq_s, abs=2e-5)
    assert abs(got.residual["ttft"]) < 1e-3 and abs(got.residual["tpot"]) < 1e-4


def test_a_decode_model_counted_on_the_step_thread_takes_no_decode_capacity_terms() -> None:
    """Run with path and prefill terms only (the decode model is what the step thread ran): the prefill
    terms come back as with the decode terms fitted, and none is charged to decode, where the bisection
    would find the same zeros here but on a real cluster charges the waits the stretch already models."""
    true = ServingTerms(0.020, 0.010, 0.0, 0.0, {})
    iso, bur = measure(true, isolated()), measure(true, burst())
    got = calibrate(ENGINE, iso, bur, CAP, BATCH_TOKENS, decode_terms=False)
    assert got.path_s == pytest.approx(true.path_s, abs=2e-4)
    assert got.prefill_per_request_s == pytest.approx(true.prefill_per_request_s, abs=2e-4)
    assert (got.step_s, got.step_per_seq_s) == (0.0, 0.0)
    assert abs(got.residual["ttft"]) < 1e-3 and abs(got.residual["tpot"]) < 1e-4
    # with a per-sequence cost the model does not hold, the burst's TPOT is left as the residual
    slower = ServingTerms(0.020, 0.010, 0.0, 0.0005, {})
    left = calibrate(
        ENGINE, measure(slower, isolated()), measure(slower, burst()), CAP, BATCH_TOKENS, decode_terms=False
    )
    assert (left.step_s, left.step_per_seq_s) == (0.0, 0.0)
    assert left.residual["tpot"] < -1e-3  # simulated below measured


def test_isolated_run_alone_fixes_the_sums_and_the_burst_the_split() -> None:
    """Latency and capacity give the same isolated run; only the burst tells them apart: a latency-only
    path leaves every burst request's TTFT shifted by the same amount, a capacity one queues them."""
    latency_only = ServingTerms(0.02, 0.0, 0.0, 0.0, {})
    capacity_only = ServingTerms(0.0, 0.02, 0.0, 0.0, {})
    iso_l, iso_c = measure(latency_only, isolated()), measure(capacity_only, isolated())
    assert iso_l.ttft_s == pytest.approx(iso_c.ttft_s)
    b_l, b_c = measure(latency_only, burst()), measure(capacity_only, burst())
    assert b_c.ttft_s > b_l.ttft_s + 0.05
    got = calibrate(ENGINE, iso_l, b_l, CAP, BATCH_TOKENS)
    assert got.path_s == pytest.approx(0.02, abs=2e-4) and got.prefill_per_request_s < 2e-4


def test_apply_charges_latency_on_ttft_only() -> None:
    lat = apply(ENGINE, ServingTerms(0.05, 0.0, 0.0, 0.0, {}), PROMPT)
    assert LayoutLatency.from_dict(lat.to_dict()).path_s == 0.05
    reqs = [Request(0.0, PROMPT, OUTPUT)]
    base = simulate(reqs, [PrefillInstance(ENGINE)], [DecodeInstance(ENGINE, CAP)], [[Link(0.0)]])
    shifted = simulate(reqs, [PrefillInstance(lat)], [DecodeInstance(lat, CAP)], [[Link(0.0)]])
    assert shifted.ttft_s[0] == pytest.approx(base.ttft_s[0] + 0.05)
    assert shifted.tpot_s == base.tpot_s
    assert statistics.fmean(shifted.tpot_s) > 0


def test_contention_measured_per_run_is_taken_out_of_the_terms() -> None:
    """Calibration runs whose instances waited for a core (isolated 1.5 x / 1.2 x, burst 3 x / 2 x) give
    the same contention-free terms as runs on cores of their own."""
    true = ServingTerms(0.020, 0.010, 0.001, 0.0005, {})
    iso, bur = measure(true, isolated(), 1.5, 1.2), measure(true, burst(), 3.0, 2.0)
    assert bur.ttft_s > measure(true, burst()).ttft_s  # the stretch is visible in what was measured
    got = calibrate(ENGINE, iso, bur, CAP, BATCH_TOKENS)
    assert got.path_s == pytest.approx(true.path_s, abs=3e-4)
    assert got.prefill_per_request_s == pytest.approx(true.prefill_per_request_s, abs=3e-4)
    assert got.step_per_seq_s == pytest.approx(true.step_per_seq_s, abs=3e-5)
    assert observed(isolated(), [0.1], [0.01], 0.5, 0.9).prefill_stretch == 1.0  # never below 1


def test_a_cluster_prefilling_locally_is_calibrated_with_the_same_policy() -> None:
    """A burst through a gateway that prefills short prompts on the decode instance (LocalPrefill): given the
    policy, calibration recovers the terms the cluster ran with; modelled as if every prompt went to the
    prefill instance, the terms come out wrong (the local passes' stalls land in the per-sequence cost)."""
    true = ServingTerms(0.020, 0.010, 0.001, 0.0005, {})
    policy = LocalPrefill(max_tokens=PROMPT, depth=2)
    lat = apply(ENGINE, true, PROMPT)

    def run(reqs: list[Request]) -> tuple[Observed, int]:
        pre, dec = one_by_one(lat, 1.0, 1.0, CAP, BATCH_TOKENS)
        res = simulate(reqs, pre, dec, [[Link(0.0)]], policy)
        return observed(reqs, res.ttft_s, res.tpot_s), res.local_prefills

    (iso, iso_local), (bur, bur_local) = run(isolated()), run(burst())
    assert iso_local == 0 and bur_local > 0  # isolated requests never find the prefill instance busy
    got = calibrate(ENGINE, iso, bur, CAP, BATCH_TOKENS, local_prefill=policy)
    assert got.path_s == pytest.approx(true.path_s, abs=3e-4)
    assert got.prefill_per_request_s == pytest.approx(true.prefill_per_request_s, abs=3e-4)
    assert got.step_per_seq_s == pytest.approx(true.step_per_seq_s, abs=3e-5)
    blind = calibrate(ENGINE, iso, bur, CAP, BATCH_TOKENS)
    assert (
        abs(blind.step_per_seq_s - true.step_per_seq_s) > 1e-4
        or abs(blind.prefill_per_request_s - true.prefill_per_request_s) > 1e-3
    )
