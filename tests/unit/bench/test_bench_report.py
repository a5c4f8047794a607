"""Benchmark output: machine info, exactly one JSON object, plots (or their documented absence)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bench import report
from bench.metrics import SLO, RequestRecord, compute_metrics


def test_machine_info() -> None:
    info = report.machine_info()
    for key in ("cpu_model", "logical_cores", "usable_cores", "python", "torch", "device", "git_commit"):
        assert key in info
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    assert isinstance(info["cpu_vendor"], str) and info["cpu_vendor"]
    assert isinstance(info["cpu_avx512"], bool)
    assert info["logical_cores"] >= 1
    assert info["torch"] is None or isinstance(info["torch"], str)
    assert info["device"] == "cpu" or info["device"].startswith("cuda:")
    assert info["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
    json.dumps(info)


def test_cpu_vendor_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU\n")
    assert report._cpuinfo("vendor_id", str(cpuinfo)) == "GenuineIntel"
    assert report._cpuinfo("model name", str(cpuinfo)) == "Intel(R) Xeon(R) CPU"
    assert report._cpuinfo("flags", str(cpuinfo)) is None
    assert report._cpuinfo("vendor_id", str(tmp_path / "absent")) is None


@dataclass
class _Point:
    rate: float
    att: float


def test_emit_prints_one_json_object_to_stdout_and_summary_to_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    result = {
        "bench": "serving",
        "goodput": np.float64(3.5),
        "n": np.int64(7),
        "bad": float("nan"),
        "inf": float("inf"),
        "probes": (_Point(1.0, 1.0), _Point(2.0, 0.5)),
        "arr": np.arange(3),
        "nested": {"p99": 0.25},
    }
    obj = report.emit(result, stdout=out, stderr=err)
    parsed = json.loads(out.getvalue())  # exactly one JSON document
    assert parsed == obj
    assert parsed["goodput"] == 3.5 and parsed["n"] == 7
    assert parsed["bad"] is None and parsed["inf"] is None
    assert parsed["probes"] == [{"rate": 1.0, "att": 1.0}, {"rate": 2.0, "att": 0.5}]
    assert parsed["arr"] == [0, 1, 2]
    assert "machine" in parsed and "cpu_model" in parsed["machine"]
    summary = err.getvalue()
    assert "goodput: 3.5" in summary and "nested.p99: 0.25" in summary and "probes: [2 items]" in summary
    assert "{" not in summary


def test_emit_to_path_and_custom_summary(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    path = tmp_path / "sub" / "r.json"
    report.emit({"x": 1, "machine": {"fixed": True}}, str(path), summary="all good", stdout=out, stderr=err)
    assert out.getvalue() == ""
    assert json.loads(path.read_text()) == {"x": 1, "machine": {"fixed": True}}
    assert err.getvalue().startswith("all good\n")


def _rec(i: int, times: list[float]) -> RequestRecord:
    return RequestRecord(index=i, scheduled_s=0.0, prompt_len=8, output_len=len(times), token_times=times)


def _is_png(path: str) -> bool:
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    files = [
        report.plot_attainment_vs_rate(
            {"disagg 1P1D": [(1, 1.0), (4, 0.5), (2, 0.95)], "colocated": [(1, 0.97), (2, 0.6)]},
            tmp_path / "att.png",
        ),
        report.plot_cdfs(
            {"a": [0.1, 0.3, 0.2], "b": [], "c": [0.5]}, tmp_path / "ttft.png", "TTFT (s)", slo=0.25
        ),
        report.plot_goodput_bars({"disagg": 1.2, "colocated": 0.8}, tmp_path / "bars.png"),
        report.plot_latency_cdfs(
            {
                "disagg": compute_metrics([_rec(0, [0.2, 0.3, 0.45]), _rec(1, [0.4, 0.5, 0.55])]),
                "colocated": compute_metrics([_rec(0, [0.6, 0.9, 1.0])]),
            },
            tmp_path / "lat.png",
            SLO(0.5, 0.12),
        ),
    ]
    assert all(f is not None and _is_png(f) for f in files)
    status = report.plots_status(files)
    assert status["available"] and status["files"] == files and status["reason"] is None


def test_plots_absent_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    assert report.plot_goodput_bars({"a": 1.0}, tmp_path / "x.png") is None
    assert report.plot_cdfs({"a": [1.0]}, tmp_path / "y.png", "x") is None
    assert report.plot_attainment_vs_rate({"a": [(1.0, 1.0)]}, tmp_path / "z.png") is None
    assert report.plot_latency_cdfs({"a": []}, tmp_path / "w.png") is None
    assert not list(tmp_path.iterdir())
    status = report.plots_status([None])
    assert status == {"available": False, "files": [], "reason": "matplotlib not installed; no plots written"}
