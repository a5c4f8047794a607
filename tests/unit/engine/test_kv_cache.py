from __future__ import annotations

import pytest
import torch

from engine.kernels import kernels_available
from engine.kv_cache import MAX_SLICE_RUNS, KVCache, slot_runs, slots_for


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


def test_run_views_are_the_cache_itself_for_one_run_and_none_for_scattered_blocks():
    cache = KVCache(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=3)
    views = cache.run_views(1, [2, 3, 4], 1, 10)  # positions 1..10 of blocks 2, 3, 4: slots 9..18
    assert views is not None
    k, v = views
    assert k.shape == v.shape == (10, 2, 3) and k.is_contiguous() and v.is_contiguous()
    k.copy_(torch.arange(60.0).reshape(10, 2, 3))
    v.fill_(1.0)
    rk, rv = cache.read(1, [2, 3, 4], 11)  # what a decoder wrote in place is what the sequence reads
    assert torch.equal(rk[1:], torch.arange(60.0).reshape(10, 2, 3)) and bool((rv[1:] == 1).all())
    assert cache.k[0].abs().sum() == 0 and float(rk[0].abs().sum()) == 0
    assert cache.run_views(1, [2, 5, 4], 0, 10) is None  # not one run of slots: the caller writes a copy
    with pytest.raises(ValueError, match="need 3 blocks"):
        cache.run_views(0, [2, 3], 0, 10)


def test_slot_runs_merge_consecutive_blocks():
    # block size 4, blocks [3, 4, 9, 10, 11, 0]; positions 2..21 -> slots 14..19 | 36..47 | 0..1
    assert slot_runs([3, 4, 9, 10, 11, 0], 2, 20, block_size=4) == [(14, 0, 6), (36, 6, 12), (0, 18, 2)]
    flat = [s + i for s, _, n in slot_runs([3, 4, 9, 10, 11, 0], 2, 20, 4) for i in range(n)]
    assert flat == slots_for([3, 4, 9, 10, 11, 0], 2, 20, 4).tolist()
    with pytest.raises(ValueError, match="need 3 blocks"):
        slot_runs([0, 1], 0, 9, block_size=4)


def test_slot_runs_of_one_run_and_of_blocks_that_only_span_a_range():
    # consecutive blocks from the middle of a block on: one run (the one-comparison path)
    assert slot_runs([7, 8, 9, 2], 3, 7, block_size=4) == [(31, 0, 7)]
    assert slot_runs([5], 0, 0, block_size=4) == []
    # [0, 2, 1, 3] spans 0..3 like one run but is not in order: four runs, as slots_for says
    runs = slot_runs([0, 2, 1, 3], 0, 16, block_size=4)
    assert runs == [(0, 0, 4), (8, 4, 4), (4, 8, 4), (12, 12, 4)]
    assert [s + i for s, _, n in runs for i in range(n)] == slots_for([0, 2, 1, 3], 0, 16, 4).tolist()


@pytest.mark.parametrize("use_kernel", [True, False], ids=["c", "torch"])
@pytest.mark.parametrize("scattered", [False, True], ids=["slices", "indexed"])
def test_writes_of_disjoint_heads_fill_the_same_positions(scattered: bool, use_kernel: bool):
    # more runs than MAX_SLICE_RUNS take the indexed copy; fewer, one slice copy per run
    n_blocks = MAX_SLICE_RUNS + 2
    blocks = list(range(0, 2 * n_blocks, 2)) if scattered else list(range(3, 3 + n_blocks))
    assert (len(slot_runs(blocks, 0, 4 * n_blocks, 4)) > MAX_SLICE_RUNS) == scattered
    cache = KVCache(
        num_layers=1,
        num_blocks=2 * n_blocks + 3,
        block_size=4,
        num_kv_heads=4,
        head_dim=3,
        use_kernel=use_kernel,
    )
    k, v = torch.randn(4 * n_blocks - 1, 4, 3), torch.randn(4 * n_blocks - 1, 4, 3)
    cache.write(0, blocks, 1, k[1:, 1:3].contiguous(), v[1:, 1:3].contiguous(), heads=(1, 3))
    cache.write(0, blocks, 1, k[1:, :1], v[1:, :1], heads=(0, 1))
    cache.write(0, blocks, 1, k[1:, 3:], v[1:, 3:], heads=(3, 4))
    cache.write(0, blocks, 0, k[:1], v[:1])
    rk, rv = cache.read(0, blocks, k.shape[0])
    assert torch.equal(rk, k) and torch.equal(rv, v)
    with pytest.raises(ValueError, match="KV heads"):
        cache.write(0, blocks, 0, k[:, :2], v[:, :2], heads=(3, 5))


@pytest.mark.parametrize(
    ("head_dim", "num_kv_heads", "dtype"),
    [(32, 2, torch.float32), (8, 4, torch.float32), (64, 3, torch.float16), (3, 2, torch.float32)],
    ids=["streamed-128B", "streamed-32B", "fp16", "memcpy-12B"],
)
def test_the_c_write_stores_the_same_bytes_as_torch(head_dim: int, num_kv_heads: int, dtype: torch.dtype):
    # head rows of 32-byte multiples take the non-temporal stores, others a memcpy per row; whole slots one
    # memcpy per run; a cast or non-contiguous source torch's copy: every path must store the same bytes
    c = KVCache(3, 40, 16, num_kv_heads, head_dim, dtype=dtype)
    ref = KVCache(3, 40, 16, num_kv_heads, head_dim, dtype=dtype, use_kernel=False)
    assert ref._write_rows is None and (c._write_rows is not None) == kernels_available()
    gen = torch.Generator().manual_seed(0)
    cases = [
        (list(range(5, 13)), 0, 128, (1, 2)),  # one run, one head (a TP2 -> TP1 piece)
        (list(range(5, 13)), 0, 128, (0, 1)),
        ([3, 4, 20, 21, 22, 9, 10, 30], 7, 100, (0, num_kv_heads)),  # several runs, whole slots
        ([3, 4, 20, 21, 22, 9, 10, 30], 7, 100, (num_kv_heads - 1, num_kv_heads)),
        ([0, 2, 4, 6, 8, 10, 12, 14, 16, 18], 0, 160, (0, 1)),  # past MAX_SLICE_RUNS: the indexed copy
    ]
    for layer, (blocks, start, n, heads) in enumerate(cases):
        for src_dtype, contiguous in [(dtype, True), (torch.float32, True), (dtype, False)]:
            shape = (n, heads[1] - heads[0], head_dim)
            k = torch.randn(shape, generator=gen).to(src_dtype)
            v = torch.randn(shape, generator=gen).to(src_dtype)
            if not contiguous:
                k, v = (
                    k.transpose(0, 1).contiguous().transpose(0, 1),
                    v.transpose(0, 1).contiguous().transpose(0, 1),
                )
            c.write(layer % 3, blocks, start, k, v, heads=heads)
            ref.write(layer % 3, blocks, start, k, v, heads=heads)
            assert torch.equal(c.k.view(torch.uint8), ref.k.view(torch.uint8))
            assert torch.equal(c.v.view(torch.uint8), ref.v.view(torch.uint8))
    assert c.k.abs().sum() > 0


def test_bytes_per_block():
    assert KVCache.bytes_per_block(4, 16, 2, 32, torch.float32) == 2 * 4 * 16 * 2 * 32 * 4
