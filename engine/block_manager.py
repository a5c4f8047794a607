"""Bookkeeping of which KV cache blocks are free, with per-block reference counts. No tensors."""

from __future__ import annotations

import threading
from collections import deque

from pdserve.errors import CapacityExceeded


class BlockManager:
    """Hands out block ids in [0, num_blocks). Thread-safe: every public method takes an internal lock.

    A block is free iff its reference count is 0. `allocate` gives blocks with count 1; `share` (for prefix
    sharing) increments; `free` decrements and returns a block to the free list when it reaches 0.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        with self._lock:
            return self.blocks_needed(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        """Blocks for `num_tokens` tokens. Raises CapacityExceeded (taking nothing) when too few are free."""
        n = self.blocks_needed(num_tokens)
        with self._lock:
            if n > len(self._free):
                raise CapacityExceeded(
                    f"need {n} KV blocks for {num_tokens} tokens, {len(self._free)} of {self.num_blocks} free"
                )
            blocks = [self._free.popleft() for _ in range(n)]
            for b in blocks:
                self._ref_counts[b] = 1
            return blocks

    def share(self, blocks: list[int]) -> None:
        """One more owner for each of `blocks` (all must be allocated)."""
        with self._lock:
            for b in blocks:
                self._check_owned(b, "share")
            for b in blocks:
                self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Freeing a block that is not allocated raises ValueError."""
        with self._lock:
            seen: dict[int, int] = {}
            for b in blocks:  # validate all first so a bad call changes nothing
                seen[b] = seen.get(b, 0) + 1
                self._check_owned(b, "free")
                if seen[b] > self._ref_counts[b]:
                    raise ValueError(f"double free of KV block {b} (ref count {self._ref_counts[b]})")
            for b in blocks:
                self._ref_counts[b] -= 1
                if self._ref_counts[b] == 0:
                    self._free.append(b)

    def _check_owned(self, block: int, op: str) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"{op}: KV block {block} out of range [0, {self.num_blocks})")
        if self._ref_counts[block] == 0:
            raise ValueError(f"{op}: KV block {block} is not allocated (double free?)")

    def ref_count(self, block: int) -> int:
        with self._lock:
            return self._ref_counts[block]

    def check_integrity(self, owners: list[list[int]] | None = None) -> None:
        """Assert internal consistency; with `owners` (every live holder's block list) also assert no leak.

        Raises AssertionError naming the first problem: a block both free and referenced, a duplicate on
        the free list, a block neither free nor referenced, or ref counts differing from `owners`.
        """
        with self._lock:
            free, counts = list(self._free), list(self._ref_counts)
        free_set = set(free)
        assert len(free_set) == len(free), (
            f"free list has duplicates: {sorted(b for b in free_set if free.count(b) > 1)}"
        )
        for b, c in enumerate(counts):
            assert c >= 0, f"block {b} has negative ref count {c}"
            assert (c == 0) == (b in free_set), (
                f"block {b}: ref count {c} but {'' if b in free_set else 'not '}free"
            )
        if owners is None:
            return
        expected = [0] * self.num_blocks
        for blocks in owners:
            for b in blocks:
                expected[b] += 1
        for b, (got, want) in enumerate(zip(counts, expected, strict=True)):
            if got > want:
                raise AssertionError(f"leak: block {b} has ref count {got} but only {want} live owner(s)")
            if got < want:
                raise AssertionError(
                    f"double free: block {b} has ref count {got} but {want} live owner(s) (freed while in use)"
                )
