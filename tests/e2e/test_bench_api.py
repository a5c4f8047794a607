"""`pdserve bench api` as a user runs it, cut down to one short round: gRPC and HTTP drive the same cluster,
and again a TLS cluster; every request completes, and the JSON has the per-front-end figures, their ratios
to the first and the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FRONTS = ("grpc", "http", "grpc+tls", "http+tls")


@pytest.mark.timeout(400)
def test_bench_api_runs_every_front_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "api.json"
    cmd = [sys.executable, "-m", "pdserve", "bench", "api", "--quick", "--json", str(out)]
    cmd += ["--model", str(tiny_model_dir), "--requests", "10", "--rounds", "1", "--rate", "10"]
    cmd += ["--log-dir", str(tmp_path / "logs"), "--fronts", ",".join(FRONTS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio_http_grpc" in proc.stderr  # the human summary

    result = json.loads(out.read_text())
    assert result["benchmark"] == "api" and result["fronts"] == list(FRONTS)
    assert result["machine"]["logical_cores"] >= 1
    for front in FRONTS:
        (run,) = result["runs"][front]
        assert run["n_ok"] == 10 and run["n_failed"] == 0, run["errors"]
        assert 0 < result[front]["ttft_p50_s"] <= result[front]["ttft_p90_s"]
        assert result[front]["output_token_throughput"] > result[front]["request_throughput"] > 0
    for front in FRONTS[1:]:
        ratios = result[f"ratio_{front}_grpc"]
        assert set(ratios) == {"ttft_p50_s", "ttft_p90_s", "request_throughput", "output_token_throughput"}
        assert all(v > 0 for v in ratios.values())
