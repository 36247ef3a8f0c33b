/* A whole stack of Llama-style decoder layers for a decode-only step, in one call (ember.kernels.decode_layers).
 *
 * Per layer, on x [B, hidden] float32 (the residual stream, updated in place):
 *   qkv = rmsnorm(x) @ [Wq | Wk | Wv]^T (+ bias)         one fused ember_matmul, the norm in its input pass
 *   q, k = rotary(q), rotary(k); k, v -> cache slots     here, row by row (int8 caches quantized per head)
 *   a = attention(q, cached context)                     ember_decode_attention over the paged cache
 *   x += a @ Wo^T
 *   gu = rmsnorm(x) @ [Wgate | Wup]^T; x += (silu(gate) * up) @ Wdown^T
 * The same kernels, in the same order, as the module-by-module torch path (ember.models.decoder), and the
 * glue here rounds as torch's ops do (no FMA contraction below): the two paths give the same numbers; what this
 * call saves is ~25 torch ops and 5 ctypes calls per layer (2-3 ms a step on a 22-layer model). The library
 * lock is held for the whole stack.
 */
#pragma GCC optimize("fp-contract=off")

#include "common.h"

#include <math.h>
#include <stdlib.h>

enum { PREP_NONE = 0, PREP_RMS_NORM = 1, PREP_SILU_GATE = 2 }; /* ggml_matmul.c's */

typedef struct {
    int nseg;
    const void *w[MAX_SEGMENTS];
    int types[MAX_SEGMENTS];
    int64_t rows[MAX_SEGMENTS], row_bytes[MAX_SEGMENTS];
} linear_t;

/* One layer's weights and cache (ember.kernels.decode_layers._Layer mirrors this struct). */
typedef struct {
    linear_t qkv, o, gate_up, down;
    const float *attn_norm, *mlp_norm; /* the RMSNorms' effective float32 weights */
    const float *qkv_bias;             /* [q + k + v columns] or NULL */
    void *k_cache, *v_cache;           /* [slots, kv_heads, head_dim]: float32, or int8 with the scales below */
    uint16_t *k_scale, *v_scale;       /* float16 [slots, kv_heads] or NULL */
    float attn_eps, mlp_eps, scale, softcap;
    int64_t window;
} layer_t;

static int64_t linear_rows(const linear_t *l) {
    int64_t n = 0;
    for (int s = 0; s < l->nseg; s++) n += l->rows[s];
    return n;
}

static int matmul(const linear_t *l, const float *x, int64_t B, int64_t K, float *y, int prep, const float *norm_w,
                  float eps, int nthreads) {
    return ember_matmul_locked(x, B, K, l->nseg, l->w, l->types, l->rows, l->row_bytes, y, linear_rows(l), prep,
                               norm_w, eps, nthreads);
}

/* The rotary embedding of one head as ember.layers.rotary.RotaryEmbedding.apply computes it: the first `dim`
 * channels x * cos + roll(x, dim / 2) * sin (sin with rotate-half's sign folded in), the rest unchanged. */
static void rotate(const float *x, const float *cos, const float *sin, int dim, int head_dim, float *out) {
    const int half = dim / 2;
    for (int i = 0; i < dim; i++) {
        const float a = x[i] * cos[i], b = x[i < half ? i + half : i - half] * sin[i];
        out[i] = a + b;
    }
    for (int i = dim; i < head_dim; i++) out[i] = x[i];
}

/* ember.layers.kv_cache.quantize for one head's row: scale = max|x| / 127 (at most float16's largest) rounded to
 * float16, q = round(x / that rounded scale), or round(x) where it is 0. */
static void quantize_head(const float *x, int head_dim, int8_t *q, uint16_t *scale) {
    float amax = 0.0f;
    for (int i = 0; i < head_dim; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float s = amax / 127.0f;
    const uint16_t h = _cvtss_sh(s < 65504.0f ? s : 65504.0f, _MM_FROUND_TO_NEAREST_INT);
    const float wide = _cvtsh_ss(h), div = wide > 0.0f ? wide : 1.0f;
    for (int i = 0; i < head_dim; i++) {
        float v = nearbyintf(x[i] / div); /* rounds half to even, as torch.round */
        q[i] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
    }
    *scale = h;
}

/* Head h of a new token's K or V into its cache slot. */
static void store_head(const layer_t *l, int is_v, int64_t slot, int h, int kv_heads, int head_dim, const float *x) {
    const int64_t at = slot * kv_heads + h;
    uint16_t *scales = is_v ? l->v_scale : l->k_scale;
    void *cache = is_v ? l->v_cache : l->k_cache;
    if (scales)
        quantize_head(x, head_dim, (int8_t *)cache + at * head_dim, scales + at);
    else
        memcpy((float *)cache + at * head_dim, x, sizeof(float) * (size_t)head_dim);
}

static float *scratch;
static size_t scratch_floats;

/* Runs nlayers layers over x [B, hidden] in place for B single-token decodes: cos/sin [B, rot_dim] from
 * RotaryEmbedding.prepare, slots [B] the cache slot of each new token, and the context as
 * ember_decode_attention reads it (blocks [B, max_blocks] or NULL with `start`, lens [B]). Returns 0, or -1
 * when a kernel refuses its arguments or memory runs out (x and the caches are then partly updated). */
int ember_decode_layers(const layer_t *layers, int nlayers, int64_t hidden, int64_t inter, int heads, int kv_heads,
                        int head_dim, int rot_dim, float *x, int64_t B, const float *cos, const float *sin,
                        const int64_t *slots, const int64_t *blocks, int64_t max_blocks, int64_t start,
                        const int64_t *lens, int block_size, int nthreads) {
    if (B < 1 || nlayers < 0 || rot_dim > head_dim || rot_dim % 2) return -1;
    const int64_t q_cols = (int64_t)heads * head_dim, kv_cols = (int64_t)kv_heads * head_dim;
    const int64_t qkv_cols = q_cols + 2 * kv_cols;
    /* qkv [B, qkv_cols], rotated q [B, q_cols], attention out [B, q_cols], a projection [B, hidden], gate|up
     * [B, 2 * inter], one rotated K head */
    const size_t need = (size_t)B * (size_t)(qkv_cols + 2 * q_cols + hidden + 2 * inter) + (size_t)head_dim;
    ember_lock();
    if (need > scratch_floats) {
        free(scratch);
        scratch = malloc(sizeof(float) * need);
        scratch_floats = scratch ? need : 0;
        if (!scratch) {
            ember_unlock();
            return -1;
        }
    }
    float *qkv = scratch, *q = qkv + B * qkv_cols, *att = q + B * q_cols, *proj = att + B * q_cols,
          *gu = proj + B * hidden, *khead = gu + B * 2 * inter;
    int rc = 0;
    for (int li = 0; li < nlayers && !rc; li++) {
        const layer_t *l = layers + li;
        if (linear_rows(&l->qkv) != qkv_cols || linear_rows(&l->o) != hidden || linear_rows(&l->gate_up) != 2 * inter
            || linear_rows(&l->down) != hidden) {
            rc = -1;
            break;
        }
        rc = matmul(&l->qkv, x, B, hidden, qkv, PREP_RMS_NORM, l->attn_norm, l->attn_eps, nthreads);
        if (rc) break;
        for (int64_t b = 0; b < B; b++) {
            float *row = qkv + b * qkv_cols;
            if (l->qkv_bias)
                for (int64_t i = 0; i < qkv_cols; i++) row[i] += l->qkv_bias[i];
            const float *c = cos + b * rot_dim, *s = sin + b * rot_dim;
            for (int h = 0; h < heads; h++)
                rotate(row + (int64_t)h * head_dim, c, s, rot_dim, head_dim, q + b * q_cols + (int64_t)h * head_dim);
            for (int h = 0; h < kv_heads; h++) {
                rotate(row + q_cols + (int64_t)h * head_dim, c, s, rot_dim, head_dim, khead);
                store_head(l, 0, slots[b], h, kv_heads, head_dim, khead);
                store_head(l, 1, slots[b], h, kv_heads, head_dim, row + q_cols + kv_cols + (int64_t)h * head_dim);
            }
        }
        rc = ember_decode_attention_locked(q, l->k_cache, l->v_cache, l->k_scale, l->v_scale, att, B, heads,
                                           kv_heads, head_dim, blocks, max_blocks, start, lens, block_size, l->scale,
                                           l->softcap, l->window, nthreads);
        if (rc) break;
        rc = matmul(&l->o, att, B, q_cols, proj, PREP_NONE, NULL, 0.0f, nthreads);
        if (rc) break;
        for (int64_t i = 0; i < B * hidden; i++) x[i] += proj[i];
        rc = matmul(&l->gate_up, x, B, hidden, gu, PREP_RMS_NORM, l->mlp_norm, l->mlp_eps, nthreads);
        if (rc) break;
        rc = matmul(&l->down, gu, B, inter, proj, PREP_SILU_GATE, NULL, 0.0f, nthreads);
        if (rc) break;
        for (int64_t i = 0; i < B * hidden; i++) x[i] += proj[i];
    }
    ember_unlock();
    return rc;
}
