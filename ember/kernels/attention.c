/* Decode attention over the paged KV cache: one query token per sequence against its context, read in place
 * through the block table (no gather into a contiguous copy).
 *
 * Cache float32 [slots, kv_heads, head_dim], or int8 with a float16 scale per slot and KV head ([slots,
 * kv_heads]: --kv-cache-dtype int8, ember.layers.kv_cache; F16C widens it, in both builds): each int8 row is
 * dequantized once into a small buffer as it is read, for the whole query group, so no float copy of the cache
 * is ever made.
 * q and out float32 [D, heads, head_dim]. Each task is one
 * (sequence, KV head): the query heads of its group read every key and value row once. Scores in float32,
 * softmax with the maximum subtracted; a sliding window keeps the last `window` keys and tanh soft-capping
 * applies before the softmax, as the torch path (ember.layers.attention.attend) does.
 */
#include "common.h"

#include <math.h>
#include <stdlib.h>

#define MAX_GROUP_DIM 8192 /* query heads per KV head x head_dim held in registers' spill buffer */

typedef struct {
    const float *q;
    const void *k, *v;              /* float32 rows, or int8 rows when k_scale/v_scale are set */
    const uint16_t *k_scale, *v_scale; /* float16 [slots, kv_heads], or NULL (a float32 cache) */
    float *out;
    const int64_t *blocks, *lens; /* blocks: [D, max_blocks] or NULL (one sequence from slot `start`) */
    int64_t max_blocks, start, window;
    int heads, kv_heads, head_dim, block_size;
    float scale, softcap;
    int failed;
} attn_job_t;

INLINE float dot(const float *a, const float *b, int n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    if (i < n) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0); /* n % 8 == 0 */
    return hsum(_mm256_add_ps(acc0, acc1));
}

/* The cache slot of token t of sequence d. */
INLINE int64_t slot_of(const attn_job_t *j, int64_t d, int64_t t) {
    if (!j->blocks) return j->start + t;
    return j->blocks[d * j->max_blocks + t / j->block_size] * j->block_size + t % j->block_size;
}

/* Row `slot` of KV head kvh: the float32 cache row itself, or the int8 row times its scale, written to buf. */
INLINE const float *cache_row(const void *cache, const uint16_t *scales, int64_t slot, int kvh, int kv_heads,
                              int hd, float *buf) {
    const int64_t at = slot * kv_heads + kvh;
    if (!scales) return (const float *)cache + at * hd;
    const int8_t *q = (const int8_t *)cache + at * hd;
    const __m256 s = _mm256_set1_ps(_cvtsh_ss(scales[at]));
    for (int i = 0; i < hd; i += 8) {
        const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
        _mm256_store_ps(buf + i, _mm256_mul_ps(_mm256_cvtepi32_ps(w), s));
    }
    return buf;
}

static __thread float *scores_buf;
static __thread int64_t scores_cap;

static void attn_task(void *ctx, int64_t task) {
    attn_job_t *j = ctx;
    const int64_t d = task / j->kv_heads;
    const int kvh = (int)(task % j->kv_heads), group = j->heads / j->kv_heads, hd = j->head_dim;
    const int64_t len = j->lens[d];
    const int64_t lo = j->window > 0 && len > j->window ? len - j->window : 0, n = len - lo;
    if (n <= 0) return;
    if (scores_cap < n * group) {
        free(scores_buf);
        scores_buf = malloc(sizeof(float) * (size_t)(n * group));
        scores_cap = scores_buf ? n * group : 0;
        if (!scores_buf) {
            j->failed = 1;
            return;
        }
    }
    float *scores = scores_buf; /* [group][n] */
    const float *q = j->q + (d * j->heads + (int64_t)kvh * group) * hd;
    float row[MAX_GROUP_DIM] __attribute__((aligned(32))); /* one dequantized int8 row (head_dim values) */
    for (int64_t t = lo; t < len; t++) {
        const float *kp = cache_row(j->k, j->k_scale, slot_of(j, d, t), kvh, j->kv_heads, hd, row);
        for (int g = 0; g < group; g++) {
            float s = dot(q + (int64_t)g * hd, kp, hd) * j->scale;
            if (j->softcap > 0.0f) s = j->softcap * tanhf(s / j->softcap);
            scores[g * n + (t - lo)] = s;
        }
    }
    for (int g = 0; g < group; g++) {
        float *sg = scores + g * n;
        const float inv = 1.0f / exp_minus_max(sg, n);
        for (int64_t t = 0; t < n; t++) sg[t] *= inv;
    }
    float acc[MAX_GROUP_DIM] __attribute__((aligned(32)));
    memset(acc, 0, sizeof(float) * (size_t)(group * hd));
    for (int64_t t = lo; t < len; t++) {
        const float *vp = cache_row(j->v, j->v_scale, slot_of(j, d, t), kvh, j->kv_heads, hd, row);
        for (int g = 0; g < group; g++) {
            const __m256 p = _mm256_set1_ps(scores[g * n + (t - lo)]);
            float *a = acc + g * hd;
            for (int i = 0; i < hd; i += 8)
                _mm256_store_ps(a + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + i), _mm256_load_ps(a + i)));
        }
    }
    for (int g = 0; g < group; g++)
        memcpy(j->out + (d * j->heads + (int64_t)kvh * group + g) * hd, acc + g * hd, sizeof(float) * (size_t)hd);
}

/* out[D, heads, head_dim] = attention of q[D, heads, head_dim] over each sequence's first lens[d] cached
 * tokens; k_scale/v_scale NULL for a float32 cache, else the float16 scales of an int8 one. Returns 0, or -1
 * when the shapes are outside what this kernel takes (the caller keeps torch's). */
int ember_decode_attention(const float *q, const void *k_cache, const void *v_cache, const uint16_t *k_scale,
                           const uint16_t *v_scale, float *out, int64_t D, int heads, int kv_heads, int head_dim,
                           const int64_t *blocks, int64_t max_blocks, int64_t start, const int64_t *lens,
                           int block_size, float scale, float softcap, int64_t window, int nthreads) {
    ember_lock();
    const int rc = ember_decode_attention_locked(q, k_cache, v_cache, k_scale, v_scale, out, D, heads, kv_heads,
                                                 head_dim, blocks, max_blocks, start, lens, block_size, scale,
                                                 softcap, window, nthreads);
    ember_unlock();
    return rc;
}

int ember_decode_attention_locked(const float *q, const void *k_cache, const void *v_cache, const uint16_t *k_scale,
                                  const uint16_t *v_scale, float *out, int64_t D, int heads, int kv_heads,
                                  int head_dim, const int64_t *blocks, int64_t max_blocks, int64_t start,
                                  const int64_t *lens, int block_size, float scale, float softcap, int64_t window,
                                  int nthreads) {
    if (D < 1 || kv_heads < 1 || heads % kv_heads || head_dim % 8 || heads / kv_heads * head_dim > MAX_GROUP_DIM ||
        block_size < 1)
        return -1;
    if (!k_scale != !v_scale) return -1;
    attn_job_t j = {.q = q, .k = k_cache, .v = v_cache, .k_scale = k_scale, .v_scale = v_scale, .out = out,
                    .blocks = blocks, .lens = lens,
                    .max_blocks = max_blocks, .start = start, .window = window, .heads = heads,
                    .kv_heads = kv_heads, .head_dim = head_dim, .block_size = block_size, .scale = scale,
                    .softcap = softcap};
    ember_parallel_for(nthreads, attn_task, &j, D * kv_heads);
    return j.failed ? -1 : 0;
}
