"""`pdserve bench chaos` end to end (small): kills under load lose no request and leak nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import chaos


@pytest.mark.slow  # about 3 minutes on 2 loaded cores
# Flaky: a fresh-clone CI run on 2026-12-06 failed `all_instances_back` once in three runs (a Redis killed as
# the load ended was not waited for: fixed; a second cause is not found yet). Run it with `pytest -m flaky`.
@pytest.mark.flaky
def test_chaos_loses_nothing_and_leaks_nothing(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    chaos.main(
        ["--model", str(tiny_model_dir), "--requests", "16", "--concurrency", "4", "--kill-every", "2"]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["sent"] == 16
    assert report["lost"] == 0, report["lost_details"]
    assert report["leaked_blocks"] == 0 and report["leaked_leases"] == 0
    assert report["all_instances_back"]
    assert report["completed_exact"] + sum(report["failed_clear"].values()) == 16, report
    assert sum(report["kills"].values()) >= 1 and report["restarts"] >= 1
