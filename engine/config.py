"""Read a Hugging Face `config.json` (llama / qwen2 / mistral) into one frozen `ModelConfig`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("llama3", "linear")

# Keys each supported rope type needs (besides "rope_type" itself).
_ROPE_KEYS: dict[str, tuple[str, ...]] = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model and runner need to know about one checkpoint. Hashable (frozen, tuples)."""

    architecture: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: (
        tuple[tuple[str, Any], ...] | None
    )  # sorted (key, value) pairs incl. "rope_type"; None = plain
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    o_proj_bias: bool = False  # llama with attention_bias=True also biases o_proj; qwen2 does not
    sliding_window: int | None = None  # mistral: a key is visible iff q_pos - window < k_pos <= q_pos

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @staticmethod
    def from_hf_dir(path: str | os.PathLike[str]) -> ModelConfig:
        """Parse `path/config.json`. Raises ValueError for architectures or features we do not implement."""
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return ModelConfig.from_hf_dict(json.load(f))

    @staticmethod
    def from_hf_dict(cfg: dict[str, Any]) -> ModelConfig:
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported model_type {arch!r}; pdserve supports {SUPPORTED_ARCHITECTURES}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only 'silu' is implemented")
        if cfg.get("mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        if arch == "qwen2" and cfg.get("use_sliding_window", False):
            raise ValueError("qwen2 with use_sliding_window=True is not supported")

        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        rope_theta, rope_scaling = _parse_rope(cfg)
        if arch == "qwen2":
            attention_bias, o_proj_bias = True, False
        else:
            attention_bias = o_proj_bias = bool(cfg.get("attention_bias", False))
        sliding_window = cfg.get("sliding_window") if arch == "mistral" else None

        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=parse_token_ids(cfg.get("eos_token_id")),
            o_proj_bias=o_proj_bias,
            sliding_window=int(sliding_window) if sliding_window else None,
        )


def parse_token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    """HF writes eos_token_id as an int, a list of ints, or null."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """Both layouts: transformers<5 (`rope_theta` + `rope_scaling`) and >=5 (`rope_parameters`)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    params.update(scaling)
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {rope_type!r}; supported: None, {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    missing = [k for k in _ROPE_KEYS[rope_type] if k not in params]
    if missing:
        raise ValueError(f"rope scaling {rope_type!r} is missing keys {missing}")
    kept = {k: params[k] for k in _ROPE_KEYS[rope_type]}
    kept["rope_type"] = rope_type
    return theta, tuple(sorted(kept.items()))
