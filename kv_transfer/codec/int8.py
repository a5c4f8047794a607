"""Per-token absmax symmetric int8 for K and V (the 8-bit baseline that CacheGen compares against).

For each token t (over all Hkv*D values of that token): scale_t = absmax_t / 127 (fp32), q = round(x / scale_t)
in [-127, 127]. Error bound, per element of token t: |x - x_hat| <= scale_t / 2 = absmax_t / 254 (plus fp32
rounding, and the output dtype's rounding if that is not fp32).

params: layout u8 (= 1).   payload: k_scale fp32[T] ‖ v_scale fp32[T] ‖ k int8[T*Hkv*D] ‖ v int8[T*Hkv*D].
"""

from __future__ import annotations

import torch
from torch import Tensor

from kv_transfer.codec.base import ScaledCodec
from kv_transfer.errors import CodecError

QMAX = 127.0


class Int8Codec(ScaledCodec):
    name = "int8"
    codec_id = 2
    lossless = False
    q_dtype = torch.int8

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [T, Hkv, D] -> (scale fp32 [T], q int8 [T, Hkv, D])."""
        xf = x.float()
        absmax = xf.abs().amax(dim=(1, 2))  # [T]
        if not bool(torch.isfinite(absmax).all()):
            raise CodecError("int8 codec: K/V contains NaN or Inf")
        scale = absmax / QMAX
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))  # all-zero token -> q = 0
        q = torch.round(xf * inv.view(-1, 1, 1)).clamp_(-QMAX, QMAX).to(torch.int8)
        return scale, q

    def dequantize(self, scale: Tensor, q: Tensor, dtype: torch.dtype) -> Tensor:
        """scale [T] fp32, q [T, Hkv, D] int8 -> [T, Hkv, D] in dtype."""
        return (q.float() * scale.view(-1, 1, 1)).to(dtype)

    def num_scales(self, t: int) -> int:
        return t
