/* Decode attention over the paged KV cache, float32, on x86 CPUs with AVX2 and FMA: one query token per
 * request reads its keys and values where they lie in the cache blocks. keel/layers/attention.py calls
 * it through keel/kernels/cpu.py for steps where every request decodes one token, and says why.
 *
 * For request b and query head h (kv head h / G, G = H / KVH):
 *   s[p] = scale * q[b, h] . k[slot(b, p), h / G]      p < ctx[b], slot from b's block table
 *   out[b, h] = sum_p softmax(s)[p] * v[slot(b, p), h / G]
 * Work is split across OpenMP threads by (request, kv head): the G query heads sharing a kv head read
 * each key and value row once.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAXG 16
#define MAXD 256

/* e^x for x <= 0 (scores minus their maximum), 8 at a time: x = n ln2 + f with |f| <= ln2 / 2,
 * e^f by its Taylor series to f^7 (relative error < 2e-7 there), times 2^n built in the exponent bits. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts: exact n*hi */
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* q: [B, ldq] rows holding H heads of D at the start; caches [slots, KVH, D]; tables [B, NB] int64;
 * ctx [B] int32 (> 0); out [B, H * D]. D % 8 == 0, D <= MAXD, H / KVH <= MAXG. Returns 0, or -1 when a
 * scratch buffer could not be allocated (out is then incomplete). */
int keel_decode_attention_f32(const float *q, int64_t ldq, const float *kc, const float *vc,
                              const int64_t *tables, const int32_t *ctx, float *out, int64_t B, int64_t H,
                              int64_t KVH, int64_t D, int64_t bs, int64_t NB, float scale, int threads) {
    int64_t G = H / KVH;
    int failed = 0;
#pragma omp parallel for schedule(dynamic) collapse(2) num_threads(threads)
    for (int64_t b = 0; b < B; b++)
        for (int64_t kh = 0; kh < KVH; kh++) {
            int64_t n = ctx[b], n8 = (n + 7) & ~(int64_t)7;
            float *s = malloc(sizeof(float) * G * n8);
            if (s == NULL) {
                failed = 1;
                continue;
            }
            const int64_t *table = tables + b * NB;
            const float *qh = q + b * ldq + kh * G * D;
            for (int64_t p = 0; p < n; p++) {
                int64_t slot = table[p / bs] * bs + p % bs;
                const float *k = kc + (slot * KVH + kh) * D;
                for (int64_t g = 0; g < G; g++) {
                    __m256 acc = _mm256_setzero_ps();
                    for (int64_t d = 0; d < D; d += 8)
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + g * D + d), _mm256_loadu_ps(k + d), acc);
                    s[g * n8 + p] = hsum(acc) * scale;
                }
            }
            float inv[MAXG];
            for (int64_t g = 0; g < G; g++) {
                float *sg = s + g * n8, m = -INFINITY;
                for (int64_t p = 0; p < n; p++) m = sg[p] > m ? sg[p] : m;
                for (int64_t p = n; p < n8; p++) sg[p] = -INFINITY;
                __m256 mv = _mm256_set1_ps(m), sum = _mm256_setzero_ps();
                for (int64_t p = 0; p < n8; p += 8) {
                    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + p), mv));
                    _mm256_storeu_ps(sg + p, e);
                    sum = _mm256_add_ps(sum, e);
                }
                inv[g] = 1.0f / hsum(sum);
            }
            float acc[MAXG * MAXD];
            for (int64_t i = 0; i < G * D; i++) acc[i] = 0.0f;
            for (int64_t p = 0; p < n; p++) {
                int64_t slot = table[p / bs] * bs + p % bs;
                const float *v = vc + (slot * KVH + kh) * D;
                for (int64_t g = 0; g < G; g++) {
                    __m256 w = _mm256_set1_ps(s[g * n8 + p]);
                    float *a = acc + g * D;
                    for (int64_t d = 0; d < D; d += 8)
                        _mm256_storeu_ps(a + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(v + d), _mm256_loadu_ps(a + d)));
                }
            }
            float *o = out + b * H * D + kh * G * D;
            for (int64_t g = 0; g < G; g++)
                for (int64_t d = 0; d < D; d++) o[g * D + d] = acc[g * D + d] * inv[g];
            free(s);
        }
    return failed ? -1 : 0;
}
