"""`pdserve bench chaos` end to end (small): kills under load lose no request and leak nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import chaos


@pytest.mark.slow  # 1 to 4 minutes on 2 loaded cores (kills land only while every instance answers)
def test_chaos_loses_nothing_and_leaks_nothing(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    chaos.main(
        ["--model", str(tiny_model_dir), "--requests", "16", "--concurrency", "4", "--kill-every", "2"]
        + ["--timeout", "120"]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["sent"] == 16
    assert report["lost"] == 0, report["lost_details"]
    assert report["leaked_blocks"] == 0 and report["leaked_leases"] == 0
    assert report["all_instances_back"]
    done = report["completed_exact"] + report["completed_inexact"]
    assert done + sum(report["failed_clear"].values()) == 16, report
    # Greedy output is exact. A seeded sampled request may differ from the single-process reference when
    # its draw sits within fp32 rounding of a token boundary and the cluster batched it with others (the
    # same happens with no failure at all: LocalEngine batched vs alone); never a greedy one.
    assert not [d for d in report["inexact_first_diff"] if d[1]], report["inexact_first_diff"]
    assert sum(report["kills"].values()) >= 1 and report["restarts"] >= 1
