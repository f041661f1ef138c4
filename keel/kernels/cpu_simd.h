/* Helpers the AVX2 kernels of keel/kernels share (each .c file is its own translation unit). */
#ifndef KEEL_CPU_SIMD_H
#define KEEL_CPU_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* The sum of a vector's 8 floats. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* bfloat16 is the top half of a float32: widening is a shift. */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
