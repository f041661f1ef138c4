/* y = x Wᵀ for 1 to a few hundred float32 rows (decode steps, small batches, prefill chunks), on x86 CPUs
 * with AVX2, FMA and F16C, with W in one of several storage formats, read as it is stored and widened to
 * float32:
 *
 *   KEEL_W_F32   float32 [N, K]
 *   KEEL_W_BF16  bfloat16 [N, K]
 *   KEEL_W_INT4  4-bit codes [N, K / 2] (channel 2j in the low nibble of byte j), per group of `group`
 *                channels a scale s and zero z: w = (code - 8) * s + z   (scale, zero [N, K / group]);
 *                the panel path widens each weight with one rounding, as keel/quant/int4.py's dequantize
 *                (the product is exact for scales of up to 20 significant bits, as bfloat16 and float16
 *                ones are); the few-row path sums s * code * x and adds (z - 8 s) * sum(x) per group
 *   KEEL_W_INT8G int8 codes [N, K], per group a scale: w = code * s   (scale [N, K / group]; one group
 *                of K is per-channel int8)
 * Scales and zeros are float32, bfloat16 or float16 (sdtype: KEEL_S_*), widened to float32 per group.
 *
 * Work unit: a panel of P output rows. Formats other than float32 first widen the panel into a float32
 * scratch buffer that stays in L1/L2 (so each weight is decoded once, however many rows x has), then a
 * register-tiled loop computes MB rows of x by NB panel rows at a time: MB * NB accumulators of 8 lanes
 * along K, one load of each x and w vector serving NB and MB FMAs. Sums across lanes happen once per
 * tile, at the end. Panels are split across OpenMP threads. With at most MB rows, INT4 and INT8G skip the
 * buffer: each weight is widened in registers and used at once (int4_few, int8_few), with the same
 * operations and the same order of sums (see batch invariance below).
 *
 * Batch invariance: a row of y comes out bit for bit the same whatever M is. Every path computes a row with
 * one arithmetic: weights widened as the panel path widens them (float32 as is, bfloat16 by a shift, INT4
 * as fma(code - 8, s, z), INT8G as code * s), one accumulator of 8 lanes per (row, output row) summing K
 * in order (for INT4 in the permuted order of permute16, the same in both paths), one horizontal sum at
 * the end. The few-row paths differ only in keeping the widened weights in registers.
 *
 * K % 8 == 0; for INT4 group % 16 == 0, for INT8G group % 8 == 0, and K % group == 0.
 */
#include "cpu_simd.h"
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

enum { KEEL_W_F32 = 0, KEEL_W_BF16 = 1, KEEL_W_INT4 = 2, KEEL_W_INT8G = 3 };
enum { KEEL_S_F32 = 0, KEEL_S_BF16 = 1, KEEL_S_F16 = 2 };

/* Element i of a scale or zero table of type sdtype, as float32. */
static inline float scalar(const void *t, int sdtype, int64_t i) {
    if (sdtype == KEEL_S_BF16) return bf16_to_f32(((const uint16_t *)t)[i]);
    if (sdtype == KEEL_S_F16) return _cvtsh_ss(((const uint16_t *)t)[i]);
    return ((const float *)t)[i];
}

#define MB 4
#define NB 3
#define FEW_MAXG 1024 /* most groups per row on the few-row paths */

/* y[i, j] = x[i] . w[j] for i < mb, j < nb (compile-time constants once inlined). */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx, const float *w, int64_t ldw,
                                                        float *y, int64_t ldy, int64_t K, const int mb,
                                                        const int nb) {
    __m256 acc[MB][NB];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 xv[MB];
        for (int i = 0; i < mb; i++) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
        for (int j = 0; j < nb; j++) {
            __m256 wv = _mm256_loadu_ps(w + j * ldw + k);
            for (int i = 0; i < mb; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) y[i * ldy + j] = hsum(acc[i][j]);
}

#define TILE_CASE(a, b) \
    case (a) * 4 + (b): tile(x, ldx, w, ldw, y, ldy, K, a, b); break;

static void tile_any(const float *x, int64_t ldx, const float *w, int64_t ldw, float *y, int64_t ldy, int64_t K,
                     int mb, int nb) {
    switch (mb * 4 + nb) {
        TILE_CASE(1, 1) TILE_CASE(1, 2) TILE_CASE(1, 3)
        TILE_CASE(2, 1) TILE_CASE(2, 2) TILE_CASE(2, 3)
        TILE_CASE(3, 1) TILE_CASE(3, 2) TILE_CASE(3, 3)
        TILE_CASE(4, 1) TILE_CASE(4, 2) TILE_CASE(4, 3)
    }
}

#ifdef __AVX512F__
/* The AVX-512 build: float32 and bfloat16 weights (no few-row path to agree with) are summed in 16 lanes,
 * K % 16 == 0; one accumulator per (row, output row) summing K in order, reduced once at the end, at every
 * row count. Quantized formats keep the 8-lane tile, which their few-row paths match. */
static inline __attribute__((always_inline)) void tile16(const float *x, int64_t ldx, const float *w, int64_t ldw,
                                                          float *y, int64_t ldy, int64_t K, const int mb,
                                                          const int nb) {
    __m512 acc[MB][NB];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 xv[MB];
        for (int i = 0; i < mb; i++) xv[i] = _mm512_loadu_ps(x + i * ldx + k);
        for (int j = 0; j < nb; j++) {
            __m512 wv = _mm512_loadu_ps(w + j * ldw + k);
            for (int i = 0; i < mb; i++) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}

#define TILE16_CASE(a, b) \
    case (a) * 4 + (b): tile16(x, ldx, w, ldw, y, ldy, K, a, b); break;

static void tile16_any(const float *x, int64_t ldx, const float *w, int64_t ldw, float *y, int64_t ldy, int64_t K,
                       int mb, int nb) {
    switch (mb * 4 + nb) {
        TILE16_CASE(1, 1) TILE16_CASE(1, 2) TILE16_CASE(1, 3)
        TILE16_CASE(2, 1) TILE16_CASE(2, 2) TILE16_CASE(2, 3)
        TILE16_CASE(3, 1) TILE16_CASE(3, 2) TILE16_CASE(3, 3)
        TILE16_CASE(4, 1) TILE16_CASE(4, 2) TILE16_CASE(4, 3)
    }
}
#endif

/* Widen rows [n0, n0 + p) of W into out [p, K] float32. */
static void decode_panel(int fmt, const void *wp, const void *scale, const void *zero, int sdtype, int64_t group,
                         int64_t n0, int64_t p, int64_t K, float *out) {
    const int64_t G = K / (group > 0 ? group : K);
    for (int64_t r = 0; r < p; r++) {
        int64_t n = n0 + r;
        float *o = out + r * K;
        if (fmt == KEEL_W_BF16) {
            const uint16_t *row = (const uint16_t *)wp + n * K;
            for (int64_t k = 0; k < K; k += 8) {
                __m128i b = _mm_loadu_si128((const __m128i *)(row + k));
                _mm256_storeu_ps(o + k, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16)));
            }
        } else if (fmt == KEEL_W_INT4) {
            /* 8 bytes hold channels k..k+15: the low nibbles the even ones, the high nibbles the odd ones.
             * They are widened in that order (evens, then odds); x is permuted to match (permute16). */
            const uint8_t *row = (const uint8_t *)wp + n * (K / 2);
            const __m256i low = _mm256_set1_epi32(0x0F), eight = _mm256_set1_epi32(8);
            for (int64_t g = 0; g < G; g++) {
                __m256 s = _mm256_set1_ps(scalar(scale, sdtype, n * G + g)), z = _mm256_set1_ps(scalar(zero, sdtype, n * G + g));
                for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
                    __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + k / 2)));
                    __m256 ev = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(d, low), eight));
                    __m256 od = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(d, 4), eight));
                    _mm256_storeu_ps(o + k, _mm256_fmadd_ps(ev, s, z));
                    _mm256_storeu_ps(o + k + 8, _mm256_fmadd_ps(od, s, z));
                }
            }
        } else { /* KEEL_W_INT8G */
            const int8_t *row = (const int8_t *)wp + n * K;
            for (int64_t g = 0; g < G; g++) {
                __m256 s = _mm256_set1_ps(scalar(scale, sdtype, n * G + g));
                for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
                    __m128i b = _mm_loadl_epi64((const __m128i *)(row + k));
                    _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), s));
                }
            }
        }
    }
}

/* out [M, K]: in each 16 channels of x, the 8 even ones, then the 8 odd ones. */
static void permute16(const float *x, float *out, int64_t M, int64_t K) {
    for (int64_t i = 0; i < M * K; i += 16)
        for (int j = 0; j < 8; j++) {
            out[i + j] = x[i + 2 * j];
            out[i + 8 + j] = x[i + 2 * j + 1];
        }
}

/* out[0..G) = elements off..off+G of a scale or zero table, as float32. */
static inline void widen(const void *t, int sdtype, int64_t off, int64_t G, float *out) {
    int64_t g = 0;
    if (sdtype == KEEL_S_F16)
        for (; g + 8 <= G; g += 8)
            _mm256_storeu_ps(out + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)t + off + g))));
    else if (sdtype == KEEL_S_BF16)
        for (; g + 8 <= G; g += 8)
            _mm256_storeu_ps(out + g, _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)t + off + g))), 16)));
    for (; g < G; g++) out[g] = scalar(t, sdtype, off + g);
}

/* The accumulators of the few-row paths, as named variables: held in an array, GCC kept them in memory and
 * stored all of them on every iteration (4 stores per 32 weights), which bounded the loop. Pair (i, j):
 * row i of x, output row j; b: the odd channels / second half, when split. */
#define FEW_PAIRS(X) X(0, 0) X(0, 1) X(1, 0) X(1, 1) X(2, 0) X(2, 1) X(3, 0) X(3, 1)
#define FEW_DECL(i, j) __m256 a##i##j = _mm256_setzero_ps(), b##i##j = _mm256_setzero_ps();
#define FEW_STEP(i, j)                                                                    \
    if (i < mb && j < nb) {                                                               \
        a##i##j = _mm256_fmadd_ps(wa##j, xa##i, a##i##j);                                 \
        if (split)                                                                        \
            b##i##j = _mm256_fmadd_ps(wb##j, xb##i, b##i##j);                             \
        else                                                                              \
            a##i##j = _mm256_fmadd_ps(wb##j, xb##i, a##i##j);                             \
    }
#define FEW_OUT(i, j) \
    if (i < mb && j < nb) y[i * N + n + j] = hsum(split ? _mm256_add_ps(a##i##j, b##i##j) : a##i##j);
#define FEW_LOADX(i, ptr)                                              \
    if (i < mb) {                                                      \
        xa##i = _mm256_loadu_ps((ptr) + i * K);                        \
        xb##i = _mm256_loadu_ps((ptr) + i * K + 8);                    \
    }

/* 16 int4 weights of one row at p (8 bytes) as decode_panel widens them, (code - 8) * s + z in one fma:
 * the even channels to *a, the odd ones to *b. */
static inline __attribute__((always_inline)) void widen_int4(const uint8_t *p, __m256 sv, __m256 zv, __m256 *a,
                                                              __m256 *b) {
    const __m256i low = _mm256_set1_epi32(0x0F), eight = _mm256_set1_epi32(8);
    __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(d, low), eight)), sv, zv);
    *b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(d, 4), eight)), sv, zv);
}

/* 16 int8 weights of one row at p, the first 8 times s0 to *a, the next 8 times s1 to *b. */
static inline __attribute__((always_inline)) void widen_int8(const int8_t *p, __m256 s0, __m256 s1, __m256 *a,
                                                              __m256 *b) {
    __m128i q = _mm_loadu_si128((const __m128i *)p);
    *a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s0);
    *b = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), s1);
}

/* The (rows of x, output rows) shapes of the few-row paths: CALL(mb, nb) with both constant. */
#define FEW_SWITCH(CALL)                                                                  \
    switch (mb * 4 + nb) {                                                                \
    case 1 * 4 + 1: CALL(1, 1); break;                                                    \
    case 1 * 4 + 2: CALL(1, 2); break;                                                    \
    case 2 * 4 + 1: CALL(2, 1); break;                                                    \
    case 2 * 4 + 2: CALL(2, 2); break;                                                    \
    case 3 * 4 + 1: CALL(3, 1); break;                                                    \
    case 3 * 4 + 2: CALL(3, 2); break;                                                    \
    case 4 * 4 + 1: CALL(4, 1); break;                                                    \
    case 4 * 4 + 2: CALL(4, 2); break;                                                    \
    }

/* INT4 for a few rows (M <= MB), the weights widened in registers and never stored: output rows n..n+nb of
 * y = x . w, w = (code - 8) s + z as decode_panel widens it, summed in the panel path's order (see the
 * top). xp is x permuted by permute16 (the order the codes widen in). Two output rows at a time. */
static inline __attribute__((always_inline)) void int4_few(const float *xp, const uint8_t *w, const void *scale,
                                                            const void *zero, int sdtype, int64_t group, float *y,
                                                            int64_t N, int64_t K, int64_t n, const int mb,
                                                            const int nb) {
    const int split = 0; /* one accumulator, as tile */
    const int64_t G = K / group;
    const int64_t B = K / 16;
    const int sh = __builtin_ctzll((unsigned long long)(group / 16)); /* block of 16 channels -> group */
    float sf[2][FEW_MAXG], zf[2][FEW_MAXG];
    for (int j = 0; j < nb; j++) {
        widen(scale, sdtype, (n + j) * G, G, sf[j]);
        widen(zero, sdtype, (n + j) * G, G, zf[j]);
    }
    FEW_PAIRS(FEW_DECL)
    const uint8_t *w0 = w + n * (K / 2), *w1 = w0 + K / 2;
    for (int64_t bl = 0; bl < B; bl++) {
        __m256 wa0, wb0, wa1 = _mm256_setzero_ps(), wb1 = _mm256_setzero_ps();
        __m256 xa0, xb0, xa1 = wa1, xb1 = wa1, xa2 = wa1, xb2 = wa1, xa3 = wa1, xb3 = wa1;
        widen_int4(w0 + 8 * bl, _mm256_broadcast_ss(&sf[0][bl >> sh]), _mm256_broadcast_ss(&zf[0][bl >> sh]), &wa0, &wb0);
        if (nb > 1)
            widen_int4(w1 + 8 * bl, _mm256_broadcast_ss(&sf[1][bl >> sh]), _mm256_broadcast_ss(&zf[1][bl >> sh]),
                       &wa1, &wb1);
        xa0 = _mm256_loadu_ps(xp + 16 * bl);
        xb0 = _mm256_loadu_ps(xp + 16 * bl + 8);
        FEW_LOADX(1, xp + 16 * bl) FEW_LOADX(2, xp + 16 * bl) FEW_LOADX(3, xp + 16 * bl)
        FEW_PAIRS(FEW_STEP)
    }
    FEW_PAIRS(FEW_OUT)
}

#define INT4_FEW(a, b) int4_few(xp, w, scale, zero, sdtype, group, y, N, K, n, a, b)

static void int4_few_any(const float *xp, const uint8_t *w, const void *scale, const void *zero,
                         int sdtype, int64_t group, float *y, int64_t N, int64_t K, int64_t n, int mb, int nb) {
    FEW_SWITCH(INT4_FEW)
}

/* INT8G for a few rows (M <= MB), like int4_few: w = code * s widened in registers, two output rows at a
 * time. sh: log2 of the 8-channel blocks per group (a large shift when one group spans the row). */
static inline __attribute__((always_inline)) void int8_few(const float *x, const int8_t *w, const void *scale,
                                                            int sdtype, int64_t G, int sh, float *y, int64_t N,
                                                            int64_t K, int64_t n, const int mb, const int nb) {
    const int split = 0; /* one accumulator, as tile (see the top) */
    float sf[2][FEW_MAXG];
    for (int j = 0; j < nb; j++) widen(scale, sdtype, (n + j) * G, G, sf[j]);
    FEW_PAIRS(FEW_DECL)
    const int8_t *w0 = w + n * K, *w1 = w0 + K;
    for (int64_t bl = 0; bl < K / 8; bl += 2) {
        __m256 wa0, wb0, wa1 = _mm256_setzero_ps(), wb1 = _mm256_setzero_ps();
        __m256 xa0, xb0, xa1 = wa1, xb1 = wa1, xa2 = wa1, xb2 = wa1, xa3 = wa1, xb3 = wa1;
        widen_int8(w0 + 8 * bl, _mm256_broadcast_ss(&sf[0][bl >> sh]), _mm256_broadcast_ss(&sf[0][(bl + 1) >> sh]),
                   &wa0, &wb0);
        if (nb > 1)
            widen_int8(w1 + 8 * bl, _mm256_broadcast_ss(&sf[1][bl >> sh]),
                       _mm256_broadcast_ss(&sf[1][(bl + 1) >> sh]), &wa1, &wb1);
        xa0 = _mm256_loadu_ps(x + 8 * bl);
        xb0 = _mm256_loadu_ps(x + 8 * bl + 8);
        FEW_LOADX(1, x + 8 * bl) FEW_LOADX(2, x + 8 * bl) FEW_LOADX(3, x + 8 * bl)
        FEW_PAIRS(FEW_STEP)
    }
    FEW_PAIRS(FEW_OUT)
}

#define INT8_FEW(a, b) int8_few(x, w, scale, sdtype, G, sh, y, N, K, n, a, b)

static void int8_few_any(const float *x, const int8_t *w, const void *scale, int sdtype, int64_t G, int sh, float *y,
                         int64_t N, int64_t K, int64_t n, int mb, int nb) {
    FEW_SWITCH(INT8_FEW)
}

/* y [M, N] = x [M, K] Wᵀ. Returns KEEL_OK, KEEL_EINVAL (the preconditions at the top of this file; nothing
 * computed) or KEEL_ENOMEM. Scratch: the calling thread's slot 3 (int4's permuted x), each thread's slot 2
 * (a widened panel). */
int keel_gemm(const float *x, int fmt, const void *w, const void *scale, const void *zero, int sdtype, int64_t group,
              float *y, int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 0 || N < 0 || K <= 0 || K % 8 != 0 || sdtype < 0 || sdtype > 2) return KEEL_EINVAL;
    if (fmt == KEEL_W_INT4 && (group <= 0 || group % 16 != 0 || K % group != 0)) return KEEL_EINVAL;
    if (fmt == KEEL_W_INT8G && (group <= 0 || group % 8 != 0 || K % group != 0)) return KEEL_EINVAL;
    if (fmt != KEEL_W_F32 && fmt != KEEL_W_BF16 && fmt != KEEL_W_INT4 && fmt != KEEL_W_INT8G) return KEEL_EINVAL;
    if (M == 0 || N == 0) return KEEL_OK;
    /* panel rows: a multiple of NB whose float32 copy is about 16 KB (all of the panel in L1) */
    int64_t P = (16384 / (4 * K)) / NB * NB;
    if (P < NB) P = NB;
    if (fmt == KEEL_W_F32) P = 4 * NB;
    const int64_t panels = (N + P - 1) / P;
    int failed = 0;
#ifdef __AVX512F__
    const int wide = (fmt == KEEL_W_F32 || fmt == KEEL_W_BF16) && K % 16 == 0;
#endif
    if (fmt == KEEL_W_INT4) {
        float *xp = keel_scratch(3, (size_t)(M * K * 4));
        if (xp == NULL) return KEEL_ENOMEM;
        permute16(x, xp, M, K);
        x = xp;
    }
    if (fmt == KEEL_W_INT8G && M <= MB && K % 16 == 0 && K / group <= FEW_MAXG) {
        const int64_t G = K / group, blocks = group / 8;
        if (G == 1 || (blocks & (blocks - 1)) == 0) {
            const int sh = G == 1 ? 62 : __builtin_ctzll((unsigned long long)blocks);
#pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t n = 0; n < N; n += 2)
                int8_few_any(x, (const int8_t *)w, scale, sdtype, G, sh, y, N, K, n, (int)M, N - n < 2 ? 1 : 2);
            return KEEL_OK;
        }
    }
    if (fmt == KEEL_W_INT4 && M <= MB && ((group / 16) & (group / 16 - 1)) == 0 && K / group <= FEW_MAXG) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n += 2)
            int4_few_any(x, (const uint8_t *)w, scale, zero, sdtype, group, y, N, K, n, (int)M,
                         N - n < 2 ? 1 : 2);
        return KEEL_OK;
    }
#pragma omp parallel num_threads(threads)
    {
        float *scratch = NULL;
        if (fmt != KEEL_W_F32) {
            scratch = keel_scratch(2, (size_t)(P * K * 4));
            if (scratch == NULL) failed = 1;
        }
        /* Rows of x in chunks of about 256 KB, each chunk against every panel: with many rows (a prefill
         * chunk) x would otherwise stream from memory once per panel. The order of a row's sums is the
         * tile's whatever the chunking, so a row's result does not depend on M. */
        int64_t mch = (262144 / (4 * K)) / MB * MB;
        if (mch < MB) mch = MB;
        for (int64_t mc = 0; mc < M; mc += mch) {
        const int64_t mend = mc + mch < M ? mc + mch : M;
#pragma omp for schedule(static)
        for (int64_t pi = 0; pi < panels; pi++) {
            if (fmt != KEEL_W_F32 && scratch == NULL) continue;
            int64_t n0 = pi * P, p = N - n0 < P ? N - n0 : P;
            const float *wf;
            if (fmt == KEEL_W_F32) {
                wf = (const float *)w + n0 * K;
            } else {
                decode_panel(fmt, w, scale, zero, sdtype, group, n0, p, K, scratch);
                wf = scratch;
            }
            for (int64_t m0 = mc; m0 < mend; m0 += MB) {
                int mb = (int)(mend - m0 < MB ? mend - m0 : MB);
                for (int64_t j0 = 0; j0 < p; j0 += NB) {
                    int nb = (int)(p - j0 < NB ? p - j0 : NB);
#ifdef __AVX512F__
                    if (wide)
                        tile16_any(x + m0 * K, K, wf + j0 * K, K, y + m0 * N + n0 + j0, N, K, mb, nb);
                    else
#endif
                        tile_any(x + m0 * K, K, wf + j0 * K, K, y + m0 * N + n0 + j0, N, K, mb, nb);
                }
            }
        }
        }
    }
    return failed ? KEEL_ENOMEM : KEEL_OK;
}
