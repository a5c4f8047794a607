"""Goodput bisection on synthetic monotone attainment curves, and SLO derivation."""

from __future__ import annotations

import json

import pytest

from bench.goodput import (
    GoodputResult,
    Probe,
    bracket_rel_width,
    contradiction,
    derive_slos,
    find_goodput,
    fitted_goodput,
    goodput_per_device,
    goodput_sweep,
    passing_bracket,
    slo_sweep,
)
from bench.metrics import SLO


class Curve:
    """A synthetic attainment curve that records every rate it was asked for."""

    def __init__(self, knee: float) -> None:
        self.knee = knee
        self.calls: list[float] = []

    def __call__(self, rate: float) -> float:
        self.calls.append(rate)
        # 100% up to the knee, then immediately below 90% and falling.
        return 1.0 if rate <= self.knee else max(0.0, 0.89 - 0.1 * (rate - self.knee))


@pytest.mark.parametrize("start", [1.0, 3.7, 0.05, 50.0])
def test_finds_knee_within_tolerance_and_records_probes(start: float) -> None:
    curve = Curve(3.7)
    res = find_goodput(curve, start_rate=start, rel_tol=0.02)
    assert res.converged
    assert 3.7 / 1.02 <= res.rate <= 3.7  # never overstates on a monotone curve
    assert res.hi is not None and res.hi > 3.7 and res.hi - res.rate <= 0.02 * res.rate
    assert [p.rate for p in res.probes] == curve.calls
    assert all(p.passed == (p.attainment >= 0.9) for p in res.probes)
    assert res.probes[0].rate == start
    assert len(res.probes) <= 16


def test_smooth_curve_crossing() -> None:
    # attainment = 1 / (1 + (r/5)^4) equals 0.9 at r = 5 * (1/9)^(1/4).
    truth = 5 * (1 / 9) ** 0.25
    res = find_goodput(lambda r: 1 / (1 + (r / 5) ** 4), rel_tol=0.01, target=0.9)
    assert truth / 1.01 <= res.rate <= truth


def test_on_probe_callback_and_to_dict() -> None:
    seen: list[Probe] = []
    res = find_goodput(Curve(3.7), on_probe=seen.append)
    assert tuple(seen) == res.probes
    d = res.to_dict()
    json.dumps(d)
    assert d["rate"] == res.rate and len(d["probes"]) == len(res.probes)


def test_probe_budget_is_respected() -> None:
    curve = Curve(3.7)
    res = find_goodput(curve, start_rate=1.0, rel_tol=1e-6, max_probes=5)
    assert len(curve.calls) == 5
    assert not res.converged
    assert res.rate <= 3.7


def test_rate_bounds() -> None:
    always = find_goodput(lambda r: 1.0, start_rate=1.0, max_rate=10.0)
    assert always.rate == 10.0 and always.hi is None and always.converged
    never = find_goodput(lambda r: 0.0, start_rate=1.0, min_rate=0.1)
    assert never.rate == 0.0 and never.converged
    assert never.probes[-1].rate == pytest.approx(0.1)
    with pytest.raises(ValueError):
        find_goodput(lambda r: 1.0, start_rate=0.0)
    with pytest.raises(ValueError):
        find_goodput(lambda r: 1.0, rel_tol=0.0)


def test_per_device() -> None:
    assert goodput_per_device(6.0, 3) == 2.0
    res = GoodputResult(rate=4.0, hi=4.1, target=0.9, rel_tol=0.05, converged=True, probes=())
    assert res.per_device(2) == 2.0
    with pytest.raises(ValueError):
        goodput_per_device(1.0, 0)


def test_derive_slos_and_sweep() -> None:
    assert derive_slos(0.2, 0.03, 5) == pytest.approx((1.0, 0.15))
    with pytest.raises(ValueError):
        derive_slos(0.2, 0.0, 5)
    sweep = slo_sweep(0.2, 0.03, [1, 2, 4], min_fluidity=0.9)
    assert [k for k, _ in sweep] == [1, 2, 4]
    slo = sweep[2][1]
    assert (slo.ttft_s, slo.tpot_s, slo.min_fluidity) == (pytest.approx(0.8), pytest.approx(0.12), 0.9)


def test_goodput_sweep_over_slo_scale() -> None:
    # Attainment passes up to rate = 10 * TPOT SLO, so goodput grows linearly with k.
    def attainment_at(rate: float, slo: SLO) -> float:
        return 1.0 if rate <= 10 * slo.tpot_s else 0.0

    results = goodput_sweep(attainment_at, 0.5, 0.1, [1, 2, 3], rel_tol=0.01)
    for k, slo, res in results:
        assert slo.tpot_s == pytest.approx(0.1 * k)
        assert k / 1.01 <= res.rate <= k + 1e-9


def test_fitted_goodput_on_hand_worked_points() -> None:
    # passes at 1 and 2, fails at 4: the line from (2, 0.95) to (4, 0.5) crosses 0.9 at 2 + 0.05 / 0.45 x 2
    assert fitted_goodput([(4.0, 0.5), (1.0, 1.0), (2.0, 0.95)]) == pytest.approx(2.0 + 2.0 / 9.0)
    # a rate above the first failure that passes again does not count: the crossing is between 1 and 2
    assert fitted_goodput([(1.0, 0.95), (2.0, 0.8), (3.0, 0.95)]) == pytest.approx(1.0 + 1.0 / 3.0)
    assert fitted_goodput([(1.0, 0.95), (2.0, 0.97)]) == 2.0  # nothing fails: the highest rate
    assert fitted_goodput([(1.0, 0.5), (2.0, 0.97)]) == 0.0  # the lowest rate fails: no extrapolation
    assert fitted_goodput([]) == 0.0
    assert passing_bracket([(1.0, 0.95), (2.0, 0.8), (4.0, 0.1)], 0.9) == (1.0, 2.0)
    assert bracket_rel_width(2.0, 2.2) == pytest.approx(0.1)
    assert bracket_rel_width(2.0, None) is None and bracket_rel_width(0.0, 1.0) is None


def test_search_to_ten_percent_on_a_linear_curve() -> None:
    # attainment 1.1 - 0.1 r crosses 0.9 at r = 2, worked by hand: 1 and 2 pass (2 exactly at the target),
    # 4 fails, then 3, 2.5, 2.25, 2.125 fail; [2, 2.125] is within 10 % of 2
    res = find_goodput(lambda r: 1.1 - 0.1 * r, start_rate=1.0, rel_tol=0.1, max_probes=8)
    assert [p.rate for p in res.probes] == pytest.approx([1.0, 2.0, 4.0, 3.0, 2.5, 2.25, 2.125])
    assert res.converged and res.rate == pytest.approx(2.0) and res.hi == pytest.approx(2.125)
    assert res.rel_width == pytest.approx(0.0625)
    assert res.rate_fitted == pytest.approx(2.0)
    d = res.to_dict()
    assert d["rate_fitted"] == pytest.approx(2.0) and d["rel_width"] == pytest.approx(0.0625)


@pytest.mark.parametrize("knee", [1.0, 1.1, 1.37, 2.9])
def test_ten_percent_brackets_resolve_a_ten_percent_difference(knee: float) -> None:
    # a smooth fall through the target at `knee` (attainment 0.9 there, slope -0.5 per unit of rate / knee)
    def curve(r: float) -> float:
        return min(1.0, max(0.0, 0.9 - 0.5 * (r - knee) / knee))

    res = find_goodput(curve, start_rate=1.0, rel_tol=0.1, max_probes=8)
    assert res.converged and res.rel_width is not None and res.rel_width <= 0.1
    assert res.rate <= knee <= res.hi  # type: ignore[operator]
    assert res.rate_fitted == pytest.approx(knee, rel=1e-9)  # linear between the bracket's ends: exact


def test_growth_sets_the_bracketing_step() -> None:
    res = find_goodput(Curve(3.7), start_rate=1.0, growth=1.5, rel_tol=0.5, max_probes=8)
    assert [p.rate for p in res.probes][:5] == pytest.approx([1.0, 1.5, 2.25, 3.375, 5.0625])
    with pytest.raises(ValueError):
        find_goodput(Curve(3.7), growth=1.0)


@pytest.mark.parametrize(
    "points, expect",
    [
        ([(1.0, 0.95), (2.0, 0.92), (3.0, 0.5)], None),  # monotone
        ([(1.0, 0.5), (2.0, 0.4)], None),  # every run fails: nothing contradicts
        ([(1.0, 0.95), (1.5, 0.63), (2.0, 0.93), (3.0, 0.94), (4.0, 0.5)], (1.5, 3.0)),  # fail below passes
        ([(3.0, 0.95), (1.0, 0.8), (2.0, 0.9)], (1.0, 3.0)),  # unsorted; 0.9 passes (>= target)
    ],
)
def test_contradiction_is_the_lowest_fail_below_a_pass_and_the_highest_pass_above_it(
    points: list[tuple[float, float]], expect: tuple[float, float] | None
) -> None:
    assert contradiction(points, 0.9) == expect
