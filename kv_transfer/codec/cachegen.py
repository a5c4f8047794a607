"""The CacheGen KV codec (`cachegen`, and `cachegen_l0`): quantize each layer's K and V, then entropy code the
symbols with the compiled rANS coder (`rans`). Lossy, at a quality level (`LEVELS`: high / default / low, each
a bit budget). Per layer the codec writes one of three formats, each in its own module:

  * v5, `cachegen_klt` (what serves a calibrated model): a model-profiled decorrelating transform, one step
    per (layer, K/V) from the level's calibrated plan, discrete Laplace models -- where the context holds
    the model's transform and it covers the layer;
  * v1, `cachegen_v1`: CacheGen's own quantizers (per-channel keys, per-token values) and per-channel tables
    -- elsewhere (a model without calibration);
  * v3, `layer0` (`cachegen_l0` only): layer 0 as the prompt's token ids, recomputed exactly by a decoder
    that holds the model.

Decoders read all three: params start with b"CG" and the format version (v2 and v4, the transform format's
retired coders, and any version this build does not know raise FrameForeign). Measured sizes, quality and speed
per format and level: docs/benchmarks.md ("KV codec"). CUDA inputs are quantized on the GPU (torch) and
`decode(..., device="cuda")` dequantizes there; the entropy stage is on the CPU. Without a C compiler (no
rANS coder) neither codec is installed: the registry reports UnknownCodec and raw, int8 and fp8 remain.

Errors: damaged or inconsistent params/payload raise FrameCorrupted; another format version, or a frame
made with calibration files this context does not hold, FrameForeign; bad input to encode, CodecError.
"""

from __future__ import annotations

import copy
import sys
import zlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from kv_transfer.codec import cachegen_klt as klt
from kv_transfer.codec import cachegen_v1 as v1
from kv_transfer.codec import layer0, rans, rate
from kv_transfer.codec.base import Codec, Shape
from kv_transfer.codec.cachegen_core import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_NUM_LAYERS,
    LEVELS,
    chunk_bounds,
    le_view,
)
from kv_transfer.errors import CodecError, FrameCorrupted, FrameForeign, UnknownCodec
from kv_transfer.frame import DTYPE_CODES, Buffer

if TYPE_CHECKING:
    from kv_transfer.codec.context import CodecContext

_LITTLE = sys.byteorder == "little"
KNOWN_VERSIONS = frozenset({v1.VERSION, layer0.VERSION, klt.VERSION})  # params versions this build decodes


class CacheGenCodec(Codec):
    """See the module docstring. Reads the model's calibration from `ctx` (default: none). Stateless and
    thread-safe."""

    name = "cachegen"
    codec_id = 4
    lossless = False
    uses_context = True

    def __init__(
        self, ctx: CodecContext | None = None, level: str = "default", *, chunk_tokens: int | None = None
    ) -> None:
        if level not in LEVELS:
            raise CodecError(f"cachegen level {level!r} unknown; known: {sorted(LEVELS)}")
        if chunk_tokens is not None and not 2 <= chunk_tokens < 1 << 31:
            raise CodecError(f"cachegen chunk_tokens {chunk_tokens} out of range")
        if not rans.available():
            raise UnknownCodec(f"codec {self.name!r} needs the compiled rANS coder (no C compiler here?)")
        if ctx is None:
            from kv_transfer.codec.context import CodecContext

            ctx = CodecContext()
        self.ctx, self.level_name, self.level, self.chunk_tokens = ctx, level, LEVELS[level], chunk_tokens
        self.max_kl: float | None = None  # the floor `at_floor` bound (None: the context's)
        # rate_choice's answers by (tokens, floor): choose_rate is pure and the context immutable
        self._rates: dict[tuple[int, float], rate.RateChoice | None] = {}

    def at_floor(self, max_kl: float) -> CacheGenCodec:
        """A copy whose encoder spends `max_kl` where encode_parts is given no floor (see rate_choice)."""
        if not max_kl >= 0:
            raise CodecError(f"max_kl must be a KL >= 0 (nats per token), got {max_kl}")
        bound = copy.copy(self)
        bound.max_kl = max_kl
        return bound

    # ---- what this encoder does at a layer -----------------------------------------------------------

    def transform_for(self, layer: int, channels: int, head_dim: int) -> klt.KLTransform | None:
        """The transform this encoder codes `layer` with (format v5), or None (format v1)."""
        tr = self.ctx.transform
        return tr if tr is not None and tr.covers(layer, channels, head_dim, self.level_name) else None

    def bins_for(self, layer: int) -> tuple[int, int]:
        """Format v1's (K bins, V bins) at `layer`: the model's bit plan for this level where its tables carry
        one, else the level's shallow/deep rule at the context's depth (DEFAULT_NUM_LAYERS if unknown)."""
        tables = self.ctx.tables
        plan = tables.plans.get(self.level_name) if tables is not None else None
        if plan is not None and layer < len(plan):
            return plan[layer]
        num_layers = self.ctx.num_layers or (tables.num_layers if tables is not None else None)
        return self.level.bins(layer, num_layers or DEFAULT_NUM_LAYERS)

    def chunk_size(self) -> int:
        """Tokens per chunk: the constructor's, else the tables' (what the bit plan was made for), else
        DEFAULT_CHUNK_TOKENS."""
        if self.chunk_tokens is not None:
            return self.chunk_tokens
        tables = self.ctx.tables
        if tables is not None and tables.chunk_tokens is not None:
            return tables.chunk_tokens
        return DEFAULT_CHUNK_TOKENS

    def _steps(self, tr: klt.KLTransform, layer: int) -> tuple[float, float] | None:
        """The transform's (K, V) steps for `layer`; None: the level's plan (see CacheGenL0Codec)."""
        return None

    # ---- encode / decode -----------------------------------------------------------------------------

    rate_mode = "plain"  # which of the calibration's rate points describe this codec (rate.RatePoint.mode)
    # True: CPU tensors take the path CUDA tensors take (torch statistics, quantizer and dequantization where
    # the tensors live, only symbols crossing to the host coder) -- how that path is tested without a GPU
    device_path = False

    def rate_choice(self, tokens: int, max_kl: float | None = None) -> rate.RateChoice | None:
        """Rate control for a `tokens`-token frame: the calibrated setting the quality floor admits (`max_kl`,
        else the one `at_floor` bound, else the context's, else rate.DEFAULT_MAX_KL) -- for the default level of a context with a rate table;
        None (the level's plan as is) otherwise."""
        table = self.ctx.rate
        if table is None or self.level_name != "default":
            return None
        floor = next((f for f in (max_kl, self.max_kl, self.ctx.max_kl) if f is not None), None)
        floor = rate.DEFAULT_MAX_KL if floor is None else floor
        key = (tokens, floor)
        if key not in self._rates:
            if len(self._rates) > 4096:  # prompt lengths x floors seen: bounded
                self._rates.clear()
            guard = table.kl_guard.get(self.rate_mode, float("inf"))
            self._rates[key] = rate.choose_rate(tokens, floor, table.for_mode(self.rate_mode), guard)
        return self._rates[key]

    def encode_parts(
        self,
        k: Tensor,
        v: Tensor,
        layer: int,
        token_ids: Tensor | None = None,
        *,
        ids_checked: bool = False,
        max_kl: float | None = None,
    ) -> tuple[bytes, list[Buffer]]:
        """k, v: [T, Hkv, D] fp32/fp16/bf16 on CPU or CUDA (quantized there; entropy coded on the CPU)
        -> (params, payload parts: the rANS words). `max_kl`: this hand-off's quality floor (the request's
        max_kv_kl) for rate control; None: the context's."""
        if k.dim() != 3 or k.shape != v.shape or min(k.shape) < 1:
            raise CodecError(
                f"k and v must both be non-empty [T, Hkv, D]; got {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if k.dtype != v.dtype or k.dtype not in DTYPE_CODES or k.device != v.device:
            raise CodecError(f"k/v dtype must be one of {list(DTYPE_CODES)}, equal, on one device")
        t, h, d = k.shape
        chunks = chunk_bounds(t, self.chunk_size())
        tr = self.transform_for(layer, h * d, d)
        if tr is not None:
            choice = self.rate_choice(t, max_kl)
            scale, recent = (choice.scale, (klt.RECENT[0], choice.recent)) if choice else (1.0, None)
            params, words = klt.encode(
                tr, self.level_name, k, v, layer, chunks, steps=self._steps(tr, layer), recent=recent, scale=scale,
                fused=not self.device_path,
            )  # fmt: skip
        else:
            params, words = v1.encode(k, v, layer, self.level, self.bins_for(layer), chunks, self.ctx.tables)
        return params, [le_view(w) for w in words]

    def decode(
        self,
        params: Buffer,
        payload: Buffer,
        shape: Shape,
        dtype: torch.dtype,
        layer: int,
        *,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """-> k, v [T, Hkv, D] in `dtype`; on the CPU, or dequantized on `device` (e.g. CUDA) if given."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        raw_params, pay, version = _frame_head(params, payload)
        if layer0.is_layer0_frame(raw_params):
            return layer0.decode(raw_params, pay, shape, dtype, dev, self.ctx.layer0)
        if version == klt.VERSION:
            if dev.type == "cpu" and not self.device_path:  # one compiled call after the header's checks
                return klt.decode_cpu(raw_params, pay, shape, dtype, layer, self.ctx.transform)
            pk = klt.parse(raw_params, shape, layer, self.ctx.transform)
            words = _payload_words(pay, pk.payload_crc, pk.words, np.dtype("<u2"))
            return klt.decode(pk, words, shape, dtype, layer, dev, fused=not self.device_path)
        if version is not None and version not in KNOWN_VERSIONS:
            raise FrameForeign(
                f"cachegen params version {version}: this build reads versions {sorted(KNOWN_VERSIONS)}"
            )
        p = v1.parse_params(raw_params, shape)
        words = _payload_words(
            pay, p.payload_crc, sum(ch.k_words + ch.v_words for ch in p.chunks), np.dtype("<u4")
        )
        return v1.decode(p, words, shape, dtype, layer, dev, self.ctx.tables)

    def decode_into(
        self, params: Buffer, payload: Buffer, shape: Shape, layer: int, k_out: Tensor, v_out: Tensor
    ) -> bool:
        """The compiled CPU decoders' paths (format v5, and layer 0 from its table) straight into k_out, v_out
        (contiguous CPU fp16 or fp32 of `shape`); False for the rest (the device path, older formats)."""
        if (
            self.device_path
            or k_out.dtype not in (torch.float16, torch.float32)
            or k_out.dtype != v_out.dtype
            or k_out.device.type != "cpu"
            or v_out.device.type != "cpu"
            or tuple(k_out.shape) != tuple(shape)
            or tuple(v_out.shape) != tuple(shape)
            or not (k_out.is_contiguous() and v_out.is_contiguous())
        ):
            return False
        raw_params, pay, version = _frame_head(params, payload)
        if layer0.is_layer0_frame(raw_params):
            return layer0.decode_into(raw_params, pay, shape, self.ctx.layer0, k_out, v_out)
        if version != klt.VERSION:
            return False
        klt.decode_cpu(raw_params, pay, shape, k_out.dtype, layer, self.ctx.transform, out=(k_out, v_out))
        return True


class CacheGenL0Codec(CacheGenCodec):
    """`cachegen` with layer 0 sent as the prompt's token ids (`kv_transfer.codec.layer0`): the decoder
    recomputes it exactly from its model, and the other layers spend the level's budget (the transform's
    "<level>+l0" plan, calibrated with layer 0 free; the level's own plan where the transform has none).
    Layer 0 falls back to ordinary coding where the caller gives no ids or the context's layer-0 function
    cannot reproduce the layer from them. A decoder asks for it only if its context holds that function
    (`CodecContext.pull_codec`)."""

    name = "cachegen_l0"
    codec_id = 5
    rate_mode = "l0"

    def _steps(self, tr: klt.KLTransform, layer: int) -> tuple[float, float] | None:
        plan = tr.steps.get(self.level_name + klt.L0_SUFFIX)
        return (float(plan[layer][0]), float(plan[layer][1])) if plan is not None else None

    def encode_parts(
        self,
        k: Tensor,
        v: Tensor,
        layer: int,
        token_ids: Tensor | None = None,
        *,
        ids_checked: bool = False,
        max_kl: float | None = None,
    ) -> tuple[bytes, list[Buffer]]:
        l0 = self.ctx.layer0
        if (
            layer == 0
            and token_ids is not None
            and l0 is not None
            and (ids_checked or l0.matches(k, v, token_ids))
        ):
            params, payload = l0.encode(token_ids)
            return params, [payload]
        return super().encode_parts(k, v, layer, token_ids, max_kl=max_kl)


def _frame_head(params: Buffer, payload: Buffer) -> tuple[bytes, memoryview, int | None]:
    """A frame's params as bytes, its payload as a byte view, and the params' cachegen version (None: no
    cachegen magic; layer-0-from-ids frames carry layer0.VERSION)."""
    pay = memoryview(payload).cast("B") if not isinstance(payload, memoryview) else payload.cast("B")
    raw = bytes(params)
    return raw, pay, raw[2] if len(raw) > 2 and raw[:2] == v1.MAGIC else None


def _payload_words(pay: memoryview, crc: int, words: int, wdt: np.dtype) -> np.ndarray:
    """Payload bytes, checked against the params' crc32 and word count -> words of little-endian dtype `wdt`
    (<u4 for v1, <u2 for v5) in native order (copied only when unaligned or on big-endian hosts)."""
    if zlib.crc32(pay) != crc:
        raise FrameCorrupted("cachegen payload crc32 mismatch")
    if wdt.itemsize * words != len(pay):
        raise FrameCorrupted(f"cachegen payload: {len(pay)} bytes, the chunk directory says otherwise")
    out = np.frombuffer(pay, dtype=wdt)
    if not _LITTLE or out.ctypes.data % wdt.itemsize:
        out = out.astype(wdt.newbyteorder("="))
    return out
