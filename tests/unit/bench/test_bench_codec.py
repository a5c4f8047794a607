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
    assert set(r["break_even_gbit_s"]) == set(r["codecs"]) - {"raw"}
    assert r["noise_floor"]["kl_mean"] < 1e-5
    assert r["settings"]["greedy"]["prompts"] == 2
