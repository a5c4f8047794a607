"""The comparison's scoring on synthetic records: per-request minimal SLO scale, tightest k, goodput from
cached runs; and `pdserve bench` dispatch."""

from __future__ import annotations

import math
import threading

import pytest

from bench.metrics import SLO, RequestRecord
from bench.probe import Run, Turns, goodput_from_runs, min_k_per_request, refine_goodput, tightest_k
from pdserve.cli import main as pdserve_main


def _record(i: int, ttft: float, gap: float, n: int = 5, ok: bool = True) -> RequestRecord:
    rec = RequestRecord(i, scheduled_s=0.0, prompt_len=8, output_len=n)
    rec.token_times = [ttft + j * gap for j in range(n)]
    if not ok:
        rec.fail("UNAVAILABLE: gone")
    return rec


def test_min_k_is_the_binding_bound() -> None:
    # isolated prefill 0.1 s, decode step 0.01 s
    recs = [_record(0, 0.2, 0.01), _record(1, 0.1, 0.05), _record(2, 0.1, 0.01, ok=False)]
    assert min_k_per_request(recs, 0.1, 0.01) == pytest.approx([2.0, 5.0, math.inf])


def test_tightest_k_is_the_90th_percentile_of_per_request_k() -> None:
    recs = [_record(i, 0.1 * (i + 1), 0.01) for i in range(10)]  # k_i = 1, 2, ..., 10
    assert tightest_k(recs, 0.1, 0.01) == pytest.approx(9.0)
    recs[8].fail("timeout")
    recs[9].fail("timeout")  # 2 of 10 failed: no k reaches 90%
    assert tightest_k(recs, 0.1, 0.01) is None


def test_goodput_from_runs_needs_every_lower_rate_to_pass() -> None:
    good = [_record(i, 0.1, 0.01) for i in range(10)]
    bad = [_record(i, 1.0, 0.01) for i in range(10)]
    slo = SLO(0.5, 0.02)
    assert goodput_from_runs([Run(1.0, good), Run(2.0, good), Run(4.0, bad)], slo) == 2.0
    assert goodput_from_runs([Run(1.0, bad), Run(2.0, good)], slo) == 0.0
    assert goodput_from_runs([], slo) == 0.0


def test_pdserve_bench_rejects_unknown_benchmarks(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("no_such_bench", "../etc"):
        with pytest.raises(SystemExit) as exc:
            pdserve_main(["bench", name])
        assert exc.value.code == 2
    assert "no benchmark named" in capsys.readouterr().err


class FakeProber:
    """Runs whose requests all meet a 0.5 s TTFT SLO up to `knee` req/s, and none above."""

    def __init__(self, knee: float, rates: list[float]) -> None:
        self.knee = knee
        self.runs: dict[float, Run] = {}
        self.new: list[float] = []
        for r in rates:
            self.run(r)
        self.new.clear()

    def run(self, rate: float) -> Run:
        if rate not in self.runs:
            self.new.append(rate)
            ttft = 0.1 if rate <= self.knee else 1.0
            self.runs[rate] = Run(rate, [_record(i, ttft, 0.01) for i in range(10)])
        return self.runs[rate]


@pytest.mark.parametrize(
    "knee, rates, budget, expect_new",
    [
        (10.0, [1.0, 2.0], 2, [4.0, 8.0]),  # every run passes: keep doubling
        (0.1, [1.0, 2.0], 1, []),  # none passes: never below the lowest run
        (1.4, [1.0, 2.0], 3, [1.5, 1.25]),  # bracketed: bisect until rel_tol (0.25) is reached
    ],
)
def test_refine_goodput_continues_the_search_within_budget(
    knee: float, rates: list[float], budget: int, expect_new: list[float]
) -> None:

    prober = FakeProber(knee, rates)
    refine_goodput(prober, SLO(0.5, 0.02), budget, rel_tol=0.25)  # type: ignore[arg-type]
    assert prober.new == expect_new


def test_turns_rotate_reversing_each_round_and_survive_leaving() -> None:
    turns = Turns(["a", "b", "c"])
    order: list[str] = []

    def worker(name: str, n: int) -> None:
        for _ in range(n):
            with turns.turn(name):
                order.append(name)
        turns.leave(name)

    threads = [threading.Thread(target=worker, args=(n, k)) for n, k in (("a", 3), ("b", 1), ("c", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads), f"deadlock after {order}"
    assert order == ["a", "b", "c", "c", "a", "a", "c"]
