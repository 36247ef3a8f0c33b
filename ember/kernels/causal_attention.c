/* Causal attention of many query rows of one sequence over its paged KV cache: a prefill chunk (or a whole
 * prompt) against everything cached before it and itself.
 *
 * q and out float32 [n, heads, head_dim]: the sequence's last n positions, ctx - n .. ctx - 1. The keys and
 * values are cache rows float32 [slots, kv_heads, head_dim], token t at slot blocks[t / block_size] *
 * block_size + t % block_size (or start + t without a block table). Row i attends keys 0 .. ctx - n + i (the
 * last `window` of them with a sliding window).
 *
 * Shaped as two matrix products per tile of query rows, as BLAS does them (no horizontal sums): the query rows
 * of one KV head (all heads of its group at consecutive positions) form the rows, so every key and value row
 * read serves the whole group.
 *   - scores: each KV head's keys are first copied transposed, [head_dim][keys] (one pass over the keys, shared
 *     by every tile), then S_NR rows x S_NG vectors of keys accumulate over head_dim: each key vector loaded
 *     serves S_NR rows, each query value broadcast serves S_NG vectors of keys;
 *   - softmax per row over its own keys (float32, maximum subtracted; masked keys get probability 0);
 *   - values: PV_NR rows x PV_NV vectors of head_dim accumulate over the keys, reading value rows in place.
 * torch's flash attention took ~4x longer on a 512-token prompt (its inner products are small sgemm calls).
 */
#include "common.h"

#include <math.h>
#include <stdlib.h>

#if defined(__AVX512F__)
typedef __m512 vf;
#define VL 16
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VSET1(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define S_NR 6  /* 6 rows x 4 key vectors: 24 accumulators of 32 registers */
#define S_NG 4
#define PV_NR 6 /* 6 rows x 4 vectors of head_dim (64 values) */
#define PV_NV 4
#else
typedef __m256 vf;
#define VL 8
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VSET1(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define S_NR 4  /* 4 x 3 accumulators + 3 loads + a broadcast: 16 registers */
#define S_NG 3
#define PV_NR 2 /* 2 x 4 accumulators + 4 loads + a broadcast */
#define PV_NV 4
#endif
#define KEY_BLOCK (S_NG * VL)
#define TASK_TILES 8 /* score tiles (S_NR rows each) per task */

typedef struct {
    const float *q, *k, *v;
    float *out;
    const int64_t *blocks;
    int64_t n, ctx, start, window, keys_padded, kt_stride;
    int heads, kv_heads, head_dim, block_size, group;
    float scale;
    float *kt; /* [kv_heads][head_dim][kt_stride]: keys_padded keys, then a cache line of padding */
    int64_t tasks_per_head;
    int failed;
} causal_job_t;

INLINE int64_t slot_at(const causal_job_t *j, int64_t t) {
    return j->blocks ? j->blocks[t / j->block_size] * j->block_size + t % j->block_size : j->start + t;
}

/* Keys KEY_BLOCK * chunk .. of every KV head, transposed into kt (zeros past ctx). */
static void transpose_keys(void *ctx, int64_t chunk) {
    const causal_job_t *j = ctx;
    const int hd = j->head_dim;
    const int64_t t0 = chunk * KEY_BLOCK;
    for (int h = 0; h < j->kv_heads; h++) {
        float *dst = j->kt + (int64_t)h * hd * j->kt_stride;
        for (int64_t t = t0; t < t0 + KEY_BLOCK; t++) {
            if (t < j->ctx) {
                const float *row = j->k + (slot_at(j, t) * j->kv_heads + h) * hd;
                for (int d = 0; d < hd; d++) dst[d * j->kt_stride + t] = row[d];
            } else
                for (int d = 0; d < hd; d++) dst[d * j->kt_stride + t] = 0.0f;
        }
    }
}

/* Scores of NR query rows (pointers) against the KEY_BLOCK keys from kb, into s[NR][ld] (s at key kb). */
INLINE void score_block(const float *const *qr, const float *kt, int64_t kt_stride, int hd, int64_t kb, float scale,
                        float *s, int64_t ld, const int NR) {
    vf acc[S_NR][S_NG];
    for (int r = 0; r < NR; r++)
        for (int g = 0; g < S_NG; g++) acc[r][g] = VZERO();
    for (int d = 0; d < hd; d++) {
        vf kv[S_NG];
        for (int g = 0; g < S_NG; g++) kv[g] = VLOAD(kt + d * kt_stride + kb + g * VL);
        for (int r = 0; r < NR; r++) {
            const vf qv = VSET1(qr[r][d]);
            for (int g = 0; g < S_NG; g++) acc[r][g] = VFMA(qv, kv[g], acc[r][g]);
        }
    }
    const vf sc = VSET1(scale);
    for (int r = 0; r < NR; r++)
        for (int g = 0; g < S_NG; g++) VSTORE(s + r * ld + g * VL, VMUL(acc[r][g], sc));
}

/* out rows (pointers) += p[NR][ld] (p at key k0) @ value rows k0 .. k1, head_dim values d0 .. d0 + NV * VL. */
INLINE void value_tile(const float *p, int64_t ld, const float *const *vrows, int64_t k0, int64_t k1, int d0,
                       float *const *outr, const int NR, const int NV) {
    vf acc[PV_NR][PV_NV];
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = VLOAD(outr[r] + d0 + v * VL);
    for (int64_t t = k0; t < k1; t++) {
        vf vv[PV_NV];
        for (int v = 0; v < NV; v++) vv[v] = VLOAD(vrows[t] + d0 + v * VL);
        for (int r = 0; r < NR; r++) {
            const vf pv = VSET1(p[r * ld + t - k0]);
            for (int v = 0; v < NV; v++) acc[r][v] = VFMA(pv, vv[v], acc[r][v]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < NV; v++) VSTORE(outr[r] + d0 + v * VL, acc[r][v]);
}

/* Each constant row count its own loop (registers), for the last tile of a task. */
#define ROWS_SWITCH(NR, CALL, MAXR)                                                                              \
    if ((NR) == (MAXR)) {                                                                                        \
        CALL(MAXR);                                                                                              \
    } else                                                                                                       \
        switch (NR) { /* NR < MAXR here: the guards only keep counts above MAXR from being compiled */           \
        case 1: CALL(1); break;                                                                                  \
        case 2: if (MAXR > 2) { CALL(2); } break;                                                                \
        case 3: if (MAXR > 3) { CALL(3); } break;                                                                \
        case 4: if (MAXR > 4) { CALL(4); } break;                                                                \
        case 5: if (MAXR > 5) { CALL(5); } break;                                                                \
        default: break;                                                                                          \
        }

static __thread float *task_scores;
static __thread int64_t task_scores_cap;
static __thread const float **value_rows;
static __thread int64_t value_rows_cap;

/* Rows of one task: KV head h, rows r0 .. r1 of its n * group (position-major: row = i * group + head within
 * the group), TASK_TILES score tiles. Key blocks are the outer loop and the tiles the inner one, so each block of
 * keys and of values is read from memory once per task and then served from L1 to every tile. */
static void causal_task(void *ctx, int64_t task) {
    causal_job_t *j = ctx;
    const int h = (int)(task / j->tasks_per_head), hd = j->head_dim, group = j->group;
    const int64_t rows = j->n * group, first = j->ctx - j->n;
    const int64_t r0 = task % j->tasks_per_head * TASK_TILES * S_NR;
    const int64_t r1 = r0 + TASK_TILES * S_NR < rows ? r0 + TASK_TILES * S_NR : rows;
    const int64_t p_first = first + r0 / group, p_last = first + (r1 - 1) / group;
    /* keys [k0, k1): from the first row's window start (rounded down to a block) to the last row's position */
    const int64_t lowest = j->window > 0 && p_first - j->window + 1 > 0 ? p_first - j->window + 1 : 0;
    const int64_t k0 = lowest / KEY_BLOCK * KEY_BLOCK, k1 = (p_last + KEY_BLOCK) / KEY_BLOCK * KEY_BLOCK;
    const int64_t ld = k1 - k0 + 16; /* as kt_stride: rows a power of two apart would share L1 sets */
    if (task_scores_cap < TASK_TILES * S_NR * j->kt_stride || value_rows_cap < j->ctx) {
        free(task_scores);
        free(value_rows);
        task_scores = aligned_alloc(64, sizeof(float) * (size_t)(TASK_TILES * S_NR * j->kt_stride));
        value_rows = malloc(sizeof(float *) * (size_t)j->ctx);
        task_scores_cap = task_scores ? TASK_TILES * S_NR * j->kt_stride : 0;
        value_rows_cap = value_rows ? j->ctx : 0;
        if (!task_scores || !value_rows) {
            j->failed = 1;
            return;
        }
    }
    for (int64_t t = lowest; t <= p_last; t++) value_rows[t] = j->v + (slot_at(j, t) * j->kv_heads + h) * hd;
    const float *qr[TASK_TILES * S_NR];
    float *outr[TASK_TILES * S_NR];
    for (int64_t a = r0; a < r1; a++) {
        const int64_t i = a / group, head = (int64_t)h * group + a % group;
        qr[a - r0] = j->q + (i * j->heads + head) * hd;
        outr[a - r0] = j->out + (i * j->heads + head) * hd;
        memset(outr[a - r0], 0, sizeof(float) * (size_t)hd);
    }
    const float *kt = j->kt + (int64_t)h * hd * j->kt_stride;
    float *s = task_scores; /* [r1 - r0][ld] */
    for (int64_t kb = k0; kb < k1; kb += KEY_BLOCK)
        for (int64_t a = r0; a < r1; a += S_NR) {
            const int nr = (int)(r1 - a < S_NR ? r1 - a : S_NR);
            if (kb > first + (a + nr - 1) / group) continue; /* past every row of this tile */
#define SCORE(NR_) score_block(qr + (a - r0), kt, j->kt_stride, hd, kb, j->scale, s + (a - r0) * ld + kb - k0, ld, NR_)
            ROWS_SWITCH(nr, SCORE, S_NR)
#undef SCORE
        }
    /* softmax of each row over its own keys; the other keys of [k0, k1) get probability 0 */
    float inv[TASK_TILES * S_NR];
    for (int64_t a = r0; a < r1; a++) {
        float *sr = s + (a - r0) * ld;
        const int64_t pos = first + a / group, hi = pos + 1;
        const int64_t lo = j->window > 0 && pos - j->window + 1 > k0 ? pos - j->window + 1 : k0;
        for (int64_t t = k0; t < lo; t++) sr[t - k0] = 0.0f;
        for (int64_t t = hi; t < k1; t++) sr[t - k0] = 0.0f;
        inv[a - r0] = 1.0f / exp_minus_max(sr + (lo - k0), hi - lo);
    }
    /* values: KEY_BLOCK keys at a time for every row group, the sums kept in the output rows */
    for (int64_t kb = lowest; kb <= p_last; kb += KEY_BLOCK) {
        const int64_t ke = kb + KEY_BLOCK <= p_last + 1 ? kb + KEY_BLOCK : p_last + 1;
        for (int64_t b = r0; b < r1; b += PV_NR) {
            const int nb = (int)(r1 - b < PV_NR ? r1 - b : PV_NR);
            if (kb > first + (b + nb - 1) / group) continue;
            const float *pb = s + (b - r0) * ld + kb - k0;
            for (int d0 = 0; d0 < hd; d0 += PV_NV * VL) {
                const int nv = (hd - d0) / VL < PV_NV ? (hd - d0) / VL : PV_NV;
#define VALUES(NR_)                                                                                              \
    switch (nv) {                                                                                                \
    case 1: value_tile(pb, ld, value_rows, kb, ke, d0, outr + (b - r0), NR_, 1); break;                          \
    case 2: value_tile(pb, ld, value_rows, kb, ke, d0, outr + (b - r0), NR_, 2); break;                          \
    case 3: value_tile(pb, ld, value_rows, kb, ke, d0, outr + (b - r0), NR_, 3); break;                          \
    default: value_tile(pb, ld, value_rows, kb, ke, d0, outr + (b - r0), NR_, PV_NV); break;                     \
    }
                ROWS_SWITCH(nb, VALUES, PV_NR)
#undef VALUES
            }
        }
    }
    for (int64_t a = r0; a < r1; a++) {
        const vf sc = VSET1(inv[a - r0]);
        for (int d = 0; d < hd; d += VL) VSTORE(outr[a - r0] + d, VMUL(VLOAD(outr[a - r0] + d), sc));
    }
}

/* out[n, heads, head_dim] = causal attention of q[n, heads, head_dim] (the last n of ctx positions) over the
 * sequence's cached keys and values (blocks: its block table, or NULL for slots start ..). float32 cache,
 * head_dim a multiple of the vector width. Returns 0, or -1 when the shapes are outside what it takes (the
 * caller keeps torch's path). */
int ember_causal_attention(const float *q, const float *k_cache, const float *v_cache, float *out, int64_t n,
                           int64_t ctx, int heads, int kv_heads, int head_dim, const int64_t *blocks, int64_t start,
                           int block_size, float scale, int64_t window, int nthreads) {
    if (n < 1 || ctx < n || kv_heads < 1 || heads % kv_heads || head_dim < VL || head_dim % VL || block_size < 1)
        return -1;
    causal_job_t j = {.q = q, .k = k_cache, .v = v_cache, .out = out, .blocks = blocks, .n = n, .ctx = ctx,
                      .start = start, .window = window, .heads = heads, .kv_heads = kv_heads,
                      .head_dim = head_dim, .block_size = block_size, .group = heads / kv_heads, .scale = scale};
    j.keys_padded = (ctx + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;
    /* one cache line more per row: at a power-of-two stride every row of a key block would fall in the same L1
     * sets and evict each other (2x slower at 4096 keys) */
    j.kt_stride = j.keys_padded + 16;
    j.tasks_per_head = (n * j.group + TASK_TILES * S_NR - 1) / (TASK_TILES * S_NR);
    static float *kt;
    static int64_t kt_floats;
    ember_lock();
    const int64_t need = (int64_t)kv_heads * head_dim * j.kt_stride;
    if (kt_floats < need) {
        free(kt);
        kt = aligned_alloc(64, sizeof(float) * (size_t)need);
        kt_floats = kt ? need : 0;
        if (!kt) {
            ember_unlock();
            return -1;
        }
    }
    j.kt = kt;
    ember_parallel_for(nthreads, transpose_keys, &j, j.keys_padded / KEY_BLOCK);
    ember_parallel_for(nthreads, causal_task, &j, kv_heads * j.tasks_per_head);
    ember_unlock();
    return j.failed ? -1 : 0;
}
