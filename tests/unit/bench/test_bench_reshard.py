"""bench.reshard on the shipped model with tiny settings (real rank processes, real KV servers over tcp): the
figures' keys, and what must hold whatever the machine's speed."""

from __future__ import annotations

import pytest

from bench.reshard import MODES, Settings, measure_reshard
from bench.transport import DEFAULT_MODEL

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "model.safetensors").exists(), reason="the shipped model is not trained yet"
)


def test_reshard_bench_times_every_mode_and_every_lease_is_pulled() -> None:
    r = measure_reshard(str(DEFAULT_MODEL), Settings(prompt_tokens=64, trials=1))
    assert set(r["handoff_s"]) == set(MODES) and all(t > 0 for t in r["handoff_s"].values())
    assert all(len(v) == 1 for v in r["handoff_s_all"].values())
    assert r["ratio"] == pytest.approx(r["handoff_s"]["tp2_to_tp1"] / r["handoff_s"]["tp1_to_tp1"])
    threads = r["handoff_s"]["tp2_to_tp1_threads"]  # the same pull with a thread per piece (ucx's reader)
    assert r["threads_ratio"] == pytest.approx(threads / r["handoff_s"]["tp1_to_tp1"])
    assert r["meets_target"] == (r["ratio"] <= r["target_ratio"]) and r["prompt_tokens"] == 64
    assert r["kv_bytes"] == 2 * 5 * 64 * 2 * 32 * 4  # the shipped model: 5 layers, 2 KV heads of 32, fp32
    for mode in MODES:  # both sides' CPU per pull is measured (the prefill side's summed over its ranks)
        assert r["breakdown_s"][mode]["decode_process_cpu_s"] > 0
        b = r["breakdown_s"][mode]
        assert 0 < b["prefill_serve_cpu_s"] <= b["prefill_process_cpu_s"]  # serving is part of the process
