"""CacheGen-style KV codec: layer-dependent quantization, then per-(layer, K/V, channel) entropy coding.

Quantization, per chunk of at most `chunk_tokens` tokens (chunks are coded independently):
  * keys, per channel c (= head x dim) over the chunk's tokens: centre_c = (max_c + min_c) / 2, half-range
    h_c >= max_t |x - centre_c|, q = round((x - centre_c) * M / h_c) in [-M, M];
  * values, per token t over its Hkv*D channels: s_t >= max_c |x|, q = round(x * M / s_t) in [-M, M], where
    s_t = base * 2^(-e_t / 16) travels as one byte e_t per token (base: fp32 per chunk), at most 4.4% above
    the token's absmax;
  * M = bins // 2 - 1 (LMCache's convention: 32 bins -> 31 levels, 16 -> 15, 8 -> 7); shallow layers get
    more bins than deep ones, per the quality level (`LEVELS`: high / default / low; measured trade-offs
    there). The first `raw_tokens` tokens (default 0) may travel as fp16 instead, e.g. an attention sink.
  ERROR BOUND, per element: |x - x_hat| <= h_c / (2M) for keys and <= s_t / (2M) for values, with h_c and
  s_t as stored (h_c: fp16 rounded up, or fp32 when a key exceeds fp16's range), plus fp32 rounding and the
  output dtype's rounding. `error_bounds(params, shape)` returns these bounds per element.

Entropy coding: each channel's symbols (of K or V, one layer) are coded with that channel's own categorical
model, one coder per (chunk, K/V). By default the compiled rANS coder (`kv_transfer.codec.rans`, flag
FLAG_RANS) codes the token-major symbols in one C call per part; where no C compiler is available (or with
`coder="constriction"`) `constriction`'s compiled ANS coder does, one model per channel, and up to 31 levels
two neighbouring tokens' symbols form one coded symbol (alphabet n^2, product model). Decoders read both.
Models come:
  * STATIC: from a table profiled once per model (`cachegen_tables`), identified by its u64 id in params;
  * CHANNEL: from the chunk itself, shipped as 4-bit code lengths (half-bit steps of -log2 p) per symbol and
    channel: 4 bytes per channel at 8 bins, ~0.03 bits per element at 1024-token chunks (LMCache ships a
    16-bit CDF per 256-token chunk: ~2 bits per element);
  * SHARED: one chunk table for all channels, which the encoder picks instead of CHANNEL when it is smaller
    overall (short chunks, where per-channel tables would cost more than they save).
  table_mode "auto" (default) uses STATIC where a table fits, else chunk tables; "chunk" never uses STATIC.

Anchor/delta (CacheGen's grouping; `anchor_group=G`, 0 = off, the default): in each group of G tokens the
first token's symbols are coded as they are and the others as differences to it, with per-channel chunk
tables for both. It changes only the entropy stage: the reconstruction is identical. It made the output
bigger on every data measured: the shipped model's KV at the default level 6.2x -> 5.3x smaller than fp16
(G = 10), and structured synthetic KV even with neighbour correlation 0.99 (test_anchor_delta_does_not_help),
so it is off: coding symbols directly with per-channel models already captures what the anchors would.

Speed (one core, fp16-equivalent bytes, thread CPU time, shipped model's KV [2000, 2, 32], default level with
its static tables; bench.codec, docs/benchmarks.md): encode ~224 MB/s and decode ~218 MB/s with the compiled
rANS coder; with constriction (the fallback) ~185 / ~111 MB/s, its ANS decoder dominating decode. CUDA inputs
are quantized on the GPU (torch) and `decode(..., device="cuda")` dequantizes there; the entropy stage is on
the CPU.

params (little-endian, no pickle): `_HEADER` | chunk directory n x `_CHUNK` | per chunk: K centre [C] and
K half [C] (fp16, or fp32 per flag), V base (fp32), V e [t] (u8) | per chunk: K table, V table (per mode) |
crc32 of all before it.
payload: per chunk, K's ANS words then V's (u32 little-endian); its crc32 is in the header. Damaged or
inconsistent params/payload raise FrameCorrupted; another format version or a static table this process
has not loaded raise FrameForeign; bad input to encode raises CodecError.
"""

from __future__ import annotations

import struct
import sys
import zlib

import numpy as np
import torch
from torch import Tensor

from kv_transfer.codec import cachegen_klt as klt
from kv_transfer.codec import layer0, rans
from kv_transfer.codec.base import Codec, Shape
from kv_transfer.codec.cachegen_core import (
    ALLOWED_BINS,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_NUM_LAYERS,
    DEFAULT_RAW_TOKENS,
    FP16_SAFE,
    LEVELS,
    ans_decode,
    ans_encode,
    build_models,
    chunk_bounds,
    code_bits,
    codes_to_probs,
    dequantize_keys,
    dequantize_values,
    from_streams,
    le_bytes,
    levels_of,
    pack_nibbles,
    pair_probs,
    quantize_keys,
    quantize_values,
    symbol_counts,
    table_codes,
    to_streams,
    unpack_nibbles,
    use_pairs,
    value_scales,
)
from kv_transfer.codec.cachegen_tables import (
    CacheGenTables,
    installed_num_layers,
    installed_tables,
    lookup_tables,
    register_tables,
)
from kv_transfer.errors import CodecError, FrameCorrupted, FrameForeign
from kv_transfer.frame import DTYPE_CODES, Buffer

_MAGIC = b"CG"
_VERSION = 1
# magic, version, level id, k bins, v bins, flags, raw tokens, anchor group, n chunks, table id, payload crc
_HEADER = struct.Struct("<2sBBBBBBHIQI")
_CHUNK = struct.Struct("<IIIBB")  # tokens, k words, v words, k table mode, v table mode
_CRC = struct.Struct("<I")
FLAG_WIDE = 1  # key scales and raw tokens in fp32 (some |value| is beyond fp16's range), else fp16
FLAG_RANS = 2  # entropy-coded by the compiled rANS coder (kv_transfer.codec.rans), else by constriction
CODERS = ("auto", "rans", "constriction")
MODE_CHANNEL, MODE_SHARED, MODE_STATIC, MODE_DELTA = 0, 1, 2, 3
TABLE_MODES = ("auto", "chunk")
TRANSFORMS = ("auto", "off")
_LITTLE = sys.byteorder == "little"


class CacheGenCodec(Codec):
    """See the module docstring. Stateless and thread-safe (static-table models are cached, immutably)."""

    name = "cachegen"
    codec_id = 4
    lossless = False

    def __init__(
        self,
        level: str = "default",
        *,
        tables: CacheGenTables | None = None,
        table_mode: str = "auto",
        chunk_tokens: int | None = None,
        anchor_group: int = 0,
        raw_tokens: int = DEFAULT_RAW_TOKENS,
        num_layers: int | None = None,
        coder: str = "auto",
        transform: str | klt.KLTransform = "auto",
    ) -> None:
        if level not in LEVELS:
            raise CodecError(f"cachegen level {level!r} unknown; known: {sorted(LEVELS)}")
        if table_mode not in TABLE_MODES:
            raise CodecError(f"cachegen table_mode {table_mode!r} unknown; known: {TABLE_MODES}")
        if chunk_tokens is not None and not 2 <= chunk_tokens < 1 << 31:
            raise CodecError(f"cachegen chunk_tokens {chunk_tokens} out of range")
        if anchor_group == 1 or not 0 <= anchor_group < 1 << 16:
            raise CodecError(f"cachegen anchor_group {anchor_group}: 0 (off) or 2..65535")
        if not 0 <= raw_tokens < 256:
            raise CodecError(f"cachegen raw_tokens {raw_tokens}: 0..255")
        if coder not in CODERS:
            raise CodecError(f"cachegen coder {coder!r} unknown; known: {CODERS}")
        if not isinstance(transform, klt.KLTransform) and transform not in TRANSFORMS:
            raise CodecError(
                f"cachegen transform {transform!r} unknown; known: {TRANSFORMS} or a KLTransform"
            )
        if coder == "rans" and not rans.available():
            raise CodecError("cachegen coder 'rans': the compiled rANS coder is not available here")
        # rANS unless asked otherwise or unavailable; anchor/delta grouping is implemented with constriction
        self.use_rans = coder != "constriction" and not anchor_group and rans.available()
        self.level_name, self.level, self.table_mode = level, LEVELS[level], table_mode
        self.tables, self.chunk_tokens, self.anchor_group = tables, chunk_tokens, anchor_group
        self.num_layers, self.raw_tokens = num_layers, raw_tokens
        if tables is not None:
            register_tables(tables)  # so any instance in this process can decode what this one encodes
        self.transform = transform
        if isinstance(transform, klt.KLTransform):
            klt.register_transform(transform)

    # ---- encode ---------------------------------------------------------------------------------------

    def _tables(self) -> CacheGenTables | None:
        return self.tables if self.tables is not None else installed_tables()

    def transform_for(self, layer: int, channels: int, head_dim: int) -> klt.KLTransform | None:
        """The transform this encoder codes `layer` with (format v2), or None (v1: CacheGen's per-channel /
        per-token quantizers). Transform coding needs the compiled rANS coder, no raw tokens and no
        anchor/delta grouping; "auto" uses the installed model's transform where it covers the layer."""
        if self.transform == "off" or not self.use_rans or self.raw_tokens or self.anchor_group:
            return None
        tr = self.transform if isinstance(self.transform, klt.KLTransform) else klt.installed_transform()
        return tr if tr is not None and tr.covers(layer, channels, head_dim, self.level_name) else None

    def bins_for(self, layer: int) -> tuple[int, int]:
        """(K bins, V bins) this encoder uses at `layer`: the model's bit plan for this level when its tables
        (passed, else installed) carry one, else the level's shallow/deep rule. The model's depth comes from
        the constructor, else its tables, else `install_model()`, else DEFAULT_NUM_LAYERS is assumed."""
        tables = self._tables()
        plan = tables.plans.get(self.level_name) if tables is not None else None
        if plan is not None and layer < len(plan) and self.num_layers in (None, len(plan)):
            return plan[layer]
        num_layers = self.num_layers or (self.tables.num_layers if self.tables else installed_num_layers())
        return self.level.bins(layer, num_layers or DEFAULT_NUM_LAYERS)

    def chunk_size(self) -> int:
        """Tokens per chunk: the constructor's, else the tables' (what the bit plan was made for), else
        DEFAULT_CHUNK_TOKENS."""
        if self.chunk_tokens is not None:
            return self.chunk_tokens
        tables = self._tables()
        if tables is not None and tables.chunk_tokens is not None:
            return tables.chunk_tokens
        return DEFAULT_CHUNK_TOKENS

    def encode(self, k: Tensor, v: Tensor, layer: int) -> tuple[bytes, bytes]:
        params, parts = self.encode_parts(k, v, layer)
        return params, b"".join(parts)

    def _steps(self, tr: klt.KLTransform, layer: int) -> tuple[float, float] | None:
        """The transform's (K, V) steps for `layer`; None: the level's plan (see CacheGenL0Codec)."""
        return None

    def encode_parts(
        self, k: Tensor, v: Tensor, layer: int, token_ids: Tensor | None = None
    ) -> tuple[bytes, list[Buffer]]:
        """k, v: [T, Hkv, D] fp32/fp16/bf16 on CPU or CUDA (quantized there; entropy coded on the CPU)
        -> (params, payload parts: the ANS word arrays of each chunk's K and V)."""
        if k.dim() != 3 or k.shape != v.shape or min(k.shape) < 1:
            raise CodecError(
                f"k and v must both be non-empty [T, Hkv, D]; got {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if k.dtype != v.dtype or k.dtype not in DTYPE_CODES or k.device != v.device:
            raise CodecError(f"k/v dtype must be one of {list(DTYPE_CODES)}, equal, on one device")
        t, h, d = k.shape
        c = h * d
        tr = self.transform_for(layer, c, d)
        if tr is not None:
            chunks = chunk_bounds(t, self.chunk_size())
            params, words = klt.encode(tr, self.level_name, k, v, layer, chunks, steps=self._steps(tr, layer))
            return params, [w.data.cast("B") if _LITTLE else le_bytes(w) for w in words]
        kf, vf = k.reshape(t, c).float(), v.reshape(t, c).float()
        k_lim, v_lim = torch.stack([*torch.aminmax(kf), *torch.aminmax(vf)]).abs().view(2, 2).amax(1).tolist()
        if not (np.isfinite(k_lim) and np.isfinite(v_lim)):
            raise CodecError("cachegen: K/V contains NaN or Inf")
        wide = max(k_lim, v_lim) > FP16_SAFE
        scale_dtype = torch.float32 if wide else torch.float16  # of key scales and raw tokens
        kbins, vbins = self.bins_for(layer)
        tables = self._tables() if self.table_mode == "auto" and not self.anchor_group else None
        raw = min(self.raw_tokens, t)
        raw_parts = [le_bytes(kf[:raw].to(scale_dtype)), le_bytes(vf[:raw].to(scale_dtype))]
        directory, scales, table_parts, words, static = [], [], [], [], False
        for a, b in chunk_bounds(t - raw, self.chunk_size()):
            a, b = a + raw, b + raw
            centre, half, kq = quantize_keys(kf[a:b], levels_of(kbins), scale_dtype)
            vbase, ve, vq = quantize_values(vf[a:b], levels_of(vbins))
            kmode, ktab, kw = self._code(kq, kbins, layer, "k", tables)
            vmode, vtab, vw = self._code(vq, vbins, layer, "v", tables)
            directory.append(_CHUNK.pack(b - a, kw.size, vw.size, kmode, vmode))
            static = static or MODE_STATIC in (kmode, vmode)
            scales += [le_bytes(centre), le_bytes(half), le_bytes(vbase), le_bytes(ve)]
            table_parts += [ktab, vtab]
            words += [kw, vw]
        parts: list[Buffer] = [w.data.cast("B") if _LITTLE else le_bytes(w) for w in words]
        payload_crc = 0
        for part in parts:
            payload_crc = zlib.crc32(part, payload_crc)
        head = _HEADER.pack(
            _MAGIC,
            _VERSION,
            self.level.level_id,
            kbins,
            vbins,
            (FLAG_WIDE if wide else 0) | (FLAG_RANS if self.use_rans else 0),
            raw,
            self.anchor_group,
            len(directory),
            tables.table_id if static and tables is not None else 0,
            payload_crc,
        )
        body = b"".join([head, *directory, *raw_parts, *scales, *table_parts])
        return body + _CRC.pack(zlib.crc32(body)), parts

    def _code(
        self, q: Tensor, bins: int, layer: int, kind: str, tables: CacheGenTables | None
    ) -> tuple[int, bytes, np.ndarray]:
        """Symbols [t, C] -> (table mode, table bytes, ANS words)."""
        n = 2 * levels_of(bins) + 1
        channels = q.shape[1]
        if self.use_rans:
            return self._code_rans(q, n, bins, layer, kind, tables)
        if self.anchor_group:
            anchors, deltas = _split_delta(to_streams(q, n, False), self.anchor_group, n)
            acodes = table_codes(symbol_counts(anchors, n))
            dcodes = table_codes(symbol_counts(deltas, 2 * n - 1))
            models = _interleave(build_models(codes_to_probs(acodes)), build_models(codes_to_probs(dcodes)))
            streams = _interleave(list(anchors), list(deltas))
            return MODE_DELTA, pack_nibbles(acodes) + pack_nibbles(dcodes), ans_encode(streams, models)
        pairs = use_pairs(n)
        s = to_streams(q, n, pairs)
        if tables is not None and tables.has(layer, kind, bins, channels):
            return MODE_STATIC, b"", ans_encode(list(s), tables.models(layer, kind, bins, pairs))
        counts = symbol_counts(s, n, pairs)
        codes, shared = table_codes(counts), table_codes(counts.sum(0, keepdims=True))
        per_channel = code_bits(counts, codes_to_probs(codes)) + 4 * codes.size
        if code_bits(counts, codes_to_probs(shared)) + 4 * n < per_channel:
            probs = codes_to_probs(shared)
            model = build_models(pair_probs(probs) if pairs else probs)[0]
            return MODE_SHARED, pack_nibbles(shared), ans_encode([s.reshape(-1)], [model])
        probs = codes_to_probs(codes)
        models = build_models(pair_probs(probs) if pairs else probs)
        return MODE_CHANNEL, pack_nibbles(codes), ans_encode(list(s), models)

    def _code_rans(
        self, q: Tensor, n: int, bins: int, layer: int, kind: str, tables: CacheGenTables | None
    ) -> tuple[int, bytes, np.ndarray]:
        """`_code` with the compiled rANS coder: symbols stay token-major uint8 [t, C]."""
        sym = q.to(torch.uint8).cpu().numpy()
        channels = sym.shape[1]
        if tables is not None and tables.has(layer, kind, bins, channels):
            return MODE_STATIC, b"", rans.encode(sym, tables.rans_tables(layer, kind, bins))
        counts = rans.histogram(sym, n)
        codes, shared = table_codes(counts), table_codes(counts.sum(0, keepdims=True))
        per_channel = code_bits(counts, codes_to_probs(codes)) + 4 * codes.size
        if code_bits(counts, codes_to_probs(shared)) + 4 * n < per_channel:
            tab = rans.tables_from_codes(np.repeat(shared, channels, 0))
            return MODE_SHARED, pack_nibbles(shared), rans.encode(sym, tab)
        return MODE_CHANNEL, pack_nibbles(codes), rans.encode(sym, rans.tables_from_codes(codes))

    # ---- decode ---------------------------------------------------------------------------------------

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
        pay = memoryview(payload).cast("B") if not isinstance(payload, memoryview) else payload.cast("B")
        raw_params = bytes(params)
        if layer0.is_layer0_frame(raw_params):
            return layer0.decode(raw_params, pay, shape, dtype, dev)
        if raw_params[:2] == _MAGIC and len(raw_params) > 2 and raw_params[2] == klt.VERSION:
            pk = klt.parse(raw_params, shape, layer)
            self._check_payload(pay, pk.payload_crc, sum(ch[2] + ch[3] for ch in pk.chunks))
            if not rans.available():
                raise FrameForeign("cachegen: transform-coded frame, and no compiled rANS coder here")
            return klt.decode(pk, _words(pay), shape, dtype, layer, dev)
        p = parse_params(raw_params, shape)
        t, h, d = shape
        c = h * d
        self._check_payload(pay, p.payload_crc, sum(ch.k_words + ch.v_words for ch in p.chunks))
        all_words = _words(pay)
        tables = p.table(layer, c) if p.table_id else None
        out_k = torch.empty((t, c), dtype=dtype, device=dev)
        out_v = torch.empty((t, c), dtype=dtype, device=dev)
        mk, mv = levels_of(p.k_bins), levels_of(p.v_bins)
        if p.raw_tokens:
            out_k[: p.raw_tokens].copy_(p.raw_k)
            out_v[: p.raw_tokens].copy_(p.raw_v)
        w = 0
        for ch in p.chunks:
            kw = all_words[w : w + ch.k_words]
            vw = all_words[w + ch.k_words : w + ch.k_words + ch.v_words]
            w += ch.k_words + ch.v_words
            ksym = self._decode_part(
                kw, ch.k_mode, ch.k_table, p.k_bins, ch.tokens, layer, "k", tables, p, dev
            )
            vsym = self._decode_part(
                vw, ch.v_mode, ch.v_table, p.v_bins, ch.tokens, layer, "v", tables, p, dev
            )
            centre, half, vscale = (x.to(dev) for x in ch.scales)  # vscale: fp32 [t] from base and bytes
            out_k[ch.start : ch.start + ch.tokens].copy_(dequantize_keys(ksym, centre, half, mk))
            out_v[ch.start : ch.start + ch.tokens].copy_(dequantize_values(vsym, vscale, mv))
        return out_k.view(t, h, d), out_v.view(t, h, d)

    @staticmethod
    def _check_payload(pay: memoryview, crc: int, words: int) -> None:
        if zlib.crc32(pay) != crc:
            raise FrameCorrupted("cachegen payload crc32 mismatch")
        if 4 * words != len(pay):
            raise FrameCorrupted(f"cachegen payload: {len(pay)} bytes, the chunk directory says otherwise")

    def _decode_part(
        self,
        words: np.ndarray,
        mode: int,
        table: bytes,
        bins: int,
        t: int,
        layer: int,
        kind: str,
        tables: CacheGenTables | None,
        p: Params,
        device: torch.device,
    ) -> Tensor:
        """ANS words of one (chunk, K/V) -> symbols fp32 [t, C] on `device`."""
        n = 2 * levels_of(bins) + 1
        c = p.channels
        if p.flags & FLAG_RANS:
            if mode == MODE_STATIC:
                assert tables is not None  # parse_params checked it
                tab = tables.rans_tables(layer, kind, bins)
            elif mode == MODE_SHARED:
                tab = rans.tables_from_codes(np.repeat(unpack_nibbles(table, n).reshape(1, n), c, 0))
            else:
                tab = rans.tables_from_codes(unpack_nibbles(table, c * n).reshape(c, n))
            try:
                sym = rans.decode(words, t, tab)
            except CodecError as e:  # the coder is missing on this host
                raise FrameForeign(f"cachegen: {e}") from None
            return torch.from_numpy(sym).to(device).float()
        if mode == MODE_DELTA:
            g = p.anchor_group
            na = -(-t // g)
            acodes = unpack_nibbles(table, c * n).reshape(c, n)
            dcodes = unpack_nibbles(table[-(-c * n // 2) :], c * (2 * n - 1)).reshape(c, 2 * n - 1)
            models = _interleave(build_models(codes_to_probs(acodes)), build_models(codes_to_probs(dcodes)))
            anchors = np.empty((c, na), dtype=np.int32)
            deltas = np.empty((c, t - na), dtype=np.int32)
            ans_decode(words, models, [na, t - na] * c, _interleave(list(anchors), list(deltas)))
            return from_streams(_join_delta(anchors, deltas, g, n), n, False, t, device)
        pairs = use_pairs(n)
        length = (t + 1) // 2 if pairs else t
        s = np.empty((c, length), dtype=np.int32)
        if mode == MODE_STATIC:
            assert tables is not None  # parse_params checked it
            ans_decode(words, tables.models(layer, kind, bins, pairs), [length] * c, list(s))
        elif mode == MODE_SHARED:
            probs = codes_to_probs(unpack_nibbles(table, n).reshape(1, n))
            model = build_models(pair_probs(probs) if pairs else probs)[0]
            ans_decode(words, [model], [c * length], [s.reshape(-1)])
        else:
            probs = codes_to_probs(unpack_nibbles(table, c * n).reshape(c, n))
            ans_decode(words, build_models(pair_probs(probs) if pairs else probs), [length] * c, list(s))
        return from_streams(s, n, pairs, t, device)


# ---- params ------------------------------------------------------------------------------------------


class CacheGenL0Codec(CacheGenCodec):
    """`cachegen` with layer 0 sent as the prompt's token ids (`kv_transfer.codec.layer0`): the decoder
    recomputes it exactly from its model, and the other layers spend the level's budget (the transform's
    "<level>+l0" plan, calibrated with layer 0 free; the level's own plan where the transform has none).
    Layer 0 falls back to ordinary coding where the caller gives no ids or this process cannot reproduce the
    layer from them. A decode instance asks for it only if it has installed its model's layer-0 function."""

    name = "cachegen_l0"
    codec_id = 5

    def _steps(self, tr: klt.KLTransform, layer: int) -> tuple[float, float] | None:
        plan = tr.steps.get(self.level_name + klt.L0_SUFFIX)
        return (float(plan[layer][0]), float(plan[layer][1])) if plan is not None else None

    def encode_parts(
        self, k: Tensor, v: Tensor, layer: int, token_ids: Tensor | None = None
    ) -> tuple[bytes, list[Buffer]]:
        if layer == 0 and token_ids is not None and layer0.matches(k, v, token_ids):
            params, payload = layer0.encode(token_ids)
            return params, [payload]
        return super().encode_parts(k, v, layer, token_ids)


class Chunk:
    """One chunk of params: its tokens [start, start + tokens), ANS word counts, table modes, scales
    (key centre [C], key half-range [C], value scales [t], fp32) and table bytes."""

    __slots__ = ("start", "tokens", "k_words", "v_words", "k_mode", "v_mode", "scales", "k_table", "v_table")

    def __init__(self, start: int, tokens: int, k_words: int, v_words: int, k_mode: int, v_mode: int) -> None:
        self.start, self.tokens, self.k_words, self.v_words = start, tokens, k_words, v_words
        self.k_mode, self.v_mode = k_mode, v_mode
        self.scales: tuple[Tensor, ...] = ()  # (centre, half, vscale), set by parse_params
        self.k_table = self.v_table = b""


class Params:
    """Parsed, validated params."""

    def __init__(
        self, fields: tuple, chunks: list[Chunk], channels: int, raw_k: Tensor, raw_v: Tensor
    ) -> None:
        self.channels, self.raw_k, self.raw_v = channels, raw_k, raw_v
        (
            _,
            _,
            self.level_id,
            self.k_bins,
            self.v_bins,
            self.flags,
            self.raw_tokens,
            self.anchor_group,
            _,
            self.table_id,
        ) = fields[:10]
        self.payload_crc = fields[10]
        self.chunks = chunks

    def table(self, layer: int, channels: int) -> CacheGenTables:
        """The loaded static table named by table_id, checked to cover every STATIC part; else FrameForeign."""
        tables = lookup_tables(self.table_id)
        if tables is None:
            raise FrameForeign(f"cachegen: static table {self.table_id:#018x} is not loaded in this process")
        for ch in self.chunks:
            for kind, mode, bins in (("k", ch.k_mode, self.k_bins), ("v", ch.v_mode, self.v_bins)):
                if mode == MODE_STATIC and not tables.has(layer, kind, bins, channels):
                    raise FrameForeign(
                        f"cachegen: table {self.table_id:#018x} has no {kind} b{bins} for layer {layer}"
                    )
        return tables


def _table_bytes(mode: int, c: int, n: int) -> int:
    if mode == MODE_CHANNEL:
        return -(-c * n // 2)
    if mode == MODE_SHARED:
        return -(-n // 2)
    if mode == MODE_DELTA:
        return -(-c * n // 2) + -(-c * (2 * n - 1) // 2)
    return 0


def parse_params(params: Buffer, shape: Shape) -> Params:
    """Validate params against the frame's shape; FrameCorrupted / FrameForeign on anything wrong. Never
    allocates more than the params' own size (plus outputs sized by `shape`, which the frame capped)."""
    buf = bytes(params)
    if len(buf) < _HEADER.size + _CRC.size:
        raise FrameCorrupted(f"cachegen params: {len(buf)} bytes, too short")
    if buf[:2] != _MAGIC:
        raise FrameForeign(f"cachegen params: magic {buf[:2]!r}")
    (crc,) = _CRC.unpack_from(buf, len(buf) - _CRC.size)
    if zlib.crc32(buf[: -_CRC.size]) != crc:
        raise FrameCorrupted("cachegen params crc32 mismatch")
    fields = _HEADER.unpack_from(buf, 0)
    version, _, k_bins, v_bins, flags, raw, anchor_group, n_chunks, table_id, _ = fields[1:]
    if version != _VERSION:
        raise FrameForeign(f"cachegen params version {version}, this build reads {_VERSION}")
    t, h, d = shape
    c = h * d
    if (
        k_bins not in ALLOWED_BINS
        or v_bins not in ALLOWED_BINS
        or flags & ~(FLAG_WIDE | FLAG_RANS)
        or raw > t
    ):
        raise FrameCorrupted(f"cachegen params: bins {k_bins}/{v_bins}, flags {flags:#x}, {raw} raw tokens")
    if anchor_group and flags & FLAG_RANS:
        raise FrameCorrupted("cachegen params: anchor/delta grouping is never rANS-coded")
    if anchor_group == 1 or not (1 if raw < t else 0) <= n_chunks <= t - raw:
        raise FrameCorrupted(
            f"cachegen params: anchor group {anchor_group}, {n_chunks} chunks for {t} tokens"
        )
    off = _HEADER.size
    if len(buf) < off + n_chunks * _CHUNK.size + _CRC.size:
        raise FrameCorrupted("cachegen params: truncated chunk directory")
    chunks, start = [], raw
    nk, nv = 2 * levels_of(k_bins) + 1, 2 * levels_of(v_bins) + 1
    for _ in range(n_chunks):
        tokens, kw, vw, km, vm = _CHUNK.unpack_from(buf, off)
        off += _CHUNK.size
        for mode in (km, vm):
            if anchor_group:
                ok = mode == MODE_DELTA
            else:
                ok = mode in (MODE_CHANNEL, MODE_SHARED) or (mode == MODE_STATIC and table_id != 0)
            if not ok:
                raise FrameCorrupted(f"cachegen params: table mode {mode} (anchor group {anchor_group})")
        if tokens < 1 or start + tokens > t:
            raise FrameCorrupted(f"cachegen params: chunk of {tokens} tokens at {start} (T = {t})")
        chunks.append(Chunk(start, tokens, kw, vw, km, vm))
        start += tokens
    if start != t:
        raise FrameCorrupted(f"cachegen params: chunks cover {start} tokens, the frame has {t}")
    sdt = np.dtype("<f4") if flags & FLAG_WIDE else np.dtype("<f2")
    need = off + 2 * raw * c * sdt.itemsize + sum(2 * c * sdt.itemsize + 4 + ch.tokens for ch in chunks)
    need += sum(_table_bytes(ch.k_mode, c, nk) + _table_bytes(ch.v_mode, c, nv) for ch in chunks)
    if need + _CRC.size != len(buf):
        raise FrameCorrupted(f"cachegen params: {len(buf)} bytes, the header implies {need + _CRC.size}")
    raw_np = np.frombuffer(buf, dtype=sdt, count=2 * raw * c, offset=off).astype(np.float32)
    off += 2 * raw * c * sdt.itemsize
    if not np.isfinite(raw_np).all():
        raise FrameCorrupted("cachegen params: non-finite raw token")
    raw_kv = torch.from_numpy(raw_np).view(2, raw, c)
    for ch in chunks:
        kscales = np.frombuffer(buf, dtype=sdt, count=2 * c, offset=off).astype(np.float32)
        off += 2 * c * sdt.itemsize
        vbase = np.frombuffer(buf, dtype="<f4", count=1, offset=off).astype(np.float32)
        ve = np.frombuffer(buf, dtype=np.uint8, count=ch.tokens, offset=off + 4)
        off += 4 + ch.tokens
        if (
            not np.isfinite(kscales).all()
            or (kscales[c:] < 0).any()
            or not np.isfinite(vbase[0])
            or vbase[0] < 0
        ):
            raise FrameCorrupted("cachegen params: non-finite or negative scale")
        k_t = torch.from_numpy(kscales)
        vscale = value_scales(torch.from_numpy(vbase), torch.from_numpy(ve.copy()))
        ch.scales = (k_t[:c], k_t[c:], vscale)
    for ch in chunks:
        for attr, mode, n in (("k_table", ch.k_mode, nk), ("v_table", ch.v_mode, nv)):
            size = _table_bytes(mode, c, n)
            setattr(ch, attr, buf[off : off + size])
            off += size
    return Params(fields, chunks, c, raw_kv[0], raw_kv[1])


def error_bounds(params: Buffer, shape: Shape) -> tuple[Tensor, Tensor]:
    """Per-element bounds on |x - x_hat| implied by params (fp32 [T, Hkv, D] each), before the output
    dtype's rounding: h_c / (2M) for keys, s_t / (2M) for values; raw tokens: their fp16 (or fp32) rounding."""
    p = parse_params(params, shape)
    t, h, d = shape
    kb, vb = torch.empty(t, h * d), torch.empty(t, h * d)
    rel, tiny = (2.0**-24, 0.0) if p.flags & FLAG_WIDE else (2.0**-11, 2.0**-25)  # half an ulp (subnormal)
    kb[: p.raw_tokens] = p.raw_k.abs() * rel / (1 - rel) + tiny
    vb[: p.raw_tokens] = p.raw_v.abs() * rel / (1 - rel) + tiny
    mk, mv = levels_of(p.k_bins), levels_of(p.v_bins)
    for ch in p.chunks:
        _, half, vscale = ch.scales
        kb[ch.start : ch.start + ch.tokens] = (half / (2 * mk))[None, :]
        vb[ch.start : ch.start + ch.tokens] = (vscale / (2 * mv))[:, None]
    return kb.view(t, h, d), vb.view(t, h, d)


# Significand precision (bits, the implicit one included) per output dtype: rounding to it moves a value by at
# most |x| * 2**-p.
_PRECISION = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def error_allowance(x: Tensor, x_hat: Tensor, bound: Tensor) -> Tensor:
    """What |x - x_hat| may reach, per element (fp32): the frame's bound (`error_bounds`) plus the output
    dtype's rounding (x_hat's dtype) and fp32 arithmetic. A reconstruction beyond it is a codec bug."""
    x32, x_hat32 = x.float(), x_hat.float()
    rounding = torch.maximum(x32.abs(), x_hat32.abs()) * 2.0 ** -_PRECISION.get(x_hat.dtype, 24)
    return bound * (1 + 1e-5) + rounding + 1e-6 * float(x32.abs().max())


# ---- helpers -------------------------------------------------------------------------------------------


def _words(pay: memoryview) -> np.ndarray:
    """Payload bytes -> uint32 words (little-endian; copied only when unaligned or on big-endian hosts)."""
    words = np.frombuffer(pay, dtype="<u4")
    if not _LITTLE or words.ctypes.data % 4:
        words = words.astype(np.uint32)
    return words


def _interleave(a: list, b: list) -> list:
    out = [None] * (len(a) + len(b))
    out[0::2], out[1::2] = a, b
    return out


def _split_delta(s: np.ndarray, g: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Symbols int32 [C, t] -> anchors [C, ceil(t/g)] and deltas to their anchor + (n - 1) [C, t - anchors]."""
    t = s.shape[1]
    anchors = np.ascontiguousarray(s[:, ::g])
    mask = np.ones(t, dtype=bool)
    mask[::g] = False
    base = np.repeat(anchors, g, axis=1)[:, :t]
    return anchors, np.ascontiguousarray((s - base)[:, mask] + (n - 1))


def _join_delta(anchors: np.ndarray, deltas: np.ndarray, g: int, n: int) -> np.ndarray:
    t = anchors.shape[1] + deltas.shape[1]
    s = np.repeat(anchors, g, axis=1)[:, :t]
    mask = np.ones(t, dtype=bool)
    mask[::g] = False
    s[:, mask] += deltas - (n - 1)
    if (s < 0).any() or (s >= n).any():
        raise FrameCorrupted("cachegen: anchor/delta symbols out of range")
    return s


__all__ = ["LEVELS", "CacheGenCodec", "CacheGenTables", "error_bounds", "parse_params"]
