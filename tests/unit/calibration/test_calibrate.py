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


def test_a_profile_is_the_codec_a_decoder_pulls_under_that_name() -> None:
    """`--codec auto` picks "cachegen", which a decode instance with the model pulls as cachegen_l0: its
    profile must carry cachegen_l0's size, speeds and KL, not plain cachegen's."""
    from calibration.calibrate import profiles_from_result

    serving = {
        "raw": {"ratio": 1.0, "encode_mb_s": 9000.0, "decode_mb_s": 9500.0},
        "cachegen": {"ratio": 0.09, "encode_mb_s": 300.0, "decode_mb_s": 320.0},
        "cachegen_l0": {"ratio": 0.08, "encode_mb_s": 400.0, "decode_mb_s": 450.0},
    }
    result = {
        "codecs": {"raw": {"kl_mean": 0.0}, "cachegen": {"kl_mean": 1e-4}, "cachegen_l0": {"kl_mean": 2e-5}},
        "settings": {
            "profiles_serving_dtype": serving,
            "profile_sources": {"raw": "raw", "cachegen": "cachegen_l0"},
        },
    }
    got = {p.name: p for p in profiles_from_result(result)}
    assert set(got) == {"raw", "cachegen"}
    assert (got["cachegen"].ratio, got["cachegen"].encode_bps, got["cachegen"].decode_bps) == (
        0.08,
        4e8,
        4.5e8,
    )
    assert got["cachegen"].kl_mean == 2e-5 and got["raw"].encode_bps == 9e9
