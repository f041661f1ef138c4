/* A whole decode step through the Llama decoder's layers in one call, float32 on CPU: per layer RMSNorm,
 * the fused q/k/v matmul (+ bias), rotary embedding with the cache write, paged decode attention, the
 * output projection and residual add, RMSNorm, gate/up matmul, SiLU-and-multiply, down projection and
 * residual add; LoRA adapters' updates after each projection. The same kernels, in the same order, as the
 * layer-by-layer path through PyTorch modules
 * (keel/models/llama.py), so the results are the same bit for bit; what goes is the Python and dispatch
 * work between them: about 11 calls per layer, 7 ms a step on the 2-core EPYC at batch 1 with the
 * built-in model (bench/results/decode.md). keel/models/fused_decode.py decides when it runs. */
#include "cpu_simd.h"
#include <stdint.h>
#include <stdlib.h>

/* The LoRA adapters resident for one projection, as keel_lora_* reads them (cpu_lora.c). */
typedef struct {
    const void *a;           /* [L, max_rank * n, in], float32 or bfloat16 (bf16 != 0); NULL: no adapters */
    const void *const *b;    /* n stacks [L, max_rank, out_k] */
    const int64_t *out;      /* out_k */
    const int32_t *ranks;    /* [n, L] */
    const float *scales;     /* [n, L] */
    int64_t n, max_rank, L, bf16;
} keel_lora_w;

/* One projection as keel_gemm reads it (cpu_gemm.c), and its adapters. */
typedef struct {
    int64_t fmt, sdtype, group, n, k;
    const void *w, *scale, *zero;
    const float *bias; /* [n] or NULL */
    keel_lora_w lora;
} keel_lin;

/* The step's adapter slots (LoRAMetadata.kernel_slots): slot, first row and rows of each, ns of them. */
typedef struct {
    const int32_t *slots, *start, *count;
    int64_t ns;
    float *h; /* scratch: [rows of x, max_rank * n] for the widest projection */
} keel_lora_step;

typedef struct {
    const float *in_norm, *post_norm; /* RMSNorm weights [D] */
    float *k_cache, *v_cache;         /* [slots, KVH, HD] */
    keel_lin qkv, o, gate_up, down;
} keel_layer;

int keel_gemm(const float *x, int fmt, const void *w, const void *scale, const void *zero, int sdtype, int64_t group,
              float *y, int64_t M, int64_t N, int64_t K, int threads);
void keel_rms_norm(const float *x, const float *w, float *y, int64_t M, int64_t D, float eps);
void keel_rope_cache_f32(float *qkv, const float *cos, const float *sin, const int64_t *slots, float *kc, float *vc,
                         int64_t T, int64_t H, int64_t KVH, int64_t D);
int keel_decode_attention_f32(const float *q, int64_t ldq, const float *kc, const float *vc, const int64_t *tables,
                              const int32_t *ctx, float *out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                              int64_t bs, int64_t NB, float scale, int threads);
void keel_silu_mul_f32(const float *gate_up, float *out, int64_t M, int64_t I);
void keel_lora_f32(const float *x, float *y, float *h, const float *a, const float *const *b, const int64_t *out,
                   const int32_t *ranks, const float *scales, const int32_t *slots, const int32_t *start,
                   const int32_t *count, int64_t M, int64_t n, int64_t in, int64_t ldy, int64_t max_rank, int64_t L,
                   int threads);
void keel_lora_bf16(const float *x, float *y, float *h, const uint16_t *a, const uint16_t *const *b,
                    const int64_t *out, const int32_t *ranks, const float *scales, const int32_t *slots,
                    const int32_t *start, const int32_t *count, int64_t M, int64_t n, int64_t in, int64_t ldy,
                    int64_t max_rank, int64_t L, int threads);

/* y = x Wᵀ + bias, plus each adapter slot's update of its rows: the order of Linear.forward. */
static int linear(const keel_lin *l, const float *x, float *y, int64_t M, const keel_lora_step *ls, int threads) {
    int rc = keel_gemm(x, (int)l->fmt, l->w, l->scale, l->zero, (int)l->sdtype, l->group, y, M, l->n, l->k, threads);
    if (l->bias != NULL)
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < l->n; j++) y[m * l->n + j] += l->bias[j];
    const keel_lora_w *w = &l->lora;
    if (ls != NULL && ls->ns > 0 && w->a != NULL) {
        if (w->bf16)
            keel_lora_bf16(x, y, ls->h, (const uint16_t *)w->a, (const uint16_t *const *)w->b, w->out, w->ranks,
                           w->scales, ls->slots, ls->start, ls->count, ls->ns, w->n, l->k, l->n, w->max_rank, w->L,
                           threads);
        else
            keel_lora_f32(x, y, ls->h, (const float *)w->a, (const float *const *)w->b, w->out, w->ranks, w->scales,
                          ls->slots, ls->start, ls->count, ls->ns, w->n, l->k, l->n, w->max_rank, w->L, threads);
    }
    return rc;
}

static void add(float *x, const float *t, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += t[i];
}

/* x [M, D]: the hidden states of M decoding tokens, updated in place through all L layers. cos, sin
 * [M, HD / 2]; slots [M] cache slot of each token; tables [M, NB] block tables; ctx [M] tokens in the
 * cache after this step; lora: the step's adapter slots, or NULL. Returns KEEL_OK, or the error of the buffers
 * here or of a kernel it calls (x is then undefined). */
int keel_decode_stack(const keel_layer *layers, int64_t L, float *x, int64_t M, int64_t D, int64_t H, int64_t KVH,
                      int64_t HD, int64_t I, float eps, float scale, const float *cos, const float *sin,
                      const int64_t *slots, const int64_t *tables, int64_t NB, const int32_t *ctx, int64_t bs,
                      const keel_lora_step *lora, int threads) {
    const int64_t QKV = (H + 2 * KVH) * HD;
    /* The step's activations, in one thread-local scratch buffer (slot 4: the kernels called below use
     * 0-3), each part starting on a 64-byte boundary. */
    const int64_t sizes[6] = {M * D, M * QKV, M * H * HD, M * 2 * I, M * I, M * D};
    int64_t total = 0;
    for (int k = 0; k < 6; k++)
        total += (sizes[k] + 15) / 16 * 16;
    float *base = keel_scratch(4, sizeof(float) * (size_t)total), *part[6];
    int64_t at = 0;
    for (int k = 0; k < 6; k++) {
        part[k] = base ? base + at : NULL;
        at += (sizes[k] + 15) / 16 * 16;
    }
    float *h = part[0], *qkv = part[1], *att = part[2], *gu = part[3], *act = part[4], *t = part[5];
    int rc = base ? KEEL_OK : KEEL_ENOMEM;
    for (int64_t l = 0; l < L && rc == 0; l++) {
        const keel_layer *ly = layers + l;
        keel_rms_norm(x, ly->in_norm, h, M, D, eps);
        rc |= linear(&ly->qkv, h, qkv, M, lora, threads);
        keel_rope_cache_f32(qkv, cos, sin, slots, ly->k_cache, ly->v_cache, M, H, KVH, HD);
        rc |= keel_decode_attention_f32(qkv, QKV, ly->k_cache, ly->v_cache, tables, ctx, att, M, H, KVH, HD, bs,
                                        NB, scale, threads);
        rc |= linear(&ly->o, att, t, M, lora, threads);
        add(x, t, M * D);
        keel_rms_norm(x, ly->post_norm, h, M, D, eps);
        rc |= linear(&ly->gate_up, h, gu, M, lora, threads);
        keel_silu_mul_f32(gu, act, M, I);
        rc |= linear(&ly->down, act, t, M, lora, threads);
        add(x, t, M * D);
    }
    return rc; /* KEEL_OK; KEEL_EINVAL or KEEL_ENOMEM from a kernel (-1 when both) */
}
