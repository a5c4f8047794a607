"""`python -m bench.planner_replay`: a `pdserve bench planner --raw` file replayed offline, on a hand-worked
run (one request, one window of schedstat readings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import planner_replay
from coordinator.planner.latency import Coeffs, Layout, LayoutLatency

# the engine: a prefill batch 10 ms, a decode step 2 ms; the serving path adds 5 ms to TTFT
ENGINE = LayoutLatency(
    Layout(1, 1), Coeffs(0.010, 0.0, 0.0), Coeffs(0.002, 0.0, 0.0), Coeffs(0.002, 0.0, 0.0), 16
)


def raw_file(tmp_path: Path) -> Path:
    """One fidelity run of one request (prompt 10, output 5 tokens) beside a calibration run. Over the run the
    prefill step thread ran 0.5 s and waited 0.5 s (stretch 2), the decode one never waited. So TTFT =
    10 ms x 2 + 5 ms x 2 (the path stretches by the prefill's mean) = 30 ms > the 20 ms SLO: attainment 0,
    as recorded; alone on its cores 10 + 5 = 15 ms and TPOT 2 ms <= 3 ms: 1; alone but every time twice
    as long, TTFT 30 ms and TPOT 4 ms: 0."""
    sched = [
        [100.0, {"prefill": {"11": [0, 0]}, "decode": {"12": [0, 0]}}],
        [101.0, {"prefill": {"11": [500_000_000, 500_000_000]}, "decode": {"12": [500_000_000, 0]}}],
    ]
    run = {
        "name": "balanced",
        "rate": 1.5,
        "requests": [{"scheduled_s": 0.0, "prompt": 10, "output": 5}],
        "sched": sched,
        "window_offset_s": 0.0,
    }
    calibration = {**run, "name": "isolated", "rate": 0.5}
    raw = {
        "engine_profile": {"device": "cpu", "model": "m", "layouts": [ENGINE.to_dict()]},
        "summary": {
            "decode_step_model": {"small": [0.002, 0.0, 0.0], "large": [0.002, 0.0, 0.0], "threshold": 16},
            "serving_terms": {
                "path_ms": 5.0,
                "prefill_per_request_ms": 0.0,
                "decode_per_step_ms": 0.0,
                "decode_per_seq_per_step_ms": 0.0,
            },
            "slo_ms": {"ttft": 20.0, "tpot": 3.0},
            "decode_kv_capacity_tokens": 10_000,
            "local_prefill_hold_ms": 0.0,
            "fidelity": [{"rate": 1.5, "predicted_attainment": 0.0, "measured_attainment": 0.0}],
        },
        "consts": {"mean_prompt": 10, "max_batch_tokens": 256, "max_running": 64, "local_prefill": [128, 2]},
        "runs": [calibration, run],
    }
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw))
    return path


def replayed(path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> list[dict]:
    assert planner_replay.main([str(path), *flags]) == 0
    return json.loads(capsys.readouterr().out)["runs"]


def test_replay_reproduces_the_recorded_prediction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run,) = replayed(raw_file(tmp_path), capsys)  # the calibration run is not replayed
    assert run["rate"] == 1.5
    assert run["replayed_attainment"] == run["predicted_attainment"] == 0.0
    assert run["decode_steps"] == 4  # output 5: the first token from prefill, four steps
    assert run["decode_busy_s"] == pytest.approx(0.008)


def test_replay_changes_one_input_at_a_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = raw_file(tmp_path)
    assert replayed(path, capsys, "--no-stretch")[0]["replayed_attainment"] == 1.0
    assert replayed(path, capsys, "--no-stretch", "--scale", "2")[0]["replayed_attainment"] == 0.0
