"""bench.transport on the shipped model with tiny settings (real processes, real transports, the in-process
rate limiter for the 1 Gbit/s link): the figures' keys, and what must hold whatever the machine's speed."""

from __future__ import annotations

import pytest

from bench.transport import DEFAULT_MODEL, Settings, run

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "model.safetensors").exists(), reason="the shipped model is not trained yet"
)


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
