"""The ideal prefill pool bound (bench.ideal) on hand-worked schedules."""

from __future__ import annotations

import pytest

from bench.ideal import fcfs_completion_delays, ideal_goodput, ideal_ttft_attainment
from bench.metrics import RequestRecord
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

    got = ideal_goodput(schedule, 0.15, prefill_s=0.1, prefill_len=100, servers=1, start_rate=2.0)
    assert 10.667 * (1 - 0.006) <= got <= 10.667 + 1e-6
    assert max(asked) > 10.667  # it probed past the crossing, as no run of a system needs to
    # two servers: no prompt waits until 1/r < 0.05, then every other one does
    assert ideal_goodput(schedule, 0.15, 0.1, 100, servers=2, start_rate=2.0) > 2 * 10.0
