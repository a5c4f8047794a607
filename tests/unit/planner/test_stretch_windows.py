"""Contention per time window (simulator.Stretch) and the cluster's own CPU per step (calibrate.cpu_scale), on
hand-worked cases."""

from __future__ import annotations

from dataclasses import replace

import pytest

from coordinator.planner.calibrate import (
    CPU_MATCH_BOUNDS,
    cpu_matched,
    cpu_scale,
    mean_factor,
    observed,
    one_by_one,
    stretched,
)
from coordinator.planner.latency import Coeffs, Layout, LayoutLatency
from coordinator.planner.simulator import DecodeInstance, Link, PrefillInstance, Request, Stretch, simulate


def const_latency(prefill_s: float, step_s: float) -> LayoutLatency:
    return LayoutLatency(Layout(1, 1), Coeffs(prefill_s, 0, 0), Coeffs(step_s, 0, 0), Coeffs(step_s, 0, 0))


def test_each_batch_and_step_stretches_by_the_window_it_starts_in() -> None:
    """Prefill 1 s a prompt, decode 0.1 s a step. Prefill windows: x1 until t=1.5, x2 after; decode: x1
    until t=1.3, x3 after. r0 (t=0, 3 tokens): prefill 0-1 (x1), TTFT 1; steps start at 1.0 (x1: ends 1.1)
    and 1.1 (x1: ends 1.2): TPOT 0.1. r1 (t=2, 2 tokens): prefill starts at 2 (x2): ends 4, TTFT 2; its
    step starts at 4 (x3): ends 4.3, TPOT 0.3."""
    reqs = [Request(0.0, 10, 3), Request(2.0, 10, 2)]
    lat = const_latency(1.0, 0.1)
    pre = [PrefillInstance(lat, stretch=Stretch((0.0, 1.5), (1.0, 2.0)))]
    dec = [DecodeInstance(lat, 10_000, stretch=Stretch((0.0, 1.3), (1.0, 3.0)))]
    res = simulate(reqs, pre, dec, [[Link(0.0)]])
    assert res.ttft_s == pytest.approx((1.0, 2.0))
    assert res.tpot_s == pytest.approx((0.1, 0.3))
    # the busy seconds are the model's, contention-free: 2 prefills of 1 s, 3 steps of 0.1 s
    assert res.prefill_busy_s == pytest.approx((2.0,))
    assert res.decode_busy_s == pytest.approx((0.3,))


def test_stretch_lookup_before_between_and_after_windows() -> None:
    s = Stretch((1.0, 2.0), (1.5, 3.0))
    assert [s.at(t) for t in (0.0, 1.0, 1.99, 2.0, 50.0)] == [1.5, 1.5, 1.5, 3.0, 3.0]
    assert s.shifted(-1.0).starts == (0.0, 1.0)
    assert mean_factor(s) == 2.25 and mean_factor(1.2) == 1.2
    with pytest.raises(ValueError):
        Stretch((2.0, 1.0), (1.0, 1.0))
    with pytest.raises(ValueError):
        Stretch((), ())


def test_one_window_is_the_run_mean_model() -> None:
    """A Stretch with one window gives what one factor over the run gives (one_by_one either way)."""
    lat = LayoutLatency(
        Layout(1, 1),
        Coeffs(0.01, 1e-4, 0.0),
        Coeffs(0.003, 0.0, 2e-4),
        Coeffs(0.003, 0.0, 2e-4),
        path_s=0.005,
    )
    reqs = [Request(0.01 * i, 64, 16) for i in range(20)]
    a = simulate(reqs, *one_by_one(lat, 1.7, 1.3, 100_000, 256), [[Link(0.0)]])
    b = simulate(
        reqs, *one_by_one(lat, Stretch((0.0,), (1.7,)), Stretch((0.0,), (1.3,)), 100_000, 256), [[Link(0.0)]]
    )
    assert b.ttft_s == pytest.approx(a.ttft_s) and b.tpot_s == pytest.approx(a.tpot_s)


def test_observed_moves_windows_onto_the_requests_clock() -> None:
    """observed() starts the requests at 0; a window measured on the run's clock moves with them."""
    reqs = [Request(5.0, 10, 2), Request(6.0, 10, 2)]
    o = observed(reqs, [0.1, 0.1], [0.01, 0.01], Stretch((4.0, 5.5), (1.0, 2.0)), 1.3)
    assert o.requests[0].arrival_s == 0.0
    assert isinstance(o.prefill_stretch, Stretch) and o.prefill_stretch.starts == (-1.0, 0.5)
    assert o.decode_stretch == 1.3


def test_cpu_scale_is_measured_cpu_over_the_models_busy_seconds() -> None:
    """Isolated requests (never overlapping): 3 prompts of 1 s prefill each = 3 s; outputs of 11 tokens = 10
    steps of 0.1 s each, 3 s in all. Step threads measured 3.6 s (prefill) and 2.4 s (decode): 1.2 and 0.8."""
    reqs = [Request(10.0 * i, 10, 11) for i in range(3)]
    kp, kd = cpu_scale(const_latency(1.0, 0.1), reqs, 3.6, 2.4, 10_000, 256)
    assert (kp, kd) == pytest.approx((1.2, 0.8))
    with pytest.raises(ValueError):
        cpu_scale(const_latency(1.0, 0.1), reqs, 0.0, 2.4, 10_000, 256)


def test_cpu_matched_scales_each_instance_to_its_measured_cpu() -> None:
    """Isolated requests (batches do not depend on the times): 3 prefills of 1 s and 30 steps of 0.1 s, 3 s
    each contention-free. Measured CPU 4.5 s and 2.7 s: factors 1.5 and 0.9; TTFT 1.5 s (+ the unscaled
    path latency 0.2 s), TPOT 0.09 s; with the decode stretched x2 over the run, TPOT 0.18 s and the same
    factors (the busy seconds are contention-free)."""
    reqs = [Request(10.0 * i, 10, 11) for i in range(3)]
    lat = replace(const_latency(1.0, 0.1), path_s=0.2)
    got, fp, fd = cpu_matched(lat, reqs, 1.0, 1.0, 4.5, 2.7, 10_000, 256)
    assert (fp, fd) == pytest.approx((1.5, 0.9))
    assert got.path_s == 0.2
    res = simulate(reqs, *one_by_one(got, 1.0, 1.0, 10_000, 256), [[Link(0.0)]])
    assert res.ttft_s == pytest.approx((1.7,) * 3) and res.tpot_s == pytest.approx((0.09,) * 3)
    got2, fp2, fd2 = cpu_matched(lat, reqs, 1.0, 2.0, 4.5, 2.7, 10_000, 256)
    assert (fp2, fd2) == pytest.approx((1.5, 0.9))
    res2 = simulate(reqs, *one_by_one(got2, 1.0, 2.0, 10_000, 256), [[Link(0.0)]])
    assert res2.tpot_s == pytest.approx((0.18,) * 3)


def test_cpu_matched_converges_where_batching_depends_on_the_times() -> None:
    """A burst: slower steps form bigger batches (fewer steps), so the busy seconds are not linear in the
    factors. CPU figures made by a run with factors 1.3 (prefill) and 0.8 (decode) give those factors back;
    a CPU figure no factor in bounds reaches ends at the bound."""
    lat = LayoutLatency(
        Layout(1, 1), Coeffs(0.01, 1e-4, 0.0), Coeffs(0.003, 0.0, 2e-4), Coeffs(0.003, 0.0, 2e-4)
    )
    reqs = [Request(0.002 * i, 64, 32) for i in range(40)]
    made = simulate(reqs, *one_by_one(stretched(lat, 1.3, 0.8), 1.0, 1.0, 100_000, 256), [[Link(0.0)]])
    assert (
        made.decode_batch_max
        < simulate(reqs, *one_by_one(lat, 1.0, 1.0, 100_000, 256), [[Link(0.0)]]).decode_batch_max
    )
    _, fp, fd = cpu_matched(lat, reqs, 1.0, 1.0, made.prefill_busy_s[0], made.decode_busy_s[0], 100_000, 256)
    assert (fp, fd) == pytest.approx((1.3, 0.8), rel=0.02)
    _, _, fd_low = cpu_matched(lat, reqs, 1.0, 1.0, made.prefill_busy_s[0], 0.01, 100_000, 256)
    assert fd_low == CPU_MATCH_BOUNDS[0]
