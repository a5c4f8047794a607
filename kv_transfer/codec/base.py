"""The Codec contract: turn one layer's K and V ([T, Hkv, D] CPU tensors) into (params, payload) bytes and back.

A codec holds no mutable state and is thread-safe: one instance may encode and decode for many threads at
once (`cachegen` reads the model's calibration from its immutable `CodecContext`).
`params` describes the payload (layout version, wire dtype, scales that belong to the header); the
frame carries both plus shape and the source dtype, so `decode` needs nothing but what is on the wire.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from kv_transfer.errors import CodecError, FrameCorrupted
from kv_transfer.frame import DTYPE_CODES, Buffer

Shape = tuple[int, ...]  # (T, Hkv, D); as tuple(tensor.shape) gives it


class Codec(ABC):
    """Encode/decode K and V of one layer. Subclasses set `name`, `codec_id` (see registry.py), `lossless`."""

    name: str
    codec_id: int
    lossless: bool

    @abstractmethod
    def encode_parts(
        self, k: Tensor, v: Tensor, layer: int, token_ids: Tensor | None = None, *, ids_checked: bool = False
    ) -> tuple[Buffer, Sequence[Buffer]]:
        """k, v: [T, Hkv, D] fp32/fp16/bf16 CPU -> (params, payload as several buffers that the frame
        concatenates, so a codec can hand over views instead of building one bytes object). `token_ids` [T]
        int64: the prompt's ids, where the caller has them (a codec may use them: `cachegen_l0` sends layer 0
        as ids); others ignore them. `ids_checked`: the caller has checked that the context's layer-0
        function reproduces k, v from token_ids (`Layer0.matches` was True), so a codec need not again."""

    def at_floor(self, max_kl: float) -> Codec:
        """This codec with its encoder spending the quality floor `max_kl` (a hand-off's max_kv_kl, mean
        per-token KL in nats): a rate-controlled codec returns a copy bound to it; others ignore it."""
        return self

    def encode(self, k: Tensor, v: Tensor, layer: int) -> tuple[bytes, bytes]:
        """k, v -> (params, payload), each one bytes object (`encode_parts`, joined)."""
        params, parts = self.encode_parts(k, v, layer)
        return bytes(params), b"".join(parts)

    @abstractmethod
    def decode(
        self, params: Buffer, payload: Buffer, shape: Shape, dtype: torch.dtype, layer: int
    ) -> tuple[Tensor, Tensor]:
        """-> k, v: [T, Hkv, D] in `dtype` on CPU. Raises FrameCorrupted if params/payload do not fit `shape`.

        The returned tensors may alias `payload` (zero-copy codecs); copy them if they must outlive it.
        """

    def decode_into(
        self, params: Buffer, payload: Buffer, shape: Shape, layer: int, k_out: Tensor, v_out: Tensor
    ) -> bool:
        """Decode straight into k_out, v_out [T, Hkv, D] (contiguous CPU tensors, e.g. views of a KV cache: the
        values decode() gives in their dtype) and return True; False, having written nothing, where this codec
        cannot (the caller then decodes and copies). Raises as decode(), before writing anything."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, id={self.codec_id})"


def check_kv(k: Tensor, v: Tensor) -> None:
    """Shared input validation: same [T, Hkv, D] shape, same supported float dtype, CPU."""
    if k.dim() != 3 or k.shape != v.shape:
        raise CodecError(f"k and v must both be [T, Hkv, D]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != v.dtype or k.dtype not in DTYPE_CODES:
        raise CodecError(f"k/v dtype must be one of {list(DTYPE_CODES)} and equal; got {k.dtype}, {v.dtype}")
    if k.device.type != "cpu" or v.device.type != "cpu":
        raise CodecError("codecs encode CPU tensors; move K/V to the host first")
    if min(k.shape) < 1:
        raise CodecError(f"empty K/V shape {tuple(k.shape)}")


def numel(shape: Shape) -> int:
    t, h, d = shape
    return t * h * d


def expect_len(buf: Buffer, n: int, what: str) -> None:
    if len(buf) != n:
        raise FrameCorrupted(f"{what}: {len(buf)} bytes, the frame's shape needs {n}")


def tensor_bytes(t: Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor (no copy; works for bf16, which numpy lacks)."""
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().data


def tensor_from(buf: Buffer, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """A tensor view over `buf` (copied first if it is read-only, which torch.frombuffer cannot share)."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.readonly:
        mv = memoryview(bytearray(mv))
    if len(mv) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mv, dtype=dtype).view(shape)


_SCALED_PARAMS = struct.Struct("<B")
_SCALED_LAYOUT = 1


class ScaledCodec(Codec):
    """A one-byte-per-element codec with fp32 scales: int8 (a scale per token) and fp8 (one per tensor).

    params: layout u8 (= 1). payload: k_scale fp32[S] ‖ v_scale fp32[S] ‖ k [T*Hkv*D] ‖ v [T*Hkv*D] (one byte
    each), with S = `num_scales(T)`. Subclasses define the quantizer pair and S.
    """

    q_dtype: torch.dtype  # one byte per element on the wire

    @abstractmethod
    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [T, Hkv, D] -> (scales fp32 [S], q [T, Hkv, D] of q_dtype); CodecError on NaN/Inf."""

    @abstractmethod
    def dequantize(self, scale: Tensor, q: Tensor, dtype: torch.dtype) -> Tensor:
        """scales fp32 [S], q [T, Hkv, D] -> [T, Hkv, D] in dtype."""

    @abstractmethod
    def num_scales(self, t: int) -> int: ...

    def encode_parts(
        self, k: Tensor, v: Tensor, layer: int, token_ids: Tensor | None = None, *, ids_checked: bool = False
    ) -> tuple[Buffer, list[Buffer]]:
        check_kv(k, v)
        ks, kq = self.quantize(k)
        vs, vq = self.quantize(v)
        parts: list[Buffer] = [tensor_bytes(ks), tensor_bytes(vs), tensor_bytes(kq), tensor_bytes(vq)]
        return _SCALED_PARAMS.pack(_SCALED_LAYOUT), parts

    def decode(
        self, params: Buffer, payload: Buffer, shape: Shape, dtype: torch.dtype, layer: int
    ) -> tuple[Tensor, Tensor]:
        expect_len(params, _SCALED_PARAMS.size, f"{self.name} codec params")
        if bytes(params)[0] != _SCALED_LAYOUT:
            raise FrameCorrupted(f"{self.name} codec layout {bytes(params)[0]} unknown")
        s, n = self.num_scales(shape[0]), numel(shape)
        expect_len(payload, 8 * s + 2 * n, f"{self.name} codec payload")
        mv = payload if isinstance(payload, memoryview) else memoryview(payload)
        ks = tensor_from(mv[: 4 * s], torch.float32, (s,))
        vs = tensor_from(mv[4 * s : 8 * s], torch.float32, (s,))
        kq = tensor_from(mv[8 * s : 8 * s + n], self.q_dtype, shape)
        vq = tensor_from(mv[8 * s + n :], self.q_dtype, shape)
        return self.dequantize(ks, kq, dtype), self.dequantize(vs, vq, dtype)
