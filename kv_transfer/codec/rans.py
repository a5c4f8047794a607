"""A compiled rANS entropy coder for the CacheGen codec: per-channel tables over token-major symbols.

Symbols are uint8 [T, C] (token-major, exactly as quantization lays them out); symbol [t, c] is coded with
channel c's table, so neither side transposes or loops over channels in Python. The coder is rANS with a
64-bit state and 32-bit renormalisation (at most one word per symbol; Duda's ANS in the form of Giesen's rans64),
probabilities quantized to PROB_BITS = 11 bits (a 2 KiB decode lookup per channel stays in L2). Tables are
integer frequencies [C, n] summing to 2048 per row, every symbol >= 1 (so any symbol in [0, n) stays encodable), built deterministically from integer
weights (`freqs_from_weights`), so encoder and decoder derive bit-identical tables on any machine.

Wire: uint32 words in decode order; the first two are the final encoder state (low, high). The decoder
checks that it consumed every word and ended in the encoder's initial state, so truncated or altered
words are detected (a wrong symbol count or table also fails these checks with high probability; the
frame CRCs catch the rest).

Two rANS states interleave over one word stream (the decoder's dependency chain halves) and the encoder
divides by multiplying with per-(channel, symbol) reciprocals. Speed: see docs/benchmarks.md (bench.codec
reports both coders side by side). The C source is compiled on first
use (`engine.cbuild`); `available()` says whether it loaded. Without a C compiler the CacheGen codec keeps
using constriction.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading

import numpy as np

from kv_transfer.errors import CodecError, FrameCorrupted

log = logging.getLogger(__name__)

PROB_BITS = 11
PROB_SCALE = 1 << PROB_BITS
MAX_ALPHABET = 256  # symbols are bytes; CacheGen uses at most 63
WEIGHT_BITS = 20  # integer weights are in [0, 2^20]

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define PROB_BITS 11
#define PROB_SCALE (1u << PROB_BITS)
#define RANS_L (1ull << 31)

/* Symbol i of the token-major sequence (i = t * C + c) is coded with row c of freq/cum ([C, n] uint32;
   cum[c][s] = sum of freq[c][j] for j < s; rows sum to PROB_SCALE) by state i & 1: two interleaved rANS
   states share one word stream, which halves the decoder's dependency chain. The encoder divides by
   multiplying with a per-(channel, symbol) reciprocal (exact: q = floor(x / f) for every x < 2^64).
   out: capacity cap uint32 words. Returns the number of words (written to out[0..]), -1 if cap is too
   small, -2 if a symbol is >= n or has frequency 0, -3 if out of memory. */
typedef struct { uint64_t x_max, rcp; uint32_t bias, cmpl, shift, pad; } enc_sym;

int64_t cg_rans_encode(const uint8_t *sym, int64_t T, int64_t C, const uint32_t *freq, const uint32_t *cum,
                       int64_t n, uint32_t *out, int64_t cap) {
    enc_sym *es = malloc(sizeof(enc_sym) * (size_t)(C * n));
    if (!es) return -3;
    for (int64_t i = 0; i < C * n; i++) {
        uint32_t f = freq[i];
        es[i].x_max = ((RANS_L >> PROB_BITS) << 32) * f;
        es[i].cmpl = PROB_SCALE - f;
        if (f < 2) { /* f == 1: q = x, folded into the bias; f == 0 is rejected when used */
            es[i].rcp = ~0ull;
            es[i].shift = 0;
            es[i].bias = cum[i] + PROB_SCALE - 1;
        } else {
            uint32_t shift = 0;
            while (f > (1u << shift)) shift++;
            es[i].rcp = (uint64_t)((((unsigned __int128)1 << (shift + 63)) + f - 1) / f);
            es[i].shift = shift - 1;
            es[i].bias = cum[i];
        }
    }
    uint64_t x[2] = {RANS_L, RANS_L};
    int64_t w = cap, total = T * C, c = C - 1;
    for (int64_t i = total - 1; i >= 0; i--, c = c ? c - 1 : C - 1) {
        uint32_t s = sym[i];
        if ((int64_t)s >= n || freq[c * n + s] == 0) { free(es); return -2; }
        const enc_sym *e = es + c * n + s;
        uint64_t xi = x[i & 1];
        if (xi >= e->x_max) {
            if (w == 0) { free(es); return -1; }
            out[--w] = (uint32_t)xi;
            xi >>= 32;
        }
        uint64_t q = (uint64_t)(((unsigned __int128)xi * e->rcp) >> 64) >> e->shift;
        x[i & 1] = xi + e->bias + q * e->cmpl;
    }
    free(es);
    if (w < 4) return -1;
    out[--w] = (uint32_t)(x[1] >> 32);
    out[--w] = (uint32_t)x[1];
    out[--w] = (uint32_t)(x[0] >> 32);
    out[--w] = (uint32_t)x[0];
    memmove(out, out + w, (size_t)(cap - w) * 4);
    return cap - w;
}

/* lut: [C, PROB_SCALE] uint8, lut[c][slot] = the symbol whose [cum, cum + freq) holds slot. */
void cg_rans_lut(const uint32_t *freq, const uint32_t *cum, int64_t C, int64_t n, uint8_t *lut) {
    for (int64_t c = 0; c < C; c++)
        for (int64_t s = 0; s < n; s++)
            memset(lut + c * PROB_SCALE + cum[c * n + s], (int)s, freq[c * n + s]);
}

/* Inverse of cg_rans_encode into sym [T, C]. Returns 0, or -1 if the words run out, are left over, or the
   final states are not the encoder's initial ones (corrupted or mismatched input). */
int64_t cg_rans_decode(const uint32_t *in, int64_t nwords, int64_t T, int64_t C, const uint32_t *freq,
                       const uint32_t *cum, const uint8_t *lut, int64_t n, uint8_t *sym) {
    if (nwords < 4) return -1;
    uint64_t x[2] = {(uint64_t)in[0] | ((uint64_t)in[1] << 32), (uint64_t)in[2] | ((uint64_t)in[3] << 32)};
    int64_t r = 4, total = T * C, c = 0;
    for (int64_t i = 0; i < total; i++) {
        uint64_t xi = x[i & 1];
        uint32_t slot = (uint32_t)xi & (PROB_SCALE - 1);
        uint32_t s = lut[c * PROB_SCALE + slot];
        xi = (uint64_t)freq[c * n + s] * (xi >> PROB_BITS) + slot - cum[c * n + s];
        if (xi < RANS_L) {
            if (r >= nwords) return -1;
            xi = (xi << 32) | in[r++];
        }
        x[i & 1] = xi;
        sym[i] = (uint8_t)s;
        if (++c == C) c = 0;
    }
    return (r == nwords && x[0] == RANS_L && x[1] == RANS_L) ? 0 : -1;
}

/* counts: [C, n] int64 (accumulated), histogram of sym [T, C] per channel; -1 if a symbol is >= n. */
int64_t cg_hist(const uint8_t *sym, int64_t T, int64_t C, int64_t n, int64_t *counts) {
    for (int64_t t = 0; t < T; t++) {
        const uint8_t *row = sym + t * C;
        for (int64_t c = 0; c < C; c++) {
            if (row[c] >= n) return -1;
            counts[c * n + row[c]]++;
        }
    }
    return 0;
}
"""

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
                lib = ctypes.CDLL(str(build_library("pdserve_rans", _C_SOURCE)))
                p, i64 = ctypes.c_void_p, ctypes.c_int64
                lib.cg_rans_encode.restype = i64
                lib.cg_rans_encode.argtypes = [p, i64, i64, p, p, i64, p, i64]
                lib.cg_rans_decode.restype = i64
                lib.cg_rans_decode.argtypes = [p, i64, i64, i64, p, p, p, i64, p]
                lib.cg_rans_lut.restype = None
                lib.cg_rans_lut.argtypes = [p, p, i64, i64, p]
                lib.cg_hist.restype = i64
                lib.cg_hist.argtypes = [p, i64, i64, i64, p]
                _lib = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("compiled rANS coder unavailable, CacheGen uses constriction: %s", e)
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
    """Per-channel rANS tables: freq and cum uint32 [C, n]; the decode lookup [C, 4096] is built lazily.
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
        self._lut: np.ndarray | None = None

    def lut(self) -> np.ndarray:
        if self._lut is None:
            lut = np.zeros((self.channels, PROB_SCALE), dtype=np.uint8)
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
        _ptr(words),
        words.size,
        t,
        tables.channels,
        _ptr(tables.freq),
        _ptr(tables.cum),
        _ptr(tables.lut()),
        tables.n,
        _ptr(out),
    )
    if rc != 0:
        raise FrameCorrupted("cachegen: rANS data did not decode exactly (corrupted payload)")
    return out
