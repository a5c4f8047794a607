"""CacheGen format v1: CacheGen's own quantizers (per-channel keys, per-token values), then per-(layer, K/V,
channel) entropy coding by the compiled rANS coder. `cachegen` codes a layer this way where its context has
no transform that covers the layer (a model without calibration: `pdserve calibrate` writes one).

Quantization, per chunk of at most `chunk_tokens` tokens (chunks are coded independently):
  * keys, per channel c (= head x dim) over the chunk's tokens: centre_c = (max_c + min_c) / 2, half-range
    h_c >= max_t |x - centre_c|, q = round((x - centre_c) * M / h_c) in [-M, M];
  * values, per token t over its Hkv*D channels: s_t >= max_c |x|, q = round(x * M / s_t) in [-M, M], where
    s_t = base * 2^(-e_t / 16) travels as one byte e_t per token (base: fp32 per chunk), at most 4.4% above
    the token's absmax;
  * M = bins // 2 - 1 (LMCache's convention: 32 bins -> 31 levels, 16 -> 15, 8 -> 7); shallow layers get
    more bins than deep ones, per the quality level (`LEVELS`), or per the model's calibrated bit plan.
  ERROR BOUND, per element: |x - x_hat| <= h_c / (2M) for keys and <= s_t / (2M) for values, with h_c and
  s_t as stored (h_c: fp16 rounded up, or fp32 when a key exceeds fp16's range), plus fp32 rounding and the
  output dtype's rounding. `error_bounds(params, shape)` returns these bounds per element.

Entropy coding: symbols stay token-major uint8 [t, C]; channel c's symbols are coded with channel c's
categorical table (`rans.encode`: one C call per (chunk, K/V)). Tables come:
  * STATIC: from the model's profiled tables (`cachegen_tables`), identified by their u64 id in params;
  * CHANNEL: from the chunk itself, shipped as 4-bit code lengths (half-bit steps of -log2 p) per symbol and
    channel: 4 bytes per channel at 8 bins, ~0.03 bits per element at 1024-token chunks;
  * SHARED: one chunk table for all channels, which the encoder picks instead of CHANNEL when it is smaller
    overall (short chunks, where per-channel tables would cost more than they save).

params (little-endian, no pickle): `_HEADER` | chunk directory n x `_CHUNK` | per chunk: K centre [C] and
K half [C] (fp16, or fp32 per flag), V base (fp32), V e [t] (u8) | per chunk: K table, V table (per mode) |
crc32 of all before it. The header's raw-token and anchor-group fields are 0 (options removed: frames with
other values, or coded by `constriction` rather than rANS, came from older builds and raise FrameForeign).
payload: per chunk, K's rANS words then V's (u32 little-endian); its crc32 is in the header.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch
from torch import Tensor

from kv_transfer.codec import rans
from kv_transfer.codec.base import Shape
from kv_transfer.codec.cachegen_core import (
    ALLOWED_BINS,
    FP16_SAFE,
    Level,
    code_bits,
    codes_to_probs,
    dequantize_keys,
    dequantize_values,
    le_bytes,
    le_view,
    levels_of,
    pack_nibbles,
    quantize_keys,
    quantize_values,
    table_codes,
    unpack_nibbles,
    value_scales,
)
from kv_transfer.codec.cachegen_tables import CacheGenTables
from kv_transfer.errors import CodecError, FrameCorrupted, FrameForeign

MAGIC = b"CG"
VERSION = 1
# magic, version, level id, k bins, v bins, flags, raw tokens (0), anchor group (0), n chunks, table id,
# payload crc
_HEADER = struct.Struct("<2sBBBBBBHIQI")
_CHUNK = struct.Struct("<IIIBB")  # tokens, k words, v words, k table mode, v table mode
_CRC = struct.Struct("<I")
FLAG_WIDE = 1  # key scales in fp32 (some |value| is beyond fp16's range), else fp16
FLAG_RANS = 2  # entropy-coded by the compiled rANS coder: always set (older builds also wrote constriction)
MODE_CHANNEL, MODE_SHARED, MODE_STATIC = 0, 1, 2


# ---- encode --------------------------------------------------------------------------------------------


def encode(
    k: Tensor,
    v: Tensor,
    layer: int,
    level: Level,
    bins: tuple[int, int],
    chunks: list[tuple[int, int]],
    tables: CacheGenTables | None,
) -> tuple[bytes, list[np.ndarray]]:
    """k, v: [T, Hkv, D] (checked by the caller), CPU or CUDA (quantized there) -> (params, rANS word arrays
    per chunk: K, V). `bins` = (K bins, V bins) of this layer; `chunks`: token ranges covering [0, T);
    `tables`: the model's static tables, if any."""
    t, h, d = k.shape
    c = h * d
    kf, vf = k.reshape(t, c).float(), v.reshape(t, c).float()
    k_lim, v_lim = torch.stack([*torch.aminmax(kf), *torch.aminmax(vf)]).abs().view(2, 2).amax(1).tolist()
    if not (np.isfinite(k_lim) and np.isfinite(v_lim)):
        raise CodecError("cachegen: K/V contains NaN or Inf")
    wide = max(k_lim, v_lim) > FP16_SAFE
    scale_dtype = torch.float32 if wide else torch.float16  # of key scales
    kbins, vbins = bins
    directory, scales, table_parts, words, static = [], [], [], [], False
    for a, b in chunks:
        centre, half, kq = quantize_keys(kf[a:b], levels_of(kbins), scale_dtype)
        vbase, ve, vq = quantize_values(vf[a:b], levels_of(vbins))
        kmode, ktab, kw = _code(kq, kbins, layer, "k", tables)
        vmode, vtab, vw = _code(vq, vbins, layer, "v", tables)
        directory.append(_CHUNK.pack(b - a, kw.size, vw.size, kmode, vmode))
        static = static or MODE_STATIC in (kmode, vmode)
        scales += [le_bytes(centre), le_bytes(half), le_bytes(vbase), le_bytes(ve)]
        table_parts += [ktab, vtab]
        words += [kw, vw]
    payload_crc = 0
    for w in words:
        payload_crc = zlib.crc32(le_view(w), payload_crc)
    head = _HEADER.pack(
        MAGIC,
        VERSION,
        level.level_id,
        kbins,
        vbins,
        (FLAG_WIDE if wide else 0) | FLAG_RANS,
        0,
        0,
        len(directory),
        tables.table_id if static and tables is not None else 0,
        payload_crc,
    )
    body = b"".join([head, *directory, *scales, *table_parts])
    return body + _CRC.pack(zlib.crc32(body)), words


def _code(
    q: Tensor, bins: int, layer: int, kind: str, tables: CacheGenTables | None
) -> tuple[int, bytes, np.ndarray]:
    """Symbols fp32 [t, C] in [0, 2M] -> (table mode, table bytes, rANS words)."""
    n = 2 * levels_of(bins) + 1
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


# ---- decode --------------------------------------------------------------------------------------------


def decode(
    p: Params,
    words: np.ndarray,
    shape: Shape,
    dtype: torch.dtype,
    layer: int,
    device: torch.device,
    tables: CacheGenTables | None,
) -> tuple[Tensor, Tensor]:
    """Parsed params + all payload words (uint32, sizes checked by `check_payload`) -> k, v [T, Hkv, D] in
    `dtype` on `device`. `tables`: the context's static tables (FrameForeign if a STATIC part needs others)."""
    t, h, d = shape
    c = h * d
    if p.table_id:
        p.check_tables(tables, layer, c)
    out_k = torch.empty((t, c), dtype=dtype, device=device)
    out_v = torch.empty((t, c), dtype=dtype, device=device)
    mk, mv = levels_of(p.k_bins), levels_of(p.v_bins)
    w = 0
    for ch in p.chunks:
        kw = words[w : w + ch.k_words]
        vw = words[w + ch.k_words : w + ch.k_words + ch.v_words]
        w += ch.k_words + ch.v_words
        ksym = _decode_part(kw, ch.k_mode, ch.k_table, p.k_bins, ch.tokens, layer, "k", tables, c, device)
        vsym = _decode_part(vw, ch.v_mode, ch.v_table, p.v_bins, ch.tokens, layer, "v", tables, c, device)
        centre, half, vscale = (x.to(device) for x in ch.scales)  # vscale: fp32 [t] from base and bytes
        out_k[ch.start : ch.start + ch.tokens].copy_(dequantize_keys(ksym, centre, half, mk))
        out_v[ch.start : ch.start + ch.tokens].copy_(dequantize_values(vsym, vscale, mv))
    return out_k.view(t, h, d), out_v.view(t, h, d)


def _decode_part(
    words: np.ndarray,
    mode: int,
    table: bytes,
    bins: int,
    t: int,
    layer: int,
    kind: str,
    tables: CacheGenTables | None,
    c: int,
    device: torch.device,
) -> Tensor:
    """rANS words of one (chunk, K/V) -> symbols fp32 [t, C] on `device`."""
    n = 2 * levels_of(bins) + 1
    if mode == MODE_STATIC:
        assert tables is not None  # Params.check_tables checked it
        tab = tables.rans_tables(layer, kind, bins)
    elif mode == MODE_SHARED:
        tab = rans.tables_from_codes(np.repeat(unpack_nibbles(table, n).reshape(1, n), c, 0))
    else:
        tab = rans.tables_from_codes(unpack_nibbles(table, c * n).reshape(c, n))
    return torch.from_numpy(rans.decode(words, t, tab)).to(device).float()


# ---- params --------------------------------------------------------------------------------------------


class Chunk:
    """One chunk of params: its tokens [start, start + tokens), rANS word counts, table modes, scales
    (key centre [C], key half-range [C], value scales [t], fp32) and table bytes."""

    __slots__ = ("start", "tokens", "k_words", "v_words", "k_mode", "v_mode", "scales", "k_table", "v_table")

    def __init__(self, start: int, tokens: int, k_words: int, v_words: int, k_mode: int, v_mode: int) -> None:
        self.start, self.tokens, self.k_words, self.v_words = start, tokens, k_words, v_words
        self.k_mode, self.v_mode = k_mode, v_mode
        self.scales: tuple[Tensor, Tensor, Tensor] = ()  # type: ignore[assignment]
        self.k_table = self.v_table = b""


class Params:
    """Parsed, validated params."""

    def __init__(self, fields: tuple, chunks: list[Chunk], channels: int) -> None:
        self.channels, self.chunks = channels, chunks
        _, _, self.level_id, self.k_bins, self.v_bins, self.flags = fields[:6]
        self.table_id, self.payload_crc = fields[9], fields[10]

    def check_tables(self, tables: CacheGenTables | None, layer: int, channels: int) -> None:
        """FrameForeign unless `tables` are the ones named by table_id and cover every STATIC part."""
        if tables is None or tables.table_id != self.table_id:
            raise FrameForeign(
                f"cachegen: static table {self.table_id:#018x} is not loaded in this codec context"
            )
        for ch in self.chunks:
            for kind, mode, bins in (("k", ch.k_mode, self.k_bins), ("v", ch.v_mode, self.v_bins)):
                if mode == MODE_STATIC and not tables.has(layer, kind, bins, channels):
                    raise FrameForeign(
                        f"cachegen: table {self.table_id:#018x} has no {kind} b{bins} for layer {layer}"
                    )


def _table_bytes(mode: int, c: int, n: int) -> int:
    if mode == MODE_CHANNEL:
        return -(-c * n // 2)
    if mode == MODE_SHARED:
        return -(-n // 2)
    return 0


def parse_params(params: bytes, shape: Shape) -> Params:
    """Validate params against the frame's shape; FrameCorrupted / FrameForeign on anything wrong. Never
    allocates more than the params' own size (plus outputs sized by `shape`, which the frame capped)."""
    buf = params
    if len(buf) < _HEADER.size + _CRC.size:
        raise FrameCorrupted(f"cachegen params: {len(buf)} bytes, too short")
    if buf[:2] != MAGIC:
        raise FrameForeign(f"cachegen params: magic {buf[:2]!r}")
    (crc,) = _CRC.unpack_from(buf, len(buf) - _CRC.size)
    if zlib.crc32(buf[: -_CRC.size]) != crc:
        raise FrameCorrupted("cachegen params crc32 mismatch")
    fields = _HEADER.unpack_from(buf, 0)
    version, _, k_bins, v_bins, flags, raw, anchor_group, n_chunks, table_id, _ = fields[1:]
    if version != VERSION:
        raise FrameForeign(f"cachegen params version {version}, this build reads {VERSION}")
    if raw or anchor_group or not flags & FLAG_RANS:
        raise FrameForeign("cachegen v1 frame with raw tokens, anchors or constriction: an older build's")
    t, h, d = shape
    c = h * d
    if k_bins not in ALLOWED_BINS or v_bins not in ALLOWED_BINS or flags & ~(FLAG_WIDE | FLAG_RANS):
        raise FrameCorrupted(f"cachegen params: bins {k_bins}/{v_bins}, flags {flags:#x}")
    if not 1 <= n_chunks <= t:
        raise FrameCorrupted(f"cachegen params: {n_chunks} chunks for {t} tokens")
    off = _HEADER.size
    if len(buf) < off + n_chunks * _CHUNK.size + _CRC.size:
        raise FrameCorrupted("cachegen params: truncated chunk directory")
    chunks, start = [], 0
    nk, nv = 2 * levels_of(k_bins) + 1, 2 * levels_of(v_bins) + 1
    for _ in range(n_chunks):
        tokens, kw, vw, km, vm = _CHUNK.unpack_from(buf, off)
        off += _CHUNK.size
        for mode in (km, vm):
            if not (mode in (MODE_CHANNEL, MODE_SHARED) or (mode == MODE_STATIC and table_id != 0)):
                raise FrameCorrupted(f"cachegen params: table mode {mode}")
        if tokens < 1 or start + tokens > t:
            raise FrameCorrupted(f"cachegen params: chunk of {tokens} tokens at {start} (T = {t})")
        chunks.append(Chunk(start, tokens, kw, vw, km, vm))
        start += tokens
    if start != t:
        raise FrameCorrupted(f"cachegen params: chunks cover {start} tokens, the frame has {t}")
    sdt = np.dtype("<f4") if flags & FLAG_WIDE else np.dtype("<f2")
    need = off + sum(2 * c * sdt.itemsize + 4 + ch.tokens for ch in chunks)
    need += sum(_table_bytes(ch.k_mode, c, nk) + _table_bytes(ch.v_mode, c, nv) for ch in chunks)
    if need + _CRC.size != len(buf):
        raise FrameCorrupted(f"cachegen params: {len(buf)} bytes, the header implies {need + _CRC.size}")
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
    return Params(fields, chunks, c)


def error_bounds(params: bytes | memoryview, shape: Shape) -> tuple[Tensor, Tensor]:
    """Per-element bounds on |x - x_hat| implied by params (fp32 [T, Hkv, D] each), before the output
    dtype's rounding: h_c / (2M) for keys, s_t / (2M) for values."""
    p = parse_params(bytes(params), shape)
    t, h, d = shape
    kb, vb = torch.empty(t, h * d), torch.empty(t, h * d)
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
