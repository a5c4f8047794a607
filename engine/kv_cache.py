"""The paged KV memory of one engine instance: per layer, `num_blocks` blocks of `block_size` token slots.

A token at position `p` of a sequence owning `blocks` lives in slot `blocks[p // B] * B + p % B` of the
flattened `[num_blocks * B]` slot axis. Which blocks a sequence owns is `BlockManager`'s business.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.arena import Arena


def slots_for(blocks: list[int], start: int, num_tokens: int, block_size: int) -> Tensor:
    """Flat slot index of positions [start, start + num_tokens) of a sequence owning `blocks`. -> [T] int64"""
    end = start + num_tokens
    if end > len(blocks) * block_size:
        raise ValueError(
            f"positions up to {end} need {-(-end // block_size)} blocks, sequence owns {len(blocks)}"
        )
    pos = torch.arange(start, end, dtype=torch.long)
    table = torch.tensor(blocks, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


class KVCache:
    """k, v: [L, num_blocks, B, Hkv, D]. `layer` indexes this cache's own layers (0..L-1)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        arena = Arena(
            Arena.size_of([shape, shape], dtype), dtype, torch.device(device)
        )  # huge pages if available
        self.k, self.v = arena.take(shape), arena.take(shape)  # zeros
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    def _flat(self, layer: int) -> tuple[Tensor, Tensor]:
        # [num_blocks, B, Hkv, D] -> [num_blocks * B, Hkv, D] (a view)
        return self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)

    def write_slots(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """k, v: [T, Hkv, D] go to flat slots [T]."""
        k_flat, v_flat = self._flat(layer)
        slots = slots.to(self.device)
        k_flat.index_copy_(0, slots, k.to(device=self.device, dtype=self.dtype))  # cheaper than index_put_
        v_flat.index_copy_(0, slots, v.to(device=self.device, dtype=self.dtype))

    def gather_slots(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """slots: any int shape S -> k, v: [*S, Hkv, D] (copies)."""
        k_flat, v_flat = self._flat(layer)
        slots = slots.to(self.device)
        return k_flat[slots], v_flat[slots]

    def write(self, layer: int, blocks: list[int], start: int, k: Tensor, v: Tensor) -> None:
        """Store k, v: [T, Hkv, D] as positions [start, start + T) of the sequence owning `blocks`."""
        self.write_slots(layer, slots_for(blocks, start, k.shape[0], self.block_size), k, v)

    def read(self, layer: int, blocks: list[int], num_tokens: int) -> tuple[Tensor, Tensor]:
        """Positions [0, num_tokens) of the sequence owning `blocks` -> k, v: [T, Hkv, D]."""
        return self.gather_slots(layer, slots_for(blocks, 0, num_tokens, self.block_size))
