/*
 * Decode attention straight from the paged KV cache, for x86-64 CPUs with AVX2 and FMA.
 *
 * One query token per seq. The query heads that share a KV head are that
 * head's rows, so each key and value row is loaded once for all of them.
 * Keys and values are read in place through the block table; nothing is
 * gathered into a temporary tensor.
 *
 * Cache layout, per layer: [num_blocks, block_size, 2, num_kv_heads, head_dim]
 * float32, keys at index 0 and values at index 1 (see attention.py).
 *
 * Built by native_kernels.py with the compiler found at run time. Scores
 * go through a second pass (max, exp, sum), in float32 as in the torch path.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* glibc's libmvec contains an 8-wide expf, and this declaration lets the compiler
   call it from simd loops. */
#pragma omp declare simd notinbranch
extern float expf(float);

#define CHATPIPE_MAX_GROUP 16

static inline float sum_lanes(__m256 v) {
    __m128 low = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    low = _mm_add_ps(low, _mm_movehl_ps(low, low));
    low = _mm_add_ss(low, _mm_movehdup_ps(low));
    return _mm_cvtss_f32(low);
}

int chatpipe_max_group(void) { return CHATPIPE_MAX_GROUP; }

/*
 * query: [num_seqs] rows of num_q_heads * head_dim floats, query_stride floats apart.
 * block_tables: [num_seqs, max_blocks]; context_lens: [num_seqs] positions to attend to.
 * out: [num_seqs, num_q_heads, head_dim], contiguous.
 * Needs head_dim % 8 == 0 and num_q_heads / num_kv_heads <= CHATPIPE_MAX_GROUP.
 * Returns 0, or -1 when a scratch buffer could not be allocated.
 */
int chatpipe_paged_decode_attention(const float *query, int64_t query_stride, const float *cache,
                                    const int64_t *block_tables, int64_t max_blocks, const int64_t *context_lens,
                                    float *out, int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                                    int64_t head_dim, int64_t block_size, float scale, int num_threads) {
    const int64_t group = num_q_heads / num_kv_heads;
    const int64_t slot_stride = 2 * num_kv_heads * head_dim;
    const int64_t value_offset = num_kv_heads * head_dim;
    const int64_t max_context = max_blocks * block_size;
    const int64_t lanes = head_dim / 8;
    /* A work item is one seq with all its KV heads, so it reads each cache
       block front to back. With fewer seqs than twice the threads, a work
       item is one (seq, KV head) pair instead, so that one seq still keeps
       every thread busy. */
    const int64_t heads_per_item = num_seqs >= 2 * num_threads ? num_kv_heads : 1;
    const int64_t items_per_seq = num_kv_heads / heads_per_item;
    int failed = 0;

#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * heads_per_item * group * max_context);
        failed = scores == NULL;

#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < num_seqs * items_per_seq; item++) {
            if (scores == NULL) continue;
            const int64_t seq = item / items_per_seq;
            const int64_t first_head = (item % items_per_seq) * heads_per_item;
            const int64_t rows = heads_per_item * group; /* query rows of this item, head-major */
            const int64_t context = context_lens[seq];
            const int64_t *table = block_tables + seq * max_blocks;
            const float *q = query + seq * query_stride + first_head * group * head_dim;
            float *o = out + (seq * num_q_heads + first_head * group) * head_dim;

            /* scores[row][pos] = scale * q_row . k_pos: each key is loaded once for
               the query heads that share it, and block by block, so a position's
               slot needs no division */
            for (int64_t start = 0; start < context; start += block_size) {
                const float *block = cache + table[start / block_size] * block_size * slot_stride;
                const int64_t end = start + block_size < context ? start + block_size : context;
                for (int64_t pos = start; pos < end; pos++) {
                    const float *slot = block + (pos - start) * slot_stride;
                    for (int64_t h = 0; h < heads_per_item; h++) {
                        const float *k = slot + (first_head + h) * head_dim;
                        const float *qh = q + h * group * head_dim;
                        __m256 acc[CHATPIPE_MAX_GROUP];
                        for (int64_t r = 0; r < group; r++) acc[r] = _mm256_setzero_ps();
                        for (int64_t lane = 0; lane < lanes; lane++) {
                            const __m256 key = _mm256_loadu_ps(k + 8 * lane);
                            for (int64_t r = 0; r < group; r++)
                                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qh + r * head_dim + 8 * lane), key, acc[r]);
                        }
                        for (int64_t r = 0; r < group; r++)
                            scores[(h * group + r) * max_context + pos] = sum_lanes(acc[r]) * scale;
                    }
                }
            }

            /* softmax per row, the max subtracted first so exp cannot overflow */
            for (int64_t row = 0; row < rows; row++) {
                float *p = scores + row * max_context;
                float max = p[0];
                for (int64_t pos = 1; pos < context; pos++) max = p[pos] > max ? p[pos] : max;
                float total = 0.0f;
#pragma omp simd reduction(+ : total)
                for (int64_t pos = 0; pos < context; pos++) {
                    p[pos] = expf(p[pos] - max);
                    total += p[pos];
                }
                const float inverse = 1.0f / total;
#pragma omp simd
                for (int64_t pos = 0; pos < context; pos++) p[pos] *= inverse;
            }

            /* out_row = sum over pos of p_row[pos] * v_pos. The rows stay in L1 while values stream past. */
            for (int64_t i = 0; i < rows * head_dim; i++) o[i] = 0.0f;
            for (int64_t start = 0; start < context; start += block_size) {
                const float *block = cache + table[start / block_size] * block_size * slot_stride + value_offset;
                const int64_t end = start + block_size < context ? start + block_size : context;
                for (int64_t pos = start; pos < end; pos++) {
                    const float *slot = block + (pos - start) * slot_stride;
                    for (int64_t row = 0; row < rows; row++) {
                        const float *v = slot + (first_head + row / group) * head_dim;
                        const float p = scores[row * max_context + pos];
                        float *orow = o + row * head_dim;
#pragma omp simd
                        for (int64_t d = 0; d < head_dim; d++) orow[d] = fmaf(p, v[d], orow[d]);
                    }
                }
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
