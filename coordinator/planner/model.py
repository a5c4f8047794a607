"""The model's sizes, read from a Hugging Face `config.json` (Llama family and OPT field names).

Units: bytes. `kv_bytes_per_token` is one token's K and V over every layer in the serving dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "int8": 1}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    params: int  # parameter count (embeddings included, a tied LM head counted once)
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token, all layers (bytes)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": self.layers,
            "hidden": self.hidden,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "params": self.params,
            "dtype_bytes": self.dtype_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelSpec:
        """The inverse of `to_dict` (derived fields ignored)."""
        try:
            return ModelSpec(
                str(d["name"]),
                layers=int(d["layers"]),
                hidden=int(d["hidden"]),
                heads=int(d["heads"]),
                kv_heads=int(d["kv_heads"]),
                head_dim=int(d["head_dim"]),
                params=int(d["params"]),
                dtype_bytes=int(d.get("dtype_bytes", 2)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a model spec: {exc!r}") from exc


def _dtype_bytes(cfg: dict[str, Any]) -> int:
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16").replace("torch.", "")
    return DTYPE_BYTES.get(dtype, 2)


def spec_from_config(cfg: dict[str, Any], name: str = "") -> ModelSpec:
    """ModelSpec from config.json fields. OPT (`model_type` "opt": ffn_dim, learned positions, MHA) and the
    Llama family (num_key_value_heads, intermediate_size, gated MLP); `num_parameters` wins if present."""
    try:
        layers = int(cfg["num_hidden_layers"])
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
    except KeyError as exc:
        raise ValueError(
            f"config.json lacks {exc.args[0]!r} (need num_hidden_layers, hidden_size, ...)"
        ) from exc
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = int(cfg.get("vocab_size", 32000))
    if cfg.get("model_type") == "opt":
        ffn = int(cfg.get("ffn_dim", 4 * hidden))
        positions = (
            int(cfg.get("max_position_embeddings", 2048)) + 2
        )  # OPT's learned positions are offset by 2
        # per layer: q,k,v,o with biases, fc1/fc2 with biases, two layer norms (weight + bias)
        layer = 4 * (hidden * hidden + hidden) + (hidden * ffn + ffn) + (ffn * hidden + hidden) + 4 * hidden
        params = vocab * hidden + positions * hidden + layers * layer + 2 * hidden
    else:
        inter = int(cfg.get("intermediate_size", 4 * hidden))
        qkv = hidden * (heads + 2 * kv_heads) * head_dim
        layer = qkv + heads * head_dim * hidden + 3 * hidden * inter + 2 * hidden
        tied = bool(cfg.get("tie_word_embeddings", False))
        params = vocab * hidden * (1 if tied else 2) + layers * layer + hidden
    params = int(cfg.get("num_parameters") or params)
    label = name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "model")
    return ModelSpec(label, layers, hidden, heads, kv_heads, head_dim, params, _dtype_bytes(cfg))


# OPT-13B's config.json fields (facebook/opt-13b), for DistServe's profile when no config file is at hand.
OPT_13B_CONFIG: dict[str, Any] = {
    "_name_or_path": "facebook/opt-13b",
    "model_type": "opt",
    "num_hidden_layers": 40,
    "hidden_size": 5120,
    "num_attention_heads": 40,
    "ffn_dim": 20480,
    "vocab_size": 50272,
    "max_position_embeddings": 2048,
    "torch_dtype": "float16",
}
