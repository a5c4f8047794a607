"""FP8 e4m3 (torch.float8_e4m3fn) with one fp32 scale per tensor (one for K, one for V of the layer).

scale = absmax / 448 (448 = largest e4m3 value), q = fp8(x / scale). Error bound per element, from e4m3's
3 mantissa bits (relative step 2^-3, round-to-nearest halves it) and its smallest subnormal step 2^-9:
|x - x_hat| <= max(|x| * 2^-4, scale * 2^-10) (plus the output dtype's rounding if that is not fp32).

params: layout u8 (= 1).   payload: k_scale fp32 ‖ v_scale fp32 ‖ k fp8[T*Hkv*D] ‖ v fp8[T*Hkv*D].
"""

from __future__ import annotations

import torch
from torch import Tensor

from kv_transfer.codec.base import ScaledCodec
from kv_transfer.errors import CodecError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class Fp8Codec(ScaledCodec):
    name = "fp8"
    codec_id = 3
    lossless = False
    q_dtype = torch.uint8

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [T, Hkv, D] -> (scale fp32 [1], q uint8 view of fp8 [T, Hkv, D])."""
        xf = x.float()
        absmax = xf.abs().amax()
        if not bool(torch.isfinite(absmax)):
            raise CodecError("fp8 codec: K/V contains NaN or Inf")
        scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax)).reshape(1)
        q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        return scale, q.view(torch.uint8)

    def dequantize(self, scale: Tensor, q: Tensor, dtype: torch.dtype) -> Tensor:
        """scale [1] fp32, q [T, Hkv, D] uint8 (fp8 bits) -> [T, Hkv, D] in dtype."""
        return (q.view(FP8).float() * scale).to(dtype)

    def num_scales(self, t: int) -> int:
        return 1
