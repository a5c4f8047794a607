/* The CacheGen codec's compiled kernels (rANS coders, discrete Laplace models, RoPE step): see rans.py,
   which loads this file (built by setup.py with the package; engine/cbuild.py on first use in a checkout). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

/* setup.py compiles this file with CG_SOURCE_ID = the first 16 hex digits of its sha256; rans.py loads such a
   library only if the id matches the rans.c beside it (a stale in-place build is not used). */
#ifndef CG_SOURCE_ID
#define CG_SOURCE_ID ""
#endif
const char *cg_source_id(void) { return CG_SOURCE_ID; }

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

/* ---- discrete Laplace models (cachegen format v4) ----
   Symbols are q + mid, q in [-mid, mid] (n = 2 mid + 1), laid out component-major per part: [C, T],
   component c's T tokens contiguous (its 2 KiB decode row stays hot in L1 for T symbols). Each part (K, V)
   of a chunk is one rANS stream of uint16 words: 32-bit states in [L4, 2^31) with 16-bit renormalisation
   (at most one word per symbol, no 128-bit arithmetic), four states per part interleaved by token (symbol
   (c, t) is coded by state t & 3, each component's row starting at state 0), the chunk's two parts coded
   side by side: eight independent dependency chains in flight. Renormalisation is branch-free on both
   sides (the symbol-dependent branch mispredicted every few symbols). The hot loops are compiled twice
   (x86-64 baseline and x86-64-v3, chosen when the library loads), so one portable build runs AVX2 code
   where the CPU has it. */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define CG_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CG_HOT
#endif
#define L4 (1u << 15)

/* rho, amax of one component from its T symbols' sum and max of |q|: amax = max |q|; rho = round(-32 log2(1
   - r)), clipped to [0, 255], r = (sqrt(1 + m^2) - 1) / m the maximum-likelihood ratio p(|q| + 1) / p(|q|)
   for the mean magnitude m (E|q| = 2r / (1 - r^2)). Encoder-side only (rho travels in the frame). */
static void lap_fit(int64_t sum, int64_t top, int64_t T, uint8_t *rho, uint8_t *amax) {
    double m = (double)sum / (double)(T > 0 ? T : 1), r = m > 0 ? (sqrt(1 + m * m) - 1) / m : 0;
    double one_minus = 1 - r < 1.0 / 256 ? 1.0 / 256 : 1 - r, v = rint(-32 * log2(one_minus));
    *rho = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
    *amax = (uint8_t)top;
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
    const double rcp = 1.0 / (double)total; /* floor(w K / total) by a reciprocal, corrected to exact */
    for (int64_t s = lo; s <= hi; s++) {
        int64_t num = w[s] * ((int64_t)PROB_SCALE - k), q = (int64_t)((double)num * rcp);
        q += (q + 1) * total <= num;
        q -= q * total > num;
        f[s] = (uint32_t)(1 + q);
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

/* ---- format v4's coder ---- */

/* Encoder constants of one symbol (frequency f, cumulative start): x_max = f 2^20 (emit 16 bits first when
   x >= x_max), and Alverson's reciprocal: q = floor(x / f) = (x rcp) >> 32 >> shift, exact for x < 2^31
   (f = 1: q = x - 1, folded into bias). */
typedef struct { uint32_t x_max, rcp, bias; uint16_t cmpl, shift; } esym4;

static uint32_t g4_rcp[PROB_SCALE + 1];
static uint16_t g4_shift[PROB_SCALE + 1];

__attribute__((constructor)) static void init_reciprocals4(void) {
    for (uint32_t f = 2; f <= PROB_SCALE; f++) {
        uint32_t s = 0;
        while (f > (1u << s)) s++;
        g4_rcp[f] = (uint32_t)(((1ull << (s + 31)) + f - 1) / f), g4_shift[f] = (uint16_t)(s - 1);
    }
    g4_rcp[1] = ~0u, g4_shift[1] = 0;
}

static inline void esym4_set(esym4 *e, uint32_t start, uint32_t f) {
    e->x_max = ((L4 >> PROB_BITS) << 16) * f;
    e->cmpl = (uint16_t)(PROB_SCALE - f);
    e->rcp = g4_rcp[f], e->shift = (uint16_t)(32 + g4_shift[f]), e->bias = f < 2 ? start + PROB_SCALE - 1 : start;
}

/* One encoder step; the word is stored unconditionally at out[w - 1] and kept only when emitted (w > 0 is
   guaranteed: room for one word per symbol plus the final states). */
#define ENC4(x, e, out, w)                                                              \
    do {                                                                               \
        uint32_t x_ = (x), emit_ = x_ >= (e)->x_max;                                    \
        (out)[(w) - 1] = (uint16_t)x_;                                                  \
        (w) -= emit_;                                                                   \
        x_ >>= emit_ << 4;                                                              \
        uint32_t q_ = (uint32_t)(((uint64_t)x_ * (e)->rcp) >> (e)->shift);              \
        (x) = x_ + (e)->bias + q_ * (e)->cmpl;                                          \
    } while (0)

/* One decoder step with a row's byte lookup lut [PROB_SCALE] (slot -> symbol) and fc [n] = freq | cum << 12;
   reads in[r] when the state falls below L4. CHECKED: a read at or past nwords sets bad and reads
   in[nwords - 1] instead; unchecked where the caller knows the row cannot run out. Branch-free: the word is
   loaded always and selected by arithmetic (a branch here mispredicts every few symbols). */
#define DEC4(lut, fc, x, in, r, out, CHECKED, nwords, bad)                                \
    do {                                                                                \
        uint32_t slot_ = (x) & (PROB_SCALE - 1), s_ = (lut)[slot_], e_ = (fc)[s_];        \
        uint32_t y_ = (e_ & 0xFFF) * ((x) >> PROB_BITS) + slot_ - (e_ >> 12), need_ = y_ < L4; \
        int64_t at_ = (r);                                                              \
        if (CHECKED) {                                                                  \
            (bad) |= need_ & (at_ >= (nwords));                                         \
            at_ = at_ < (nwords) ? at_ : (nwords) - 1;                                  \
        }                                                                               \
        uint32_t w_ = (in)[at_];                                                        \
        (x) = (y_ << (need_ << 4)) | (w_ & (0u - need_));                               \
        (r) += need_;                                                                   \
        (out) = (uint8_t)s_;                                                            \
    } while (0)

static void enc4_row(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *scratch, esym4 *es) {
    int64_t n = 2 * mid + 1;
    uint32_t *f = scratch, *cu = scratch + n;
    lap_row(rho, a, mid, wsym, f, cu, NULL);
    for (int64_t s = mid - a; s <= mid + a; s++) esym4_set(es + s, cu[s], f[s]);
}

/* One Laplace row's decode tables (rho, amax): lut [PROB_SCALE] and fc [n] for DEC4. (A one-load table of
   PROB_SCALE uint32 entries per row decoded no faster: building it cost more than the load it saves.) */
static void dec4_row(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *scratch, uint8_t *lut,
                     uint32_t *fc) {
    int64_t n = 2 * mid + 1;
    uint32_t *f = scratch, *cu = scratch + n;
    lap_row(rho, a, mid, wsym, f, cu, lut);
    for (int64_t s = mid - a; s <= mid + a; s++) fc[s] = f[s] | cu[s] << 12;
}

/* Decode row c of both parts (T symbols each, token t: state t & 3 of its part), the parts' steps alternating:
   eight chains in flight (a stream's word index r links its four states, so two streams side by side). */
#define DEC4_ROWS(CHECKED)                                                                   \
    do {                                                                                     \
        int64_t t = 0;                                                                       \
        for (; t < full; t += 4) {                                                           \
            DEC4(la, fa, a0, in0, ra, sa[t], CHECKED, nw0, bad);                                 \
            DEC4(lb, fb, b0, in1, rb, sb[t], CHECKED, nw1, bad);                                 \
            DEC4(la, fa, a1, in0, ra, sa[t + 1], CHECKED, nw0, bad);                             \
            DEC4(lb, fb, b1, in1, rb, sb[t + 1], CHECKED, nw1, bad);                             \
            DEC4(la, fa, a2, in0, ra, sa[t + 2], CHECKED, nw0, bad);                             \
            DEC4(lb, fb, b2, in1, rb, sb[t + 2], CHECKED, nw1, bad);                             \
            DEC4(la, fa, a3, in0, ra, sa[t + 3], CHECKED, nw0, bad);                             \
            DEC4(lb, fb, b3, in1, rb, sb[t + 3], CHECKED, nw1, bad);                             \
        }                                                                                    \
        for (; t < T; t++) {                                                                 \
            if ((t & 3) == 0) {                                                              \
                DEC4(la, fa, a0, in0, ra, sa[t], CHECKED, nw0, bad);                             \
                DEC4(lb, fb, b0, in1, rb, sb[t], CHECKED, nw1, bad);                             \
            } else if ((t & 3) == 1) {                                                       \
                DEC4(la, fa, a1, in0, ra, sa[t], CHECKED, nw0, bad);                             \
                DEC4(lb, fb, b1, in1, rb, sb[t], CHECKED, nw1, bad);                             \
            } else {                                                                         \
                DEC4(la, fa, a2, in0, ra, sa[t], CHECKED, nw0, bad);                             \
                DEC4(lb, fb, b2, in1, rb, sb[t], CHECKED, nw1, bad);                             \
            }                                                                                \
        }                                                                                    \
    } while (0)

static inline __attribute__((always_inline)) void enc4_part(const esym4 *restrict e, const uint8_t *restrict s, int64_t T, int64_t full,
    uint32_t *p0, uint32_t *p1, uint32_t *p2, uint32_t *p3, uint16_t *restrict o, int64_t *pw) {
    uint32_t x0 = *p0, x1 = *p1, x2 = *p2, x3 = *p3; int64_t w = *pw;
    for (int64_t t = T - 1; t >= full; t--) {
        switch (t & 3) {
        case 0: ENC4(x0, e + s[t], o, w); break;
        case 1: ENC4(x1, e + s[t], o, w); break;
        default: ENC4(x2, e + s[t], o, w); break;
        }
    }
    for (int64_t t = full - 4; t >= 0; t -= 4) {
        const esym4 *e3 = e + s[t + 3], *e2 = e + s[t + 2], *e1 = e + s[t + 1], *e0 = e + s[t];
        ENC4(x3, e3, o, w);
        ENC4(x2, e2, o, w);
        ENC4(x1, e1, o, w);
        ENC4(x0, e0, o, w);
    }
    *p0 = x0, *p1 = x1, *p2 = x2, *p3 = x3, *pw = w;
}

/* Flush four states below out[w] (state 0 ends first: the decoder reads it first) and move the words to
   dst; returns the word count. */
static int64_t enc4_finish(const uint32_t *x, uint16_t *out, int64_t w, int64_t cap, uint16_t *dst) {
    for (int j = 3; j >= 0; j--) {
        out[--w] = (uint16_t)(x[j] >> 16);
        out[--w] = (uint16_t)x[j];
    }
    memcpy(dst, out + w, (size_t)(cap - w) * 2);
    return cap - w;
}

/* Code a chunk's two parts' symbols sym [2, C, T] (every |q| <= amax of its component; rho, amax [2C]) into
   dst0 and dst1 (room for T * C + 8 words each; dst1 may follow dst0's words: it is written after).
   tmp: scratch of 2 (T * C + 8) words. nw[2] gets the word counts. Returns 0, or -3 out of memory. */
CG_HOT static int64_t code4(const uint8_t *sym, int64_t T, int64_t C, const uint8_t *rho, const uint8_t *amax,
                            int64_t mid, const int64_t *wsym, uint16_t *tmp, uint16_t *dst0, int64_t *nw) {
    int64_t n = 2 * mid + 1, cap = T * C + 8;
    esym4 *ea = malloc(sizeof(esym4) * (size_t)(2 * n)), *eb = ea ? ea + n : NULL;
    uint32_t *scratch = malloc(sizeof(uint32_t) * (size_t)(2 * n));
    if (!ea || !scratch) {
        free(ea);
        free(scratch);
        return -3;
    }
    uint16_t *restrict oa = tmp, *restrict ob = tmp + cap;
    uint32_t a0 = L4, a1 = L4, a2 = L4, a3 = L4, b0 = L4, b1 = L4, b2 = L4, b3 = L4;
    int64_t wa = cap, wb = cap, full = T & ~(int64_t)3;
    for (int64_t c = C - 1; c >= 0; c--) { /* the decoder's order reversed: V's rows, then K's, descending */
        if (amax[C + c] == 0) continue; /* frequency PROB_SCALE: coding it leaves the states as they are */
        enc4_row(rho[C + c], amax[C + c], mid, wsym, scratch, eb);
        enc4_part(eb, sym + (C + c) * T, T, full, &b0, &b1, &b2, &b3, ob, &wb);
    }
    for (int64_t c = C - 1; c >= 0; c--) {
        if (amax[c] == 0) continue;
        enc4_row(rho[c], amax[c], mid, wsym, scratch, ea);
        enc4_part(ea, sym + c * T, T, full, &a0, &a1, &a2, &a3, oa, &wa);
    }
    free(ea);
    free(scratch);
    uint32_t fa[4] = {a0, a1, a2, a3}, fb[4] = {b0, b1, b2, b3};
    nw[0] = enc4_finish(fa, oa, wa, cap, dst0);
    nw[1] = enc4_finish(fb, ob, wb, cap, dst0 + nw[0]);
    return 0;
}

/* Per-component mean, min and max of each chunk's rows: y0, y1 [C, T] fp32 (K's and V's transformed rows),
   chunk j = tokens [bounds[j], bounds[j + 1]) -> stats [nch, 2, 3, C] (mean, lo, hi). Returns 0, or -4 if
   some value is not finite. */
CG_HOT int64_t cg4_stats(const float *y0, const float *y1, int64_t C, int64_t T, int64_t nch,
                         const int64_t *bounds, float *stats) {
    for (int64_t j = 0; j < nch; j++)
        for (int64_t p = 0; p < 2; p++) {
            float *mean = stats + (j * 2 + p) * 3 * C, *lo = mean + C, *hi = lo + C;
            int64_t a = bounds[j], len = bounds[j + 1] - a;
            for (int64_t c = 0; c < C; c++) {
                const float *row = (p ? y1 : y0) + c * T + a;
                float s = 0, mn = row[0], mx = row[0];
#pragma omp simd reduction(+ : s) reduction(min : mn) reduction(max : mx)
                for (int64_t t = 0; t < len; t++) {
                    s += row[t];
                    mn = row[t] < mn ? row[t] : mn;
                    mx = row[t] > mx ? row[t] : mx;
                }
                if (!isfinite(s) || !isfinite(mn) || !isfinite(mx)) return -4;
                mean[c] = s / (float)len, lo[c] = mn, hi[c] = mx;
            }
        }
    return 0;
}

/* Quantize one row: sym[t] = clamp(rint((y[t] - centre) * (1 / step)), -mid, mid) + mid; -> (sum |q|, max |q|). */
CG_HOT static void quant4_row(const float *y, int64_t len, float centre, float step, int64_t mid, uint8_t *sym,
                              int64_t *sum_out, int64_t *top_out) {
    const float inv = 1.0f / step, lim = (float)mid, off = (float)mid;
    int32_t sum = 0, top = 0;
#pragma omp simd reduction(+ : sum) reduction(max : top)
    for (int64_t t = 0; t < len; t++) {
        float q = rintf((y[t] - centre) * inv);
        q = q < -lim ? -lim : q > lim ? lim : q;
        int32_t a = (int32_t)fabsf(q);
        sym[t] = (uint8_t)(int32_t)(q + off);
        sum += a;
        top = a > top ? a : top;
    }
    *sum_out = sum, *top_out = top;
}

/* The CPU encoder of one layer: y0, y1 [C, T] fp32 (K's and V's rows), chunk j = tokens [bounds[j],
   bounds[j + 1]) quantized with centre, step [nch, 2, C] (step > 0), each component's Laplace model fitted
   (rho, amax [nch, 2, C] written) and both parts coded. out: room for sum_j 2 (len_j C + 8) words; chunk j's
   K words then V words, nw [nch, 2] their counts. Returns 0, or -3 out of memory. */
CG_HOT int64_t cg4_encode(const float *y0, const float *y1, int64_t C, int64_t T, int64_t nch,
                          const int64_t *bounds, const float *centre, const float *step, int64_t mid,
                          const int64_t *wsym, uint8_t *rho, uint8_t *amax, uint16_t *out, int64_t *nw) {
    int64_t most = 0;
    for (int64_t j = 0; j < nch; j++) most = bounds[j + 1] - bounds[j] > most ? bounds[j + 1] - bounds[j] : most;
    uint8_t *sym = malloc((size_t)(2 * C * most));
    uint16_t *tmp = malloc(sizeof(uint16_t) * (size_t)(2 * (most * C + 8)));
    int64_t rc = sym && tmp ? 0 : -3, pos = 0;
    for (int64_t j = 0; j < nch && rc == 0; j++) {
        int64_t a = bounds[j], len = bounds[j + 1] - a;
        for (int64_t p = 0; p < 2; p++)
            for (int64_t c = 0; c < C; c++) {
                int64_t i = (j * 2 + p) * C + c, sum, top;
                quant4_row((p ? y1 : y0) + c * T + a, len, centre[i], step[i], mid, sym + (p * C + c) * len, &sum,
                           &top);
                lap_fit(sum, top, len, rho + i, amax + i);
            }
        rc = code4(sym, len, C, rho + j * 2 * C, amax + j * 2 * C, mid, wsym, tmp, out + pos, nw + 2 * j);
        pos += nw[2 * j] + nw[2 * j + 1];
    }
    free(sym);
    free(tmp);
    return rc;
}

/* Fit and code symbols already quantized (e.g. on a GPU): sym [nch] blocks of [2, C, len_j] back to back ->
   rho, amax, out, nw as cg4_encode. Returns 0, -2 a symbol > 2 mid, -3 out of memory. */
int64_t cg4_code(const uint8_t *sym, int64_t C, int64_t nch, const int64_t *bounds, int64_t mid,
                 const int64_t *wsym, uint8_t *rho, uint8_t *amax, uint16_t *out, int64_t *nw) {
    int64_t most = 0, pos = 0, rc = 0;
    for (int64_t j = 0; j < nch; j++) most = bounds[j + 1] - bounds[j] > most ? bounds[j + 1] - bounds[j] : most;
    uint16_t *tmp = malloc(sizeof(uint16_t) * (size_t)(2 * (most * C + 8)));
    if (!tmp) return -3;
    for (int64_t j = 0; j < nch && rc == 0; j++) {
        int64_t len = bounds[j + 1] - bounds[j];
        const uint8_t *s = sym + 2 * C * bounds[j];
        for (int64_t i = 0; i < 2 * C && rc == 0; i++) {
            int64_t sum = 0, top = 0;
            for (int64_t t = 0; t < len; t++) {
                int64_t q = (int64_t)s[i * len + t] - mid, m = q < 0 ? -q : q;
                sum += m;
                top = m > top ? m : top;
            }
            if (top > mid) rc = -2;
            else lap_fit(sum, top, len, rho + j * 2 * C + i, amax + j * 2 * C + i);
        }
        if (rc == 0) rc = code4(s, len, C, rho + j * 2 * C, amax + j * 2 * C, mid, wsym, tmp, out + pos, nw + 2 * j);
        pos += nw[2 * j] + nw[2 * j + 1];
    }
    free(tmp);
    return rc;
}

/* Inverse of code4 for one chunk: words in0[nw0], in1[nw1] -> sym [2, C, T]. Returns 0, -1 corrupted, -3 OOM. */
CG_HOT static int64_t uncode4(const uint16_t *restrict in0, int64_t nw0, const uint16_t *restrict in1, int64_t nw1,
                              int64_t T, int64_t C, const uint8_t *rho, const uint8_t *amax, int64_t mid,
                              const int64_t *wsym, uint8_t *restrict sym) {
    int64_t n = 2 * mid + 1;
    if (nw0 < 8 || nw1 < 8) return -1;
    for (int64_t c = 0; c < 2 * C; c++)
        if (amax[c] > mid) return -1;
    uint32_t *buf = malloc(sizeof(uint32_t) * (size_t)(4 * n));
    uint8_t *lut = malloc(2 * PROB_SCALE);
    if (!buf || !lut) {
        free(buf);
        free(lut);
        return -3;
    }
    uint32_t *restrict fa = buf + 2 * n, *restrict fb = fa + n;
    uint8_t *restrict la = lut, *restrict lb = lut + PROB_SCALE;
#define ST(in, k) ((uint32_t)(in)[2 * (k)] | (uint32_t)(in)[2 * (k) + 1] << 16)
    uint32_t a0 = ST(in0, 0), a1 = ST(in0, 1), a2 = ST(in0, 2), a3 = ST(in0, 3);
    uint32_t b0 = ST(in1, 0), b1 = ST(in1, 1), b2 = ST(in1, 2), b3 = ST(in1, 3);
#undef ST
    int64_t ra = 8, rb = 8, bad = 0, full = T & ~(int64_t)3;
    /* a state outside [L4, 2^31) cannot come from the encoder */
    bad |= (a0 | a1 | a2 | a3 | b0 | b1 | b2 | b3) >> 31;
    bad |= a0 < L4 || a1 < L4 || a2 < L4 || a3 < L4 || b0 < L4 || b1 < L4 || b2 < L4 || b3 < L4;
    for (int64_t c = 0; c < C && !bad; c++) {
        /* a row of amax 0 is one symbol of frequency PROB_SCALE: its table leaves the states as they are */
        dec4_row(rho[c], amax[c], mid, wsym, buf, la, fa);
        dec4_row(rho[C + c], amax[C + c], mid, wsym, buf, lb, fb);
        uint8_t *restrict sa = sym + c * T, *restrict sb = sym + (C + c) * T;
        if (ra + T <= nw0 && rb + T <= nw1) /* at most one word per symbol: neither stream runs out */
            DEC4_ROWS(0);
        else
            DEC4_ROWS(1);
    }
    free(buf);
    free(lut);
    int ok = !bad && ra == nw0 && rb == nw1 && a0 == L4 && a1 == L4 && a2 == L4 && a3 == L4 && b0 == L4 &&
             b1 == L4 && b2 == L4 && b3 == L4;
    return ok ? 0 : -1;
}

/* Inverse of cg4_code: words in [sum nw] (chunk j's K words then V words, nw [nch, 2]) with rho, amax
   [nch, 2, C] -> sym [nch] blocks of [2, C, len_j]. Returns 0, -1 corrupted (or the counts do not add up to
   nwords), -3 out of memory. */
int64_t cg4_uncode(const uint16_t *in, int64_t nwords, int64_t C, int64_t nch, const int64_t *bounds,
                   const int64_t *nw, const uint8_t *rho, const uint8_t *amax, int64_t mid, const int64_t *wsym,
                   uint8_t *sym) {
    int64_t pos = 0, rc = 0;
    for (int64_t j = 0; j < nch && rc == 0; j++) {
        int64_t len = bounds[j + 1] - bounds[j], n0 = nw[2 * j], n1 = nw[2 * j + 1];
        if (n0 < 0 || n1 < 0 || pos + n0 + n1 > nwords) return -1;
        rc = uncode4(in + pos, n0, in + pos + n0, n1, len, C, rho + j * 2 * C, amax + j * 2 * C, mid, wsym,
                     sym + 2 * C * bounds[j]);
        pos += n0 + n1;
    }
    return rc == 0 && pos != nwords ? -1 : rc;
}

/* The CPU decoder of one layer: as cg4_uncode, then y0, y1 [C, T] fp32 = centre + (sym - mid) step with
   centre, step [nch, 2, C]. Returns as cg4_uncode. */
CG_HOT int64_t cg4_decode(const uint16_t *in, int64_t nwords, int64_t C, int64_t T, int64_t nch,
                          const int64_t *bounds, const int64_t *nw, const uint8_t *rho, const uint8_t *amax,
                          const float *centre, const float *step, int64_t mid, const int64_t *wsym, float *y0,
                          float *y1) {
    int64_t most = 0, pos = 0, rc = 0;
    for (int64_t j = 0; j < nch; j++) most = bounds[j + 1] - bounds[j] > most ? bounds[j + 1] - bounds[j] : most;
    uint8_t *sym = malloc((size_t)(2 * C * most));
    if (!sym) return -3;
    for (int64_t j = 0; j < nch && rc == 0; j++) {
        int64_t a = bounds[j], len = bounds[j + 1] - a, n0 = nw[2 * j], n1 = nw[2 * j + 1];
        if (n0 < 0 || n1 < 0 || pos + n0 + n1 > nwords) {
            rc = -1;
            break;
        }
        rc = uncode4(in + pos, n0, in + pos + n0, n1, len, C, rho + j * 2 * C, amax + j * 2 * C, mid, wsym, sym);
        pos += n0 + n1;
        for (int64_t p = 0; p < 2 && rc == 0; p++)
            for (int64_t c = 0; c < C; c++) {
                const uint8_t *s = sym + (p * C + c) * len;
                float *y = (p ? y1 : y0) + c * T + a;
                const float ce = centre[(j * 2 + p) * C + c], st = step[(j * 2 + p) * C + c], m = (float)mid;
#pragma omp simd
                for (int64_t t = 0; t < len; t++) y[t] = ce + ((float)s[t] - m) * st;
            }
    }
    free(sym);
    return rc == 0 && pos != nwords ? -1 : rc;
}

/* ---- the transform's RoPE step (cachegen format v4 un-rotates keys before its transform) ---- */

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
