"""Goodput bisection on synthetic monotone attainment curves, and SLO derivation."""

from __future__ import annotations

import json

import pytest

from bench.goodput import (
    GoodputResult,
    Probe,
    derive_slos,
    find_goodput,
    goodput_per_device,
    goodput_sweep,
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
