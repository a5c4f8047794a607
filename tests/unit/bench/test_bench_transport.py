"""bench.transport on the shipped model with tiny settings (real processes, real transports, the in-process
rate limiter for the 1 Gbit/s link): the figures' keys, and what must hold whatever the machine's speed."""

from __future__ import annotations

import math

import pytest

from bench.transport import BURST_S, DEFAULT_MODEL, MIN_BURST_BYTES, Settings, break_even_gbit, run, tbf_args

needs_model = pytest.mark.skipif(
    not (DEFAULT_MODEL / "model.safetensors").exists(), reason="the shipped model is not trained yet"
)


@needs_model
def test_transport_bench_reports_every_figure() -> None:
    s = Settings(rounds=1, msgs_64mib=1, layer_msgs=2, prompt_tokens=256, trials=1)
    r = run(str(DEFAULT_MODEL), s, link="limiter")
    for name in ("tcp", "shm"):
        t = r["transports"][name]
        assert t["gb_s_64mib"] > 0 and t["ratio_vs_socket"] > 0, name
    u = r["handoff"]["unshaped"]
    assert u["prefill_s"] > 0 and u["ttft_added_frac_streaming"] >= 0 and u["ttft_added_frac_after"] >= 0
    lim = r["handoff"]["limited_1gbit"]
    assert lim["link"] == "limiter"
    assert lim["cachegen_speedup_vs_raw"] > 0 and lim["cachegen_l0_speedup_vs_raw"] > 0
    raw, cg, l0 = lim["wire_bytes_raw"], lim["wire_bytes_cachegen"], lim["wire_bytes_cachegen_l0"]
    assert raw > 4 * cg and raw > 4 * l0  # both compress; cachegen_l0 crossed processes as the services do
    shaped = r["handoff"]["shaped"]
    assert [p["gbit_s"] for p in shaped] == [1.0, 2.5, 5.0, 10.0]
    for p in shaped:
        assert p["raw_s"] > 0 and p["cachegen_s"] > 0
        assert p["speedup"] == pytest.approx(p["raw_s"] / p["cachegen_s"])
        assert p["cachegen_codec"] == "cachegen_l0"  # what a decode instance holding the model pulls
        assert p["speedup_plain"] == pytest.approx(p["raw_s"] / p["cachegen_plain_s"])
    assert r["handoff"]["link"] == "limiter" and "LimitedTransport" in r["handoff"]["shaping"]
    be = r["handoff"]["break_even_gbit_s"]
    assert (be is None) or 1.0 <= be <= 10.0
    assert r["handoff"]["break_even_method"]


def test_break_even_interpolates_where_speedup_crosses_one() -> None:
    # hand-worked: between 2.5 (2x) and 5 (0.5x), log-log: f = ln2 / (ln2 - ln0.5) = 1/2 -> sqrt(2.5 * 5)
    be, how = break_even_gbit([(1.0, 3.0), (2.5, 2.0), (5.0, 0.5), (10.0, 0.25)])
    assert be == pytest.approx(math.sqrt(12.5)) and "interpolated" in how
    be, how = break_even_gbit([(1.0, 0.9), (2.5, 1.5), (5.0, 0.8)])  # the first crossing from >= 1 to < 1
    assert be is not None and 2.5 < be < 5.0
    assert break_even_gbit([(1.0, 1.0), (2.5, 0.5)])[0] == 1.0
    be, how = break_even_gbit([(1.0, 3.0), (10.0, 1.2)])
    assert be is None and "above 10" in how
    be, how = break_even_gbit([(1.0, 0.8), (10.0, 0.2)])
    assert be is None and "below 1" in how


def test_tbf_burst_is_at_least_the_minimum_and_scales_with_rate() -> None:
    assert tbf_args(1.0) == ["tbf", "rate", "1000mbit", "burst", str(MIN_BURST_BYTES), "latency", "50ms"]
    assert tbf_args(2.5)[2] == "2500mbit"
    assert int(tbf_args(100.0)[4]) == int(100e9 / 8 * BURST_S) > MIN_BURST_BYTES
