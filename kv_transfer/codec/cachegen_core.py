"""CacheGen codec internals shared by its formats and the calibration: quality levels, the per-channel /
per-token quantizers of format v1 (torch, any device), chunking, 4-bit table codes and little-endian bytes.

See `kv_transfer.codec.cachegen_v1` for that format and its error bound.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kv_transfer.frame import Buffer

# ---- quality levels ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """Bins for K and V in shallow and deep layers. A layer is shallow for K if it is among the first
    ceil(k_shallow_frac * num_layers) layers (LMCache: layers 0-9 of 32), likewise for V (0-1 of 32)."""

    level_id: int
    k_shallow: int
    k_deep: int
    v_shallow: int
    v_deep: int
    k_shallow_frac: float = 10 / 32
    v_shallow_frac: float = 2 / 32

    def bins(self, layer: int, num_layers: int) -> tuple[int, int]:
        k_cut = math.ceil(self.k_shallow_frac * num_layers)
        v_cut = math.ceil(self.v_shallow_frac * num_layers)
        return (
            self.k_shallow if layer < k_cut else self.k_deep,
            self.v_shallow if layer < v_cut else self.v_deep,
        )


# The rule below is the fallback where a model ships no bit plan. With the shipped model's plan (bench.codec,
# 1024-token prompts, 256 teacher-forced tokens; docs/benchmarks.md):
#   high    4.0x smaller than fp16, KL 0.0004 nats/token, top-1 agreement 98.2%
#   default 6.35x,                  KL 0.0036,             top-1 94.6%
#   low     10.7x,                  KL 0.029,              top-1 86.7%
LEVELS: dict[str, Level] = {
    "high": Level(
        1, k_shallow=32, k_deep=16, v_shallow=32, v_deep=16, k_shallow_frac=1 / 4, v_shallow_frac=1 / 8
    ),
    "default": Level(
        2, k_shallow=16, k_deep=8, v_shallow=16, v_deep=8, k_shallow_frac=1 / 8, v_shallow_frac=1 / 8
    ),
    "low": Level(3, k_shallow=8, k_deep=4, v_shallow=8, v_deep=4, k_shallow_frac=1 / 8, v_shallow_frac=1 / 8),
}
ALLOWED_BINS = tuple(range(4, 66, 2))  # even; M = bins // 2 - 1 levels each side of 0
DEFAULT_NUM_LAYERS = 32  # depth assumed when neither tables nor the caller say (LMCache's 7-8B layout)
DEFAULT_CHUNK_TOKENS = 1024

_ABSENT = 15  # 4-bit code of a symbol that does not occur in the chunk


def levels_of(bins: int) -> int:
    """M: symbols are in [-M, M] (alphabet 2M + 1)."""
    return bins // 2 - 1


# ---- quantization (torch: runs on the input's device, CPU or CUDA) ------------------------------------


def store_scale(x: Tensor, scale_dtype: torch.dtype, up: bool) -> Tensor:
    """x fp32 -> scale_dtype, rounded up (never below x) when `up` (so the stored range still covers x)."""
    if scale_dtype == torch.float32:
        return x
    if up:
        x = x * (1 + 2**-10) + 2**-24  # nearest-rounding to fp16 of this is >= the original x
    return x.to(torch.float16)


def store_scale_np(x: np.ndarray, wide: bool, up: bool) -> np.ndarray:
    """store_scale for numpy fp32 arrays (fewer dispatches on the CPU hot path): fp32 when `wide`, else fp16
    by the same arithmetic (fp32 products, round-to-nearest-even conversion)."""
    if wide:
        return x
    if up:
        x = x * np.float32(1 + 2**-10) + np.float32(2**-24)
    return x.astype(np.float16)


# largest |value| whose scales are stored as fp16 (fp16 max is 65504); beyond it both formats store fp32
FP16_SAFE = 60000.0


def le_bytes(x: Tensor | np.ndarray) -> bytes:
    """An array's bytes in little-endian order (the wire order of every cachegen field)."""
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else x
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def le_view(words: np.ndarray) -> Buffer:
    """uint32 words as little-endian bytes: a view on little-endian hosts, a copy elsewhere."""
    return words.data.cast("B") if sys.byteorder == "little" else le_bytes(words)


def quantize_keys(x: Tensor, m: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """x: [t, C] fp32 -> (centre [C], half [C] in scale_dtype, symbols q + M as fp32 [t, C] in [0, 2M])."""
    lo, hi = x.amin(0), x.amax(0)
    centre = store_scale((hi + lo) * 0.5, scale_dtype, up=False)
    c = centre.float()
    half = store_scale(torch.maximum(hi - c, c - lo), scale_dtype, up=True)
    h = half.float()
    inv = torch.where(h > 0, m / h, torch.zeros_like(h))
    return centre, half, (x - c).mul_(inv).round_().clamp_(-m, m).add_(m)


# Value scales travel as one fp32 base per chunk (the largest token absmax) and one byte per token:
# s_t = base * 2^(-e_t / 16), e_t in [0, 255] chosen so that s_t >= absmax_t (at most 4.4% above it). The
# table makes encoder (any device) and decoder compute bit-identical scales.
V_SCALE_LUT = torch.from_numpy(np.exp2(-np.arange(256, dtype=np.float64) / 16).astype(np.float32))


def value_scales(base: Tensor, e: Tensor) -> Tensor:
    """base fp32 [1], e uint8 [t] -> s fp32 [t]."""
    return base * V_SCALE_LUT.to(e.device)[e.long()]


def quantize_values(x: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """x: [t, C] fp32 -> (base fp32 [1], e uint8 [t], symbols q + M as fp32 [t, C] in [0, 2M])."""
    absmax = x.abs().amax(1)
    base = absmax.max().reshape(1)
    ratio = torch.where(absmax > 0, absmax / torch.where(base > 0, base, 1.0), 2.0**-17)
    e = (-16 * torch.log2(ratio)).floor_().clamp_(0, 255)
    s = value_scales(base, e.to(torch.uint8))
    e = torch.where(s < absmax, (e - 1).clamp_(min=0), e).to(torch.uint8)  # fp rounding: one notch back
    s = value_scales(base, e)  # (e = 0 is base itself, >= every absmax)
    inv = torch.where(s > 0, m / s, torch.zeros_like(s))
    return base, e, (x * inv[:, None]).round_().clamp_(-m, m).add_(m)


def dequantize_keys(sym: Tensor, centre: Tensor, half: Tensor, m: int) -> Tensor:
    """sym fp32 [t, C] in [0, 2M], centre/half [C] -> x_hat fp32 [t, C]."""
    step = half.float() / m
    return torch.addcmul((centre.float() - m * step)[None, :], sym, step[None, :])


def dequantize_values(sym: Tensor, scale: Tensor, m: int) -> Tensor:
    """sym fp32 [t, C] in [0, 2M], scale fp32 [t] (`value_scales`) -> x_hat fp32 [t, C]."""
    step = scale.float() / m
    return sym.sub_(m).mul_(step[:, None])


def chunk_bounds(t: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Split [0, t) into ceil(t / chunk_tokens) near-equal chunks of even length (the last may be odd)."""
    if t <= 0:
        return []
    n = -(-t // chunk_tokens)
    size = -(-t // n)
    size += size % 2
    return [(a, min(a + size, t)) for a in range(0, t, size)]


# ---- entropy models ----------------------------------------------------------------------------------


def table_codes(counts: np.ndarray) -> np.ndarray:
    """counts [C, n] -> 4-bit code lengths uint8 [C, n]: round(-2 log2 p), 15 = absent."""
    total = np.maximum(counts.sum(1, keepdims=True), 1)
    with np.errstate(divide="ignore"):
        codes = np.rint(-2.0 * np.log2(counts / total))
    return np.where(counts > 0, np.clip(codes, 0, _ABSENT - 1), _ABSENT).astype(np.uint8)


def code_bits(counts: np.ndarray, probs: np.ndarray) -> float:
    """Ideal code length (bits) of `counts` under the row-wise normalised `probs` (zero probs: 24 bits)."""
    p = probs / probs.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        bits = np.where(p > 0, -np.log2(p), 24.0)
    return float((counts * bits).sum())


def codes_to_probs(codes: np.ndarray) -> np.ndarray:
    """4-bit code lengths [C, n] -> unnormalised probabilities float64 [C, n]. Absent -> 0 (the rANS tables
    still give every symbol frequency >= 1, so any symbol stays encodable); a row with no symbol present
    (nothing coded with it) -> uniform."""
    p = np.where(codes < _ABSENT, np.exp2(-0.5 * codes.astype(np.float64)), 0.0)
    p[p.sum(1) == 0] = 1.0
    return p


def pack_nibbles(codes: np.ndarray) -> bytes:
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_nibbles(buf: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(buf, dtype=np.uint8)
    out = np.empty(b.size * 2, dtype=np.uint8)
    out[0::2], out[1::2] = b & 0xF, b >> 4
    return out[:count]
