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
both formats side by side). The C source is compiled on first use (`engine.cbuild`); `available()` says
whether it loaded. Without a C compiler the CacheGen codec keeps using constriction (format v1).
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
#include <math.h>
#define PROB_BITS 11
#define PROB_SCALE (1u << PROB_BITS)
#define RANS_L (1ull << 31)

/* Symbol i of the token-major sequence (i = t * C + c) is coded with row c of freq/cum ([C, n] uint32;
   cum[c][s] = sum of freq[c][j] for j < s; rows sum to PROB_SCALE) by state i & 1: two interleaved rANS
   states share one word stream, which halves the decoder's dependency chain. The encoder divides by
   multiplying with the reciprocal of the frequency (exact: q = floor(x / f) for every x < 2^64), from a
   table over every f in [1, PROB_SCALE] built once when the library loads (no per-call setup).
   out: capacity cap >= T * C + 4 uint32 words (at most one word per symbol). Returns the number of words
   (written to out[0..]), -1 if cap is too small, -2 if a symbol is >= n or has frequency 0, -3 if out of
   memory. */
static uint64_t g_rcp[PROB_SCALE + 1];
static uint32_t g_shift[PROB_SCALE + 1], g_bias[PROB_SCALE + 1];

__attribute__((constructor)) static void init_reciprocals(void) {
    for (uint32_t f = 1; f <= PROB_SCALE; f++) {
        if (f < 2) { /* f == 1: q = x - 1, folded into the bias */
            g_rcp[f] = ~0ull;
            g_shift[f] = 0;
            g_bias[f] = PROB_SCALE - 1;
        } else {
            uint32_t shift = 0;
            while (f > (1u << shift)) shift++;
            g_rcp[f] = (uint64_t)((((unsigned __int128)1 << (shift + 63)) + f - 1) / f);
            g_shift[f] = shift - 1;
            g_bias[f] = 0;
        }
    }
}

/* The encoder's per-(channel, symbol) constants, built per call for the symbols in use (frequency > 0). */
typedef struct { uint64_t x_max, rcp; uint32_t bias, cmpl, shift, pad; } enc_sym;

/* One encoder step of state x (a variable) for the symbol constants e; words go down from out[w] (callers
   guarantee room: cap >= one word per symbol + 4). */
#define ENC_STEP(x, e, out, w)                                                              \
    do {                                                                                   \
        if ((x) >= (e)->x_max) {                                                           \
            (out)[--(w)] = (uint32_t)(x);                                                  \
            (x) >>= 32;                                                                    \
        }                                                                                  \
        uint64_t q_ = (uint64_t)(((unsigned __int128)(x) * (e)->rcp) >> 64) >> (e)->shift; \
        (x) += (e)->bias + q_ * (e)->cmpl;                                                 \
    } while (0)

/* The constants of rows [C, n] (symbols of frequency 0 are left unset: never read, rejected first). */
static enc_sym *enc_table(const uint32_t *freq, const uint32_t *cum, int64_t rows, int64_t n) {
    enc_sym *es = malloc(sizeof(enc_sym) * (size_t)(rows * n));
    if (!es) return NULL;
    for (int64_t i = 0; i < rows * n; i++) {
        uint32_t f = freq[i];
        if (f == 0 || f > PROB_SCALE) continue;
        es[i] = (enc_sym){((RANS_L >> PROB_BITS) << 32) * f, g_rcp[f], cum[i] + g_bias[f], PROB_SCALE - f,
                          g_shift[f], 0};
    }
    return es;
}

/* 0 if every symbol of sym [T, C] is < n and has a frequency in its channel's row, else -2. */
static int64_t enc_check(const uint8_t *sym, int64_t T, int64_t C, const uint32_t *freq, int64_t n) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < C; c++) {
            uint32_t s = sym[t * C + c];
            if ((int64_t)s >= n || freq[c * n + s] - 1 >= PROB_SCALE) return -2;
        }
    return 0;
}

/* Flush the two final states below out[w] and move the words to out[0..]; the word count, or -1. */
static int64_t enc_finish(uint64_t x0, uint64_t x1, uint32_t *out, int64_t w, int64_t cap) {
    if (w < 4) return -1;
    out[--w] = (uint32_t)(x1 >> 32);
    out[--w] = (uint32_t)x1;
    out[--w] = (uint32_t)(x0 >> 32);
    out[--w] = (uint32_t)x0;
    memmove(out, out + w, (size_t)(cap - w) * 4);
    return cap - w;
}

int64_t cg_rans_encode(const uint8_t *sym, int64_t T, int64_t C, const uint32_t *freq, const uint32_t *cum,
                       int64_t n, uint32_t *out, int64_t cap) {
    if (cap < T * C + 4) return -1; /* at most one word per symbol, plus the two states */
    if (enc_check(sym, T, C, freq, n)) return -2;
    enc_sym *es = enc_table(freq, cum, C, n);
    if (!es) return -3;
    uint64_t x0 = RANS_L, x1 = RANS_L; /* the states of even and odd i, kept in registers */
    int64_t w = cap, i = T * C - 1, c = C - 1;
    if (i >= 0 && !(i & 1)) { /* an odd count: the last symbol (even i) alone, then pairs (odd, even) */
        ENC_STEP(x0, es + c * n + sym[i], out, w);
        i--, c = c ? c - 1 : C - 1;
    }
    for (; i > 0; i -= 2) {
        ENC_STEP(x1, es + c * n + sym[i], out, w);
        c = c ? c - 1 : C - 1;
        ENC_STEP(x0, es + c * n + sym[i - 1], out, w);
        c = c ? c - 1 : C - 1;
    }
    free(es);
    return enc_finish(x0, x1, out, w, cap);
}

/* The decode lookup: lut [C, PROB_SCALE] uint8, lut[c][slot] = the symbol whose [cum, cum + freq) holds
   slot; with fc [C, n] uint32 = freq | cum << 12 (freq <= 2^11, cum < 2^11), a symbol costs two loads. */
static void lut_row(const uint32_t *freq, const uint32_t *cum, int64_t n, uint8_t *row) {
    for (int64_t s = 0; s < n; s++) memset(row + cum[s], (int)s, freq[s]);
}

void cg_rans_lut(const uint32_t *freq, const uint32_t *cum, int64_t C, int64_t n, uint8_t *lut) {
    for (int64_t c = 0; c < C; c++) lut_row(freq + c * n, cum + c * n, n, lut + c * PROB_SCALE);
}

/* One decoder step of state x (a variable) with channel c's lookup; reads words from in[r] (bounded by nwords:
   a read past the end sets bad and reads in[nwords - 1] instead, so the step stays branch-free). */
#define DEC_STEP(x, lut, fc, n, c, in, r, nwords, bad, out)                                         \
    do {                                                                                           \
        uint32_t slot_ = (uint32_t)(x) & (PROB_SCALE - 1), s_ = (lut)[(c) * PROB_SCALE + slot_];   \
        uint32_t e_ = (fc)[(c) * (n) + s_];                                                        \
        uint64_t y_ = (uint64_t)(e_ & 0xFFF) * ((x) >> PROB_BITS) + slot_ - (e_ >> 12);            \
        int64_t need_ = y_ < RANS_L, at_ = (r) < (nwords) ? (r) : (nwords) - 1;                    \
        (bad) |= need_ & ((r) >= (nwords));                                                        \
        (x) = need_ ? (y_ << 32) | (in)[at_] : y_;                                                 \
        (r) += need_;                                                                              \
        (out) = (uint8_t)s_;                                                                       \
    } while (0)

/* Inverse of cg_rans_encode into sym [T, C] (lut and fc as above). Returns 0, or -1 if the words run out,
   are left over, or the final states are not the encoder's initial ones (corrupted or mismatched input). */
int64_t cg_rans_decode(const uint32_t *in, int64_t nwords, int64_t T, int64_t C, const uint8_t *lut,
                       const uint32_t *fc, int64_t n, uint8_t *sym) {
    if (nwords < 4) return -1;
    uint64_t x0 = (uint64_t)in[0] | ((uint64_t)in[1] << 32), x1 = (uint64_t)in[2] | ((uint64_t)in[3] << 32);
    int64_t r = 4, total = T * C, c = 0, bad = 0, i = 0;
    for (; i + 1 < total; i += 2) { /* i even: state 0, then i + 1: state 1 */
        DEC_STEP(x0, lut, fc, n, c, in, r, nwords, bad, sym[i]);
        if (++c == C) c = 0;
        DEC_STEP(x1, lut, fc, n, c, in, r, nwords, bad, sym[i + 1]);
        if (++c == C) c = 0;
    }
    if (i < total) DEC_STEP(x0, lut, fc, n, c, in, r, nwords, bad, sym[i]);
    return (!bad && r == nwords && x0 == RANS_L && x1 == RANS_L) ? 0 : -1;
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

/* ---- discrete Laplace models (cachegen format v2) ----
   Symbols are q + mid, q in [-mid, mid] (n = 2 mid + 1), laid out channel-major per part: [C, T], component
   c's T tokens contiguous. Each part is one rANS stream over its symbols in that order, symbol (c, t) coded
   by state t & 1 with component c's table; a chunk's two parts (K, V) are coded side by side, four chains
   in flight. Channel-major keeps one component's 2 KiB decode row hot in L1 for T symbols (token-major
   visits all C rows per token): on Laplace data, ~1.5x faster decode and ~2x faster encode than token-major. */

/* rho, amax of one component from its T symbols' sum and max of |q|: amax = max |q|; rho = round(-32 log2(1
   - r)), clipped to [0, 255], r = (sqrt(1 + m^2) - 1) / m the maximum-likelihood ratio p(|q| + 1) / p(|q|)
   for the mean magnitude m (E|q| = 2r / (1 - r^2)). Encoder-side only (rho travels in the frame). */
static void lap_fit(int64_t sum, int64_t top, int64_t T, uint8_t *rho, uint8_t *amax) {
    double m = (double)sum / (double)(T > 0 ? T : 1), r = m > 0 ? (sqrt(1 + m * m) - 1) / m : 0;
    double one_minus = 1 - r < 1.0 / 256 ? 1.0 / 256 : 1 - r, v = rint(-32 * log2(one_minus));
    *rho = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
    *amax = (uint8_t)top;
}

/* Fit rho, amax [C] to symbols [C, T]. Returns 0, or -1 if a symbol is > 2 mid. */
static int64_t lap_fit_cm(const uint8_t *sym, int64_t T, int64_t C, int64_t mid, uint8_t *rho, uint8_t *amax) {
    for (int64_t c = 0; c < C; c++) {
        int64_t sum = 0, top = 0;
        for (int64_t t = 0; t < T; t++) {
            int64_t q = (int64_t)sym[c * T + t] - mid, a = q < 0 ? -q : q;
            sum += a;
            top = a > top ? a : top;
        }
        if (top > mid) return -1;
        lap_fit(sum, top, T, rho + c, amax + c);
    }
    return 0;
}

/* Per-column mean, min and max of y [T, C] fp32 (T >= 1) into mean, lo, hi [C] (the mean summed in double). */
int64_t cg_col_stats(const float *y, int64_t T, int64_t C, float *mean, float *lo, float *hi) {
    double *acc = calloc((size_t)C, sizeof(double));
    if (!acc) return -3;
    for (int64_t c = 0; c < C; c++) lo[c] = hi[c] = y[c];
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < C; c++) {
            float v = y[t * C + c];
            acc[c] += v;
            lo[c] = v < lo[c] ? v : lo[c];
            hi[c] = v > hi[c] ? v : hi[c];
        }
    for (int64_t c = 0; c < C; c++) mean[c] = (float)(acc[c] / (double)T);
    free(acc);
    return 0;
}

/* Quantize y [T, C] fp32 into symbols [C, T]: q = clamp(rint((y - centre_c) / step_c), -mid, mid) (rint:
   nearest, ties to even, as torch.round), sym = q + mid; and fit rho, amax [C]. Returns 0, -3 on OOM. */
static int64_t lap_quant(const float *y, int64_t T, int64_t C, const float *centre, const float *step, int64_t mid,
                         uint8_t *sym, uint8_t *rho, uint8_t *amax) {
    int64_t *acc = calloc((size_t)(2 * C), sizeof(int64_t));
    if (!acc) return -3;
    const float lim = (float)mid;
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < C; c++) {
            float q = rintf((y[t * C + c] - centre[c]) / step[c]);
            q = q < -lim ? -lim : q > lim ? lim : q;
            int64_t a = (int64_t)(q < 0 ? -q : q);
            sym[c * T + t] = (uint8_t)((int64_t)q + mid);
            acc[c] += a;
            if (a > acc[C + c]) acc[C + c] = a;
        }
    for (int64_t c = 0; c < C; c++) lap_fit(acc[c], acc[C + c], T, rho + c, amax + c);
    free(acc);
    return 0;
}

/* Row c of the discrete Laplace tables: over symbols s in [0, n) (|q| = |s - mid|), w_s = wsym[rho][s] inside
   the support |q| <= amax, else 0; freq_s = 1 + floor(w_s (PROB_SCALE - k) / sum w) inside (k = 2 amax + 1
   symbols), 0 outside, the remainder on the first largest w (q = 0: weights fall with |q|). All-integer:
   both ends build identical rows. Writes f and cu (cum) on the support only [mid - a, mid + a] (the coders
   read nothing else), and lut [PROB_SCALE] when not NULL (as cg_rans_lut). */
static void lap_row(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *f, uint32_t *cu,
                    uint8_t *lut) {
    int64_t n = 2 * mid + 1, k = 2 * a + 1, lo = mid - a, hi = mid + a, total = 0, best = -1, bs = lo, sum = 0;
    const int64_t *w = wsym + rho * n;
    for (int64_t s = lo; s <= hi; s++) total += w[s];
    if (total < 1) total = 1;
    for (int64_t s = lo; s <= hi; s++) {
        f[s] = (uint32_t)(1 + w[s] * ((int64_t)PROB_SCALE - k) / total);
        sum += f[s];
        if (w[s] > best) { best = w[s]; bs = s; }
    }
    f[bs] += (uint32_t)((int64_t)PROB_SCALE - sum);
    uint32_t run = 0;
    for (int64_t s = lo; s <= hi; s++) {
        cu[s] = run;
        if (lut) memset(lut + run, (int)s, f[s]);
        run += f[s];
    }
}

/* Tables of C components (rho, amax [C]): freq, cum [C, n] uint32 (whole rows); lut [C, PROB_SCALE] when
   not NULL. Returns 0, or -1 if some amax_c > mid. */
int64_t cg_lap_tables(const uint8_t *rho, const uint8_t *amax, int64_t C, int64_t mid, const int64_t *wsym,
                      uint32_t *freq, uint32_t *cum, uint8_t *lut) {
    int64_t n = 2 * mid + 1;
    for (int64_t c = 0; c < C; c++) {
        int64_t a = amax[c];
        if (a > mid) return -1;
        uint32_t *f = freq + c * n, *cu = cum + c * n;
        lap_row(rho[c], a, mid, wsym, f, cu, lut ? lut + c * PROB_SCALE : NULL);
        for (int64_t s = 0; s < n; s++)
            if (s < mid - a || s > mid + a) f[s] = 0, cu[s] = s < mid - a ? 0 : PROB_SCALE;
    }
    return 0;
}

/* The encoder constants of one Laplace row (rho, amax) into es[n] (entries outside the support unset). */
static void lap_enc_row(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *scratch, enc_sym *es) {
    int64_t n = 2 * mid + 1;
    uint32_t *f = scratch, *cu = scratch + n;
    lap_row(rho, a, mid, wsym, f, cu, NULL);
    for (int64_t s = mid - a; s <= mid + a; s++)
        es[s] = (enc_sym){((RANS_L >> PROB_BITS) << 32) * f[s], g_rcp[f[s]], cu[s] + g_bias[f[s]],
                          PROB_SCALE - f[s], g_shift[f[s]], 0};
}

/* Code two parts' symbols sym [2, C, T] (valid for rho, amax [2C]: every |q| <= amax) into out0, out1
   (capacity cap >= T * C + 4 each); nw[2] gets the word counts. Each component's tables are built just
   before its tokens are coded (small, hot in L1). Returns 0, -1 no room, -3 out of memory. */
static int64_t lap_code2(const uint8_t *sym, int64_t T, int64_t C, const uint8_t *rho, const uint8_t *amax,
                         int64_t mid, const int64_t *wsym, uint32_t *out0, uint32_t *out1, int64_t cap, int64_t *nw) {
    int64_t n = 2 * mid + 1;
    if (cap < T * C + 4) return -1;
    enc_sym *ea = malloc(sizeof(enc_sym) * (size_t)(2 * n)), *eb = ea + n;
    uint32_t *scratch = malloc(sizeof(uint32_t) * (size_t)(2 * n));
    if (!ea || !scratch) {
        free(ea);
        free(scratch);
        return -3;
    }
    uint64_t a0 = RANS_L, a1 = RANS_L, b0 = RANS_L, b1 = RANS_L;
    int64_t wa = cap, wb = cap;
    for (int64_t c = C - 1; c >= 0; c--) { /* the decoder's order reversed: c descending, t descending */
        lap_enc_row(rho[c], amax[c], mid, wsym, scratch, ea);
        lap_enc_row(rho[C + c], amax[C + c], mid, wsym, scratch, eb);
        const uint8_t *sa = sym + c * T, *sb = sym + (C + c) * T;
        int64_t t = T - 1;
        if (!(t & 1)) { /* T odd: the last token (even t, state 0) alone, then pairs (odd, even) */
            ENC_STEP(a0, ea + sa[t], out0, wa);
            ENC_STEP(b0, eb + sb[t], out1, wb);
            t--;
        }
        for (; t > 0; t -= 2) {
            ENC_STEP(a1, ea + sa[t], out0, wa);
            ENC_STEP(b1, eb + sb[t], out1, wb);
            ENC_STEP(a0, ea + sa[t - 1], out0, wa);
            ENC_STEP(b0, eb + sb[t - 1], out1, wb);
        }
    }
    free(ea);
    free(scratch);
    nw[0] = enc_finish(a0, a1, out0, wa, cap);
    nw[1] = enc_finish(b0, b1, out1, wb, cap);
    return nw[0] < 0 || nw[1] < 0 ? -1 : 0;
}

/* Fit and code two parts' symbols sym [2, C, T] (e.g. quantized on a GPU): rho, amax [2C] are written.
   Returns 0, -1 no room, -2 a symbol > 2 mid, -3 out of memory. */
int64_t cg_lap_code2(const uint8_t *sym, int64_t T, int64_t C, int64_t mid, const int64_t *wsym, uint8_t *rho,
                     uint8_t *amax, uint32_t *out0, uint32_t *out1, int64_t cap, int64_t *nw) {
    if (lap_fit_cm(sym, T, 2 * C, mid, rho, amax)) return -2;
    return lap_code2(sym, T, C, rho, amax, mid, wsym, out0, out1, cap, nw);
}

/* The CPU encoder of a chunk's two parts (K, V): quantize y0, y1 [T, C] with centre, step [2C] (K's, then
   V's), fit rho, amax [2C] (written) and code (as cg_lap_code2). Returns 0, -1 no room, -3 out of memory. */
int64_t cg_lap_encode2(const float *y0, const float *y1, int64_t T, int64_t C, const float *centre,
                       const float *step, int64_t mid, const int64_t *wsym, uint8_t *rho, uint8_t *amax,
                       uint32_t *out0, uint32_t *out1, int64_t cap, int64_t *nw) {
    int64_t rc = -3;
    uint8_t *sym = malloc((size_t)(2 * T * C));
    if (sym && lap_quant(y0, T, C, centre, step, mid, sym, rho, amax) == 0 &&
        lap_quant(y1, T, C, centre + C, step + C, mid, sym + T * C, rho + C, amax + C) == 0)
        rc = lap_code2(sym, T, C, rho, amax, mid, wsym, out0, out1, cap, nw);
    free(sym);
    return rc;
}

/* The decoder tables of one Laplace row (rho, amax): lut [PROB_SCALE], fc [n] = freq | cum << 12. */
static void lap_dec_row(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *scratch, uint8_t *lut,
                        uint32_t *fc) {
    int64_t n = 2 * mid + 1;
    uint32_t *f = scratch, *cu = scratch + n;
    lap_row(rho, a, mid, wsym, f, cu, lut);
    for (int64_t s = mid - a; s <= mid + a; s++) fc[s] = f[s] | cu[s] << 12;
}

/* Inverse of cg_lap_code2: words in0[nw0], in1[nw1] with the tables of rho, amax [2C] -> sym [2, C, T].
   Returns 0, -1 on corrupted words (either part) or amax > mid, -3 out of memory. */
int64_t cg_lap_uncode2(const uint32_t *in0, int64_t nw0, const uint32_t *in1, int64_t nw1, int64_t T, int64_t C,
                       const uint8_t *rho, const uint8_t *amax, int64_t mid, const int64_t *wsym, uint8_t *sym) {
    int64_t n = 2 * mid + 1;
    if (nw0 < 4 || nw1 < 4) return -1;
    for (int64_t c = 0; c < 2 * C; c++)
        if (amax[c] > mid) return -1;
    uint32_t *buf = malloc(sizeof(uint32_t) * (size_t)(4 * n)), *fa = buf + 2 * n, *fb = fa + n;
    uint8_t *la = malloc(2 * PROB_SCALE), *lb = la + PROB_SCALE;
    if (!buf || !la) {
        free(buf);
        free(la);
        return -3;
    }
    uint64_t a0 = (uint64_t)in0[0] | ((uint64_t)in0[1] << 32), a1 = (uint64_t)in0[2] | ((uint64_t)in0[3] << 32);
    uint64_t b0 = (uint64_t)in1[0] | ((uint64_t)in1[1] << 32), b1 = (uint64_t)in1[2] | ((uint64_t)in1[3] << 32);
    int64_t ra = 4, rb = 4, bad = 0;
    for (int64_t c = 0; c < C; c++) {
        lap_dec_row(rho[c], amax[c], mid, wsym, buf, la, fa);
        lap_dec_row(rho[C + c], amax[C + c], mid, wsym, buf, lb, fb);
        uint8_t *sa = sym + c * T, *sb = sym + (C + c) * T;
        int64_t t = 0;
        for (; t + 1 < T; t += 2) {
            DEC_STEP(a0, la, fa, n, 0, in0, ra, nw0, bad, sa[t]);
            DEC_STEP(b0, lb, fb, n, 0, in1, rb, nw1, bad, sb[t]);
            DEC_STEP(a1, la, fa, n, 0, in0, ra, nw0, bad, sa[t + 1]);
            DEC_STEP(b1, lb, fb, n, 0, in1, rb, nw1, bad, sb[t + 1]);
        }
        if (t < T) {
            DEC_STEP(a0, la, fa, n, 0, in0, ra, nw0, bad, sa[t]);
            DEC_STEP(b0, lb, fb, n, 0, in1, rb, nw1, bad, sb[t]);
        }
    }
    free(buf);
    free(la);
    int ok = !bad && ra == nw0 && rb == nw1 && a0 == RANS_L && a1 == RANS_L && b0 == RANS_L && b1 == RANS_L;
    return ok ? 0 : -1;
}

/* The CPU decoder of a chunk's two parts: cg_lap_uncode2, then y0, y1 [T, C] fp32 = centre + (sym - mid) *
   step (centre, step [2C]). Returns as cg_lap_uncode2. */
int64_t cg_lap_decode2(const uint32_t *in0, int64_t nw0, const uint32_t *in1, int64_t nw1, int64_t T, int64_t C,
                       const uint8_t *rho, const uint8_t *amax, int64_t mid, const int64_t *wsym,
                       const float *centre, const float *step, float *y0, float *y1) {
    uint8_t *sym = malloc((size_t)(2 * T * C));
    if (!sym) return -3;
    int64_t rc = cg_lap_uncode2(in0, nw0, in1, nw1, T, C, rho, amax, mid, wsym, sym);
    for (int64_t p = 0; p < 2 && rc == 0; p++) { /* [C, T] symbols -> [T, C] values, 8 tokens at a time */
        const uint8_t *sp = sym + p * T * C;
        const float *ce = centre + p * C, *st = step + p * C;
        float *y = p ? y1 : y0;
        for (int64_t t0 = 0; t0 < T; t0 += 8) {
            int64_t t1 = t0 + 8 < T ? t0 + 8 : T;
            for (int64_t c = 0; c < C; c++)
                for (int64_t t = t0; t < t1; t++) y[t * C + c] = ce[c] + (float)((int64_t)sp[c * T + t] - mid) * st[c];
        }
    }
    free(sym);
    return rc;
}

/* ---- the transform's RoPE step (cachegen format v2 un-rotates keys before its transform) ---- */

/* Rotate-half RoPE: x, out [T, H, D] fp32 (out may be x), cos/sin rows of length ld >= D/2 (row t: position
   t; the first D/2 columns are read: the layout repeats them). sign +1 rotates, -1 un-rotates:
   out[:D/2] = x1 cos - sign x2 sin, out[D/2:] = x2 cos + sign x1 sin. */
void cg_rope(const float *x, int64_t T, int64_t H, int64_t D, const float *cos, const float *sin, int64_t ld,
             float sign, float *out) {
    int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * ld, *sn = sin + t * ld;
        for (int64_t h = 0; h < H; h++) {
            const float *x1 = x + (t * H + h) * D, *x2 = x1 + half;
            float *o1 = out + (t * H + h) * D, *o2 = o1 + half;
            for (int64_t i = 0; i < half; i++) {
                float a = x1[i], b = x2[i], si = sign * sn[i];
                o1[i] = a * c[i] - b * si;
                o2[i] = b * c[i] + a * si;
            }
        }
    }
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
