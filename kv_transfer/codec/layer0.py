"""Layer 0 from the token ids: a frame that carries the prompt's ids instead of layer 0's K and V.

Layer 0's K and V are a function of the token ids alone (embedding -> input RMSNorm -> K/V projection -> RoPE
at the token's position: `engine.model.CausalLM.layer0_kv`), so a decoder that holds the model computes them
for a few MFLOPs per token instead of receiving them. The frame costs 4 bytes per token (0.25 bits per K/V
element of a 2 x 64-channel layer) and the layer is then exact. On the shipped model layer 0 is also the layer
the CacheGen calibration gives the finest steps, about 30% of the default level's bits (docs/benchmarks.md).

The function (`Layer0`) lives in the `CodecContext` a service builds from its model, identified by an id (the
model's fingerprint) that every frame carries; a decoder without it, or with another model's, raises
FrameForeign. An encoder codes layer 0 this way only if it can check the result: its own function must
reproduce the K/V it was given (`Layer0.matches`), else the caller codes the layer as usual.

params (little-endian): magic b"CG" | version u8 (= 3) | tokens u32 | model id u64 | payload crc32 u32 |
crc32 of all before it. payload: the token ids, u32 each.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from kv_transfer.errors import FrameCorrupted, FrameForeign

VERSION = 3  # the cachegen params version of a layer-0-from-ids frame
_HEADER = struct.Struct("<2sBIQI")
_CRC = struct.Struct("<I")
PARAMS_BYTES = _HEADER.size + _CRC.size  # a layer-0 frame's params (the calibration counts them)
# |recomputed - given| <= TOL * max|given|, per K and V: fp32 reproduces prefill bit for bit here (the same
# ops); 16-bit caches may differ in the last bit where the batch shape changes the matmul's summation order
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}

Layer0Fn = Callable[[Tensor], tuple[Tensor, Tensor]]  # ids int64 [T] (CPU) -> k, v [T, Hkv, D] (post-RoPE)


class Layer0:
    """A model's layer-0 function, the model's id (fingerprint) and its vocabulary size. Immutable; held by a
    `CodecContext`, which a service builds from the model it serves."""

    def __init__(self, fn: Layer0Fn, model_id: int, vocab_size: int = 0) -> None:
        self.fn, self.model_id, self.vocab_size = fn, model_id, vocab_size

    @classmethod
    def from_model(cls, model, fingerprint: int) -> Layer0 | None:
        """`model.layer0_kv` of an engine CausalLM, or None if it cannot compute layer 0 here."""
        if not model.computes_layer0_kv:
            return None
        device = next(model.parameters()).device
        return cls(lambda ids: model.layer0_kv(ids.to(device)), fingerprint, model.config.vocab_size)

    def matches(self, k: Tensor, v: Tensor, token_ids: Tensor) -> bool:
        """Whether this function reproduces k, v [T, Hkv, D] from token_ids [T] within TOL."""
        if token_ids.dim() != 1 or token_ids.shape[0] != k.shape[0]:
            return False
        vocab = self.vocab_size
        if token_ids.numel() and (int(token_ids.min()) < 0 or (vocab and int(token_ids.max()) >= vocab)):
            return False
        k0, v0 = self.fn(token_ids)
        if k0.shape != k.shape or v0.shape != v.shape:
            return False
        tol = TOL.get(k.dtype, 1e-4)
        for x, x0 in ((k, k0), (v, v0)):
            x, x0 = x.float(), x0.to(x.device).float()
            if float((x - x0).abs().max()) > tol * max(float(x.abs().max()), 1e-30):
                return False
        return True

    def encode(self, token_ids: Tensor) -> tuple[bytes, bytes]:
        """-> (params, payload) of a layer-0-from-ids frame. The caller has checked `matches`."""
        payload = np.ascontiguousarray(token_ids.cpu().numpy().astype("<u4")).tobytes()
        head = _HEADER.pack(b"CG", VERSION, token_ids.shape[0], self.model_id, zlib.crc32(payload))
        return head + _CRC.pack(zlib.crc32(head)), payload


def is_layer0_frame(params: bytes) -> bool:
    return len(params) > 2 and params[:2] == b"CG" and params[2] == VERSION


def decode(
    params: bytes,
    payload: memoryview,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    inst: Layer0 | None,
) -> tuple[Tensor, Tensor]:
    """params, payload of a layer-0-from-ids frame -> k, v [T, Hkv, D] in `dtype` on `device`, computed by
    `inst` (the context's layer-0 function; FrameForeign if None or another model's)."""
    if len(params) != PARAMS_BYTES:
        raise FrameCorrupted(f"layer-0 params: {len(params)} bytes, want {PARAMS_BYTES}")
    (crc,) = _CRC.unpack_from(params, _HEADER.size)
    if zlib.crc32(params[: _HEADER.size]) != crc:
        raise FrameCorrupted("layer-0 params: CRC mismatch")
    _, _, tokens, model_id, payload_crc = _HEADER.unpack_from(params)
    if tokens != shape[0] or len(payload) != 4 * tokens:
        raise FrameCorrupted(f"layer-0 frame: {tokens} tokens, {len(payload)} payload bytes, shape {shape}")
    if zlib.crc32(payload) != payload_crc:
        raise FrameCorrupted("layer-0 payload: CRC mismatch")
    if inst is None or inst.model_id != model_id:
        raise FrameForeign(
            f"layer-0 frame of model {model_id:#x}: this codec context has "
            + ("no layer-0 function" if inst is None else f"model {inst.model_id:#x}'s")
        )
    fn, vocab = inst.fn, inst.vocab_size
    ids = torch.from_numpy(np.frombuffer(payload, dtype="<u4").astype(np.int64))
    if ids.numel() and vocab and int(ids.max()) >= vocab:
        raise FrameCorrupted(f"layer-0 frame: token id {int(ids.max())} outside the vocabulary ({vocab})")
    k, v = fn(ids)
    if tuple(k.shape) != tuple(shape) or tuple(v.shape) != tuple(shape):
        raise FrameCorrupted(f"layer-0 frame: the model computes {tuple(k.shape)}, the frame says {shape}")
    return k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)
