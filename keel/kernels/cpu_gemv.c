/* Weight-only int8, int4 and bfloat16 matrix products for a few rows of float32 activations (decode steps), on
 * x86 CPUs with AVX2 and FMA. keel/kernels/cpu.py compiles this file at first use and calls it with
 * ctypes; see there for why it exists.
 *
 * Both read each weight row once, widen its codes to float32 in registers and multiply-add them with
 * every activation row, so memory traffic is the quantized bytes and the activations stay float32.
 * Output rows are split across OpenMP threads (the same libgomp runtime torch uses).
 */
#include "cpu_simd.h"
#include <immintrin.h>
#include <stdint.h>
#include <math.h>

#define MBLK 4 /* activation rows per pass: 2 accumulators each, 8 of AVX2's 16 registers */

/* y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]   (x [M, K], w int8 [N, K], y [M, N]); K % 16 == 0 */
void keel_int8_gemm(const float *x, const int8_t *w, const float *scale, float *y,
                    int64_t M, int64_t N, int64_t K, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += MBLK) {
            int mb = (int)(M - m0 < MBLK ? M - m0 : MBLK);
            __m256 a0[MBLK], a1[MBLK];
            for (int i = 0; i < MBLK; i++) a0[i] = a1[i] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                __m128i b = _mm_loadu_si128((const __m128i *)(row + k));
                __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
                __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
                for (int i = 0; i < mb; i++) {
                    const float *xm = x + (m0 + i) * K + k;
                    a0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a0[i]);
                    a1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a1[i]);
                }
            }
            for (int i = 0; i < mb; i++) y[(m0 + i) * N + n] = hsum(_mm256_add_ps(a0[i], a1[i])) * scale[n];
        }
    }
}

/* y[m, n] = sum_k x[m, k] * w[n, k]   (x float32 [M, K], w bfloat16 [N, K], y float32); K % 16 == 0.
 * bfloat16 is the top half of a float32: widening is a shift. */
void keel_bf16_gemm(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *row = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += MBLK) {
            int mb = (int)(M - m0 < MBLK ? M - m0 : MBLK);
            __m256 a0[MBLK], a1[MBLK];
            for (int i = 0; i < MBLK; i++) a0[i] = a1[i] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                __m256i b = _mm256_loadu_si256((const __m256i *)(row + k));
                __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(b)), 16));
                __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(b, 1)), 16));
                for (int i = 0; i < mb; i++) {
                    const float *xm = x + (m0 + i) * K + k;
                    a0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a0[i]);
                    a1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a1[i]);
                }
            }
            for (int i = 0; i < mb; i++) y[(m0 + i) * N + n] = hsum(_mm256_add_ps(a0[i], a1[i]));
        }
    }
}

/* int4 with groups: w[n, k] = (code - 8) * s[n, g] + z[n, g], g = k / group. Codes two a byte, channel
 * 2j in the low nibble of byte j (packed [N, K / 2]); s and z bfloat16 [N, K / group].
 * y[m, n] = sum_g s * dot(x_g, code_g) + (z - 8 s) * sum(x_g). xsum [M, G] holds the group sums of x
 * (computed in a first pass here). group % 32 == 0, K % group == 0. */
void keel_int4_gemm(const float *x, const uint8_t *packed, const uint16_t *scales, const uint16_t *zeros,
                    float *xsum, float *y, int64_t M, int64_t N, int64_t K, int64_t group, int threads) {
    const int64_t G = K / group;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) s += x[m * K + k];
            xsum[m * G + g] = s;
        }
    const __m128i low = _mm_set1_epi8(0x0F);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = packed + n * (K / 2);
        const uint16_t *sr = scales + n * G, *zr = zeros + n * G;
        for (int64_t m0 = 0; m0 < M; m0 += MBLK) {
            int mb = (int)(M - m0 < MBLK ? M - m0 : MBLK);
            __m256 acc[MBLK];
            for (int i = 0; i < MBLK; i++) acc[i] = _mm256_setzero_ps();
            /* 32 channels at a time; the only loop-carried dependency is one FMA into acc */
            for (int64_t k = 0; k < K; k += 32) {
                __m256 sv = _mm256_set1_ps(bf16_to_f32(sr[k / group]));
                __m128i b = _mm_loadu_si128((const __m128i *)(row + k / 2));
                __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
                __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);
                __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c0));
                __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8)));
                __m256 f2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c1));
                __m256 f3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8)));
                for (int i = 0; i < mb; i++) {
                    const float *xm = x + (m0 + i) * K + k;
                    __m256 p = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xm + 8), _mm256_mul_ps(f0, _mm256_loadu_ps(xm)));
                    __m256 q = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xm + 24), _mm256_mul_ps(f2, _mm256_loadu_ps(xm + 16)));
                    acc[i] = _mm256_fmadd_ps(_mm256_add_ps(p, q), sv, acc[i]);
                }
            }
            for (int i = 0; i < mb; i++) {
                float off = 0.f;
                for (int64_t g = 0; g < G; g++)
                    off += (bf16_to_f32(zr[g]) - 8.f * bf16_to_f32(sr[g])) * xsum[(m0 + i) * G + g];
                y[(m0 + i) * N + n] = hsum(acc[i]) + off;
            }
        }
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
