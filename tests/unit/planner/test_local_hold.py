"""The gateway's late view of a prefill instance (simulator.LocalPrefill.hold_s) and its calibration from a
run's count of local prefills (calibrate.local_hold), and the decode instance's own prompt-pass speed
(calibrate.local_pass_scale), on hand-worked cases."""

from __future__ import annotations

import pytest

from coordinator.planner.calibrate import HOLD_MAX_S, local_hold, local_pass_scale, one_by_one
from coordinator.planner.latency import Coeffs, Layout, LayoutLatency
from coordinator.planner.simulator import Link, LocalPrefill, Request, simulate

# a prefill batch takes 10 ms; a decode step 1 ms
LAT = LayoutLatency(Layout(1, 1), Coeffs(0.010, 0.0, 0.0), Coeffs(0.001, 0.0, 0.0), Coeffs(0.001, 0.0, 0.0))
# prompt 0 arrives at 0 and is prefilled 0-10 ms; prompt 1 arrives at 15 ms. Local prefill once one prompt is
# in flight on the prefill instance (depth 1): without a hold the instance is idle again at 10 ms, so prompt 1
# goes to it; held 5 ms or more, prompt 0 still counts at 15 ms and prompt 1 is prefilled locally.
REQUESTS = [Request(0.0, 50, 4), Request(0.015, 50, 4)]
POLICY = LocalPrefill(max_tokens=128, depth=1)
CAP = 10_000


def local_count(hold_s: float) -> int:
    pre, dec = one_by_one(LAT, 1.0, 1.0, CAP, 1 << 30)
    res = simulate(REQUESTS, pre, dec, [[Link(0.0)]], LocalPrefill(128, 1, hold_s))
    return res.local_prefills


def test_a_prompt_held_in_flight_after_its_pass_sends_the_next_one_local() -> None:
    assert POLICY.hold_s == 0.0  # the default: the gateway hears at once
    assert local_count(0.0) == 0
    assert local_count(0.004) == 0
    assert local_count(0.006) == 1


def test_local_hold_is_the_smallest_hold_reaching_the_counted_local_prefills() -> None:
    def hold(counted: int) -> float:
        return local_hold(LAT, REQUESTS, 1.0, 1.0, CAP, 1 << 30, 64, POLICY, counted)

    assert hold(0) == 0.0  # the run prefilled none locally: no hold
    assert hold(1) == pytest.approx(0.005, abs=1e-5)  # prompt 0 held to prompt 1's arrival
    # more than the simulator can send local (one of two prompts at most here): the bound
    assert hold(2) == HOLD_MAX_S


def test_local_passes_take_the_decode_instances_measured_time() -> None:
    """The decode instance counted 4 prompt passes on 0.05 s of CPU where the model gives 4 x 10 ms: 1.25.
    At that scale prompt 1's local pass (held case above) takes 12.5 ms instead of 10: its TTFT 2.5 ms
    later; the prefill instance's passes are the model's."""
    assert local_pass_scale(LAT, 4, 200, 10_000, 0.05) == pytest.approx(1.25)
    assert local_pass_scale(LAT, 0, 0, 0, 0.0) == 1.0  # no local passes counted: the model's
    pre, dec = one_by_one(LAT, 1.0, 1.0, CAP, 1 << 30, 64, local_pass=1.25)
    assert pre[0].latency.prefill == LAT.prefill
    assert dec[0].latency.prefill.a == pytest.approx(0.0125)
    policy = LocalPrefill(128, 1, 0.010)
    slow = simulate(REQUESTS, pre, dec, [[Link(0.0)]], policy)
    pre1, dec1 = one_by_one(LAT, 1.0, 1.0, CAP, 1 << 30, 64)
    fast = simulate(REQUESTS, pre1, dec1, [[Link(0.0)]], policy)
    assert slow.local_prefills == fast.local_prefills == 1
    assert slow.ttft_s[1] - fast.ttft_s[1] == pytest.approx(0.0025)
    assert slow.ttft_s[0] == fast.ttft_s[0]
