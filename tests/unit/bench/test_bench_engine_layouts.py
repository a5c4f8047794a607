"""`pdserve bench engine --tp/--pp` on a tiny model and grid: every point is measured, TP ranks report their
all-reduce time, and the planner's latency model is fitted to the points."""

from __future__ import annotations

import pytest

from bench.engine_layouts import measure_layout, summary
from coordinator.planner.latency import LayoutLatency
from engine.parallel.layout import Layout
from engine.synth import make_random_model

GRID = {"prefill_lens": (8, 16, 32), "batches": (1, 2), "contexts": (8, 24), "steps": 2, "repeats": 1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_random_model(
        tmp_path_factory.mktemp("m"),
        layers=2,
        hidden=64,
        heads=4,
        kv_heads=2,
        intermediate=128,
        vocab_size=512,
    )


def test_tp2_layout_is_measured_and_fitted(model_dir: str) -> None:
    base = measure_layout(model_dir, Layout(1, 1), [0, 1], GRID)
    tp2 = measure_layout(model_dir, Layout(2, 1), [0, 1], GRID)
    assert [p["prompt_tokens"] for p in tp2["prefill"]] == [8, 16, 32]
    assert [(p["batch"], p["context"]) for p in tp2["decode"]] == [(1, 8), (1, 24), (2, 8), (2, 24)]
    assert all(p["ms"] >= p["best_ms"] > 0 for p in tp2["prefill"])
    assert all(p["allreduce_ms"] > 0 for p in tp2["prefill"] + tp2["decode"])  # 2 per layer per pass
    assert all(p["allreduce_ms"] == 0 for p in base["prefill"] + base["decode"])
    model = LayoutLatency.from_dict(tp2["latency_model"])
    assert (model.layout.tp, model.layout.pp) == (2, 1)
    text = summary({"mode": "test", "layouts": [base, tp2], "prefill_512": []})
    assert "TP2xPP1" in text and "TP1xPP1" in text
