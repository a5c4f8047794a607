"""Replanning on a window of live requests (coordinator/planner/replan.py), on hand-checkable queues."""

from __future__ import annotations

import math

import pytest

from coordinator.planner.latency import Coeffs, Layout, LayoutLatency, Profile
from coordinator.planner.model import ModelSpec
from coordinator.planner.replan import Finished, Running, Window, assess, inputs_from_plan
from coordinator.planner.search import SearchInput, search
from coordinator.planner.topology import Node, Topology

# prefill: 10 ms a request (100 req/s per instance); decode: 4 ms a step whatever the batch
LAT = LayoutLatency(Layout(1, 1), Coeffs(0.01, 0, 0), Coeffs(0.004, 0, 0), Coeffs(0.004, 0, 0))
MODEL = ModelSpec("m", 2, 64, 4, 2, 16, 1000, 2)
TOPO = Topology((Node("n0", 8, 1.0, 10.0),), 10.0)
INP = SearchInput(
    MODEL, Profile("cpu", "m", (LAT,)), TOPO, 0.1, 0.05, ((32, 8),), prefill_max_batch_tokens=32
)
ONE_UNIT = Running(Layout(1, 1), Layout(1, 1), 1, 1, 1)


def window_at(rate: float, seconds: float = 20.0) -> tuple[Window, float]:
    w = Window(span_s=30.0)
    n = int(rate * seconds)
    for i in range(n):
        w.add(Finished(i / rate, 32, 8, 0.02, 0.004))
    return w, (n - 1) / rate


def test_window_rate_lengths_and_measured_attainment() -> None:
    w, now = window_at(10.0)
    assert w.rate(now) == pytest.approx(200 / 19.9, rel=1e-6) and w.samples()[0] == (32, 8)
    w.add(Finished(now, 32, 8, 0.5, 0.004))  # TTFT 0.5 s misses a 0.1 s SLO
    assert w.attainment(0.1, 0.05) == pytest.approx(200 / 201)
    w.prune(now + 25.0)  # kept: arrivals from 14.9 s on, the 51 at 14.9 ... 19.9 s and the late one
    assert len(w) == 52 and math.isnan(Window().attainment(0.1, 0.05))


def test_a_plan_that_meets_the_slos_at_the_live_rate_is_kept() -> None:
    w, now = window_at(20.0)
    a = assess(INP, ONE_UNIT, w, now)
    assert a.meets and a.predicted_attainment >= 0.9 and a.recommended is None
    assert a.measured_attainment == 1.0 and a.running == {"prefill": 1, "decode": 1}


def test_a_rate_past_one_prefill_instance_is_predicted_to_miss_and_more_units_recommended() -> None:
    """150 req/s on one prefill instance serving 100 req/s: its queue grows without bound."""
    w, now = window_at(150.0, seconds=4.0)
    a = assess(INP, ONE_UNIT, w, now)
    assert not a.meets and a.predicted_attainment < 0.5
    assert a.recommended is not None and a.recommended["prefill"]["instances"] >= 2
    assert "units instead of 1" in a.reason


def test_an_oversized_plan_is_shrunk_to_what_the_live_rate_needs() -> None:
    w, now = window_at(5.0)
    a = assess(INP, Running(Layout(1, 1), Layout(1, 1), 1, 1, 4), w, now)
    assert a.meets and a.recommended is not None
    assert (a.recommended["prefill"]["instances"], a.recommended["decode"]["instances"]) == (1, 1)


def test_inputs_round_trip_through_the_plan_json() -> None:
    from pdserve.plan_cli import plan_json

    plan = search(INP)
    d = plan_json(plan, INP, 100.0, 50.0, "test")
    back = inputs_from_plan(d)
    assert back.model == MODEL and back.topology == TOPO and back.profile.layouts == (LAT,)
    assert (back.slo_ttft_s, back.slo_tpot_s, back.prefill_max_batch_tokens) == (0.1, 0.05, 32)
    assert Running.from_plan(d).counts == {
        "prefill": plan.instances("prefill"),
        "decode": plan.instances("decode"),
    }
    with pytest.raises(ValueError, match="no replan inputs"):
        inputs_from_plan(plan.to_dict())
