"""The paged KV memory of one engine instance: per layer, `num_blocks` blocks of `block_size` token slots.

A token at position `p` of a sequence owning `blocks` lives in slot `blocks[p // B] * B + p % B` of the
flattened `[num_blocks * B]` slot axis. Which blocks a sequence owns is `BlockManager`'s business.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.arena import Arena
from engine.kernels import kv_write_rows_fn


def _owned_end(blocks: list[int], start: int, num_tokens: int, block_size: int) -> int:
    """start + num_tokens, once `blocks` are checked to hold every position before it (ValueError if not)."""
    end = start + num_tokens
    if end > len(blocks) * block_size:
        raise ValueError(
            f"positions up to {end} need {-(-end // block_size)} blocks, sequence owns {len(blocks)}"
        )
    return end


def slots_for(blocks: list[int], start: int, num_tokens: int, block_size: int) -> Tensor:
    """Flat slot index of positions [start, start + num_tokens) of a sequence owning `blocks`. -> [T] int64"""
    end = _owned_end(blocks, start, num_tokens, block_size)
    pos = torch.arange(start, end, dtype=torch.long)
    table = torch.tensor(blocks, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


# Above this many runs of consecutive blocks, `KVCache.write` makes one indexed copy instead of a copy per run.
MAX_SLICE_RUNS = 8


def slot_runs(blocks: list[int], start: int, num_tokens: int, block_size: int) -> list[tuple[int, int, int]]:
    """Positions [start, start + num_tokens) of a sequence owning `blocks` as runs of contiguous flat slots:
    [(first slot, first position - start, length)], in position order. ValueError if the blocks are too few."""
    end = _owned_end(blocks, start, num_tokens, block_size)
    if num_tokens <= 0:
        return []
    first, last = start // block_size, (end - 1) // block_size
    b0 = blocks[first]
    if blocks[first : last + 1] == list(range(b0, b0 + last - first + 1)):
        # one run, a fresh sequence's usual case: checked by one list comparison (in C), not block by block
        # (~10 us for 64 blocks, on every layer and piece a hand-off writes)
        return [(b0 * block_size + start % block_size, 0, num_tokens)]
    runs: list[tuple[int, int, int]] = []
    pos = start
    while pos < end:
        i = pos // block_size
        j = i + 1  # extend the run while the next block follows this one in the cache
        while j * block_size < end and blocks[j] == blocks[j - 1] + 1:
            j += 1
        n = min(j * block_size, end) - pos
        runs.append((blocks[i] * block_size + pos % block_size, pos - start, n))
        pos += n
    return runs


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
        use_kernel: bool = True,
    ) -> None:
        """use_kernel: write with the C routine where it loads (False: torch's copies, the fallback)."""
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        arena = Arena(
            Arena.size_of([shape, shape], dtype), dtype, torch.device(device)
        )  # huge pages if available
        self.k, self.v = arena.take(shape), arena.take(shape)  # zeros
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        # per layer: k, v as [num_blocks * B, Hkv, D] views, made once (a view costs microseconds, which a
        # hand-off paid on every layer it wrote); heads (h0, h1) -> their [num_blocks * B, h1 - h0, D] views
        self._flats = [(self.k[la].flatten(0, 1), self.v[la].flatten(0, 1)) for la in range(num_layers)]
        self._head_views: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}
        # `write`'s copies: the C routine on CPU (engine.kernels.kv_write_rows; None: torch's copy_)
        self._write_rows = kv_write_rows_fn() if use_kernel and self.k.device.type == "cpu" else None
        self._slot_bytes = num_kv_heads * head_dim * self.k.element_size()  # one slot's row, every head

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
        return self._flats[layer]

    def _heads_flat(self, layer: int, h0: int, h1: int) -> tuple[Tensor, Tensor]:
        """KV heads [h0, h1) of _flat(layer): [num_blocks * B, h1 - h0, D] views (made once per range)."""
        views = self._head_views.get((layer, h0, h1))
        if views is None:
            k_flat, v_flat = self._flats[layer]
            views = self._head_views[(layer, h0, h1)] = (k_flat[:, h0:h1], v_flat[:, h0:h1])
        return views

    def _cast(self, x: Tensor) -> Tensor:
        """x on this cache's device and dtype (x itself when it already is)."""
        if x.dtype == self.k.dtype and x.device == self.k.device:
            return x
        return x.to(device=self.k.device, dtype=self.k.dtype)

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

    def write(
        self,
        layer: int,
        blocks: list[int],
        start: int,
        k: Tensor,
        v: Tensor,
        heads: tuple[int, int] | None = None,
    ) -> None:
        """Store k, v: [T, h1 - h0, D] as positions [start, start + T) of the sequence owning `blocks`, KV heads
        [h0, h1) (`heads`; default all). Runs of consecutive blocks are written as slices (a fresh sequence's
        blocks mostly are one run): about half the cost of an indexed copy; on CPU each run is one call of
        the C routine (engine.kernels.kv_write_rows: a subset of the heads is a strided write, which
        torch's copy_ made at about twice the time per byte of a whole-slot copy). Threads may write
        disjoint heads of the same positions at once (the C routine runs without the GIL)."""
        h0, h1 = heads if heads is not None else (0, self.num_kv_heads)
        if not 0 <= h0 < h1 <= self.num_kv_heads or k.shape[1] != h1 - h0:
            raise ValueError(
                f"KV heads [{h0}, {h1}) of {self.num_kv_heads} cannot take k of shape {tuple(k.shape)}"
            )
        num_tokens = k.shape[0]
        runs = slot_runs(blocks, start, num_tokens, self.block_size)
        k_flat, v_flat = self._heads_flat(layer, h0, h1)
        k, v = self._cast(k), self._cast(v)
        if len(runs) > MAX_SLICE_RUNS:  # scattered blocks: one indexed copy beats many small ones
            slots = slots_for(blocks, start, num_tokens, self.block_size).to(self.device)
            k_flat.index_copy_(0, slots, k)
            v_flat.index_copy_(0, slots, v)
            return
        write_rows = self._write_rows
        if write_rows is not None and k.is_contiguous() and v.is_contiguous():
            # rows of `row` bytes (the heads written of one slot) from k, v to slots `stride` bytes apart
            row, stride = k.shape[1] * k.shape[2] * k.element_size(), self._slot_bytes
            dk, dv, sk, sv = k_flat.data_ptr(), v_flat.data_ptr(), k.data_ptr(), v.data_ptr()
            for slot, pos, n in runs:
                write_rows(
                    dk + slot * stride, dv + slot * stride, sk + pos * row, sv + pos * row, n, row, stride
                )
            return
        for slot, pos, n in runs:
            if n == num_tokens:  # one run: the whole of k, v (no source slices to make)
                k_flat[slot : slot + n].copy_(k)
                v_flat[slot : slot + n].copy_(v)
            else:
                k_flat[slot : slot + n].copy_(k[pos : pos + n])
                v_flat[slot : slot + n].copy_(v[pos : pos + n])

    def run_views(
        self, layer: int, blocks: list[int], start: int, num_tokens: int
    ) -> tuple[Tensor, Tensor] | None:
        """Positions [start, start + num_tokens) of the sequence owning `blocks`, every KV head, as contiguous
        k, v [T, Hkv, D] views of this cache where they are one run of slots (a fresh sequence's usual case),
        else None: what a decoder can write in place instead of handing a copy to `write`."""
        runs = slot_runs(blocks, start, num_tokens, self.block_size)
        if len(runs) != 1:
            return None
        slot, _, n = runs[0]
        k_flat, v_flat = self._flats[layer]
        return k_flat[slot : slot + n], v_flat[slot : slot + n]

    def read(self, layer: int, blocks: list[int], num_tokens: int) -> tuple[Tensor, Tensor]:
        """Positions [0, num_tokens) of the sequence owning `blocks` -> k, v: [T, Hkv, D]."""
        return self.gather_slots(layer, slots_for(blocks, 0, num_tokens, self.block_size))
