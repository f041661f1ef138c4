/* Batched LoRA for float32 on x86 CPUs with AVX2 and FMA: every active adapter's low-rank update added
 * to its own tokens in one call per projection. keel/lora/layers.py calls it through keel/kernels/cpu.py
 * and says why it exists.
 *
 * For each listed slot s (its tokens are rows start .. start + count of x and y):
 *   shrink  h[t, i*n + k]   = sum_j x[t, j] * a[s, i*n + k, j]       for i < rank[k][s]
 *   expand  y[t, off_k + o] += sum_i h[t, i*n + k] * b_k[s, i, o]     for i < rank[k][s]
 * a: [L, max_rank * n, in] (rank-major over the n output shards); b_k: [L, max_rank, out_k] with the
 * scale folded in; ranks: [n, L]; h: scratch with max_rank * n floats per row of x.
 *
 * Each adapter's weights are read once per step whatever its token count, every real token row is
 * computed once and no padded row is, and nothing is gathered, copied or scattered around the two
 * products. Work is split across OpenMP threads by (slot, 4 rows of a) and (slot, shard, 512 columns).
 */
#include <immintrin.h>
#include <stdint.h>

#define TB 4  /* token rows per pass */
#define RB 2  /* rows of a per shrink item: 2 x TB accumulators */
#define CW 512 /* output columns per expand item */
#define MAXN 8

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int slot_rank(const int32_t *ranks, int64_t n, int64_t L, int64_t s) {
    int r = 0;
    for (int64_t k = 0; k < n; k++)
        if (ranks[k * L + s] > r) r = ranks[k * L + s];
    return r;
}

/* h[t, r] = x[t] . as[r] for rows r0 .. r1 of one slot's a and its tokens t < T (x, h at that slot). */
static void shrink_rows(const float *x, float *h, const float *as, int64_t in, int64_t hr,
                        int64_t T, int64_t r0, int64_t r1) {
    int64_t in8 = in & ~(int64_t)7;
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
        int tb = (int)(T - t0 < TB ? T - t0 : TB);
        for (int64_t r = r0; r < r1; r += RB) {
            int rb = (int)(r1 - r < RB ? r1 - r : RB);
            __m256 acc[RB][TB];
            for (int i = 0; i < RB; i++)
                for (int t = 0; t < TB; t++) acc[i][t] = _mm256_setzero_ps();
            for (int64_t j = 0; j < in8; j += 8) {
                for (int i = 0; i < rb; i++) {
                    __m256 w = _mm256_loadu_ps(as + (r + i) * in + j);
                    for (int t = 0; t < tb; t++)
                        acc[i][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (t0 + t) * in + j), acc[i][t]);
                }
            }
            for (int i = 0; i < rb; i++)
                for (int t = 0; t < tb; t++) {
                    float v = hsum8(acc[i][t]);
                    for (int64_t j = in8; j < in; j++) v += as[(r + i) * in + j] * x[(t0 + t) * in + j];
                    h[(t0 + t) * hr + r + i] = v;
                }
        }
    }
}

/* y[t, ycol .. ycol + w] += sum_i h[t, i*n + k] * bs[i, c0 .. c0 + w] for tokens t < T and i < rk.
 * Row by row of b (axpy into y, which stays in L1): b is read front to back, in runs of w floats, so
 * the hardware prefetcher streams a cold adapter from memory; a register-blocked loop over 16
 * columns and all rows reads it in rk scattered cache lines per step and measured slower. */
static void expand_cols(const float *h, float *y, const float *bs, int64_t hr, int64_t n, int64_t k,
                        int64_t ldy, int64_t outk, int64_t T, int rk, int64_t c0, int64_t ycol, int64_t w) {
    int64_t w8 = w & ~(int64_t)7;
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
        int tb = (int)(T - t0 < TB ? T - t0 : TB);
        for (int i = 0; i < rk; i++) {
            const float *bi = bs + i * outk + c0;
            float hs[TB];
            __m256 hv[TB];
            for (int t = 0; t < tb; t++) {
                hs[t] = h[(t0 + t) * hr + i * n + k];
                hv[t] = _mm256_set1_ps(hs[t]);
            }
            for (int64_t c = 0; c < w8; c += 8) {
                __m256 b = _mm256_loadu_ps(bi + c);
                for (int t = 0; t < tb; t++) {
                    float *yt = y + (t0 + t) * ldy + ycol + c;
                    _mm256_storeu_ps(yt, _mm256_fmadd_ps(hv[t], b, _mm256_loadu_ps(yt)));
                }
            }
            for (int64_t c = w8; c < w; c++)
                for (int t = 0; t < tb; t++) y[(t0 + t) * ldy + ycol + c] += hs[t] * bi[c];
        }
    }
}

/* slots[m], start[m], count[m]: the m-th slot to apply and its rows of x / y / h, m < M. out[k]: the
 * width of shard k, n <= MAXN; b[k] its stack. y rows have ldy floats, shard k at columns off[k]. */
void keel_lora_f32(const float *x, float *y, float *h, const float *a, const float *const *b,
                   const int64_t *out, const int32_t *ranks, const int32_t *slots, const int32_t *start,
                   const int32_t *count, int64_t M, int64_t n, int64_t in, int64_t ldy, int64_t max_rank,
                   int64_t L, int threads) {
    int64_t hr = max_rank * n;
    int64_t nrb = (hr + RB * 2 - 1) / (RB * 2); /* shrink items per slot: blocks of 2 RB rows */
    int64_t off[MAXN], nchunk[MAXN], chunks = 0;
    for (int64_t k = 0, o = 0; k < n; k++) {
        off[k] = o;
        o += out[k];
        nchunk[k] = (out[k] + CW - 1) / CW;
        chunks += nchunk[k];
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic) collapse(2)
        for (int64_t m = 0; m < M; m++)
            for (int64_t blk = 0; blk < nrb; blk++) {
                int64_t s = slots[m], rows = (int64_t)slot_rank(ranks, n, L, s) * n;
                int64_t r0 = blk * RB * 2, r1 = r0 + RB * 2 < rows ? r0 + RB * 2 : rows;
                if (r0 >= rows) continue;
                shrink_rows(x + (int64_t)start[m] * in, h + (int64_t)start[m] * hr, a + s * hr * in, in, hr,
                            count[m], r0, r1);
            }
#pragma omp for schedule(dynamic) collapse(2)
        for (int64_t m = 0; m < M; m++)
            for (int64_t g = 0; g < chunks; g++) {
                int64_t k = 0, c = g;
                while (c >= nchunk[k]) c -= nchunk[k++];
                int64_t s = slots[m];
                int rk = ranks[k * L + s];
                if (rk == 0) continue;
                int64_t c0 = c * CW, w = out[k] - c0 < CW ? out[k] - c0 : CW;
                expand_cols(h + (int64_t)start[m] * hr, y + (int64_t)start[m] * ldy, b[k] + s * max_rank * out[k],
                            hr, n, k, ldy, out[k], count[m], rk, c0, off[k] + c0, w);
            }
    }
}
