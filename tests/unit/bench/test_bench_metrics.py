"""Per-request metrics and SLO summaries against hand-worked examples and an independent fluidity reference."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from bench.metrics import (
    SLO,
    Fluidity,
    RequestRecord,
    attainment,
    compute_metrics,
    fluidity,
    request_metrics,
    run_window,
    stats,
    summarize,
    summarize_records,
)

# The docstring's worked example: arrival 0, D_p = 1.0, D = 0.5 (binary-exact values).
EXAMPLE_TIMES = [0.5, 1.25, 2.75, 3.25, 3.5]


def _record(
    times: list[float], *, scheduled: float = 0.0, output_len: int | None = None, **kw
) -> RequestRecord:
    return RequestRecord(
        index=kw.pop("index", 0),
        scheduled_s=scheduled,
        prompt_len=kw.pop("prompt_len", 16),
        output_len=len(times) if output_len is None else output_len,
        token_times=list(times),
        **kw,
    )


def _etalon_reference(gaps: list[float], d_p: float, d: float) -> tuple[int, int]:
    """Metron/Etalon's slack formulation over inter-token gaps (first gap = TTFT), written independently."""
    slack = 0.0
    missed = total = 0
    for i, g in enumerate(gaps):
        budget = d_p if i == 0 else d
        if g <= budget + slack:
            slack += budget - g
            total += 1
            continue
        k = int(1 + (g - slack - d_p) // d) if i == 0 else int((g - slack) // d)
        missed += k
        total += k
        slack = 0.0
    return missed, total


def test_basic_latencies_of_worked_example() -> None:
    m = request_metrics(_record(EXAMPLE_TIMES, sent_s=0.125))
    assert m.ok and m.error is None
    assert m.n_tokens == 5
    assert m.ttft_s == 0.5
    assert m.tbt_s == (0.75, 1.5, 0.5, 0.25)
    assert m.tpot_s == pytest.approx((3.5 - 0.5) / 4)
    assert m.e2e_s == 3.5
    assert m.normalized_latency_s == pytest.approx(0.7)
    assert m.scheduling_delay_s == 0.125
    assert m.fluidity is None  # no deadlines given


def test_ttft_counts_from_scheduled_arrival_not_send_time() -> None:
    m = request_metrics(_record([10.5, 10.75], scheduled=10.0, sent_s=10.4))
    assert m.ttft_s == pytest.approx(0.5)
    assert m.scheduling_delay_s == pytest.approx(0.4)
    assert m.e2e_s == pytest.approx(0.75)


def test_fluidity_worked_example_slack_skip_and_reset() -> None:
    f = fluidity(0.0, EXAMPLE_TIMES, ttft_deadline_s=1.0, tbt_deadline_s=0.5)
    # token1 on time (banks 0.5), token2 on time thanks to slack, token3 skips 2 deadlines (2.0, 2.5),
    # reset -> token4 deadline 3.25 on time, token5 deadline 3.75 on time.
    assert f == Fluidity(missed=2, total=6)
    assert f.index == pytest.approx(1 - 2 / 6)


def test_fluidity_slack_is_what_makes_token2_on_time() -> None:
    # Token 2's gap (0.75) exceeds D = 0.5; only the 0.5 s banked by token 1 covers it.
    assert fluidity(0.0, [0.5, 1.25], 1.0, 0.5) == Fluidity(0, 2)
    # Without the banked slack (token 1 exactly on its deadline) the same gap is a miss.
    assert fluidity(0.0, [1.0, 1.75], 1.0, 0.5) == Fluidity(1, 2)


def test_fluidity_reset_after_miss_uses_actual_arrival() -> None:
    # Up to token 4: with the reset its deadline is 2.75 + 0.5 = 3.25 (met); a schedule-only rule
    # (deadline 3.0) would call it late.
    assert fluidity(0.0, EXAMPLE_TIMES[:4], 1.0, 0.5) == Fluidity(2, 5)


def test_fluidity_late_first_token_skips_following_deadlines() -> None:
    # Deadlines 1.0, 1.5, 2.0 all pass before 2.2 -> 3 misses.
    assert fluidity(0.0, [2.2], 1.0, 0.5) == Fluidity(3, 3)
    # Just late for the first deadline only.
    assert fluidity(0.0, [1.1], 1.0, 0.5) == Fluidity(1, 1)
    # Relative to a non-zero scheduled arrival.
    assert fluidity(100.0, [100.5, 101.25, 102.75], 1.0, 0.5) == Fluidity(2, 4)


def test_fluidity_float_noise_does_not_drop_or_invent_a_deadline() -> None:
    # (0.3 - 0.0) / 0.1 is 2.9999999999999996 in floats, but deadlines 0.0, 0.1, 0.2 and 0.3 are all <= 0.3.
    assert fluidity(0.0, [0.3], 0.0, 0.1) == Fluidity(4, 4)
    assert fluidity(0.0, [0.25], 0.0, 0.1) == Fluidity(3, 3)
    # Deadlines accumulated as 0.1 + 0.1 + 0.1 = 0.30000000000000004 still accept a token at 0.3.
    assert fluidity(0.0, [0.1, 0.2, 0.3, 0.4, 0.5], 0.1, 0.1) == Fluidity(0, 5)


def test_fluidity_matches_etalon_reference_on_random_streams() -> None:
    rng = random.Random(7)
    for _ in range(300):
        d_p, d = rng.uniform(0.1, 2.0), rng.uniform(0.02, 0.5)
        n = rng.randint(1, 40)
        gaps = [rng.uniform(0, 2.5 * d_p)] + [
            rng.expovariate(1 / (d * rng.uniform(0.3, 1.6))) for _ in range(n - 1)
        ]
        arrival = rng.uniform(0, 50)
        times = list(arrival + np.cumsum(gaps))
        f = fluidity(arrival, times, d_p, d)
        # Compare in the reference's gap form (times re-derived relative to the arrival).
        ref_gaps = [times[0] - arrival] + [b - a for a, b in zip(times, times[1:], strict=False)]
        assert (f.missed, f.total) == _etalon_reference(ref_gaps, d_p, d)


def test_single_token_request_has_zero_tpot_and_no_gaps() -> None:
    m = request_metrics(_record([0.3]))
    assert m.tpot_s == 0.0
    assert m.tbt_s == ()
    assert m.normalized_latency_s == pytest.approx(0.3)


def test_chunked_tokens_give_zero_gaps() -> None:
    r = _record([], output_len=4)
    r.on_tokens(0.2, 3)
    r.on_tokens(0.5)
    m = request_metrics(r)
    assert m.ok and m.tbt_s == (0.0, 0.0, 0.3)
    assert m.tpot_s == pytest.approx(0.1)


def test_failed_and_timed_out_requests() -> None:
    partial = _record([0.1, 0.2], output_len=5)
    partial.fail("timeout: deadline exceeded")
    m = request_metrics(partial, ttft_deadline_s=1.0, tbt_deadline_s=0.5)
    assert not m.ok and m.error is not None and m.error.startswith("timeout")
    assert m.ttft_s == pytest.approx(0.1)  # what arrived is still reported
    assert m.fluidity == Fluidity(missed=3, total=5)  # 2 on time + 3 never delivered

    nothing = _record([], output_len=4)
    nothing.fail("UNAVAILABLE")
    m0 = request_metrics(nothing, ttft_deadline_s=1.0, tbt_deadline_s=0.5)
    assert m0.ttft_s is None and m0.tpot_s is None and m0.e2e_s is None
    assert m0.fluidity == Fluidity(4, 4) and m0.fluidity.index == 0.0


def test_short_output_is_a_failure_unless_allowed() -> None:
    r = _record([0.1, 0.2], output_len=3)
    assert not request_metrics(r).ok
    assert request_metrics(r).error == "short output: 2 of 3 tokens"
    assert request_metrics(r, require_full_output=False).ok
    assert not request_metrics(_record([], output_len=3), require_full_output=False).ok


def test_non_monotone_token_times_rejected() -> None:
    with pytest.raises(ValueError):
        request_metrics(_record([0.2, 0.1]))


def test_ttft_deadline_may_depend_on_prompt_length() -> None:
    # Predicted prefill 1 ms/token + 0.25 s slack: 500-token prompt -> deadline 0.75 s.
    r = _record([0.7], prompt_len=500)
    per_len = request_metrics(r, ttft_deadline_s=lambda n: 0.001 * n + 0.25, tbt_deadline_s=0.1)
    assert per_len.fluidity == Fluidity(0, 1)
    r2 = _record([0.7], prompt_len=100)  # deadline 0.35 -> late, skips 0.35, 0.45, 0.55, 0.65
    assert request_metrics(
        r2, ttft_deadline_s=lambda n: 0.001 * n + 0.25, tbt_deadline_s=0.1
    ).fluidity == Fluidity(4, 4)


def _four_requests() -> list[RequestRecord]:
    both = _record([0.5, 0.6, 0.7], index=0)  # TTFT 0.5, TPOT 0.1
    slow_first = _record([1.5, 1.6, 1.7], index=1)  # TTFT 1.5 > 1.0
    slow_decode = _record([0.5, 0.9, 1.3], index=2)  # TPOT 0.4 > 0.2
    failed = _record([0.5], index=3, output_len=3)
    failed.fail("timeout")
    return [both, slow_first, slow_decode, failed]


def test_attainment_requires_both_slos_and_success() -> None:
    slo = SLO(ttft_s=1.0, tpot_s=0.2)
    ms = compute_metrics(_four_requests(), slo)
    assert [slo.meets(m) for m in ms] == [True, False, False, False]
    assert attainment(ms, slo) == 0.25
    s = summarize(ms, slo)
    assert s["attainment"] == 0.25
    assert s["attainment_ttft"] == 0.5  # requests 0 and 2
    assert s["attainment_tpot"] == 0.5  # requests 0 and 1
    assert s["n_ok"] == 3 and s["n_failed"] == 1 and s["errors"] == {"timeout": 1}
    # Latency stats exclude the failure; TBT pools every gap of the successes.
    assert s["ttft_s"]["n"] == 3 and s["ttft_s"]["p50"] == pytest.approx(0.5)
    assert s["tbt_s"]["n"] == 6 and s["tbt_s"]["max"] == pytest.approx(0.4)
    assert attainment([], slo) == 0.0


def test_attainment_with_fluidity_bound() -> None:
    # TPOT is within its bound but one long stall misses deadlines; only the fluidity bound catches it.
    stall = _record([0.1, 0.15, 0.2, 0.25, 0.7, 0.75], index=0)  # TPOT 0.13
    smooth = _record([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], index=1)
    loose = SLO(ttft_s=1.0, tpot_s=0.15)
    strict = SLO(ttft_s=1.0, tpot_s=0.15, min_fluidity=0.9)
    ms = compute_metrics([stall, smooth], strict, ttft_deadline_s=0.1, tbt_deadline_s=0.1)
    # stall: 0.1 (d 0.1 ok), 0.15 (d 0.2), 0.2 (d 0.3), 0.25 (d 0.4), 0.7 (d 0.5: late, skips 0.5, 0.6, 0.7 -> 3),
    # 0.75 (d 0.8 ok)  -> missed 3 of 8.
    assert ms[0].tpot_s == pytest.approx(0.13)
    assert ms[0].fluidity == Fluidity(3, 8)
    assert ms[1].fluidity == Fluidity(0, 6)
    assert attainment(ms, loose) == 1.0
    assert attainment(ms, strict) == 0.5


def test_stats_percentiles_are_numpy_linear() -> None:
    values = [float(v) for v in range(1, 11)]
    s = stats(values)
    assert s["n"] == 10 and s["mean"] == 5.5 and s["min"] == 1.0 and s["max"] == 10.0
    assert s["p50"] == pytest.approx(5.5)
    assert s["p90"] == pytest.approx(9.1)
    assert s["p99"] == pytest.approx(9.91)
    rng = np.random.default_rng(0)
    x = rng.exponential(size=1001)
    s2 = stats(x, percentiles=(50, 99))
    assert s2["p99"] == pytest.approx(float(np.percentile(x, 99)))
    assert stats([]) == {
        "n": 0,
        "mean": None,
        "min": None,
        "max": None,
        "p50": None,
        "p90": None,
        "p99": None,
    }


def test_run_window_and_summarize_records() -> None:
    recs = _four_requests()
    w = run_window(recs)
    assert w["duration_s"] == pytest.approx(1.7)
    assert w["request_throughput"] == pytest.approx(3 / 1.7)
    assert w["output_token_throughput"] == pytest.approx(10 / 1.7)
    s = summarize_records(recs, SLO(1.0, 0.2))
    assert s["attainment"] == 0.25 and s["duration_s"] == pytest.approx(1.7)
    assert s["fluidity"]["n"] == 4
    assert s["fluidity_deadlines"]["total"] >= s["fluidity_deadlines"]["missed"] > 0
    assert run_window([]) == {"duration_s": None, "request_throughput": None, "output_token_throughput": None}
    assert math.isfinite(s["e2e_s"]["p99"])
