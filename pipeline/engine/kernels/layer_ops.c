/*
 * Element-wise steps of a decoder layer, fused so that each reads its input once.
 *
 * At decode sizes (16 rows of 576 to 1536 floats) torch runs RMSNorm as
 * several kernels and SiLU on one thread, and each call costs more than its
 * arithmetic. These run a row per loop iteration, across OpenMP threads
 * when a call has enough rows to pay for them.
 *
 * Rounding follows transformers' float32 expressions: RMSNorm is
 * weight * (x * (1 / sqrt(mean(x^2) + eps))), SiLU is x / (1 + exp(-x)).
 * Sums run in a different order than torch's, so results can differ in
 * the last bit.
 */
#include <math.h>
#include <stdint.h>

#pragma omp declare simd notinbranch
extern float expf(float);

/* Calls with fewer rows run on one thread, because waking the others would cost more than
   rows this few take. 64 is an estimate, not a measured crossover. */
#define CHATPIPE_PARALLEL_ROWS 64

static void rms_norm_row(const float *x, const float *weight, float *out, int64_t hidden, float eps) {
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < hidden; i++) squares += x[i] * x[i];
    const float inverse = 1.0f / sqrtf(squares / (float)hidden + eps);
#pragma omp simd
    for (int64_t i = 0; i < hidden; i++) out[i] = weight[i] * (x[i] * inverse);
}

/* out = rms_norm(x) * weight, row by row; x and out are [rows, hidden] contiguous. */
void chatpipe_rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t hidden, float eps,
                       int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows >= CHATPIPE_PARALLEL_ROWS) schedule(static)
    for (int64_t row = 0; row < rows; row++) rms_norm_row(x + row * hidden, weight, out + row * hidden, hidden, eps);
}

/* residual += delta, then out = rms_norm(residual) * weight: the residual add of one sublayer and the norm of the next. */
void chatpipe_add_rms_norm(float *residual, const float *delta, const float *weight, float *out, int64_t rows,
                           int64_t hidden, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows >= CHATPIPE_PARALLEL_ROWS) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        float *r = residual + row * hidden;
        const float *d = delta + row * hidden;
#pragma omp simd
        for (int64_t i = 0; i < hidden; i++) r[i] += d[i];
        rms_norm_row(r, weight, out + row * hidden, hidden, eps);
    }
}

/* out = silu(gate) * up, where each row of gate_up is [gate | up], [rows, 2 * width] -> [rows, width]. */
void chatpipe_silu_and_mul(const float *gate_up, float *out, int64_t rows, int64_t width, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows >= CHATPIPE_PARALLEL_ROWS) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        const float *gate = gate_up + row * 2 * width;
        const float *up = gate + width;
        float *o = out + row * width;
#pragma omp simd
        for (int64_t i = 0; i < width; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

/*
 * Rotary embedding of q and k in the rotate-half layout, and this step's keys and values stored in the paged cache.
 *
 * qkv: [tokens] rows of (num_q_heads + 2 * num_kv_heads) * head_dim floats, qkv_stride apart, q then k then v.
 * cos, sin: [tokens, head_dim] contiguous. qk_out: [tokens, num_q_heads + num_kv_heads, head_dim] contiguous.
 * cache: one layer, [slots, 2, num_kv_heads, head_dim]; slot_mapping: [tokens] slot of each token.
 * Per element this is x * cos + rotate_half(x) * sin with both products rounded, as torch computes it.
 */
void chatpipe_rotary_write_kv(const float *qkv, int64_t qkv_stride, const float *cos, const float *sin, float *qk_out,
                              float *cache, const int64_t *slot_mapping, int64_t tokens, int64_t num_q_heads,
                              int64_t num_kv_heads, int64_t head_dim, int num_threads) {
    const int64_t half = head_dim / 2;
    const int64_t rotated_heads = num_q_heads + num_kv_heads;
    const int64_t kv_size = num_kv_heads * head_dim;
#pragma omp parallel for num_threads(num_threads) if (tokens >= CHATPIPE_PARALLEL_ROWS) schedule(static)
    for (int64_t token = 0; token < tokens; token++) {
        const float *row = qkv + token * qkv_stride;
        const float *c = cos + token * head_dim;
        const float *s = sin + token * head_dim;
        float *rotated = qk_out + token * rotated_heads * head_dim;
        for (int64_t head = 0; head < rotated_heads; head++) {
            const float *x = row + head * head_dim;
            float *o = rotated + head * head_dim;
            for (int64_t i = 0; i < half; i++) {
                const float straight = x[i] * c[i], turned = x[i + half] * s[i];
                o[i] = straight - turned;
            }
            for (int64_t i = half; i < head_dim; i++) {
                const float straight = x[i] * c[i], turned = x[i - half] * s[i];
                o[i] = straight + turned;
            }
        }
        float *slot = cache + slot_mapping[token] * 2 * kv_size;
        const float *keys = rotated + num_q_heads * head_dim;
        const float *values = row + rotated_heads * head_dim;
        for (int64_t i = 0; i < kv_size; i++) slot[i] = keys[i];
        for (int64_t i = 0; i < kv_size; i++) slot[kv_size + i] = values[i];
    }
}
