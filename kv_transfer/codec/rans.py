"""The CacheGen codec's compiled kernels: a rANS entropy coder with per-channel tables, and format v2's
discrete Laplace models, quantizer and RoPE step.

Format v1 (`encode`/`decode`): symbols are uint8 [T, C] (token-major, exactly as quantization lays them
out); symbol [t, c] is coded with channel c's table, so neither side transposes or loops over channels in
Python. The coder is rANS with a 64-bit state and 32-bit renormalisation (at most one word per symbol;
Duda's ANS in the form of Giesen's rans64), probabilities quantized to PROB_BITS = 11 bits (a 2 KiB decode
lookup per channel). Tables are integer frequencies [C, n] summing to 2048 per row, every symbol >= 1 (so
any symbol in [0, n) stays encodable), built deterministically from integer weights (`freqs_from_weights`),
so encoder and decoder derive bit-identical tables on any machine.

Format v2 (`lap_*`, used by cachegen_klt): each component's symbols get a two-sided geometric model from two
bytes (rho, amax), fitted and built in C; a chunk's K and V parts are quantized, fitted and coded in one
call (`lap_encode2` / `lap_decode2`), component-major, two streams side by side. `rope` and `col_stats` are
that format's transform and statistics passes (one pass each, no temporaries).

Wire: uint32 words in decode order; the first two are the final encoder state (low, high). The decoder
checks that it consumed every word and ended in the encoder's initial state, so truncated or altered
words are detected (a wrong symbol count or table also fails these checks with high probability; the
frame CRCs catch the rest).

Two rANS states interleave over one word stream (the decoder's dependency chain halves) and the encoder
divides by multiplying with the frequency's reciprocal. Speed: see docs/benchmarks.md (bench.codec reports
both formats side by side). The C source, `rans.c` beside this file, is compiled on first use
(`engine.cbuild`); `available()` says whether it loaded. Without a C compiler there is no `cachegen` codec
(the registry reports it as not installed); raw, int8 and fp8 remain.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading
from pathlib import Path

import numpy as np

from kv_transfer.errors import CodecError, FrameCorrupted

log = logging.getLogger(__name__)

PROB_BITS = 11
PROB_SCALE = 1 << PROB_BITS
MAX_ALPHABET = 256  # symbols are bytes; CacheGen uses at most 63
WEIGHT_BITS = 20  # integer weights are in [0, 2^20]

_C_SOURCE = Path(__file__).with_name("rans.c")  # shipped as package data, compiled on first use

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("PDSERVE_RANS", "1") != "0":
            from engine.cbuild import build_library

            try:
                lib = ctypes.CDLL(str(build_library("pdserve_rans", _C_SOURCE.read_text())))
                p, i64 = ctypes.c_void_p, ctypes.c_int64
                lib.cg_rans_encode.restype = i64
                lib.cg_rans_encode.argtypes = [p, i64, i64, p, p, i64, p, i64]
                lib.cg_rans_decode.restype = i64
                lib.cg_rans_decode.argtypes = [p, i64, i64, i64, p, p, i64, p]
                lib.cg_rans_lut.restype = None
                lib.cg_rans_lut.argtypes = [p, p, i64, i64, p]
                lib.cg_hist.restype = i64
                lib.cg_hist.argtypes = [p, i64, i64, i64, p]
                lib.cg_col_stats.restype = i64
                lib.cg_col_stats.argtypes = [p, i64, i64, p, p, p]
                lib.cg_lap_code2.restype = i64
                lib.cg_lap_code2.argtypes = [p, i64, i64, i64, p, p, p, p, p, i64, p]
                lib.cg_lap_encode2.restype = i64
                lib.cg_lap_encode2.argtypes = [p, p, i64, i64, p, p, i64, p, p, p, p, p, i64, p]
                lib.cg_lap_uncode2.restype = i64
                lib.cg_lap_uncode2.argtypes = [p, i64, p, i64, i64, i64, p, p, i64, p, p]
                lib.cg_lap_decode2.restype = i64
                lib.cg_lap_decode2.argtypes = [p, i64, p, i64, i64, i64, p, p, i64, p, p, p, p, p]
                lib.cg_rope.restype = None
                lib.cg_rope.argtypes = [p, i64, i64, i64, p, p, i64, ctypes.c_float, p]
                lib.cg_lap_tables.restype = i64
                lib.cg_lap_tables.argtypes = [p, p, i64, i64, p, p, p, p]
                _lib = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("compiled rANS coder unavailable, so is the cachegen codec: %s", e)
        _tried = True
        return _lib


def available() -> bool:
    """True when the compiled coder is loaded (builds it on first call; PDSERVE_RANS=0 disables it)."""
    return _load() is not None


def _lib_or_raise() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise CodecError("the compiled rANS coder is not available on this host (no C compiler?)")
    return lib


def _ptr(a: np.ndarray) -> int:
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


# ---- discrete Laplace models (cachegen format v2; see cachegen_klt) -----------------------------------------
# Symbols are q + mid for q in [-mid, mid] (n = 2 mid + 1), channel-major per part: [2 (K, V), C, T]; a
# component's model is (rho, amax) (see the C source). rho/amax/centre/step are [2, C].


def col_stats(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y fp32 [T, C] (C-contiguous, T >= 1) -> per-column (mean, min, max), fp32 [C] each, in one pass."""
    t, c = y.shape
    assert y.dtype == np.float32 and y.flags.c_contiguous and t >= 1
    mean, lo, hi = np.empty(c, np.float32), np.empty(c, np.float32), np.empty(c, np.float32)
    if _lib_or_raise().cg_col_stats(_ptr(y), t, c, _ptr(mean), _ptr(lo), _ptr(hi)) != 0:
        raise MemoryError("cg_col_stats")
    return mean, lo, hi


def _check_wsym(wsym: np.ndarray, mid: int) -> None:
    assert wsym.dtype == np.int64 and wsym.shape == (256, 2 * mid + 1) and wsym.flags.c_contiguous


def _coded(
    rc: int, what: str, out: np.ndarray, nw: np.ndarray, rho: np.ndarray, amax: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if rc == -3:
        raise MemoryError(what)
    if rc == -2:
        raise CodecError("symbol out of range")
    if rc < 0:
        raise CodecError("rANS output buffer too small")  # cannot happen: cap bounds the output
    return out[0, : nw[0]], out[1, : nw[1]], rho, amax


def lap_code2(
    sym: np.ndarray, mid: int, wsym: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Symbols uint8 [2, C, T] -> (words of part 0, words of part 1, rho uint8 [2, C], amax uint8 [2, C]):
    each component's discrete Laplace model fitted to its symbols, then both parts rANS-coded side by side."""
    sym = np.ascontiguousarray(sym, dtype=np.uint8)
    _, c, t = sym.shape
    assert sym.shape[0] == 2
    _check_wsym(wsym, mid)
    rho, amax, nw = np.empty((2, c), np.uint8), np.empty((2, c), np.uint8), np.empty(2, np.int64)
    cap = t * c + 8
    out = np.empty((2, cap), np.uint32)
    rc = _lib_or_raise().cg_lap_code2(
        _ptr(sym), t, c, mid, _ptr(wsym), _ptr(rho), _ptr(amax), _ptr(out), _ptr(out[1]), cap, _ptr(nw)
    )
    return _coded(rc, "cg_lap_code2", out, nw, rho, amax)


def lap_encode2(
    y0: np.ndarray, y1: np.ndarray, centre: np.ndarray, step: np.ndarray, mid: int, wsym: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The CPU encoder of a chunk's two parts (K, V), in one compiled call: y0, y1 fp32 [T, C] (C-contiguous),
    centre/step fp32 [2, C] (step > 0) -> as lap_code2 of the symbols clamp(round((y - centre) / step),
    -mid, mid) + mid (the same words)."""
    t, c = y0.shape
    for y in (y0, y1):
        assert y.dtype == np.float32 and y.flags.c_contiguous and y.shape == (t, c)
    assert centre.shape == step.shape == (2, c)
    _check_wsym(wsym, mid)
    centre, step = np.ascontiguousarray(centre, np.float32), np.ascontiguousarray(step, np.float32)
    rho, amax, nw = np.empty((2, c), np.uint8), np.empty((2, c), np.uint8), np.empty(2, np.int64)
    cap = t * c + 8
    out = np.empty((2, cap), np.uint32)
    rc = _lib_or_raise().cg_lap_encode2(
        _ptr(y0), _ptr(y1), t, c, _ptr(centre), _ptr(step), mid, _ptr(wsym), _ptr(rho), _ptr(amax),
        _ptr(out), _ptr(out[1]), cap, _ptr(nw),
    )  # fmt: skip
    return _coded(rc, "cg_lap_encode2", out, nw, rho, amax)


def _decoded(rc: int, what: str) -> None:
    if rc == -3:
        raise MemoryError(what)
    if rc != 0:
        raise FrameCorrupted("cachegen: rANS data did not decode exactly (corrupted payload)")


def lap_uncode2(
    w0: np.ndarray, w1: np.ndarray, rho: np.ndarray, amax: np.ndarray, t: int, mid: int, wsym: np.ndarray
) -> np.ndarray:
    """Inverse of lap_code2 -> symbols uint8 [2, C, t]. FrameCorrupted unless both parts' words decode
    exactly (or some amax > mid)."""
    c = rho.shape[1]
    assert rho.shape == amax.shape == (2, c)
    _check_wsym(wsym, mid)
    w0, w1 = (np.ascontiguousarray(w, dtype=np.uint32) for w in (w0, w1))
    rho, amax = np.ascontiguousarray(rho, np.uint8), np.ascontiguousarray(amax, np.uint8)
    sym = np.empty((2, c, t), np.uint8)
    rc = _lib_or_raise().cg_lap_uncode2(
        _ptr(w0), w0.size, _ptr(w1), w1.size, t, c, _ptr(rho), _ptr(amax), mid, _ptr(wsym), _ptr(sym)
    )
    _decoded(rc, "cg_lap_uncode2")
    return sym


def lap_decode2(
    w0: np.ndarray,
    w1: np.ndarray,
    rho: np.ndarray,
    amax: np.ndarray,
    centre: np.ndarray,
    step: np.ndarray,
    mid: int,
    wsym: np.ndarray,
    y0: np.ndarray,
    y1: np.ndarray,
) -> None:
    """Inverse of lap_encode2 into y0, y1 fp32 [T, C] (C-contiguous): centre + (symbol - mid) * step, with
    rho/amax/centre/step [2, C]. FrameCorrupted as lap_uncode2."""
    t, c = y0.shape
    for y in (y0, y1):
        assert y.dtype == np.float32 and y.flags.c_contiguous and y.shape == (t, c)
    assert rho.shape == amax.shape == centre.shape == step.shape == (2, c)
    _check_wsym(wsym, mid)
    w0, w1 = (np.ascontiguousarray(w, dtype=np.uint32) for w in (w0, w1))
    rho, amax = np.ascontiguousarray(rho, np.uint8), np.ascontiguousarray(amax, np.uint8)
    centre, step = np.ascontiguousarray(centre, np.float32), np.ascontiguousarray(step, np.float32)
    rc = _lib_or_raise().cg_lap_decode2(
        _ptr(w0), w0.size, _ptr(w1), w1.size, t, c, _ptr(rho), _ptr(amax), mid, _ptr(wsym),
        _ptr(centre), _ptr(step), _ptr(y0), _ptr(y1),
    )  # fmt: skip
    _decoded(rc, "cg_lap_decode2")


def lap_tables(rho: np.ndarray, amax: np.ndarray, mid: int, wsym: np.ndarray, lut: bool) -> Tables:
    """Per-component discrete Laplace rows (rho, amax) over weights wsym int64 [256, n] -> Tables (with the
    decode lookup when `lut`). CodecError if some amax > mid."""
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
