"""prefill_service.engine.read_host_kv, a lease's read_layer: the same K/V as KVCache.read; a view of the
cache (no copy) where the positions lie in one run of consecutive blocks, a gather otherwise."""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache
from prefill_service.engine import read_host_kv


def _cache() -> KVCache:
    cache = KVCache(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=3)
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    return cache


def test_one_run_of_blocks_is_read_as_a_view_equal_to_the_gather():
    cache = _cache()
    blocks, n = [2, 3, 4], 10  # one run; the last block partly used
    k, v = read_host_kv(cache, blocks, n, 1)
    gk, gv = cache.read(1, blocks, n)
    assert k.shape == (n, 2, 3) and k.is_contiguous() and v.is_contiguous()
    assert torch.equal(k, gk) and torch.equal(v, gv)
    assert k.untyped_storage().data_ptr() == cache.k.untyped_storage().data_ptr()  # no copy


def test_blocks_out_of_order_are_gathered():
    cache = _cache()
    blocks, n = [5, 1, 2], 12
    k, v = read_host_kv(cache, blocks, n, 0)
    gk, gv = cache.read(0, blocks, n)
    assert torch.equal(k, gk) and torch.equal(v, gv)
    assert k.untyped_storage().data_ptr() != cache.k.untyped_storage().data_ptr()
