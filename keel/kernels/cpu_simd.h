/* Helpers the AVX2 kernels of keel/kernels share (each .c file is its own translation unit). */
#ifndef KEEL_CPU_SIMD_H
#define KEEL_CPU_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* What the entry points return: keel/kernels/cpu.py turns the errors into Python exceptions. A kernel
 * checks the preconditions its loops rely on itself, so a wrong call is an error, never a read or write
 * out of bounds. */
#define KEEL_OK 0
#define KEEL_ENOMEM (-1) /* a scratch buffer could not be allocated */
#define KEEL_EINVAL (-2) /* an argument breaks the entry point's preconditions */

/* A 64-byte aligned scratch buffer of at least `bytes`, one per thread and slot (0-4), kept and grown as
 * needed: once the largest step has run, hot loops allocate nothing. NULL when out of memory. A slot
 * belongs to one use at a time on a thread (see each caller). */
static inline void *keel_scratch(int slot, size_t bytes) {
    static _Thread_local void *buf[5];
    static _Thread_local size_t cap[5];
    bytes = (bytes + 63) / 64 * 64;
    if (bytes > cap[slot]) {
        free(buf[slot]);
        buf[slot] = aligned_alloc(64, bytes);
        cap[slot] = buf[slot] != NULL ? bytes : 0;
    }
    return buf[slot];
}

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
