"""`pdserve calibrate MODEL_DIR` on a small random model with held-out text: every file the codecs and the
gateway read is written beside the model, and the runtime reads them (CodecContext, load_profiles)."""

from __future__ import annotations

import inspect
import json
import shutil
import typing
from pathlib import Path

import pytest

from kv_transfer.choice import PROFILE_FILE, load_profiles
from kv_transfer.codec import CodecContext
from kv_transfer.codec.cachegen_klt import TRANSFORM_FILE
from kv_transfer.codec.cachegen_tables import TABLES_FILE
from kv_transfer.codec.rate import RATE_FILE
from pdserve import cli


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model with held-out text (stdlib sources, the text its tokenizer was trained on)."""
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    text = "".join(inspect.getsource(m) for m in (inspect, typing, json.decoder, shutil))
    (path / "heldout.txt").write_text(text)
    return path


@pytest.mark.timeout(900)
def test_calibrate_writes_what_the_codecs_and_the_gateway_read(model_dir: Path) -> None:
    assert load_profiles(model_dir)[0].name == "raw" and len(load_profiles(model_dir)) == 1  # nothing yet
    with pytest.raises(SystemExit) as done:
        cli.main(["calibrate", str(model_dir), "--quick"])
    assert done.value.code == 0
    for name in (TABLES_FILE, "cachegen_plan.json", TRANSFORM_FILE, RATE_FILE, PROFILE_FILE):
        assert (model_dir / name).exists(), name
    ctx = CodecContext.from_model_dir(model_dir)
    assert ctx.tables is not None and ctx.transform is not None and ctx.num_layers == 2
    assert ctx.rate is not None and {p.mode for p in ctx.rate.points} == {"plain", "l0"}
    assert set(ctx.rate.kl_guard) == {"plain", "l0"}
    assert set(ctx.tables.plans) == {"high", "default", "low"}
    assert {"default", "default+l0"} <= set(ctx.transform.steps)
    profiles = {p.name: p for p in load_profiles(model_dir)}  # what the gateway reads
    assert set(profiles) == {"raw", "int8", "fp8", "cachegen"}
    assert profiles["raw"].kl_mean == 0 and profiles["raw"].ratio == pytest.approx(1.0, abs=1e-3)
    assert profiles["cachegen"].ratio < profiles["int8"].ratio < 1.0
    assert all(p.encode_bps > 0 and p.decode_bps > 0 for p in profiles.values())
