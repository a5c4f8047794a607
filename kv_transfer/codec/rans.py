"""The CacheGen codec's compiled kernels: a rANS entropy coder with per-channel tables (format v1), and format
v5's discrete Laplace models, quantizer, coder and RoPE step.

Format v1 (`encode`/`decode`): symbols are uint8 [T, C] (token-major, exactly as quantization lays them
out); symbol [t, c] is coded with channel c's table, so neither side transposes or loops over channels in
Python. The coder is rANS with a 64-bit state and 32-bit renormalisation (at most one word per symbol;
Duda's ANS in the form of Giesen's rans64), probabilities quantized to PROB_BITS = 11 bits (a 2 KiB decode
lookup per channel). Tables are integer frequencies [C, n] summing to 2048 per row, every symbol >= 1 (so
any symbol in [0, n) stays encodable), built deterministically from integer weights (`freqs_from_weights`),
so encoder and decoder derive bit-identical tables on any machine.

Format v5 (`*5`, used by cachegen_klt): each component's symbols get a two-sided geometric model from two
bytes (rho, amax), fitted and built in C; a layer's chunks are quantized, fitted and coded in one call
(`encode5` / `decode5`; `stats4` is the statistics pass before it), component-major; on the CPU the codec
calls `encode5_kv` / `decode5_kv`, which add the transform's products, RoPE and fp16 (one call per layer and side). Its coder: 32-bit
states with 16-bit renormalisation (uint16 words), STATES = 16 states per part (K, V), token t of a component
coded by state t % 16, so a group of 16 tokens is two 8-lane vectors. Two implementations write and read the
same bitstream: an AVX2 one (per-row tables of one uint32 per slot / symbol read with gathers; one shuffle
renormalises 8 lanes; K and V side by side) and a portable scalar one. The AVX2 one runs where the CPU has
AVX2 (checked when called; the library is built without -march, the AVX2 functions carry their own target);
`simd=False` or PDSERVE_RANS_SIMD=0 selects the portable one. The decoder writes values straight into the
caller's rows (no symbol buffer).

Wire (v1): uint32 words in decode order; the first two are the final encoder state (low, high). v5: uint16
words per part, the first 32 the 16 final states (low, high each). Either decoder checks that it consumed
every word and ended in the encoder's initial states, so truncated or altered words are detected (a wrong
symbol count or table also fails these checks with high probability; the frame CRCs catch the rest).

Speed: see docs/benchmarks.md (bench.codec). The C source, `rans.c` beside this file, is compiled when the
package is built (setup.py); in a source checkout without that build it is compiled on first use
(`engine.cbuild`); `available()` says whether it loaded. Without either there is no `cachegen` codec (the
registry reports it as not installed); raw, int8 and fp8 remain.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import logging
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import torch

from kv_transfer.errors import CodecError, FrameCorrupted

log = logging.getLogger(__name__)

PROB_BITS = 11
PROB_SCALE = 1 << PROB_BITS
MAX_ALPHABET = 256  # symbols are bytes; CacheGen uses at most 63
WEIGHT_BITS = 20  # integer weights are in [0, 2^20]
STATES = 16  # format v5: rANS states per part (rans.c NS)
_F32 = torch.float32
DECODE_PAD = 2 * STATES  # words of padding decode5 copies the payload into (readable by the vector steps)
STREAM_SLACK = 2 * STATES + 8  # words a v5 part may take beyond one per symbol (rans.c code5's "+ 40")

_C_SOURCE = Path(__file__).with_name("rans.c")  # shipped as package data beside the built library
BUILT_NAME = (
    "_rans"  # setup.py's extension: kv_transfer/codec/_rans<EXTENSION_SUFFIX>, built with the package
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_origin: str | None = None
_tried = False


def source_id(text: str) -> str:
    """The id setup.py compiles into the library (CG_SOURCE_ID): the first 16 hex digits of sha256(rans.c)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def built_library(directory: Path | None = None) -> Path | None:
    """The library setup.py built beside this module (a wheel or an in-place build), if there is one."""
    here = directory or _C_SOURCE.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{BUILT_NAME}{suffix}"
        if path.exists():
            return path
    return None


def _open() -> tuple[ctypes.CDLL, str]:
    """-> (library, origin): setup.py's build when it matches rans.c ("built"); in a source checkout without
    one (or with a stale in-place build), compiled now by engine.cbuild ("first use": the development
    fallback). RuntimeError / OSError when neither is possible."""
    source = _C_SOURCE.read_text() if _C_SOURCE.exists() else None
    built = built_library()
    if built is not None:
        lib = ctypes.CDLL(str(built))
        lib.cg_source_id.restype = ctypes.c_char_p
        if source is None or lib.cg_source_id().decode() == source_id(source):
            return lib, "built"
        log.info("%s was built from another rans.c (a stale in-place build): compiling the checkout's", built)
    if source is None:
        raise RuntimeError(f"{_C_SOURCE.parent}: neither the built {BUILT_NAME} library nor rans.c")
    from engine.cbuild import build_library

    return ctypes.CDLL(str(build_library("pdserve_rans", source))), "first use"


def _load() -> ctypes.CDLL | None:
    global _lib, _origin, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("PDSERVE_RANS", "1") != "0":
            try:
                lib, origin = _open()
                p, i64 = ctypes.c_void_p, ctypes.c_int64
                lib.cg_rans_encode.restype = i64
                lib.cg_rans_encode.argtypes = [p, i64, i64, p, p, i64, p, i64]
                lib.cg_rans_decode.restype = i64
                lib.cg_rans_decode.argtypes = [p, i64, i64, i64, p, p, i64, p]
                lib.cg_rans_lut.restype = None
                lib.cg_rans_lut.argtypes = [p, p, i64, i64, p]
                lib.cg_hist.restype = i64
                lib.cg_hist.argtypes = [p, i64, i64, i64, p]
                lib.cg4_stats.restype = i64
                lib.cg4_stats.argtypes = [p, p, i64, i64, i64, p, p]
                lib.cg5_encode.restype = i64
                lib.cg5_encode.argtypes = [p, p, i64, i64, i64, p, p, p, i64, p, p, p, p, p, i64]
                lib.cg5_code.restype = i64
                lib.cg5_code.argtypes = [p, i64, i64, p, i64, p, p, p, p, p, i64]
                lib.cg5_uncode.restype = i64
                lib.cg5_uncode.argtypes = [p, i64, i64, i64, p, p, p, p, i64, p, p, i64]
                lib.cg5_decode.restype = i64
                lib.cg5_decode.argtypes = [
                    p,
                    i64,
                    i64,
                    i64,
                    i64,
                    i64,
                    p,
                    p,
                    p,
                    p,
                    p,
                    p,
                    i64,
                    p,
                    p,
                    p,
                    i64,
                    i64,
                ]
                lib.cg5_simd_available.restype = i64
                lib.cg5_simd_available.argtypes = []
                lib.cg_rope.restype = None
                lib.cg_rope.argtypes = [p, i64, i64, i64, p, p, i64, ctypes.c_float, p]
                lib.cg5_side.restype = i64
                lib.cg5_side.argtypes = [p, p, i64, i64, i64, p, p, p]
                lib.cg5_parse_side.restype = i64
                lib.cg5_parse_side.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, p]
                lib.cg5_encode_layer.restype = i64
                lib.cg5_encode_layer.argtypes = [p, p, i64, i64, i64, p, p, i64, p, p, p, p, p, p, p, p, i64]
                lib.cg5_check_weights.restype = i64
                lib.cg5_check_weights.argtypes = [p, i64]
                lib.cg_rope_f16.restype = None
                lib.cg_rope_f16.argtypes = [p, p, i64, i64, i64, p, p, i64, ctypes.c_float, p, p, i64]
                lib.cg_l0_gather.restype = i64
                lib.cg_l0_gather.argtypes = [p, p, i64, p, i64, i64, i64, p, p, i64, p, p, i64]
                lib.cg_l0_check.restype = i64
                lib.cg_l0_check.argtypes = [p, p, i64, p, i64, i64, i64, p, p, i64, p, p, p, i64]
                lib.cg_lap_tables.restype = i64
                lib.cg_lap_tables.argtypes = [p, p, i64, i64, p, p, p, p, i64]
                lib.cg5_encode_kv.restype = i64
                # k, v, half, T, H, D, fk, fv, cos, sin, ld, nch | bounds, plan, mid | wsym .. nw, simd
                # k, v, half, T, H, D, fk, fv, cos, sin, ld, nch, bounds, plan, mid; wsym, side, centre, step,
                # rho, amax, out, nw, simd
                lib.cg5_encode_kv.argtypes = [*(p, p, i64, i64, i64, i64, p, p, p, p, i64, i64, p, p, i64)]
                lib.cg5_encode_kv.argtypes += [*(p, p, p, p, p, p, p, p, i64, p)]  # ..., simd, crc
                lib.cg5_decode_kv.restype = i64
                # side, nch, C, T, wide, mid, words, nwords, wsym, H, D; gk, gv, cos, sin, ld, half, k, v, simd
                lib.cg5_decode_kv.argtypes = [*(p, i64, i64, i64, i64, i64, p, i64, p, i64, i64)]
                lib.cg5_decode_kv.argtypes += [*(p, p, p, p, i64, i64, p, p, i64, i64)]  # ..., simd, crc
                lib.cg_crc32.restype = ctypes.c_uint32
                lib.cg_crc32.argtypes = [p, i64, ctypes.c_uint32, i64]
                _lib, _origin = lib, origin
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning(
                    "compiled rANS coder unavailable, so is the cachegen codec: the package was installed without "
                    "its built %s library (setup.py build_ext) and rans.c could not be compiled here: %s",
                    BUILT_NAME,
                    e,
                )
        _tried = True
        return _lib


def available() -> bool:
    """True when the compiled coder is loaded (PDSERVE_RANS=0 disables it)."""
    return _load() is not None


def library_origin() -> str | None:
    """ "built" (setup.py's library, what an installed package uses), "first use" (compiled from rans.c by
    engine.cbuild: a development checkout without that build), or None (not available)."""
    _load()
    return _origin


def simd_available() -> bool:
    """True when the format-v5 coder's AVX2 path can run here (x86-64 with AVX2; the library was loaded)."""
    lib = _load()
    return lib is not None and bool(lib.cg5_simd_available())


def use_simd(simd: bool | None = None) -> int:
    """The `simd` argument of the v5 kernels: `simd` where given, else not PDSERVE_RANS_SIMD=0. The C side
    still runs the portable coder on a CPU without AVX2; both write and read the same bitstream."""
    if simd is None:
        simd = os.environ.get("PDSERVE_RANS_SIMD", "1") != "0"
    return int(simd)


def _lib_or_raise() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise CodecError("the compiled rANS coder is not available on this host (no C compiler?)")
    return lib


def _ptr(a: np.ndarray) -> int:
    """The address of a C-contiguous array's data. ctypes' own buffer view first (a third of `a.ctypes.data`'s
    cost, which a layer pays some 20 times); read-only or empty arrays take `a.ctypes.data`."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))  # type: ignore[arg-type]
    except (TypeError, ValueError, BufferError):
        return a.ctypes.data


class Tables:
    """Per-channel rANS tables: freq and cum uint32 [C, n]; fc = freq | cum << 12 (the decoder's
    per-symbol word); the decode lookup uint8 [C, PROB_SCALE] is built lazily.
    Immutable once built (static tables share one instance across threads)."""

    def __init__(self, freq: np.ndarray) -> None:
        freq = np.ascontiguousarray(freq, dtype=np.uint32)
        if freq.ndim != 2 or not 1 <= freq.shape[1] <= MAX_ALPHABET:
            raise CodecError(f"rANS tables must be [C, n] with 1 <= n <= {MAX_ALPHABET}, got {freq.shape}")
        if (freq.sum(1, dtype=np.int64) != PROB_SCALE).any():
            raise CodecError(f"rANS table rows must sum to {PROB_SCALE}")
        self.freq = freq
        self.cum = np.ascontiguousarray(np.cumsum(freq, 1, dtype=np.uint32) - freq)
        self.channels, self.n = freq.shape
        self.fc = self.freq | self.cum << 12
        self._lut: np.ndarray | None = None

    @classmethod
    def _built(cls, freq: np.ndarray, cum: np.ndarray, lut: np.ndarray | None) -> Tables:
        """Tables the compiled builder made (rows sum to PROB_SCALE by construction): no re-checking."""
        t = cls.__new__(cls)
        t.freq, t.cum, t._lut = freq, cum, lut
        t.fc = freq | cum << 12
        t.channels, t.n = freq.shape
        return t

    def lut(self) -> np.ndarray:
        if self._lut is None:
            lut = np.empty((self.channels, PROB_SCALE), dtype=np.uint8)
            _lib_or_raise().cg_rans_lut(_ptr(self.freq), _ptr(self.cum), self.channels, self.n, _ptr(lut))
            self._lut = lut
        return self._lut


def freqs_from_weights(weights: np.ndarray) -> np.ndarray:
    """Integer weights int64 [C, n] in [0, 2^20] -> frequencies uint32 [C, n], each >= 1, rows summing to
    PROB_SCALE: 1 + floor(w * (PROB_SCALE - n) / sum(w)), the rounding remainder going to the first largest
    weight. All-integer, hence identical on every machine. A row of zeros becomes uniform."""
    w = np.asarray(weights, dtype=np.int64)
    c, n = w.shape
    if n > PROB_SCALE // 2:
        raise CodecError(f"alphabet {n} too large for {PROB_BITS}-bit probabilities")
    w = np.where(w.sum(1, keepdims=True) > 0, w, 1)
    total = w.sum(1, keepdims=True)
    freq = 1 + (w * (PROB_SCALE - n)) // total
    rest = PROB_SCALE - freq.sum(1)
    freq[np.arange(c), w.argmax(1)] += rest
    return freq.astype(np.uint32)


# 4-bit code lengths (half-bit steps of -log2 p, 15 = absent; see cachegen_core.table_codes) -> weights.
_CODE_WEIGHTS = np.array([round(2.0 ** (WEIGHT_BITS - c / 2)) for c in range(15)] + [0], dtype=np.int64)


def tables_from_codes(codes: np.ndarray) -> Tables:
    """uint8 [C, n] code lengths -> Tables."""
    return Tables(freqs_from_weights(_CODE_WEIGHTS[codes.astype(np.int64)]))


def tables_from_probs(probs: np.ndarray) -> Tables:
    """Non-negative float [C, n] (unnormalised) -> Tables, via weights floor(p / max_row(p) * 2^20)."""
    p = np.asarray(probs, dtype=np.float64)
    top = p.max(1, keepdims=True)
    w = np.floor(np.where(top > 0, p / np.where(top > 0, top, 1.0), 0.0) * (1 << WEIGHT_BITS))
    return Tables(freqs_from_weights(w.astype(np.int64)))


def histogram(sym: np.ndarray, n: int) -> np.ndarray:
    """uint8 [T, C] -> per-channel symbol counts int64 [C, n]."""
    sym = np.ascontiguousarray(sym, dtype=np.uint8)
    t, c = sym.shape
    counts = np.zeros((c, n), dtype=np.int64)
    if _lib_or_raise().cg_hist(_ptr(sym), t, c, n, _ptr(counts)) != 0:
        raise CodecError(f"symbol out of range [0, {n})")
    return counts


def encode(sym: np.ndarray, tables: Tables) -> np.ndarray:
    """uint8 [T, C] -> uint32 words (decode order)."""
    sym = np.ascontiguousarray(sym, dtype=np.uint8)
    t, c = sym.shape
    if c != tables.channels:
        raise CodecError(f"{c} channels of symbols, tables for {tables.channels}")
    cap = t * c + 8  # at most one word per symbol, plus the two states
    out = np.empty(cap, dtype=np.uint32)
    got = _lib_or_raise().cg_rans_encode(
        _ptr(sym), t, c, _ptr(tables.freq), _ptr(tables.cum), tables.n, _ptr(out), cap
    )
    if got == -3:
        raise MemoryError("rANS encoder tables")
    if got == -2:
        raise CodecError(f"symbol out of range [0, {tables.n}) or with zero frequency")
    if got < 0:
        raise CodecError("rANS output buffer too small")  # cannot happen: cap bounds the output
    return out[:got]


def decode(words: np.ndarray, t: int, tables: Tables) -> np.ndarray:
    """uint32 words -> uint8 [T, C]; FrameCorrupted unless they decode exactly."""
    words = np.ascontiguousarray(words, dtype=np.uint32)
    out = np.empty((t, tables.channels), dtype=np.uint8)
    rc = _lib_or_raise().cg_rans_decode(
        _ptr(words), words.size, t, tables.channels, _ptr(tables.lut()), _ptr(tables.fc), tables.n, _ptr(out)
    )
    if rc != 0:
        raise FrameCorrupted("cachegen: rANS data did not decode exactly (corrupted payload)")
    return out


# ---- discrete Laplace models (cachegen format v5; see cachegen_klt) -----------------------------------------
# Per layer: y0, y1 fp32 [C, T] (K's and V's transformed rows, component-major), chunk j = tokens
# [bounds[j], bounds[j + 1]); per chunk, part and component: centre, step fp32 and the model (rho, amax) uint8,
# all [nch, 2, C]. Symbols q + mid (q in [-mid, mid]) per chunk as [2, C, len_j], chunks back to back. Words are
# uint16: per chunk, K's then V's, counts nw int64 [nch, 2].


def _rows(y: np.ndarray, c: int, t: int) -> None:
    assert y.dtype == np.float32 and y.flags.c_contiguous and y.shape == (c, t)


def _bounds(bounds: np.ndarray, t: int) -> np.ndarray:
    """Chunk bounds as int64 (callers make them increasing: cachegen_klt's chunking, or parse's checked
    directory; only the ends are checked here, per call)."""
    b = np.ascontiguousarray(bounds, np.int64)
    assert b.ndim == 1 and b.size >= 2 and b[0] == 0 and b[-1] == t
    return b


def stats4(y0: np.ndarray, y1: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per chunk, part and component: (mean, min, max) -> fp32 [nch, 2, 3, C], one pass over y0, y1 [C, T].
    CodecError if some value is NaN or infinite."""
    c, t = y0.shape
    _rows(y0, c, t)
    _rows(y1, c, t)
    b = _bounds(bounds, t)
    out = np.empty((b.size - 1, 2, 3, c), np.float32)
    if _lib_or_raise().cg4_stats(_ptr(y0), _ptr(y1), c, t, b.size - 1, _ptr(b), _ptr(out)) != 0:
        raise CodecError("cachegen: K/V contains NaN or Inf")
    return out


def _coded(rc: int, what: str, out: np.ndarray, nw: np.ndarray) -> np.ndarray:
    if rc == -3:
        raise MemoryError(what)
    if rc == -2:
        raise CodecError("symbol out of range")
    assert rc == 0, rc
    return out[: int(nw.sum())]


def _encode_out(
    nch: int, c: int, t: int
) -> tuple[Side5, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """A layer encoder's outputs in one allocation (a layer pays one numpy allocation and one address lookup,
    not seven): side, rho, amax [nch, 2, C], words (as _side_out), nw [nch, 2], crc int64 [1], and the
    addresses cg5_encode_kv writes them at, in its argument order (side data, centre, step, rho, amax, words,
    nw; crc 8 bytes before nw)."""
    n = nch * 2 * c
    nwords = 2 * (t * c + STREAM_SLACK * nch)
    sizes = (
        8 * n,
        4 * n,
        4 * n,
        n,
        n,
        2 * nwords,
    )  # side data (room for fp32), centre, step, rho, amax, words
    buf = np.empty(8 + 16 * nch + sum(sizes), np.uint8)  # crc, nw, then the rest (8-aligned, sizes even)
    base = _ptr(buf)
    crc, nw = buf[:8].view(np.int64), buf[8 : 8 + 16 * nch].view(np.int64).reshape(nch, 2)
    views, at, off = [], [], 8 + 16 * nch
    for size in sizes:
        views.append(buf[off : off + size])
        at.append(base + off)
        off += size
    data, centre, step, rho, amax, words = views
    shape = (nch, 2, c)
    side = Side5._of(data, centre.view(np.float32).reshape(shape), step.view(np.float32).reshape(shape))
    at.append(base + 8)  # nw
    return side, rho.reshape(shape), amax.reshape(shape), words.view(np.uint16), nw, crc, tuple(at)


def _side_out(nch: int, c: int, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """rho, amax [nch, 2, C], words (room for one per symbol + STREAM_SLACK per part), nw [nch, 2]."""
    return (
        np.empty((nch, 2, c), np.uint8),
        np.empty((nch, 2, c), np.uint8),
        np.empty(2 * (t * c + STREAM_SLACK * nch), np.uint16),
        np.empty((nch, 2), np.int64),
    )


def _encode_args(
    bounds: np.ndarray, plan: np.ndarray, wsym: np.ndarray, mid: int, c: int, t: int
) -> tuple[np.ndarray, np.ndarray, Side5, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The compiled layer encoders' inputs checked and outputs allocated -> (bounds, plan fp32 [nch, 2], side,
    (rho, amax, words, nw) as _side_out)."""
    b = _bounds(bounds, t)
    nch = b.size - 1
    plan = np.ascontiguousarray(plan, np.float32)
    assert plan.shape == (nch, 2)
    _check_wsym(wsym, mid)
    return b, plan, Side5(nch, c), _side_out(nch, c, t)


def encode5(
    y0: np.ndarray,
    y1: np.ndarray,
    bounds: np.ndarray,
    centre: np.ndarray,
    step: np.ndarray,
    mid: int,
    wsym: np.ndarray,
    simd: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The CPU encoder of a layer, one compiled call: quantize y0, y1 [C, T] to clamp(rint((y - centre) *
    (1 / step)), -mid, mid) + mid, fit each component's model and code -> (words uint16, nw [nch, 2],
    rho, amax [nch, 2, C])."""
    c, t = y0.shape
    _rows(y0, c, t)
    _rows(y1, c, t)
    b = _bounds(bounds, t)
    nch = b.size - 1
    centre, step = np.ascontiguousarray(centre, np.float32), np.ascontiguousarray(step, np.float32)
    assert centre.shape == step.shape == (nch, 2, c)
    _check_wsym(wsym, mid)
    rho, amax, out, nw = _side_out(nch, c, t)
    rc = _lib_or_raise().cg5_encode(
        _ptr(y0), _ptr(y1), c, t, nch, _ptr(b), _ptr(centre), _ptr(step), mid, _ptr(wsym), _ptr(rho),
        _ptr(amax), _ptr(out), _ptr(nw), use_simd(simd),
    )  # fmt: skip
    return _coded(rc, "cg5_encode", out, nw), nw, rho, amax


class Side5:
    """A layer's side information as the encoder stores it: `wide` (fp32, else fp16), `data` (the stored bytes:
    centre [nch, 2, C] then step, little-endian), and the stored values as fp32 `centre`, `step` [nch, 2, C]."""

    __slots__ = ("wide", "data", "centre", "step")

    def __init__(self, nch: int, c: int) -> None:
        self.wide = False
        self.data = np.empty(
            2 * 4 * nch * 2 * c, np.uint8
        )  # room for fp32; trimmed to fp16's size if not wide
        self.centre, self.step = np.empty((nch, 2, c), np.float32), np.empty((nch, 2, c), np.float32)

    @classmethod
    def _of(cls, data: np.ndarray, centre: np.ndarray, step: np.ndarray) -> Side5:
        """Side information over given buffers (data uint8 [8 nch 2 C], centre, step fp32 [nch, 2, C])."""
        side = cls.__new__(cls)
        side.wide, side.data, side.centre, side.step = False, data, centre, step
        return side

    def _set(self, wide: int) -> Side5:
        self.wide = bool(wide)
        if not wide:
            self.data = self.data[: self.data.size // 2]
        return self


def side5(stats: np.ndarray, plan: np.ndarray, mid: int) -> Side5:
    """stats fp32 [nch, 2, 3, C] (mean, min, max; finite), plan steps fp32 [nch, 2] -> the side information
    (`cachegen_klt`'s centre and step rule; fp32 when some value passes FP16_SAFE)."""
    nch, _, _, c = stats.shape
    stats, plan = np.ascontiguousarray(stats, np.float32), np.ascontiguousarray(plan, np.float32)
    assert plan.shape == (nch, 2)
    out = Side5(nch, c)
    wide = _lib_or_raise().cg5_side(
        _ptr(stats), _ptr(plan), nch, c, mid, _ptr(out.centre), _ptr(out.step), _ptr(out.data)
    )
    return out._set(wide)


def encode5_layer(
    y0: np.ndarray, y1: np.ndarray, bounds: np.ndarray, plan: np.ndarray, mid: int, wsym: np.ndarray,
    simd: bool | None = None,
) -> tuple[Side5, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The CPU encoder of a layer in one compiled call: statistics, side information (side5), then encode5
    -> (side, words uint16, nw [nch, 2], rho, amax [nch, 2, C]). CodecError if some value is NaN or Inf."""
    c, t = y0.shape
    _rows(y0, c, t)
    _rows(y1, c, t)
    b, plan, side, (rho, amax, out, nw) = _encode_args(bounds, plan, wsym, mid, c, t)
    rc = _lib_or_raise().cg5_encode_layer(
        _ptr(y0), _ptr(y1), c, t, b.size - 1, _ptr(b), _ptr(plan), mid, _ptr(wsym), _ptr(side.data), _ptr(side.centre),
        _ptr(side.step), _ptr(rho), _ptr(amax), _ptr(out), _ptr(nw), use_simd(simd),
    )  # fmt: skip
    if rc == -4:
        raise CodecError("cachegen: K/V contains NaN or Inf")
    if rc == -3:
        raise MemoryError("cg5_encode_layer")
    assert rc in (0, 1), rc
    return side._set(rc), out[: int(nw.sum())], nw, rho, amax


def _kv_ptrs(k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int]:
    """(k, v, half) for the *_kv calls: contiguous CPU fp16 or fp32 tensors [T, H, D] of one dtype."""
    assert k.dtype == v.dtype and k.dtype in (torch.float16, _F32) and k.shape == v.shape and k.dim() == 3
    assert k.is_cpu and v.is_cpu and k.is_contiguous() and v.is_contiguous()
    return k.data_ptr(), v.data_ptr(), int(k.dtype == torch.float16)


def _mat(m: np.ndarray, c: int) -> int:
    assert m.dtype == np.float32 and m.shape == (c, c) and m.flags.c_contiguous
    return _ptr(m)


def encode5_kv(
    k: torch.Tensor, v: torch.Tensor, fk: np.ndarray, fv: np.ndarray, cos: torch.Tensor, sin: torch.Tensor,
    bounds: np.ndarray, plan: np.ndarray, mid: int, wsym: np.ndarray, simd: bool | None = None,
) -> tuple[Side5, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:  # fmt: skip
    """The CPU encoder of a layer from its K/V in one compiled call: k, v [T, H, D] (contiguous fp16 or fp32,
    positions 0..T-1) -> y_k = (unrope(k) fk)^T, y_v = (v fv)^T (fk, fv fp32 [C, C]; cos/sin fp32 [P >= T, D]
    as `rope`), then encode5_layer's work; returns as encode5_layer, plus the words' CRC-32 (zlib's, over their
    bytes in this machine's order: the wire's on a little-endian host). The products sum in order with FMA on the
    AVX2 path (`simd`), so rows may differ in the last bit from torch's; the frame's rules are the same."""
    kp, vp, half = _kv_ptrs(k, v)
    t, h, d = k.shape
    c = h * d
    assert cos.dtype == sin.dtype == _F32 and cos.is_contiguous() and sin.is_contiguous()
    assert cos.shape == sin.shape and cos.shape[0] >= t and cos.shape[1] == d
    b = _bounds(bounds, t)
    nch = b.size - 1
    plan = np.ascontiguousarray(plan, np.float32)
    assert plan.shape == (nch, 2)
    _check_wsym(wsym, mid)
    side, rho, amax, out, nw, crc, at = _encode_out(nch, c, t)
    rc = _lib_or_raise().cg5_encode_kv(
        kp, vp, half, t, h, d, _mat(fk, c), _mat(fv, c), cos.data_ptr(), sin.data_ptr(), d, nch, _ptr(b),
        _ptr(plan), mid, _ptr(wsym), *at, use_simd(simd), at[-1] - 8,
    )  # fmt: skip
    if rc == -4:
        raise CodecError("cachegen: K/V contains NaN or Inf")
    if rc == -3:
        raise MemoryError("cg5_encode_kv")
    if rc == -5:
        raise CodecError(f"cachegen: {c} channels per layer, the compiled encoder takes at most 256")
    assert rc in (0, 1), rc
    return side._set(rc), out[: int(nw[:, 0].sum() + nw[:, 1].sum())], nw, rho, amax, int(crc[0])


def crc32(a: np.ndarray, crc: int = 0, simd: bool | None = None) -> int:
    """zlib.crc32 of a C-contiguous array's bytes (PCLMULQDQ folding where the CPU has it)."""
    assert a.flags.c_contiguous
    return int(_lib_or_raise().cg_crc32(_ptr(a), a.nbytes, crc, use_simd(simd)))


def decode5_kv(
    side: bytes | memoryview, nch: int, t: int, wide: bool, mid: int, words: np.ndarray, wsym: np.ndarray,
    gk: np.ndarray, gv: np.ndarray, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    simd: bool | None = None, crc: int = -1,
) -> None:  # fmt: skip
    """The CPU decoder of a layer in one compiled call: v5 params' directory and side information (`side`, its
    length checked by the caller, as parse_side5) and all payload words (uint16) ->
    k = rope(y_k^T gk), v = y_v^T gv into k, v [T, H, D] (contiguous CPU fp16 or fp32). crc >= 0: the words'
    bytes must have this CRC-32, checked first (-1: the caller checked the payload). FrameCorrupted as
    parse_side5 and decode5, or when the words are not the directory's count."""
    kp, vp, half = _kv_ptrs(k, v)
    _, h, d = k.shape
    c = h * d
    assert k.shape[0] == t and cos.dtype == sin.dtype == _F32 and cos.is_contiguous() and sin.is_contiguous()
    assert cos.shape == sin.shape and cos.shape[0] >= t and cos.shape[1] == d
    words = np.ascontiguousarray(words, np.uint16)
    _check_wsym(wsym, mid)
    rc = _lib_or_raise().cg5_decode_kv(
        side, nch, c, t, int(wide), mid, _ptr(words), words.size, _ptr(wsym), h, d, _mat(gk, c), _mat(gv, c),
        cos.data_ptr(), sin.data_ptr(), d, half, kp, vp, use_simd(simd), crc,
    )  # fmt: skip
    if rc == -7:
        raise FrameCorrupted("cachegen payload crc32 mismatch")
    if rc == -1:
        raise FrameCorrupted(f"cachegen params: chunk directory does not fit T = {t} or the payload's length")
    if rc == -2:
        raise FrameCorrupted("cachegen params: non-finite or non-positive step, or |q| > 127")
    if rc == -6:
        raise FrameCorrupted("cachegen: rANS data did not decode exactly (corrupted payload)")
    if rc == -3:
        raise MemoryError("cg5_decode_kv")
    if rc == -5:
        raise CodecError(f"cachegen: {c} channels per layer, the compiled decoder takes at most 256")
    assert rc == 0, rc


def parse_side5(
    data: bytes, nch: int, c: int, t: int, wide: bool, mid: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """v5 params' directory, centre, step, rho and amax (`data`, its length checked by the caller) -> bounds
    int64 [nch + 1], nw int64 [nch, 2], centre, step fp32 [nch, 2, C], the payload's words (the sum of nw).
    FrameCorrupted if the directory does
    not fit `t` tokens, or a centre/step is not finite, a step <= 0 or an amax > mid."""
    bounds, nw = np.empty(nch + 1, np.int64), np.empty((nch, 2), np.int64)
    centre, step = np.empty((nch, 2, c), np.float32), np.empty((nch, 2, c), np.float32)
    rc = _lib_or_raise().cg5_parse_side(
        data, nch, c, t, int(wide), mid, _ptr(bounds), _ptr(nw), _ptr(centre), _ptr(step)
    )
    if rc == -1:
        raise FrameCorrupted(f"cachegen params: chunk directory does not fit T = {t}")
    if rc < 0:
        raise FrameCorrupted("cachegen params: non-finite or non-positive step, or |q| > 127")
    return bounds, nw, centre, step, rc


def code5(
    sym: np.ndarray, c: int, bounds: np.ndarray, mid: int, wsym: np.ndarray, simd: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Symbols already quantized (e.g. on a GPU): uint8, chunk j's [2, C, len_j] back to back -> as encode5."""
    b = _bounds(bounds, int(bounds[-1]))
    t, nch = int(b[-1]), b.size - 1
    sym = np.ascontiguousarray(sym, np.uint8).reshape(-1)
    assert sym.size == 2 * c * t
    _check_wsym(wsym, mid)
    rho, amax, out, nw = _side_out(nch, c, t)
    rc = _lib_or_raise().cg5_code(
        _ptr(sym),
        c,
        nch,
        _ptr(b),
        mid,
        _ptr(wsym),
        _ptr(rho),
        _ptr(amax),
        _ptr(out),
        _ptr(nw),
        use_simd(simd),
    )
    return _coded(rc, "cg5_code", out, nw), nw, rho, amax


def _uncode_args(
    words: np.ndarray, nw: np.ndarray, rho: np.ndarray, amax: np.ndarray, bounds: np.ndarray, mid: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    b = np.ascontiguousarray(bounds, np.int64)
    nch = b.size - 1
    c = rho.shape[-1]
    assert rho.shape == amax.shape == (nch, 2, c) and nw.shape == (nch, 2)
    words = np.ascontiguousarray(words, np.uint16)
    rho, amax = np.ascontiguousarray(rho, np.uint8), np.ascontiguousarray(amax, np.uint8)
    return words, np.ascontiguousarray(nw, np.int64), rho, amax, b


def _decoded(rc: int, what: str) -> None:
    if rc == -3:
        raise MemoryError(what)
    if rc != 0:
        raise FrameCorrupted("cachegen: rANS data did not decode exactly (corrupted payload)")


def uncode5(
    words: np.ndarray, nw: np.ndarray, rho: np.ndarray, amax: np.ndarray, bounds: np.ndarray, mid: int,
    wsym: np.ndarray, simd: bool | None = None,
) -> np.ndarray:  # fmt: skip
    """Inverse of code5 -> symbols uint8 (chunk j's [2, C, len_j] back to back). FrameCorrupted unless every
    chunk's words decode exactly and are all used."""
    words, nw, rho, amax, b = _uncode_args(words, nw, rho, amax, bounds, mid)
    _check_wsym(wsym, mid)
    c = rho.shape[-1]
    sym = np.empty(2 * c * int(b[-1]), np.uint8)
    rc = _lib_or_raise().cg5_uncode(
        _ptr(words), words.size, c, b.size - 1, _ptr(b), _ptr(nw), _ptr(rho), _ptr(amax), mid, _ptr(wsym),
        _ptr(sym), use_simd(simd),
    )  # fmt: skip
    _decoded(rc, "cg5_uncode")
    return sym


def decode5(
    words: np.ndarray,
    nw: np.ndarray,
    rho: np.ndarray,
    amax: np.ndarray,
    centre: np.ndarray,
    step: np.ndarray,
    bounds: np.ndarray,
    mid: int,
    wsym: np.ndarray,
    y0: np.ndarray,
    y1: np.ndarray,
    simd: bool | None = None,
) -> None:
    """Inverse of encode5 into y0, y1 fp32 [C, ld]: row c's first T = bounds[-1] values are centre + (symbol -
    mid) * step (ld >= T: rows may be padded, e.g. so that they are not 4 KiB apart). FrameCorrupted as
    uncode5. The words are copied with DECODE_PAD words of padding (so the AVX2 decoder runs to the last row)."""
    padded = np.zeros(words.size + DECODE_PAD, np.uint16)
    padded[: words.size] = words
    words, nw, rho, amax, b = _uncode_args(padded[: words.size], nw, rho, amax, bounds, mid)
    _check_wsym(wsym, mid)
    c, ld = y0.shape
    t = int(b[-1])
    _rows(y0, c, ld)
    _rows(y1, c, ld)
    centre, step = np.ascontiguousarray(centre, np.float32), np.ascontiguousarray(step, np.float32)
    assert centre.shape == step.shape == rho.shape and t <= ld
    rc = _lib_or_raise().cg5_decode(
        _ptr(padded), words.size, padded.size, c, t, b.size - 1, _ptr(b), _ptr(nw), _ptr(rho), _ptr(amax),
        _ptr(centre), _ptr(step), mid, _ptr(wsym), _ptr(y0), _ptr(y1), ld, use_simd(simd),
    )  # fmt: skip
    _decoded(rc, "cg5_decode")


def check_weights(wsym: np.ndarray, mid: int) -> None:
    """CodecError unless wsym (cachegen_klt's weights by symbol) equals the library's own copy, which its AVX2
    table builders read (so both paths build the same rows)."""
    _check_wsym(wsym, mid)
    if not _lib_or_raise().cg5_check_weights(_ptr(wsym), mid):
        raise CodecError("the compiled coder's Laplace weights differ from cachegen_klt's")


def _check_wsym(wsym: np.ndarray, mid: int) -> None:
    assert wsym.dtype == np.int64 and wsym.shape == (256, 2 * mid + 1) and wsym.flags.c_contiguous


def lap_tables(
    rho: np.ndarray, amax: np.ndarray, mid: int, wsym: np.ndarray, lut: bool, simd: bool | None = None
) -> Tables:
    """Per-component discrete Laplace rows (rho, amax) over weights wsym int64 [256, n] -> Tables (with the
    decode lookup when `lut`). CodecError if some amax > mid. Without `lut`, `simd` builds the rows as the v5
    coders do (AVX2 where the CPU has it); the rows are the same either way."""
    rho, amax = np.ascontiguousarray(rho, np.uint8), np.ascontiguousarray(amax, np.uint8)
    c, n = rho.shape[0], 2 * mid + 1
    assert (
        amax.shape == (c,) and wsym.dtype == np.int64 and wsym.shape == (256, n) and wsym.flags.c_contiguous
    )
    freq, cum = np.empty((c, n), np.uint32), np.empty((c, n), np.uint32)
    table = np.empty((c, PROB_SCALE), np.uint8) if lut else None
    rc = _lib_or_raise().cg_lap_tables(
        _ptr(rho),
        _ptr(amax),
        c,
        mid,
        _ptr(wsym),
        _ptr(freq),
        _ptr(cum),
        _ptr(table) if table is not None else None,
        use_simd(simd),
    )
    if rc != 0:
        raise CodecError(f"Laplace support beyond |q| <= {mid}")
    return Tables._built(freq, cum, table)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, sign: float, out: np.ndarray) -> None:
    """Rotate-half RoPE of x fp32 [T, H, D] into out (may be x): cos/sin fp32 [P >= T, D], row t for position
    t; sign +1 rotates, -1 un-rotates. One pass, no temporaries."""
    t, h, d = x.shape
    for a in (x, out, cos, sin):
        assert a.dtype == np.float32 and a.flags.c_contiguous
    assert out.shape == x.shape and cos.shape == sin.shape and cos.shape[0] >= t and cos.shape[1] == d
    _lib_or_raise().cg_rope(_ptr(x), t, h, d, _ptr(cos), _ptr(sin), d, sign, _ptr(out))


def rope_t(x, cos, sin, sign: float, out) -> None:
    """`rope` for CPU torch tensors (the codec's hot path: no numpy views): x, out fp32 [T, H, D] contiguous
    (out may be x), cos/sin fp32 [P >= T, D] contiguous."""
    t, h, d = x.shape
    for a in (x, out, cos, sin):
        assert a.dtype == _F32 and a.is_contiguous() and a.is_cpu
    assert out.shape == x.shape and cos.shape == sin.shape and cos.shape[0] >= t and cos.shape[1] == d
    _lib_or_raise().cg_rope(x.data_ptr(), t, h, d, cos.data_ptr(), sin.data_ptr(), d, sign, out.data_ptr())


def rope_f16(x, cos, sin, sign: float, out, simd: bool | None = None) -> None:
    """`rope_t` with fp16 on one side: x fp16 -> out fp32, or x fp32 -> out fp16 (CPU tensors [T, H, D],
    contiguous; out is not x). One pass: F16C conversions where the CPU has them (round to nearest even, as
    torch's), else the portable loop."""
    t, h, d = x.shape
    half = torch.float16
    assert {x.dtype, out.dtype} == {half, _F32} and out.shape == x.shape
    for a in (x, out, cos, sin):
        assert a.is_contiguous() and a.is_cpu
    assert (
        cos.dtype == sin.dtype == _F32 and cos.shape == sin.shape and cos.shape[0] >= t and cos.shape[1] == d
    )
    xh, xf = (x.data_ptr(), None) if x.dtype == half else (None, x.data_ptr())
    of, oh = (out.data_ptr(), None) if out.dtype == _F32 else (None, out.data_ptr())
    _lib_or_raise().cg_rope_f16(
        xh, xf, t, h, d, cos.data_ptr(), sin.data_ptr(), d, sign, of, oh, use_simd(simd)
    )


# ---- layer 0 from its table (cachegen_l0; see layer0.Layer0Table) --------------------------------------------
# tk, tv fp32 [vocab, H * D] (K before RoPE, V), ids uint32 [T], cos/sin fp32 [P >= T, D] (row t: position t).


def _l0_args(
    tk: np.ndarray, tv: np.ndarray, ids: np.ndarray, cos: np.ndarray, sin: np.ndarray, h: int, d: int
):
    for a in (tk, tv, cos, sin):
        assert a.dtype == np.float32 and a.flags.c_contiguous
    assert ids.dtype == np.uint32 and ids.flags.c_contiguous and ids.ndim == 1
    assert tk.shape == tv.shape and tk.shape[1] == h * d and cos.shape == sin.shape and cos.shape[1] == d
    assert cos.shape[0] >= ids.size
    return (_ptr(tk), _ptr(tv), tk.shape[0], _ptr(ids), ids.size, h, d, _ptr(cos), _ptr(sin), d)


def l0_gather(
    tk: np.ndarray,
    tv: np.ndarray,
    ids: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
) -> bool:
    """Layer 0 of a prompt from the table into k, v fp32 or fp16 [T, H, D]: K rows rotated to positions 0..T-1
    (the engine's RoPE arithmetic, in fp32), V rows as they are; fp16 output rounded to nearest even from those
    fp32 values (as torch's conversion). False (nothing written) if some id is outside the table."""
    t, h, d = k.shape
    assert k.shape == v.shape and t == ids.size and k.dtype == v.dtype and k.dtype in (np.float32, np.float16)
    assert k.flags.c_contiguous and v.flags.c_contiguous
    half = int(k.dtype == np.float16)
    rc = _lib_or_raise().cg_l0_gather(*_l0_args(tk, tv, ids, cos, sin, h, d), _ptr(k), _ptr(v), half)
    if rc == -3:
        raise MemoryError("cg_l0_gather")
    return rc == 0


def l0_check(
    tk: np.ndarray,
    tv: np.ndarray,
    ids: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
) -> tuple[float, float, float, float] | None:
    """Given k, v fp32 or fp16 [T, H, D] (compared as their fp32 values) against the table's layer 0 of `ids`
    -> (max |k - k0|, max |k|, max |v - v0|, max |v|); None if some id is outside the table or some given value
    is not finite."""
    t, h, d = k.shape
    assert k.shape == v.shape and t == ids.size and k.dtype == v.dtype and k.dtype in (np.float32, np.float16)
    assert k.flags.c_contiguous and v.flags.c_contiguous
    err = np.empty(4, np.float32)
    half = int(k.dtype == np.float16)
    rc = _lib_or_raise().cg_l0_check(
        *_l0_args(tk, tv, ids, cos, sin, h, d), _ptr(k), _ptr(v), _ptr(err), half
    )
    if rc == -3:
        raise MemoryError("cg_l0_check")
    return None if rc != 0 else (float(err[0]), float(err[1]), float(err[2]), float(err[3]))
