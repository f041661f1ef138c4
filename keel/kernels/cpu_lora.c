/* Batched LoRA for float32 activations on x86 CPUs with AVX2 and FMA: every active adapter's low-rank
 * update added to its own tokens in one call per projection, adapter weights stored as float32 or
 * bfloat16 (widened in registers: half the bytes to stream, the same products). keel/lora/layers.py calls it through keel/kernels/cpu.py
 * and says why it exists.
 *
 * For each listed slot s (its tokens are rows start .. start + count of x and y):
 *   shrink  h[t, i*n + k]   = sum_j x[t, j] * a[s, i*n + k, j]       for i < rank[k][s]
 *   expand  y[t, off_k + o] += scale[k][s] * sum_i h[t, i*n + k] * b_k[s, i, o]     for i < rank[k][s]
 * a: [L, max_rank * n, in] (rank-major over the n output shards); b_k: [L, max_rank, out_k]; ranks
 * int32 and scales float32: [n, L]; h: scratch with max_rank * n floats per row of x.
 *
 * Each adapter's weights are read once per step whatever its token count, every real token row is
 * computed once and no padded row is, and nothing is gathered, copied or scattered around the two
 * products. Work is split across OpenMP threads by (slot, 4 rows of a) and (slot, shard, 512 columns).
 */
#include "cpu_simd.h"
#include <immintrin.h>
#include <stdint.h>

#define TB 4  /* token rows per pass */
#define RB 2  /* rows of a per shrink item (with few slots): RB * 2 */
#define CW 512 /* output columns per expand item */
#define MAXN 8

/* 8 weights widened to float32: float32 as is, bfloat16 by a shift (it is a float32's top half) */
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
static inline float load1_f32(const float *p) { return *p; }
static inline float load1_bf16(const uint16_t *p) { return bf16_to_f32(*p); }

static inline int slot_rank(const int32_t *ranks, int64_t n, int64_t L, int64_t s) {
    int r = 0;
    for (int64_t k = 0; k < n; k++)
        if (ranks[k * L + s] > r) r = ranks[k * L + s];
    return r;
}

#define DEFINE_LORA(SUF, WT, LOAD8, LOAD1) \
/* h[t, r] = x[t] . as[r] for rows r0 .. r1 of one slot's a and its tokens t < T (x, h at that slot). \
 * Blocks of R rows x TT tokens keep 8 independent FMA chains in flight whatever the token count (a \
 * decode slot has one token: 8 rows at once, not 2 chains waiting on FMA latency); rows and tokens \
 * past the end repeat the last one and are not stored, so the loop bounds stay constants. */ \
static inline __attribute__((always_inline)) void shrink_block_##SUF( \
        const float *x, float *h, const WT *as, int64_t in, int64_t hr, int64_t t0, int tb, int64_t r, int rb, \
        const int R, const int TT) { \
    int64_t in8 = in & ~(int64_t)7; \
    const WT *ar[8]; \
    const float *xt[4]; \
    for (int i = 0; i < R; i++) ar[i] = as + (r + (i < rb ? i : rb - 1)) * in; \
    for (int t = 0; t < TT; t++) xt[t] = x + (t0 + (t < tb ? t : tb - 1)) * in; \
    __m256 acc[8][4]; \
    for (int i = 0; i < R; i++) \
        for (int t = 0; t < TT; t++) acc[i][t] = _mm256_setzero_ps(); \
    for (int64_t j = 0; j < in8; j += 8) { \
        __m256 xv[4]; \
        for (int t = 0; t < TT; t++) xv[t] = _mm256_loadu_ps(xt[t] + j); \
        for (int i = 0; i < R; i++) { \
            __m256 w = LOAD8(ar[i] + j); \
            for (int t = 0; t < TT; t++) acc[i][t] = _mm256_fmadd_ps(w, xv[t], acc[i][t]); \
        } \
    } \
    for (int i = 0; i < rb; i++) \
        for (int t = 0; t < tb; t++) { \
            float v = hsum(acc[i][t]); \
            for (int64_t j = in8; j < in; j++) v += LOAD1(ar[i] + j) * xt[t][j]; \
            h[(t0 + t) * hr + r + i] = v; \
        } \
} \
 \
static void shrink_rows_##SUF(const float *x, float *h, const WT *as, int64_t in, int64_t hr, \
                        int64_t T, int64_t r0, int64_t r1) { \
    for (int64_t t0 = 0; t0 < T; t0 += TB) { \
        int tb = (int)(T - t0 < TB ? T - t0 : TB); \
        int R = tb == 1 ? 8 : tb == 2 ? 4 : 2; \
        for (int64_t r = r0; r < r1; r += R) { \
            int rb = (int)(r1 - r < R ? r1 - r : R); \
            if (tb == 1) shrink_block_##SUF(x, h, as, in, hr, t0, tb, r, rb, 8, 1); \
            else if (tb == 2) shrink_block_##SUF(x, h, as, in, hr, t0, tb, r, rb, 4, 2); \
            else shrink_block_##SUF(x, h, as, in, hr, t0, tb, r, rb, 2, 4); \
        } \
    } \
} \
 \
/* y[t, ycol .. ycol + w] += scale * sum_i h[t, i*n + k] * bs[i, c0 .. c0 + w] for tokens t < T, i < rk. \
 * 64 columns of one token accumulate in 8 registers over all rk rows, then y is written once; the \
 * rk x 64 piece of b stays in L1 for the slot's other tokens. (Adding row by row into y instead is \
 * bound by y's loads and stores: 4x slower, measured.) */ \
static void expand_cols_##SUF(const float *h, float *y, const WT *bs, int64_t hr, int64_t n, int64_t k, \
                        int64_t ldy, int64_t outk, int64_t T, int rk, float scale, int64_t c0, int64_t ycol, int64_t w) { \
    int64_t c = 0; \
    for (; c + 64 <= w; c += 64) { \
        /* b's rows two chunks ahead: rk separate streams outpace the hardware prefetcher on cold b */ \
        for (int i = 0; i < rk; i++) \
            for (int l = 0; l < (int)(64 * sizeof(WT)); l += 64) \
                _mm_prefetch((const char *)(bs + i * outk + c0 + c + 128) + l, _MM_HINT_T0); \
        for (int64_t t = 0; t < T; t++) { \
            float *yt = y + t * ldy + ycol + c; \
            const float *ht = h + t * hr + k; \
            __m256 acc[8]; \
            for (int v = 0; v < 8; v++) acc[v] = _mm256_loadu_ps(yt + 8 * v); \
            for (int i = 0; i < rk; i++) { \
                __m256 hv = _mm256_set1_ps(scale * ht[i * n]); \
                const WT *bi = bs + i * outk + c0 + c; \
                for (int v = 0; v < 8; v++) acc[v] = _mm256_fmadd_ps(hv, LOAD8(bi + 8 * v), acc[v]); \
            } \
            for (int v = 0; v < 8; v++) _mm256_storeu_ps(yt + 8 * v, acc[v]); \
        } \
    } \
    for (; c + 8 <= w; c += 8) \
        for (int64_t t = 0; t < T; t++) { \
            float *yt = y + t * ldy + ycol + c; \
            __m256 acc = _mm256_loadu_ps(yt); \
            for (int i = 0; i < rk; i++) \
                acc = _mm256_fmadd_ps(_mm256_set1_ps(scale * h[t * hr + i * n + k]), LOAD8(bs + i * outk + c0 + c), acc); \
            _mm256_storeu_ps(yt, acc); \
        } \
    for (; c < w; c++) \
        for (int64_t t = 0; t < T; t++) { \
            float v = 0.0f; \
            for (int i = 0; i < rk; i++) v += h[t * hr + i * n + k] * LOAD1(bs + i * outk + c0 + c); \
            y[t * ldy + ycol + c] += scale * v; \
        } \
} \
 \
/* slots[m], start[m], count[m]: the m-th slot to apply and its rows of x / y / h, m < M. out[k]: the \
 * width of shard k, n <= MAXN; b[k] its stack. y rows have ldy floats, shard k at columns off[k]. */ \
void keel_lora_##SUF(const float *x, float *y, float *h, const WT *a, const WT *const *b, \
                   const int64_t *out, const int32_t *ranks, const float *scales, const int32_t *slots, const int32_t *start, \
                   const int32_t *count, int64_t M, int64_t n, int64_t in, int64_t ldy, int64_t max_rank, \
                   int64_t L, int threads) { \
    int64_t hr = max_rank * n; \
    /* Enough slots to share out: each item streams one slot's whole a, or whole b_k (contiguous). \
     * Few slots: smaller pieces, so every thread has work. */ \
    int whole = M >= 4 * threads; \
    int64_t rblk = whole ? hr : RB * 2, cw = whole ? (int64_t)1 << 40 : CW; \
    int64_t nrb = (hr + rblk - 1) / rblk; /* shrink items per slot */ \
    int64_t off[MAXN], nchunk[MAXN], chunks = 0; \
    for (int64_t k = 0, o = 0; k < n; k++) { \
        off[k] = o; \
        o += out[k]; \
        nchunk[k] = (out[k] + cw - 1) / cw; \
        chunks += nchunk[k]; \
    } \
_Pragma("omp parallel num_threads(threads)") \
    { \
_Pragma("omp for schedule(dynamic) collapse(2)") \
        for (int64_t m = 0; m < M; m++) \
            for (int64_t blk = 0; blk < nrb; blk++) { \
                int64_t s = slots[m], rows = (int64_t)slot_rank(ranks, n, L, s) * n; \
                int64_t r0 = blk * rblk, r1 = r0 + rblk < rows ? r0 + rblk : rows; \
                if (r0 >= rows) continue; \
                shrink_rows_##SUF(x + (int64_t)start[m] * in, h + (int64_t)start[m] * hr, a + s * hr * in, in, hr, \
                            count[m], r0, r1); \
            } \
_Pragma("omp for schedule(dynamic) collapse(2)") \
        for (int64_t m = 0; m < M; m++) \
            for (int64_t g = 0; g < chunks; g++) { \
                int64_t k = 0, c = g; \
                while (c >= nchunk[k]) c -= nchunk[k++]; \
                int64_t s = slots[m]; \
                int rk = ranks[k * L + s]; \
                if (rk == 0) continue; \
                int64_t c0 = c * cw, w = out[k] - c0 < cw ? out[k] - c0 : cw; \
                expand_cols_##SUF(h + (int64_t)start[m] * hr, y + (int64_t)start[m] * ldy, b[k] + s * max_rank * out[k], \
                            hr, n, k, ldy, out[k], count[m], rk, scales[k * L + s], c0, off[k] + c0, w); \
            } \
    } \
}

DEFINE_LORA(f32, float, load8_f32, load1_f32)
DEFINE_LORA(bf16, uint16_t, load8_bf16, load1_bf16)
