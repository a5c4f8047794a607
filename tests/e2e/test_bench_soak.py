"""`pdserve bench soak --quick` end to end: a steady load at 80% of the measured goodput, no error, and the
JSON a soak run reports (windows, RSS per process over time and its growth after the warm-up)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import soak


@pytest.mark.slow  # about 40 s on 2 cores
def test_soak_quick_reports_zero_errors_and_rss_per_process(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    soak.main(["--model", str(tiny_model_dir), "--quick"])
    report = json.loads(capsys.readouterr().out)
    assert report["bench"] == "soak" and report["fraction"] == 0.8
    assert report["goodput_rps"] > 0 and report["rate_rps"] == pytest.approx(
        0.8 * report["goodput_rps"], rel=1e-2
    )
    assert report["requests"] >= 1 and report["errors"] == 0 and report["error_rate"] == 0.0
    assert report["processes_exited"] == []
    assert [w["start_s"] for w in report["windows"]] == [0.0, 5.0, 10.0, 15.0]
    assert sum(w["requests"] for w in report["windows"]) == report["requests"]
    assert all(w["errors"] == 0 for w in report["windows"])
    processes = {"prefill-0", "decode-1", "coordinator-2", "redis"}
    assert set(report["rss_kib"]) == processes and set(report["rss_growth_pct"]) == processes
    for name, samples in report["rss_kib"].items():
        times = [t for t, _ in samples]
        assert len(samples) >= 10 and times == sorted(times) and all(kib > 0 for _, kib in samples), name
        assert isinstance(report["rss_growth_pct"][name], float), name
    assert report["latency_s"]["ttft"]["p50"] > 0 and report["host"]["cpus"] >= 1
