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

/* CG_EXACT: no fused multiply-add (engine.cbuild builds with -march=native): for arithmetic that must round as
   the Python or engine code it mirrors rounds. */
#if defined(__GNUC__) && !defined(__clang__)
#define CG_EXACT __attribute__((optimize("fp-contract=off")))
#else
#define CG_EXACT
#endif

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

/* ---- discrete Laplace models (cachegen format v5) ----
   Symbols are q + mid, q in [-mid, mid] (n = 2 mid + 1), laid out component-major per part: [C, T],
   component c's T tokens contiguous (its decode table stays hot in L1 for T symbols). The coder is below
   ("format v5's coder"). Statistics, quantizer and encoder entry points carry target_clones (x86-64 baseline
   and x86-64-v3, chosen when the library loads); the rANS loops have an explicit AVX2 version (target
   attribute, chosen per call where the CPU has AVX2) and a portable scalar one. */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define CG_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CG_HOT
#endif

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
    /* wsym's rows are symmetric about mid and largest there only (weights floor(2^20 r^|q|), r < 1: see
       cachegen_klt._symbol_weights), so each |q| is computed once and the remainder goes to s = mid -- the
       same rows as a pass over every symbol of the support taking the first largest weight. */
    int64_t n = 2 * mid + 1, k = 2 * a + 1, lo = mid - a, hi = mid + a, total = 0, sum = 0;
    const int64_t *w = wsym + rho * n + mid; /* w[q], q >= 0 */
    for (int64_t q = 1; q <= a; q++) total += w[q];
    total = 2 * total + w[0];
    if (total < 1) total = 1;
    const double rcp = 1.0 / (double)total; /* floor(w K / total) by a reciprocal, corrected to exact */
    for (int64_t q = 0; q <= a; q++) {
        int64_t num = w[q] * ((int64_t)PROB_SCALE - k), fq = (int64_t)((double)num * rcp);
        fq += (fq + 1) * total <= num;
        fq -= fq * total > num;
        f[mid + q] = f[mid - q] = (uint32_t)(1 + fq);
        sum += (q ? 2 : 1) * (1 + fq);
    }
    f[mid] += (uint32_t)((int64_t)PROB_SCALE - sum);
    uint32_t run = 0;
    for (int64_t s = lo; s <= hi; s++) {
        cu[s] = run;
        if (lut) memset(lut + run, (int)s, f[s]);
        run += f[s];
    }
}

/* Tables of C components (rho, amax [C]): freq, cum [C, n] uint32 (whole rows); lut [C, PROB_SCALE] when
   not NULL. Returns 0, or -1 if some amax_c > mid. */
static void lap_row_fast(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *f, uint32_t *cu);

int64_t cg_lap_tables(const uint8_t *rho, const uint8_t *amax, int64_t C, int64_t mid, const int64_t *wsym,
                      uint32_t *freq, uint32_t *cum, uint8_t *lut, int64_t simd) {
    int64_t n = 2 * mid + 1;
    for (int64_t c = 0; c < C; c++) {
        int64_t a = amax[c];
        if (a > mid) return -1;
        uint32_t *f = freq + c * n, *cu = cum + c * n;
        if (simd && !lut) lap_row_fast(rho[c], a, mid, wsym, f, cu); /* the coders' rows (AVX2 where it runs) */
        else lap_row(rho[c], a, mid, wsym, f, cu, lut ? lut + c * PROB_SCALE : NULL);
        for (int64_t s = 0; s < n; s++)
            if (s < mid - a || s > mid + a) f[s] = 0, cu[s] = s < mid - a ? 0 : PROB_SCALE;
    }
    return 0;
}

/* ---- format v5's coder ----
   Each part (K, V) of a chunk is one rANS stream of uint16 words: 32-bit states in [L5, 2^31) with 16-bit
   renormalisation (at most one word per symbol), NS = 16 states per part. Component c's row of T symbols is
   coded token by token, token t by state t % 16 (every row starts at state 0); a row whose amax is 0 (one
   symbol of frequency PROB_SCALE) is not coded. Decode order, which defines the stream: rows ascending, tokens
   ascending; each decoder step reads its renormalisation word (if any) right after the previous step's. So a
   group of 16 tokens is two 8-lane vectors whose lanes read words in lane order: the AVX2 coder (gathers from a
   per-row table, one shuffle to renormalise 8 lanes) and the portable scalar coder produce and read the same
   words. Stream = the 16 final encoder states (low, high words; state 0 first), then the words in decode order.
   Decoders check that every word is used and the states end at L5. */

#define L5 (1u << 15)
#define NS 16

/* Encoder constants of one symbol: e1 = f | bias << 11 | shift << 23 (bias = cum, or cum + PROB_SCALE - 1
   when f = 1), rcp: q = floor(x / f) = (x rcp) >> 32 >> shift, exact for x < 2^31 (Alverson; f = 1: q = x - 1,
   folded into bias); emit 16 bits first when x >= f 2^20. */
static uint32_t g5_rcp[PROB_SCALE + 1], g5_shift[PROB_SCALE + 1];

__attribute__((constructor)) static void init_reciprocals5(void) {
    for (uint32_t f = 2; f <= PROB_SCALE; f++) {
        uint32_t s = 0;
        while (f > (1u << s)) s++;
        g5_rcp[f] = (uint32_t)(((1ull << (s + 31)) + f - 1) / f), g5_shift[f] = s - 1;
    }
    g5_rcp[1] = ~0u, g5_shift[1] = 0;
}

/* A row's encoder tables over symbols [mid - a, mid + a] (others unset: never read). */
static void enc5_row(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *scratch, uint32_t *e1,
                     uint32_t *rcp) {
    int64_t n = 2 * mid + 1;
    uint32_t *f = scratch, *cu = scratch + n;
    lap_row(rho, a, mid, wsym, f, cu, NULL);
    for (int64_t s = mid - a; s <= mid + a; s++) {
        uint32_t fs = f[s], bias = fs < 2 ? cu[s] + PROB_SCALE - 1 : cu[s];
        e1[s] = fs | bias << 11 | g5_shift[fs] << 23;
        rcp[s] = g5_rcp[fs];
    }
}

/* A row's decode table: slot -> sym << 22 | cum << 11 | f (f, cum < 2^11: amax >= 1 means >= 3 symbols). */
static void dec5_row(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *scratch, uint32_t *tab) {
    int64_t n = 2 * mid + 1;
    uint32_t *f = scratch, *cu = scratch + n;
    lap_row(rho, a, mid, wsym, f, cu, NULL);
    for (int64_t s = mid - a; s <= mid + a; s++) {
        const uint32_t fs = f[s], c = cu[s], e = (uint32_t)s << 22 | c << 11 | fs; /* locals: see dec5_row_avx2 */
        uint32_t *p = tab + c;
        for (uint32_t i = 0; i < fs; i++) p[i] = e;
    }
}

/* One scalar encoder step: words go down from out[w]. */
static inline void enc5_step(uint32_t *x, uint32_t e1, uint32_t rcp, uint16_t *out, int64_t *w) {
    uint32_t f = e1 & 0x7FF, xx = *x, emit = xx >= (f << 20);
    out[*w - 1] = (uint16_t)xx;
    *w -= emit;
    xx >>= emit << 4;
    uint32_t q = (uint32_t)(((uint64_t)xx * rcp) >> 32) >> (e1 >> 23);
    *x = xx + ((e1 >> 11) & 0xFFF) + q * (PROB_SCALE - f);
}

/* Scalar encode of row tokens [t0, t1) of a part, descending (the decoder's order reversed). */
static void enc5_scalar(const uint32_t *e1, const uint32_t *rcp, const uint8_t *s, int64_t t0, int64_t t1,
                        uint32_t *x, uint16_t *out, int64_t *w) {
    for (int64_t t = t1 - 1; t >= t0; t--) enc5_step(&x[t & (NS - 1)], e1[s[t]], rcp[s[t]], out, w);
}

/* One scalar decoder step of state *x; CHECKED reads stay inside [0, nw) and flag bad. */
static inline uint32_t dec5_step(const uint32_t *tab, uint32_t *x, const uint16_t *in, int64_t *r, int64_t nw,
                                 int64_t *bad) {
    uint32_t xx = *x, slot = xx & (PROB_SCALE - 1), e = tab[slot];
    uint32_t y = (e & 0x7FF) * (xx >> PROB_BITS) + slot - ((e >> 11) & 0x7FF), need = y < L5;
    int64_t at = *r;
    *bad |= need & (at >= nw);
    at = at < nw ? at : nw - 1;
    uint32_t wd = in[at];
    *x = (y << (need << 4)) | (wd & (0u - need));
    *r += need;
    return e >> 22;
}

/* Scalar decode of row tokens [t0, t1) -> symbols (sym) or values centre + (s - mid) step (y). */
static void dec5_scalar(const uint32_t *tab, uint32_t *x, const uint16_t *in, int64_t *r, int64_t nw, int64_t *bad,
                        int64_t t0, int64_t t1, uint8_t *sym, float *y, float ce, float st, float m) {
    for (int64_t t = t0; t < t1; t++) {
        uint32_t s = dec5_step(tab, &x[t & (NS - 1)], in, r, nw, bad);
        if (y) y[t] = ce + ((float)s - m) * st;
        else sym[t] = (uint8_t)s;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CG_AVX2 __attribute__((target("avx2,popcnt")))
#define HAVE_AVX2_PATH 1

/* Shuffle tables (built once): g_cmp[m] (16 bytes): pshufb control moving the 16-bit words of lanes set in m
   to the top of 8 words, in lane order; g_exp[m] (8 bytes): for each lane, the rank of its word among the
   lanes set in m (vpermd indices). */
static uint8_t g_cmp[256][16], g_exp[256][8];

__attribute__((constructor)) static void init_shuffles(void) {
    for (int m = 0; m < 256; m++) {
        int cnt = __builtin_popcount((unsigned)m), k = 0;
        memset(g_cmp[m], 0x80, 16);
        for (int l = 0; l < 8; l++)
            if (m >> l & 1) {
                int j = 8 - cnt + k;
                g_cmp[m][2 * j] = (uint8_t)(2 * l), g_cmp[m][2 * j + 1] = (uint8_t)(2 * l + 1);
                g_exp[m][l] = (uint8_t)k++;
            } else {
                g_exp[m][l] = 0;
            }
    }
}

/* 8 lanes' encoder step (lanes of the vector in x, symbol indices idx). */
#define ENC5V(x, idx, E1, RCP, out, w)                                                                    \
    do {                                                                                                  \
        __m256i e1_ = _mm256_i32gather_epi32((const int *)(E1), (idx), 4);                                \
        __m256i rc_ = _mm256_i32gather_epi32((const int *)(RCP), (idx), 4);                               \
        __m256i f_ = _mm256_and_si256(e1_, _mm256_set1_epi32(0x7FF));                                     \
        __m256i em_ = _mm256_cmpgt_epi32((x), _mm256_sub_epi32(_mm256_slli_epi32(f_, 20), one));          \
        unsigned m_ = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(em_));                             \
        __m256i lo_ = _mm256_shuffle_epi8((x), pack16);                                                   \
        __m128i wd_ = _mm256_castsi256_si128(_mm256_permute4x64_epi64(lo_, 0x08));                        \
        wd_ = _mm_shuffle_epi8(wd_, _mm_loadu_si128((const __m128i *)g_cmp[m_]));                         \
        _mm_storeu_si128((__m128i *)((out) + (w) - 8), wd_);                                              \
        (w) -= __builtin_popcount(m_);                                                                    \
        (x) = _mm256_srlv_epi32((x), _mm256_and_si256(em_, sixteen));                                     \
        __m256i ev_ = _mm256_mul_epu32((x), rc_);                                                         \
        __m256i od_ = _mm256_mul_epu32(_mm256_srli_epi64((x), 32), _mm256_srli_epi64(rc_, 32));          \
        __m256i q_ = _mm256_blend_epi32(_mm256_srli_epi64(ev_, 32), od_, 0xAA);                           \
        q_ = _mm256_srlv_epi32(q_, _mm256_srli_epi32(e1_, 23));                                           \
        __m256i b_ = _mm256_and_si256(_mm256_srli_epi32(e1_, 11), _mm256_set1_epi32(0xFFF));              \
        (x) = _mm256_add_epi32(_mm256_add_epi32((x), b_),                                                 \
                               _mm256_mullo_epi32(q_, _mm256_sub_epi32(_mm256_set1_epi32(PROB_SCALE), f_))); \
    } while (0)

#define IDX8(s) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(s)))

/* Encode rows of two parts side by side (np = 2) or one (np = 1): part p's symbols s[p] [T], tables E1[p],
   RCP[p], states x[p] [NS], words down from out[p][w[p]]. */
CG_AVX2 static void enc5_avx2(int np, const uint8_t *const *s, const uint32_t *const *E1, const uint32_t *const *RCP,
                              int64_t T, uint32_t **x, uint16_t **out, int64_t *w) {
    const __m256i one = _mm256_set1_epi32(1), sixteen = _mm256_set1_epi32(16);
    const __m256i pack16 = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5,
                                            8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    int64_t full = T & ~(int64_t)(NS - 1);
    for (int p = 0; p < np; p++) enc5_scalar(E1[p], RCP[p], s[p], full, T, x[p], out[p], &w[p]);
    if (full == 0) return;
    __m256i a0 = _mm256_loadu_si256((const __m256i *)x[0]), a1 = _mm256_loadu_si256((const __m256i *)(x[0] + 8));
    int64_t wa = w[0];
    if (np == 2) {
        __m256i b0 = _mm256_loadu_si256((const __m256i *)x[1]), b1 = _mm256_loadu_si256((const __m256i *)(x[1] + 8));
        int64_t wb = w[1];
        for (int64_t t = full - NS; t >= 0; t -= NS) {
            ENC5V(a1, IDX8(s[0] + t + 8), E1[0], RCP[0], out[0], wa);
            ENC5V(b1, IDX8(s[1] + t + 8), E1[1], RCP[1], out[1], wb);
            ENC5V(a0, IDX8(s[0] + t), E1[0], RCP[0], out[0], wa);
            ENC5V(b0, IDX8(s[1] + t), E1[1], RCP[1], out[1], wb);
        }
        _mm256_storeu_si256((__m256i *)x[1], b0), _mm256_storeu_si256((__m256i *)(x[1] + 8), b1);
        w[1] = wb;
    } else {
        for (int64_t t = full - NS; t >= 0; t -= NS) {
            ENC5V(a1, IDX8(s[0] + t + 8), E1[0], RCP[0], out[0], wa);
            ENC5V(a0, IDX8(s[0] + t), E1[0], RCP[0], out[0], wa);
        }
    }
    _mm256_storeu_si256((__m256i *)x[0], a0), _mm256_storeu_si256((__m256i *)(x[0] + 8), a1);
    w[0] = wa;
}

/* 8 lanes' decoder step: x (state vector), table TAB; reads words from in + r (8 readable words there). */
#define DEC5V(x, TAB, in, r, dst_f, dst_s, ce, st)                                                       \
    do {                                                                                                 \
        __m256i sl_ = _mm256_and_si256((x), slotm);                                                      \
        __m256i e_ = _mm256_i32gather_epi32((const int *)(TAB), sl_, 4);                                 \
        __m256i f_ = _mm256_and_si256(e_, m11);                                                          \
        __m256i c_ = _mm256_and_si256(_mm256_srli_epi32(e_, 11), m11);                                   \
        __m256i y_ = _mm256_add_epi32(_mm256_mullo_epi32(f_, _mm256_srli_epi32((x), PROB_BITS)),          \
                                      _mm256_sub_epi32(sl_, c_));                                        \
        __m256i nd_ = _mm256_cmpgt_epi32(lim, y_);                                                       \
        unsigned m_ = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(nd_));                            \
        __m256i wd_ = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((in) + (r))));              \
        wd_ = _mm256_permutevar8x32_epi32(wd_, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)g_exp[m_]))); \
        (x) = _mm256_blendv_epi8(y_, _mm256_or_si256(_mm256_slli_epi32(y_, 16), wd_), nd_);               \
        (r) += __builtin_popcount(m_);                                                                   \
        __m256i sy_ = _mm256_srli_epi32(e_, 22);                                                         \
        if (dst_f)                                                                                       \
            _mm256_storeu_ps((dst_f), _mm256_add_ps((ce), _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sy_, midv)), (st)))); \
        else                                                                                             \
            { /* lane half 0's symbols in bytes 0-3, half 1's in bytes 4-7 */                        \
                __m256i p_ = _mm256_shuffle_epi8(sy_, pack8);                                            \
                _mm_storel_epi64((__m128i *)(dst_s), _mm_or_si128(_mm256_castsi256_si128(p_),            \
                                                                  _mm256_extracti128_si256(p_, 1)));     \
            }                                                                                            \
    } while (0)

/* Decode one row of up to two parts side by side: part p reads in[p] from r[p] (< nw[p]), state x[p], table
   tab[p] -> y[p] (values, centre ce[p], step st[p]) or sym[p]. Vector steps while 16 words from r[p] are
   readable memory (rd[p] >= nw[p]: what follows the part's own words in the caller's buffer; a valid stream
   never consumes past nw[p], and a corrupted one that does fails the caller's final count check); the rest of
   the row scalar (checked against nw). */
CG_AVX2 static void dec5_avx2(int np, const uint32_t *const *tab, uint32_t **x, const uint16_t *const *in, int64_t *r,
                              const int64_t *nw, const int64_t *rd, int64_t *bad, int64_t T, uint8_t **sym, float **y,
                              const float *ce, const float *st, int64_t mid) {
    const __m256i slotm = _mm256_set1_epi32(PROB_SCALE - 1), m11 = _mm256_set1_epi32(0x7FF);
    const __m256i lim = _mm256_set1_epi32(L5), midv = _mm256_set1_epi32((int)mid);
    const __m256i pack8 = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                           -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1);
    int64_t full = T & ~(int64_t)(NS - 1), t = 0;
    __m256i a0 = _mm256_loadu_si256((const __m256i *)x[0]), a1 = _mm256_loadu_si256((const __m256i *)(x[0] + 8));
    __m256 cea = _mm256_set1_ps(ce[0]), sta = _mm256_set1_ps(st[0]);
    float *ya = y ? y[0] : NULL;
    uint8_t *sa = y ? NULL : sym[0];
    int64_t ra = r[0];
    if (np == 2) {
        __m256i b0 = _mm256_loadu_si256((const __m256i *)x[1]), b1 = _mm256_loadu_si256((const __m256i *)(x[1] + 8));
        __m256 ceb = _mm256_set1_ps(ce[1]), stb = _mm256_set1_ps(st[1]);
        float *yb = y ? y[1] : NULL;
        uint8_t *sb = y ? NULL : sym[1];
        int64_t rb = r[1];
        for (; t < full && ra + NS <= rd[0] && rb + NS <= rd[1]; t += NS) {
            DEC5V(a0, tab[0], in[0], ra, ya ? ya + t : NULL, sa + t, cea, sta);
            DEC5V(b0, tab[1], in[1], rb, yb ? yb + t : NULL, sb + t, ceb, stb);
            DEC5V(a1, tab[0], in[0], ra, ya ? ya + t + 8 : NULL, sa + t + 8, cea, sta);
            DEC5V(b1, tab[1], in[1], rb, yb ? yb + t + 8 : NULL, sb + t + 8, ceb, stb);
        }
        _mm256_storeu_si256((__m256i *)x[1], b0), _mm256_storeu_si256((__m256i *)(x[1] + 8), b1);
        r[1] = rb;
    } else {
        for (; t < full && ra + NS <= rd[0]; t += NS) {
            DEC5V(a0, tab[0], in[0], ra, ya ? ya + t : NULL, sa + t, cea, sta);
            DEC5V(a1, tab[0], in[0], ra, ya ? ya + t + 8 : NULL, sa + t + 8, cea, sta);
        }
    }
    _mm256_storeu_si256((__m256i *)x[0], a0), _mm256_storeu_si256((__m256i *)(x[0] + 8), a1);
    r[0] = ra;
    for (int p = 0; p < np; p++)
        dec5_scalar(tab[p], x[p], in[p], &r[p], nw[p], bad, t, T, sym ? sym[p] : NULL, y ? y[p] : NULL, ce[p], st[p],
                    (float)mid);
}

/* The weights of the rows' magnitudes, the library's own compact copy for the AVX2 builders: floor(2^20 r^q),
   q <= 127 (int32; rows are symmetric about mid = 127), computed as cachegen_klt._laplace_weights computes
   them (the same IEEE double products; cg5_check_weights compares the copies once). Half a row of 512 bytes,
   not 2 KiB of int64: the tables of a layer read far less memory. */
#define WQ 128
static int32_t g_wq[256][WQ];

CG_EXACT __attribute__((constructor)) static void init_weights5(void) {
    double one_minus_r = 1.0;
    for (int rho = 0; rho < 256; rho++) {
        double r = 1.0 - one_minus_r, p = (double)(1 << 20);
        for (int m = 0; m < WQ; m++) {
            g_wq[rho][m] = (int32_t)p;
            p *= r;
        }
        one_minus_r *= 0.9785720620877001; /* cachegen_klt._RHO_BASE */
    }
}

/* 1 when wsym [256, 2 mid + 1] (the caller's weights by symbol) is this library's copy, mid = 127. */
int64_t cg5_check_weights(const int64_t *wsym, int64_t mid) {
    if (mid != WQ - 1) return 0;
    for (int64_t rho = 0; rho < 256; rho++)
        for (int64_t q = 0; q <= mid; q++)
            if (wsym[rho * (2 * mid + 1) + mid + q] != g_wq[rho][q] || wsym[rho * (2 * mid + 1) + mid - q] != g_wq[rho][q])
                return 0;
    return 1;
}

/* lap_row (without lut) in AVX2: the same rows. Frequencies by exact division, 4 magnitudes per vector: w < 2^21
   and K < 2^11, so w K < 2^31 is exact in int32 and double, and the correctly rounded quotient of two integers
   (total < 2^28, quotient < 2^11) never crosses an integer the true quotient does not reach, so truncating it
   is floor(w K / total), what lap_row's reciprocal and corrections compute. cum by 8-lane prefix sums. */
CG_AVX2 static void lap_row_avx2(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *f,
                                 uint32_t *cu) {
    if (mid != WQ - 1) { /* the compact weights are for mid = 127 (QMAX) only */
        lap_row(rho, a, mid, wsym, f, cu, NULL);
        return;
    }
    int64_t lo = mid - a, k = 2 * a + 1, total = 0, q = 1;
    const int32_t *w = g_wq[rho]; /* w[q], 0 <= q <= a <= 127 */
    __m256i tv = _mm256_setzero_si256(); /* sum < 128 2^20: int32 */
    for (; q + 7 <= a; q += 8) tv = _mm256_add_epi32(tv, _mm256_loadu_si256((const __m256i *)(w + q)));
    int32_t part[8];
    _mm256_storeu_si256((__m256i *)part, tv);
    for (int i = 0; i < 8; i++) total += part[i];
    for (; q <= a; q++) total += w[q];
    total = 2 * total + w[0];
    if (total < 1) total = 1;
    const __m256d tot = _mm256_set1_pd((double)total);
    const __m128i kk = _mm_set1_epi32((int)((int64_t)PROB_SCALE - k)), one = _mm_set1_epi32(1);
    __m128i acc = _mm_setzero_si128();
    for (q = 0; q + 3 <= a; q += 4) {
        __m128i w32 = _mm_loadu_si128((const __m128i *)(w + q));
        __m128i fq = _mm256_cvttpd_epi32(_mm256_div_pd(_mm256_cvtepi32_pd(_mm_mullo_epi32(w32, kk)), tot));
        __m128i fv = _mm_add_epi32(fq, one);
        _mm_storeu_si128((__m128i *)(f + mid + q), fv);
        _mm_storeu_si128((__m128i *)(f + mid - q - 3), _mm_shuffle_epi32(fv, 0x1B)); /* mirrored */
        acc = _mm_add_epi32(acc, fv);
    }
    int64_t sum = 0;
    for (; q <= a; q++) {
        int64_t fq = (int64_t)((double)((int64_t)w[q] * ((int64_t)PROB_SCALE - k)) / (double)total);
        f[mid + q] = f[mid - q] = (uint32_t)(1 + fq);
        sum += 1 + fq;
    }
    uint32_t lanes[4];
    _mm_storeu_si128((__m128i *)lanes, acc);
    sum += (int64_t)lanes[0] + lanes[1] + lanes[2] + lanes[3];
    sum = 2 * sum - f[mid]; /* every magnitude twice, q = 0 once */
    f[mid] += (uint32_t)((int64_t)PROB_SCALE - sum);
    __m256i carry = _mm256_setzero_si256();
    const __m256i last = _mm256_set1_epi32(7);
    int64_t s = lo;
    for (; s + 8 <= lo + k; s += 8) { /* exclusive prefix sums of f[lo..] */
        __m256i x = _mm256_loadu_si256((const __m256i *)(f + s)), y = x;
        y = _mm256_add_epi32(y, _mm256_slli_si256(y, 4));
        y = _mm256_add_epi32(y, _mm256_slli_si256(y, 8));
        y = _mm256_add_epi32(y, _mm256_shuffle_epi32(_mm256_permute2x128_si256(y, y, 0x08), 0xFF));
        y = _mm256_add_epi32(y, carry);
        _mm256_storeu_si256((__m256i *)(cu + s), _mm256_sub_epi32(y, x));
        carry = _mm256_permutevar8x32_epi32(y, last);
    }
    uint32_t run = (uint32_t)_mm256_cvtsi256_si32(carry);
    for (; s < lo + k; s++) cu[s] = run, run += f[s];
}

/* enc5_row in AVX2: the same e1, rcp over [mid - a, mid + a], 8 symbols per vector (table lookups by gather). */
CG_AVX2 static void enc5_row_avx2(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *scratch,
                                  uint32_t *e1, uint32_t *rcp) {
    int64_t n = 2 * mid + 1, s = mid - a;
    uint32_t *f = scratch, *cu = scratch + n;
    lap_row_avx2(rho, a, mid, wsym, f, cu);
    const __m256i two = _mm256_set1_epi32(2), bias1 = _mm256_set1_epi32(PROB_SCALE - 1);
    for (; s + 8 <= mid + a + 1; s += 8) {
        __m256i fs = _mm256_loadu_si256((const __m256i *)(f + s)), c = _mm256_loadu_si256((const __m256i *)(cu + s));
        __m256i bias = _mm256_add_epi32(c, _mm256_and_si256(_mm256_cmpgt_epi32(two, fs), bias1)); /* f = 1 */
        __m256i sh = _mm256_i32gather_epi32((const int *)g5_shift, fs, 4);
        __m256i e = _mm256_or_si256(fs, _mm256_or_si256(_mm256_slli_epi32(bias, 11), _mm256_slli_epi32(sh, 23)));
        _mm256_storeu_si256((__m256i *)(e1 + s), e);
        _mm256_storeu_si256((__m256i *)(rcp + s), _mm256_i32gather_epi32((const int *)g5_rcp, fs, 4));
    }
    for (; s <= mid + a; s++) {
        uint32_t fs = f[s], bias = fs < 2 ? cu[s] + PROB_SCALE - 1 : cu[s];
        e1[s] = fs | bias << 11 | g5_shift[fs] << 23;
        rcp[s] = g5_rcp[fs];
    }
}

/* dec5_row with 8-entry stores: each symbol's run [cum, cum + f) written from its start in whole vectors, the
   overshoot overwritten by the next run (tab has 8 entries of padding past PROB_SCALE). The tails of frequency 1
   (the rows fall with |q| from the centre, so they are the ends of the support) are written 8 symbols per
   vector: entries there grow by one symbol and one slot per slot. */
CG_AVX2 static void dec5_row_avx2(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *scratch,
                                  uint32_t *tab) {
    int64_t n = 2 * mid + 1, lo = mid - a, hi = mid + a, s1 = lo, s2 = hi;
    uint32_t *f = scratch, *cu = scratch + n;
    lap_row_avx2(rho, a, mid, wsym, f, cu);
    while (s1 < mid && f[s1] == 1) s1++; /* [lo, s1) and (s2, hi]: frequency 1 */
    while (s2 > mid && f[s2] == 1) s2--;
    const __m256i step = _mm256_set1_epi32(1 << 22 | 1 << 11), ramp = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i ramp_e = _mm256_mullo_epi32(ramp, step);
    for (int64_t s = lo; s < s1; s += 8) { /* left tail: slots 0.. */
        __m256i e = _mm256_set1_epi32((int)((uint32_t)s << 22 | cu[s] << 11 | 1u));
        _mm256_storeu_si256((__m256i *)(tab + cu[s]), _mm256_add_epi32(e, ramp_e));
    }
    for (int64_t s = s1; s <= s2; s++) {
        const uint32_t fs = f[s], c = cu[s];
        __m256i e = _mm256_set1_epi32((int)((uint32_t)s << 22 | c << 11 | fs));
        uint32_t *p = tab + c;
        for (uint32_t i = 0; i < fs; i += 8) _mm256_storeu_si256((__m256i *)(p + i), e);
    }
    for (int64_t s = s2 + 1; s <= hi; s += 8) { /* right tail: up to PROB_SCALE (+ padding) */
        __m256i e = _mm256_set1_epi32((int)((uint32_t)s << 22 | cu[s] << 11 | 1u));
        _mm256_storeu_si256((__m256i *)(tab + cu[s]), _mm256_add_epi32(e, ramp_e));
    }
}

static int cpu_avx2(void) {
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    }
    return v;
}
#else
#define HAVE_AVX2_PATH 0
static int cpu_avx2(void) { return 0; }
#endif

static void lap_row_fast(int64_t rho, int64_t a, int64_t mid, const int64_t *wsym, uint32_t *f, uint32_t *cu) {
#if HAVE_AVX2_PATH
    if (cpu_avx2()) {
        lap_row_avx2(rho, a, mid, wsym, f, cu);
        return;
    }
#endif
    lap_row(rho, a, mid, wsym, f, cu, NULL);
}

/* 1 when the AVX2 coder can run on this CPU (the `simd` arguments below then select it). */
int64_t cg5_simd_available(void) { return cpu_avx2(); }

/* Code a chunk's parts' symbols sym [2, C, T] (every |q| <= amax of its component; rho, amax [2C]) into dst
   (room for 2 (T C + 40) words: K's words, then V's right after). tmp: scratch of 2 (T C + 40) words. nw[2]
   gets the word counts. Returns 0, or -3 out of memory. */
static int64_t code5(const uint8_t *sym, int64_t T, int64_t C, const uint8_t *rho, const uint8_t *amax, int64_t mid,
                     const int64_t *wsym, uint16_t *tmp, uint16_t *dst, int64_t *nw, int simd) {
    int64_t n = 2 * mid + 1, cap = T * C + 40;
    uint32_t *buf = malloc(sizeof(uint32_t) * (size_t)(6 * n));
    if (!buf) return -3;
    uint32_t *scratch = buf, *e1[2] = {buf + 2 * n, buf + 3 * n}, *rc[2] = {buf + 4 * n, buf + 5 * n};
    uint32_t st[2][NS];
    for (int i = 0; i < NS; i++) st[0][i] = st[1][i] = L5;
    uint16_t *out[2] = {tmp, tmp + cap};
    int64_t w[2] = {cap, cap};
    for (int64_t c = C - 1; c >= 0; c--) { /* the decoder's order reversed */
        int parts[2], np = 0;
        for (int p = 1; p >= 0; p--) /* V's rows are the last K/V pair read by nothing in between: any order */
            if (amax[p * C + c]) parts[np++] = p;
        const uint8_t *s[2];
        const uint32_t *E1[2], *RC[2];
        uint32_t *xs[2];
        uint16_t *os[2];
        int64_t ws[2];
        for (int i = 0; i < np; i++) {
            int p = parts[i];
#if HAVE_AVX2_PATH
            if (simd) enc5_row_avx2(rho[p * C + c], amax[p * C + c], mid, wsym, scratch, e1[i], rc[i]);
            else
#endif
                enc5_row(rho[p * C + c], amax[p * C + c], mid, wsym, scratch, e1[i], rc[i]);
            s[i] = sym + (p * C + c) * T, E1[i] = e1[i], RC[i] = rc[i], xs[i] = st[p], os[i] = out[p], ws[i] = w[p];
        }
#if HAVE_AVX2_PATH
        if (simd && np) enc5_avx2(np, s, E1, RC, T, xs, os, ws);
        else
#endif
            for (int i = 0; i < np; i++) enc5_scalar(E1[i], RC[i], s[i], 0, T, xs[i], os[i], &ws[i]);
        for (int i = 0; i < np; i++) w[parts[i]] = ws[i];
    }
    free(buf);
    int64_t pos = 0;
    for (int p = 0; p < 2; p++) {
        for (int j = NS - 1; j >= 0; j--) {
            out[p][--w[p]] = (uint16_t)(st[p][j] >> 16);
            out[p][--w[p]] = (uint16_t)st[p][j];
        }
        nw[p] = cap - w[p];
        memcpy(dst + pos, out[p] + w[p], (size_t)nw[p] * 2);
        pos += nw[p];
    }
    return 0;
}

/* Inverse of code5 for one chunk: words in0[nw0], in1[nw1] (rd0 >= nw0, rd1 >= nw1 words readable from each)
   -> sym [2, C, T] (y == NULL) or values y0/y1 rows + t0 (row c of part p at yp + c * ld + t0) = centre + (sym -
   mid) step. Returns 0, -1 corrupted, -3 out of memory. */
static int64_t uncode5(const uint16_t *in0, int64_t nw0, int64_t rd0, const uint16_t *in1, int64_t nw1, int64_t rd1,
                       int64_t T, int64_t C,
                       const uint8_t *rho, const uint8_t *amax, int64_t mid, const int64_t *wsym, uint8_t *sym,
                       float *y0, float *y1, int64_t ld, const float *centre, const float *step, int simd) {
    int64_t n = 2 * mid + 1;
    if (nw0 < 2 * NS || nw1 < 2 * NS) return -1;
    for (int64_t c = 0; c < 2 * C; c++)
        if (amax[c] > mid) return -1;
    uint32_t *buf = malloc(sizeof(uint32_t) * (size_t)(2 * n + 2 * (PROB_SCALE + 8)));
    if (!buf) return -3;
    uint32_t *scratch = buf, *tb[2] = {buf + 2 * n, buf + 2 * n + PROB_SCALE + 8};
    const uint16_t *ins[2] = {in0, in1};
    int64_t nws[2] = {nw0, nw1}, rds[2] = {rd0, rd1}, rr[2] = {2 * NS, 2 * NS}, bad = 0;
    uint32_t st[2][NS];
    for (int p = 0; p < 2; p++)
        for (int j = 0; j < NS; j++) {
            st[p][j] = (uint32_t)ins[p][2 * j] | (uint32_t)ins[p][2 * j + 1] << 16;
            bad |= st[p][j] < L5 || st[p][j] >> 31; /* not a state the encoder ends in */
        }
    for (int64_t c = 0; c < C && !bad; c++) {
        int parts[2], np = 0;
        for (int p = 0; p < 2; p++)
            if (amax[p * C + c]) parts[np++] = p;
        const uint32_t *tab[2];
        uint32_t *xs[2];
        const uint16_t *is[2];
        int64_t rs[2], ns[2], ds[2];
        uint8_t *ss[2];
        float *ys[2], ce[2], sp[2];
        for (int i = 0; i < np; i++) {
            int p = parts[i];
#if HAVE_AVX2_PATH
            if (simd) dec5_row_avx2(rho[p * C + c], amax[p * C + c], mid, wsym, scratch, tb[i]);
            else
#endif
                dec5_row(rho[p * C + c], amax[p * C + c], mid, wsym, scratch, tb[i]);
            tab[i] = tb[i], xs[i] = st[p], is[i] = ins[p], rs[i] = rr[p], ns[i] = nws[p], ds[i] = rds[p];
            ss[i] = sym ? sym + (p * C + c) * T : NULL;
            ys[i] = y0 ? (p ? y1 : y0) + c * ld : NULL;
            ce[i] = centre ? centre[p * C + c] : 0, sp[i] = step ? step[p * C + c] : 0;
        }
#if HAVE_AVX2_PATH
        if (simd && np) dec5_avx2(np, tab, xs, is, rs, ns, ds, &bad, T, y0 ? NULL : ss, y0 ? ys : NULL, ce, sp, mid);
        else
#endif
            for (int i = 0; i < np; i++)
                dec5_scalar(tab[i], xs[i], is[i], &rs[i], ns[i], &bad, 0, T, ss[i], ys[i], ce[i], sp[i], (float)mid);
        for (int i = 0; i < np; i++) rr[parts[i]] = rs[i];
        if (y0) /* rows not coded (amax 0): every value is the centre */
            for (int p = 0; p < 2; p++)
                if (!amax[p * C + c])
                    for (int64_t t = 0; t < T; t++) (p ? y1 : y0)[c * ld + t] = centre[p * C + c];
        if (sym)
            for (int p = 0; p < 2; p++)
                if (!amax[p * C + c]) memset(sym + (p * C + c) * T, (int)mid, (size_t)T);
    }
    free(buf);
    int ok = !bad && rr[0] == nw0 && rr[1] == nw1;
    for (int p = 0; p < 2; p++)
        for (int j = 0; j < NS; j++) ok &= st[p][j] == L5;
    return ok ? 0 : -1;
}

/* Per-component mean, min and max of each chunk's rows: y0, y1 [C, T] fp32 (K's and V's transformed rows),
   chunk j = tokens [bounds[j], bounds[j + 1]) -> stats [nch, 2, 3, C] (mean, lo, hi). Returns 0, or -4 if
   some value is not finite. */
CG_HOT static int64_t stats_ld(const float *y0, const float *y1, int64_t C, int64_t ld, int64_t nch,
                                const int64_t *bounds, float *stats) { /* rows ld >= T apart */
    for (int64_t j = 0; j < nch; j++)
        for (int64_t p = 0; p < 2; p++) {
            float *mean = stats + (j * 2 + p) * 3 * C, *lo = mean + C, *hi = lo + C;
            int64_t a = bounds[j], len = bounds[j + 1] - a;
            for (int64_t c = 0; c < C; c++) {
                const float *row = (p ? y1 : y0) + c * ld + a;
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

int64_t cg4_stats(const float *y0, const float *y1, int64_t C, int64_t T, int64_t nch, const int64_t *bounds,
                  float *stats) {
    return stats_ld(y0, y1, C, T, nch, bounds, stats);
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

#if HAVE_AVX2_PATH
/* quant4_row in AVX2, 32 values a step: the same IEEE operations per value (y - centre, times 1 / step,
   rounded to nearest even, clamped; no FMA), so the same symbols, sum and top. */
__attribute__((target("avx2"))) static void quant4_row_avx2(const float *y, int64_t len, float centre, float step,
                                                            int64_t mid, uint8_t *sym, int64_t *sum_out,
                                                            int64_t *top_out) {
    const float inv = 1.0f / step, lim = (float)mid;
    const __m256 vc = _mm256_set1_ps(centre), vi = _mm256_set1_ps(inv), hi = _mm256_set1_ps(lim),
                 lo = _mm256_set1_ps(-lim);
    const __m256i off = _mm256_set1_epi32((int)mid), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i vsum = _mm256_setzero_si256(), vtop = _mm256_setzero_si256();
    int64_t t = 0;
    for (; t + 32 <= len; t += 32) {
        __m256i q[4];
        for (int j = 0; j < 4; j++) {
            __m256 x = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(y + t + 8 * j), vc), vi);
            x = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
            __m256i qi = _mm256_cvttps_epi32(x), a = _mm256_abs_epi32(qi);
            vsum = _mm256_add_epi32(vsum, a), vtop = _mm256_max_epi32(vtop, a);
            q[j] = _mm256_add_epi32(qi, off); /* 0 .. 2 mid <= 254 */
        }
        __m256i w = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(sym + t), _mm256_permutevar8x32_epi32(w, order));
    }
    int32_t s8[8], m8[8];
    _mm256_storeu_si256((__m256i *)s8, vsum), _mm256_storeu_si256((__m256i *)m8, vtop);
    int32_t sum = 0, top = 0;
    for (int j = 0; j < 8; j++) sum += s8[j], top = m8[j] > top ? m8[j] : top;
    for (; t < len; t++) {
        float q = rintf((y[t] - centre) * inv);
        q = q < -lim ? -lim : q > lim ? lim : q;
        int32_t a = (int32_t)fabsf(q);
        sym[t] = (uint8_t)(int32_t)(q + (float)mid);
        sum += a;
        top = a > top ? a : top;
    }
    *sum_out = sum, *top_out = top;
}
#endif

/* The CPU encoder of one layer: y0, y1 [C, T] fp32 (K's and V's rows), chunk j = tokens [bounds[j],
   bounds[j + 1]) quantized with centre, step [nch, 2, C] (step > 0), each component's Laplace model fitted
   (rho, amax [nch, 2, C] written) and both parts coded (code5; simd: the AVX2 coder where the CPU has it). out:
   room for sum_j 2 (len_j C + 40) words; chunk j's K words then V words, nw [nch, 2] their counts. Returns 0, or
   -3 out of memory. */
CG_HOT static int64_t encode_ld(const float *y0, const float *y1, int64_t C, int64_t ld, int64_t nch,
                                 const int64_t *bounds, const float *centre, const float *step, int64_t mid,
                                 const int64_t *wsym, uint8_t *rho, uint8_t *amax, uint16_t *out, int64_t *nw,
                                 int64_t simd) { /* rows ld >= T apart */
    int64_t most = 0;
    for (int64_t j = 0; j < nch; j++) most = bounds[j + 1] - bounds[j] > most ? bounds[j + 1] - bounds[j] : most;
    uint8_t *sym = malloc((size_t)(2 * C * most + 16));
    uint16_t *tmp = malloc(sizeof(uint16_t) * (size_t)(2 * (most * C + 40)));
    int64_t rc = sym && tmp ? 0 : -3, pos = 0;
    int use = simd && cpu_avx2();
    for (int64_t j = 0; j < nch && rc == 0; j++) {
        int64_t a = bounds[j], len = bounds[j + 1] - a;
        for (int64_t p = 0; p < 2; p++)
            for (int64_t c = 0; c < C; c++) {
                int64_t i = (j * 2 + p) * C + c, sum, top;
                const float *row = (p ? y1 : y0) + c * ld + a;
#if HAVE_AVX2_PATH
                if (use)
                    quant4_row_avx2(row, len, centre[i], step[i], mid, sym + (p * C + c) * len, &sum, &top);
                else
#endif
                    quant4_row(row, len, centre[i], step[i], mid, sym + (p * C + c) * len, &sum, &top);
                lap_fit(sum, top, len, rho + i, amax + i);
            }
        rc = code5(sym, len, C, rho + j * 2 * C, amax + j * 2 * C, mid, wsym, tmp, out + pos, nw + 2 * j, use);
        pos += nw[2 * j] + nw[2 * j + 1];
    }
    free(sym);
    free(tmp);
    return rc;
}

int64_t cg5_encode(const float *y0, const float *y1, int64_t C, int64_t T, int64_t nch, const int64_t *bounds,
                   const float *centre, const float *step, int64_t mid, const int64_t *wsym, uint8_t *rho,
                   uint8_t *amax, uint16_t *out, int64_t *nw, int64_t simd) {
    return encode_ld(y0, y1, C, T, nch, bounds, centre, step, mid, wsym, rho, amax, out, nw, simd);
}

/* Fit and code symbols already quantized (e.g. on a GPU): sym [nch] blocks of [2, C, len_j] back to back ->
   rho, amax, out, nw as cg5_encode. Returns 0, -2 a symbol > 2 mid, -3 out of memory. */
int64_t cg5_code(const uint8_t *sym, int64_t C, int64_t nch, const int64_t *bounds, int64_t mid,
                 const int64_t *wsym, uint8_t *rho, uint8_t *amax, uint16_t *out, int64_t *nw, int64_t simd) {
    int64_t most = 0, pos = 0, rc = 0;
    int use = simd && cpu_avx2();
    for (int64_t j = 0; j < nch; j++) most = bounds[j + 1] - bounds[j] > most ? bounds[j + 1] - bounds[j] : most;
    uint16_t *tmp = malloc(sizeof(uint16_t) * (size_t)(2 * (most * C + 40)));
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
        if (rc == 0)
            rc = code5(s, len, C, rho + j * 2 * C, amax + j * 2 * C, mid, wsym, tmp, out + pos, nw + 2 * j, use);
        pos += nw[2 * j] + nw[2 * j + 1];
    }
    free(tmp);
    return rc;
}

/* Inverse of cg5_code: words in [sum nw] (chunk j's K words then V words, nw [nch, 2]) with rho, amax
   [nch, 2, C] -> sym [nch] blocks of [2, C, len_j]. Returns 0, -1 corrupted (or the counts do not add up to
   nwords), -3 out of memory. */
int64_t cg5_uncode(const uint16_t *in, int64_t nwords, int64_t C, int64_t nch, const int64_t *bounds,
                   const int64_t *nw, const uint8_t *rho, const uint8_t *amax, int64_t mid, const int64_t *wsym,
                   uint8_t *sym, int64_t simd) {
    int64_t pos = 0, rc = 0;
    int use = simd && cpu_avx2();
    for (int64_t j = 0; j < nch && rc == 0; j++) {
        int64_t len = bounds[j + 1] - bounds[j], n0 = nw[2 * j], n1 = nw[2 * j + 1];
        if (n0 < 0 || n1 < 0 || pos + n0 + n1 > nwords) return -1;
        rc = uncode5(in + pos, n0, nwords - pos, in + pos + n0, n1, nwords - pos - n0, len, C, rho + j * 2 * C,
                     amax + j * 2 * C, mid, wsym, sym + 2 * C * bounds[j], NULL, NULL, 0, NULL, NULL, use);
        pos += n0 + n1;
    }
    return rc == 0 && pos != nwords ? -1 : rc;
}

/* The CPU decoder of one layer: as cg5_uncode, the values written straight into y0, y1 [C, T] fp32 (rows ld >= T
   apart) = centre + (sym - mid) step with centre, step [nch, 2, C]. avail >= nwords: words readable at in (a
   padded copy lets the last rows of the last part decode with vector steps). Returns as cg5_uncode. */
int64_t cg5_decode(const uint16_t *in, int64_t nwords, int64_t avail, int64_t C, int64_t T, int64_t nch, const int64_t *bounds,
                   const int64_t *nw, const uint8_t *rho, const uint8_t *amax, const float *centre,
                   const float *step, int64_t mid, const int64_t *wsym, float *y0, float *y1, int64_t ld,
                   int64_t simd) {
    int64_t pos = 0, rc = 0;
    int use = simd && cpu_avx2();
    for (int64_t j = 0; j < nch && rc == 0; j++) {
        int64_t a = bounds[j], len = bounds[j + 1] - a, n0 = nw[2 * j], n1 = nw[2 * j + 1];
        if (n0 < 0 || n1 < 0 || pos + n0 + n1 > nwords) return -1;
        rc = uncode5(in + pos, n0, avail - pos, in + pos + n0, n1, avail - pos - n0, len, C, rho + j * 2 * C,
                     amax + j * 2 * C, mid, wsym, NULL, y0 + a, y1 + a, ld, centre + j * 2 * C, step + j * 2 * C, use);
        pos += n0 + n1;
    }
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

/* ---- layer 0 from a per-vocabulary table (cachegen_l0, see layer0.py) ----
   tk, tv [vocab, H * D] fp32: layer 0's K before RoPE and its V, for every token id; ids [T] uint32; cos, sin
   rows of length ld >= D/2 (row t: position t, as cg_rope). Token t's K is row ids[t] of tk rotated to position
   t with cg_rope's arithmetic (sign +1, the engine's apply_rope: no fused multiply-add), its V row ids[t] of tv.
   No fused multiply-add (CG_EXACT; not CG_HOT): one would round differently from the engine's RoPE. */

CG_EXACT static inline void l0_token(const float *tk, const float *tv, int64_t H, int64_t D, const float *c, const float *sn,
                            float *ko, float *vo) {
    int64_t half = D / 2;
    for (int64_t h = 0; h < H; h++) {
        const float *restrict x1 = tk + h * D, *restrict x2 = x1 + half;
        float *restrict o1 = ko + h * D, *restrict o2 = o1 + half;
#pragma omp simd /* each lane's arithmetic as the scalar loop's: products rounded, then the sum (no FMA) */
        for (int64_t i = 0; i < half; i++) {
            float a = x1[i], b = x2[i], si = 1.0f * sn[i];
            o1[i] = a * c[i] - b * si;
            o2[i] = b * c[i] + a * si;
        }
    }
    memcpy(vo, tv, sizeof(float) * (size_t)(H * D));
}

/* The table rows token t + L0_AHEAD will read, requested now: the ids pick random rows of a table larger than
   the caches, so a loop that waits for each row in turn is bound by memory latency (right after a prefill, the
   check of 1024 tokens took 0.48 ms in place of 0.08 warm; with the rows requested ahead, 0.34). */
#define L0_AHEAD 8
static inline void l0_prefetch(const float *tk, const float *tv, const uint32_t *ids, int64_t t, int64_t T,
                               int64_t row) {
    if (t + L0_AHEAD >= T) return;
    const char *a = (const char *)(tk + ids[t + L0_AHEAD] * row), *b = (const char *)(tv + ids[t + L0_AHEAD] * row);
    for (int64_t off = 0; off < row * (int64_t)sizeof(float); off += 64)
        __builtin_prefetch(a + off), __builtin_prefetch(b + off);
}

static void to_f16(int use, const float *x, int64_t n, uint16_t *out);
static void from_f16(int use, const uint16_t *x, int64_t n, float *out);
#if defined(__x86_64__) && defined(__GNUC__)
static int cpu_f16c(void);
#define L0_F16C() cpu_f16c()
#else
#define L0_F16C() 0
#endif

/* -> k, v [T, H, D]: fp32, or fp16 bits (round to nearest even, as torch converts) when half. Returns 0, or -1
   if some id >= vocab (nothing is read out of the table), -3 out of memory. */
CG_EXACT int64_t cg_l0_gather(const float *tk, const float *tv, int64_t vocab, const uint32_t *ids, int64_t T, int64_t H,
                              int64_t D, const float *cos, const float *sin, int64_t ld, void *k, void *v, int64_t half) {
    int64_t row = H * D;
    for (int64_t t = 0; t < T; t++)
        if (ids[t] >= (uint64_t)vocab) return -1;
    for (int64_t t = -L0_AHEAD; t < 0; t++) l0_prefetch(tk, tv, ids, t, T, row); /* rows 0 .. L0_AHEAD - 1 */
    if (!half) {
        for (int64_t t = 0; t < T; t++) {
            l0_prefetch(tk, tv, ids, t, T, row);
            l0_token(tk + ids[t] * row, tv + ids[t] * row, H, D, cos + t * ld, sin + t * ld, (float *)k + t * row,
                     (float *)v + t * row);
        }
        return 0;
    }
    float *buf = malloc(sizeof(float) * (size_t)(2 * row));
    if (!buf) return -3;
    int use = L0_F16C();
    for (int64_t t = 0; t < T; t++) {
        l0_prefetch(tk, tv, ids, t, T, row);
        l0_token(tk + ids[t] * row, tv + ids[t] * row, H, D, cos + t * ld, sin + t * ld, buf, buf + row);
        to_f16(use, buf, row, (uint16_t *)k + t * row);
        to_f16(use, buf + row, row, (uint16_t *)v + t * row);
    }
    free(buf);
    return 0;
}

/* The encoder's check of given k, v [T, H, D] (fp32, or fp16 bits when half: compared as their fp32 values)
   against the table's: err[4] = max |k - k0|, max |k|, max |v - v0|, max |v|. Returns 0, -1 if some id >= vocab,
   -2 if some given value is not finite, -3 out of memory. */
CG_EXACT int64_t cg_l0_check(const float *tk, const float *tv, int64_t vocab, const uint32_t *ids, int64_t T,
                             int64_t H, int64_t D, const float *cos, const float *sin, int64_t ld, const void *k,
                             const void *v, float *err, int64_t half) {
    int64_t row = H * D;
    float dk = 0, ak = 0, dv = 0, av = 0;
    int bad = 0, use = half && L0_F16C();
    for (int64_t t = 0; t < T; t++)
        if (ids[t] >= (uint64_t)vocab) return -1;
    float *buf = malloc(sizeof(float) * (size_t)(4 * row));
    if (!buf) return -3;
    for (int64_t t = -L0_AHEAD; t < 0; t++) l0_prefetch(tk, tv, ids, t, T, row);
    for (int64_t t = 0; t < T; t++) {
        l0_prefetch(tk, tv, ids, t, T, row);
        l0_token(tk + ids[t] * row, tv + ids[t] * row, H, D, cos + t * ld, sin + t * ld, buf, buf + row);
        const float *x, *y, *x0 = buf, *y0 = buf + row;
        if (half) {
            from_f16(use, (const uint16_t *)k + t * row, row, buf + 2 * row);
            from_f16(use, (const uint16_t *)v + t * row, row, buf + 3 * row);
            x = buf + 2 * row, y = buf + 3 * row;
        } else
            x = (const float *)k + t * row, y = (const float *)v + t * row;
#pragma omp simd reduction(max : dk, ak, dv, av) reduction(| : bad)
        for (int64_t i = 0; i < row; i++) {
            float a = fabsf(x[i]), e = fabsf(x[i] - x0[i]), b = fabsf(y[i]), f = fabsf(y[i] - y0[i]);
            bad |= !(a <= 3.4e38f) | !(b <= 3.4e38f); /* NaN or infinite */
            dk = e > dk ? e : dk, ak = a > ak ? a : ak, dv = f > dv ? f : dv, av = b > av ? b : av;
        }
    }
    free(buf);
    if (bad) return -2;
    err[0] = dk, err[1] = ak, err[2] = dv, err[3] = av;
    return 0;
}

/* ---- format v5's side information: centre and step per chunk, part and component ----
   The encoder derives them from the statistics (cg5_side: both the compiled encoder and the path CUDA tensors
   take call it, so both store the same values); the decoder checks and widens them (cg5_parse_side). Stored
   as fp16 (round to nearest even), or fp32 when `wide`, little-endian: centre [nch, 2, C], then step. */

#define FP16_SAFE 60000.0f /* cachegen_core.FP16_SAFE */

static uint16_t f2h(float f) { /* IEEE binary16, round to nearest even (as numpy's astype(float16)) */
    uint32_t x, sign, ax;
    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0));
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* rounds to >= 65520: infinity */
    if (ax < 0x38800000u) {                                   /* below 2^-14: a subnormal half (or 0) */
        if (ax < 0x33000000u) return (uint16_t)sign;          /* <= 2^-25 rounds to 0 */
        uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u, sh = 126 - e;
        uint32_t q = m >> sh, rem = m & ((1u << sh) - 1), half = 1u << (sh - 1);
        q += rem > half || (rem == half && (q & 1));
        return (uint16_t)(sign | q);
    }
    uint32_t r = ax - 0x38000000u; /* exponent rebiased 127 -> 15 */
    r = (r + 0xFFFu + ((r >> 13) & 1)) >> 13;
    return (uint16_t)(sign | r);
}

static float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FFu, x;
    if (e == 0x1F) x = sign | 0x7F800000u | (m << 13);
    else if (e) x = sign | ((e + 112) << 23) | (m << 13);
    else if (!m) x = sign;
    else { /* subnormal: normalise */
        e = 113;
        while (!(m & 0x400u)) m <<= 1, e--;
        x = sign | (e << 23) | ((m & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static inline void put_le16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static inline void put_le32(uint8_t *p, uint32_t v) { put_le16(p, (uint16_t)v), put_le16(p + 2, (uint16_t)(v >> 16)); }
static inline uint32_t get_le32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* stats [nch, 2, 3, C] (mean, lo, hi; finite), plan [nch, 2] (steps > 0) -> c32, s32 [nch, 2, C] (the stored
   values) and side (their bytes: 2 or 4 each). centre = the mean; step = max(plan, max(hi - c, c - lo) /
   (qmax - 0.5)) with c the stored centre, stored rounded up (x (1 + 2^-10) + 2^-24, then to nearest: never
   below x), so every |q| <= qmax. fp32 arithmetic, no fused multiply-add: the values numpy computed before.
   Returns wide: 1 when some |lo|, |hi| > FP16_SAFE or some plan step > FP16_SAFE / qmax (fp32 stored). */
CG_EXACT int64_t cg5_side(const float *stats, const float *plan, int64_t nch, int64_t C, int64_t qmax, float *c32,
                          float *s32, uint8_t *side) {
    int64_t n = nch * 2 * C, wide = 0;
    for (int64_t j = 0; j < nch * 2; j++) {
        const float *lo = stats + j * 3 * C + C, *hi = lo + C;
        wide |= plan[j] > FP16_SAFE / (float)qmax;
        for (int64_t c = 0; c < C; c++) wide |= fabsf(lo[c]) > FP16_SAFE || fabsf(hi[c]) > FP16_SAFE;
    }
    const float div = (float)qmax - 0.5f, up = 1.0f + 1.0f / 1024, tiny = 1.0f / 16777216;
    for (int64_t j = 0; j < nch * 2; j++) {
        const float *mean = stats + j * 3 * C, *lo = mean + C, *hi = lo + C;
        for (int64_t c = 0; c < C; c++) {
            int64_t i = j * C + c;
            float ce = mean[c], st;
            if (!wide) ce = h2f(f2h(ce));
            float a = hi[c] - ce, b = ce - lo[c], spread = a > b ? a : b, need = spread / div;
            st = need > plan[j] ? need : plan[j];
            if (!wide) {
                float u = st * up;
                st = h2f(f2h(u + tiny));
            }
            c32[i] = ce, s32[i] = st;
            if (wide) {
                uint32_t bc, bs;
                memcpy(&bc, &ce, 4), memcpy(&bs, &st, 4);
                put_le32(side + 4 * i, bc), put_le32(side + 4 * (n + i), bs);
            } else {
                put_le16(side + 2 * i, f2h(ce)), put_le16(side + 2 * (n + i), f2h(st));
            }
        }
    }
    return wide;
}

/* The decoder's side of v5 params: directory [nch] x (tokens, K words, V words) u32 then centre, step (fp16, or
   fp32 when wide) and amax [nch, 2, C] u8 at buf (the params after their header; the caller checked the
   length). -> bounds [nch + 1], nw [nch, 2] (int64), centre, step fp32 [nch, 2, C]. Returns the payload's word
   count (the sum of nw, >= 0); -1 if the
   directory does not fit T tokens (a chunk of no tokens, a part of fewer words than its final states or of
   more than one per symbol beyond them); -2 if a centre or step is not finite, a step is <= 0 or an amax > qmax. */
int64_t cg5_parse_side(const uint8_t *buf, int64_t nch, int64_t C, int64_t T, int64_t wide, int64_t qmax,
                       int64_t *bounds, int64_t *nw, float *centre, float *step) {
    int64_t n = nch * 2 * C, sz = wide ? 4 : 2, sum = 0;
    bounds[0] = 0;
    for (int64_t j = 0; j < nch; j++) {
        int64_t tok = get_le32(buf + 12 * j), a = get_le32(buf + 12 * j + 4), b = get_le32(buf + 12 * j + 8);
        int64_t most = tok * C + 2 * NS;
        if (tok < 1 || a < 2 * NS || b < 2 * NS || a > most || b > most) return -1;
        sum += tok, bounds[j + 1] = sum, nw[2 * j] = a, nw[2 * j + 1] = b;
    }
    if (sum != T) return -1;
    int64_t words = 0;
    for (int64_t j = 0; j < 2 * nch; j++) words += nw[j];
    const uint8_t *cs = buf + 12 * nch, *am = cs + 2 * n * sz + n; /* after centre, step and rho */
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        float ce, st;
        if (wide) {
            uint32_t bc = get_le32(cs + 4 * i), bs = get_le32(cs + 4 * (n + i));
            memcpy(&ce, &bc, 4), memcpy(&st, &bs, 4);
        } else {
            ce = h2f((uint16_t)(cs[2 * i] | cs[2 * i + 1] << 8)), st = h2f((uint16_t)(cs[2 * (n + i)] | cs[2 * (n + i) + 1] << 8));
        }
        bad |= !isfinite(ce) || !isfinite(st) || !(st > 0) || am[i] > qmax;
        centre[i] = ce, step[i] = st;
    }
    return bad ? -2 : words;
}

/* The CPU encoder of a layer from its transformed rows: statistics (cg4_stats), side information (cg5_side),
   then quantize, fit and code (cg5_encode); arguments as theirs, plan [nch, 2]. Returns wide (0/1), -3 out of
   memory, -4 a value that is not finite. */
static int64_t encode_layer_ld(const float *y0, const float *y1, int64_t C, int64_t ld, int64_t nch,
                               const int64_t *bounds, const float *plan, int64_t mid, const int64_t *wsym,
                               uint8_t *side, float *c32, float *s32, uint8_t *rho, uint8_t *amax, uint16_t *out,
                               int64_t *nw, int64_t simd) {
    float *stats = malloc(sizeof(float) * (size_t)(nch * 2 * 3 * C));
    if (!stats) return -3;
    int64_t rc = stats_ld(y0, y1, C, ld, nch, bounds, stats), wide = 0;
    if (rc == 0) wide = cg5_side(stats, plan, nch, C, mid, c32, s32, side);
    free(stats);
    if (rc != 0) return rc;
    rc = encode_ld(y0, y1, C, ld, nch, bounds, c32, s32, mid, wsym, rho, amax, out, nw, simd);
    return rc != 0 ? rc : wide;
}

int64_t cg5_encode_layer(const float *y0, const float *y1, int64_t C, int64_t T, int64_t nch, const int64_t *bounds,
                         const float *plan, int64_t mid, const int64_t *wsym, uint8_t *side, float *c32, float *s32,
                         uint8_t *rho, uint8_t *amax, uint16_t *out, int64_t *nw, int64_t simd) {
    return encode_layer_ld(y0, y1, C, T, nch, bounds, plan, mid, wsym, side, c32, s32, rho, amax, out, nw, simd);
}

/* ---- RoPE with fp16 on one side (the transform's hot path for fp16 KV): one pass instead of a conversion pass
   and a rotation pass. x, out [T, H, D]; fp16 as IEEE binary16 bits, converted with F16C where the CPU has it
   (round to nearest even, as torch converts), else with f2h / h2f; cos, sin rows as cg_rope. */

static void rope_f16_portable(const uint16_t *xh, const float *xf, int64_t T, int64_t H, int64_t D, const float *cos,
                              const float *sin, int64_t ld, float sign, float *of, uint16_t *oh) {
    int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            int64_t base = (t * H + h) * D;
            const float *c = cos + t * ld, *sn = sin + t * ld;
            for (int64_t i = 0; i < half; i++) {
                float a = xh ? h2f(xh[base + i]) : xf[base + i], b = xh ? h2f(xh[base + half + i]) : xf[base + half + i];
                float si = sign * sn[i], o1 = a * c[i] - b * si, o2 = b * c[i] + a * si;
                if (oh) oh[base + i] = f2h(o1), oh[base + half + i] = f2h(o2);
                else of[base + i] = o1, of[base + half + i] = o2;
            }
        }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,f16c"))) static void rope_f16_avx2(const uint16_t *xh, const float *xf, int64_t T,
                                                               int64_t H, int64_t D, const float *cos,
                                                               const float *sin, int64_t ld, float sign, float *of,
                                                               uint16_t *oh) {
    int64_t half = D / 2, vec = half & ~(int64_t)7;
    const __m256 sg = _mm256_set1_ps(sign);
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * ld, *sn = sin + t * ld;
        for (int64_t h = 0; h < H; h++) {
            int64_t base = (t * H + h) * D, i = 0;
            for (; i < vec; i += 8) {
                __m256 a, b;
                if (xh) {
                    a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(xh + base + i)));
                    b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(xh + base + half + i)));
                } else {
                    a = _mm256_loadu_ps(xf + base + i), b = _mm256_loadu_ps(xf + base + half + i);
                }
                __m256 cv = _mm256_loadu_ps(c + i), si = _mm256_mul_ps(sg, _mm256_loadu_ps(sn + i));
                __m256 o1 = _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, si));
                __m256 o2 = _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, si));
                if (oh) {
                    _mm_storeu_si128((__m128i *)(oh + base + i), _mm256_cvtps_ph(o1, _MM_FROUND_TO_NEAREST_INT));
                    _mm_storeu_si128((__m128i *)(oh + base + half + i), _mm256_cvtps_ph(o2, _MM_FROUND_TO_NEAREST_INT));
                } else {
                    _mm256_storeu_ps(of + base + i, o1), _mm256_storeu_ps(of + base + half + i, o2);
                }
            }
            for (; i < half; i++) {
                float a = xh ? h2f(xh[base + i]) : xf[base + i], b = xh ? h2f(xh[base + half + i]) : xf[base + half + i];
                float si = sign * sn[i], o1 = a * c[i] - b * si, o2 = b * c[i] + a * si;
                if (oh) oh[base + i] = f2h(o1), oh[base + half + i] = f2h(o2);
                else of[base + i] = o1, of[base + half + i] = o2;
            }
        }
    }
}

static int cpu_f16c(void) {
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    return v;
}
#endif

/* Exactly one of xh (fp16 in) / xf (fp32 in) and one of of (fp32 out) / oh (fp16 out) is given; sign as cg_rope.
   simd 0 forces the portable loop. */
void cg_rope_f16(const uint16_t *xh, const float *xf, int64_t T, int64_t H, int64_t D, const float *cos,
                 const float *sin, int64_t ld, float sign, float *of, uint16_t *oh, int64_t simd) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (simd && cpu_f16c()) {
        rope_f16_avx2(xh, xf, T, H, D, cos, sin, ld, sign, of, oh);
        return;
    }
#endif
    (void)simd;
    rope_f16_portable(xh, xf, T, H, D, cos, sin, ld, sign, of, oh);
}

/* ---- CRC-32 (zlib's: reflected 0xEDB88320, pre- and post-inverted), for the payload's check ----
   PCLMULQDQ folding (Intel's "Fast CRC computation for generic polynomials using PCLMULQDQ", the constants of
   Linux's crc32-pclmul) over whole 16-byte blocks where the CPU has it and there are >= 64 bytes, a byte table
   otherwise and for the tail. Equal to zlib.crc32 (tested over lengths and seeds). */

static uint32_t g_crc_table[256];

__attribute__((constructor)) static void init_crc_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int j = 0; j < 8; j++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        g_crc_table[i] = c;
    }
}

static uint32_t crc_bytes(uint32_t state, const uint8_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) state = g_crc_table[(state ^ p[i]) & 0xFF] ^ (state >> 8);
    return state;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* n >= 64, a multiple of 16 -> the raw state after p (state in, not inverted). */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_fold(uint32_t state, const uint8_t *p, int64_t n) {
    const __m128i r2r1 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL), r4r3 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const __m128i r5 = _mm_set_epi64x(0, 0x163cd6124LL), upoly = _mm_set_epi64x(0x1F7011641LL, 0x1DB710641LL);
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    __m128i x1 = _mm_loadu_si128((const __m128i *)p), x2 = _mm_loadu_si128((const __m128i *)(p + 16)),
            x3 = _mm_loadu_si128((const __m128i *)(p + 32)), x4 = _mm_loadu_si128((const __m128i *)(p + 48));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)state));
    p += 64, n -= 64;
#define FOLD(x, k, next) x = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next)
    for (; n >= 64; p += 64, n -= 64) {
        FOLD(x1, r2r1, _mm_loadu_si128((const __m128i *)p));
        FOLD(x2, r2r1, _mm_loadu_si128((const __m128i *)(p + 16)));
        FOLD(x3, r2r1, _mm_loadu_si128((const __m128i *)(p + 32)));
        FOLD(x4, r2r1, _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    FOLD(x1, r4r3, x2);
    FOLD(x1, r4r3, x3);
    FOLD(x1, r4r3, x4);
    for (; n >= 16; p += 16, n -= 16) FOLD(x1, r4r3, _mm_loadu_si128((const __m128i *)p));
#undef FOLD
    /* 128 -> 64 bits */
    __m128i t = _mm_clmulepi64_si128(x1, r4r3, 0x10);
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), t);
    /* 64 -> 32 (+ 32) */
    t = _mm_srli_si128(x1, 4);
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), r5, 0x00), t);
    /* Barrett reduction */
    t = x1;
    x1 = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), upoly, 0x10);
    x1 = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), upoly, 0x00);
    x1 = _mm_xor_si128(x1, t);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}

static int cpu_pclmul(void) {
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    }
    return v;
}
#endif

/* zlib.crc32(p[:n], crc). simd 0: the byte table only. */
uint32_t cg_crc32(const uint8_t *p, int64_t n, uint32_t crc, int64_t simd) {
    uint32_t state = ~crc;
#if defined(__x86_64__) && defined(__GNUC__)
    if (simd && n >= 64 && cpu_pclmul()) {
        int64_t whole = n & ~(int64_t)15;
        state = crc_fold(state, p, whole);
        p += whole, n -= whole;
    }
#endif
    (void)simd;
    return ~crc_bytes(state, p, n);
}

/* ---- the transform's products and a layer in one call (format v5 on the CPU) ----
   out[i][o] = sum_c x[i][c] M[c][o] for i < nt <= 8 tokens (x, out [nt][C] row-major, M [C][C] row-major),
   summed over c in order (FMA on the AVX2 path, so results may differ from another BLAS in the last bit; the
   bitstream's rules apply to the rows that come out, not to how they were computed). */

static void prod_portable(const float *x, int64_t nt, int64_t C, const float *M, float *out) {
    for (int64_t i = 0; i < nt; i++) {
        float *o = out + i * C;
        for (int64_t j = 0; j < C; j++) o[j] = 0;
        for (int64_t c = 0; c < C; c++) {
            const float a = x[i * C + c], *m = M + c * C;
            for (int64_t j = 0; j < C; j++) o[j] += a * m[j];
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
/* 6 tokens x 16 outputs per pass: 12 accumulators (enough FMAs in flight to cover their latency), M's two
   vectors held in registers (the asm keeps the compiler from re-reading them per FMA), 6 broadcasts per 12
   FMAs; then 1 token at a time. C % 16 == 0. */
#define FMA2(b, acc0, acc1) acc0 = _mm256_fmadd_ps(b, m0, acc0), acc1 = _mm256_fmadd_ps(b, m1, acc1)
__attribute__((target("avx2,fma"))) static void prod_avx2(const float *x, int64_t nt, int64_t C, const float *M,
                                                          float *out) {
    int64_t i = 0;
    for (; i + 6 <= nt; i += 6)
        for (int64_t o = 0; o < C; o += 16) {
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
                   a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
            const float *x0 = x + i * C;
            for (int64_t c = 0; c < C; c++) {
                __m256 m0 = _mm256_loadu_ps(M + c * C + o), m1 = _mm256_loadu_ps(M + c * C + o + 8);
                __asm__("" : "+x"(m0), "+x"(m1));
                FMA2(_mm256_broadcast_ss(x0 + c), a00, a01);
                FMA2(_mm256_broadcast_ss(x0 + C + c), a10, a11);
                FMA2(_mm256_broadcast_ss(x0 + 2 * C + c), a20, a21);
                FMA2(_mm256_broadcast_ss(x0 + 3 * C + c), a30, a31);
                FMA2(_mm256_broadcast_ss(x0 + 4 * C + c), a40, a41);
                FMA2(_mm256_broadcast_ss(x0 + 5 * C + c), a50, a51);
            }
            float *r = out + i * C + o;
            _mm256_storeu_ps(r, a00), _mm256_storeu_ps(r + 8, a01);
            _mm256_storeu_ps(r + C, a10), _mm256_storeu_ps(r + C + 8, a11);
            _mm256_storeu_ps(r + 2 * C, a20), _mm256_storeu_ps(r + 2 * C + 8, a21);
            _mm256_storeu_ps(r + 3 * C, a30), _mm256_storeu_ps(r + 3 * C + 8, a31);
            _mm256_storeu_ps(r + 4 * C, a40), _mm256_storeu_ps(r + 4 * C + 8, a41);
            _mm256_storeu_ps(r + 5 * C, a50), _mm256_storeu_ps(r + 5 * C + 8, a51);
        }
    for (; i < nt; i++)
        for (int64_t o = 0; o < C; o += 16) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            for (int64_t c = 0; c < C; c++) {
                const __m256 m0 = _mm256_loadu_ps(M + c * C + o), m1 = _mm256_loadu_ps(M + c * C + o + 8);
                FMA2(_mm256_broadcast_ss(x + i * C + c), a0, a1);
            }
            _mm256_storeu_ps(out + i * C + o, a0), _mm256_storeu_ps(out + i * C + o + 8, a1);
        }
}
#undef FMA2

__attribute__((target("avx2,f16c"))) static void f32_to_f16_avx2(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) out[i] = f2h(x[i]);
}

__attribute__((target("avx2,f16c"))) static void f16_to_f32_avx2(const uint16_t *x, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    for (; i < n; i++) out[i] = h2f(x[i]);
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
/* dst[r * lds + i] = src[i * ldr + r] for an 8 x 8 block (r, i < 8). */
__attribute__((target("avx2"))) static void transpose8(const float *src, int64_t ldr, float *dst, int64_t lds) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ldr), r2 = _mm256_loadu_ps(src + 2 * ldr),
           r3 = _mm256_loadu_ps(src + 3 * ldr), r4 = _mm256_loadu_ps(src + 4 * ldr), r5 = _mm256_loadu_ps(src + 5 * ldr),
           r6 = _mm256_loadu_ps(src + 6 * ldr), r7 = _mm256_loadu_ps(src + 7 * ldr);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
           t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
           t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
           u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
           u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
           u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + lds, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * lds, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * lds, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * lds, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * lds, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * lds, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * lds, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

/* dst[c * lddst + i] = src[i * ldsrc + c] for i < nt, c < C (a token tile to component rows, or back with the
   roles swapped: the caller passes the strides). */
static void tile_t(int use, const float *src, int64_t nt, int64_t C, int64_t ldsrc, float *dst, int64_t lddst) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (use && nt % 8 == 0 && C % 8 == 0) {
        for (int64_t i = 0; i < nt; i += 8)
            for (int64_t c = 0; c < C; c += 8) transpose8(src + i * ldsrc + c, ldsrc, dst + c * lddst + i, lddst);
        return;
    }
#endif
    (void)use;
    for (int64_t c = 0; c < C; c++)
        for (int64_t i = 0; i < nt; i++) dst[c * lddst + i] = src[i * ldsrc + c];
}

/* The vector paths need AVX2, FMA and F16C, and C a multiple of 16. */
static int layer_simd(int64_t simd, int64_t C) {
#if defined(__x86_64__) && defined(__GNUC__)
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return simd && v && C % 16 == 0;
#else
    (void)simd, (void)C;
    return 0;
#endif
}

static void prod(int use, const float *x, int64_t nt, int64_t C, const float *M, float *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (use) {
        prod_avx2(x, nt, C, M, out);
        return;
    }
#endif
    (void)use;
    prod_portable(x, nt, C, M, out);
}

/* n values fp32 -> fp16 bits (round to nearest even) / fp16 bits -> fp32. */
static void to_f16(int use, const float *x, int64_t n, uint16_t *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (use) {
        f32_to_f16_avx2(x, n, out);
        return;
    }
#endif
    (void)use;
    for (int64_t i = 0; i < n; i++) out[i] = f2h(x[i]);
}

static void from_f16(int use, const uint16_t *x, int64_t n, float *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (use) {
        f16_to_f32_avx2(x, n, out);
        return;
    }
#endif
    (void)use;
    for (int64_t i = 0; i < n; i++) out[i] = h2f(x[i]);
}

#define TILE 24 /* tokens per product tile: 4 x 6 rows, 3 x 8 for the transposes */

/* The forward transform of a layer: k, v [T, H, D] (fp16 bits when half, else fp32; positions 0..T-1) ->
   y0 = (unrope(k) @ FK)^T, y1 = (v @ FV)^T fp32 [C, ldy] (component-major, row c at c * ldy, ldy >= T). cos/sin as
   cg_rope. */
static void forward_layer(int use, const void *k, const void *v, int64_t half, int64_t T, int64_t H, int64_t D,
                          const float *fk, const float *fv, const float *cos, const float *sin, int64_t ld, float *y0,
                          float *y1, int64_t ldy) {
    const int64_t C = H * D;
    float x[TILE * 256], out[TILE * 256]; /* C <= 256 (checked by the caller) */
    for (int64_t t = 0; t < T; t += TILE) {
        const int64_t nt = T - t < TILE ? T - t : TILE;
        for (int p = 0; p < 2; p++) {
            const void *src = p ? v : k;
            if (p == 0) /* un-RoPE (and convert) */
                cg_rope_f16(half ? (const uint16_t *)src + t * C : NULL, half ? NULL : (const float *)src + t * C, nt,
                            H, D, cos + t * ld, sin + t * ld, ld, -1.0f, x, NULL, use);
            else if (half)
                from_f16(use, (const uint16_t *)src + t * C, nt * C, x);
            else
                memcpy(x, (const float *)src + t * C, sizeof(float) * (size_t)(nt * C));
            prod(use, x, nt, C, p ? fv : fk, out);
            tile_t(use, out, nt, C, C, (p ? y1 : y0) + t, ldy);
        }
    }
}

/* The inverse: y0, y1 fp32 [C, ldy] (first T values of each row) -> k = rope(y0^T @ GK), v = y1^T @ GV
   [T, H, D] (fp16 bits into kh, vh when half, else fp32 into kf, vf). */
static void inverse_layer(int use, const float *y0, const float *y1, int64_t ldy, int64_t T, int64_t H, int64_t D,
                          const float *gk, const float *gv, const float *cos, const float *sin, int64_t ld,
                          int64_t half, void *ko, void *vo) {
    const int64_t C = H * D;
    float x[TILE * 256], out[TILE * 256];
    for (int64_t t = 0; t < T; t += TILE) {
        const int64_t nt = T - t < TILE ? T - t : TILE;
        for (int p = 0; p < 2; p++) {
            /* x[i][c] = y[c][t + i]: the same transpose with rows and columns swapped */
            tile_t(use, (p ? y1 : y0) + t, C, nt, ldy, x, C);
            prod(use, x, nt, C, p ? gv : gk, out);
            void *dst = p ? vo : ko;
            if (p == 0)
                cg_rope_f16(NULL, out, nt, H, D, cos + t * ld, sin + t * ld, ld, 1.0f,
                            half ? NULL : (float *)dst + t * C, half ? (uint16_t *)dst + t * C : NULL, use);
            else if (half)
                to_f16(use, out, nt * C, (uint16_t *)dst + t * C);
            else
                memcpy((float *)dst + t * C, out, sizeof(float) * (size_t)(nt * C));
        }
    }
}

/* The CPU encoder of a layer from k, v [T, H, D] (fp16 bits when half, else fp32): the forward transform (fk, fv
   [C, C]: y = x F), then cg5_encode_layer's work; its other arguments and returns as there. -5 if C > 256.
   crc: the CRC-32 of the words written (their bytes in this machine's order). */
int64_t cg5_encode_kv(const void *k, const void *v, int64_t half, int64_t T, int64_t H, int64_t D, const float *fk,
                      const float *fv, const float *cos, const float *sin, int64_t ld, int64_t nch,
                      const int64_t *bounds, const float *plan, int64_t mid, const int64_t *wsym, uint8_t *side,
                      float *c32, float *s32, uint8_t *rho, uint8_t *amax, uint16_t *out, int64_t *nw, int64_t simd,
                      int64_t *crc) {
    const int64_t C = H * D;
    if (C > 256) return -5;
    const int64_t ldy = T + 16; /* rows off 4 KiB strides, as the decoder's (at T = 1024 the transposes into
                                   rows 4 KiB apart made the forward transform 1.2x slower) */
    float *y = malloc(sizeof(float) * (size_t)(2 * C * ldy));
    if (!y) return -3;
    forward_layer(layer_simd(simd, C), k, v, half, T, H, D, fk, fv, cos, sin, ld, y, y + C * ldy, ldy);
    int64_t rc = encode_layer_ld(y, y + C * ldy, C, ldy, nch, bounds, plan, mid, wsym, side, c32, s32, rho, amax, out,
                                 nw, simd);
    free(y);
    if (rc == 0 || rc == 1) { /* the words' CRC-32 (zlib's), over their bytes in this machine's order */
        int64_t words = 0;
        for (int64_t j = 0; j < 2 * nch; j++) words += nw[j];
        *crc = cg_crc32((const uint8_t *)out, 2 * words, 0, simd);
    }
    return rc;
}

/* The CPU decoder of a layer: v5 params' side (buf, as cg5_parse_side) and the payload's words (nwords of them)
   -> k, v [T, H, D] (fp16 bits when half, else fp32) through the inverse
   transform (gk, gv [C, C]). crc >= 0: the words' bytes must have this CRC-32 (checked first; < 0: the caller
   checked it). Returns 0; -7 CRC mismatch; -1 the directory does not fit T or the payload's length; -2 bad side
   information; -6 the rANS data did not decode exactly; -3 out of memory; -5 C > 256. */
int64_t cg5_decode_kv(const uint8_t *buf, int64_t nch, int64_t C, int64_t T, int64_t wide, int64_t mid,
                      const uint16_t *words, int64_t nwords, const int64_t *wsym, int64_t H, int64_t D, const float *gk,
                      const float *gv, const float *cos, const float *sin, int64_t ld, int64_t half, void *ko, void *vo,
                      int64_t simd, int64_t crc) {
    if (C > 256 || C != H * D) return -5;
    if (crc >= 0 && cg_crc32((const uint8_t *)words, 2 * nwords, 0, simd) != (uint32_t)crc) return -7;
    const int64_t ldy = T + 16; /* rows off 4 KiB strides (cachegen_klt.ROW_PAD) */
    const int64_t n = nch * 2 * C;
    int64_t *ib = malloc(sizeof(int64_t) * (size_t)(3 * nch + 1));
    float *fs = malloc(sizeof(float) * (size_t)(2 * n + 2 * C * ldy));
    uint16_t *padded = malloc(sizeof(uint16_t) * (size_t)(nwords + 2 * NS));
    int64_t rc = ib && fs && padded ? 0 : -3;
    if (rc == 0) {
        int64_t *bounds = ib, *nw = ib + nch + 1;
        float *centre = fs, *step = fs + n, *y = fs + 2 * n;
        rc = cg5_parse_side(buf, nch, C, T, wide, mid, bounds, nw, centre, step);
        if (rc >= 0 && rc != nwords) rc = -1;
        if (rc >= 0) {
            const uint8_t *rho = buf + 12 * nch + 2 * n * (wide ? 4 : 2), *amax = rho + n;
            memcpy(padded, words, sizeof(uint16_t) * (size_t)nwords);
            memset(padded + nwords, 0, sizeof(uint16_t) * 2 * NS);
            rc = cg5_decode(padded, nwords, nwords + 2 * NS, C, T, nch, bounds, nw, rho, amax, centre, step, mid, wsym,
                            y, y + C * ldy, ldy, simd);
            if (rc == -1) rc = -6;
            if (rc == 0)
                inverse_layer(layer_simd(simd, C), y, y + C * ldy, ldy, T, H, D, gk, gv, cos, sin, ld, half, ko, vo);
        }
    }
    free(ib), free(fs), free(padded);
    return rc;
}
