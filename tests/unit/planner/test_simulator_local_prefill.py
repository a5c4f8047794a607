"""The simulator's model of the gateway's local prefill (`--local-prefill busy`), on hand-worked queues."""

from __future__ import annotations

import pytest

from coordinator.planner.latency import Coeffs, Layout, LayoutLatency
from coordinator.planner.simulator import (
    DecodeInstance,
    Link,
    LocalPrefill,
    PrefillInstance,
    Request,
    simulate,
)


def const_latency(prefill_s: float, step_s: float) -> LayoutLatency:
    return LayoutLatency(Layout(1, 1), Coeffs(prefill_s, 0, 0), Coeffs(step_s, 0, 0), Coeffs(step_s, 0, 0))


PREFILL = [PrefillInstance(const_latency(1.0, 0), max_batch_tokens=10)]  # 1 s a prompt, one at a time
DECODE = [DecodeInstance(const_latency(0.5, 0.1), 10_000)]  # a local pass 0.5 s, a decode step 0.1 s
LINK = [[Link(0.0)]]
BUSY = LocalPrefill(max_tokens=10, depth=2)


def test_third_prompt_of_a_burst_goes_local_and_only_one_at_a_time() -> None:
    """Four prompts at t=0: r0 and r1 go to the prefill instance (in flight 0, then 1, both < depth 2); r2
    finds 2 in flight there and no local prefill pending: prefilled on the decode instance, first token at
    0.5 s; r3 finds r2 pending (one decode instance): back to the prefill queue, third in line (3 s). r2 then
    decodes 2 steps of 0.1 s (TPOT 0.1); r0 and r1 come from prefill at 1 s and 2 s."""
    reqs = [Request(0.0, 10, 3) for _ in range(4)]
    res = simulate(reqs, PREFILL, DECODE, LINK, BUSY)
    assert res.local_prefills == 1
    assert res.ttft_s == pytest.approx((1.0, 2.0, 0.5, 3.0))
    assert res.tpot_s == pytest.approx((0.1,) * 4)
    # the policy off, or a prompt longer than max_tokens: all four queue on the prefill instance
    for off in (None, LocalPrefill(max_tokens=9, depth=2)):
        res = simulate(reqs, PREFILL, DECODE, LINK, off)
        assert res.local_prefills == 0
        assert res.ttft_s == pytest.approx((1.0, 2.0, 3.0, 4.0))
    # depth 3: r2 still finds the prefill instance below it, r3 goes local
    res = simulate(reqs, PREFILL, DECODE, LINK, LocalPrefill(max_tokens=10, depth=3))
    assert res.ttft_s == pytest.approx((1.0, 2.0, 3.0, 0.5))


def test_a_local_pass_stalls_the_running_decodes() -> None:
    """r0 (prefilled 0-1 s) decodes 10 steps of 0.1 s from 1 s. r1, r2 at 1.21 s fill the prefill instance
    (2 in flight), so r3 at 1.25 s goes local. It is admitted at the step boundary at 1.3 s (r0's third step);
    the next step is its 0.5 s pass (first token at 1.8 s: TTFT 0.55) and then r0's fourth step (1.9 s): r0's
    last six steps end at 2.5 s, TPOT 1.5 / 10 = 0.15 instead of 0.1. r3 joins at 1.9 s and takes 10 more
    steps: done at 2.9 s, TPOT (2.9 - 1.8) / 10 = 0.11."""
    reqs = [Request(0.0, 10, 11), Request(1.21, 10, 11), Request(1.21, 10, 11), Request(1.25, 10, 11)]
    res = simulate(reqs, PREFILL, DECODE, LINK, BUSY)
    assert res.local_prefills == 1
    assert res.ttft_s[3] == pytest.approx(0.55)
    assert res.tpot_s[0] == pytest.approx(0.15)
    assert res.tpot_s[3] == pytest.approx(0.11)
    assert res.ttft_s[1:3] == pytest.approx((1.0, 2.0))  # 1.21 -> 2.21, then 2.21 -> 3.21
    # without the policy r3 waits for the prefill instance (3.21 -> 4.21) and r0 never stalls
    off = simulate(reqs, PREFILL, DECODE, LINK)
    assert off.ttft_s[3] == pytest.approx(4.21 - 1.25)
    assert off.tpot_s[0] == pytest.approx(0.1)


def test_local_prefill_waits_for_kv_like_any_request() -> None:
    """Capacity for one reservation (32 tokens: prompt 10 + output 22 in 16-token blocks). r1, r2 at 1.2 s fill
    the prefill instance, r3 at 1.25 s goes local and waits until r0 (running from 1 s, 21 steps of 0.1 s,
    done at 3.1 s) gives its blocks back, then its pass (0.5 s): first token at 3.6 s, TTFT 2.35 s."""
    reqs = [Request(0.0, 10, 22), Request(1.2, 10, 22), Request(1.2, 10, 22), Request(1.25, 10, 22)]
    dec = [DecodeInstance(const_latency(0.5, 0.1), kv_capacity_tokens=32, block_tokens=16)]
    res = simulate(reqs, PREFILL, dec, LINK, BUSY)
    assert res.local_prefills == 1
    assert res.decode_batch_max == 1
    assert res.ttft_s[3] == pytest.approx(3.6 - 1.25)


def test_max_running_caps_the_decode_batch() -> None:
    """Six requests, prefilled at once (0 s), 16 steps of 0.1 s each; at most two admitted at a time (KV for
    all): the schedule of test_kv_memory_limits_decode_batch's two reservations' worth of capacity: r0 runs
    steps 1-16 (ends 1.6 s), r1 joins at step 1 (1.7 s), r2 takes r0's place (3.2 s), r3 r1's (3.3 s), r4
    4.8 s, r5 4.9 s."""
    reqs = [Request(0.0, 15, 17) for _ in range(6)]
    res = simulate(
        reqs,
        [PrefillInstance(const_latency(0, 0))],
        [DecodeInstance(const_latency(0, 0.1), 10_000, max_running=2)],
        LINK,
    )
    assert res.decode_batch_max == 2
    assert res.tpot_s == pytest.approx(tuple(f / 16 for f in (1.6, 1.7, 3.2, 3.3, 4.8, 4.9)))
