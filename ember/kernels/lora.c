/* LoRA's low-rank path for a batch whose rows use different adapters (ember.layers.lora): one call per
 * projection adds y[t] += (x[t] A_t^T) B_t^T for every row t, where A_t, B_t are row t's own adapter's.
 *
 * The loaded adapters of a projection are stacked: A [cols, in], B^T [cols, out] (cols = the ranks summed), and
 * row t's adapter is the column range [lo[t], hi[t]) (empty: a row of the base model). Each row does only its own
 * adapter's products, and each B row is read once per call whatever the mix; torch's equivalent is a masked
 * product over every adapter's columns plus four small ops, each a wake-up of its thread pool. The input
 * preparation the fused native projections fold in (RMSNorm; silu(gate) * up) is folded in here too.
 * A and B are float32 or bfloat16 (ember.layers.lora picks it): bfloat16 is widened by a shift, exact and
 * cheap on any AVX2 CPU, and halves the bytes read. x, y float32; products accumulate in float32.
 */
#include "common.h"

#include <stdlib.h>

#define OUT_CHUNK 256 /* outputs per task */
/* Below this many multiply-adds a call runs on the calling thread alone: a decode step's call (16 rows of rank
 * 16 through a 2048-wide projection: ~1M) takes tens of microseconds, which waking the pool's workers costs too,
 * and on a loaded machine far more (a descheduled worker holds the call until it runs again). */
#define PARALLEL_FMAS (4 << 20)

enum { LORA_PREP_NONE, LORA_PREP_RMS_NORM, LORA_PREP_SILU_GATE };

typedef struct {
    const float *x, *norm_w;
    float *y, *h, *xe;
    float eps;
    int prep;
    const void *a, *b;
    const int32_t *lo, *hi;
    int64_t rows, in, out, cols, ldx, ldy;
    int bf16;
} lora_job_t;

/* 8 values of a float32 or bfloat16 row, as float32. */
INLINE __m256 load8(const void *p, int64_t i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    const __m128i w = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16));
}

INLINE float load1(const void *p, int64_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* sum of x[i] * w[i], i < n: x float32, w float32 or bfloat16. */
INLINE float dot_mixed(const float *x, const void *w, int64_t n, int bf16) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(w, i, bf16), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load8(w, i + 8, bf16), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(w, i, bf16), acc0);
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += x[i] * load1(w, i, bf16);
    return s;
}

/* h[t, c] = x[t] . A[c] for the columns c of row t's adapter, x[t] prepared first (RMSNorm or the gated
 * product, into xe[t]) when the call folds that in. */
static void down_task(void *ctx, int64_t t) {
    const lora_job_t *j = ctx;
    const int64_t lo = j->lo[t], hi = j->hi[t];
    if (hi <= lo) return;
    const float *xt = j->x + t * j->ldx;
    if (j->prep != LORA_PREP_NONE) {
        float *xe = j->xe + t * j->in;
        if (j->prep == LORA_PREP_RMS_NORM)
            rms_norm_row(xt, j->in, j->norm_w, j->eps, xe);
        else
            silu_gate_row(xt, j->in, xe);
        xt = xe;
    }
    const size_t esize = j->bf16 ? 2 : 4;
    for (int64_t c = lo; c < hi; c++)
        j->h[t * j->cols + c] = dot_mixed(xt, (const char *)j->a + (size_t)(c * j->in) * esize, j->in, j->bf16);
}

/* y[t, o] += sum over c in [lo[t], hi[t]) of h[t, c] B^T[c, o], for a chunk of outputs o: B is held transposed
 * ([cols, out]), so each column's outputs are contiguous and the update is vector FMAs over o. */
static void up_task(void *ctx, int64_t chunk) {
    const lora_job_t *j = ctx;
    const int64_t o0 = chunk * OUT_CHUNK, o1 = o0 + OUT_CHUNK < j->out ? o0 + OUT_CHUNK : j->out;
    for (int64_t t = 0; t < j->rows; t++) {
        const int64_t lo = j->lo[t], hi = j->hi[t];
        if (hi <= lo) continue;
        const float *ht = j->h + t * j->cols;
        float *yt = j->y + t * j->ldy;
        int64_t o = o0;
        for (; o + 32 <= o1; o += 32) {
            __m256 a0 = _mm256_loadu_ps(yt + o), a1 = _mm256_loadu_ps(yt + o + 8);
            __m256 a2 = _mm256_loadu_ps(yt + o + 16), a3 = _mm256_loadu_ps(yt + o + 24);
            for (int64_t c = lo; c < hi; c++) {
                const __m256 hc = _mm256_set1_ps(ht[c]);
                const int64_t at = c * j->out + o;
                a0 = _mm256_fmadd_ps(hc, load8(j->b, at, j->bf16), a0);
                a1 = _mm256_fmadd_ps(hc, load8(j->b, at + 8, j->bf16), a1);
                a2 = _mm256_fmadd_ps(hc, load8(j->b, at + 16, j->bf16), a2);
                a3 = _mm256_fmadd_ps(hc, load8(j->b, at + 24, j->bf16), a3);
            }
            _mm256_storeu_ps(yt + o, a0);
            _mm256_storeu_ps(yt + o + 8, a1);
            _mm256_storeu_ps(yt + o + 16, a2);
            _mm256_storeu_ps(yt + o + 24, a3);
        }
        for (; o < o1; o++) {
            float acc = yt[o];
            for (int64_t c = lo; c < hi; c++) acc += ht[c] * load1(j->b, c * j->out + o, j->bf16);
            yt[o] = acc;
        }
    }
}

/* y[rows, out] (row stride ldy) += each row's low-rank product, as above; a [cols, in], bt [cols, out]. prep:
 * LORA_PREP_RMS_NORM (x normed with norm_w, eps first: the fused q/k/v and gate/up kernels take the un-normed
 * x) or LORA_PREP_SILU_GATE (x rows are [gate | up], 2 * in wide: the down projection's input is their gated
 * product). Scratch: h [rows, cols] and, with a prep, xe [rows, in], float32.
 * Returns 0, or -1 when the shapes are outside what this kernel takes (the caller keeps torch's). */
int ember_lora(const float *x, int64_t ldx, float *y, int64_t ldy, int64_t rows, int64_t in, int64_t out,
               const void *a, const void *bt, int64_t cols, int bf16, const int32_t *lo, const int32_t *hi, float *h,
               float *xe, int prep, const float *norm_w, float eps, int nthreads) {
    if (rows < 1 || in < 1 || out < 1 || cols < 1 || prep < LORA_PREP_NONE || prep > LORA_PREP_SILU_GATE ||
        (prep == LORA_PREP_RMS_NORM && !norm_w) || (prep != LORA_PREP_NONE && !xe))
        return -1;
    int64_t own = 0; /* the columns the rows multiply, summed */
    for (int64_t t = 0; t < rows; t++) {
        if (lo[t] < 0 || hi[t] > cols || lo[t] > hi[t]) return -1;
        own += hi[t] - lo[t];
    }
    if (own * (in + out) < PARALLEL_FMAS) nthreads = 1;
    lora_job_t j = {.x = x, .y = y, .h = h, .a = a, .b = bt, .lo = lo, .hi = hi, .rows = rows, .in = in, .out = out,
                    .cols = cols, .ldx = ldx, .ldy = ldy, .bf16 = bf16, .xe = xe, .prep = prep, .norm_w = norm_w,
                    .eps = eps};
    ember_lock();
    ember_parallel_for(nthreads, down_task, &j, rows);
    ember_parallel_for(nthreads, up_task, &j, (out + OUT_CHUNK - 1) / OUT_CHUNK);
    ember_unlock();
    return 0;
}
