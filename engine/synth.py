"""Write a small, deterministic, randomly initialised Llama checkpoint in HF format (for tests and benchmarks).

A random model is made only where it is asked for by name (`make_random_model`, `cached_random_model`,
`python -m engine.synth PATH`). `default_model_dir()` is the shipped model (`engine.model_dir`): when it
cannot be found that is an error, never a silent random model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict, Unpack

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.model_dir import shipped_model_dir

EOS_TOKEN = "<|endoftext|>"
SYNTH_VERSION = 1  # bump when the generated checkpoint changes, so cached copies are regenerated
_TRAIN_TEXT_BYTES = 3 * 2**20


class ModelShape(TypedDict, total=False):
    """`make_random_model`'s size and seed arguments: what `cached_random_model` keys its cache on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_size: int
    max_pos: int
    seed: int


def make_random_model(
    path: str | os.PathLike[str],
    *,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 8,
    kv_heads: int = 2,
    intermediate: int = 688,
    vocab_size: int = 4096,
    max_pos: int = 2048,
    seed: int = 0,
    tokenizer_texts: list[str] | None = None,
) -> str:
    """Write config.json, generation_config.json, model.safetensors and tokenizer.json into `path`.

    Same arguments -> same files (on the same Python stdlib, which the tokenizer is trained on).
    """
    os.makedirs(path, exist_ok=True)
    tokenizer = train_tokenizer(
        tokenizer_texts if tokenizer_texts is not None else stdlib_texts(), vocab_size
    )
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    _write_json(os.path.join(path, "config.json"), config)
    _write_json(
        os.path.join(path, "generation_config.json"), {"bos_token_id": eos_id, "eos_token_id": eos_id}
    )
    weights = random_weights(layers, hidden, heads, kv_heads, head_dim, intermediate, vocab_size, seed)
    # a single metadata key: safetensors writes a map's keys in arbitrary order, breaking determinism
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def random_weights(
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    vocab: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Gaussian weights, large enough that logits are well spread (std ~3) and greedy picks are not ties."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    proj_std = 0.08
    w = {"model.embed_tokens.weight": randn(vocab, hidden, std=1.0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(hidden)
        w[p + "self_attn.q_proj.weight"] = randn(heads * head_dim, hidden, std=proj_std)
        w[p + "self_attn.k_proj.weight"] = randn(kv_heads * head_dim, hidden, std=proj_std)
        w[p + "self_attn.v_proj.weight"] = randn(kv_heads * head_dim, hidden, std=proj_std)
        w[p + "self_attn.o_proj.weight"] = randn(hidden, heads * head_dim, std=proj_std)
        w[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        w[p + "mlp.gate_proj.weight"] = randn(intermediate, hidden, std=proj_std)
        w[p + "mlp.up_proj.weight"] = randn(intermediate, hidden, std=proj_std)
        w[p + "mlp.down_proj.weight"] = randn(hidden, intermediate, std=proj_std)
    w["model.norm.weight"] = torch.ones(hidden)
    w["lm_head.weight"] = randn(vocab, hidden, std=3.0 / hidden**0.5)
    return w


def train_tokenizer(texts: list[str] | Iterator[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: any text encodes, decoding is exact) with EOS_TOKEN as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def stdlib_texts(max_bytes: int = _TRAIN_TEXT_BYTES) -> list[str]:
    """The first `max_bytes` of the Python standard library's .py sources, in sorted path order."""
    root = os.path.dirname(os.__file__)
    texts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
            texts.append(text)
            total += len(text)
            if total >= max_bytes:
                return texts
    return texts


def default_model_dir() -> str:
    """The shipped model (`engine.model_dir.shipped_model_dir`); ModelNotFoundError when it is missing."""
    return shipped_model_dir()


def cached_random_model(**kwargs: Unpack[ModelShape]) -> str:
    """`make_random_model(**kwargs)` generated once into ~/.cache/pdserve/models/random-llama-<hash>.

    Concurrent callers are safe: each writes a temp dir and renames it into place; the loser discards its copy.
    """
    key = json.dumps({"v": SYNTH_VERSION, "py": sys.version_info[:2], **kwargs}, sort_keys=True)
    target = cache_dir() / "models" / f"random-llama-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        make_random_model(tmp, **kwargs)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def cache_dir() -> Path:
    if os.environ.get("PDSERVE_CACHE_DIR"):
        return Path(os.environ["PDSERVE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdserve"


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description="Write a random Llama checkpoint in HF format.")
    ap.add_argument("path")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_random_model(args.path, layers=args.layers, hidden=args.hidden, seed=args.seed))


if __name__ == "__main__":
    main()
