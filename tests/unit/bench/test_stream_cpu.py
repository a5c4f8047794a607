"""bench.stream_cpu's split of per-thread CPU: gateway main vs I/O threads, decode's step thread vs the rest."""

from __future__ import annotations

import pytest

from bench.stream_cpu import split

PIDS = {"gateway": 100, "decode": 200, "loadgen": 300}


def test_split_takes_the_gateway_main_thread_by_pid_and_the_decode_step_thread_as_the_busiest() -> None:
    a = {
        "gateway": {100: (1_000_000_000, 0), 101: (0, 0)},
        "decode": {200: (0, 0), 201: (5_000_000_000, 0), 202: (0, 0)},
        "loadgen": {300: (0, 0)},
    }
    b = {
        "gateway": {
            100: (1_300_000_000, 9),
            101: (100_000_000, 0),
            102: (50_000_000, 0),
        },  # 102: a new thread
        "decode": {200: (200_000_000, 0), 201: (7_000_000_000, 0), 202: (50_000_000, 0)},
        "loadgen": {300: (400_000_000, 0)},
    }
    got = split(PIDS, a, b)
    assert got["gateway_main"] == pytest.approx(0.3)
    assert got["gateway_io"] == pytest.approx(0.15)
    assert got["gateway"] == pytest.approx(0.45)
    assert got["decode_step"] == pytest.approx(2.0)  # thread 201 ran most: the step loop
    assert got["decode_non_step"] == pytest.approx(0.25)
    assert got["loadgen"] == pytest.approx(0.4)
