"""C kernels for the CPU decode step: paged decode attention and a small-batch matmul.

`paged_decode_attention` computes, for every sequence's one new query token, softmax(q·Kᵀ·scale)·V over
the sequence's cached positions, walking its blocks in the paged cache directly. The torch path it replaces
(`paged_decode_attention_ref`: gather every sequence's whole context into a padded copy, then masked SDPA)
copies the context once per layer per step and is 3-7x slower on CPU.

`kv_write_rows` writes K and V rows into the paged KV cache (`engine.kv_cache.KVCache.write`): some KV
heads of each slot with non-temporal stores (see the C comment), whole slots with memcpy.

`small_matmul` is x @ w_t (+ bias) for 1..48 rows (1..24 without AVX-512) with w_t stored [in, out]: MKL
packs the weight matrix on every call for a few rows, which on a memory-bound decode step costs as much as the multiply itself;
this kernel streams w_t in place instead (k-blocks of 16 rows, 6x16 register tiles, 6x64 with AVX-512,
software prefetch) and is ~1.5x faster at 16 rows. One to four rows stream w_t's rows in order instead, each weight loaded
once for every row (2 rows: ~0.8x the tiles' time). One row (GEMV): on the
2026-12-03 host the tiles read weights too big for the cache at 26 GB/s against MKL's 21-22 (35 against
21 for a 65 MB LM head), and the row stream is ~6% faster again (2026-12-05). Every row's result is the
same whatever the batch holds (each output accumulates one fma per k in k order in every path), so a
sequence's decode logits are bitwise equal alone and batched with up to 47 others (23 without AVX-512).
Larger batches stay with MKL's blocked GEMM (`SMALL_MATMUL_MAX_ROWS`).

The C source below is compiled on first use with the system C compiler (`cc`, ~1 s) into
`<pdserve cache>/kernels/`, keyed by the source and the CPU's flags (it is built with -march=native),
and loaded with ctypes (which releases the GIL during the call). With no compiler, a failed build, a
non-CPU or non-fp32 tensor, or `PDSERVE_KERNELS=0`, callers get the torch path instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.cbuild import build_library

log = logging.getLogger(__name__)

_C_SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* e^x for x <= 0 (softmax's r - max), 8 lanes: Cephes' expf (x = n ln2 + r, degree-6 polynomial in r, 2^n
   built in the exponent bits), within 1 ulp of glibc's expf over [-87, 0] (checked at 87 M points spaced
   1e-6 apart); x below -87 is taken as -87 (e^-87 = 1.6e-38, against scores near 1). */
static inline __m256 exp_nonpos(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* The horizontal sums of 8 vectors: lane i of the result is the sum of v[i]'s 8 lanes. */
static inline __m256 hsum8x8(const __m256 *v) {
    __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* One sequence, D % 32 == 0: rows[i] is position lo + i's offset (floats) into k and v, S positions.
   Scores 8 positions at a time per head (8 dot products in registers, summed across lanes together),
   softmax with exp_nonpos, then per head 32 columns of the output at a time over every position.
   scores: [H, S rounded up to 8]. */
static void attend_seq(float *o, const float *qn, const float *k, const float *v, const int64_t *rows,
                       int64_t S, int64_t H, int64_t g, int64_t D, float scale, float *scores) {
    int64_t Sp = (S + 7) & ~(int64_t)7;
    __m256 vscale = _mm256_set1_ps(scale);
    for (int64_t p0 = 0; p0 < S; p0 += 8) {
        const float *kp[8];
        for (int i = 0; i < 8; i++) kp[i] = k + rows[p0 + i < S ? p0 + i : p0];
        for (int64_t h = 0; h < H; h++) {
            const float *a = qn + h * D;
            int64_t off = (h / g) * D;
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                __m256 qa = _mm256_loadu_ps(a + d);
                for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qa, _mm256_loadu_ps(kp[i] + off + d), acc[i]);
            }
            _mm256_storeu_ps(scores + h * Sp + p0, _mm256_mul_ps(hsum8x8(acc), vscale));
        }
    }
    for (int64_t h = 0; h < H; h++) {
        float *r = scores + h * Sp, m = -FLT_MAX, sum = 0.f;
        int64_t i = 0;
        __m256 vm = _mm256_set1_ps(-FLT_MAX);
        for (; i + 8 <= S; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(r + i));
        m = hmax(vm);
        for (; i < S; i++) m = r[i] > m ? r[i] : m;
        __m256 vmax = _mm256_set1_ps(m), vsum = _mm256_setzero_ps();
        for (i = 0; i + 8 <= S; i += 8) {
            __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(r + i), vmax));
            _mm256_storeu_ps(r + i, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        sum = hsum(vsum);
        for (; i < S; i++) {
            r[i] = expf(r[i] - m);
            sum += r[i];
        }
        __m256 inv = _mm256_set1_ps(1.f / sum);
        for (i = 0; i + 8 <= S; i += 8) _mm256_storeu_ps(r + i, _mm256_mul_ps(_mm256_loadu_ps(r + i), inv));
        for (; i < S; i++) r[i] *= 1.f / sum;
    }
    for (int64_t h = 0; h < H; h++) {
        const float *r = scores + h * Sp;
        int64_t off = (h / g) * D;
        for (int64_t d0 = 0; d0 < D; d0 += 32) {
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t p = 0; p < S; p++) {
                __m256 w = _mm256_broadcast_ss(r + p);
                const float *b = v + rows[p] + off + d0;
                for (int j = 0; j < 4; j++) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(b + 8 * j), acc[j]);
            }
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(o + h * D + d0 + 8 * j, acc[j]);
        }
    }
}
#endif

/* out, q: [N, H, D] contiguous; k, v: one layer of the cache, [num_slots, Hkv, D] contiguous;
   table: [N, max_blocks] block ids; lens: [N] context length including the new token.
   Query head h reads KV head h / (H / Hkv). Position p of sequence n is slot
   table[n][p / block_size] * block_size + p % block_size. window > 0 keeps positions > len - 1 - window.
   With AVX2 and D % 32 == 0: attend_seq. Otherwise, per sequence: scores for every (position, head) in one
   pass over K, softmax per head, one pass over V. 2026-12-07 Intel Xeon, the compare's model (8 query and 2 KV
   heads of 64, ~200 positions): 43 -> 14 us per sequence and layer with the cache warm; a decode step of 16
   sequences 18.7 -> 15.8 ms (bound by reading the KV cache there). */
int paged_decode_attention(float *out, const float *q, const float *k, const float *v,
                           const int64_t *table, const int64_t *lens, int64_t N, int64_t H, int64_t Hkv,
                           int64_t D, int64_t block_size, int64_t max_blocks, int64_t window, float scale) {
    int64_t g = H / Hkv, max_len = 1;
    for (int64_t n = 0; n < N; n++) max_len = lens[n] > max_len ? lens[n] : max_len;
    int64_t Sp = (max_len + 7) & ~(int64_t)7;
    /* the rows' offsets [Sp] (first: 8-byte aligned), then scores [H, Sp], then acc [H, D] */
    int64_t *rows = malloc(sizeof(int64_t) * (size_t)Sp + sizeof(float) * (size_t)(H * Sp + H * D));
    if (!rows) return -1;
    float *scores = (float *)(rows + Sp);
    float *acc = scores + H * Sp;
    for (int64_t n = 0; n < N; n++) {
        int64_t len = lens[n], lo = (window > 0 && len > window) ? len - window : 0, S = len - lo;
        const int64_t *tab = table + n * max_blocks;
        const float *qn = q + n * H * D;
        for (int64_t p = lo; p < len; p++) rows[p - lo] = (tab[p / block_size] * block_size + p % block_size) * Hkv * D;
#if defined(__AVX2__) && defined(__FMA__)
        if (D % 32 == 0) {
            attend_seq(out + n * H * D, qn, k, v, rows, S, H, g, D, scale, scores);
            continue;
        }
#endif
        for (int64_t p = 0; p < S; p++) {
            const float *kp = k + rows[p];
            for (int64_t h = 0; h < H; h++) {
                const float *a = qn + h * D, *b = kp + (h / g) * D;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; d++) dot += a[d] * b[d];
                scores[h * S + p] = dot * scale;
            }
        }
        for (int64_t h = 0; h < H; h++) {
            float *r = scores + h * S, m = -FLT_MAX, sum = 0.f;
            for (int64_t i = 0; i < S; i++) m = r[i] > m ? r[i] : m;
            for (int64_t i = 0; i < S; i++) {
                r[i] = expf(r[i] - m);
                sum += r[i];
            }
            float inv = 1.f / sum;
            for (int64_t i = 0; i < S; i++) r[i] *= inv;
        }
        for (int64_t i = 0; i < H * D; i++) acc[i] = 0.f;
        for (int64_t p = 0; p < S; p++) {
            const float *vp = v + rows[p];
            for (int64_t h = 0; h < H; h++) {
                float w = scores[h * S + p], *a = acc + h * D;
                const float *b = vp + (h / g) * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) a[d] += w * b[d];
            }
        }
        float *o = out + n * H * D;
        for (int64_t i = 0; i < H * D; i++) o[i] = acc[i];
    }
    free(rows);
    return 0;
}

#if defined(__AVX2__) && defined(__FMA__)
#define KB 16 /* rows of w per k-block: 16 concurrent sequential streams, C tile stays in L1 */
#define PF 64 /* prefetch distance along a row, in floats (4 cache lines) */

/* C[0:MR, 0:16] (+)= A[0:MR, 0:kb] @ B[0:kb, 0:16]; the first k-block starts from the bias (or 0). */
static inline __attribute__((always_inline)) void tile(float *C, const float *A, const float *B,
                                                       const float *bias, int64_t kb, int64_t lda,
                                                       int64_t ldb, int64_t ldc, const int MR, int first) {
    __m256 acc[6][2];
    if (first) {
        __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
        __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
        for (int i = 0; i < MR; i++) acc[i][0] = b0, acc[i][1] = b1;
    } else {
        for (int i = 0; i < MR; i++)
            acc[i][0] = _mm256_loadu_ps(C + i * ldc), acc[i][1] = _mm256_loadu_ps(C + i * ldc + 8);
    }
    for (int64_t k = 0; k < kb; k++) {
        const float *b = B + k * ldb;
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        for (int i = 0; i < MR; i++) {
            __m256 a = _mm256_broadcast_ss(A + i * lda + k);
            acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < MR; i++) {
        _mm256_storeu_ps(C + i * ldc, acc[i][0]);
        _mm256_storeu_ps(C + i * ldc + 8, acc[i][1]);
    }
}

/* MR rows (1..4): C[MR, N] = A[MR, K] @ B[K, N] (+ bias), streaming B's rows in order, 8 at a time, each
   B vector loaded once for all MR rows (C's rows held in L1). Every output still accumulates one fma per k
   in k order from the bias (or 0): bitwise equal to the tiles and to any other MR. One sequential stream
   of 8 rows reads faster than the tiles' 16: one row, bench model, one decode step's matmuls: 6.2 against
   6.6 ms from huge pages, 6.9 against 7.1 from 4 KiB pages; 2026-12-07, the compare's model (25.7 M
   weights), one process, alternating: 2 rows 0.75-0.89x the tiles' time, 3 rows 0.84-1.0x, 4 rows
   0.86-0.90x (8 rows at a time beat 6, 4 or 3 rows at a time for 2-4 rows, 16 lost; a column-blocked C
   and software prefetch lost too). */
static inline __attribute__((always_inline)) void stream_rows(float *C, const float *A, const float *B,
                                                              const float *bias, int64_t N, int64_t K,
                                                              int64_t lda, int64_t ldb, int64_t ldc,
                                                              const int MR) {
    for (int r = 0; r < MR; r++)
        for (int64_t n = 0; n < N; n += 8)
            _mm256_storeu_ps(C + r * ldc + n, bias ? _mm256_loadu_ps(bias + n) : _mm256_setzero_ps());
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const float *b = B + k * ldb;
        __m256 x[4][8]; /* MR x 8 broadcasts (spilled to L1 past 2 rows) */
        for (int r = 0; r < MR; r++)
            for (int i = 0; i < 8; i++) x[r][i] = _mm256_broadcast_ss(A + r * lda + k + i);
        for (int64_t n = 0; n < N; n += 8) {
            __m256 acc[4];
            for (int r = 0; r < MR; r++) acc[r] = _mm256_loadu_ps(C + r * ldc + n);
            for (int i = 0; i < 8; i++) {
                __m256 bv = _mm256_loadu_ps(b + i * ldb + n);
                for (int r = 0; r < MR; r++) acc[r] = _mm256_fmadd_ps(x[r][i], bv, acc[r]);
            }
            for (int r = 0; r < MR; r++) _mm256_storeu_ps(C + r * ldc + n, acc[r]);
        }
    }
    for (; k < K; k++) {
        const float *b = B + k * ldb;
        for (int r = 0; r < MR; r++) {
            __m256 x = _mm256_broadcast_ss(A + r * lda + k);
            float *c = C + r * ldc;
            for (int64_t n = 0; n < N; n += 8)
                _mm256_storeu_ps(c + n, _mm256_fmadd_ps(x, _mm256_loadu_ps(b + n), _mm256_loadu_ps(c + n)));
        }
    }
}

#if defined(__AVX512F__)
/* tile() on 512-bit vectors, 64 columns: the same fmas in the same order (every output one fma per k in k
   order from the bias or 0), so the results are bitwise those of tile(). A 6x64 block of C in 24 of the 32
   registers. 2026-12-07 Intel Xeon (AVX-512): the 256-bit tiles ran at 75-87 GFLOP/s for 8-24 rows (MKL
   110-195), these at 110-140 (a decode step of 16 sequences 22.3 -> 18.7 ms, of 24: 29.0 -> 23.4 ms). For
   1-4 rows a 512-bit stream_rows measured the same as the 256-bit one (memory-bound) and was not kept. */
static inline __attribute__((always_inline)) void tile64(float *C, const float *A, const float *B,
                                                         const float *bias, int64_t kb, int64_t lda,
                                                         int64_t ldb, int64_t ldc, const int MR, int first) {
    __m512 acc[6][4];
    for (int j = 0; j < 4; j++) {
        if (first) {
            __m512 b = bias ? _mm512_loadu_ps(bias + 16 * j) : _mm512_setzero_ps();
            for (int i = 0; i < MR; i++) acc[i][j] = b;
        } else {
            for (int i = 0; i < MR; i++) acc[i][j] = _mm512_loadu_ps(C + i * ldc + 16 * j);
        }
    }
    for (int64_t k = 0; k < kb; k++) {
        const float *b = B + k * ldb;
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32),
               b3 = _mm512_loadu_ps(b + 48);
        for (int i = 0; i < MR; i++) {
            __m512 a = _mm512_set1_ps(A[i * lda + k]);
            acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(a, b2, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(a, b3, acc[i][3]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(C + i * ldc + 16 * j, acc[i][j]);
}

#define TILE_COLS 64
#else
#define TILE_COLS 16
#endif

/* The columns [n, N) of one k-block of C, W at a time, with the tile function T: the k-block's W-column strip of
   B prefetched, then 6 rows of C at a time (the last group 1-5). Expects the locals of small_matmul. */
#define COLUMNS(T, W)                                                                                   \
    for (; n + (W) <= N; n += (W)) {                                                                    \
        for (int64_t k = 0; k < kb; k++)                                                                \
            for (int j = 0; j < (W); j += 16)                                                           \
                _mm_prefetch((const char *)(B + (k0 + k) * ldb + n + j + PF), _MM_HINT_T0);            \
        for (int64_t m0 = 0; m0 < M; m0 += 6) {                                                        \
            float *c = C + m0 * ldc + n;                                                                \
            const float *a = A + m0 * lda + k0, *b = B + k0 * ldb + n, *bs = bias ? bias + n : 0;       \
            switch (M - m0 < 6 ? M - m0 : 6) {                                                          \
                case 6: T(c, a, b, bs, kb, lda, ldb, ldc, 6, first); break;                             \
                case 5: T(c, a, b, bs, kb, lda, ldb, ldc, 5, first); break;                             \
                case 4: T(c, a, b, bs, kb, lda, ldb, ldc, 4, first); break;                             \
                case 3: T(c, a, b, bs, kb, lda, ldb, ldc, 3, first); break;                             \
                case 2: T(c, a, b, bs, kb, lda, ldb, ldc, 2, first); break;                             \
                default: T(c, a, b, bs, kb, lda, ldb, ldc, 1, first); break;                            \
            }                                                                                           \
        }                                                                                               \
    }

/* C[M, N] = A[M, K] @ B[K, N] (+ bias[N]); row-major with row strides lda, ldb, ldc; N % 16 == 0. */
int small_matmul(float *C, const float *A, const float *B, const float *bias, int64_t M, int64_t N,
                 int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
    if (N % 16) return -1;
    switch (M) { /* 1-4 rows: streamed; more: register tiles */
        case 1: stream_rows(C, A, B, bias, N, K, lda, ldb, ldc, 1); return 0;
        case 2: stream_rows(C, A, B, bias, N, K, lda, ldb, ldc, 2); return 0;
        case 3: stream_rows(C, A, B, bias, N, K, lda, ldb, ldc, 3); return 0;
        case 4: stream_rows(C, A, B, bias, N, K, lda, ldb, ldc, 4); return 0;
    }
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
        int64_t kb = K - k0 < KB ? K - k0 : KB;
        int first = k0 == 0;
        int64_t n = 0;
#if TILE_COLS == 64
        COLUMNS(tile64, 64)
#endif
        COLUMNS(tile, 16)
    }
    return 0;
}
int has_small_matmul(void) { return TILE_COLS; } /* the register tiles' width in floats */
#else
int small_matmul(float *C, const float *A, const float *B, const float *bias, int64_t M, int64_t N,
                 int64_t K, int64_t lda, int64_t ldb, int64_t ldc) { return -2; }
int has_small_matmul(void) { return 0; }
#endif

/* One write into the paged cache, K and V: `rows` rows of `row_bytes` bytes from the contiguous sources sk,
   sv to dk, dv, whose rows start `dst_stride` bytes apart (>= row_bytes). Whole rows (row_bytes ==
   dst_stride) are one memcpy each. Part rows (some of a slot's KV heads) are written with non-temporal
   stores where dk, dv and dst_stride are 32-byte aligned and row_bytes is a multiple of 32: a cached store
   first reads each destination line, and the prefetchers also fetch the lines between the rows (the other
   heads'), about twice the memory traffic per byte written. Otherwise a memcpy per row. The bytes written
   are the same on every path. */
void kv_write_rows(char *dk, char *dv, const char *sk, const char *sv, int64_t rows, int64_t row_bytes,
                   int64_t dst_stride) {
    if (row_bytes == dst_stride) {
        memcpy(dk, sk, (size_t)(rows * row_bytes));
        memcpy(dv, sv, (size_t)(rows * row_bytes));
        return;
    }
#if defined(__AVX2__)
    if ((uintptr_t)dk % 32 == 0 && (uintptr_t)dv % 32 == 0 && dst_stride % 32 == 0 && row_bytes % 32 == 0) {
        int64_t w = row_bytes / 32;
        for (int64_t r = 0; r < rows; r++) {
            __m256i *ok = (__m256i *)(dk + r * dst_stride), *ov = (__m256i *)(dv + r * dst_stride);
            const __m256i *ik = (const __m256i *)(sk + r * row_bytes);
            const __m256i *iv = (const __m256i *)(sv + r * row_bytes);
            for (int64_t i = 0; i < w; i++) _mm256_stream_si256(ok + i, _mm256_loadu_si256(ik + i));
            for (int64_t i = 0; i < w; i++) _mm256_stream_si256(ov + i, _mm256_loadu_si256(iv + i));
        }
        _mm_sfence(); /* the streamed lines are visible before this call returns */
        return;
    }
#endif
    for (int64_t r = 0; r < rows; r++) {
        memcpy(dk + r * dst_stride, sk + r * row_bytes, (size_t)row_bytes);
        memcpy(dv + r * dst_stride, sv + r * row_bytes, (size_t)row_bytes);
    }
}

/* out[t] = w * (x[t] / sqrt(mean(x[t]^2) + eps)) for T rows of n (x row stride ldx; out, w contiguous). */
void rms_norm(float *out, const float *x, const float *w, int64_t T, int64_t n, int64_t ldx, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * ldx;
        float *o = out + t * n, ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) ss += xr[i] * xr[i];
        float r = 1.f / sqrtf(ss / (float)n + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[i] = w[i] * (xr[i] * r);
    }
}
"""
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_tile_cols = 0  # small_matmul's register tile width in floats: 64 (AVX-512), 16 (AVX2), 0 (no kernel)
# The most rows small_matmul takes, by tile width; beyond it MKL's blocked GEMM. Measured in a whole decode step
# (weights cold between layers, as they run), not on one hot matrix, where MKL looks better than it is:
# 2026-12-07 Intel Xeon, 64-wide tiles, step of 28 / 32 / 40 / 48 / 56 / 64 sequences 1.24 / 1.15 / 1.15 /
# 1.06 / 0.99 / 0.94 x faster than with MKL from 25 rows. 16-wide: 2026-11-23 AMD EPYC, equal to MKL at 32 rows.
SMALL_MATMUL_MAX_ROWS = {64: 48, 16: 24}


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _tile_cols
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("PDSERVE_KERNELS", "1") != "0":
            try:
                lib = ctypes.CDLL(str(build_library("pdserve_kernels", _C_SOURCE)))
                fn = lib.paged_decode_attention
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float]
                mm = lib.small_matmul
                mm.restype = ctypes.c_int
                mm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6
                lib.rms_norm.restype = None
                lib.rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_float]
                lib.has_small_matmul.restype = ctypes.c_int
                lib.kv_write_rows.restype = None
                lib.kv_write_rows.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
                _lib, _tile_cols = lib, int(lib.has_small_matmul())
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("C kernels unavailable, using the torch paths: %s", e)
        _tried = True
        return _lib


def kv_write_rows_fn() -> Any:
    """The C `kv_write_rows` (a ctypes function: dk, dv, sk, sv addresses, rows, row_bytes, dst_stride), or
    None where the kernels do not load (then KVCache.write uses torch's copies)."""
    lib = _load()
    return lib.kv_write_rows if lib is not None else None


def kernels_available() -> bool:
    """True when the compiled kernels are loaded (builds them on first call)."""
    return _load() is not None


def small_matmul_available() -> bool:
    """True when `small_matmul` has its C kernel (the kernels loaded and the CPU has AVX2 and FMA)."""
    return _load() is not None and _tile_cols > 0


def small_matmul_max_rows() -> int:
    """The most rows `small_matmul` gives its C kernel on this CPU (0 where it has none)."""
    return SMALL_MATMUL_MAX_ROWS.get(_tile_cols, 0) if _load() is not None else 0


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """One query token per sequence against its paged K/V. -> [N, H, D]

    q: [N, H, D]; k_cache, v_cache: one layer, [num_blocks, B, Hkv, D]; block_table: [N, max_blocks] int64
    (entries past a sequence's last needed block are ignored); seq_lens: [N] int64, context length
    including the new token (whose K/V must already be in the cache).
    """
    lib = _load()
    usable = (
        lib is not None
        and q.device.type == "cpu"
        and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
    )
    if not usable:
        return paged_decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens, sliding_window)
    assert lib is not None
    n, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    q = q.contiguous()
    table = block_table.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    rc = lib.paged_decode_attention(
        out.data_ptr(),
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        table.data_ptr(),
        lens.data_ptr(),
        n,
        h,
        hkv,
        d,
        block_size,
        table.shape[1],
        sliding_window or 0,
        d**-0.5,
    )
    if rc != 0:
        raise MemoryError("paged_decode_attention: out of memory for the score buffer")
    return out


def paged_decode_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    sliding_window: int | None = None,
) -> Tensor:
    """The torch reference of `paged_decode_attention`: gather each context (padded), masked SDPA."""
    n, block_size = q.shape[0], k_cache.shape[1]
    s_max = block_table.shape[1] * block_size
    slots = (block_table[:, :, None] * block_size + torch.arange(block_size, device=q.device)).view(n, s_max)
    k = k_cache.flatten(0, 1)[slots].transpose(1, 2).to(q.dtype)  # [N, Hkv, S_max, D]
    v = v_cache.flatten(0, 1)[slots].transpose(1, 2).to(q.dtype)
    kpos = torch.arange(s_max, device=q.device)[None, :]  # [1, S_max]
    lens = seq_lens.to(q.device)[:, None]  # [N, 1]
    mask = kpos < lens
    if sliding_window is not None:
        mask &= kpos >= lens - sliding_window
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], enable_gqa=True
    )  # [N, H, 1, D]
    return out[:, :, 0, :]


def small_matmul(x: Tensor, w_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """x: [M, K] @ w_t: [K, N] (+ bias [N]) -> [M, N]. The C kernel for 1 <= M <= small_matmul_max_rows() rows
    on one CPU thread (fp32, N % 16 == 0, x rows unit-stride, w_t contiguous); `torch.addmm` / `@` otherwise."""
    m = x.shape[0]
    if (
        1 <= m <= small_matmul_max_rows()
        and x.device.type == "cpu"
        and x.dtype == w_t.dtype == torch.float32
        and x.dim() == 2
        and x.stride(1) == 1
        and w_t.is_contiguous()
        and w_t.shape[1] % 16 == 0
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
        and torch.get_num_threads() == 1
    ):
        assert _lib is not None
        k, n = w_t.shape
        out = torch.empty(m, n, dtype=x.dtype)
        rc = _lib.small_matmul(
            out.data_ptr(),
            x.data_ptr(),
            w_t.data_ptr(),
            None if bias is None else bias.data_ptr(),
            m,
            n,
            k,
            x.stride(0),
            n,
            n,
        )
        if rc == 0:
            return out
    return x @ w_t if bias is None else torch.addmm(bias, x, w_t)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: [T, n] -> weight * x / sqrt(mean(x^2) + eps), row-wise (HF's RMSNorm in fp32). The C kernel for
    fp32 CPU tensors (one fused loop instead of six dispatched ops: ~10x less overhead on a decode step's
    small rows); `F.rms_norm` otherwise."""
    lib = _load()
    if (
        lib is None
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.dim() != 2
        or x.stride(1) != 1
        or not weight.is_contiguous()
    ):
        return F.rms_norm(x, weight.shape, weight, eps)
    t, n = x.shape
    out = torch.empty(t, n, dtype=x.dtype)
    lib.rms_norm(out.data_ptr(), x.data_ptr(), weight.data_ptr(), t, n, x.stride(0), eps)
    return out
