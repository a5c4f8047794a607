"""`pdserve bench planner`'s JSON: the keys the issue names, and DistServe's figures beside ours."""

from __future__ import annotations

import pytest

from bench import planner


def test_bench_planner_json(monkeypatch: pytest.MonkeyPatch) -> None:
    # a smaller probe than --quick's, so the test stays short; the structure is the same
    real = planner.SearchInput
    monkeypatch.setattr(
        planner, "SearchInput", lambda *a, **kw: real(*a, **{**kw, "n_requests": 60, "top_units": 1})
    )
    out = planner.run(quick=True)
    assert out["search_s_4x8"] > 0 and out["search_cpu_s_4x8"] > 0
    for case in out["search_4x8"].values():
        assert case["plan"]["devices_used"] <= 32
    ds = out["distserve_opt13b_1x4"]
    assert ds["distserve_reported"]["per_gpu_goodput_rps"] == 1.56
    assert ds["ours"]["devices_used"] <= 4 and ds["ours"]["per_gpu_goodput_rps"] > 0
    theirs = ds["distserve_config_in_our_simulator"]
    assert (theirs["prefill"]["tp"], theirs["decode"]["tp"], theirs["devices_used"]) == (2, 1, 3)
    # the search can only do at least as well per device as the one configuration it also considers
    assert ds["ours"]["per_gpu_goodput_rps"] >= 0.9 * theirs["per_gpu_goodput_rps"]
