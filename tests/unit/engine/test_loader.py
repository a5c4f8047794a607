from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.loader import load_model


def _copy_with_weights(src: str, dst, weights: dict[str, torch.Tensor]) -> str:
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    save_file(weights, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_loads_every_weight_by_name(engine_model_dir: str):
    weights = load_file(os.path.join(engine_model_dir, "model.safetensors"))
    model = load_model(engine_model_dir)
    params = dict(model.named_parameters())
    assert set(params) == set(weights)
    for name, w in weights.items():
        assert torch.equal(params[name].detach(), w), name
    assert params["lm_head.weight"].dtype == torch.float32


def test_sharded_checkpoint_with_index(engine_model_dir: str, tmp_path):
    weights = load_file(os.path.join(engine_model_dir, "model.safetensors"))
    dst = tmp_path / "sharded"
    shutil.copytree(engine_model_dir, dst)
    os.remove(dst / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, dst / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_model(str(dst))
    assert model.lm_head is not None
    assert torch.equal(model.lm_head.weight.detach(), weights["lm_head.weight"])


def test_missing_and_unknown_weights_are_errors(engine_model_dir: str, tmp_path):
    weights = load_file(os.path.join(engine_model_dir, "model.safetensors"))
    missing = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"lacks 1 weights.*up_proj"):
        load_model(_copy_with_weights(engine_model_dir, tmp_path / "missing", missing))
    extra = {**weights, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}
    with pytest.raises(ValueError, match=r"unknown weights.*o_proj\.bias"):
        load_model(_copy_with_weights(engine_model_dir, tmp_path / "extra", extra))
    wrong = {**weights, "model.norm.weight": torch.ones(65)}
    with pytest.raises(ValueError, match="shape"):
        load_model(_copy_with_weights(engine_model_dir, tmp_path / "wrong", wrong))


def test_pipeline_layer_range_loads_only_its_layers(engine_model_dir: str):
    stage = load_model(engine_model_dir, layer_start=1, layer_end=2)
    names = {n for n, _ in stage.named_parameters()}
    assert "model.norm.weight" in names and "lm_head.weight" in names
    assert "model.embed_tokens.weight" not in names
    assert all(not n.startswith("model.layers.0.") for n in names)
    assert any(n.startswith("model.layers.1.") for n in names)
