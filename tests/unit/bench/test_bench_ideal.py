"""The ideal prefill pool and ideal split bounds (bench.ideal) on hand-worked schedules."""

from __future__ import annotations

import pytest

from bench.ideal import (
    SPLIT_THRESHOLD,
    IdealSplit,
    fcfs_completion_delays,
    ideal_goodput,
    ideal_split_latency,
    ideal_ttft_attainment,
)
from bench.metrics import SLO, RequestRecord
from bench.workload import BenchRequest


def test_one_server_queues_in_arrival_order() -> None:
    # arrivals 0, 0.1, 5.0 with 1 s each: the second waits 0.9 s, the third finds the server free
    assert fcfs_completion_delays([0.0, 0.1, 5.0], [1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.9, 1.0])


def test_input_order_is_kept_when_arrivals_are_unsorted() -> None:
    assert fcfs_completion_delays([0.1, 0.0], [1.0, 1.0]) == pytest.approx([1.9, 1.0])


def test_two_servers_take_simultaneous_arrivals_in_parallel() -> None:
    # three at once on two servers: two finish at 1, the third starts when the first server frees up
    assert fcfs_completion_delays([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], servers=2) == pytest.approx(
        [1.0, 1.0, 2.0]
    )
    # the earliest free server is used, not a round robin: server A frees at 1, B at 3
    assert fcfs_completion_delays([0.0, 0.0, 1.5], [1.0, 3.0, 1.0], servers=2) == pytest.approx(
        [1.0, 3.0, 1.0]
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        fcfs_completion_delays([0.0], [1.0], servers=0)
    with pytest.raises(ValueError):
        fcfs_completion_delays([0.0, 1.0], [1.0])


def test_attainment_scales_service_with_prompt_length() -> None:
    # 100 ms for 100 tokens: prompts of 100, 200, 100 tokens at 0, 0.05, 1.0 s
    recs = [RequestRecord(0, 0.0, 100, 4), RequestRecord(1, 0.05, 200, 4), RequestRecord(2, 1.0, 100, 4)]
    # delays: 0.1, 0.1 - 0.05 + 0.2 = 0.25, 0.1
    assert ideal_ttft_attainment(recs, 0.2, prefill_s=0.1, prefill_len=100) == pytest.approx(2 / 3)
    assert ideal_ttft_attainment(recs, 0.26, prefill_s=0.1, prefill_len=100) == pytest.approx(1.0)
    # a second server takes the 200-token prompt at once (delay 0.2)
    assert ideal_ttft_attainment(recs, 0.21, prefill_s=0.1, prefill_len=100) == pytest.approx(2 / 3)
    assert ideal_ttft_attainment(recs, 0.21, prefill_s=0.1, prefill_len=100, servers=2) == pytest.approx(1.0)
    assert ideal_ttft_attainment([], 1.0, prefill_s=0.1, prefill_len=100) == 0.0


def test_ideal_goodput_is_searched_on_the_schedules_a_run_would_send() -> None:
    """At rate r, 10 prompts of 100 tokens 1/r apart, 0.1 s each, TTFT SLO 0.15 s, one server: prompt i waits
    i * (0.1 - 1/r) once 1/r < 0.1, so 9 of 10 pass (attainment 0.9) while 8 * (0.1 - 1/r) <= 0.05, i.e. up to
    r = 1 / 0.09375 = 10.667 req/s, and 8 of 10 just above it. The fitted crossing lies in the last bracket,
    at its passing end here (attainment exactly 0.9 there)."""
    asked: list[float] = []

    def schedule(rate: float) -> list[BenchRequest]:
        asked.append(rate)
        return [BenchRequest(i, i / rate, (1,) * 100, 4) for i in range(10)]

    def pool(servers: int):  # noqa: ANN202
        return lambda recs: ideal_ttft_attainment(recs, 0.15, prefill_s=0.1, prefill_len=100, servers=servers)

    got = ideal_goodput(schedule, pool(1), start_rate=2.0)
    assert 10.667 * (1 - 0.006) <= got <= 10.667 + 1e-6
    assert max(asked) > 10.667  # it probed past the crossing, as no run of a system needs to
    # two servers: no prompt waits until 1/r < 0.05, then every other one does
    assert ideal_goodput(schedule, pool(2), start_rate=2.0) > 2 * 10.0


def _iso(by_batch: dict[int, float]) -> dict:
    """An isolated measurement (bench.compare.slos.measure_isolated's fields) with these median steps."""
    return {
        "prefill_s": 0.1,
        "slo_prefill_s": 0.125,  # 128 tokens: 2**-10 s a token, exact in binary
        "prompt_len": 128,
        "decode_by_batch": {str(b): {"median_s": t, "best_s": t / 2} for b, t in by_batch.items()},
    }


def test_ideal_split_latency_fits_two_lines_on_the_isolated_medians() -> None:
    # 10 ms + 1 ms a sequence up to 16, then 3.6 ms + 1.4 ms a sequence (the two meet at 16: 26 ms)
    steps = {b: 0.01 + 0.001 * b for b in (1, 8, 16)} | {b: 0.0036 + 0.0014 * b for b in (32, 48)}
    lat = ideal_split_latency(_iso(steps))
    assert lat is not None
    assert lat.prefill.b == pytest.approx(2**-10) and lat.prefill.a == lat.prefill.c == 0.0  # the median
    assert lat.threshold == SPLIT_THRESHOLD and lat.decode_small.b == lat.decode_large.b == 0.0
    assert (lat.decode_small.a, lat.decode_small.c) == pytest.approx((0.01, 0.001))
    assert (lat.decode_large.a, lat.decode_large.c) == pytest.approx((0.0036, 0.0014))
    best = ideal_split_latency(_iso(steps), "best_s")  # every best run half the median here
    assert best is not None and best.decode_s(40, 0) == pytest.approx(lat.decode_s(40, 0) / 2)
    assert best.prefill.b == pytest.approx(0.1 / 128)
    assert ideal_split_latency({"prompt_len": 128, "slo_prefill_s": 0.1}) is None  # an earlier run's JSON


# 2**-6 s a step + 2**-6 s a sequence (1/32 s alone); a prompt of 128 tokens 1/8 s: every time exact in binary
STEPS = {1: 2**-5, 8: 9 * 2**-6, 16: 17 * 2**-6}


def _split(max_running: int = 64, decode_servers: int = 1) -> IdealSplit:
    lat = ideal_split_latency(_iso(STEPS))
    assert lat is not None
    return IdealSplit(lat, 1 << 16, max_running, decode_servers=decode_servers)


def test_ideal_split_scores_a_lone_request_at_the_isolated_prefill_and_step() -> None:
    lone = [RequestRecord(0, 0.0, 128, 11)]
    assert _split().attainment(lone, SLO(0.125, 2**-5)) == 1.0
    assert _split().attainment(lone, SLO(0.124, 2**-5)) == 0.0  # TTFT = the prefill
    assert _split().attainment(lone, SLO(0.125, 0.031)) == 0.0  # TPOT = one step alone
    assert _split().attainment([], SLO(1.0, 1.0)) == 0.0


def test_the_ideal_split_bounds_a_decode_bound_schedule_the_prefill_pool_passes() -> None:
    """A at 0 s and B at 5 s decode 199 steps each (6.2 s alone), C at 20 s alone. The prefill pool sees
    three prompts far apart (TTFT 1/8 s each: attainment 1). On one decode instance B joins A's batch at
    5.125 s: both run steps of 3/64 s for a while, so both miss a TPOT SLO just above one step alone (1/32 s);
    C passes: 1/3."""
    recs = [
        RequestRecord(0, 0.0, 128, 200),
        RequestRecord(1, 5.0, 128, 200),
        RequestRecord(2, 20.0, 128, 200),
    ]
    slo = SLO(0.13, 0.032)
    assert ideal_ttft_attainment(recs, slo.ttft_s, prefill_s=0.125, prefill_len=128) == 1.0
    assert _split().attainment(recs, slo) == pytest.approx(1 / 3)
    # one sequence at a time: B waits for A (A finishes at 0.125 + 199/32 = 6.34 s) and its TPOT counts the
    # wait, (6.34 - 5.125 + 199/32) / 199 = 0.0374 s: A and C pass
    assert _split(max_running=1).attainment(recs, slo) == pytest.approx(2 / 3)
    # two decode instances: A and B decode apart, all pass
    assert _split(decode_servers=2).attainment(recs, slo) == 1.0
