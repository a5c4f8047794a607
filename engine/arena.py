"""One block of memory for a model's packed weights (or a KV cache), backed by transparent huge pages where
the OS allows.

A CPU decode step streams every weight matrix once (the bench model: 168 MB a step). With 4 KiB pages that
is ~43 000 pages a step, far more than the TLB holds, and the page walks slow the weight reads: the bench
model's batch-1 matmuls took 7.1 ms a step from 4 KiB pages and 6.6 ms from 2 MiB ones (measured,
docs/benchmarks.md). Linux hands out huge pages for a mapping advised with MADV_HUGEPAGE when transparent
huge pages are in "madvise" or "always" mode; one mapping for all matrices wastes at most one huge page.
Attention reads the KV cache the same way (batch 16 at long contexts reads more KV than weights).

`Arena(numel, dtype, device).take(shape)` returns consecutive views, each starting on a 64-byte
boundary; a fresh block reads as zeros. Off Linux, on GPUs, or with PDSERVE_HUGEPAGES=0 the block is a
plain `torch.zeros`.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from collections.abc import Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_ALIGN_BYTES = 64


def _huge_block(nbytes: int) -> Tensor | None:
    """uint8 [nbytes] in an anonymous mapping advised for huge pages, or None where that is unavailable."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or os.environ.get("PDSERVE_HUGEPAGES", "1") == "0":
        return None
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(advice)  # before the first touch: faults then take whole huge pages
    except (OSError, ValueError, AttributeError) as e:
        log.debug("no huge-page block for weights: %s", e)
        return None
    return torch.frombuffer(buf, dtype=torch.uint8)  # the tensor keeps the mapping alive


def _align(dtype: torch.dtype) -> int:
    """Elements of `dtype` in _ALIGN_BYTES (at least 1): where each `take` starts."""
    return max(1, _ALIGN_BYTES // dtype.itemsize)


class Arena:
    """`numel` elements of `dtype` on `device`, handed out in order by `take` (64-byte aligned views)."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.align = dtype, _align(dtype)
        capacity = max(numel, 1)
        block = _huge_block(capacity * dtype.itemsize) if device.type == "cpu" else None
        if block is not None:
            # touch every page now, as torch.zeros would: memory the machine cannot back fails here, at
            # start-up, not on some later request's first write
            self.buf = block.view(dtype).zero_()
        else:
            self.buf = torch.zeros(capacity, dtype=dtype, device=device)
        self.huge_pages = block is not None
        self.offset = 0

    @staticmethod
    def size_of(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> int:
        """Elements to reserve for `take`s of these shapes, in order, alignment padding included."""
        align = _align(dtype)
        return sum(-(-math.prod(s) // align) * align for s in shapes)

    def take(self, shape: tuple[int, ...]) -> Tensor:
        """A contiguous view of `shape` (zeros until written); its own torch.zeros once the block is used up."""
        start = -(-self.offset // self.align) * self.align
        n = math.prod(shape)
        if start + n > self.buf.numel():
            return torch.zeros(shape, dtype=self.dtype, device=self.buf.device)
        self.offset = start + n
        return self.buf[start : start + n].view(shape)
