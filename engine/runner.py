"""`ModelRunner`: owns the model weights and KV cache on one device; runs prefill / decode steps and samples."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.checkpoint import model_fingerprint
from engine.config import ModelConfig
from engine.device import Device, bind
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.model import BatchMeta
from engine.sampling import sample
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer

DEFAULT_KV_CACHE_BYTES = 256 * 2**20


def histories(seqs: list[Sequence]) -> list[list[int]] | None:
    """Each sequence's tokens so far, for the sampler's repetition penalty; None when no sequence has one
    (`sample` reads them only then, and building them copies every sequence's whole context each step)."""
    if all(s.params.repetition_penalty == 1.0 for s in seqs):
        return None
    return [s.all_ids for s in seqs]


class ModelRunner:
    """The only engine object that touches the device. Not thread-safe: drive it from one step loop.

    Sequences bring their own KV blocks (`seq.blocks`, from a `BlockManager` sized `kv_cache.num_blocks`).
    `prefill` / `decode` advance `seq.num_cached` and return sampled tokens; they do not append to
    `seq.output_ids` or decide stopping -- the caller does (see `engine.local.LocalEngine`).
    """

    def __init__(
        self,
        model_dir: str,
        device: Device | None = None,
        num_kv_blocks: int | None = None,
        block_size: int = 16,
        *,
        dtype: torch.dtype | None = None,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
    ) -> None:
        self.model_dir, self.device, self.block_size = model_dir, device or Device(), block_size
        self.torch_device = bind(self.device)
        self.dtype = dtype or (torch.float32 if self.device.kind == "cpu" else torch.bfloat16)
        self.config = ModelConfig.from_hf_dir(model_dir)
        self.tokenizer = Tokenizer(model_dir)
        self.max_model_len = self.config.max_position_embeddings
        self.model = load_model(model_dir, self.config, self.torch_device, self.dtype)
        cfg = self.config
        per_block = KVCache.bytes_per_block(
            cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype
        )
        num_blocks = num_kv_blocks or max(1, kv_cache_bytes // per_block)
        self.kv_cache = KVCache(
            cfg.num_layers,
            num_blocks,
            block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.dtype,
            self.torch_device,
        )
        self.fingerprint = model_fingerprint(model_dir)

    def prefill(
        self,
        seqs: list[Sequence],
        on_layer: Callable[[int], object] | None = None,
        num_new: list[int] | None = None,
    ) -> list[int | None]:
        """Write the KV of each seq's uncached tokens; sample its next token (step len(output_ids)).

        `num_new[i]` limits seq i to a chunk of its uncached tokens (default: all of them). A seq whose
        tokens are not all cached after this chunk gets None instead of a token.
        """
        if not seqs:
            return []
        num_new = num_new or [s.num_tokens - s.num_cached for s in seqs]
        for s, n in zip(seqs, num_new, strict=True):
            if not 0 < n <= s.num_tokens - s.num_cached:
                raise ValueError(f"{s.request_id}: chunk of {n} with {s.num_cached}/{s.num_tokens} cached")
        ids = [
            t for s, n in zip(seqs, num_new, strict=True) for t in s.all_ids[s.num_cached : s.num_cached + n]
        ]
        logits = self._forward(seqs, ids, num_new, on_layer)  # [N, V]
        for s, n in zip(seqs, num_new, strict=True):
            s.num_cached += n
        done = [i for i, s in enumerate(seqs) if s.num_cached == s.num_tokens]
        tokens: list[int | None] = [None] * len(seqs)
        sampled = sample(
            logits[done],
            [seqs[i].params for i in done],
            [len(seqs[i].output_ids) + seqs[i].params.step_offset for i in done],
            histories([seqs[i] for i in done]),
        )
        for i, t in zip(done, sampled, strict=True):
            tokens[i] = t
        return tokens

    def decode(self, seqs: list[Sequence]) -> list[int]:
        """One token per seq: feed `last_token` at position num_tokens - 1, write its KV, sample the next."""
        if not seqs:
            return []
        for s in seqs:
            if s.num_cached != s.num_tokens - 1:
                raise ValueError(
                    f"{s.request_id}: decode needs {s.num_tokens - 1} cached tokens, has {s.num_cached}"
                )
        logits = self._forward(seqs, [s.last_token for s in seqs], [1] * len(seqs), None)  # [N, V]
        for s in seqs:
            s.num_cached += 1
        return sample(
            logits,
            [s.params for s in seqs],
            [len(s.output_ids) + s.params.step_offset for s in seqs],
            histories(seqs),
        )

    def _forward(
        self,
        seqs: list[Sequence],
        ids: list[int],
        num_new: list[int],
        on_layer: Callable[[int], object] | None,
    ) -> torch.Tensor:
        """Run the model on each seq's next `num_new` tokens (from position num_cached) -> fp32 logits [N, V]."""
        starts = [s.num_cached for s in seqs]
        meta = BatchMeta.build(
            [s.blocks for s in seqs],
            starts,
            num_new,
            self.block_size,
            self.torch_device,
            self.config.sliding_window,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.torch_device)  # [T]
        with torch.inference_mode():
            return self.model(input_ids, meta, self.kv_cache, on_layer).float()
