"""pdserve's model against `transformers` on identical random weights (fp32): prefill and paged decode."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.model import BatchMeta, CausalLM

COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 256,
}
# transformers 5 types its configs by their dataclass fields; rope_theta and rope_scaling still work (through
# **kwargs, into rope_parameters), and transformers 4 has no rope_parameters
CASES = {
    "llama": (
        LlamaForCausalLM,
        LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=500.0),  # type: ignore[call-arg]
    ),
    "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config(**COMMON, tie_word_embeddings=True)),
    # window 6 < sequence length, and a head_dim that is not hidden / heads
    "mistral-window": (MistralForCausalLM, MistralConfig(**COMMON, sliding_window=6, head_dim=24)),
    "llama3-rope": (
        LlamaForCausalLM,
        LlamaConfig(  # type: ignore[call-arg]
            **COMMON,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama-linear-rope": (
        LlamaForCausalLM,
        LlamaConfig(**COMMON, rope_scaling={"rope_type": "linear", "factor": 3.0}),  # type: ignore[call-arg]
    ),
}
BLOCK = 4


def _hf_model(name: str, path) -> torch.nn.Module:
    cls, cfg = CASES[name]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # spread weights out; HF inits biases to 0 and norms to 1, which would hide bugs
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed" in pname:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


class Paged:
    """Our model over a paged cache whose blocks are deliberately scattered and out of order."""

    def __init__(self, model: CausalLM, num_tokens: int) -> None:
        cfg = model.config
        self.model, self.cfg = model, cfg
        n = -(-num_tokens // BLOCK)
        self.cache = KVCache(cfg.num_layers, 3 * n, BLOCK, cfg.num_kv_heads, cfg.head_dim)
        self.blocks = [3 * n - 1 - 3 * i for i in range(n)]  # descending, with gaps
        self.num_cached = 0

    def step(self, ids: list[int]) -> torch.Tensor:
        meta = BatchMeta.build(
            [self.blocks], [self.num_cached], [len(ids)], BLOCK, "cpu", self.cfg.sliding_window
        )
        with torch.inference_mode():
            logits = self.model(torch.tensor(ids), meta, self.cache)
        self.num_cached += len(ids)
        return logits[0]  # [V]


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_and_paged_decode_match_transformers(name: str, tmp_path):
    hf = _hf_model(name, tmp_path)
    config = ModelConfig.from_hf_dir(tmp_path)
    ours = load_model(str(tmp_path), config)
    assert config.architecture == CASES[name][1].model_type
    prompt = torch.randint(0, config.vocab_size, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    paged = Paged(ours, len(prompt) + 6)

    ids = list(prompt)
    logits = paged.step(ids)  # prefill
    for step in range(6):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1]  # full recompute, no cache
        # mypy#15459: mypy cannot type a lambda whose default binds a loop variable
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")  # type: ignore[misc]
        ids.append(int(ref.argmax()))
        logits = paged.step(ids[-1:])  # decode one token through the paged cache


def test_config_fields_for_qwen2_and_mistral(tmp_path):
    _hf_model("qwen2-tied", tmp_path / "q")
    q = ModelConfig.from_hf_dir(tmp_path / "q")
    assert (q.architecture, q.attention_bias, q.o_proj_bias, q.tie_word_embeddings) == (
        "qwen2",
        True,
        False,
        True,
    )
    _hf_model("mistral-window", tmp_path / "m")
    m = ModelConfig.from_hf_dir(tmp_path / "m")
    assert (m.architecture, m.head_dim, m.sliding_window) == ("mistral", 24, 6)
