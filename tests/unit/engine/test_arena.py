"""Arena: aligned views of one block, huge pages where the OS offers them, and a plain fallback."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.arena import Arena
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.synth import cached_random_model


def test_views_are_aligned_disjoint_and_writable() -> None:
    shapes = [(3, 5), (7, 16), (1, 1), (64, 33)]
    arena = Arena(Arena.size_of(shapes, torch.float32), torch.float32, torch.device("cpu"))
    views = [arena.take(s) for s in shapes]
    for i, (v, s) in enumerate(zip(views, shapes, strict=True)):
        assert v.shape == s and v.is_contiguous() and v.data_ptr() % 64 == 0
        assert v.untyped_storage().data_ptr() == arena.buf.untyped_storage().data_ptr()  # all in the block
        v.fill_(float(i))
    for i, v in enumerate(views):  # no view overwrote another
        assert bool((v == i).all())


def test_a_take_beyond_the_reservation_gets_its_own_memory() -> None:
    arena = Arena(16, torch.float32, torch.device("cpu"))
    a = arena.take((16,))
    b = arena.take((4096,))  # past the block: a separate allocation, not an overlap
    a.fill_(1.0)
    b.fill_(2.0)
    assert bool((a == 1).all()) and bool((b == 2).all())


def test_huge_pages_are_requested_unless_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    on = Arena(1 << 20, torch.float32, torch.device("cpu"))
    assert on.huge_pages == hasattr(mmap, "MADV_HUGEPAGE")
    monkeypatch.setenv("PDSERVE_HUGEPAGES", "0")
    off = Arena(1 << 20, torch.float32, torch.device("cpu"))
    assert not off.huge_pages
    assert off.take((8, 8)).shape == (8, 8)


def test_packed_model_weights_live_in_one_arena_with_the_checkpoint_values() -> None:
    model_dir = cached_random_model(
        layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab_size=256
    )
    model = load_model(model_dir, device="cpu")
    attn, mlp = model.model.layer(0).self_attn, model.model.layer(1).mlp
    packed = [t for t in (attn.qkv_t, attn.o_t, mlp.gate_up_t, mlp.down_t) if t is not None]
    assert len(packed) == 4  # load_model packed them
    base = packed[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in packed)  # one block
    # the named parameters are views of the packed matrices and hold the checkpoint's values
    assert attn.q_proj.weight.untyped_storage().data_ptr() == base
    saved = load_file(str(Path(model_dir) / "model.safetensors"))
    assert torch.equal(attn.q_proj.weight, saved["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(attn.v_proj.weight, saved["model.layers.0.self_attn.v_proj.weight"])
    assert torch.equal(packed[3].t(), saved["model.layers.1.mlp.down_proj.weight"])


def test_kv_cache_planes_are_zeroed_disjoint_views_of_one_block() -> None:
    cache = KVCache(num_layers=2, num_blocks=3, block_size=4, num_kv_heads=2, head_dim=8)
    assert cache.k.shape == cache.v.shape == (2, 3, 4, 2, 8)
    assert bool((cache.k == 0).all()) and bool((cache.v == 0).all())
    assert cache.k.untyped_storage().data_ptr() == cache.v.untyped_storage().data_ptr()
    cache.k.fill_(1.0)
    assert bool((cache.v == 0).all())  # K's writes do not reach V
