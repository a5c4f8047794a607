"""The decode step thread's CPU per step as scale * the engine model's step + a per-step term
(calibrate.DecodeCpu, fit_decode_cpu, decode_cpu), and the simulator's step counts, on hand-worked cases."""

from __future__ import annotations

from dataclasses import astuple

import pytest

from coordinator.planner.calibrate import DecodeCpu, decode_cpu, fit_decode_cpu, one_by_one, step_model
from coordinator.planner.latency import Coeffs, Layout, LayoutLatency
from coordinator.planner.simulator import (
    DecodeInstance,
    Link,
    LocalPrefill,
    PrefillInstance,
    Request,
    simulate,
)


def step_latency(prefill_s: float, a: float, per_seq: float) -> LayoutLatency:
    """Prefill `prefill_s` a batch; a decode step of B sequences a + per_seq * B."""
    d = Coeffs(a, 0.0, per_seq)
    return LayoutLatency(Layout(1, 1), Coeffs(prefill_s, 0.0, 0.0), d, d)


def test_two_runs_fix_the_scale_and_the_per_step_term() -> None:
    """Run 1: 100 model steps of 4 ms (0.4 s), measured 0.5 s CPU: 5 ms a step. Run 2: 50 steps of 20 ms (1 s),
    measured 0.9 s: 18 ms a step. 5 = 4 s + o and 18 = 20 s + o: s = 13 / 16 = 0.8125, o = 1.75 ms."""
    got = fit_decode_cpu([(0.4, 100, 0.5), (1.0, 50, 0.9)])
    assert got.scale == pytest.approx(0.8125)
    assert got.per_step_s == pytest.approx(0.00175)
    assert got.to_dict() == pytest.approx({"scale": 0.8125, "per_step_ms": 1.75})


def test_a_negative_per_step_term_falls_back_to_one_scale_through_the_origin() -> None:
    """5 ms / 4 ms and 30 ms / 20 ms a step: the line through them has o = -3 ms < 0, so o = 0 and the scale
    is the least squares through the origin, each point weighted by its steps: (100*4*5 + 50*20*30) /
    (100*4^2 + 50*20^2) = 32000 / 21600. One run alone: its ratio (0.5 / 0.4 = 1.25)."""
    got = fit_decode_cpu([(0.4, 100, 0.5), (1.0, 50, 1.5)])
    assert got.per_step_s == 0.0
    assert got.scale == pytest.approx(32000 / 21600)
    one = fit_decode_cpu([(0.4, 100, 0.5)])
    assert (one.scale, one.per_step_s) == (pytest.approx(1.25), 0.0)
    with pytest.raises(ValueError):
        fit_decode_cpu([(0.0, 0, 0.5)])


def test_step_model_refits_each_piece_on_the_steps_an_instance_counted() -> None:
    """The profile: below 16 sequences a step is 4 ms + 0.01 ms per context token + 1 ms per sequence, from
    16 on 6 ms + 0.01 ms/token + 0.5 ms/sequence. The instance counted, below 16: 100 steps of 1 sequence over
    10,000 context tokens (100 a step) on 0.36 s (3.6 ms a step) and 10 of 9 over 9,000 (900 a step) on
    0.164 s (16.4 ms). Less the profile's 0.01 ms a context token (1 ms, 9 ms): 2.6 and 7.4 ms = 2 ms + 0.6 ms
    * B. From 16: 20 steps of 32 only (64,000 tokens: model 6 + 32 + 16 = 54 ms) on 1.188 s (59.4 ms): one
    batch size fixes no line, so that piece is the profile's times 1.1."""
    small, large = Coeffs(0.004, 1e-5, 0.001), Coeffs(0.006, 1e-5, 0.0005)
    lat = LayoutLatency(Layout(1, 1), Coeffs(1.0, 0.0, 0.0), small, large, threshold=16)
    rows = [
        (1, 100, 10_000, 0.36, 0.3),
        (9, 10, 9_000, 0.164, 0.15),
        (32, 20, 64_000, 1.188, 1.1),
        (3, 0, 0, 0.0, 0.0),  # no steps: no point
    ]
    got = step_model(lat, rows)
    assert astuple(got.decode_small) == pytest.approx((0.002, 1e-5, 0.0006))
    assert astuple(got.decode_large) == pytest.approx((0.0066, 1.1e-5, 0.00055))
    assert got.prefill == lat.prefill and got.threshold == 16
    assert got.decode_s(9, 900) == pytest.approx(0.0164)
    # weighted by steps: a batch size seen once moves the line less than one seen 100 times
    noisy = step_model(lat, [*rows, (5, 1, 500, 0.05, 0.04)])
    heavy = step_model(lat, [*rows, (5, 100, 50_000, 5.0, 4.0)])
    assert abs(noisy.decode_small.c - 0.0006) < abs(heavy.decode_small.c - 0.0006)
    # a piece with no steps is the profile's
    assert step_model(lat, rows[:2]).decode_large == large
    with pytest.raises(ValueError):
        step_model(lat, [(3, 0, 0, 0.0, 0.0)])


def test_step_model_moves_the_split_to_a_jump_in_the_counted_steps() -> None:
    """The profile splits at 16; the instance counted steps of 4 ms + 0.3 ms per sequence up to 48 sequences
    and of 12 ms + 0.3 ms from 52 (a kernel switch after 48 rows; no context term). Two pieces split right
    after 48 fit every point exactly, the split at 16 does not: the split moves to 49, and a step of 49 costs
    12 + 14.7 ms. On one line the squared error of every split is ~0, and the profile's split stays."""
    line = Coeffs(0.004, 0.0, 0.0003)
    lat = LayoutLatency(Layout(1, 1), Coeffs(1.0, 0.0, 0.0), line, line, threshold=16)

    def rows(jump_s: float) -> list[tuple[int, int, int, float, float]]:
        return [
            (b, 10, 0, 10 * (0.004 + 0.0003 * b + (jump_s if b > 48 else 0.0)), 0.0)
            for b in (4, 8, 16, 32, 48, 52, 60)
        ]

    got = step_model(lat, rows(0.008))
    assert got.threshold == 49
    assert got.decode_s(48, 0) == pytest.approx(0.004 + 0.0003 * 48)
    assert got.decode_s(49, 0) == pytest.approx(0.012 + 0.0003 * 49)
    assert astuple(got.decode_large) == pytest.approx((0.012, 0.0, 0.0003))
    assert step_model(lat, rows(0.0)).threshold == 16


def test_apply_maps_decode_steps_only() -> None:
    """a' = a s + o, per-token and per-sequence terms times s; prefill (local passes too) unchanged."""
    small, large = Coeffs(0.004, 1e-6, 0.001), Coeffs(0.006, 2e-6, 5e-4)
    lat = LayoutLatency(Layout(1, 1), Coeffs(1.0, 2.0, 3.0), small, large, threshold=16)
    got = DecodeCpu(0.5, 0.002).apply(lat)
    assert got.prefill == lat.prefill
    assert astuple(got.decode_small) == pytest.approx((0.004, 5e-7, 5e-4))
    assert astuple(got.decode_large) == pytest.approx((0.005, 1e-6, 2.5e-4))
    # at batch 1 the step is 0.5 * 5 ms + 2 ms = 4.5 ms (x 0.9 of the model); at batch 40 (the large piece)
    # 0.5 * 26 + 2 = 15 ms (x 0.58): a per-step cost measured at batch 1 is not charged to every sequence of a large batch
    assert got.decode_s(1, 0) == pytest.approx(0.0045)
    assert got.decode_s(40, 0) == pytest.approx(0.015)


def test_simulator_counts_decode_steps_and_local_pass_seconds() -> None:
    """One prefill instance (1 s a prompt), a decode instance (steps of 0.1 s, passes of 1 s). r0 (t=0, 3
    tokens) prefills there: first token at 1. r1 (t=0.5, 2 tokens) finds the prefill instance at depth 1 and
    goes local: a pass at 0.5-1.5 on the decode instance (no decode step with it: nothing runs yet), first
    token at 1.5. r0's KV is ready at 1 but waits for the pass; then one step of both (1.5-1.6, r1 done)
    and one of r0 (1.6-1.7): 2 steps, 1 s of passes, 1.2 s busy; r0's TPOT (1.7 - 1) / 2."""
    lat = step_latency(1.0, 0.1, 0.0)
    reqs = [Request(0.0, 10, 3), Request(0.5, 10, 2)]
    res = simulate(
        reqs, [PrefillInstance(lat)], [DecodeInstance(lat, 10_000)], [[Link(0.0)]], LocalPrefill(128, 1)
    )
    assert res.local_prefills == 1
    assert res.decode_pass_busy_s == pytest.approx((1.0,))
    assert res.decode_steps == (2,)
    assert res.decode_busy_s == pytest.approx((1.2,))
    assert res.ttft_s == pytest.approx((1.0, 1.0))
    assert res.tpot_s == pytest.approx((0.35, 0.1))


def test_decode_cpu_from_an_isolated_run_and_a_burst() -> None:
    """CPU figures made by a cluster whose step costs 0.8 * the model + 1 ms (the model: 3 ms + 1 ms a
    sequence) give (0.8, 1 ms) back: the isolated run has only batch-1 steps (4 ms model, 4.2 ms CPU), the
    burst of 20 steps of up to 20 sequences."""
    lat = step_latency(0.01, 0.003, 0.001)
    truth = DecodeCpu(0.8, 0.001)
    iso = [Request(1.0 * i, 16, 11) for i in range(4)]
    burst = [Request(0.0, 16, 21) for _ in range(20)]
    runs = []
    for reqs in (iso, burst):
        res = simulate(reqs, *one_by_one(truth.apply(lat), 1.0, 1.0, 100_000, 256), [[Link(0.0)]])
        runs.append((reqs, 1.0, 1.0, res.decode_busy_s[0]))
    assert runs[0][3] == pytest.approx(40 * 0.0042)
    got = decode_cpu(lat, runs, 100_000, 256)
    assert got.scale == pytest.approx(0.8, rel=1e-6)
    assert got.per_step_s == pytest.approx(0.001, rel=1e-6)
