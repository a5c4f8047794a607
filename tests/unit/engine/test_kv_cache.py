from __future__ import annotations

import pytest
import torch

from engine.kv_cache import KVCache, slots_for


def test_slots_follow_the_block_table():
    # block size 4, blocks [7, 2]: positions 0..3 -> slots 28..31, positions 4..5 -> slots 8, 9
    assert slots_for([7, 2], 2, 4, block_size=4).tolist() == [30, 31, 8, 9]


def test_slots_refuse_positions_beyond_owned_blocks():
    with pytest.raises(ValueError, match="need 3 blocks"):
        slots_for([0, 1], 0, 9, block_size=4)


def test_write_then_read_roundtrip_across_scattered_blocks():
    cache = KVCache(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=3)
    blocks = [5, 1, 6]
    k, v = torch.randn(10, 2, 3), torch.randn(10, 2, 3)
    cache.write(1, blocks, 0, k[:7], v[:7])  # a chunk, then the rest
    cache.write(1, blocks, 7, k[7:], v[7:])
    rk, rv = cache.read(1, blocks, 10)
    torch.testing.assert_close(rk, k, rtol=0, atol=0)
    torch.testing.assert_close(rv, v, rtol=0, atol=0)
    assert cache.k[0].abs().sum() == 0, "layer 0 must be untouched"
    assert cache.k[1, [0, 2, 3, 4, 7]].abs().sum() == 0, "blocks the sequence does not own must be untouched"
    torch.testing.assert_close(cache.k[1, 6, :2], k[8:10], rtol=0, atol=0)


def test_bytes_per_block():
    assert KVCache.bytes_per_block(4, 16, 2, 32, torch.float32) == 2 * 4 * 16 * 2 * 32 * 4
