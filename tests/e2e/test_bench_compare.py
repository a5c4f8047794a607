"""The serving comparison as a user runs it: `pdserve bench compare --quick`, cut down to two systems, one
workload, two seeds of 6 requests and one short run per search, in a subprocess; its JSON has the documented shape and every number in
it comes from a run (real clusters on loopback, real load)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMS = ("disagg-1P1D", "colocated-2x1core")


@pytest.mark.timeout(600)
def test_bench_compare_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    cmd = [sys.executable, "-m", "pdserve", "bench", "compare", "--quick", "--json", str(out)]
    cmd += [
        "--systems",
        ",".join(SYSTEMS),
        "--workloads",
        "balanced",
        "--n-requests",
        "6",
        "--seeds",
        "2",
        "--max-probes",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "disaggregated / best colocated" in proc.stderr  # the human summary

    result = json.loads(out.read_text())
    assert result["benchmark"] == "compare" and result["mode"] == "quick"
    assert result["machine"]["logical_cores"] >= 1 and result["machine"]["git_commit"]
    assert result["machine"]["cpu_model"] and result["machine"]["cpu_vendor"]  # the host, in every result
    assert result["config"]["seeds"] == [0, 1]
    w = result["workloads"]["balanced"]
    assert set(w["goodput_per_device"]) == set(SYSTEMS)
    assert w["best_colocated"] == "colocated-2x1core"
    ratio, bound = w["goodput_ratio_vs_best_colocated"], w["goodput_ratio_lower_bound"]
    disagg, colocated = (w["goodput_per_device"][n] for n in SYSTEMS)
    if colocated > 0:  # the ratio of the two goodputs per device; a bound only when colocated found none
        assert bound is None and ratio == pytest.approx(disagg / colocated)
    elif disagg > 0:
        assert ratio is None and bound is not None and math.isfinite(bound) and bound > 0
    else:
        assert ratio is None and bound is None
    assert set(w["goodput_ratio_by_seed"]) == {"0", "1"}
    # the ideal prefill pool's goodput is searched on the schedules, not bounded by the rates the split ran
    ideal = w["disagg_ideal_prefill_goodput_per_device"]
    probed = max(r["rate"] for r in w["systems"][SYSTEMS[0]]["runs"])
    assert ideal > 0 and ideal * 2 > probed  # a bound at the probed rates would be <= their highest
    assert w["disagg_share_of_ideal_prefill_pool"] == pytest.approx(disagg / ideal)
    # the ideal split: the prefill pool at the isolated median plus the decode instance at the isolated step
    # of its batch size (measured in this run, batches 1-48), scored on both SLOs: never above that pool
    split = w["disagg_ideal_split_goodput_per_device"]
    pool_median = w["systems"][SYSTEMS[0]]["ideal_prefill_pool"]["goodput_by_k_at_median"]
    assert 0 < split * 2 <= pool_median[f"{w['headline_k']:g}"] * 1.01
    assert w["disagg_share_of_ideal_split"] == pytest.approx(disagg / split)
    assert sorted(map(int, w["isolated"]["decode_by_batch"])) == [1, 8, 16, 32, 48]
    assert all("ideal_split_attainment_by_k" in r for r in w["systems"][SYSTEMS[0]]["runs"])
    assert w["disagg_share_of_ideal_at_end"] is None  # quick mode measures no isolated latencies after
    assert w["goodput_ratio_spread"]["n"] + w["goodput_ratio_spread"]["undefined"] == 2
    iso = w["isolated"]
    assert (
        0 < iso["decode_step_s"] < iso["prefill_s"] < 5
    )  # measured in this run: prefill of 64 tokens > 1 step
    k = f"{w['headline_k']:g}"
    # the SLOs scale with the isolated medians
    assert w["slos"][k]["ttft_s"] == pytest.approx(float(k) * w["ttft_scale"] * iso["slo_prefill_s"])
    assert w["slos"][k]["tpot_s"] == pytest.approx(float(k) * iso["slo_decode_step_s"])
    for name in SYSTEMS:
        runs = w["systems"][name]["runs"]
        assert runs, f"{name}: no load run"
        for run in runs:
            assert run["rate"] > 0
            summary = run["at_headline_k"]
            by_k = [
                run["attainment_by_k"][f"{kk:g}"] for kk in sorted(float(x) for x in run["attainment_by_k"])
            ]
            assert by_k == sorted(by_k), f"a looser SLO (larger k) met fewer requests: {by_k}"
            assert run["attainment_by_k"][k] == pytest.approx(summary["attainment"])  # same records, same SLO
            assert all(a * 12 == pytest.approx(round(a * 12)) for a in by_k)  # a share of the 12 requests
            assert summary["n_requests"] == 12 and summary["n_ok"] + summary["n_failed"] == 12  # 2 seeds x 6
            assert set(run["attainment_by_seed"]) == {"0", "1"}
            cpu = run["cpu"]
            if Path("/proc/stat").exists():
                assert cpu is not None and cpu["system_cores"] > 0.05  # the system did the work
                assert cpu["wall_s"] > 0
                procs = cpu["processes"]  # each of the system's processes on its own
                assert "redis" in procs and any(n.startswith("coordinator") for n in procs)
                assert sum(p["cores"] for p in procs.values()) > 0.05
        if Path("/proc/self/smaps_rollup").exists():
            memory = w["systems"][name]["memory_mib_after_warm_up"]
            assert memory and all(m["rss_mib"] > 0 for m in memory.values())
