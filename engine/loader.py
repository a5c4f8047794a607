"""Build a `CausalLM` and fill it from a directory of HF `*.safetensors` files (single or sharded), by name.

A tensor-parallel shard reads only its slice of each sharded tensor from the files (`tp_slice`)."""

from __future__ import annotations

import re
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine.checkpoint import safetensors_files
from engine.config import ModelConfig
from engine.model import CausalLM, Shard

# Keys some checkpoints carry that we recompute instead of loading.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def load_model(
    model_dir: str,
    config: ModelConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    layer_start: int = 0,
    layer_end: int | None = None,
    shard: Shard | None = None,
) -> CausalLM:
    """Construct on the meta device (no random init), materialise on `device` in `dtype`, load weights
    (TP shard `shard`'s slices of them), then pack them for inference (`CausalLM.pack_weights`)."""
    config = config or ModelConfig.from_hf_dir(model_dir)
    with torch.device("meta"):
        model = CausalLM(config, layer_start, layer_end, shard or Shard())
    _materialise(model, torch.device(device), dtype)
    load_weights(model, model_dir)
    model.pack_weights()
    return model.eval()


def _materialise(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter and buffer uninitialised storage on `device` (floating point ones in `dtype`).

    What `model.to(dtype).to_empty(device)` does, without its meta-tensor path (`empty_like` of a meta
    tensor runs a Python decomposition that imports sympy: ~0.5 s of every instance's start-up)."""
    made: dict[int, nn.Parameter] = {}  # a parameter shared by two modules stays shared
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) not in made:
                    dt = dtype if p.is_floating_point() else p.dtype
                    made[id(p)] = nn.Parameter(
                        torch.empty(p.shape, dtype=dt, device=device), requires_grad=p.requires_grad
                    )
                module._parameters[name] = made[id(p)]
        for name, b in module._buffers.items():
            if b is not None:
                dt = dtype if b.is_floating_point() else b.dtype
                module._buffers[name] = torch.empty(b.shape, dtype=dt, device=device)


def load_weights(model: CausalLM, model_dir: str) -> None:
    """Copy every checkpoint tensor into the parameter of the same name (casting dtype, moving device).

    Strict: a parameter with no tensor, or a tensor with no parameter (outside this model's layer range),
    raises ValueError. A checkpoint `lm_head.weight` is skipped when embeddings are tied.
    """
    params = dict(model.named_parameters())
    # a pipeline's last stage holds a tied LM head without the embedding: it loads the embedding's tensor
    tied_copy = model.config.tie_word_embeddings and model.lm_head is not None
    loaded: set[str] = set()
    unexpected: list[str] = []
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = "lm_head.weight" if tied_copy and key == "model.embed_tokens.weight" else key
                if tied_copy and key == "lm_head.weight":
                    continue  # the tied head is the embedding's tensor (read under that name)
                if name in params:
                    param = params[name]
                    tensor = tp_slice(f.get_slice(key), name, model.config, model.shard)
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise ValueError(
                            f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}"
                        )
                    with torch.no_grad():
                        param.copy_(tensor)
                    loaded.add(name)
                elif not _expected_elsewhere(model, name):
                    unexpected.append(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} weights, e.g. {missing[:5]}")
    if unexpected:
        raise ValueError(
            f"checkpoint in {model_dir} has {len(unexpected)} unknown weights, e.g. {unexpected[:5]}"
        )


def tp_slice(sl: Any, name: str, config: ModelConfig, shard: Shard) -> torch.Tensor:
    """Shard `shard`'s part of checkpoint tensor `name` (sl: a safetensors slice, read lazily).

    Column-parallel (output rows): q_proj by query heads, k/v_proj by KV heads, gate/up_proj by MLP columns.
    Row-parallel (input columns): o_proj by query heads, down_proj by MLP columns; o_proj's bias is added
    once, by TP rank 0 (the others hold zeros: the all-reduce sums the partial outputs). Everything else
    (embedding, norms, LM head) is replicated."""
    if shard.tp == 1 or ".layers." not in name:
        return sl[:]
    d = config.head_dim
    (h0, h1), (k0, k1), (c0, c1) = shard.heads(config), shard.kv_heads(config), shard.columns(config)
    if ".q_proj." in name:
        return sl[h0 * d : h1 * d]
    if ".k_proj." in name or ".v_proj." in name:
        return sl[k0 * d : k1 * d]
    if name.endswith("o_proj.weight"):
        return sl[:, h0 * d : h1 * d]
    if name.endswith("o_proj.bias"):
        full = sl[:]
        return full if shard.tp_rank == 0 else torch.zeros_like(full)
    if ".gate_proj." in name or ".up_proj." in name:
        return sl[c0:c1]
    if ".down_proj." in name:
        return sl[:, c0:c1]
    return sl[:]


def _expected_elsewhere(model: CausalLM, name: str) -> bool:
    """A checkpoint key that this model legitimately does not hold."""
    if _IGNORED.search(name):
        return True
    if name == "lm_head.weight" and (model.config.tie_word_embeddings or not model.model.is_last):
        return True
    if name == "model.embed_tokens.weight" and not model.model.is_first:
        return True
    if name == "model.norm.weight" and not model.model.is_last:
        return True
    m = _LAYER.match(name)
    return m is not None and not model.layer_start <= int(m.group(1)) < model.layer_end
