"""Per-token absmax symmetric int8 for K and V (the 8-bit baseline that CacheGen compares against).

For each token t (over all Hkv*D values of that token): scale_t = absmax_t / 127 (fp32), q = round(x / scale_t)
in [-127, 127]. Error bound, per element of token t: |x - x_hat| <= scale_t / 2 = absmax_t / 254 (plus fp32
rounding, and the output dtype's rounding if that is not fp32).

params: layout u8 (= 1).   payload: k_scale fp32[T] ‖ v_scale fp32[T] ‖ k int8[T*Hkv*D] ‖ v int8[T*Hkv*D].
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from kv_transfer.codec.base import Codec, Shape, check_kv, expect_len, numel, tensor_bytes, tensor_from
from kv_transfer.errors import CodecError, FrameCorrupted
from kv_transfer.frame import Buffer

_PARAMS = struct.Struct("<B")
_LAYOUT = 1
QMAX = 127.0


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x: [T, Hkv, D] -> (scale fp32 [T], q int8 [T, Hkv, D])."""
    xf = x.float()
    absmax = xf.abs().amax(dim=(1, 2))  # [T]
    if not bool(torch.isfinite(absmax).all()):
        raise CodecError("int8 codec: K/V contains NaN or Inf")
    scale = absmax / QMAX
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))  # all-zero token -> q = 0
    q = torch.round(xf * inv.view(-1, 1, 1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return scale, q


def dequantize(scale: Tensor, q: Tensor, dtype: torch.dtype) -> Tensor:
    """scale [T] fp32, q [T, Hkv, D] int8 -> [T, Hkv, D] in dtype."""
    return (q.float() * scale.view(-1, 1, 1)).to(dtype)


class Int8Codec(Codec):
    name = "int8"
    codec_id = 2
    lossless = False

    def encode_parts(self, k: Tensor, v: Tensor, layer: int) -> tuple[Buffer, list[Buffer]]:
        check_kv(k, v)
        ks, kq = quantize(k)
        vs, vq = quantize(v)
        return _PARAMS.pack(_LAYOUT), [tensor_bytes(ks), tensor_bytes(vs), tensor_bytes(kq), tensor_bytes(vq)]

    def encode(self, k: Tensor, v: Tensor, layer: int) -> tuple[bytes, bytes]:
        params, parts = self.encode_parts(k, v, layer)
        return bytes(params), b"".join(parts)

    def decode(
        self, params: Buffer, payload: Buffer, shape: Shape, dtype: torch.dtype, layer: int
    ) -> tuple[Tensor, Tensor]:
        expect_len(params, _PARAMS.size, "int8 codec params")
        if bytes(params)[0] != _LAYOUT:
            raise FrameCorrupted(f"int8 codec layout {bytes(params)[0]} unknown")
        t, n = shape[0], numel(shape)
        expect_len(payload, 8 * t + 2 * n, "int8 codec payload")
        mv = payload if isinstance(payload, memoryview) else memoryview(payload)
        ks = tensor_from(mv[: 4 * t], torch.float32, (t,))
        vs = tensor_from(mv[4 * t : 8 * t], torch.float32, (t,))
        kq = tensor_from(mv[8 * t : 8 * t + n], torch.int8, shape)
        vq = tensor_from(mv[8 * t + n :], torch.int8, shape)
        return dequantize(ks, kq, dtype), dequantize(vs, vq, dtype)
