from __future__ import annotations

import json

import pytest

from engine.config import ModelConfig

BASE = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "eos_token_id": 2,
    "bos_token_id": 1,
}


def _cfg(**overrides) -> ModelConfig:
    return ModelConfig.from_hf_dict({**BASE, **overrides})


def test_llama_basics_and_defaults():
    c = _cfg()
    assert (c.architecture, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 4, 8, 2, 32)
    assert c.rope_theta == 10000.0 and c.rope_scaling is None
    assert not c.attention_bias and not c.tie_word_embeddings and c.sliding_window is None
    assert c.eos_token_ids == (2,) and c.bos_token_id == 1
    assert _cfg(head_dim=64).head_dim == 64
    assert _cfg(num_key_value_heads=None).num_kv_heads == 8


def test_eos_token_id_list_and_null():
    assert _cfg(eos_token_id=[128001, 128009]).eos_token_ids == (128001, 128009)
    assert _cfg(eos_token_id=None).eos_token_ids == ()


def test_qwen2_biases_and_mistral_window():
    q = _cfg(model_type="qwen2", sliding_window=4096, use_sliding_window=False)
    assert q.attention_bias and not q.o_proj_bias and q.sliding_window is None
    assert _cfg(model_type="mistral", sliding_window=4096).sliding_window == 4096
    assert _cfg(model_type="mistral", sliding_window=None).sliding_window is None
    with pytest.raises(ValueError, match="use_sliding_window"):
        _cfg(model_type="qwen2", use_sliding_window=True)


def test_rope_scaling_both_layouts():
    llama3 = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    old = _cfg(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **llama3})
    new = _cfg(rope_parameters={"rope_theta": 500000.0, "rope_type": "llama3", **llama3})
    assert old == new
    assert old.rope_theta == 500000.0 and old.rope_scaling_dict == {"rope_type": "llama3", **llama3}
    linear = _cfg(rope_scaling={"type": "linear", "factor": 2.0})
    assert linear.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    assert _cfg(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}).rope_scaling is None
    hash(old)  # frozen and hashable


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling type 'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "unsupported rope scaling type 'dynamic'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing keys"),
        ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_configs_raise_clear_errors(overrides: dict, message: str):
    with pytest.raises(ValueError, match=message):
        _cfg(**overrides)


def test_from_hf_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "tie_word_embeddings": True}))
    assert ModelConfig.from_hf_dir(tmp_path).tie_word_embeddings
