from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import engine.synth as synth
from engine.config import ModelConfig

SMALL = {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64, "vocab_size": 300}


def test_random_model_is_deterministic_and_hf_shaped(tmp_path):
    texts = ["def f(x):\n    return x\n" * 50, "héllo wörld 日本語\n" * 20]
    a = synth.make_random_model(tmp_path / "a", **SMALL, tokenizer_texts=texts)
    b = synth.make_random_model(tmp_path / "b", **SMALL, tokenizer_texts=texts)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    config = ModelConfig.from_hf_dir(a)
    assert (config.num_layers, config.hidden_size, config.num_kv_heads, config.eos_token_ids) == (
        1,
        32,
        1,
        (0,),
    )
    weights = load_file(os.path.join(a, "model.safetensors"))
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)
    assert weights["lm_head.weight"].std() > 0.3, "logits must be well spread"
    c = synth.make_random_model(tmp_path / "c", **{**SMALL, "seed": 1}, tokenizer_texts=texts)
    assert not torch.equal(
        load_file(os.path.join(c, "model.safetensors"))["lm_head.weight"], weights["lm_head.weight"]
    )


def test_default_model_dir_is_the_shipped_model_never_a_random_one(tmp_path, monkeypatch: pytest.MonkeyPatch):
    from engine import model_dir

    monkeypatch.setattr(synth, "make_random_model", _fake_make)
    assert synth.default_model_dir() == str(model_dir.CHECKOUT_MODEL_DIR)
    # neither a checkout nor an installed copy: an error naming both places, and no random model made
    monkeypatch.setattr(model_dir, "CHECKOUT_MODEL_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(model_dir, "packaged_model_dir", lambda: tmp_path / "neither")
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(model_dir.ModelNotFoundError, match="nowhere.*neither"):
        synth.default_model_dir()
    assert not (tmp_path / "cache").exists()


def test_cached_random_model_is_built_once(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    calls: list[str] = []
    monkeypatch.setattr(synth, "make_random_model", lambda path, **kw: calls.append(_fake_make(path, **kw)))
    first = synth.cached_random_model(layers=1)
    second = synth.cached_random_model(layers=1)
    assert first == second and len(calls) == 1
    assert os.path.basename(first).startswith("random-llama-")
    assert sorted(os.listdir(tmp_path / "models")) == [os.path.basename(first)], (
        "temp dirs must be cleaned up"
    )
    assert synth.cached_random_model(layers=2) != first


def _fake_make(path, **kwargs) -> str:
    (synth.Path(path) / "config.json").write_text(json.dumps(kwargs))
    return str(path)
