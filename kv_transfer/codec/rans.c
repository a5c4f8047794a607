/* The CacheGen codec's compiled kernels (rANS coder, discrete Laplace models, RoPE step): see rans.py,
   which loads this file (built by engine/cbuild.py on first use). */

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
