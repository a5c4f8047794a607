"""The C kernels of `engine.kernels` against their torch references."""

from __future__ import annotations

import pytest
import torch

from engine import kernels
from engine.kernels import (
    SMALL_MATMUL_MAX_ROWS,
    kernels_available,
    paged_decode_attention,
    paged_decode_attention_ref,
    small_matmul,
    small_matmul_available,
    small_matmul_max_rows,
)

needs_kernels = pytest.mark.skipif(not kernels_available(), reason="no C compiler / kernels disabled")
needs_small_matmul = pytest.mark.skipif(
    not small_matmul_available(), reason="no small-matmul kernel (no C compiler, or no AVX2 and FMA)"
)


def _paged_case(
    lens: list[int], heads: int, kv_heads: int, head_dim: int = 32, block: int = 4, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """A cache with every sequence's blocks scattered (descending, interleaved with the others')."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // block) for n in lens)
    num_blocks = len(lens) * width + 3
    k = torch.randn(num_blocks, block, kv_heads, head_dim, generator=gen)
    v = torch.randn(num_blocks, block, kv_heads, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(lens), width, dtype=torch.long)
    for i, n in enumerate(lens):
        need = -(-n // block)
        table[i, :need] = order[i * width : i * width + need]
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    return q, k, v, table, torch.tensor(lens)


@needs_kernels
@pytest.mark.parametrize(
    ("heads", "kv_heads", "window"), [(8, 8, None), (8, 2, None), (4, 1, None), (8, 2, 5)]
)
def test_paged_decode_attention_matches_gather_and_sdpa(heads: int, kv_heads: int, window: int | None):
    lens = [1, 4, 5, 17, 9]  # one token, exactly one block, crossing blocks, longest, in between
    q, k, v, table, seq_lens = _paged_case(lens, heads, kv_heads)
    out = paged_decode_attention(q, k, v, table, seq_lens, window)
    ref = paged_decode_attention_ref(q, k, v, table, seq_lens, window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_paged_decode_attention_falls_back_for_other_dtypes():
    q, k, v, table, seq_lens = _paged_case([3, 6], 4, 2)
    out = paged_decode_attention(q.double(), k.double(), v.double(), table, seq_lens)
    ref = paged_decode_attention_ref(q.double(), k.double(), v.double(), table, seq_lens)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 12, 16, 24, 25, 48])
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_matmul_matches_torch(rows: int, with_bias: bool):
    gen = torch.Generator().manual_seed(rows)
    k, n = 37, 80  # k not a multiple of the 16-row k-block
    wide = torch.randn(rows, 2 * k, generator=gen)
    x = wide[:, :k]  # rows with a stride of 2k, as MLP.forward passes its gate half
    w_t = torch.randn(k, n, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    ref = x @ w_t if bias is None else torch.addmm(bias, x, w_t)
    torch.testing.assert_close(small_matmul(x, w_t, bias), ref, atol=1e-5, rtol=1e-5)


def test_small_matmul_uses_torch_outside_its_shapes(monkeypatch: pytest.MonkeyPatch):
    calls = []
    lib = kernels._load()
    if lib is not None:
        real = lib.small_matmul

        def spy(*a):
            calls.append(a)
            return real(*a)

        monkeypatch.setattr(lib, "small_matmul", spy)
    gen = torch.Generator().manual_seed(0)
    w_t = torch.randn(24, 32, generator=gen)
    for x, w in [
        (
            torch.randn(max(SMALL_MATMUL_MAX_ROWS.values()) + 1, 24, generator=gen),
            w_t,
        ),  # many rows: MKL's GEMM
        (torch.randn(4, 24, generator=gen), torch.randn(24, 40, generator=gen)),  # 40 % 16 != 0
    ]:
        torch.testing.assert_close(small_matmul(x, w), x @ w)
    assert calls == []
    if small_matmul_available():
        for rows in (1, 4):  # the controls: these shapes do go to the kernel
            x = torch.randn(rows, 24, generator=gen)
            torch.testing.assert_close(small_matmul(x, w_t), x @ w_t, atol=1e-5, rtol=1e-5)
        assert len(calls) == 2


@needs_small_matmul
def test_small_matmul_rows_do_not_depend_on_the_batch():
    # each row is computed the same way whatever the tile shape: one row alone equals that row in any batch
    # (n = 80: with AVX-512 the first 64 columns go through the 512-bit tiles, the last 16 the 256-bit ones)
    gen = torch.Generator().manual_seed(3)
    k, n = 100, 80
    x = torch.randn(small_matmul_max_rows(), k, generator=gen)
    w_t = torch.randn(k, n, generator=gen)
    bias = torch.randn(n, generator=gen)
    full = small_matmul(x, w_t, bias)
    for rows in (1, 2, 5, 6, 7, 13, 24):
        assert torch.equal(small_matmul(x[:rows], w_t, bias), full[:rows])
    assert torch.equal(small_matmul(x[3:4], w_t, bias), full[3:4])
