"""bench.codec on the shipped model with tiny settings: the figures' keys, and values that must hold."""

from __future__ import annotations

import pytest

from bench.codec import DEFAULT_MODEL, Settings, run

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "model.safetensors").exists(), reason="the shipped model is not trained yet"
)


def test_codec_bench_reports_every_figure() -> None:
    s = Settings(prompt=64, continuation=16, windows=1, speed_tokens=128, repeats=1, greedy_prompts=2)
    r = run(str(DEFAULT_MODEL), s)
    keys = {
        "ratio_vs_fp16",
        "ratio_vs_int8",
        "bits_per_element",
        "encode_mb_s",
        "decode_mb_s",
        "kl_mean",
        "top1_agreement",
        "ppl_delta_rel",
        "greedy32_match",
    }
    assert {"raw", "int8", "fp8", "cachegen"} <= set(r["codecs"])
    for name, c in r["codecs"].items():
        assert keys <= set(c), name
        assert c["encode_mb_s"] > 0 and c["decode_mb_s"] > 0
    raw = r["codecs"]["raw"]
    assert raw["kl_mean"] == 0.0 and raw["top1_agreement"] == 1.0 and raw["greedy32_match"] == 1.0
    assert r["codecs"]["cachegen_v1"]["ratio_vs_fp16"] > 4.0  # compressed, whatever the prompt length
    # transform coding spends finer steps on a prompt's last 64 tokens: a 64-token prompt is all of them
    assert r["codecs"]["cachegen"]["ratio_vs_fp16"] > 2.0
    assert r["codecs"]["cachegen"]["kl_mean"] > 0.0  # lossy, and measured as such
    # layer 0 sent as ids (exact) and its bits spent on the other layers: less error, about the same size
    l0, cg = r["codecs"]["cachegen_l0"], r["codecs"]["cachegen"]
    assert 0.0 < l0["kl_mean"] < cg["kl_mean"] and l0["bits_per_element"] < 1.2 * cg["bits_per_element"]
    assert set(r["break_even_gbit_s"]) == set(r["codecs"]) - {"raw"}
    rate = r["settings"][
        "cachegen_rate"
    ]  # per cachegen codec and length: shorter than the table's -> the plan
    assert set(rate) == {n for n in r["codecs"] if n.startswith("cachegen")}
    assert rate["cachegen"]["64"] is None and rate["cachegen_high"]["64"] is None
    assert r["noise_floor"]["kl_mean"] < 1e-5
    assert r["settings"]["speed_warmup_rounds"] == 1 and r["settings"]["repeats"] == 1  # said, not implied
    g = r["settings"]["greedy"]
    assert g["prompts"] == 2
    assert g["rounding"]["fp16"] == 1.0  # fp16 rounding of fp32 KV is far below any near-tie here
    m = g["reference_min_margin"]  # per prompt the smallest top-1 - top-2 logit margin, sorted: p5 = the min
    assert 0.0 <= m["p5"] <= m["p50"]
    assert m["share_below_0.01"] in (0.0, 0.5, 1.0)  # a share of the 2 prompts, nonzero exactly when ...
    assert (m["share_below_0.01"] > 0) == (m["p5"] < 0.01)  # ... the smallest margin is below 0.01
    lo, hi = raw["greedy32_ci95"]
    assert 0.0 < lo < hi == 1.0  # 2 of 2: the interval still admits much lower rates


def test_wilson_interval_matches_the_textbook_values() -> None:
    from bench.codec import wilson_interval

    lo, hi = wilson_interval(95, 100)
    assert abs(lo - 0.8882) < 1e-3 and abs(hi - 0.9785) < 1e-3
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
