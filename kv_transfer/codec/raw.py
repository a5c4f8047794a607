"""Lossless codec: K and V bytes as they are (bit-exact), with views instead of copies where possible.

params: layout u8 (= 1) | wire dtype code u8.   payload: K bytes ‖ V bytes, each T*Hkv*D*itemsize.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
from torch import Tensor

from kv_transfer.codec.base import Codec, Shape, check_kv, expect_len, numel, tensor_bytes, tensor_from
from kv_transfer.errors import FrameCorrupted
from kv_transfer.frame import CODE_DTYPES, DTYPE_CODES, Buffer

_PARAMS = struct.Struct("<BB")
_LAYOUT = 1


class RawCodec(Codec):
    name = "raw"
    codec_id = 1
    lossless = True

    def encode_parts(
        self, k: Tensor, v: Tensor, layer: int, token_ids: Tensor | None = None, *, ids_checked: bool = False
    ) -> tuple[Buffer, Sequence[Buffer]]:
        check_kv(k, v)
        return _PARAMS.pack(_LAYOUT, DTYPE_CODES[k.dtype]), [tensor_bytes(k), tensor_bytes(v)]

    def decode(
        self, params: Buffer, payload: Buffer, shape: Shape, dtype: torch.dtype, layer: int
    ) -> tuple[Tensor, Tensor]:
        expect_len(params, _PARAMS.size, "raw codec params")
        layout, code = _PARAMS.unpack(bytes(params))
        if layout != _LAYOUT or code not in CODE_DTYPES:
            raise FrameCorrupted(f"raw codec params: layout {layout}, dtype code {code}")
        wire = CODE_DTYPES[code]
        nk = numel(shape) * wire.itemsize
        expect_len(payload, 2 * nk, "raw codec payload")
        mv = payload if isinstance(payload, memoryview) else memoryview(payload)
        k = tensor_from(mv[:nk], wire, shape)
        v = tensor_from(mv[nk:], wire, shape)
        if dtype != wire:
            k, v = k.to(dtype), v.to(dtype)
        return k, v
