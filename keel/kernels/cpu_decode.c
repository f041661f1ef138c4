/* The small ops of a float32 decode step around the matmuls, on x86 CPUs with AVX2 and FMA, each one
 * pass where PyTorch runs several ops and copies: attention over the paged KV cache, rotary embedding
 * with the cache write, SiLU-and-multiply, RMSNorm. Called through keel/kernels/cpu.py.
 *
 * Decode attention: one query token per request reads its keys and values where they lie in the cache
 * blocks. keel/layers/attention.py uses it for steps where every request decodes one token.
 *
 * For request b and query head h (kv head h / G, G = H / KVH):
 *   s[p] = scale * q[b, h] . k[slot(b, p), h / G]      p < ctx[b], slot from b's block table
 *   out[b, h] = sum_p softmax(s)[p] * v[slot(b, p), h / G]
 * Work is split across OpenMP threads by (request, kv head): the G query heads sharing a kv head read
 * each key and value row once.
 */
#include "cpu_simd.h"
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAXG 16

/* e^x, 8 at a time, x clamped to [-87, 88]: x = n ln2 + f with |f| <= ln2 / 2, e^f by its Taylor
 * series to f^7 (relative error < 2e-7 there), times 2^n built in the exponent bits. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
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

/* The 8 sums of 8 vectors, as one vector (a transposing reduction). */
static inline __m256 reduce8(const __m256 a[8]) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* One query token's G heads (qh, sharing kv head kh) over positions p < n of one request: row[p] is the
 * offset of position p's k / v row in the caches; s is scratch of G * n8 floats; o gets G * D floats. The
 * one body of both the decode and the prefill entry points, so a token's result is the same bits whichever
 * computes it. */
static inline __attribute__((always_inline)) void attend_one(const float *qh, const float *kc, const float *vc,
                                                              const int64_t *row, int64_t n, int64_t G, int64_t D,
                                                              float scale, float *s, float *o) {
    int64_t n8 = (n + 7) & ~(int64_t)7;
    __m256 sc = _mm256_set1_ps(scale);
    /* scores, 8 positions at a time: 8 accumulators, reduced together (positions past n repeat the last
     * one; their scores are overwritten below) */
    for (int64_t p0 = 0; p0 < n; p0 += 8) {
        const float *kp[8];
        for (int j = 0; j < 8; j++) kp[j] = kc + row[p0 + j < n ? p0 + j : n - 1];
        for (int64_t g = 0; g < G; g++) {
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                __m256 qv = _mm256_loadu_ps(qh + g * D + d);
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[j] + d), acc[j]);
            }
            _mm256_storeu_ps(s + g * n8 + p0, _mm256_mul_ps(reduce8(acc), sc));
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
    /* weighted values: 64 output dims of one head in 8 registers over all positions */
    for (int64_t g = 0; g < G; g++)
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
            int nv = (int)((D - d0 < 64 ? D - d0 : 64) / 8);
            __m256 acc[8];
            for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_ps();
            const float *sg = s + g * n8;
            for (int64_t p = 0; p < n; p++) {
                __m256 w = _mm256_set1_ps(sg[p]);
                const float *vr = vc + row[p] + d0;
                for (int v = 0; v < nv; v++) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + 8 * v), acc[v]);
            }
            __m256 iv = _mm256_set1_ps(inv[g]);
            for (int v = 0; v < nv; v++) _mm256_storeu_ps(o + g * D + d0 + 8 * v, _mm256_mul_ps(acc[v], iv));
        }
}

/* Query tokens t0 .. t1 of one request (rows first + t of q and out) for kv head kh: token t sits at
 * position start + t and sees positions p < start + t + 1 through the request's block table. The row
 * offsets and scratch (this thread's scratch slots 0 and 1) are shared by the tokens. Returns KEEL_OK or
 * KEEL_ENOMEM. */
static int attend_tokens(const float *q, int64_t ldq, const float *kc, const float *vc, const int64_t *table,
                         int64_t start, int64_t t0, int64_t t1, int64_t first, float *out, int64_t H, int64_t KVH,
                         int64_t kh, int64_t D, int64_t bs, float scale) {
    const int64_t G = H / KVH, nmax = start + t1, n8 = (nmax + 7) & ~(int64_t)7;
    float *s = keel_scratch(0, sizeof(float) * G * n8);
    int64_t *row = keel_scratch(1, sizeof(int64_t) * nmax); /* offset of position p's k / v row in the caches */
    if (s == NULL || row == NULL) return KEEL_ENOMEM;
    for (int64_t p = 0; p < nmax; p++) row[p] = ((table[p / bs] * bs + p % bs) * KVH + kh) * D;
    for (int64_t t = t0; t < t1; t++) {
        int64_t r = first + t;
        attend_one(q + r * ldq + kh * G * D, kc, vc, row, start + t + 1, G, D, scale, s, out + r * H * D + kh * G * D);
    }
    return KEEL_OK;
}

/* The shape preconditions both attention entry points share. */
static int bad_heads(int64_t H, int64_t KVH, int64_t D, int64_t bs, int64_t NB) {
    return H <= 0 || KVH <= 0 || H % KVH != 0 || H / KVH > MAXG || D <= 0 || D % 8 != 0 || bs <= 0 || NB <= 0;
}

/* q: [B, ldq] rows holding H heads of D at the start; caches [slots, KVH, D]; tables [B, NB] int64;
 * ctx [B] int32 (0 < ctx <= NB * bs); out [B, H * D]. D % 8 == 0, H % KVH == 0, H / KVH <= MAXG. Returns
 * KEEL_OK, KEEL_EINVAL (nothing computed) or KEEL_ENOMEM (out is then incomplete). */
int keel_decode_attention_f32(const float *q, int64_t ldq, const float *kc, const float *vc,
                              const int64_t *tables, const int32_t *ctx, float *out, int64_t B, int64_t H,
                              int64_t KVH, int64_t D, int64_t bs, int64_t NB, float scale, int threads) {
    if (B < 0 || bad_heads(H, KVH, D, bs, NB) || ldq < H * D) return KEEL_EINVAL;
    for (int64_t b = 0; b < B; b++)
        if (ctx[b] <= 0 || ctx[b] > NB * bs) return KEEL_EINVAL;
    int failed = 0;
#pragma omp parallel for schedule(dynamic) collapse(2) num_threads(threads)
    for (int64_t b = 0; b < B; b++)
        for (int64_t kh = 0; kh < KVH; kh++)
            if (attend_tokens(q, ldq, kc, vc, tables + b * NB, ctx[b] - 1, 0, 1, b, out, H, KVH, kh, D, bs, scale))
                failed = 1;
    return failed ? KEEL_ENOMEM : KEEL_OK;
}

#define QBLOCK 16 /* query tokens of one request per work item of the prefill entry point */

/* Several query tokens per request (prefill chunks, mixed steps): request b's qlen[b] tokens are rows
 * first[b] .. first[b] + qlen[b] of q and out, at positions ctx[b] - qlen[b] .. ctx[b] - 1, each over its own
 * causal context, computed exactly as keel_decode_attention_f32 computes a token at that position (the
 * same attend_tokens). Work items: (request, first token) of up to QBLOCK tokens, per kv head. B requests:
 * 0 < qlen[b] <= ctx[b] <= NB * bs. Returns as keel_decode_attention_f32. */
int keel_prefill_attention_f32(const float *q, int64_t ldq, const float *kc, const float *vc,
                               const int64_t *tables, const int32_t *ctx, const int32_t *qlen, const int64_t *first,
                               const int64_t *items, int64_t n_items, int64_t B, float *out, int64_t H, int64_t KVH,
                               int64_t D, int64_t bs, int64_t NB, float scale, int threads) {
    if (n_items < 0 || B < 0 || bad_heads(H, KVH, D, bs, NB) || ldq < H * D) return KEEL_EINVAL;
    for (int64_t b = 0; b < B; b++)
        if (qlen[b] <= 0 || qlen[b] > ctx[b] || ctx[b] > NB * bs || first[b] < 0) return KEEL_EINVAL;
    for (int64_t it = 0; it < n_items; it++) {
        int64_t b = items[2 * it], t0 = items[2 * it + 1];
        if (b < 0 || b >= B || t0 < 0 || t0 >= qlen[b]) return KEEL_EINVAL;
    }
    int failed = 0;
#pragma omp parallel for schedule(dynamic) collapse(2) num_threads(threads)
    for (int64_t it = 0; it < n_items; it++)
        for (int64_t kh = 0; kh < KVH; kh++) {
            int64_t b = items[2 * it], t0 = items[2 * it + 1];
            int64_t t1 = t0 + QBLOCK < qlen[b] ? t0 + QBLOCK : qlen[b];
            if (attend_tokens(q, ldq, kc, vc, tables + b * NB, ctx[b] - qlen[b], t0, t1, first[b], out, H, KVH, kh,
                              D, bs, scale))
                failed = 1;
        }
    return failed ? KEEL_ENOMEM : KEEL_OK;
}

/* out[m, i] = silu(gu[m, i]) * gu[m, I + i]: the gate and up halves of a fused gate_up projection. */
void keel_silu_mul_f32(const float *gu, float *out, int64_t M, int64_t I) {
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu + m * 2 * I, *u = g + I;
        float *o = out + m * I;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            __m256 x = _mm256_loadu_ps(g + i);
            __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            __m256 s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
        }
        for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* Rotary embedding (rotate-half layout) of the q and k heads of a fused qkv row, in place, then k and
 * v written to their cache slots. qkv [T, (H + 2 KVH) * D]; cos, sin [T, D / 2]; slots [T] int64;
 * caches [slots, KVH, D]. */
void keel_rope_cache_f32(float *qkv, const float *cos_t, const float *sin_t, const int64_t *slots,
                         float *kc, float *vc, int64_t T, int64_t H, int64_t KVH, int64_t D) {
    int64_t half = D / 2, row = (H + 2 * KVH) * D;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < H + KVH; h++) {
            float *x1 = qkv + t * row + h * D, *x2 = x1 + half;
            int64_t i = 0;
            for (; i + 8 <= half; i += 8) {
                __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
                __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
                _mm256_storeu_ps(x1 + i, _mm256_fmsub_ps(a, cv, _mm256_mul_ps(b, sv)));
                _mm256_storeu_ps(x2 + i, _mm256_fmadd_ps(b, cv, _mm256_mul_ps(a, sv)));
            }
            for (; i < half; i++) {
                float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
        const float *k = qkv + t * row + H * D, *v = k + KVH * D;
        memcpy(kc + slots[t] * KVH * D, k, sizeof(float) * KVH * D);
        memcpy(vc + slots[t] * KVH * D, v, sizeof(float) * KVH * D);
    }
}

/* y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w   (float32 [M, D]): RMSNorm in one pass over each row. */
void keel_rms_norm(const float *x, const float *w, float *y, int64_t M, int64_t D, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * D;
        float *ym = y + m * D;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= D; k += 16) {
            __m256 v0 = _mm256_loadu_ps(xm + k), v1 = _mm256_loadu_ps(xm + k + 8);
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
        }
        float ss = hsum(_mm256_add_ps(a0, a1));
        for (; k < D; k++) ss += xm[k] * xm[k];
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        __m256 rv = _mm256_set1_ps(r);
        for (k = 0; k + 8 <= D; k += 8)
            _mm256_storeu_ps(ym + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xm + k), rv), _mm256_loadu_ps(w + k)));
        for (; k < D; k++) ym[k] = xm[k] * r * w[k];
    }
}
